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
//! those replicas admitted meanwhile. A snapshot not rewritten within [`FRESH`] (a dead replica or
//! worker; the fleet's one liveness rule, [`mozaiks_bus::fleet::LIVE_FOR`]) no longer counts. A
//! draining replica deletes its snapshot.
//!
//! The workers' snapshots are kept whole ([`mozaiks_bus::fleet::Workers`]), so the ops endpoints
//! ([`crate::ops`]) answer from this memory too, without a request to NATS.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use mozaiks_bus::fleet::{self, InstanceId, Latest, WorkerSnapshot, Workers};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use crate::hub::Hub;

/// The bucket's base name (namespaced by the bus).
pub const BUCKET: &str = "MZ_PRESENCE";
/// How often a replica rewrites its snapshot.
pub const PUBLISH_EVERY: Duration = fleet::PUBLISH_EVERY;
/// A snapshot older than this no longer counts (the fleet's one liveness rule).
pub const FRESH: Duration = fleet::LIVE_FOR;

/// A gateway replica's snapshot.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewaySnapshot {
    pub replica: String,
    pub at: Option<DateTime<Utc>>,
    /// Open WebSockets by app.
    pub sockets: BTreeMap<String, u32>,
}

/// The replica's view of the fleet. Cheap to clone.
#[derive(Clone)]
pub struct Presence {
    me: InstanceId,
    /// The other replicas' open WebSockets by app.
    gateways: Latest<BTreeMap<String, u32>>,
    workers: Workers,
}

impl Presence {
    /// Opens `MZ_PRESENCE` and `MZ_PERF`, publishes `hub`'s counts under this process's id `me`
    /// until `draining` turns true (then deletes the snapshot), and follows both buckets.
    pub async fn start(
        bus: &Bus,
        me: InstanceId,
        hub: Hub,
        draining: watch::Receiver<bool>,
    ) -> Result<Presence, mozaiks_bus::Error> {
        let op = || format!("bucket {BUCKET}");
        let presence_kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name(BUCKET))
            .await
            .map_err(|e| mozaiks_bus::Error::kv(op(), e))?;
        let gateways = presence_kv
            .watch_with_history(">")
            .await
            .map_err(|e| mozaiks_bus::Error::kv(op(), e))?;
        let p = Presence {
            me: me.clone(),
            gateways: Latest::default(),
            workers: Workers::follow(bus).await?,
        };
        {
            let (bus, p) = (bus.clone(), p.clone());
            tokio::spawn(async move {
                bus.follow_bucket(BUCKET, Some(gateways), |e| p.observe_gateway(&e))
                    .await
            });
        }
        tokio::spawn(publish(presence_kv, me, hub, draining));
        Ok(p)
    }

    /// Takes one entry of `MZ_PRESENCE` (this replica's own is skipped).
    fn observe_gateway(&self, e: &kv::Entry) {
        if e.key == self.me.as_str() {
            return;
        }
        let sockets = match e.operation {
            kv::Operation::Put => serde_json::from_slice::<GatewaySnapshot>(&e.value)
                .ok()
                .map(|s| s.sockets),
            _ => None,
        };
        self.gateways.observe(&e.key, e.revision, sockets);
    }

    /// The app's WebSockets open on the other live replicas (their last snapshots).
    pub fn other_sockets(&self, app_id: &str) -> u32 {
        self.gateways.with_live(|it| {
            it.filter_map(|(_, m)| m.get(app_id))
                .fold(0u32, |a, n| a.saturating_add(*n))
        })
    }

    /// Live gateway replicas: this one and every other with a fresh snapshot.
    pub fn live_gateways(&self) -> u32 {
        1 + self.gateways.with_live(|it| it.count() as u32)
    }

    /// The app's runs in progress on every live worker.
    pub fn active_runs(&self, app_id: &str) -> u32 {
        self.workers.active_runs(app_id)
    }

    /// Live workers with a fresh snapshot.
    pub fn live_workers(&self) -> u32 {
        self.workers.count()
    }

    /// Every live worker's snapshot, ordered by key (for the ops endpoints).
    pub fn workers(&self) -> Vec<Arc<WorkerSnapshot>> {
        self.workers.live()
    }
}

/// Rewrites this replica's snapshot every [`PUBLISH_EVERY`]; deletes it when draining starts.
async fn publish(kv: kv::Store, me: InstanceId, hub: Hub, mut draining: watch::Receiver<bool>) {
    let me = me.as_str();
    loop {
        let snap = GatewaySnapshot {
            replica: me.to_string(),
            at: Some(Utc::now()),
            sockets: hub.per_app().into_iter().collect(),
        };
        let body = serde_json::to_vec(&snap).unwrap_or_default().into();
        if let Err(e) = kv.put(me, body).await {
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
    if let Err(e) = kv.delete(me).await {
        warn!(error = %e, "Cannot remove the replica's presence snapshot; it ages out.");
    }
}
