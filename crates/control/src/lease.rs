//! Leases: work that must run on exactly one replica of the fleet at a time.
//!
//! A lease is a key of the KV bucket `MZ_LEASES` holding a [`LeaseRecord`] (who, since when,
//! what for), on the lease primitive [`mozaiks_bus::lease`]: entries age out after the bucket's
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
//!
//! The holder is the process's [`InstanceId`](mozaiks_bus::fleet::InstanceId), made once by the
//! binary.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use chrono::{DateTime, Utc};
use mozaiks_bus::Bus;
use mozaiks_bus::lease::{Held, LeaseBucket, Renewal};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::Error;

/// The bucket's base name (namespaced by the bus).
pub const BUCKET: &str = "MZ_LEASES";

/// The share of the TTL a successful write keeps a lease valid locally.
pub const VALIDITY: f64 = 0.5;

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
    /// Who holds it (a process's instance id, `{host}-{pid}-{tag}`).
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
    bucket: LeaseBucket,
    holder: String,
}

fn unavailable(e: mozaiks_bus::Error) -> Error {
    Error::Bus(e)
}

impl Leases {
    /// Opens `MZ_LEASES` (applied from `streams/`) for `holder`; the TTL is the bucket's `max_age`
    /// (a bucket without one is refused).
    pub async fn open(bus: &Bus, holder: impl Into<String>) -> Result<Leases, Error> {
        describe();
        let bucket = LeaseBucket::open(bus, BUCKET, None)
            .await
            .map_err(unavailable)?
            .with_validity(VALIDITY);
        Ok(Leases {
            bucket,
            holder: holder.into(),
        })
    }

    /// This process's holder id.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// How long an entry lives without renewal.
    pub fn ttl(&self) -> Duration {
        self.bucket.ttl()
    }

    /// How often a holder renews: a quarter of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.bucket.renew_every()
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
        let held = self
            .bucket
            .create(name, encode(&record))
            .await
            .map_err(unavailable)?;
        Ok(held.map(|held| Lease {
            bucket: self.bucket.clone(),
            name: name.to_string(),
            record,
            held,
        }))
    }

    /// Who holds `name` now, if anybody.
    pub async fn holder_of(&self, name: &str) -> Result<Option<LeaseRecord>, Error> {
        Ok(self
            .bucket
            .current(name)
            .await
            .map_err(unavailable)?
            .and_then(|c| serde_json::from_slice(&c.value).ok()))
    }
}

fn encode(r: &LeaseRecord) -> Bytes {
    Bytes::from(serde_json::to_vec(r).unwrap_or_default())
}

/// A lease this process holds.
pub struct Lease {
    bucket: LeaseBucket,
    name: String,
    record: LeaseRecord,
    held: Held,
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
        self.held.is_valid()
    }

    /// When this process stops counting itself the holder unless it renews.
    pub fn valid_until(&self) -> Instant {
        self.held.valid_until
    }

    /// Renews the lease. `Ok(false)`: it was lost (taken over or aged out); stop the work.
    pub async fn renew(&mut self) -> Result<bool, Error> {
        let mut record = self.record.clone();
        record.renewed_at = Utc::now();
        match self
            .bucket
            .renew(&self.name, encode(&record), self.held.revision)
            .await
            .map_err(unavailable)?
        {
            Renewal::Kept(held) => {
                self.held = held;
                self.record = record;
                Ok(true)
            }
            Renewal::Lost => {
                self.held.valid_until = Instant::now();
                Ok(false)
            }
        }
    }

    /// Gives the lease up at once (only if still ours), so another replica need not wait for
    /// the TTL.
    pub async fn release(self) {
        if let Err(e) = self.bucket.release(&self.name, self.held.revision).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bus_failure_under_a_lease_keeps_its_source_and_kind() {
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, "flush timed out");
        let e = unavailable(mozaiks_bus::Error::nats("flush", timed_out));
        assert!(std::error::Error::source(&e).is_some(), "{e:?}");
        match &e {
            Error::Bus(b) => assert!(b.is_retryable(), "{b:?}"),
            other => panic!("flattened: {other:?}"),
        }
    }
}
