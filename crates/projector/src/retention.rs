//! Retention per tier: the projector role sweeps every app periodically, archives the sessions
//! whose last activity is older than the app's `retention_days` (its tier's, or its override) as
//! JSON lines ([`mozaiks_store::retention`]), removes them from the read models and, unless told
//! not to, purges their events from the log (`MZ_EVT`, `mz.evt.{app_id}.{chat_id}.>`), so that a
//! rebuild of the read models from the log (a storage move) does not bring them back. Usage
//! charges stay in `MZ_USAGE` and the ledger: billing history outlives chat retention.
//!
//! Run the sweep on one projector replica (`MOZAIKS_RETENTION=off` on the others): two sweeping
//! replicas archive the same sessions twice.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use mozaiks_control::Registry;
use mozaiks_store::Store;
use tracing::{info, warn};

use crate::Error;

pub const ARCHIVED: &str = "mozaiks_retention_archived_sessions_total";
pub const PURGED: &str = "mozaiks_retention_purged_events_total";
pub const SWEEP_SECONDS: &str = "mozaiks_retention_sweep_seconds";

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
}

impl Retention {
    pub fn new(bus: Bus, store: Store, registry: Registry, opts: Options) -> Retention {
        describe();
        Retention {
            bus,
            store,
            registry,
            opts,
        }
    }

    /// Sweeps now and then every [`Options::every`] until `shutdown` resolves.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
        info!(dir = %self.opts.dir.display(), every_secs = self.opts.every.as_secs(), "Retention sweeper started.");
        tokio::pin!(shutdown);
        loop {
            match self.sweep(Utc::now()).await {
                Ok(r) if r.sessions > 0 => info!(
                    sessions = r.sessions,
                    messages = r.messages,
                    events_purged = r.events_purged,
                    "Retention sweep archived sessions."
                ),
                Ok(_) => {}
                Err(e) => warn!(error = %e, "Retention sweep failed; retrying at the next one."),
            }
            tokio::select! {
                _ = &mut shutdown => return Ok(()),
                _ = tokio::time::sleep(self.opts.every) => {}
            }
        }
    }

    /// Archives every app's sessions older than its retention at `now`.
    pub async fn sweep(&self, now: DateTime<Utc>) -> Result<Report, Error> {
        let started = std::time::Instant::now();
        let mut report = Report::default();
        let mut apps = self.registry.all();
        apps.retain(|a| !a.is_deleted());
        apps.sort_by(|a, b| a.app_id.cmp(&b.app_id));
        for app in apps {
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
