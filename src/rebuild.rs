//! `mozaiks rebuild [--app ID] [--from SEQ]`: rebuilds the MongoDB read models from the event
//! log while the fleet keeps running (issue 14, item 6).
//!
//! - Without `--from`: the read models of the app (or of every app) are dropped first —
//!   `chat_sessions`, `chat_messages`, the usage ledger (`usage_events`, `usage_runs`; the
//!   `usage_ledger` totals are zeroed and held, so live billing rolls nothing into them meanwhile)
//!   and the credit grants (`credit_grants`) — then rebuilt from the start of the logs; the
//!   ledger is then released and rolled up to the end of `MZ_USAGE` that the rebuild read (a
//!   rebuild that fails before leaves it held: reads stay exact, counting every document, until a
//!   rebuild completes). Charges carry their position in `MZ_USAGE` as live billing writes them
//!   (`mozaiks_store::ledger`). With `--from SEQ`: nothing is dropped; events from stream
//!   sequence `SEQ` on are applied again (repairs a range).
//! - Then each app's wallet (the KV bucket `MZ_CREDITS`: balance, consumption, state, the users
//!   over budget) is recomputed from the rebuilt ledger and grants by billing's own code
//!   ([`mozaiks_billing::credits::Credits::refresh`]), so it equals what live billing writes. It is
//!   overwritten, not dropped: gateways and workers follow it, and the alerts it records as sent
//!   this period stay sent (a dropped wallet would let them be sent again).
//! - Charges appended before prices existed are costed as billing costs them (the prices of
//!   `MOZAIKS_PRICES_FILE`), and periods are `MOZAIKS_CREDITS_PERIOD_SECONDS` long when the fleet
//!   says so: the rebuild must run with the fleet's configuration.
//! - The writes are the projector's and billing's own (idempotent: messages and charges are
//!   inserted once by id, sessions take the newest seq), so the live projector and billing may
//!   write at the same time: what they write, the rebuild writes again to the same result, and
//!   running it twice changes nothing.
//! - Each app's models go to the database the app lives in now (its placement); deleted apps are
//!   skipped. A log whose first sequence is past 1 (purged by retention) is refused without
//!   `--from`: dropping would lose what is no longer in the log.
//! - Progress goes to stderr (a bar on a terminal, a line per tenth otherwise), the final counts
//!   to stdout.

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use async_nats::jetstream::consumer;
use clap::Args;
use futures::StreamExt;
use mongodb::bson::{Document, doc};
use mozaiks_bus::Bus;
use mozaiks_control::{AppStatus, Registry};
use mozaiks_events::credits::CreditGrant;
use mozaiks_store::Store;

use crate::config::Global;

/// Events per replay batch.
const BATCH: usize = 500;

#[derive(Args, Debug, Clone)]
pub struct RebuildArgs {
    /// Rebuild only this app's read models (default: every app).
    #[arg(long)]
    pub app: Option<String>,
    /// Re-apply events from this stream sequence on, without dropping anything first.
    #[arg(long)]
    pub from: Option<u64>,
    /// No progress output (the final counts are still printed).
    #[arg(long)]
    pub quiet: bool,
    /// The prices billing costs charges with (the same file as the fleet's billing).
    #[command(flatten)]
    pub prices: crate::config::PricesArgs,
}

/// What a rebuild did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub apps: usize,
    pub dropped: u64,
    pub events: u64,
    pub charges: u64,
    pub grants: u64,
    pub wallets: u64,
}

pub async fn run(g: &Global, args: RebuildArgs) -> anyhow::Result<ExitCode> {
    if args.from == Some(0) {
        bail!("--from is a stream sequence, 1 or more");
    }
    if let Some(app) = &args.app
        && (app.is_empty() || app.contains(['.', '*', '>', ' ']))
    {
        bail!("--app {app:?} is not an app id");
    }
    mozaiks_store::credits::set_period_seconds(g.credits_period_seconds);
    let prices = mozaiks_control::prices::Prices::load(args.prices.prices_file.as_deref())?;
    let bus = Bus::connect(&g.nats_url, &g.namespace, "mozaiks-rebuild")
        .await
        .context("NATS")?;
    let registry = Registry::open(&bus).await.context("app registry")?;
    let store = Store::connect(&g.mongo_uri(), &g.mongo_db)
        .await
        .context("MongoDB")?
        .with_resolver(mozaiks_admin::storage::resolver(&registry));
    let credits = mozaiks_billing::credits::Credits::open(registry.clone(), prices, &bus, &store)
        .await
        .map_err(|e| anyhow::anyhow!("wallets: {e}"))?;
    let started = Instant::now();
    let report = rebuild(&bus, &registry, &store, &credits, &args).await?;
    println!(
        "rebuilt {} app(s) in {:.1}s: {} document(s) dropped, {} event(s) projected, {} charge(s) and {} grant(s) applied, {} wallet(s) recomputed",
        report.apps,
        started.elapsed().as_secs_f64(),
        report.dropped,
        report.events,
        report.charges,
        report.grants,
        report.wallets
    );
    Ok(ExitCode::SUCCESS)
}

/// The apps a rebuild covers: `--app` (which must exist and not be deleted) or every live app.
fn apps(registry: &Registry, only: Option<&str>) -> anyhow::Result<Vec<String>> {
    match only {
        Some(id) => match registry.get(id) {
            Some(a) if a.status != AppStatus::Deleted => Ok(vec![id.to_string()]),
            Some(_) => bail!("app {id} is deleted: its read models are not rebuilt"),
            None => bail!("no app {id}"),
        },
        None => {
            let mut all: Vec<String> = registry
                .all()
                .iter()
                .filter(|a| a.status != AppStatus::Deleted)
                .map(|a| a.app_id.clone())
                .collect();
            all.sort();
            Ok(all)
        }
    }
}

pub async fn rebuild(
    bus: &Bus,
    registry: &Registry,
    store: &Store,
    credits: &mozaiks_billing::credits::Credits,
    args: &RebuildArgs,
) -> anyhow::Result<Report> {
    let apps = apps(registry, args.app.as_deref())?;
    let from = args.from.unwrap_or(1);
    let mut report = Report {
        apps: apps.len(),
        ..Report::default()
    };
    if args.from.is_none() {
        for base in ["MZ_EVT", "MZ_USAGE", "MZ_BILLING"] {
            let first = bus
                .stream(base)
                .await?
                .info()
                .await
                .map_err(|e| anyhow::anyhow!("{base}: {e}"))?
                .state
                .first_sequence;
            if first > 1 {
                bail!(
                    "{base} starts at sequence {first} (older messages were purged): a rebuild from scratch would lose them; re-apply with --from {first} instead"
                );
            }
        }
    }
    let progress = Progress::new(!args.quiet);
    for app in &apps {
        let db = store.resolve_storage(app).await?;
        store.ensure_indexes(&db).await?;
        if args.from.is_none() {
            // Held before its charges go: a live roll must not count them again as they come
            // back (one that was under way fails on the held ledger's version).
            store.hold_usage(&db, app).await?;
            for coll in [
                mozaiks_store::SESSIONS,
                mozaiks_store::MESSAGES,
                mozaiks_store::USAGE_EVENTS,
                mozaiks_store::RUNS,
            ] {
                let r = db
                    .collection::<Document>(coll)
                    .delete_many(doc! { "app_id": app })
                    .await?;
                report.dropped += r.deleted_count;
            }
            let r = store
                .shared()
                .collection::<Document>(mozaiks_store::credits::GRANTS)
                .delete_many(doc! { "app_id": app })
                .await?;
            report.dropped += r.deleted_count;
        }
    }
    store.ensure_credit_indexes(store.shared()).await?;
    // The filters without the namespace: `Bus::replay` and `read_grants` apply it.
    let s = mozaiks_events::subjects::Subjects::new("");
    let (evt, usage, grants) = match &args.app {
        Some(app) => (
            s.app_events(app),
            s.app_charges(app),
            s.app_credit_grants(app),
        ),
        None => (s.all_events(), s.usage_filter(), s.all_credit_grants()),
    };
    let wanted = |app: &str| apps.iter().any(|a| a == app);

    // Sessions and transcripts: the projector's writes, to each app's database.
    let end = last_sequence(bus, "MZ_EVT").await?;
    let mut next = from;
    loop {
        let b = bus.replay("MZ_EVT", &evt, next, BATCH).await?;
        let events: Vec<_> = b.events.into_iter().filter(|e| wanted(&e.app_id)).collect();
        store.project(&events).await?;
        report.events += events.len() as u64;
        next = b.next;
        progress.show(
            "events",
            next.saturating_sub(from),
            end.saturating_sub(from) + 1,
        );
        if b.done {
            break;
        }
    }
    progress.done("events", report.events);

    // The usage ledger: billing's exactly-once charges, to each app's database, marked with
    // their position as billing marks them (the epoch of its durable consumer).
    let epoch = match bus.durable("MZ_USAGE", "billing").await {
        Ok(mut c) => c
            .info()
            .await
            .map_err(|e| anyhow::anyhow!("billing's consumer: {e}"))?
            .created
            .unix_timestamp_nanos(),
        Err(e) => bail!("billing's consumer of MZ_USAGE: {e}"),
    };
    let end = last_sequence(bus, "MZ_USAGE").await?;
    let mut next = from;
    loop {
        let b = bus.replay("MZ_USAGE", &usage, next, BATCH).await?;
        let mut by_app: std::collections::BTreeMap<String, (Vec<_>, Vec<String>)> =
            Default::default();
        for (mut e, seq) in b.events.into_iter().zip(b.seqs) {
            if !wanted(&e.app_id) {
                continue;
            }
            if let mozaiks_events::Event::UsageCharged(u) = &mut e.event {
                // Billing's cost of a charge appended before prices existed.
                credits.cost_charge(u);
            }
            let app = by_app.entry(e.app_id.clone()).or_default();
            app.0.push(e);
            app.1.push(mozaiks_store::ledger::mark(epoch, seq));
        }
        for (app, (envs, marks)) in by_app {
            let db = store.resolve_storage(&app).await?;
            store.charge_marked(&db, &envs, &marks).await?;
            report.charges += envs.len() as u64;
        }
        next = b.next;
        progress.show(
            "charges",
            next.saturating_sub(from),
            end.saturating_sub(from) + 1,
        );
        if b.done {
            break;
        }
    }
    progress.done("charges", report.charges);
    if args.from.is_none() {
        // Every charge up to `end` is written again: the ledgers roll up to it.
        let floor = mozaiks_store::ledger::mark(epoch, end);
        for app in &apps {
            let db = store.resolve_storage(app).await?;
            store.release_usage(&db, app).await?;
            if let Err(e) = store.compact_usage(&db, app, &floor).await {
                // Live billing rolls it later.
                eprintln!("the usage ledger of {app} is not rolled yet: {e}");
            }
        }
    }

    // Credit grants (JSON on MZ_BILLING), recorded once each by their id.
    for grant in read_grants(bus, &grants, from).await? {
        if wanted(&grant.app_id) {
            store.record_grant(&grant).await?;
            report.grants += 1;
        }
    }
    progress.done("grants", report.grants);

    // Wallets: recomputed from the ledger and grants just rebuilt, as billing computes them.
    for (n, app) in apps.iter().enumerate() {
        if credits
            .refresh(app)
            .await
            .map_err(|e| anyhow::anyhow!("the wallet of {app}: {e}"))?
            .is_some()
        {
            report.wallets += 1;
        }
        progress.show("wallets", n as u64 + 1, apps.len() as u64);
    }
    progress.done("wallets", report.wallets);
    Ok(report)
}

async fn last_sequence(bus: &Bus, base: &str) -> anyhow::Result<u64> {
    Ok(bus
        .stream(base)
        .await?
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("{base}: {e}"))?
        .state
        .last_sequence)
}

/// Every grant on `filter` of MZ_BILLING from stream sequence `from` to the stream's end now.
async fn read_grants(bus: &Bus, filter: &str, from: u64) -> anyhow::Result<Vec<CreditGrant>> {
    let mut stream = bus.stream("MZ_BILLING").await?;
    let end = stream
        .info()
        .await
        .map_err(|e| anyhow::anyhow!("MZ_BILLING: {e}"))?
        .state
        .last_sequence;
    let mut out = Vec::new();
    if end < from {
        return Ok(out);
    }
    let mut c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: bus.subjects().apply(filter),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::anyhow!("MZ_BILLING: {e}"))?;
    if c.info()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .num_pending
        == 0
    {
        return Ok(out);
    }
    let mut messages = c.messages().await.map_err(|e| anyhow::anyhow!("{e}"))?;
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("reading the credit grants timed out")?
            .context("the grants' replay ended early")?
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let info = msg.info().map_err(|e| anyhow::anyhow!("{e}"))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        match serde_json::from_slice::<CreditGrant>(&msg.payload) {
            Ok(g) => out.push(g),
            Err(e) => {
                tracing::warn!(subject = %msg.subject, error = %e, "A grant that does not parse; skipping it.")
            }
        }
        if seq >= end || pending == 0 {
            return Ok(out);
        }
    }
}

/// Progress on stderr: a redrawn bar on a terminal, a line per tenth otherwise.
struct Progress {
    on: bool,
    tty: bool,
    last_tenth: std::sync::atomic::AtomicU64,
}

impl Progress {
    fn new(on: bool) -> Progress {
        Progress {
            on,
            tty: std::io::stderr().is_terminal(),
            last_tenth: std::sync::atomic::AtomicU64::new(u64::MAX),
        }
    }

    fn show(&self, what: &str, done: u64, total: u64) {
        if !self.on {
            return;
        }
        let total = total.max(1);
        let done = done.min(total);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let width = 30;
            let filled = (done * width / total) as usize;
            let _ = write!(
                err,
                "\r{what:<8} [{}{}] {done}/{total} log positions",
                "#".repeat(filled),
                " ".repeat(width as usize - filled)
            );
            let _ = err.flush();
        } else {
            let tenth = done * 10 / total;
            if self
                .last_tenth
                .swap(tenth, std::sync::atomic::Ordering::Relaxed)
                != tenth
            {
                let _ = writeln!(
                    err,
                    "{what}: {}% ({done}/{total} log positions)",
                    tenth * 10
                );
            }
        }
    }

    fn done(&self, what: &str, n: u64) {
        if !self.on {
            return;
        }
        self.last_tenth
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
        let mut err = std::io::stderr().lock();
        if self.tty {
            let _ = writeln!(err);
        }
        let _ = writeln!(err, "{what}: {n} applied");
    }
}
