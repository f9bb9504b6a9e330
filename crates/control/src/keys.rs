//! API keys of app back-ends: scoped to one app, stored hashed, revocable.
//!
//! A key reads `mzk_{key_id}_{secret}`: `key_id` is 16 hex characters (public: it names the key
//! in lists and logs), `secret` 64 hex characters from two random UUIDs (244 random bits). The
//! key is shown once, when created. The JetStream KV bucket `MZ_KEYS` holds, per `key_id`, the
//! app, a name, who created it and when, `revoked_at`, and the SHA-256 of the whole key — never the
//! key: a key with that much entropy needs no slow hash, and nobody who reads the bucket can
//! authenticate with what is there. Every gateway keeps a copy fed by a watch, so verifying a key
//! costs a map lookup and a hash, and a revocation applies everywhere within the watch's
//! propagation (milliseconds); a key not yet in the local copy is read through from the bucket.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use futures::StreamExt;
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use crate::Error;

/// How every key starts.
pub const PREFIX: &str = "mzk_";
/// Most live (unrevoked) keys per app.
pub const MAX_KEYS_PER_APP: usize = 50;
/// Longest key name, in characters.
pub const MAX_NAME_CHARS: usize = 100;

/// A key as stored (no secret).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub key_id: String,
    pub app_id: String,
    pub name: String,
    /// SHA-256 of the whole key, lowercase hex.
    pub hash: String,
    pub created_at: DateTime<Utc>,
    #[serde(default)]
    pub created_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<DateTime<Utc>>,
}

impl KeyRecord {
    pub fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// A key just created: its record and the key itself, shown once.
#[derive(Clone, Debug)]
pub struct NewKey {
    pub record: KeyRecord,
    pub key: String,
}

/// Why a presented key is refused. Callers answer every kind alike (401), so a guesser learns
/// nothing; the kind is for logs and metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRefused {
    #[error("not an API key")]
    Malformed,
    #[error("unknown API key")]
    Unknown,
    #[error("API key does not match")]
    Mismatch,
    #[error("API key revoked")]
    Revoked,
}

impl KeyRefused {
    pub fn kind(&self) -> &'static str {
        match self {
            KeyRefused::Malformed => "malformed",
            KeyRefused::Unknown => "unknown",
            KeyRefused::Mismatch => "mismatch",
            KeyRefused::Revoked => "revoked",
        }
    }
}

/// Why a key command was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum KeyRejection {
    #[error(
        "invalid key name: must be 1 to {MAX_NAME_CHARS} characters without control characters"
    )]
    InvalidName,
    #[error("the app already has {MAX_KEYS_PER_APP} live keys; revoke one first")]
    TooManyKeys,
}

impl KeyRejection {
    pub fn code(&self) -> &'static str {
        match self {
            KeyRejection::InvalidName => "invalid_name",
            KeyRejection::TooManyKeys => "too_many_keys",
        }
    }
}

/// Errors of key commands.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(transparent)]
    Rejected(#[from] KeyRejection),
    #[error(transparent)]
    Registry(#[from] Error),
}

/// SHA-256 of `key`, lowercase hex.
pub fn hash(key: &str) -> String {
    Sha256::digest(key.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `(key_id, secret)` of a well-formed key.
fn parse(key: &str) -> Option<(&str, &str)> {
    let rest = key.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, 16) && hex(secret, 64)).then_some((id, secret))
}

/// Equality that takes the same time wherever the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

fn unavailable(e: impl std::fmt::Display) -> Error {
    Error::Unavailable(e.to_string())
}

/// The replica's copy of `MZ_KEYS`, and key commands. Cheap to clone.
#[derive(Clone)]
pub struct ApiKeys {
    kv: kv::Store,
    keys: Arc<RwLock<HashMap<String, Arc<KeyRecord>>>>,
}

impl ApiKeys {
    /// Opens `MZ_KEYS`, loads every key and follows changes in the background.
    pub async fn open(bus: &Bus) -> Result<ApiKeys, Error> {
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name("MZ_KEYS"))
            .await
            .map_err(unavailable)?;
        let keys = ApiKeys {
            kv,
            keys: Arc::default(),
        };
        let mut watch = keys.kv.watch_with_history(">").await.map_err(unavailable)?;
        let has_values = keys
            .kv
            .status()
            .await
            .map(|s| s.values() > 0)
            .map_err(unavailable)?;
        if has_values {
            let load = async {
                while let Some(entry) = watch.next().await {
                    let e = entry.map_err(unavailable)?;
                    let done = e.delta == 0 || e.seen_current;
                    keys.observe(e);
                    if done {
                        break;
                    }
                }
                Ok::<(), Error>(())
            };
            tokio::time::timeout(Duration::from_secs(10), load)
                .await
                .map_err(|_| unavailable("API keys did not load within 10 s"))??;
        }
        let (follower, bus) = (keys.clone(), bus.clone());
        tokio::spawn(async move {
            bus.follow_bucket("MZ_KEYS", Some(watch), |e| follower.observe(e))
                .await
        });
        Ok(keys)
    }

    fn observe(&self, e: kv::Entry) {
        match e.operation {
            kv::Operation::Put => match serde_json::from_slice::<KeyRecord>(&e.value) {
                Ok(rec) => self.remember(rec),
                Err(err) => {
                    warn!(key_id = %e.key, error = %err, "Ignoring an API key record that does not parse.")
                }
            },
            kv::Operation::Delete | kv::Operation::Purge => {
                self.keys
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&e.key);
            }
        }
    }

    fn remember(&self, rec: KeyRecord) {
        let mut keys = self.keys.write().unwrap_or_else(PoisonError::into_inner);
        // A revocation is final, whatever order the replica sees records in.
        if keys.get(&rec.key_id).is_some_and(|k| k.is_revoked()) && !rec.is_revoked() {
            return;
        }
        keys.insert(rec.key_id.clone(), Arc::new(rec));
    }

    fn local(&self, key_id: &str) -> Option<Arc<KeyRecord>> {
        self.keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key_id)
            .cloned()
    }

    /// The record of a presented key, if the key is well-formed, known, matches and is not
    /// revoked. `Err(Unavailable)` only when the bucket cannot be read for a key this replica has
    /// not seen yet.
    pub async fn verify(&self, key: &str) -> Result<Result<Arc<KeyRecord>, KeyRefused>, Error> {
        let Some((key_id, _)) = parse(key) else {
            return Ok(Err(KeyRefused::Malformed));
        };
        let rec = match self.local(key_id) {
            Some(r) => r,
            // Created on another replica a moment ago: read through.
            None => match self.kv.entry(key_id).await.map_err(unavailable)? {
                Some(e) if e.operation == kv::Operation::Put => {
                    match serde_json::from_slice::<KeyRecord>(&e.value) {
                        Ok(rec) => Arc::new(rec),
                        Err(_) => return Ok(Err(KeyRefused::Unknown)),
                    }
                }
                _ => return Ok(Err(KeyRefused::Unknown)),
            },
        };
        if !same(&hash(key), &rec.hash) {
            return Ok(Err(KeyRefused::Mismatch));
        }
        if rec.is_revoked() {
            return Ok(Err(KeyRefused::Revoked));
        }
        Ok(Ok(rec))
    }

    /// The keys of an app (revoked ones included), oldest first.
    pub fn list(&self, app_id: &str) -> Vec<Arc<KeyRecord>> {
        let mut out: Vec<Arc<KeyRecord>> = self
            .keys
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|k| k.app_id == app_id)
            .cloned()
            .collect();
        out.sort_by(|a, b| {
            a.created_at
                .cmp(&b.created_at)
                .then(a.key_id.cmp(&b.key_id))
        });
        out
    }

    /// Creates a key for `app_id` (the caller checked the app exists and who may do this).
    pub async fn create(&self, app_id: &str, name: &str, actor: &str) -> Result<NewKey, KeyError> {
        let name = name.trim();
        if name.is_empty()
            || name.chars().count() > MAX_NAME_CHARS
            || name.chars().any(char::is_control)
        {
            return Err(KeyRejection::InvalidName.into());
        }
        if self.list(app_id).iter().filter(|k| !k.is_revoked()).count() >= MAX_KEYS_PER_APP {
            return Err(KeyRejection::TooManyKeys.into());
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let key_id = &id[..16];
        let secret = format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        );
        let key = format!("{PREFIX}{key_id}_{secret}");
        let record = KeyRecord {
            key_id: key_id.to_string(),
            app_id: app_id.to_string(),
            name: name.to_string(),
            hash: hash(&key),
            created_at: Utc::now(),
            created_by: actor.to_string(),
            revoked_at: None,
        };
        let bytes = serde_json::to_vec(&record).map_err(unavailable)?;
        self.kv
            .create(key_id, bytes.into())
            .await
            .map_err(unavailable)?;
        self.remember(record.clone());
        info!(app_id, key_id, actor, "API key created.");
        Ok(NewKey { record, key })
    }

    /// Revokes the key `key_id` of `app_id`. `None`: the app has no such key (another app's key is
    /// not found either). Revoking a revoked key changes nothing.
    pub async fn revoke(
        &self,
        app_id: &str,
        key_id: &str,
        actor: &str,
    ) -> Result<Option<KeyRecord>, Error> {
        for _ in 0..8 {
            let Some(e) = self.kv.entry(key_id).await.map_err(unavailable)? else {
                return Ok(None);
            };
            if e.operation != kv::Operation::Put {
                return Ok(None);
            }
            let mut rec: KeyRecord = serde_json::from_slice(&e.value).map_err(unavailable)?;
            if rec.app_id != app_id {
                return Ok(None);
            }
            if rec.is_revoked() {
                return Ok(Some(rec));
            }
            rec.revoked_at = Some(Utc::now());
            let bytes = serde_json::to_vec(&rec).map_err(unavailable)?;
            if self
                .kv
                .update(key_id, bytes.into(), e.revision)
                .await
                .is_ok()
            {
                self.remember(rec.clone());
                info!(app_id, key_id, actor, "API key revoked.");
                return Ok(Some(rec));
            }
        }
        Err(unavailable(format!("API key {key_id} kept changing")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_parse_only_in_their_exact_shape() {
        let good = format!("mzk_{}_{}", "a".repeat(16), "0".repeat(64));
        assert!(parse(&good).is_some());
        for bad in [
            "".to_string(),
            "mzk_".into(),
            format!("mzk_{}{}", "a".repeat(16), "0".repeat(64)),
            format!("mzk_{}_{}", "a".repeat(15), "0".repeat(64)),
            format!("mzk_{}_{}", "a".repeat(16), "0".repeat(63)),
            format!("mzk_{}_{}", "g".repeat(16), "0".repeat(64)),
            format!("xyz_{}_{}", "a".repeat(16), "0".repeat(64)),
            format!("mzk_{}_{}x", "a".repeat(16), "0".repeat(64)),
        ] {
            assert!(parse(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn hashes_are_sha256_hex_and_compared_whole() {
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd"));
        assert!(!same("abc", "abcd"));
    }
}
