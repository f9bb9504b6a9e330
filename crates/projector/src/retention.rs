//! Retention per tier: the projector role sweeps every app periodically, archives the sessions
//! whose last activity is older than the app's `retention_days` (its tier's, or its override) as
//! JSON lines ([`mozaiks_store::retention`]), removes them from the read models and, unless told
//! not to, purges their events from the log (`MZ_EVT`, `mz.evt.{app_id}.{chat_id}.>`), so that a
//! rebuild of the read models from the log (a storage move) does not bring them back. Usage
//! charges stay in `MZ_USAGE` and the ledger: billing history outlives chat retention.
//!
//! The same sweeper archives and removes the read models of **deleted apps**
//! ([`Retention::archive_deleted_apps`]): every session of the app, with its transcript, to the
//! same archive files (`"reason": "app_deleted"`), then removes it from the app's database (shared
//! or its own, through `resolve_storage`). An app deleted within [`DELETED_GRACE`] is checked at
//! every tick ([`Options::deleted_every`]), so an event a replica projected in the instant before
//! it saw the deletion is archived and removed too; after that, a deleted app is checked again at
//! each full sweep.
//!
//! **One replica sweeps**: [`Retention::run`] contends for the fleet-wide lease `retention`
//! ([`mozaiks_control::lease`]) and works only while it holds it, checking before each app. Any
//! number of projector replicas may run it; when the holder stops or dies, another takes over
//! within the lease's TTL. Every step is idempotent (an archive line is written and synced before
//! its session is removed; a repeat writes a repeated line that readers drop by `chat_id`), so a
//! holder that loses the lease in the middle of an app's batch does no harm by finishing it.

use std::collections::HashSet;
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::Registry;
use mozaiks_control::lease::{Leader, Leases};
use mozaiks_store::Store;
use tracing::{info, warn};

use crate::Error;

pub const ARCHIVED: &str = "mozaiks_retention_archived_sessions_total";
pub const PURGED: &str = "mozaiks_retention_purged_events_total";
pub const SWEEP_SECONDS: &str = "mozaiks_retention_sweep_seconds";
pub const DELETED_ARCHIVED: &str = "mozaiks_deleted_app_archived_sessions_total";

/// The fleet-wide lease the sweeper holds while it works.
pub const LEASE: &str = "retention";

/// How long after its deletion an app is checked at every tick rather than at each full sweep.
pub const DELETED_GRACE: Duration = Duration::from_secs(120);

pub fn describe() {
    metrics::describe_counter!(
        ARCHIVED,
        "Sessions archived and removed by retention, by app_id."
    );
    metrics::describe_counter!(
        PURGED,
        "Events purged from MZ_EVT with their archived sessions, by app_id."
    );
    metrics::describe_histogram!(
        SWEEP_SECONDS,
        metrics::Unit::Seconds,
        "Time of one retention sweep over every app."
    );
    metrics::describe_counter!(
        DELETED_ARCHIVED,
        "Sessions of deleted apps archived and removed from the read models, by app_id."
    );
}

/// Sessions archived per store call.
const BATCH: i64 = 200;

/// Retention settings.
#[derive(Clone, Debug)]
pub struct Options {
    /// Where archives go (`MOZAIKS_ARCHIVE_DIR`): `{dir}/{app_id}/{YYYY-MM-DD}.jsonl`.
    pub dir: PathBuf,
    /// Time between sweeps.
    pub every: Duration,
    /// Whether archived chats' events are purged from `MZ_EVT`.
    pub purge_log: bool,
    /// How often deleted apps' read models are looked for (archived, then removed).
    pub deleted_every: Duration,
}

/// What a sweep did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub sessions: u64,
    pub messages: u64,
    pub events_purged: u64,
}

/// The retention sweeper.
pub struct Retention {
    bus: Bus,
    store: Store,
    registry: Registry,
    opts: Options,
    /// The process's id: the holder of the `retention` lease.
    instance: InstanceId,
}

impl Retention {
    pub fn new(
        bus: Bus,
        store: Store,
        registry: Registry,
        opts: Options,
        instance: InstanceId,
    ) -> Retention {
        describe();
        Retention {
            bus,
            store,
            registry,
            opts,
            instance,
        }
    }

    /// While this replica holds the fleet-wide lease [`LEASE`]: sweeps at once and then every
    /// [`Options::every`], and archives deleted apps every [`Options::deleted_every`], until
    /// `shutdown` resolves (then the lease is released for another replica).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        let leases = Leases::open(&self.bus, self.instance.as_str())
            .await
            .map_err(|e| Error::Consumer(e.to_string()))?;
        let (stop_leader, stopped) = tokio::sync::oneshot::channel::<()>();
        let leader = Leader::spawn(leases, LEASE, async move {
            let _ = stopped.await;
        });
        info!(dir = %self.opts.dir.display(), every_secs = self.opts.every.as_secs(), "Retention sweeper started; it works while it holds the retention lease.");
        tokio::pin!(shutdown);
        let mut next_sweep: Option<Instant> = None;
        let mut settled: HashSet<String> = HashSet::new();
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                _ = leader.wait_leader() => {}
            }
            if next_sweep.is_none_or(|t| Instant::now() >= t) {
                match self.sweep_while(Utc::now(), &leader).await {
                    Ok(r) if r.sessions > 0 => info!(
                        sessions = r.sessions,
                        messages = r.messages,
                        events_purged = r.events_purged,
                        "Retention sweep archived sessions."
                    ),
                    Ok(_) => {}
                    Err(e) => {
                        warn!(error = %e, "Retention sweep failed; retrying at the next one.")
                    }
                }
                next_sweep = Some(Instant::now() + self.opts.every);
                // Every deleted app is looked at again once per full sweep.
                settled.clear();
            }
            if let Err(e) = self
                .archive_deleted_apps(Utc::now(), &mut settled, &leader)
                .await
            {
                warn!(error = %e, "Archiving deleted apps failed; retrying at the next tick.");
            }
            tokio::select! {
                _ = &mut shutdown => break,
                _ = tokio::time::sleep(self.opts.deleted_every) => {}
            }
        }
        drop(stop_leader);
        Ok(())
    }

    /// Archives and removes the read models of deleted apps; `settled` holds apps found empty
    /// (skipped until they are cleared from it, unless deleted within [`DELETED_GRACE`]). Works
    /// only while `leader` holds the lease.
    pub async fn archive_deleted_apps(
        &self,
        now: DateTime<Utc>,
        settled: &mut HashSet<String>,
        leader: &Leader,
    ) -> Result<u64, Error> {
        let grace = chrono::Duration::from_std(DELETED_GRACE).unwrap_or_default();
        let mut apps = self.registry.all();
        apps.retain(|a| {
            a.is_deleted() && (!settled.contains(&a.app_id) || now - a.updated_at < grace)
        });
        apps.sort_by(|a, b| a.app_id.cmp(&b.app_id));
        let mut total = 0;
        for app in apps {
            let mut clean = true;
            loop {
                if !leader.is_leader() {
                    return Ok(total);
                }
                let done = self
                    .store
                    .archive_app(&app.app_id, &self.opts.dir, BATCH)
                    .await?;
                total += done.sessions;
                metrics::counter!(DELETED_ARCHIVED, "app_id" => app.app_id.clone())
                    .increment(done.sessions);
                if done.sessions > 0 || done.messages > 0 {
                    info!(app_id = %app.app_id, sessions = done.sessions, messages = done.messages, "Deleted app's read models archived and removed.");
                }
                clean &= done.changed == 0 && done.sessions == 0 && done.messages == 0;
                if (done.sessions as i64) < BATCH {
                    break;
                }
            }
            if clean {
                settled.insert(app.app_id.clone());
            }
        }
        Ok(total)
    }

    /// [`Retention::sweep`], stopping between apps when `leader` no longer holds the lease.
    async fn sweep_while(&self, now: DateTime<Utc>, leader: &Leader) -> Result<Report, Error> {
        self.sweep_apps(now, Some(leader)).await
    }

    /// Archives every app's sessions older than its retention at `now`.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<Report, Error> {
        self.sweep_apps(now, None).await
    }

    async fn sweep_apps(
        &self,
        now: DateTime<Utc>,
        leader: Option<&Leader>,
    ) -> Result<Report, Error> {
        let started = std::time::Instant::now();
        let mut report = Report::default();
        let mut apps = self.registry.all();
        apps.retain(|a| !a.is_deleted());
        apps.sort_by(|a, b| a.app_id.cmp(&b.app_id));
        for app in apps {
            if leader.is_some_and(|l| !l.is_leader()) {
                break;
            }
            let days = self.registry.effective_limits(&app).retention_days;
            let cutoff = now - chrono::Duration::days(i64::from(days));
            loop {
                let done = self
                    .store
                    .archive_expired(&app.app_id, cutoff, &self.opts.dir, BATCH)
                    .await?;
                let n = done.chats.len() as u64;
                report.sessions += n;
                report.messages += done.messages;
                metrics::counter!(ARCHIVED, "app_id" => app.app_id.clone()).increment(n);
                if self.opts.purge_log {
                    for chat in &done.chats {
                        let purged = self.purge_chat(&app.app_id, chat).await?;
                        report.events_purged += purged;
                        metrics::counter!(PURGED, "app_id" => app.app_id.clone()).increment(purged);
                    }
                }
                if n > 0 {
                    info!(app_id = %app.app_id, sessions = n, retention_days = days, "Sessions past retention archived.");
                }
                if (n as i64) < BATCH {
                    break;
                }
            }
        }
        metrics::histogram!(SWEEP_SECONDS).record(started.elapsed().as_secs_f64());
        Ok(report)
    }

    async fn purge_chat(&self, app_id: &str, chat_id: &str) -> Result<u64, Error> {
        let stream = self.bus.stream("MZ_EVT").await?;
        let filter = self.bus.subjects().chat_events(app_id, chat_id);
        let resp = stream
            .purge()
            .filter(filter)
            .await
            .map_err(|e| Error::Consumer(format!("purging {app_id}/{chat_id}: {e}")))?;
        Ok(resp.purged)
    }
}
