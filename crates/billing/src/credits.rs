//! Wallets: billing computes each app's wallet ([`crate::wallet`]) and writes it to the KV bucket
//! `MZ_CREDITS`, which every gateway and worker follows in memory.
//!
//! A wallet is recomputed from Mongo — the usage ledger's consumption per period (each charge
//! counted once), the grants, today's consumption per user — never incremented, so it is exact
//! whatever was redelivered or replayed, and any number of billing replicas may write it: each
//! write is a compare-and-set on the revision read *before* the inputs were read, so a write
//! that lands was computed after every earlier write, and a writer that loses reads and computes
//! again. A wallet is recomputed
//!
//! - after every batch of charges (duplicates included: a charge written by a billing that died
//!   before it could update the wallet is counted when redelivered), but see below;
//! - after every grant (the durable consumer `billing-grants` on `MZ_BILLING`: the grant is
//!   recorded in `credit_grants`, the wallet rewritten, then the grant acknowledged);
//! - by a sweep every [`SWEEP_EVERY`] for apps without a wallet, whose period or day ended, whose
//!   limits changed or whose next grant expired, and every [`FULL_EVERY`] for every app.
//!
//! **A batch of new charges is added, not recomputed**, when it can be done exactly: before
//! writing a batch, billing reads the app's wallet revision `r`; when every charge of the batch
//! was new to the ledger (no duplicate: nobody wrote any of them before) and this process knows
//! the inputs that the wallet at `r` was computed from (it wrote `r`, [`Cached`]), the new
//! wallet is computed from those inputs plus the batch's credits and written with a
//! compare-and-set on `r`. The inputs at `r` were read before `r` was written, hence before the
//! batch was read `r` and was written: they cannot contain the batch. And if anything else wrote
//! the wallet after `r` (another replica's batch, a recomputation that may have read the batch
//! from Mongo), the compare-and-set fails and the wallet is recomputed from Mongo. So each
//! charge is in a wallet once, and a batch costs no Mongo read at all (two `MZ_CREDITS`
//! operations) instead of an aggregation over the app's recent charges.
//!
//! When a threshold is reached (80 %, 100 % of the period's credits), the alert
//! (`credits.low`, `credits.exhausted`) is appended to `mz.billing.alert.{app_id}` (deduplicated
//! on app, period and threshold) before the wallet that records it as sent.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::kv;
use chrono::Utc;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_control::Registry;
use mozaiks_control::credits::{Wallet, Wallets};
use mozaiks_control::prices::Prices;
use mozaiks_events::credits::{CreditAlert, CreditGrant, PeriodStarted};
use mozaiks_store::Store;
use mozaiks_store::credits::day_key;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::metrics as m;
use crate::wallet::{self, Inputs};

/// How often the sweep looks for wallets to recompute.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How often every app's wallet is recomputed anyway.
pub const FULL_EVERY: Duration = Duration::from_secs(60);
/// How long a batch waits for its wallet's recomputation before leaving it to the refresher.
const RECOMPUTE_INLINE: Duration = Duration::from_secs(3);
/// Compare-and-set attempts of one wallet write.
const CAS_ATTEMPTS: usize = 20;
/// Readiness component.
const COMPONENT: &str = "billing.credits";

/// What billing needs to keep wallets. Cheap to clone.
#[derive(Clone)]
pub struct Credits {
    pub(crate) registry: Registry,
    pub(crate) prices: Arc<Prices>,
    inner: Option<Arc<Running>>,
}

struct Running {
    bus: Bus,
    store: Store,
    wallets: Wallets,
    refresh: mpsc::UnboundedSender<String>,
    indexed: std::sync::Mutex<HashSet<String>>,
    /// The inputs of the wallets this process wrote last, by app.
    cache: std::sync::Mutex<HashMap<String, Cached>>,
}

impl Running {
    /// What writing wallets needs, billing's and a tool's alike: `MZ_CREDITS` (billing writes
    /// wallets; it refuses nothing itself) and the credit indexes of the shared database.
    async fn open(
        bus: &Bus,
        store: &Store,
        refresh: mpsc::UnboundedSender<String>,
    ) -> Result<Running, String> {
        let wallets = Wallets::open(bus, false).await.map_err(|e| e.to_string())?;
        store
            .ensure_credit_indexes(store.shared())
            .await
            .map_err(|e| e.to_string())?;
        Ok(Running {
            bus: bus.clone(),
            store: store.clone(),
            wallets,
            refresh,
            indexed: Default::default(),
            cache: Default::default(),
        })
    }
}

/// What the wallet at `revision` of `MZ_CREDITS` was computed from (written, or found current, by
/// this process).
#[derive(Clone)]
struct Cached {
    revision: u64,
    wallet: Wallet,
    consumption: BTreeMap<String, u64>,
    grants: Vec<CreditGrant>,
    /// The day and its consumption per user, when the app has a per-user budget.
    users: Option<(String, BTreeMap<String, u64>)>,
}

/// The credits of a batch's new charges of one app.
#[derive(Debug, Default)]
pub(crate) struct Added {
    /// Credits per period key.
    pub periods: BTreeMap<String, u64>,
    /// Credits per UTC day (`YYYYMMDD`) and user.
    pub users: BTreeMap<(String, String), u64>,
}

impl Credits {
    pub fn new(registry: Registry, prices: Prices) -> Credits {
        Credits {
            registry,
            prices: Arc::new(prices),
            inner: None,
        }
    }

    /// Opens the wallets and starts the refresher, the grant consumer and the sweep.
    pub(crate) async fn start(&mut self, bus: &Bus, store: &Store) -> Result<(), String> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.inner = Some(Arc::new(Running::open(bus, store, tx).await?));
        let me = self.clone();
        tokio::spawn(me.clone().refresher(rx).instrument(info_span!("wallets")));
        tokio::spawn(me.clone().grants().instrument(info_span!("grants")));
        tokio::spawn(me.sweep().instrument(info_span!("wallet_sweep")));
        info!("Billing keeps wallets.");
        Ok(())
    }

    /// Asks for `app_id`'s wallet to be recomputed (coalesced).
    pub(crate) fn touch(&self, app_id: &str) {
        if let Some(r) = &self.inner {
            let _ = r.refresh.send(app_id.to_string());
        }
    }

    fn running(&self) -> &Running {
        self.inner.as_ref().expect("started")
    }

    /// The revision of `app_id`'s wallet now, read before a batch of its charges is written
    /// (`None`: billing keeps no wallets, there is none yet, or it cannot be read).
    pub(crate) async fn revision(&self, app_id: &str) -> Option<u64> {
        let r = self.inner.as_ref()?;
        match r.wallets.bucket().entry(app_id).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Some(e.revision),
            _ => None,
        }
    }

    /// Brings `app_id`'s wallet up to date after a batch of its charges was written: `added`
    /// holds the credits of the batch's new charges when every one of them was new, and
    /// `revision` is the wallet's revision read before the batch was written. Adds them to the
    /// inputs of that revision when this process knows them, else recomputes from Mongo (see
    /// the module's documentation).
    pub(crate) async fn after_batch(
        &self,
        app_id: &str,
        revision: Option<u64>,
        added: Option<&Added>,
    ) {
        if self.inner.is_none() {
            return;
        }
        if let (Some(rev), Some(added)) = (revision, added) {
            match self.add(app_id, rev, added).await {
                Ok(true) => {
                    ::metrics::counter!(m::WALLET_UPDATES, "how" => "added").increment(1);
                    return;
                }
                Ok(false) => {}
                Err(e) => debug!(app_id, error = %e, "Wallet not added to; recomputing it."),
            }
        }
        ::metrics::counter!(m::WALLET_UPDATES, "how" => "recomputed").increment(1);
        // Bounded: a Mongo stall must not hold the batch's acknowledgements; the refresher
        // goes on trying.
        match tokio::time::timeout(RECOMPUTE_INLINE, self.refresh(app_id)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(app_id, error = %e, "Wallet not recomputed after a batch; retrying.");
                self.touch(app_id);
            }
            Err(_) => {
                warn!(
                    app_id,
                    "Wallet not recomputed within {} s after a batch; retrying.",
                    RECOMPUTE_INLINE.as_secs()
                );
                self.touch(app_id);
            }
        }
    }

    /// Writes the wallet computed from the inputs of `revision` plus `added`, with a
    /// compare-and-set on `revision`; `Ok(false)` when it cannot be done that way (inputs not
    /// known, another writer since, a new period or day).
    async fn add(&self, app_id: &str, revision: u64, added: &Added) -> Result<bool, String> {
        let r = self.running();
        let started = Instant::now();
        let Some(mut c) = r
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(app_id)
            .filter(|c| c.revision == revision)
            .cloned()
        else {
            return Ok(false);
        };
        let Some(app) = self.registry.get(app_id) else {
            return Ok(false);
        };
        if app.is_deleted() {
            return Ok(false);
        }
        let limits = self.registry.effective_limits(&app);
        let now = Utc::now();
        let period = mozaiks_store::credits::Period::containing(now).key();
        if c.wallet.period != period {
            return Ok(false);
        }
        let today = day_key(now);
        match (&limits.user_daily_credits, &mut c.users) {
            (None, None) => {}
            (Some(_), Some((day, users))) if *day == today => {
                for ((d, user), credits) in &added.users {
                    if *d == today {
                        let e = users.entry(user.clone()).or_default();
                        *e = e.saturating_add(*credits);
                    }
                }
            }
            _ => return Ok(false),
        }
        for (p, credits) in &added.periods {
            let e = c.consumption.entry(p.clone()).or_default();
            *e = e.saturating_add(*credits);
        }
        let (mut w, due) = wallet::compute(Inputs {
            app_id,
            limits,
            consumption: &c.consumption,
            grants: &c.grants,
            users_today: c.users.as_ref().map(|(_, u)| u),
            alerts: c.wallet.alerts.clone(),
            now,
        });
        for kind in due {
            self.alert(&w, kind).await?;
            w.alerts.push(kind.to_string());
        }
        let bytes = serde_json::to_vec(&w).map_err(|e| e.to_string())?;
        match r
            .wallets
            .bucket()
            .update(app_id, bytes.into(), revision)
            .await
        {
            Ok(new) => {
                ::metrics::histogram!(m::WALLET_SECONDS).record(started.elapsed().as_secs_f64());
                ::metrics::counter!(m::WALLETS_WRITTEN, "state" => w.state.as_str()).increment(1);
                if c.wallet.blocked != w.blocked {
                    info!(
                        app_id,
                        blocked = w.blocked,
                        balance = w.balance,
                        consumed = w.consumed,
                        "Wallet changed state."
                    );
                }
                c.revision = new;
                c.wallet = w;
                self.remember(app_id, c);
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                ::metrics::counter!(m::WALLET_CONFLICTS).increment(1);
                Ok(false)
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Keeps `c` as the inputs of `app_id`'s wallet, unless a later revision is known already.
    fn remember(&self, app_id: &str, c: Cached) {
        let mut cache = self
            .running()
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache
            .get(app_id)
            .is_none_or(|old| old.revision <= c.revision)
        {
            cache.insert(app_id.to_string(), c);
        }
    }

    /// Recomputes the wallets asked for, each app once per pass.
    async fn refresher(self, mut rx: mpsc::UnboundedReceiver<String>) {
        while let Some(first) = rx.recv().await {
            let mut apps: HashSet<String> = HashSet::from([first]);
            while let Ok(more) = rx.try_recv() {
                apps.insert(more);
            }
            for app_id in apps {
                self.refresh_retrying(&app_id).await;
            }
        }
    }

    /// Recomputes `app_id`'s wallet until it is written (pausing up to a second between tries).
    async fn refresh_retrying(&self, app_id: &str) {
        let mut pause = Duration::from_millis(100);
        loop {
            match self.refresh(app_id).await {
                Ok(_) => {
                    self.running().bus.report(COMPONENT, Ok(()));
                    return;
                }
                Err(e) => {
                    warn!(app_id, error = %e, "Wallet not written; retrying.");
                    ::metrics::counter!(m::WALLET_FAILURES).increment(1);
                    self.running().bus.report(
                        COMPONENT,
                        Err(format!("wallet of {app_id} not written: {e}")),
                    );
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    /// Computes `app_id`'s wallet and writes it (compare-and-set); answers the wallet written,
    /// or `None` for an app that does not exist (any more).
    pub async fn refresh(&self, app_id: &str) -> Result<Option<Wallet>, String> {
        let r = self.running();
        let started = Instant::now();
        for _ in 0..CAS_ATTEMPTS {
            let entry = r
                .wallets
                .bucket()
                .entry(app_id)
                .await
                .map_err(|e| e.to_string())?;
            let (revision, prev) = match entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    Some(e.revision),
                    serde_json::from_slice::<Wallet>(&e.value).ok(),
                ),
                Some(e) => (Some(e.revision), None),
                None => (None, None),
            };
            let Some(app) = self.registry.get(app_id) else {
                return Ok(None);
            };
            if app.is_deleted() {
                return Ok(None);
            }
            let limits = self.registry.effective_limits(&app);
            let db = r
                .store
                .resolve_storage(app_id)
                .await
                .map_err(|e| e.to_string())?;
            if !r
                .indexed
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .contains(db.name())
            {
                r.store
                    .ensure_credit_indexes(&db)
                    .await
                    .map_err(|e| e.to_string())?;
                r.indexed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(db.name().to_string());
            }
            let consumption = r
                .store
                .consumption(&db, app_id)
                .await
                .map_err(|e| e.to_string())?;
            let grants = r.store.grants(app_id).await.map_err(|e| e.to_string())?;
            let now = Utc::now();
            let users = match limits.user_daily_credits {
                Some(_) => Some(
                    r.store
                        .consumption_by_user(&db, app_id, &day_key(now))
                        .await
                        .map_err(|e| e.to_string())?,
                ),
                None => None,
            };
            let period = mozaiks_store::credits::Period::containing(now).key();
            let alerts = prev
                .as_ref()
                .filter(|p| p.period == period)
                .map(|p| p.alerts.clone())
                .unwrap_or_default();
            let (mut w, due) = wallet::compute(Inputs {
                app_id,
                limits,
                consumption: &consumption,
                grants: &grants,
                users_today: users.as_ref(),
                alerts,
                now,
            });
            for kind in due {
                self.alert(&w, kind).await?;
                w.alerts.push(kind.to_string());
            }
            let inputs = |revision: u64, wallet: Wallet| Cached {
                revision,
                wallet,
                consumption,
                grants,
                users: users.map(|u| (day_key(now), u)),
            };
            if let Some(p) = prev.as_ref().filter(|p| wallet::same(&w, p)) {
                // The wallet at `revision` is what these inputs give.
                if let Some(rev) = revision {
                    self.remember(app_id, inputs(rev, (*p).clone()));
                }
                return Ok(Some(w));
            }
            if prev.as_ref().is_none_or(|p| p.period != w.period) {
                self.period_started(&w).await;
            }
            let bytes = serde_json::to_vec(&w).map_err(|e| e.to_string())?;
            let written = match revision {
                Some(rev) => r
                    .wallets
                    .bucket()
                    .update(app_id, bytes.into(), rev)
                    .await
                    .map_err(|e| e.kind() == kv::UpdateErrorKind::WrongLastRevision),
                None => r
                    .wallets
                    .bucket()
                    .create(app_id, bytes.into())
                    .await
                    .map_err(|e| e.kind() == kv::CreateErrorKind::AlreadyExists),
            };
            match written {
                Ok(new) => {
                    self.remember(app_id, inputs(new, w.clone()));
                    ::metrics::histogram!(m::WALLET_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    ::metrics::counter!(m::WALLETS_WRITTEN, "state" => w.state.as_str())
                        .increment(1);
                    if prev.as_ref().is_none_or(|p| p.blocked != w.blocked) {
                        info!(
                            app_id,
                            blocked = w.blocked,
                            balance = w.balance,
                            consumed = w.consumed,
                            "Wallet changed state."
                        );
                    } else {
                        debug!(app_id, balance = w.balance, "Wallet written.");
                    }
                    return Ok(Some(w));
                }
                // Another writer first: read again and compute again.
                Err(true) => {
                    ::metrics::counter!(m::WALLET_CONFLICTS).increment(1);
                    continue;
                }
                Err(false) => return Err("cannot write MZ_CREDITS".into()),
            }
        }
        Err(format!("{CAS_ATTEMPTS} writers overtook this one"))
    }

    /// Appends an alert (deduplicated on app, period and threshold within the stream's window;
    /// the wallet then records it as sent).
    async fn alert(&self, w: &Wallet, kind: &'static str) -> Result<(), String> {
        let r = self.running();
        let alert = CreditAlert {
            kind: kind.to_string(),
            app_id: w.app_id.clone(),
            period: w.period.clone(),
            included: w.included,
            granted: w.granted,
            consumed: w.consumed,
            balance: w.balance,
            ts: Utc::now(),
        };
        let payload = serde_json::to_vec(&alert).map_err(|e| e.to_string())?;
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            "Nats-Msg-Id",
            format!("alert:{}:{}:{kind}", w.app_id, w.period).as_str(),
        );
        r.bus
            .jetstream()
            .publish_with_headers(
                r.bus.subjects().billing_alert(&w.app_id),
                headers,
                payload.into(),
            )
            .await
            .map_err(|e| e.to_string())?
            .await
            .map_err(|e| e.to_string())?;
        ::metrics::counter!(m::ALERTS, "app_id" => w.app_id.clone(), "kind" => kind).increment(1);
        warn!(app_id = %w.app_id, kind, consumed = w.consumed, balance = w.balance, "Credit alert.");
        Ok(())
    }

    /// Records the start of the wallet's period once (any replica, any number of times).
    async fn period_started(&self, w: &Wallet) {
        let r = self.running();
        let rec = PeriodStarted {
            app_id: w.app_id.clone(),
            period: w.period.clone(),
            period_start: w.period_start,
            period_end: w.period_end,
            included: w.included,
        };
        let Ok(payload) = serde_json::to_vec(&rec) else {
            return;
        };
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let subject = r.bus.subjects().credit_period(&w.app_id, &w.period);
        match r
            .bus
            .jetstream()
            .publish_with_headers(subject, headers, payload.into())
            .await
        {
            // Refused when already recorded: that is the point.
            Ok(ack) => {
                let _ = ack.await;
            }
            Err(e) => debug!(app_id = %w.app_id, error = %e, "Period start not recorded."),
        }
    }

    /// Records every grant appended to `MZ_BILLING` and recomputes its app's wallet before
    /// acknowledging it.
    async fn grants(self) {
        let r = self.running();
        loop {
            let consumer = match r.bus.durable("MZ_BILLING", "billing-grants").await {
                Ok(c) => c,
                Err(e) => {
                    warn!(error = %e, "Cannot open the grants consumer; retrying.");
                    r.bus
                        .report(COMPONENT, Err(format!("grants consumer: {e}")));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut messages = match consumer
                .stream()
                .heartbeat(Duration::from_secs(5))
                .expires(Duration::from_secs(30))
                .messages()
                .await
            {
                Ok(m) => m,
                Err(e) => {
                    warn!(error = %e, "Cannot pull grants; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            while let Some(msg) = messages.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        warn!(error = %e, "Grant pull error; reopening.");
                        break;
                    }
                };
                let grant: CreditGrant = match serde_json::from_slice(&msg.payload) {
                    Ok(g) => g,
                    Err(e) => {
                        warn!(subject = %msg.subject, error = %e, "A grant that does not parse; skipping it.");
                        let _ = msg.ack_with(AckKind::Term).await;
                        continue;
                    }
                };
                let recorded = loop {
                    match r.store.record_grant(&grant).await {
                        Ok(new) => break new,
                        Err(e) => {
                            warn!(app_id = %grant.app_id, error = %e, "Grant not recorded; retrying.");
                            let _ = msg.ack_with(AckKind::Progress).await;
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                };
                self.refresh_retrying(&grant.app_id).await;
                if recorded {
                    ::metrics::counter!(m::GRANTS, "app_id" => grant.app_id.clone()).increment(1);
                    info!(app_id = %grant.app_id, grant_id = %grant.grant_id, amount = grant.amount, "Credits granted.");
                }
                let _ = msg.ack().await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Recomputes wallets that went stale without a charge or a grant.
    async fn sweep(self) {
        let r = self.running();
        let mut last_full = Instant::now();
        loop {
            tokio::time::sleep(SWEEP_EVERY).await;
            let full = last_full.elapsed() >= FULL_EVERY;
            if full {
                last_full = Instant::now();
            }
            let now = Utc::now();
            let today = day_key(now);
            for app in self.registry.all() {
                if app.is_deleted() {
                    continue;
                }
                let limits = self.registry.effective_limits(&app);
                let stale = match r.wallets.get(&app.app_id) {
                    None => true,
                    Some(w) => {
                        full || !w.is_current(now)
                            || w.included != limits.included_credits
                            || w.overage_policy != limits.overage
                            || w.overage_limit != limits.overage_limit
                            || w.next_expiry.is_some_and(|e| e <= now)
                            || (limits.user_daily_credits.is_some()
                                && w.day.as_deref() != Some(today.as_str()))
                            || (limits.user_daily_credits.is_none() && w.day.is_some())
                    }
                };
                if stale {
                    self.touch(&app.app_id);
                }
            }
        }
    }
}

/// Credits per period of every app, for tests and tools: `store.consumption` over `apps`.
pub async fn consumed(
    store: &Store,
    apps: &[&str],
) -> Result<BTreeMap<String, BTreeMap<String, u64>>, mozaiks_store::Error> {
    let mut out = BTreeMap::new();
    for app in apps {
        let db = store.resolve_storage(app).await?;
        out.insert(app.to_string(), store.consumption(&db, app).await?);
    }
    Ok(out)
}

impl Credits {
    /// Wallets kept by a tool rather than by billing (`mozaiks rebuild`): no refresher, grant
    /// consumer or sweep is started; [`Credits::refresh`] computes and writes a wallet exactly
    /// as billing does (the same inputs, the same compare-and-set, the same alerts).
    pub async fn open(
        registry: Registry,
        prices: Prices,
        bus: &Bus,
        store: &Store,
    ) -> Result<Credits, String> {
        // Nobody listens: `touch` is a no-op, every recomputation is an explicit `refresh`.
        let (refresh, _) = mpsc::unbounded_channel();
        Ok(Credits {
            registry,
            prices: Arc::new(prices),
            inner: Some(Arc::new(Running::open(bus, store, refresh).await?)),
        })
    }

    /// Costs a charge appended before prices existed, as billing does before writing it to the
    /// ledger (a charge that carries its cost keeps it).
    pub fn cost_charge(&self, u: &mut mozaiks_events::UsageCharged) {
        self.prices.cost_charge(u);
    }
}
