//! The control plane's app registry.
//!
//! An [`App`] is a tenant's app: its tier, limits, workflow allowlist and context variables. The
//! current view of every app lives in the JetStream KV bucket `MZ_APPS`; every replica keeps a
//! local copy fed by a KV watch ([`Registry`]), so a change reaches gateways and workers without a
//! restart. The `default` app ([`Registry::ensure_app`]) exists from the first start with every
//! shipped workflow enabled.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Errors of the control plane.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("app registry unavailable: {0}")]
    Unavailable(String),
    #[error("invalid app record {app_id}: {reason}")]
    Corrupt { app_id: String, reason: String },
}

/// Whether an app may be used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppStatus {
    #[default]
    Active,
    Suspended,
    Deleted,
}

/// Limits of an app. `None` means the tier's default.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_runs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_websockets: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests_per_minute: Option<u32>,
    /// WebSockets one user of the app may hold open (per gateway replica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_websockets_per_user: Option<u32>,
    /// Client frames per second one WebSocket may send.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_frames_per_second: Option<u32>,
}

/// A tenant's app: the current view, as stored in `MZ_APPS`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct App {
    pub app_id: String,
    pub name: String,
    pub tier: String,
    #[serde(default)]
    pub status: AppStatus,
    /// Allowed workflow packs; `None` allows every pack the fleet ships.
    #[serde(default)]
    pub workflows: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Limits,
    /// Context variables every chat of the app starts with.
    #[serde(default)]
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Browser origins allowed to open WebSockets (`https://app.example.com`); `None` allows any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_origins: Option<Vec<String>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl App {
    pub fn is_active(&self) -> bool {
        self.status == AppStatus::Active
    }

    /// Whether the app may run `workflow`.
    pub fn allows_workflow(&self, workflow: &str) -> bool {
        match &self.workflows {
            None => true,
            Some(list) => list.iter().any(|w| w == workflow),
        }
    }
}

/// Apps by id, each with the KV revision it was read at.
type AppMap = HashMap<String, (u64, Arc<App>)>;

/// The replica-local view of every app, kept current by a KV watch. Cheap to clone.
#[derive(Clone)]
pub struct Registry {
    kv: kv::Store,
    apps: Arc<RwLock<AppMap>>,
}

impl Registry {
    /// Opens the `MZ_APPS` bucket, loads every app and follows changes in the background.
    pub async fn open(bus: &Bus) -> Result<Registry, Error> {
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name("MZ_APPS"))
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        let reg = Registry {
            kv,
            apps: Arc::default(),
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
            while let Some(entry) = watch.next().await {
                match entry {
                    Ok(e) => follower.observe(e),
                    Err(e) => warn!(error = %e, "App registry watch error."),
                }
            }
            warn!("App registry watch ended.");
        });
        Ok(reg)
    }

    fn observe(&self, e: kv::Entry) {
        let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
        if apps.get(&e.key).is_some_and(|(rev, _)| *rev >= e.revision) {
            return;
        }
        match e.operation {
            kv::Operation::Put => match serde_json::from_slice::<App>(&e.value) {
                Ok(app) => {
                    apps.insert(e.key, (e.revision, Arc::new(app)));
                }
                Err(err) => {
                    warn!(app_id = %e.key, error = %err, "Ignoring an app record that does not parse.")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                apps.remove(&e.key);
            }
        }
    }

    /// The replica's current view of an app.
    pub fn get(&self, app_id: &str) -> Option<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.get(app_id).map(|(_, a)| a.clone())
    }

    /// Every app this replica knows.
    pub fn all(&self) -> Vec<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|p| p.into_inner());
        apps.values().map(|(_, a)| a.clone()).collect()
    }

    /// Creates the app if it does not exist (idempotent; safe from many replicas at once).
    pub async fn ensure_app(
        &self,
        app_id: &str,
        name: &str,
        tier: &str,
    ) -> Result<Arc<App>, Error> {
        if let Some(app) = self.read_through(app_id).await? {
            return Ok(app);
        }
        let now = Utc::now();
        let app = App {
            app_id: app_id.to_string(),
            name: name.to_string(),
            tier: tier.to_string(),
            status: AppStatus::Active,
            workflows: None,
            limits: Limits::default(),
            context: Default::default(),
            allowed_origins: None,
            created_at: now,
            updated_at: now,
        };
        let bytes = serde_json::to_vec(&app).map_err(|e| Error::Corrupt {
            app_id: app_id.into(),
            reason: e.to_string(),
        })?;
        match self.kv.create(app_id, bytes.into()).await {
            Ok(rev) => {
                info!(app_id, "App created.");
                let app = Arc::new(app);
                let mut apps = self.apps.write().unwrap_or_else(|p| p.into_inner());
                apps.entry(app_id.to_string()).or_insert((rev, app.clone()));
                Ok(app)
            }
            // Created concurrently by another replica.
            Err(_) => self
                .read_through(app_id)
                .await?
                .ok_or_else(|| Error::Unavailable(format!("could not create app {app_id}"))),
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
                self.observe(e);
                Ok(Some(Arc::new(app)))
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Unavailable(e.to_string())),
        }
    }
}
