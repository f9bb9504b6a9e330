//! Per-chat ownership leases across workers (`MZ_OWNERS`, `streams/kv/MZ_OWNERS.json`).
//!
//! A chat's key `{app_id}.{chat_id}` holds the id of the worker that owns it. A worker **claims**
//! a chat with an atomic `create` before it handles the chat's commands or drives its run,
//! **renews** every key it holds in one batched pass ([`Owners::renew`], every quarter of the
//! bucket's `max_age`, not a task per chat), and **releases** the key (a delete at the revision it
//! last wrote) when the chat settles. A worker that dies stops renewing: its keys age out after
//! `max_age` and the next claim succeeds, which is how a chat is taken over. A renewal refused
//! because somebody else wrote the key means the lease was lost (this worker could not renew in
//! time): the chat's actor stops writing and hands its commands back. Optimistic concurrency on
//! the chat's log stays the safety net, so even two workers that both believe they own a chat
//! cannot corrupt it.
//!
//! **A local deadline.** A worker counts a lease as its own only until [`VALIDITY`] of its TTL
//! after the start of the last claim or renewal that succeeded (monotonic clock), like the
//! retention leader: cut off from NATS, it stops believing it owns its chats before the server
//! lets another worker take them (the TTL), and hands their commands back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;
use futures::StreamExt;
use mozaiks_bus::Bus;
use tracing::{debug, warn};

use crate::{Error, metrics as m};

/// The bucket's base name (namespaced by the bus).
pub const BUCKET: &str = "MZ_OWNERS";

/// Renewals in flight at once during a pass.
const RENEW_CONCURRENCY: usize = 64;

/// The share of the TTL for which a successful claim or renewal makes this worker count the lease
/// as its own (counted from when the request was sent).
pub const VALIDITY: f64 = 0.7;

/// A lease this worker holds.
#[derive(Clone, Copy, Debug)]
struct Lease {
    /// The revision this worker last wrote.
    revision: u64,
    /// Until when this worker counts it as its own.
    valid_until: Instant,
}

/// Who owns a chat, as a claim found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This worker owns it now.
    Mine,
    /// Another worker's lease is live.
    Theirs(String),
}

/// The leases of one worker.
pub struct Owners {
    kv: kv::Store,
    me: String,
    ttl: Duration,
    /// Key → the lease as this worker last wrote it.
    held: Mutex<HashMap<String, Lease>>,
}

fn js(e: impl std::fmt::Display) -> Error {
    Error::Bus(mozaiks_bus::Error::JetStream(e.to_string()))
}

impl Owners {
    /// Opens the bucket for worker `me`.
    pub async fn open(bus: &Bus, me: &str) -> Result<Owners, Error> {
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name(BUCKET))
            .await
            .map_err(js)?;
        let ttl = kv.status().await.map_err(js)?.max_age();
        let ttl = if ttl.is_zero() {
            Duration::from_secs(5)
        } else {
            ttl
        };
        Ok(Owners {
            kv,
            me: me.to_string(),
            ttl,
            held: Mutex::new(HashMap::new()),
        })
    }

    /// This worker's id (the value of its keys).
    pub fn me(&self) -> &str {
        &self.me
    }

    /// How long a lease lives without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The key of a chat.
    pub fn key(app_id: &str, chat_id: &str) -> String {
        format!("{app_id}.{chat_id}")
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Lease>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long a claim or renewal sent at `sent` keeps the lease this worker's.
    fn valid_from(&self, sent: Instant) -> Instant {
        sent + self.ttl.mul_f64(VALIDITY)
    }

    /// Whether this worker holds the lease of `key`: not lost at a renewal, and renewed recently
    /// enough (the local deadline; see the module docs).
    pub fn holds(&self, key: &str) -> bool {
        self.held()
            .get(key)
            .is_some_and(|l| Instant::now() < l.valid_until)
    }

    /// Leases held now.
    pub fn count(&self) -> usize {
        self.held().len()
    }

    fn keep(&self, key: &str, revision: u64, sent: Instant, event: &'static str) {
        let lease = Lease {
            revision,
            valid_until: self.valid_from(sent),
        };
        let n = {
            let mut held = self.held();
            held.insert(key.to_string(), lease);
            held.len()
        };
        metrics::counter!(m::LEASES, "event" => event).increment(1);
        metrics::gauge!(m::LEASES_HELD).set(n as f64);
    }

    /// Claims `key` for this worker: creates it, or finds who holds it. `takeover` says the
    /// caller waited for a dead owner's lease to expire (for the metrics).
    pub async fn claim(&self, key: &str, takeover: bool) -> Result<Claim, Error> {
        if self.holds(key) {
            return Ok(Claim::Mine);
        }
        let event = if takeover { "taken_over" } else { "acquired" };
        let me = Bytes::from(self.me.clone());
        for _ in 0..4 {
            let sent = Instant::now();
            match self.kv.create(key, me.clone()).await {
                Ok(revision) => {
                    self.keep(key, revision, sent, event);
                    return Ok(Claim::Mine);
                }
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
                Err(e) => return Err(js(e)),
            }
            match self.kv.entry(key).await.map_err(js)? {
                Some(e) if e.operation == Operation::Put && e.value == me => {
                    // Ours from an earlier claim whose release has not landed yet: write it again.
                    let sent = Instant::now();
                    if let Ok(revision) = self.kv.update(key, me.clone(), e.revision).await {
                        self.keep(key, revision, sent, event);
                        return Ok(Claim::Mine);
                    }
                }
                Some(e) if e.operation == Operation::Put => {
                    return Ok(Claim::Theirs(
                        String::from_utf8_lossy(&e.value).into_owned(),
                    ));
                }
                // Deleted or aged out between the create and the read: try again.
                _ => {}
            }
        }
        Err(js(format!("lease {key} changed hands too often to claim")))
    }

    /// Gives `key` up (when the chat settles). Best effort: a release that does not land ages out.
    pub async fn release(&self, key: &str) {
        let revision = {
            let mut held = self.held();
            let r = held.remove(key).map(|l| l.revision);
            metrics::gauge!(m::LEASES_HELD).set(held.len() as f64);
            r
        };
        let Some(revision) = revision else { return };
        metrics::counter!(m::LEASES, "event" => "released").increment(1);
        if let Err(e) = self.kv.delete_expect_revision(key, Some(revision)).await {
            debug!(key, error = %e, "Lease release did not land; it ages out.");
        }
    }

    /// Releases every lease (at shutdown).
    pub async fn release_all(&self) {
        let keys: Vec<String> = self.held().keys().cloned().collect();
        futures::stream::iter(keys)
            .for_each_concurrent(RENEW_CONCURRENCY, |k| async move { self.release(&k).await })
            .await;
    }

    /// One renewal pass over every lease held; returns the keys lost (somebody else wrote them,
    /// or they aged out and were deleted).
    pub async fn renew(&self) -> Vec<String> {
        let sent = Instant::now();
        let snapshot: Vec<(String, u64)> = self
            .held()
            .iter()
            .map(|(k, l)| (k.clone(), l.revision))
            .collect();
        let me = Bytes::from(self.me.clone());
        let results: Vec<(String, u64, Result<u64, kv::UpdateError>)> =
            futures::stream::iter(snapshot)
                .map(|(key, rev)| {
                    let me = me.clone();
                    async move {
                        let r = self.kv.update(&key, me, rev).await;
                        (key, rev, r)
                    }
                })
                .buffer_unordered(RENEW_CONCURRENCY)
                .collect()
                .await;
        let mut lost = Vec::new();
        let mut held = self.held();
        for (key, rev, result) in results {
            // Released (or re-claimed) meanwhile: the pass's view of this key is stale.
            if held.get(&key).map(|l| l.revision) != Some(rev) {
                continue;
            }
            match result {
                Ok(new) => {
                    held.insert(
                        key,
                        Lease {
                            revision: new,
                            valid_until: self.valid_from(sent),
                        },
                    );
                }
                Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                    held.remove(&key);
                    metrics::counter!(m::LEASES, "event" => "lost").increment(1);
                    lost.push(key);
                }
                Err(e) => warn!(key, error = %e, "Cannot renew a chat lease; retrying."),
            }
        }
        metrics::gauge!(m::LEASES_HELD).set(held.len() as f64);
        lost
    }

    /// Renews every quarter of the TTL until `stop` fires, then releases everything.
    pub async fn keep_renewing(&self, stop: &tokio::sync::Notify) {
        let every = self.ttl / 4;
        loop {
            tokio::select! {
                _ = stop.notified() => break,
                _ = tokio::time::sleep(every) => {}
            }
            for key in self.renew().await {
                warn!(
                    key,
                    "Chat lease lost (not renewed in time); another worker may own the chat now."
                );
            }
        }
        self.release_all().await;
    }

    /// The owner of `key` now (`None`: nobody).
    pub async fn owner(&self, key: &str) -> Result<Option<String>, Error> {
        Ok(match self.kv.entry(key).await.map_err(js)? {
            Some(e) if e.operation == Operation::Put => {
                Some(String::from_utf8_lossy(&e.value).into_owned())
            }
            _ => None,
        })
    }
}
