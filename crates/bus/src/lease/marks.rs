//! Releasing a lease and taking it again in one request each.
//!
//! A released key's last entry is its delete marker. `kv::Store::create` first tries a write
//! expecting no entry at all, which the marker refuses, then reads the key, then writes again at
//! the marker's revision: three requests to take back a lease its holder gave up a moment ago, as
//! a worker does each time a chat it owned comes back to life. Here the release answers the
//! marker's revision ([`LeaseBucket::release_at`]) and the holder takes the key back with one
//! write expecting exactly that marker ([`LeaseBucket::create_over`]): one request when nobody
//! wrote the key since, the usual create otherwise.

use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::kv::UpdateErrorKind;
use bytes::Bytes;

use super::{Held, LeaseBucket};
use crate::Error;

impl LeaseBucket {
    /// The subject a write of `key` goes to (the bus's JetStream context uses no API prefix of
    /// a domain, so no `use_jetstream_prefix` here).
    fn key_subject(&self, key: &str) -> String {
        let kv = &self.kv;
        format!("{}{key}", kv.put_prefix.as_ref().unwrap_or(&kv.prefix))
    }

    /// Deletes `key` if its revision is still `revision` (as [`LeaseBucket::release`]) and
    /// returns the revision of the delete marker, for [`LeaseBucket::create_over`].
    pub async fn release_at(&self, key: &str, revision: u64) -> Result<u64, Error> {
        let op = || format!("releasing lease {key}");
        let mut headers = HeaderMap::new();
        headers.insert("KV-Operation", "DEL");
        headers.insert(
            "Nats-Expected-Last-Subject-Sequence",
            revision.to_string().as_str(),
        );
        let ack = self
            .js
            .publish_with_headers(self.key_subject(key), headers, Bytes::new())
            .await
            .map_err(|e| Error::kv(op(), e))?
            .await
            .map_err(|e| Error::kv(op(), e))?;
        Ok(ack.sequence)
    }

    /// Takes `key` with `value` if its last entry is still the delete marker at `marker` (this
    /// holder's own release): one write. Otherwise (somebody wrote the key since, or the marker
    /// aged out) the usual [`LeaseBucket::create`]. `Ok(None)`: somebody holds it.
    pub async fn create_over(
        &self,
        key: &str,
        value: Bytes,
        marker: u64,
    ) -> Result<Option<Held>, Error> {
        let sent = Instant::now();
        match self.kv.update(key, value.clone(), marker).await {
            Ok(revision) => Ok(Some(Held {
                revision,
                valid_until: self.valid_until(sent),
            })),
            Err(e)
                if e.kind() == UpdateErrorKind::WrongLastRevision
                    || crate::wrong_last_sequence_in(&e) =>
            {
                self.create(key, value).await
            }
            Err(e) => Err(Error::kv(format!("creating lease {key}"), e)),
        }
    }
}
