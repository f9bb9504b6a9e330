//! Where an app's read models live, and moving them: `POST /api/apps/{app_id}/storage`.
//!
//! `resolve_storage(app_id)` is [`mozaiks_store::Store::resolve_storage`] with the resolver from
//! [`storage_resolver`]: the app's view in the registry (`App.storage`, set by
//! `app.storage_changed`) names its own database, else the shared one. Projector, billing and
//! every read endpoint go through it, on every replica, within the registry's propagation time.
//!
//! **A move** (superadmin) rebuilds the app's read models in the target from the log, then
//! switches, with no event lost and reads served throughout:
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
//! **One move of an app at a time, fleet-wide**: a move holds the lease `storage-move-{app_id}` in
//! `MZ_LEASES` ([`mozaiks_control::lease`]) for its whole duration, renewing it every quarter of
//! the bucket's TTL. A move of the same app on any replica while it runs is refused with 409
//! `move_in_progress`; `GET /api/apps/{app_id}/storage` shows the app's placement and the move in
//! progress, if any (which replica, since when). A move whose replica dies leaves the lease to age
//! out (10 s); a move that cannot renew its lease in time stops (503 `move_interrupted`): every
//! step is idempotent, so repeating it completes it.
//!
//! Reads are served from the old database until the switch, then from the target, which may lag
//! by the last catch-up's events for its duration. The old database is **left intact** (the
//! operator drops it when satisfied; moving back replays the log over it, so stale leftovers are
//! brought forward). A projector replica whose registry watch lags by more than [`SETTLE`] could
//! write a late event to the old database only; repeating the move (same target) replays the
//! whole log again and repairs that.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::StatusCode;
use mongodb::Database;
use mozaiks_control::lease::Leases;
use mozaiks_control::{App, AppCommand, AppStorage, Registry};
use mozaiks_store::{Placement, Resolver, Route};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::State;
use crate::auth::User;
use crate::error::{ApiError, Body};
use crate::metrics as m;

/// How long a move waits after the switch for every replica to apply it.
pub const SETTLE: Duration = Duration::from_secs(2);

/// Events replayed per batch.
const BATCH: usize = 500;

/// The store's resolver: each app's placement and deletion from the replica's app registry.
pub fn storage_resolver(registry: &Registry) -> Resolver {
    let registry = registry.clone();
    Arc::new(move |app_id: &str| match registry.get(app_id) {
        None => Route::default(),
        Some(app) => Route {
            placement: app.storage.as_ref().map(placement),
            deleted: app.is_deleted(),
        },
    })
}

fn placement(s: &AppStorage) -> Placement {
    Placement {
        db_name: s.db_name.clone(),
        mongo_uri: s.mongo_uri.clone(),
    }
}

/// The database name given to a new app of a dedicated-database tier: `{shared}_{app_id}`, or a
/// shorter unique name when that is too long for MongoDB.
pub fn default_db_name(shared: &str, app_id: &str) -> String {
    let name = format!("{shared}_{app_id}");
    if name.len() <= AppStorage::MAX_DB_NAME {
        return name;
    }
    let short: String = app_id.chars().take(40).collect();
    let tag = uuid::Uuid::now_v7().simple().to_string();
    format!("mzapp_{short}_{}", &tag[tag.len() - 8..])
}

/// `POST /api/apps/{app_id}/storage` body: the target database; `db_name: null` (or the shared
/// database's name without a `mongo_uri`) moves the app back to the shared database.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoveStorage {
    pub db_name: Option<String>,
    #[serde(default)]
    pub mongo_uri: Option<String>,
}

/// The lease a move of `app_id` holds.
pub fn move_lease(app_id: &str) -> String {
    format!("storage-move-{app_id}")
}

async fn leases(state: &State) -> Result<Leases, ApiError> {
    Leases::open(&state.bus, state.instance.as_str())
        .await
        .map_err(ApiError::from)
}

/// `GET /api/apps/{app_id}/storage` (superadmin): where the app's read models live and the move
/// in progress, if any.
pub async fn get_storage(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    crate::apps::check_app_id(&app_id)?;
    crate::apps::operator_for(&user, &app_id, "reading an app's storage")?;
    let app = state
        .registry
        .read_through(&app_id)
        .await?
        .filter(|a| !a.is_deleted())
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
    let moving = leases(&state)
        .await?
        .holder_of(&move_lease(&app_id))
        .await?;
    let db_name = app
        .storage
        .as_ref()
        .map(|s| s.db_name.clone())
        .unwrap_or_else(|| state.store.shared().name().to_string());
    Ok(Json(json!({
        "app_id": app_id,
        "storage": app.storage,
        "db_name": db_name,
        "shared": app.storage.is_none(),
        "move": moving.map(|m| json!({
            "state": "running",
            "replica": m.holder,
            "started_at": m.acquired_at,
            "renewed_at": m.renewed_at,
            "target": m.purpose,
        })),
    })))
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_storage",
        msg.into(),
    )
}

pub async fn move_storage(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
    Body(req): Body<MoveStorage>,
) -> Result<Json<Value>, ApiError> {
    crate::apps::check_app_id(&app_id)?;
    crate::apps::operator_for(&user, &app_id, "moving an app's storage")?;
    let shared = state.store.shared().name().to_string();
    let target = match (req.db_name, req.mongo_uri) {
        (None, None) => None,
        (None, Some(_)) => return Err(invalid("mongo_uri needs a db_name")),
        (Some(db), None) if db == shared => None,
        (Some(db_name), mongo_uri) => {
            let s = AppStorage { db_name, mongo_uri };
            s.validate().map_err(invalid)?;
            Some(s)
        }
    };
    let app = state
        .registry
        .read_through(&app_id)
        .await?
        .filter(|a| !a.is_deleted())
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
    if target.is_some()
        && state.registry.tiers().tier_of(&app).database
            != mozaiks_control::tiers::DatabasePlacement::Dedicated
    {
        return Err(invalid(format!(
            "tier {:?} uses the shared database",
            app.tier
        )));
    }
    let leases = leases(&state).await?;
    let purpose = target
        .as_ref()
        .map(|t| t.db_name.clone())
        .unwrap_or_else(|| shared.clone());
    let Some(mut lease) = leases
        .try_acquire(&move_lease(&app_id), Some(&purpose))
        .await?
    else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "move_in_progress",
            "this app is being moved; retry when the move has finished",
        ));
    };
    let started = Instant::now();
    let out = {
        let work = run_move(&state, &app, target, &user.sub);
        tokio::pin!(work);
        loop {
            tokio::select! {
                out = &mut work => break out,
                _ = tokio::time::sleep(leases.renew_every()) => {
                    let kept = match lease.renew().await {
                        Ok(kept) => kept,
                        Err(e) => {
                            warn!(app_id = %app_id, error = %e, "Could not renew the move's lease.");
                            lease.is_valid()
                        }
                    };
                    if !kept {
                        break Err(ApiError::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "move_interrupted",
                            "the move lost its lease; repeat it to complete it",
                        ));
                    }
                }
            }
        }
    };
    lease.release().await;
    let outcome = if out.is_ok() { "ok" } else { "error" };
    metrics::counter!(m::STORAGE_MOVES, "app_id" => app_id.clone(), "outcome" => outcome)
        .increment(1);
    metrics::histogram!(m::STORAGE_MOVE_SECONDS).record(started.elapsed().as_secs_f64());
    out.map(Json)
}

/// Where a move's replays have reached.
#[derive(Default)]
struct Progress {
    evt_next: u64,
    usage_next: u64,
    events: u64,
    charges: u64,
}

async fn run_move(
    state: &State,
    app: &App,
    target: Option<AppStorage>,
    actor: &str,
) -> Result<Value, ApiError> {
    let app_id = app.app_id.as_str();
    let from = app.storage.clone();
    let db = state
        .store
        .database(target.as_ref().map(placement).as_ref())
        .await?;
    info!(app_id, from = ?from, to = ?target, "Storage move started: rebuilding the read models from the log.");
    let mut p = Progress {
        evt_next: 1,
        usage_next: 1,
        ..Default::default()
    };
    catch_up(state, &db, app_id, &mut p).await?;
    let copied = p.events;
    catch_up(state, &db, app_id, &mut p).await?;
    let switched = state
        .registry
        .execute(app_id, &AppCommand::SetStorage(target.clone()), actor, None)
        .await?;
    info!(
        app_id,
        version = switched.version,
        "Storage switched; waiting for every replica."
    );
    tokio::time::sleep(SETTLE).await;
    catch_up(state, &db, app_id, &mut p).await?;
    info!(
        app_id,
        events = p.events,
        charges = p.charges,
        "Storage move completed."
    );
    Ok(json!({
        "app_id": app_id,
        "from": from,
        "storage": switched.storage,
        "db_name": db.name(),
        "events_replayed": p.events,
        "events_copied_before_switch": copied,
        "charges_replayed": p.charges,
        "previous_left_intact": true,
        "version": switched.version,
    }))
}

/// Replays the app's events and charges into `db` from where `p` stands to the logs' ends.
async fn catch_up(
    state: &State,
    db: &Database,
    app_id: &str,
    p: &mut Progress,
) -> Result<(), ApiError> {
    let evt_filter = format!("mz.evt.{app_id}.>");
    loop {
        let b = state
            .bus
            .replay("MZ_EVT", &evt_filter, p.evt_next, BATCH)
            .await?;
        state.store.project_into(db, &b.events).await?;
        p.events += b.events.len() as u64;
        p.evt_next = b.next;
        if b.done {
            break;
        }
    }
    let usage_filter = format!("mz.evt.{app_id}.*.usage.charged");
    loop {
        let b = state
            .bus
            .replay("MZ_USAGE", &usage_filter, p.usage_next, BATCH)
            .await?;
        for env in &b.events {
            state.store.charge(db, env).await?;
        }
        p.charges += b.events.len() as u64;
        p.usage_next = b.next;
        if b.done {
            break;
        }
    }
    Ok(())
}
