//! The credit alerts as `notification` frames to the app's admins (issue 11, item 5).
//!
//! **Who the admins are.** Roles live in user tokens only: a runtime token (the WebSocket's) has
//! none, and the control plane keeps no list of an app's admins. So the broker records them:
//! when a user with role `admin` of the app starts or resumes a session for themselves (`POST
//! /api/sessions`), the replica puts `{app_id}.{hex(user_id)}` into the KV bucket `MZ_ADMINS`
//! (once per user and replica a day; entries expire after 30 days without a session). Every
//! gateway follows the bucket in memory ([`Admins`]).
//!
//! **Delivery.** Every gateway follows the alerts billing appends to `mz.billing.alert.{app_id}`
//! on `MZ_BILLING` (an ordered consumer from the replica's start: only stored messages, so an
//! alert billing appended twice under one message id reaches nobody twice) and hands each one, as
//! a `notification` frame, to the open sockets of the app's admins on that replica:
//!
//! ```json
//! {"id": "…", "seq": null, "type": "notification", "ts": "…",
//!  "data": {"kind": "credits.low", "app_id": "…", "period": "20261201T000000Z",
//!           "included": 1000, "granted": 0, "consumed": 800, "balance": 200, "ts": "…"}}
//! ```
//!
//! (the alert's fields, `type` renamed `kind`). Billing appends each threshold once per
//! period, so each admin socket gets each alert once; like every notification it is not durable:
//! a socket opened later does not get it (`GET /api/apps/{app_id}/credits` has the state).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::{consumer, kv};
use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::Frame;
use mozaiks_events::credits::CreditAlert;
use serde_json::json;
use tracing::{debug, info, warn};

use crate::hub::Hub;
use crate::metrics as m;

/// The bucket (`streams/kv/MZ_ADMINS.json`).
pub const BUCKET: &str = "MZ_ADMINS";
/// How often a replica records an admin it keeps seeing again (the bucket forgets after 30 days).
const RENOTE_EVERY: Duration = Duration::from_secs(24 * 3600);

/// The app's admins as the fleet has seen them, followed in memory. Cheap to clone.
#[derive(Clone)]
pub struct Admins {
    bus: Bus,
    /// app_id → admins' user ids.
    admins: Arc<RwLock<HashMap<String, HashSet<String>>>>,
    /// What this replica recorded, and when.
    noted: Arc<Mutex<HashMap<(String, String), Instant>>>,
}

/// The key of an admin: user ids may hold any character, keys may not.
fn key(app_id: &str, user_id: &str) -> String {
    let hex: String = user_id.bytes().map(|b| format!("{b:02x}")).collect();
    format!("{app_id}.{hex}")
}

/// The app and user of a key.
fn parse_key(k: &str) -> Option<(String, String)> {
    let (app, hex) = k.split_once('.')?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let bytes: Option<Vec<u8>> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).ok())
        .collect();
    Some((app.to_string(), String::from_utf8(bytes?).ok()?))
}

impl Admins {
    /// Follows `MZ_ADMINS` in the background (from its first entry: the bucket keeps one value
    /// per admin, so this is also the initial load).
    pub fn open(bus: &Bus) -> Admins {
        let a = Admins {
            bus: bus.clone(),
            admins: Arc::default(),
            noted: Arc::default(),
        };
        let (follower, bus) = (a.clone(), bus.clone());
        tokio::spawn(async move {
            bus.follow_bucket(BUCKET, None, |e| follower.observe(e))
                .await
        });
        a
    }

    fn observe(&self, e: kv::Entry) {
        let Some((app, user)) = parse_key(&e.key) else {
            return;
        };
        let mut map = self.admins.write().unwrap_or_else(PoisonError::into_inner);
        match e.operation {
            kv::Operation::Put => {
                map.entry(app).or_default().insert(user);
            }
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Some(set) = map.get_mut(&app) {
                    set.remove(&user);
                    if set.is_empty() {
                        map.remove(&app);
                    }
                }
            }
        }
    }

    /// Records that `user_id` is an admin of `app_id` (in the background; at most once a day
    /// per replica).
    pub fn note(&self, app_id: &str, user_id: &str) {
        {
            let mut noted = self.noted.lock().unwrap_or_else(PoisonError::into_inner);
            let k = (app_id.to_string(), user_id.to_string());
            if noted.get(&k).is_some_and(|t| t.elapsed() < RENOTE_EVERY) {
                return;
            }
            noted.insert(k, Instant::now());
        }
        let (bus, key, app_id, user_id) = (
            self.bus.clone(),
            key(app_id, user_id),
            app_id.to_string(),
            user_id.to_string(),
        );
        let noted = self.noted.clone();
        tokio::spawn(async move {
            let put = async {
                let kv = bus
                    .jetstream()
                    .get_key_value(bus.subjects().name(BUCKET))
                    .await
                    .map_err(|e| e.to_string())?;
                kv.put(key, user_id.clone().into_bytes().into())
                    .await
                    .map_err(|e| e.to_string())
            };
            match put.await {
                Ok(_) => debug!(app_id, user_id, "Admin recorded."),
                Err(e) => {
                    warn!(app_id, error = %e, "Admin not recorded in MZ_ADMINS; the next session will.");
                    noted
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .remove(&(app_id, user_id));
                }
            }
        });
    }

    /// The admins of `app_id` this replica knows.
    pub fn of(&self, app_id: &str) -> Vec<String> {
        self.admins
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app_id)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The `notification` frame of an alert.
pub fn alert_frame(alert: &CreditAlert) -> Frame {
    Frame::ephemeral(
        "notification",
        json!({
            "kind": alert.kind,
            "app_id": alert.app_id,
            "period": alert.period,
            "included": alert.included,
            "granted": alert.granted,
            "consumed": alert.consumed,
            "balance": alert.balance,
            "ts": alert.ts,
        }),
    )
}

/// Follows the credit alerts on `MZ_BILLING` from now on and delivers each one to the sockets of
/// its app's admins on this replica.
pub fn listen(bus: Bus, hub: Hub, admins: Admins) {
    tokio::spawn(async move {
        let filter = bus.subjects().billing_alert("*");
        let mut next: Option<u64> = None;
        loop {
            let policy = match next {
                Some(seq) => consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: seq,
                },
                None => consumer::DeliverPolicy::New,
            };
            let messages = async {
                let stream = bus.stream("MZ_BILLING").await.map_err(|e| e.to_string())?;
                let c = stream
                    .create_consumer(consumer::pull::OrderedConfig {
                        filter_subject: filter.clone(),
                        deliver_policy: policy,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                c.messages().await.map_err(|e| e.to_string())
            };
            let mut messages = match messages.await {
                Ok(m) => m,
                Err(e) => {
                    debug!(error = %e, "Cannot follow the credit alerts yet; retrying.");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            info!("Following the credit alerts for the admins' notifications.");
            while let Some(msg) = messages.next().await {
                let msg = match msg {
                    Ok(m) => m,
                    Err(e) => {
                        debug!(error = %e, "Credit alerts interrupted; resuming.");
                        break;
                    }
                };
                if let Ok(info) = msg.info() {
                    next = Some(info.stream_sequence + 1);
                }
                let alert: CreditAlert = match serde_json::from_slice(&msg.payload) {
                    Ok(a) => a,
                    Err(e) => {
                        warn!(subject = %msg.subject, error = %e, "Ignoring a credit alert that does not parse.");
                        continue;
                    }
                };
                // The subject names the app; an alert claiming another is ignored.
                if msg.subject.as_str() != bus.subjects().billing_alert(&alert.app_id) {
                    warn!(subject = %msg.subject, app_id = %alert.app_id, "Ignoring a credit alert for another app than its subject.");
                    continue;
                }
                let json = Utf8Bytes::from(alert_frame(&alert).to_json());
                let mut sockets = 0;
                for user in admins.of(&alert.app_id) {
                    sockets += hub.deliver(&alert.app_id, Some(&user), &json);
                }
                metrics::counter!(m::NOTIFICATIONS_DELIVERED, "app_id" => alert.app_id.clone())
                    .increment(sockets as u64);
                info!(app_id = %alert.app_id, kind = %alert.kind, sockets, "Credit alert sent to the app's admins.");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_hold_any_user_id_and_parse_back() {
        for user in ["ada", "a.b*c>d", "ünï cödé", ""] {
            let k = key("app1", user);
            assert!(
                k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
            );
            assert_eq!(parse_key(&k), Some(("app1".into(), user.to_string())));
        }
        assert_eq!(parse_key("app1.zz"), None);
        assert_eq!(parse_key("app1.abc"), None);
        assert_eq!(parse_key("nodot"), None);
    }
}
