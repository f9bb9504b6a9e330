//! Following a key-value bucket for as long as the process runs, across server restarts.
//!
//! A KV watch is an ordered consumer that resumes after the last sequence it saw. When the bucket
//! itself is recreated (a memory bucket after a nats-server restart, re-applied by the keeper), its
//! sequences start again from 1 and the old watch would wait for a sequence the new bucket has not
//! reached: it would see nothing for a long while. So [`Bus::follow_bucket`] opens the watch again,
//! with the bucket's history, after every reconnect and whenever the watch ends, and hands every
//! entry to the caller, who must therefore take an entry it already saw as a repeat (every
//! follower keeps the latest value per key, which is idempotent).

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tracing::{debug, warn};

use crate::Bus;

impl Bus {
    /// Hands every entry of the bucket `base` (namespaced) to `f`, forever: first those of
    /// `first` (a watch the caller already opened, if any), then of a watch opened again with
    /// history after every reconnect or end (see the module docs).
    pub async fn follow_bucket(
        &self,
        base: &str,
        first: Option<kv::Watch>,
        mut f: impl FnMut(kv::Entry) + Send,
    ) {
        let name = self.subjects().name(base);
        let stats = self.client().statistics();
        let mut watch = first;
        let mut backoff = Duration::from_millis(100);
        loop {
            let connects = stats.connects.load(Ordering::Relaxed);
            let mut w = match watch.take() {
                Some(w) => w,
                None => match self.open_watch(&name).await {
                    Ok(w) => {
                        backoff = Duration::from_millis(100);
                        w
                    }
                    Err(e) => {
                        debug!(bucket = %name, error = %e, "Cannot watch the bucket yet; retrying.");
                        if e.is_missing() {
                            self.heal();
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                        continue;
                    }
                },
            };
            loop {
                tokio::select! {
                    entry = w.next() => match entry {
                        Some(Ok(e)) => f(e),
                        Some(Err(e)) => debug!(bucket = %name, error = %e, "Bucket watch error."),
                        None => {
                            warn!(bucket = %name, "Bucket watch ended; opening it again.");
                            break;
                        }
                    },
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {
                        if stats.connects.load(Ordering::Relaxed) != connects && self.is_connected() {
                            debug!(bucket = %name, "Reconnected; watching the bucket again from its history.");
                            // Give the keeper a moment to re-create a bucket the server lost.
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            break;
                        }
                    }
                }
            }
        }
    }

    async fn open_watch(&self, bucket: &str) -> Result<kv::Watch, crate::Error> {
        let op = || format!("watch bucket {bucket}");
        let kv = self
            .jetstream()
            .get_key_value(bucket)
            .await
            .map_err(|e| crate::Error::kv(op(), e))?;
        kv.watch_with_history(">")
            .await
            .map_err(|e| crate::Error::kv(op(), e))
    }
}
