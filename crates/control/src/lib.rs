//! The control plane: apps, tiers, limits, and the app registry every replica shares.
//!
//! An [`App`] is a tenant's app, an event-sourced aggregate ([`aggregate`]): its events
//! (`app.created`, `app.tier_changed`, …, `app.deleted`) are appended to `mz.ctl.app.{app_id}` on
//! the stream `MZ_CTL` with optimistic concurrency, and the fold of those events — the current
//! view — is written to the JetStream KV bucket `MZ_APPS`. Every replica keeps a local copy of the
//! bucket fed by a KV watch ([`Registry`]), so a change reaches gateways and workers within a
//! second, without a restart.
//!
//! **The log is the truth, the bucket a cache of it.** A command appends its events first, then
//! writes the view. A process that dies between the two leaves the bucket behind the log; that is
//! repaired (a) by the next command on the app, whose append expects the bucket's version, is
//! refused, and re-folds the app from the log, and (b) by the reconcile loop every replica runs at
//! start and every [`RECONCILE_EVERY`], which compares the last event of every app on `MZ_CTL`
//! with the bucket and rewrites views that are behind. View writes are idempotent and only move
//! forward (a view never replaces one with a higher `version`), so any number of replicas may
//! write and reconcile at once.
//!
//! Tiers ([`tiers`]) come from `config/tiers.yaml` (embedded) or `MOZAIKS_TIERS_FILE`.

pub mod aggregate;
pub mod app;
pub mod credits;
pub mod keys;
pub mod lease;
mod log;
pub mod metrics;
pub mod ops_actions;
pub mod prices;
pub mod ratelimit;
pub mod tiers;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use mozaiks_bus::Bus;
use tracing::{info, warn};

pub use aggregate::{AppCommand, AppEvent, AppPatch, AppRecord, Known, Rejection};
pub use app::{App, AppStatus, AppStorage, EffectiveLimits, Limits, Overage};
pub use ratelimit::RateLimiter;
pub use tiers::{Tier, Tiers};

/// How often every replica compares `MZ_APPS` with `MZ_CTL`.
pub const RECONCILE_EVERY: Duration = Duration::from_secs(30);

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("app registry unavailable: {0}")]
    Unavailable(String),
    /// The bus failed under a lease (NATS, JetStream, the `MZ_LEASES` bucket): the error keeps
    /// its source and its kind ([`mozaiks_bus::Error::kind`]: whether a retry makes sense).
    #[error("control plane unavailable: {0}")]
    Bus(#[from] mozaiks_bus::Error),
    #[error("invalid app record {app_id}: {reason}")]
    Corrupt { app_id: String, reason: String },
    #[error("invalid tiers file {file}: {reason}")]
    Tiers { file: String, reason: String },
    /// The command was refused; [`Rejection::code`] says why.
    #[error(transparent)]
    Rejected(#[from] Rejection),
    #[error("app {app_id} is being changed concurrently; retry")]
    Conflict { app_id: String },
}

/// Apps by id.
type AppMap = HashMap<String, Arc<App>>;

/// The replica-local view of every app, kept current by a KV watch, and the entry point for app
/// commands. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    bus: Bus,
    kv: kv::Store,
    apps: Arc<RwLock<AppMap>>,
    tiers: Arc<Tiers>,
    limiter: Arc<RateLimiter>,
    /// The ops agent's actions in force (`MZ_OPS_STATE`, followed in the background).
    ops: ops_actions::OpsActions,
}

impl Registry {
    /// With the embedded tiers ([`Tiers::embedded`]): opens the `MZ_APPS` bucket, loads every app, follows
    /// changes in the background and starts the reconcile loop.
    pub async fn open(bus: &Bus) -> Result<Registry, Error> {
        Registry::open_with(bus, Tiers::embedded()?).await
    }

    /// Like [`Registry::open`] with the given tiers.
    pub async fn open_with(bus: &Bus, tiers: Tiers) -> Result<Registry, Error> {
        metrics::describe();
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name("MZ_APPS"))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let reg = Registry {
            bus: bus.clone(),
            kv,
            apps: Arc::default(),
            tiers: Arc::new(tiers),
            limiter: Arc::default(),
            ops: ops_actions::OpsActions::follow(bus),
        };
        let mut watch = reg
            .kv
            .watch_with_history(">")
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let has_values = reg
            .kv
            .status()
            .await
            .map(|s| s.values() > 0)
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        // Load the history before answering, so the first request sees every app.
        if has_values {
            let deadline = tokio::time::sleep(Duration::from_secs(10));
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    entry = watch.next() => match entry {
                        Some(Ok(e)) => {
                            let done = e.delta == 0 || e.seen_current;
                            reg.observe(e);
                            if done { break; }
                        }
                        Some(Err(e)) => return Err(Error::Unavailable(e.to_string())),
                        None => break,
                    },
                    _ = &mut deadline => return Err(Error::Unavailable("app registry did not load within 10 s".into())),
                }
            }
        }
        let follower = reg.clone();
        tokio::spawn(async move {
            let bus = follower.bus.clone();
            bus.follow_bucket("MZ_APPS", Some(watch), |e| follower.observe(e))
                .await
        });
        let reconciler = reg.clone();
        tokio::spawn(async move {
            loop {
                match reconciler.reconcile().await {
                    Ok(0) => {}
                    Ok(n) => info!(views = n, "App views reconciled from the control log."),
                    Err(e) => warn!(error = %e, "App reconcile failed; retrying later."),
                }
                tokio::time::sleep(RECONCILE_EVERY).await;
            }
        });
        Ok(reg)
    }

    fn observe(&self, e: kv::Entry) {
        match e.operation {
            kv::Operation::Put => match serde_json::from_slice::<App>(&e.value) {
                Ok(app) => {
                    self.remember(app);
                }
                Err(err) => {
                    warn!(app_id = %e.key, error = %err, "Ignoring an app record that does not parse.")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
                apps.remove(&e.key);
            }
        }
    }

    /// Keeps `app` unless the local view already has a newer version.
    fn remember(&self, app: App) -> Arc<App> {
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        if let Some(cur) = apps.get(&app.app_id)
            && cur.version > app.version
        {
            return cur.clone();
        }
        if app.is_deleted() {
            self.limiter.forget(&app.app_id);
        }
        let app = Arc::new(app);
        apps.insert(app.app_id.clone(), app.clone());
        app
    }

    /// The replica's current view of an app (deleted apps included: check the status).
    pub fn get(&self, app_id: &str) -> Option<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.get(app_id).cloned()
    }

    /// Every app this replica knows.
    pub fn all(&self) -> Vec<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.values().cloned().collect()
    }

    /// The tiers in force.
    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// The limits in force for `app`: its tier's defaults under its overrides.
    /// An ops `throttle` in force lowers `max_concurrent_runs` (see [`ops_actions`]).
    pub fn effective_limits(&self, app: &App) -> EffectiveLimits {
        let mut limits = self.tiers.effective_limits(app);
        if let Some(n) = self
            .ops
            .get(&app.app_id, "throttle")
            .and_then(|a| a.max_concurrent_runs)
        {
            limits.max_concurrent_runs = limits.max_concurrent_runs.min(n);
        }
        limits
    }

    /// The `Retry-After` of an ops `pause_runs` in force for the app (its new runs are refused).
    pub fn ops_paused(&self, app_id: &str) -> Option<Duration> {
        self.ops
            .get(app_id, "pause_runs")
            .map(|a| Duration::from_secs(a.retry_after_seconds.unwrap_or(30).max(1)))
    }

    /// Whether an ops `disable_pack` in force took `workflow` off the app's allowlist.
    pub fn ops_pack_disabled(&self, app_id: &str, workflow: &str) -> bool {
        self.ops
            .get(app_id, "disable_pack")
            .is_some_and(|a| a.workflow.as_deref() == Some(workflow))
    }

    /// The WebSocket base of the app's own runtime, or `None` for the shared fleet.
    pub fn resolve_runtime<'a>(&self, app: &'a App) -> Option<&'a str> {
        self.tiers.resolve_runtime(app)
    }

    /// Checks the app's `requests_per_minute` when `replicas` gateway replicas share its traffic:
    /// this replica allows its share, `requests_per_minute / replicas` rounded up (at least 1),
    /// so the fleet together allows about the app's limit. `Err` says how long to wait (see
    /// [`ratelimit`]).
    pub fn check_rate_among(&self, app: &App, replicas: u32) -> Result<(), Duration> {
        let rpm = self.effective_limits(app).requests_per_minute;
        let share = rpm.div_ceil(replicas.max(1)).max(1);
        let out = self
            .limiter
            .check(&app.app_id, share, std::time::Instant::now());
        if out.is_err() {
            ::metrics::counter!(metrics::RATE_LIMITED, "app_id" => app.app_id.clone()).increment(1);
        }
        out
    }

    /// Creates the app if it does not exist, through the aggregate (idempotent; safe from many
    /// replicas at once). Every shipped workflow is allowed, and the tiers file's
    /// `default_app_limits` are its overrides.
    pub async fn ensure_app(
        &self,
        app_id: &str,
        name: &str,
        tier: &str,
    ) -> Result<Arc<App>, Error> {
        if let Some(app) = self.read_through(app_id).await?
            && app.version > 0
        {
            return Ok(app);
        }
        let cmd = AppCommand::Create {
            name: name.to_string(),
            tier: tier.to_string(),
            workflows: None,
            limits: self.tiers.default_app_limits.clone(),
            runtime_url: None,
            storage: None,
        };
        match self.execute(app_id, &cmd, "system", None).await {
            Ok(app) => Ok(app),
            // Created concurrently by another replica, or before (a legacy view was adopted).
            Err(Error::Rejected(Rejection::AppExists)) => self
                .read_through(app_id)
                .await?
                .ok_or_else(|| Error::Unavailable(format!("could not create app {app_id}"))),
            Err(e) => Err(e),
        }
    }

    /// Reads an app from the bucket, bypassing (and refreshing) the local view.
    pub async fn read_through(&self, app_id: &str) -> Result<Option<Arc<App>>, Error> {
        match self.kv.entry(app_id).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                let app: App = serde_json::from_slice(&e.value).map_err(|err| Error::Corrupt {
                    app_id: app_id.into(),
                    reason: err.to_string(),
                })?;
                Ok(Some(self.remember(app)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Unavailable(e.to_string())),
        }
    }
}
