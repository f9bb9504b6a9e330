//! NATS JetStream access for every role.
//!
//! [`Bus`] wraps one NATS connection with its namespace ([`Subjects`]). It applies the stream,
//! consumer and bucket definitions of `streams/` ([`definitions`]), appends events to a chat's log
//! with optimistic concurrency ([`Bus::append`]), sends commands, and reads a chat's log back.
//! It also holds what the fleet shares about itself ([`fleet`]: the process's instance id, the
//! workers' `MZ_PERF` snapshots and the one liveness rule) and the lease primitive ([`lease`]).

mod append_batch;
mod batch;
pub mod commands;
pub mod definitions;
mod error;
pub mod fleet;
mod follow;
pub mod keeper;
pub mod lease;
mod log;
pub mod metrics;
mod replay;

use std::time::Duration;

use async_nats::jetstream;
pub use batch::{BATCH, ChatEvents, STREAM_ABOVE};
pub use error::{Error, ErrorKind, is_missing_in, kind_of};
pub use keeper::Readiness;
pub use log::{Appended, ChatPosition, Seek};
use mozaiks_events::subjects::Subjects;
pub use replay::ReplayBatch;

/// Whether a publish was refused because its `Nats-Expected-Last-Subject-Sequence` (or
/// `-Sequence`) did not hold: another writer appended first. nats-server answers with error code
/// 10071 (`wrong last sequence: N`), which async-nats maps to
/// [`PublishErrorKind::WrongLastSequence`](jetstream::context::PublishErrorKind), or, from a
/// clustered stream's leader while an earlier write to the subject is still being proposed
/// (2.12 and later), with 10164 (`wrong last sequence`, no number), which async-nats leaves as
/// `Other`. Both are the same conflict.
pub fn wrong_last_sequence(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::WrongLastSequence || wrong_last_sequence_in(e)
}

/// [`wrong_last_sequence`] for any error wrapping a publish's (a KV update's, for example):
/// whether a JetStream error with code 10071 or 10164 is in `e`'s source chain.
pub fn wrong_last_sequence_in(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(e);
    while let Some(err) = next {
        if let Some(js) = err.downcast_ref::<jetstream::Error>()
            && is_wrong_last_sequence(js)
        {
            return true;
        }
        next = err.source();
    }
    false
}

/// Whether a JetStream API error is one of the two "wrong last sequence" codes.
pub(crate) fn is_wrong_last_sequence(e: &jetstream::Error) -> bool {
    e.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
        || e.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
}

/// One NATS connection with its namespace. Cheap to clone.
#[derive(Clone)]
pub struct Bus {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    shared: std::sync::Arc<keeper::Shared>,
}

impl Bus {
    /// Connects to `url` (comma-separated for a cluster); `namespace` prefixes every subject and
    /// stream name (empty for the default install).
    pub async fn connect(url: &str, namespace: &str, name: &str) -> Result<Bus, Error> {
        let client = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .retry_on_initial_connect()
            .max_reconnects(None)
            // A `&str` is one address to async-nats: split the list ourselves.
            .connect(
                url.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .collect::<Vec<&str>>(),
            )
            .await
            .map_err(|e| Error::Connect {
                url: url.to_string(),
                source: e.into(),
            })?;
        // `retry_on_initial_connect` returns at once; wait until the first connect succeeds so that a
        // wrong URL is reported at start rather than by the first request.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() > deadline {
                return Err(Error::Connect {
                    url: url.to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "no answer within 10 s",
                    )
                    .into(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let js = jetstream::new(client.clone());
        Ok(Bus {
            client,
            js,
            subjects: Subjects::new(namespace),
            shared: Default::default(),
        })
    }

    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn subjects(&self) -> &Subjects {
        &self.subjects
    }

    /// Whether the connection is up (for readiness).
    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    /// Round-trips to the server and JetStream (for readiness).
    pub async fn ping(&self) -> Result<(), Error> {
        self.client
            .flush()
            .await
            .map_err(|e| Error::nats("flush", e))?;
        self.js
            .query_account()
            .await
            .map_err(|e| Error::jetstream("query the account", e))?;
        Ok(())
    }

    /// A stream of this namespace by its base name (`"MZ_EVT"`).
    pub async fn stream(&self, base: &str) -> Result<jetstream::stream::Stream, Error> {
        self.js
            .get_stream(self.subjects.name(base))
            .await
            .map_err(|e| Error::jetstream(format!("stream {base}"), e))
    }

    /// A durable pull consumer of this namespace, as defined in `streams/consumers/`.
    pub async fn durable(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<jetstream::consumer::Consumer<jetstream::consumer::pull::Config>, Error> {
        self.stream(stream)
            .await?
            .get_consumer(&self.subjects.name(consumer))
            .await
            .map_err(|e| Error::jetstream(format!("consumer {consumer} of {stream}"), e))
    }

    /// The epoch of the event log: when `MZ_EVT` was created, as RFC 3339. A recreated stream has a
    /// new epoch, so clients holding seqs of the old one are told to resync instead of resuming.
    pub async fn log_epoch(&self) -> Result<String, Error> {
        let mut stream = self.stream("MZ_EVT").await?;
        let info = stream
            .info()
            .await
            .map_err(|e| Error::jetstream("stream MZ_EVT's info", e))?;
        let created = info.created;
        Ok(format!("{}", created.unix_timestamp_nanos()))
    }
}

#[cfg(test)]
mod tests {
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};
    use async_nats::jetstream::kv::{UpdateError, UpdateErrorKind};

    use super::*;

    /// A JetStream API error as nats-server sends it.
    fn api_error(code: u64, description: &str) -> jetstream::Error {
        serde_json::from_value(serde_json::json!({
            "code": 400, "err_code": code, "description": description
        }))
        .expect("a JetStream API error")
    }

    #[test]
    fn both_wrong_last_sequence_codes_are_a_conflict_and_nothing_else_is() {
        // 10071 as async-nats maps it; 10164 (a clustered leader's) as async-nats leaves it.
        let mapped = PublishError::with_source(
            PublishErrorKind::WrongLastSequence,
            api_error(10071, "wrong last sequence: 4"),
        );
        let constant = PublishError::with_source(
            PublishErrorKind::Other,
            api_error(10164, "wrong last sequence"),
        );
        let other = PublishError::with_source(
            PublishErrorKind::Other,
            api_error(10077, "maximum messages per subject exceeded"),
        );
        assert!(wrong_last_sequence(&mapped));
        assert!(wrong_last_sequence(&constant));
        assert!(!wrong_last_sequence(&other));
        assert!(!wrong_last_sequence(&PublishError::new(
            PublishErrorKind::TimedOut
        )));
        // Wrapped once more, as a KV update wraps its publish.
        let update = UpdateError::with_source(UpdateErrorKind::Other, constant);
        assert!(wrong_last_sequence_in(&update));
        let update = UpdateError::with_source(UpdateErrorKind::Other, other);
        assert!(!wrong_last_sequence_in(&update));
    }
}
