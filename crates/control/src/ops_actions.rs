//! The ops agent's actions in force, as every replica applies them.
//!
//! The ops agent (`mozaiks-ops`) writes each reversible action it takes — `throttle`,
//! `pause_runs`, `disable_pack` — to the KV bucket `MZ_OPS_STATE` under
//! `action.{app_id}.{kind}` (one action of a kind per app at a time), and deletes the key when it
//! reverts the action. Every [`crate::Registry`] follows the bucket ([`OpsActions::follow`]), so
//! an action applies on every gateway and worker within a second of being written, without a
//! request on the hot path:
//!
//! - `throttle` lowers the app's effective `max_concurrent_runs`
//!   ([`crate::Registry::effective_limits`]);
//! - `pause_runs` makes the session broker refuse new runs with 503 `app_paused`
//!   ([`crate::Registry::ops_paused`]);
//! - `disable_pack` takes one workflow off the app's allowlist
//!   ([`crate::Registry::ops_pack_disabled`]).
//!
//! **An action ends at its TTL on its own**: an entry whose `expires_at` has passed no longer
//! counts, whether or not the ops agent (which also deletes it and records the revert) is running.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

/// The ops agent's bucket: its policy (`policy.default`, `policy.app.{app_id}`) and the actions
/// in force (`action.{app_id}.{kind}`). Base name, namespaced by the bus.
pub const OPS_BUCKET: &str = "MZ_OPS_STATE";

/// The key of the action of `kind` in force for `app_id`.
pub fn action_key(app_id: &str, kind: &str) -> String {
    format!("action.{app_id}.{kind}")
}

/// An action as it is written to `MZ_OPS_STATE` and carried in its `mz.ops.action.*` events.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct OpsAction {
    pub action_id: String,
    /// `throttle`, `pause_runs`, `disable_pack` or `notify`.
    pub kind: String,
    pub app_id: String,
    /// The incident that caused it, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    /// Who took it: `ops:{instance}` for the agent, `user:{sub}` for a person.
    pub by: String,
    /// Why, in a sentence.
    pub reason: String,
    pub created_at: DateTime<Utc>,
    /// When it reverts by itself (`None`: it has no lasting effect, e.g. `notify`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    /// `throttle`: the app's `max_concurrent_runs` while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_runs: Option<u32>,
    /// `pause_runs`: the `Retry-After` refused runs get, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
    /// `disable_pack`: the workflow taken off the allowlist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
}

impl OpsAction {
    /// Whether the action is in force at `now`.
    pub fn in_force(&self, now: DateTime<Utc>) -> bool {
        self.expires_at.is_none_or(|t| now < t)
    }
}

/// The actions in force by key, followed from `MZ_OPS_STATE`. Cheap to clone.
#[derive(Clone, Default)]
pub struct OpsActions {
    by_key: Arc<RwLock<HashMap<String, Arc<OpsAction>>>>,
}

impl OpsActions {
    /// Follows the bucket in the background for as long as the process runs (across reconnects
    /// and a recreated bucket; a bucket that does not exist yet is waited for).
    pub fn follow(bus: &Bus) -> OpsActions {
        let actions = OpsActions::default();
        let (bus, me) = (bus.clone(), actions.clone());
        tokio::spawn(async move {
            bus.follow_bucket(OPS_BUCKET, None, |e| me.observe(e)).await;
        });
        actions
    }

    /// Takes one entry of the bucket (policy entries are not actions and are skipped).
    pub fn observe(&self, e: kv::Entry) {
        if !e.key.starts_with("action.") {
            return;
        }
        let mut map = self.by_key.write().unwrap_or_else(|p| p.into_inner());
        match e.operation {
            kv::Operation::Put => match serde_json::from_slice::<OpsAction>(&e.value) {
                Ok(a) => {
                    info!(app_id = %a.app_id, kind = %a.kind, action_id = %a.action_id, "Ops action in force.");
                    map.insert(e.key, Arc::new(a));
                }
                Err(err) => {
                    debug!(key = %e.key, error = %err, "Ignoring an ops action that does not parse.")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                if map.remove(&e.key).is_some() {
                    info!(key = %e.key, "Ops action reverted.");
                }
            }
        }
    }

    /// The action of `kind` in force for `app_id` now.
    pub fn get(&self, app_id: &str, kind: &str) -> Option<Arc<OpsAction>> {
        let map = self.by_key.read().unwrap_or_else(|p| p.into_inner());
        map.get(&action_key(app_id, kind))
            .filter(|a| a.in_force(Utc::now()))
            .cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_ends_at_its_ttl_on_its_own() {
        let now = Utc::now();
        let a = OpsAction {
            action_id: "a1".into(),
            kind: "throttle".into(),
            app_id: "x".into(),
            incident_id: None,
            by: "ops:test".into(),
            reason: "test".into(),
            created_at: now,
            expires_at: Some(now + chrono::Duration::seconds(5)),
            max_concurrent_runs: Some(2),
            retry_after_seconds: None,
            workflow: None,
        };
        assert!(a.in_force(now));
        assert!(!a.in_force(now + chrono::Duration::seconds(5)));
        let forever = OpsAction {
            expires_at: None,
            ..a
        };
        assert!(forever.in_force(now + chrono::Duration::days(365)));
        assert_eq!(action_key("x", "throttle"), "action.x.throttle");
    }
}
