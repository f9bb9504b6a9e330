//! Per-chat ownership leases across workers (`MZ_OWNERS`, `streams/kv/MZ_OWNERS.json`), on the
//! lease primitive [`mozaiks_bus::lease`].
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
//! **Taking a chat back.** A release remembers the revision of the key's delete marker for the
//! bucket's TTL (after which the server drops the marker); claiming the chat again within it is
//! one write expecting that marker ([`LeaseBucket::create_over`](mozaiks_bus::lease::LeaseBucket::create_over)),
//! not the three requests of a create over a deleted key. A chat that comes back to life (the
//! user's next message, a child's `child.finished`) costs two KV operations per activation.
//!
//! **A local deadline.** A worker counts a lease as its own only until [`VALIDITY`] of its TTL
//! after the start of the last claim or renewal that succeeded (monotonic clock), like the
//! retention leader: cut off from NATS, it stops believing it owns its chats before the server
//! lets another worker take them (the TTL), and hands their commands back.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_bus::lease::{Held, LeaseBucket, Renewal};
use tracing::{debug, warn};

use crate::{Error, metrics as m};

/// The bucket's base name (namespaced by the bus).
pub const BUCKET: &str = "MZ_OWNERS";

/// Renewals in flight at once during a pass.
const RENEW_CONCURRENCY: usize = 64;

/// The share of the TTL for which a successful claim or renewal makes this worker count the lease
/// as its own (counted from when the request was sent).
pub const VALIDITY: f64 = 0.7;

/// The TTL assumed for a bucket without `max_age` (its keys would never age out).
const TTL_IF_UNSET: Duration = Duration::from_secs(5);

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
    bucket: LeaseBucket,
    me: String,
    /// Key → the lease as this worker last wrote it.
    held: Mutex<HashMap<String, Held>>,
    /// Key → the revision of the delete marker of this worker's last release of it, and when.
    released: Mutex<HashMap<String, (u64, Instant)>>,
}

impl Owners {
    /// Opens the bucket for worker `me` (the process's instance id).
    pub async fn open(bus: &Bus, me: &str) -> Result<Owners, Error> {
        let bucket = LeaseBucket::open(bus, BUCKET, Some(TTL_IF_UNSET))
            .await?
            .with_validity(VALIDITY);
        Ok(Owners {
            bucket,
            me: me.to_string(),
            held: Mutex::new(HashMap::new()),
            released: Mutex::new(HashMap::new()),
        })
    }

    /// This worker's id (the value of its keys).
    pub fn me(&self) -> &str {
        &self.me
    }

    /// How long a lease lives without renewal.
    pub fn ttl(&self) -> Duration {
        self.bucket.ttl()
    }

    /// The key of a chat.
    pub fn key(app_id: &str, chat_id: &str) -> String {
        format!("{app_id}.{chat_id}")
    }

    fn held(&self) -> std::sync::MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this worker holds the lease of `key`: not lost at a renewal, and renewed recently
    /// enough (the local deadline; see the module docs).
    pub fn holds(&self, key: &str) -> bool {
        self.held().get(key).is_some_and(Held::is_valid)
    }

    /// Leases held now.
    pub fn count(&self) -> usize {
        self.held().len()
    }

    fn released(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, Instant)>> {
        self.released.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The marker of this worker's release of `key`, if the server may still hold it.
    fn take_marker(&self, key: &str) -> Option<u64> {
        let (marker, at) = self.released().remove(key)?;
        (at.elapsed() < self.ttl()).then_some(marker)
    }

    fn keep(&self, key: &str, lease: Held, event: &'static str) {
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
        let mut marker = self.take_marker(key);
        for _ in 0..4 {
            let created = match marker.take() {
                Some(m) => self.bucket.create_over(key, me.clone(), m).await?,
                None => self.bucket.create(key, me.clone()).await?,
            };
            if let Some(lease) = created {
                self.keep(key, lease, event);
                return Ok(Claim::Mine);
            }
            match self.bucket.current(key).await? {
                Some(c) if c.value == me => {
                    // Ours from an earlier claim whose release has not landed yet: write it again.
                    if let Ok(Renewal::Kept(lease)) =
                        self.bucket.renew(key, me.clone(), c.revision).await
                    {
                        self.keep(key, lease, event);
                        return Ok(Claim::Mine);
                    }
                }
                Some(c) => {
                    return Ok(Claim::Theirs(
                        String::from_utf8_lossy(&c.value).into_owned(),
                    ));
                }
                // Deleted or aged out between the create and the read: try again.
                None => {}
            }
        }
        Err(Error::Bus(mozaiks_bus::Error::Contended {
            what: format!("lease {key} changed hands too often to claim"),
        }))
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
        match self.bucket.release_at(key, revision).await {
            Ok(marker) => {
                self.released()
                    .insert(key.to_string(), (marker, Instant::now()));
            }
            Err(e) => debug!(key, error = %e, "Lease release did not land; it ages out."),
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
        // Markers the server has dropped by now are of no use.
        let ttl = self.ttl();
        self.released().retain(|_, (_, at)| at.elapsed() < ttl);
        let snapshot: Vec<(String, u64)> = self
            .held()
            .iter()
            .map(|(k, l)| (k.clone(), l.revision))
            .collect();
        let me = Bytes::from(self.me.clone());
        let results: Vec<(String, u64, Result<Renewal, mozaiks_bus::Error>)> =
            futures::stream::iter(snapshot)
                .map(|(key, rev)| {
                    let me = me.clone();
                    async move {
                        let r = self.bucket.renew(&key, me, rev).await;
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
                Ok(Renewal::Kept(lease)) => {
                    held.insert(key, lease);
                }
                Ok(Renewal::Lost) => {
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
        let every = self.bucket.renew_every();
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
        Ok(self
            .bucket
            .current(key)
            .await?
            .map(|c| String::from_utf8_lossy(&c.value).into_owned()))
    }
}
