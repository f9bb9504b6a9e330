//! Moving an app's read models to another database (`POST /api/apps/{app_id}/storage`).
//!
//! **A move** rebuilds the app's read models in the target from the log, then switches, with no
//! event lost and reads served throughout:
//! 1. *copy*: replay the app's events of `MZ_EVT` (`mz.evt.{app_id}.>`) into the target with the
//!    projector's idempotent writes, and its charges of `MZ_USAGE` into the target's ledger
//!    (exactly once per charge, by event id);
//! 2. *catch up* once more from where the copy ended, so the tail left for after the switch is
//!    small;
//! 3. *switch*: append `app.storage_changed` (the view reaches every replica through `MZ_APPS`);
//!    reads, the projector and billing now use the target;
//! 4. *settle* for [`SETTLE`] so every replica has applied the switch, then *catch up* again: the
//!    events appended while replicas still wrote to the old database are replayed from the log.
//!    Replaying what the projector already wrote changes nothing.
//!
//! **One move of an app at a time, fleet-wide**: a move holds the lease [`lease_name`]
//! (`storage-move-{app_id}`) in `MZ_LEASES` ([`mozaiks_control::lease`]) for its whole duration,
//! renewing it every quarter of the bucket's TTL. A move of the same app on any replica while it
//! runs is refused ([`Error::MoveInProgress`]); [`Admin::storage_of`] shows the app's placement
//! and the move in progress, if any (which replica, since when). A move whose replica dies leaves
//! the lease to age out (10 s); a move that cannot renew its lease in time stops
//! ([`Error::MoveInterrupted`]): every step is idempotent, so repeating it completes it.
//!
//! Reads are served from the old database until the switch, then from the target, which may lag
//! by the last catch-up's events for its duration. The old database is **left intact** (the
//! operator drops it when satisfied; moving back replays the log over it, so stale leftovers are
//! brought forward). A projector replica whose registry watch lags by more than [`SETTLE`] could
//! write a late event to the old database only; repeating the move (same target) replays the
//! whole log again and repairs that.

use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use mozaiks_control::lease::Leases;
use mozaiks_control::{App, AppCommand, AppStorage};
use mozaiks_events::subjects::Subjects;
use mozaiks_store::mongodb::Database;
use serde::Serialize;
use tracing::{info, warn};

use crate::storage::{placement, target};
use crate::{Admin, Error, metrics as m};

/// How long a move waits after the switch for every replica to apply it.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Events replayed per batch.
const BATCH: usize = 500;

/// The lease a move of `app_id` holds.
pub fn lease_name(app_id: &str) -> String {
    format!("storage-move-{app_id}")
}

/// Where an app's read models live, and the move in progress.
#[derive(Clone, Debug, Serialize)]
pub struct StorageView {
    pub app_id: String,
    /// The app's own database; `None`: the shared one.
    pub storage: Option<AppStorage>,
    /// The database's name, the shared one's included.
    pub db_name: String,
    pub shared: bool,
    /// The move in progress on any replica.
    #[serde(rename = "move")]
    pub moving: Option<MoveState>,
}

/// A move in progress, from its lease.
#[derive(Clone, Debug, Serialize)]
pub struct MoveState {
    /// Always `running`.
    pub state: &'static str,
    /// The instance that runs it.
    pub replica: String,
    pub started_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    /// The target database's name.
    pub target: Option<String>,
}

/// What a completed move did.
#[derive(Clone, Debug, Serialize)]
pub struct MoveReport {
    pub app_id: String,
    pub from: Option<AppStorage>,
    pub storage: Option<AppStorage>,
    pub db_name: String,
    pub events_replayed: u64,
    pub events_copied_before_switch: u64,
    pub charges_replayed: u64,
    /// The old database is never dropped by a move.
    pub previous_left_intact: bool,
    /// The app's version after the switch.
    pub version: u64,
}

/// Where a move's replays have reached.
struct Progress {
    evt_next: u64,
    usage_next: u64,
    events: u64,
    charges: u64,
}

impl Admin {
    async fn leases(&self) -> Result<Leases, Error> {
        Ok(Leases::open(&self.bus, self.instance.as_str()).await?)
    }

    /// Where the live app `app_id`'s read models live and the move in progress, if any.
    pub async fn storage_of(&self, app_id: &str) -> Result<StorageView, Error> {
        let app = self.live_app(app_id).await?;
        let moving = self.leases().await?.holder_of(&lease_name(app_id)).await?;
        let db_name = app
            .storage
            .as_ref()
            .map(|s| s.db_name.clone())
            .unwrap_or_else(|| self.store.shared().name().to_string());
        Ok(StorageView {
            app_id: app_id.to_string(),
            storage: app.storage.clone(),
            db_name,
            shared: app.storage.is_none(),
            moving: moving.map(|m| MoveState {
                state: "running",
                replica: m.holder,
                started_at: m.acquired_at,
                renewed_at: m.renewed_at,
                target: m.purpose,
            }),
        })
    }

    /// Moves the live app `app_id`'s read models to `db_name` (on the deployment at `mongo_uri`,
    /// else the shared one; see [`target`]) or back to the shared database, on behalf of `actor`.
    /// Only an app of a dedicated-database tier may move to a database of its own.
    pub async fn move_storage(
        &self,
        app_id: &str,
        db_name: Option<String>,
        mongo_uri: Option<String>,
        actor: &str,
    ) -> Result<MoveReport, Error> {
        let shared = self.store.shared().name().to_string();
        let target = target(&shared, db_name, mongo_uri)?;
        let app = self.live_app(app_id).await?;
        if target.is_some() && !self.registry.tiers().tier_of(&app).has_own_database() {
            return Err(Error::InvalidStorage(format!(
                "tier {:?} uses the shared database",
                app.tier
            )));
        }
        let leases = self.leases().await?;
        let purpose = target.as_ref().map(|t| t.db_name.clone()).unwrap_or(shared);
        let Some(mut lease) = leases
            .try_acquire(&lease_name(app_id), Some(&purpose))
            .await?
        else {
            return Err(Error::MoveInProgress);
        };
        let started = Instant::now();
        let out = {
            let work = self.run_move(&app, target, actor);
            tokio::pin!(work);
            loop {
                tokio::select! {
                    out = &mut work => break out,
                    _ = tokio::time::sleep(leases.renew_every()) => {
                        let kept = match lease.renew().await {
                            Ok(kept) => kept,
                            Err(e) => {
                                warn!(app_id, error = %e, "Could not renew the move's lease.");
                                lease.is_valid()
                            }
                        };
                        if !kept {
                            break Err(Error::MoveInterrupted);
                        }
                    }
                }
            }
        };
        lease.release().await;
        let outcome = if out.is_ok() { "ok" } else { "error" };
        metrics::counter!(m::STORAGE_MOVES, "app_id" => app_id.to_string(), "outcome" => outcome)
            .increment(1);
        metrics::histogram!(m::STORAGE_MOVE_SECONDS).record(started.elapsed().as_secs_f64());
        out
    }

    /// Copy, catch up, switch, settle, catch up.
    async fn run_move(
        &self,
        app: &App,
        target: Option<AppStorage>,
        actor: &str,
    ) -> Result<MoveReport, Error> {
        let app_id = app.app_id.as_str();
        let from = app.storage.clone();
        let db = self
            .store
            .database(target.as_ref().map(placement).as_ref())
            .await?;
        info!(app_id, from = ?from, to = ?target, "Storage move started: rebuilding the read models from the log.");
        let mut p = Progress {
            evt_next: 1,
            usage_next: 1,
            events: 0,
            charges: 0,
        };
        self.catch_up(&db, app_id, &mut p).await?;
        let copied = p.events;
        self.catch_up(&db, app_id, &mut p).await?;
        let switched = self
            .registry
            .execute(app_id, &AppCommand::SetStorage(target), actor, None)
            .await?;
        info!(
            app_id,
            version = switched.version,
            "Storage switched; waiting for every replica."
        );
        tokio::time::sleep(SETTLE).await;
        self.catch_up(&db, app_id, &mut p).await?;
        info!(
            app_id,
            events = p.events,
            charges = p.charges,
            "Storage move completed."
        );
        Ok(MoveReport {
            app_id: app_id.to_string(),
            from,
            storage: switched.storage.clone(),
            db_name: db.name().to_string(),
            events_replayed: p.events,
            events_copied_before_switch: copied,
            charges_replayed: p.charges,
            previous_left_intact: true,
            version: switched.version,
        })
    }

    /// Replays the app's events and charges into `db` from where `p` stands to the logs' ends.
    async fn catch_up(&self, db: &Database, app_id: &str, p: &mut Progress) -> Result<(), Error> {
        // `replay` takes filters as `streams/` writes them, without the namespace, and applies it.
        let subjects = Subjects::default();
        let evt_filter = subjects.app_events(app_id);
        loop {
            let b = self
                .bus
                .replay("MZ_EVT", &evt_filter, p.evt_next, BATCH)
                .await?;
            self.store.project_into(db, &b.events).await?;
            p.events += b.events.len() as u64;
            p.evt_next = b.next;
            if b.done {
                break;
            }
        }
        let usage_filter = subjects.app_charges(app_id);
        loop {
            let b = self
                .bus
                .replay("MZ_USAGE", &usage_filter, p.usage_next, BATCH)
                .await?;
            for env in &b.events {
                self.store.charge(db, env).await?;
            }
            p.charges += b.events.len() as u64;
            p.usage_next = b.next;
            if b.done {
                break;
            }
        }
        Ok(())
    }
}
