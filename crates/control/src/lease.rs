//! Leases: work that must run on exactly one replica of the fleet at a time.
//!
//! A lease is a key of the KV bucket `MZ_LEASES`, whose entries age out after the bucket's
//! `max_age` (its TTL, `streams/kv/MZ_LEASES.json`). A replica **acquires** a lease with `create`
//! (refused while another holder's entry lives), **renews** it with `update` at the revision it
//! last wrote (refused if anybody else wrote the key since, or if the entry aged out meanwhile),
//! and **releases** it with a delete at that revision. A holder that dies stops renewing; its
//! entry ages out after the TTL and another replica's next `create` succeeds.
//!
//! A holder counts itself the holder only until half a TTL after the start of its last successful
//! write (a local monotonic clock), so a holder that cannot renew in time stops believing it holds
//! the lease well before its entry ages out and anybody else can take it. Work under a lease checks
//! [`Lease::is_valid`] (or [`Leader::is_leader`]) before each step with effects; steps must stay
//! idempotent, since a step already under way when the lease is lost still finishes.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Error;

/// The bucket's base name (namespaced by the bus).
pub const BUCKET: &str = "MZ_LEASES";

/// Gauge: 1 while this process holds the named lease (only fleet-wide singletons such as
/// `retention`, never per-app leases: the label stays bounded).
pub const LEASE_HELD: &str = "mozaiks_lease_held";
/// Counter: leases acquired and lost, by lease and event.
pub const LEASE_CHANGES: &str = "mozaiks_lease_changes_total";

pub fn describe() {
    metrics::describe_gauge!(
        LEASE_HELD,
        "1 while this process holds the fleet-wide lease, by lease."
    );
    metrics::describe_counter!(
        LEASE_CHANGES,
        "Fleet-wide leases acquired, lost and released by this process, by lease and event."
    );
}

/// What a lease's key holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseRecord {
    /// Who holds it (`{host}-{pid}-{random}` for a process).
    pub holder: String,
    pub acquired_at: DateTime<Utc>,
    pub renewed_at: DateTime<Utc>,
    /// What the holder is doing, for operators (free text, no secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
}

/// The lease bucket, and who this process is. Cheap to clone.
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
    holder: String,
    ttl: Duration,
}

/// A process-unique holder id.
pub fn holder_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into());
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}-{}", std::process::id(), &tag[..8])
}

impl Leases {
    /// Opens `MZ_LEASES` (applied from `streams/`); the TTL is the bucket's `max_age`.
    pub async fn open(bus: &Bus, holder: impl Into<String>) -> Result<Leases, Error> {
        describe();
        let unavailable = |e: String| Error::Unavailable(format!("lease bucket: {e}"));
        let kv = bus
            .jetstream()
            .get_key_value(bus.subjects().name(BUCKET))
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        let ttl = kv
            .status()
            .await
            .map_err(|e| unavailable(e.to_string()))?
            .max_age();
        if ttl.is_zero() {
            return Err(unavailable(
                "MZ_LEASES has no max_age: a dead holder's lease would never expire".into(),
            ));
        }
        Ok(Leases {
            kv,
            holder: holder.into(),
            ttl,
        })
    }

    /// This process's holder id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How long an entry lives without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a holder renews: a quarter of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }

    /// Takes the lease `name` if nobody holds it; `Ok(None)` if somebody does.
    pub async fn try_acquire(
        &self,
        name: &str,
        purpose: Option<&str>,
    ) -> Result<Option<Lease>, Error> {
        let now = Utc::now();
        let record = LeaseRecord {
            holder: self.holder.clone(),
            acquired_at: now,
            renewed_at: now,
            purpose: purpose.map(str::to_string),
        };
        let started = Instant::now();
        match self.kv.create(name, encode(&record)).await {
            Ok(revision) => Ok(Some(Lease {
                kv: self.kv.clone(),
                name: name.to_string(),
                record,
                revision,
                valid_until: started + self.ttl / 2,
                ttl: self.ttl,
            })),
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(Error::Unavailable(format!("acquiring lease {name}: {e}"))),
        }
    }

    /// Who holds `name` now, if anybody.
    pub async fn holder_of(&self, name: &str) -> Result<Option<LeaseRecord>, Error> {
        match self.kv.entry(name).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => {
                Ok(serde_json::from_slice(&e.value).ok())
            }
            Ok(_) => Ok(None),
            Err(e) => Err(Error::Unavailable(format!("reading lease {name}: {e}"))),
        }
    }
}

fn encode(r: &LeaseRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(r).unwrap_or_default())
}

/// A lease this process holds.
pub struct Lease {
    kv: kv::Store,
    name: String,
    record: LeaseRecord,
    revision: u64,
    valid_until: Instant,
    ttl: Duration,
}

impl Lease {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn record(&self) -> &LeaseRecord {
        &self.record
    }

    /// Whether this process may still act under the lease.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    /// When this process stops counting itself the holder unless it renews.
    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// Renews the lease. `Ok(false)`: it was lost (taken over or aged out); stop the work.
    pub async fn renew(&mut self) -> Result<bool, Error> {
        let mut record = self.record.clone();
        record.renewed_at = Utc::now();
        let started = Instant::now();
        match self
            .kv
            .update(&self.name, encode(&record), self.revision)
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                self.record = record;
                self.valid_until = started + self.ttl / 2;
                Ok(true)
            }
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                self.valid_until = Instant::now();
                Ok(false)
            }
            Err(e) => Err(Error::Unavailable(format!(
                "renewing lease {}: {e}",
                self.name
            ))),
        }
    }

    /// Gives the lease up at once (only if still ours), so another replica need not wait for
    /// the TTL.
    pub async fn release(self) {
        if let Err(e) = self
            .kv
            .delete_expect_revision(&self.name, Some(self.revision))
            .await
        {
            warn!(lease = %self.name, error = %e, "Could not release a lease; it ages out.");
        }
    }
}

/// Holds a fleet-wide singleton lease whenever it can: a background task acquires it when it is
/// free, renews it while held, and releases it when the task is told to stop.
#[derive(Clone)]
pub struct Leader {
    name: String,
    valid_until: Arc<Mutex<Option<Instant>>>,
    changes: watch::Receiver<bool>,
}

impl Leader {
    /// Starts contending for `name` until `shutdown` resolves.
    pub fn spawn(
        leases: Leases,
        name: &str,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Leader {
        let (tx, rx) = watch::channel(false);
        let leader = Leader {
            name: name.to_string(),
            valid_until: Arc::default(),
            changes: rx,
        };
        let me = leader.clone();
        tokio::spawn(async move {
            tokio::pin!(shutdown);
            let mut held: Option<Lease> = None;
            let every = leases.renew_every();
            loop {
                held = me.step(&leases, held).await;
                let _ = tx.send(held.is_some());
                tokio::select! {
                    _ = &mut shutdown => break,
                    _ = tokio::time::sleep(every) => {}
                }
            }
            me.set(None);
            let _ = tx.send(false);
            if let Some(lease) = held {
                lease.release().await;
                metrics::gauge!(LEASE_HELD, "lease" => me.name.clone()).set(0.0);
                metrics::counter!(LEASE_CHANGES, "lease" => me.name.clone(), "event" => "released")
                    .increment(1);
                info!(lease = %me.name, "Lease released.");
            }
        });
        leader
    }

    async fn step(&self, leases: &Leases, held: Option<Lease>) -> Option<Lease> {
        let name = &self.name;
        let next = match held {
            Some(mut lease) => match lease.renew().await {
                Ok(true) => Some(lease),
                Ok(false) => {
                    warn!(lease = %name, "Lease lost to another holder.");
                    metrics::counter!(LEASE_CHANGES, "lease" => name.clone(), "event" => "lost")
                        .increment(1);
                    None
                }
                Err(e) => {
                    // Keep trying until the local validity runs out.
                    warn!(lease = %name, error = %e, "Could not renew the lease.");
                    lease.is_valid().then_some(lease)
                }
            },
            None => match leases.try_acquire(name, None).await {
                Ok(Some(lease)) => {
                    info!(lease = %name, holder = %leases.holder(), "Lease acquired.");
                    metrics::counter!(LEASE_CHANGES, "lease" => name.clone(), "event" => "acquired")
                        .increment(1);
                    Some(lease)
                }
                Ok(None) => None,
                Err(e) => {
                    warn!(lease = %name, error = %e, "Could not contend for the lease.");
                    None
                }
            },
        };
        self.set(next.as_ref().map(Lease::valid_until));
        metrics::gauge!(LEASE_HELD, "lease" => name.clone()).set(if next.is_some() {
            1.0
        } else {
            0.0
        });
        next
    }

    fn set(&self, until: Option<Instant>) {
        *self
            .valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = until;
    }

    /// Whether this process holds the lease now (checked against the local clock, so a holder
    /// whose renewals stall stops counting itself the holder on time).
    pub fn is_leader(&self) -> bool {
        self.valid_until
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some_and(|t| Instant::now() < t)
    }

    /// Resolves when this process holds the lease.
    pub async fn wait_leader(&self) {
        let mut rx = self.changes.clone();
        loop {
            if self.is_leader() {
                return;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
