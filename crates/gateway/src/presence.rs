//! What the rest of the fleet is doing, for fleet-wide limits: every gateway replica publishes its
//! open WebSockets per app to the KV bucket `MZ_PRESENCE` every [`PUBLISH_EVERY`] (memory storage,
//! entries age out after `max_age`, 6 s), and watches the bucket for the other replicas'
//! snapshots; it also watches the workers' snapshots in `MZ_PERF` (active runs, rewritten every
//! 2 s and at each run start and end).
//!
//! From these, each replica knows without a round trip on the hot path:
//! - [`Presence::other_sockets`]: an app's WebSockets open on the **other** replicas (their last
//!   snapshot), which the upgrade check adds to its own live count against `max_websockets`;
//! - [`Presence::live_gateways`]: the replicas alive (itself and every fresh snapshot), among
//!   which an app's `requests_per_minute` is divided;
//! - [`Presence::active_runs`]: an app's runs in progress on every live worker, which the broker
//!   checks against `max_concurrent_runs`.
//!
//! All three are eventually consistent: a change elsewhere is seen within about 2 s (the publish
//! period), so a burst spread over replicas within that window can overshoot a limit by what
//! those replicas admitted meanwhile. A snapshot older than [`FRESH`] (a dead replica or worker) no
//! longer counts. A draining replica deletes its snapshot.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::hub::Hub;

/// The bucket's base name (namespaced by the bus).
pub const BUCKET: &str = "MZ_PRESENCE";
/// How often a replica rewrites its snapshot.
pub const PUBLISH_EVERY: Duration = Duration::from_secs(2);
/// A snapshot older than this no longer counts.
pub const FRESH: Duration = Duration::from_secs(6);

/// A gateway replica's snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewaySnapshot {
    pub replica: String,
    pub at: Option<DateTime<Utc>>,
    /// Open WebSockets by app.
    pub sockets: BTreeMap<String, u32>,
}

/// The part of a worker's `MZ_PERF` snapshot this needs.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct WorkerSnapshot {
    active_runs: Vec<RunRef>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct RunRef {
    app_id: String,
}

#[derive(Default)]
struct Seen {
    gateways: HashMap<String, (Instant, BTreeMap<String, u32>)>,
    workers: HashMap<String, (Instant, HashMap<String, u32>)>,
}

/// The replica's view of the fleet. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    me: String,
    seen: Arc<Mutex<Seen>>,
}

impl Presence {
    /// Opens `MZ_PRESENCE` and `MZ_PERF`, publishes `hub`'s counts until `draining` turns true
    /// (then deletes the snapshot), and follows both buckets.
    pub async fn start(
        bus: &Bus,
        hub: Hub,
        draining: watch::Receiver<bool>,
    ) -> Result<Presence, mozaiks_bus::Error> {
        let js = bus.jetstream();
        let open = |name: &'static str| {
            let bucket = bus.subjects().name(name);
            async move {
                js.get_key_value(bucket)
                    .await
                    .map_err(|e| mozaiks_bus::Error::JetStream(format!("bucket {name}: {e}")))
            }
        };
        let presence_kv = open(BUCKET).await?;
        let perf_kv = open("MZ_PERF").await?;
        let me = mozaiks_control::lease::holder_id();
        let p = Presence {
            me: me.clone(),
            seen: Arc::default(),
        };
        let watch_err = |e: kv::WatchError| mozaiks_bus::Error::JetStream(e.to_string());
        let gateways = presence_kv
            .watch_with_history(">")
            .await
            .map_err(watch_err)?;
        let workers = perf_kv.watch_with_history(">").await.map_err(watch_err)?;
        for (bucket, watch, gateways) in [(BUCKET, gateways, true), ("MZ_PERF", workers, false)] {
            let (bus, p) = (bus.clone(), p.clone());
            tokio::spawn(async move {
                bus.follow_bucket(bucket, Some(watch), |e| p.observe(e, gateways))
                    .await
            });
        }
        tokio::spawn(publish(presence_kv, me, hub, draining));
        Ok(p)
    }

    /// Takes one entry of `MZ_PRESENCE` (`gateways`) or `MZ_PERF`.
    fn observe(&self, e: kv::Entry, gateways: bool) {
        {
            if gateways && e.key == self.me {
                return;
            }
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            let put = e.operation == kv::Operation::Put;
            if gateways {
                match serde_json::from_slice::<GatewaySnapshot>(&e.value) {
                    Ok(s) if put => {
                        seen.gateways
                            .insert(e.key.clone(), (Instant::now(), s.sockets));
                    }
                    _ => {
                        seen.gateways.remove(&e.key);
                    }
                }
            } else {
                match serde_json::from_slice::<WorkerSnapshot>(&e.value) {
                    Ok(s) if put => {
                        let mut runs: HashMap<String, u32> = HashMap::new();
                        for r in s.active_runs {
                            *runs.entry(r.app_id).or_default() += 1;
                        }
                        seen.workers.insert(e.key.clone(), (Instant::now(), runs));
                    }
                    _ => {
                        seen.workers.remove(&e.key);
                    }
                }
            }
        }
    }

    fn with<T>(&self, f: impl FnOnce(&Seen, Instant) -> T) -> T {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        f(&seen, Instant::now())
    }

    /// The app's WebSockets open on the other live replicas (their last snapshots).
    pub fn other_sockets(&self, app_id: &str) -> u32 {
        self.with(|s, now| {
            s.gateways
                .values()
                .filter(|(at, _)| now.duration_since(*at) < FRESH)
                .filter_map(|(_, m)| m.get(app_id))
                .sum()
        })
    }

    /// Live gateway replicas: this one and every other with a fresh snapshot.
    pub fn live_gateways(&self) -> u32 {
        self.with(|s, now| {
            1 + s
                .gateways
                .values()
                .filter(|(at, _)| now.duration_since(*at) < FRESH)
                .count() as u32
        })
    }

    /// The app's runs in progress on every live worker.
    pub fn active_runs(&self, app_id: &str) -> u32 {
        self.with(|s, now| {
            s.workers
                .values()
                .filter(|(at, _)| now.duration_since(*at) < FRESH)
                .filter_map(|(_, m)| m.get(app_id))
                .sum()
        })
    }

    /// Live workers with a fresh snapshot.
    pub fn live_workers(&self) -> u32 {
        self.with(|s, now| {
            s.workers
                .values()
                .filter(|(at, _)| now.duration_since(*at) < FRESH)
                .count() as u32
        })
    }
}

/// Rewrites this replica's snapshot every [`PUBLISH_EVERY`]; deletes it when draining starts.
async fn publish(kv: kv::Store, me: String, hub: Hub, mut draining: watch::Receiver<bool>) {
    loop {
        let snap = GatewaySnapshot {
            replica: me.clone(),
            at: Some(Utc::now()),
            sockets: hub.per_app().into_iter().collect(),
        };
        let body = serde_json::to_vec(&snap).unwrap_or_default().into();
        if let Err(e) = kv.put(&me, body).await {
            warn!(error = %e, "Cannot publish the replica's presence snapshot.");
        }
        tokio::select! {
            _ = tokio::time::sleep(PUBLISH_EVERY) => {}
            r = draining.wait_for(|d| *d) => {
                if r.is_err() {
                    return;
                }
                break;
            }
        }
    }
    if let Err(e) = kv.delete(&me).await {
        warn!(error = %e, "Cannot remove the replica's presence snapshot; it ages out.");
    }
}
