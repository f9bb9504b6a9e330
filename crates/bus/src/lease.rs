//! The lease primitive every lease of the runtime is built on: keys of a KV bucket whose entries
//! age out after the bucket's `max_age` (the lease's TTL).
//!
//! - **create** a key: refused while another holder's entry lives (the lease is taken);
//! - **renew** it with an update at the revision the holder last wrote: refused if anybody wrote
//!   the key since, or if the entry aged out meanwhile (the lease was lost);
//! - **release** it with a delete at that revision, so it never deletes another holder's entry;
//! - a holder that dies stops renewing: its entry ages out after the TTL and the next create
//!   succeeds.
//!
//! **A local validity deadline.** A holder counts a lease as its own only until a share of the TTL
//! ([`LeaseBucket::with_validity`]) after it *sent* the last create or renewal that succeeded, on
//! its monotonic clock ([`Held::valid_until`]). The server cannot age the entry out before the TTL
//! counted from when it *stored* the write, which is later, so a holder that cannot renew (cut off,
//! stalled) stops believing it holds the lease before anybody else can take it.
//!
//! Built on this: `mozaiks_control::lease` (named fleet-wide leases holding a record, and the
//! singleton `Leader`) and
//! `mozaiks_engine::worker::lease` (a worker's many per-chat leases, renewed in batched passes).

use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{self, CreateErrorKind, Operation, UpdateErrorKind};
use bytes::Bytes;

use crate::{Bus, Error};

mod marks;

/// The default share of the TTL a successful write keeps a lease valid locally.
pub const DEFAULT_VALIDITY: f64 = 0.5;

/// A bucket of leases. Cheap to clone.
#[derive(Clone)]
pub struct LeaseBucket {
    kv: kv::Store,
    /// For writes the KV API does not offer ([`marks`]).
    js: async_nats::jetstream::Context,
    name: String,
    ttl: Duration,
    validity: f64,
}

/// A lease as its holder last wrote it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// The revision the holder last wrote (the one to renew or release at).
    pub revision: u64,
    /// Until when the holder counts the lease as its own (see the module docs).
    pub valid_until: Instant,
}

impl Held {
    /// Whether the holder may still act under the lease.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }
}

/// What a renewal found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Renewal {
    /// Still ours, until the new deadline.
    Kept(Held),
    /// Somebody wrote the key since our revision, or it aged out: no longer ours.
    Lost,
}

/// A lease's entry as it is now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Current {
    pub value: Bytes,
    pub revision: u64,
}

fn failed(what: &str, key: &str, e: impl Into<async_nats::Error>) -> Error {
    Error::kv(format!("{what} lease {key}"), e)
}

impl LeaseBucket {
    /// Opens the bucket `base` (namespaced by the bus; its definition is applied from
    /// `streams/`). The TTL is the bucket's `max_age`; a bucket without one is refused (a dead
    /// holder's lease would never expire) unless `ttl_if_unset` is given, which is then used for
    /// the local deadline only.
    pub async fn open(
        bus: &Bus,
        base: &str,
        ttl_if_unset: Option<Duration>,
    ) -> Result<LeaseBucket, Error> {
        let name = bus.subjects().name(base);
        let op = || format!("lease bucket {base}");
        let kv = bus
            .jetstream()
            .get_key_value(&name)
            .await
            .map_err(|e| Error::kv(op(), e))?;
        let max_age = kv.status().await.map_err(|e| Error::kv(op(), e))?.max_age();
        let ttl = match (max_age.is_zero(), ttl_if_unset) {
            (false, _) => max_age,
            (true, Some(ttl)) => ttl,
            (true, None) => {
                return Err(Error::Definition {
                    file: base.to_string(),
                    reason:
                        "a lease bucket needs a max_age: a dead holder's lease would never expire"
                            .into(),
                });
            }
        };
        Ok(LeaseBucket {
            kv,
            js: bus.jetstream().clone(),
            name,
            ttl,
            validity: DEFAULT_VALIDITY,
        })
    }

    /// Sets the share of the TTL (in `(0, 1)`) a successful create or renewal keeps a lease valid
    /// for its holder. Default [`DEFAULT_VALIDITY`].
    pub fn with_validity(mut self, share: f64) -> LeaseBucket {
        self.validity = share.clamp(0.0, 1.0);
        self
    }

    /// The bucket's namespaced name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// How long an entry lives without renewal.
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a holder renews: a quarter of the TTL.
    pub fn renew_every(&self) -> Duration {
        self.ttl / 4
    }

    /// The local deadline of a create or renewal sent at `sent`.
    pub fn valid_until(&self, sent: Instant) -> Instant {
        sent + self.ttl.mul_f64(self.validity)
    }

    /// Takes `key` with `value` if nobody holds it; `Ok(None)` if somebody does.
    pub async fn create(&self, key: &str, value: Bytes) -> Result<Option<Held>, Error> {
        let sent = Instant::now();
        match self.kv.create(key, value).await {
            Ok(revision) => Ok(Some(Held {
                revision,
                valid_until: self.valid_until(sent),
            })),
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => Ok(None),
            Err(e) => Err(failed("creating", key, e)),
        }
    }

    /// Writes `value` to `key` if its revision is still `revision` (the holder's last write).
    pub async fn renew(&self, key: &str, value: Bytes, revision: u64) -> Result<Renewal, Error> {
        let sent = Instant::now();
        match self.kv.update(key, value, revision).await {
            Ok(revision) => Ok(Renewal::Kept(Held {
                revision,
                valid_until: self.valid_until(sent),
            })),
            Err(e)
                if e.kind() == UpdateErrorKind::WrongLastRevision
                    || crate::wrong_last_sequence_in(&e) =>
            {
                Ok(Renewal::Lost)
            }
            Err(e) => Err(failed("renewing", key, e)),
        }
    }

    /// Deletes `key` if its revision is still `revision`: gives the lease up at once, never
    /// another holder's.
    pub async fn release(&self, key: &str, revision: u64) -> Result<(), Error> {
        self.kv
            .delete_expect_revision(key, Some(revision))
            .await
            .map_err(|e| failed("releasing", key, e))
    }

    /// The entry of `key` if somebody holds it.
    pub async fn current(&self, key: &str) -> Result<Option<Current>, Error> {
        match self.kv.entry(key).await {
            Ok(Some(e)) if e.operation == Operation::Put => Ok(Some(Current {
                value: e.value,
                revision: e.revision,
            })),
            Ok(_) => Ok(None),
            Err(e) => Err(failed("reading", key, e)),
        }
    }
}
