//! Billing: the per-app usage ledger.
//!
//! Reads `MZ_USAGE` (the `usage.charged` events, sourced from the log by the server) through the
//! durable consumer `billing`, in batches of whatever has arrived (up to [`BATCH`]), and writes
//! each batch to the ledger of each app's database ([`mozaiks_store::ledger`]): one document
//! per charge, unique on `(app_id, event_id)`, inserted without a transaction. A redelivered
//! charge hits the unique index and changes nothing, so the ledger equals the sum of the
//! `usage.charged` events exactly once each, even with several billing replicas, and a charge is
//! acknowledged only once it is written.
//!
//! Each charge is written with its mark, its position in `MZ_USAGE` (the stream sequence and the
//! durable consumer's creation time, read after the charges arrived), and after every
//! [`COMPACT_EVERY`] charges of an app, or its first batch [`ROLL_AFTER`] after its last roll,
//! billing rolls the app's ledger up to the consumer's acknowledgement floor
//! ([`Store::compact_usage`]): a charge is acknowledged only once it is written, so none at or
//! below the floor can be written later.
//!
//! When a batch cannot be written, billing keeps it and tries again (pausing a second at most)
//! until Mongo answers, telling JetStream that it is still working on it, so a long Mongo stall spends
//! no delivery attempt and loses nothing (the consumer has no `max_deliver` either), and the
//! backlog is written within a second or two of Mongo's return. Meanwhile the process reports
//! itself not ready (`billing.mongo`). Only when the shared database answers and some charges
//! still fail (their app's own database is down) are those handed back to JetStream with a
//! growing delay, so the other apps' charges go on.

pub mod credits;
pub mod metrics;
pub mod wallet;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{Envelope, Event, codec};
use mozaiks_store::Store;
use mozaiks_store::ledger::{COMPACT_EVERY, Charged, UNPLACED};
use mozaiks_store::mongodb::Database;
use tracing::{debug, info, warn};

use metrics as m;
pub use metrics::describe;

/// The most charges fetched and written at once.
pub const BATCH: usize = 256;
/// The longest an app's charges wait for a roll while more of them come (see the crate's
/// documentation).
pub const ROLL_AFTER: Duration = Duration::from_secs(1);
/// How long billing waits for more of a pull's charges before writing what it has.
const LINGER: Duration = Duration::from_millis(2);
/// Readiness components of billing ([`Bus::report`]).
const FETCH: &str = "billing.charges";
const LEDGER: &str = "billing.mongo";
/// How long one attempt to write a batch may take.
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the store's ping may take before Mongo counts as not answering.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// The longest pause between two attempts at a held batch.
const RETRY_MAX: Duration = Duration::from_secs(1);
/// Failed attempts, with Mongo answering, after which a batch's failing charges are deferred.
const DEFER_AFTER: u32 = 3;
/// The longest delay of a deferred charge's redelivery.
const DEFER_MAX: Duration = Duration::from_secs(60);

/// Errors of billing.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Bus(#[from] mozaiks_bus::Error),
    #[error(transparent)]
    Store(#[from] mozaiks_store::Error),
    #[error(transparent)]
    Mongo(#[from] mozaiks_store::mongodb::error::Error),
    #[error("consumer failed: {0}")]
    Consumer(String),
    #[error("the ledger did not answer within {} s", APPLY_TIMEOUT.as_secs())]
    Timeout,
}

/// The billing service.
pub struct Billing {
    bus: Bus,
    store: Store,
    /// Wallets ([`credits`]), when billing keeps them.
    credits: Option<credits::Credits>,
    rolls: Arc<Rolls>,
}

type PullConsumer =
    async_nats::jetstream::consumer::Consumer<async_nats::jetstream::consumer::pull::Config>;

/// The ledger rolls billing starts: per app, the charges counted since the last one, when it
/// started, and whether one runs.
struct Rolls {
    consumer: Mutex<Option<PullConsumer>>,
    apps: Mutex<HashMap<(String, String), Roll>>,
    every: u64,
    after: Duration,
}

struct Roll {
    counted: u64,
    last: Instant,
    running: bool,
}

impl Default for Rolls {
    fn default() -> Rolls {
        Rolls {
            consumer: Mutex::default(),
            apps: Mutex::default(),
            every: COMPACT_EVERY,
            after: ROLL_AFTER,
        }
    }
}

impl Rolls {
    /// Counts `counted` charges of `app_id` in `db`; rolls its ledger in the background when
    /// [`Rolls::every`] are waiting or the last roll is [`Rolls::after`] old, and no roll of it
    /// runs.
    fn note(self: &Arc<Self>, store: &Store, db: &Database, app_id: &str, counted: u64) {
        let key = (db.name().to_string(), app_id.to_string());
        {
            let mut apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
            let e = apps.entry(key.clone()).or_insert_with(|| Roll {
                counted: 0,
                last: Instant::now(),
                running: false,
            });
            e.counted += counted;
            if e.running || (e.counted < self.every && e.last.elapsed() < self.after) {
                return;
            }
            *e = Roll {
                counted: 0,
                last: Instant::now(),
                running: true,
            };
        }
        let (me, store, db, app_id) = (self.clone(), store.clone(), db.clone(), app_id.to_string());
        tokio::spawn(async move {
            match me.floor().await {
                Ok(floor) => match store.compact_usage(&db, &app_id, &floor).await {
                    Ok(c) => debug!(
                        app_id,
                        charges = c.charges,
                        runs = c.runs,
                        "Usage ledger rolled."
                    ),
                    Err(e) => {
                        debug!(app_id, error = %e, "Usage ledger not rolled; a later roll will.")
                    }
                },
                Err(e) => {
                    debug!(app_id, error = %e, "No acknowledgement floor; a later roll will.")
                }
            }
            let mut apps = me.apps.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(e) = apps.get_mut(&key) {
                e.running = false;
            }
        });
    }

    /// The mark of the durable consumer's acknowledgement floor.
    async fn floor(&self) -> Result<String, String> {
        let consumer = self
            .consumer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let mut consumer = consumer.ok_or("no consumer yet")?;
        let info = consumer.info().await.map_err(|e| e.to_string())?;
        Ok(mozaiks_store::ledger::mark(
            info.created.unix_timestamp_nanos(),
            info.ack_floor.stream_sequence,
        ))
    }
}

/// What applying a charge did.
#[derive(Debug, PartialEq, Eq)]
pub enum Applied {
    Charged,
    Duplicate,
}

/// A charge received and not yet acknowledged.
struct Pending {
    msg: Message,
    env: Envelope,
    /// Its position in `MZ_USAGE` ([`mozaiks_store::ledger::mark`]).
    mark: String,
}

impl Billing {
    pub fn new(bus: Bus, store: Store) -> Billing {
        describe();
        Billing {
            bus,
            store,
            credits: None,
            rolls: Arc::default(),
        }
    }

    /// Rolls an app's ledger after `charges` of its charges, or after `after` while it has more
    /// (defaults: [`COMPACT_EVERY`], [`ROLL_AFTER`]; smaller in tests).
    pub fn roll_every(mut self, charges: u64, after: Duration) -> Billing {
        self.rolls = Arc::new(Rolls {
            every: charges.max(1),
            after,
            ..Rolls::default()
        });
        self
    }

    /// Also keeps every app's wallet in `MZ_CREDITS` ([`credits`]), costing charges appended
    /// before prices existed at `prices`.
    pub fn with_credits(
        mut self,
        registry: mozaiks_control::Registry,
        prices: mozaiks_control::prices::Prices,
    ) -> Billing {
        self.credits = Some(credits::Credits::new(registry, prices));
        self
    }

    /// Applies charges until `shutdown` resolves. Stopping never waits for NATS or Mongo: a
    /// batch in flight is dropped unacknowledged and redelivered (writes are idempotent).
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let result = tokio::select! {
            _ = shutdown => Ok(()),
            r = self.work() => r,
        };
        info!("Billing stopped.");
        result
    }

    async fn work(&mut self) -> Result<(), Error> {
        // Mongo or NATS down at start is a wait, not a failure of the process.
        let mut backoff = Duration::from_millis(200);
        let mut consumer = loop {
            let ready = async {
                self.store.ensure_indexes(self.store.shared()).await?;
                Ok::<_, Error>(self.bus.durable("MZ_USAGE", "billing").await?)
            };
            match ready.await {
                Ok(c) => break c,
                Err(e) => {
                    warn!(error = %e, "Billing cannot start yet; retrying.");
                    self.bus.report(FETCH, Err(format!("cannot start: {e}")));
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        };
        if let Some(c) = self.credits.as_mut() {
            let mut backoff = Duration::from_millis(200);
            while let Err(e) = c.start(&self.bus, &self.store).await {
                warn!(error = %e, "Billing cannot keep wallets yet; retrying.");
                self.bus
                    .report(FETCH, Err(format!("cannot start wallets: {e}")));
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
        *self
            .rolls
            .consumer
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(consumer.clone());
        self.bus.report(FETCH, Ok(()));
        info!("Billing started.");
        loop {
            let batch = consumer
                .batch()
                .max_messages(BATCH)
                .expires(Duration::from_secs(1))
                .messages()
                .await;
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    warn!(error = %e, "Cannot fetch charges; retrying.");
                    self.bus
                        .report(FETCH, Err(format!("cannot fetch charges: {e}")));
                    if mozaiks_bus::keeper::is_missing(&e) {
                        self.bus.heal();
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            // Whatever has arrived is written at once (a wallet must learn of a charge within
            // moments), not when the pull request expires.
            let mut chunks = (&mut batch).ready_chunks(BATCH);
            while let Some(mut items) = chunks.next().await {
                // The rest of a pull is usually on its way: linger a moment for it, so a backlog
                // is written in batches of up to BATCH rather than a few charges at a time.
                let mut ended = false;
                while items.len() < BATCH {
                    match tokio::time::timeout(LINGER, chunks.next()).await {
                        Ok(Some(more)) => items.extend(more),
                        Ok(None) => {
                            ended = true;
                            break;
                        }
                        Err(_) => break,
                    }
                }
                // The consumer's creation time, read after the charges arrived: a stream or
                // consumer created again since sorts after it (see `mozaiks_store::ledger`).
                let epoch = match consumer.info().await {
                    Ok(i) => Some(i.created.unix_timestamp_nanos()),
                    Err(e) => {
                        warn!(error = %e, "No consumer info; these charges are written unplaced.");
                        None
                    }
                };
                let mut charges = Vec::new();
                for item in items {
                    let msg = match item {
                        Ok(m) => m,
                        Err(e) => {
                            warn!(error = %e, "Charge fetch error.");
                            continue;
                        }
                    };
                    match codec::decode_event(&msg.payload) {
                        Ok(mut env) => {
                            if let (Some(c), Event::UsageCharged(u)) =
                                (&self.credits, &mut env.event)
                            {
                                // A charge appended before prices existed: costed now, once
                                // (its ledger document keeps this cost).
                                c.prices.cost_charge(u);
                            }
                            let mark = match (epoch, msg.info()) {
                                (Some(epoch), Ok(i)) => {
                                    mozaiks_store::ledger::mark(epoch, i.stream_sequence)
                                }
                                _ => UNPLACED.to_string(),
                            };
                            charges.push(Pending { msg, env, mark })
                        }
                        Err(e) => {
                            warn!(subject = %msg.subject, error = %e, "Charge does not decode; skipping it.");
                            let _ = msg.ack_with(AckKind::Term).await;
                        }
                    }
                }
                self.bus.report(FETCH, Ok(()));
                if !charges.is_empty() {
                    self.settle(charges).await;
                }
                if ended {
                    break;
                }
            }
        }
    }

    /// Applies one charge exactly once, to the ledger in the app's database
    /// ([`Store::resolve_storage`]; see [`Store::charge`]).
    pub async fn apply(&self, env: &Envelope) -> Result<Applied, Error> {
        if !matches!(env.event, Event::UsageCharged(_)) {
            return Ok(Applied::Duplicate);
        }
        let db = self.store.resolve_storage(&env.app_id).await?;
        let charged = self.store.charge(&db, env).await?;
        count(env, charged);
        Ok(match charged {
            Charged::Counted => Applied::Charged,
            Charged::Duplicate => Applied::Duplicate,
        })
    }

    /// Writes and acknowledges `pending`, holding it until it is written (or deferred).
    async fn settle(&self, mut pending: Vec<Pending>) {
        let mut attempt = 0u32;
        loop {
            let Some((failed, error)) = self.write(pending).await else {
                if attempt > 0 {
                    info!(attempt, "Charges written after a failure; billing goes on.");
                }
                self.bus.report(LEDGER, Ok(()));
                ::metrics::gauge!(m::WAITING).set(0.0);
                return;
            };
            pending = failed;
            attempt += 1;
            ::metrics::counter!(m::RETRIES).increment(1);
            let mongo_answers = matches!(
                tokio::time::timeout(PING_TIMEOUT, self.store.ping()).await,
                Ok(Ok(()))
            );
            if mongo_answers && attempt >= DEFER_AFTER {
                warn!(attempt, charges = pending.len(), error = %error,
                      "Charges keep failing while Mongo answers; deferring them.");
                ::metrics::counter!(m::DEFERRED).increment(pending.len() as u64);
                for p in pending {
                    let delay = defer_delay(&p.msg);
                    let _ = p.msg.ack_with(AckKind::Nak(Some(delay))).await;
                }
                ::metrics::gauge!(m::WAITING).set(0.0);
                return;
            }
            if attempt == 1 || attempt.is_multiple_of(10) {
                warn!(attempt, charges = pending.len(), mongo_answers, error = %error,
                      "Charges not written; holding them and retrying.");
            }
            self.bus
                .report(LEDGER, Err(format!("charges not written: {error}")));
            ::metrics::gauge!(m::WAITING).set(1.0);
            // Still working on them: JetStream must not redeliver them meanwhile.
            for p in &pending {
                let _ = p.msg.ack_with(AckKind::Progress).await;
            }
            let pause = (Duration::from_millis(100) * 2u32.saturating_pow(attempt)).min(RETRY_MAX);
            tokio::time::sleep(pause).await;
        }
    }

    /// Writes `pending` to the ledgers of their apps' databases and acknowledges what was
    /// written; answers the charges that were not, with the last error (`None`: all written).
    async fn write(&self, pending: Vec<Pending>) -> Option<(Vec<Pending>, Error)> {
        let mut by_db: HashMap<String, (Database, Vec<Pending>)> = HashMap::new();
        let mut failed = Vec::new();
        let mut last_error = None;
        for p in pending {
            match self.store.resolve_storage(&p.env.app_id).await {
                Ok(db) => by_db
                    .entry(db.name().to_string())
                    .or_insert_with(|| (db, Vec::new()))
                    .1
                    .push(p),
                Err(e) => {
                    last_error = Some(e.into());
                    failed.push(p);
                }
            }
        }
        for (db, group) in by_db.into_values() {
            let started = Instant::now();
            let envs: Vec<Envelope> = group.iter().map(|p| p.env.clone()).collect();
            let marks: Vec<String> = group.iter().map(|p| p.mark.clone()).collect();
            // Each app's wallet revision before its charges are written ([`credits`]).
            let mut revisions: BTreeMap<&str, Option<u64>> = BTreeMap::new();
            if let Some(c) = &self.credits {
                for env in &envs {
                    if !revisions.contains_key(env.app_id.as_str()) {
                        revisions.insert(&env.app_id, c.revision(&env.app_id).await);
                    }
                }
            }
            let result = match tokio::time::timeout(
                APPLY_TIMEOUT,
                self.store.charge_marked(&db, &envs, &marks),
            )
            .await
            {
                Ok(r) => r.map_err(Error::from),
                Err(_) => Err(Error::Timeout),
            };
            match result {
                Ok(charged) => {
                    ::metrics::histogram!(m::APPLY_SECONDS).record(started.elapsed().as_secs_f64());
                    if let Some(c) = &self.credits {
                        // The wallets before the acknowledgements: a billing that dies in
                        // between has its charges redelivered, found duplicate and recomputed.
                        let added = added_by_app(&envs, &charged);
                        for (app, revision) in &revisions {
                            c.after_batch(app, *revision, added.get(app).and_then(Option::as_ref))
                                .await;
                        }
                    }
                    let mut counted: BTreeMap<String, u64> = BTreeMap::new();
                    for (p, c) in group.into_iter().zip(charged) {
                        count(&p.env, c);
                        if c == Charged::Counted {
                            *counted.entry(p.env.app_id.clone()).or_default() += 1;
                        }
                        if let Err(e) = p.msg.ack().await {
                            // Redelivered later, and then a duplicate.
                            debug!(app_id = %p.env.app_id, error = %e, "Charge written, ack lost.");
                        }
                    }
                    // After the acknowledgements: the floor a roll reads may then pass them.
                    for (app_id, n) in counted {
                        self.rolls.note(&self.store, &db, &app_id, n);
                    }
                }
                Err(e) => {
                    last_error = Some(e);
                    failed.extend(group);
                }
            }
        }
        last_error.map(|e| (failed, e))
    }
}

/// The credits of the new charges of each app of a written batch; `None` for an app with a
/// duplicate among them (its wallet must be recomputed: the duplicate may have been written by
/// a billing that died before updating the wallet).
fn added_by_app<'a>(
    envs: &'a [Envelope],
    charged: &[Charged],
) -> BTreeMap<&'a str, Option<credits::Added>> {
    let mut out: BTreeMap<&str, Option<credits::Added>> = BTreeMap::new();
    for (env, c) in envs.iter().zip(charged) {
        let Event::UsageCharged(u) = &env.event else {
            continue;
        };
        let slot = out
            .entry(env.app_id.as_str())
            .or_insert_with(|| Some(credits::Added::default()));
        match (c, slot.as_mut()) {
            (Charged::Counted, Some(a)) => {
                let credits = u.credits.unwrap_or(0);
                let period = mozaiks_store::credits::Period::containing(env.ts).key();
                let p = a.periods.entry(period).or_default();
                *p = p.saturating_add(credits);
                let day = mozaiks_store::credits::day_key(env.ts);
                let d = a.users.entry((day, env.user_id.clone())).or_default();
                *d = d.saturating_add(credits);
            }
            (Charged::Duplicate, _) => *slot = None,
            (Charged::Counted, None) => {}
        }
    }
    out
}

/// Records what applying `env` did.
fn count(env: &Envelope, charged: Charged) {
    let Event::UsageCharged(u) = &env.event else {
        return;
    };
    match charged {
        Charged::Duplicate => ::metrics::counter!(m::DUPLICATES).increment(1),
        Charged::Counted => {
            ::metrics::counter!(m::CHARGES, "app_id" => env.app_id.clone()).increment(1);
            ::metrics::counter!(m::TOKENS, "app_id" => env.app_id.clone())
                .increment(u.total_tokens);
        }
    }
}

/// How long a deferred charge waits before JetStream redelivers it: doubling with each delivery,
/// up to [`DEFER_MAX`].
fn defer_delay(msg: &Message) -> Duration {
    let delivered = msg.info().map(|i| i.delivered).unwrap_or(1).clamp(1, 16) as u32;
    (Duration::from_secs(1) * 2u32.pow(delivered - 1)).min(DEFER_MAX)
}
