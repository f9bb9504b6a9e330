//! Appending the events a step produces together: one NATS atomic batch (ADR-50, nats-server
//! 2.12+, `allow_atomic` on `MZ_EVT`), so one acknowledgement (and, with `sync_interval: always`,
//! one flush) covers them instead of one per event.
//!
//! The batch's messages go out back to back on the connection (core publishes with
//! `Nats-Batch-Id` / `Nats-Batch-Sequence`, no reply), the last one with `Nats-Batch-Commit: 1`
//! as a request whose answer is the batch's publish acknowledgement. The server stores all of
//! them or none, in order and contiguously, and checks the first message's
//! `Nats-Expected-Last-Subject-Sequence` (against the chat's events) when it commits the batch
//! under the stream's lock: the same optimistic guard as [`Bus::append`], so a chat's appends stay
//! ordered and exclusive. A conflict is [`Error::Conflict`] and nothing was stored.
//!
//! Atomic batches do not take `Nats-Msg-Id` (the server refuses it), so a batch's events carry
//! no deduplication id: the expected-last-subject-sequence guard is what refuses a repeat (the
//! chat's last event moved).
//!
//! **Not used by the worker, measured too dear.** On nats-server 2.15.1 a batch to a *file*
//! stream (as `MZ_EVT` is) costs far more than the acknowledgements it saves: four events as one
//! batch took 13–33 ms and ≈ 2.5 ms of server CPU, against 0.3–0.4 ms and ≈ 0.2 ms for four
//! acknowledged publishes (the server stages each file-stream batch on disk before committing
//! it); on a memory stream the batch is the cheaper (0.39 ms against 0.83 ms). The worker's A/B
//! run through the public API agreed (benches/README.md, issue 16). Kept, tested, for a server
//! on which file-stream batches are cheap: switching the worker's `Owned::append` to it is one
//! call.
//!
//! When the server refuses the batch itself (atomic publish disabled on the stream, too many
//! batches in flight on it, any error answer other than a conflict), nothing was stored and the
//! events are appended one at a time instead ([`Bus::append`]), counted in
//! `mozaiks_bus_append_batch_fallbacks_total`.

use std::time::Instant;

use async_nats::jetstream::{self, response::Response};
use bytes::Bytes;
use mozaiks_events::{Envelope, codec};
use serde::Deserialize;
use tracing::warn;

use crate::log::{CODEC_HEADER, headers};
use crate::{Appended, Bus, Error, metrics as m};

/// The most events one batch carries (the server's limit is 1000 messages per batch); a longer
/// list goes as several batches in order, each guarded by the previous one's end.
pub const MAX_BATCH_EVENTS: usize = 256;

/// The operation, in errors.
const OP: &str = "append a step's events (atomic batch)";

/// The commit's acknowledgement (a `PubAck` with ADR-50's batch fields).
#[derive(Debug, Deserialize)]
struct BatchAck {
    #[serde(rename = "seq")]
    sequence: u64,
    #[serde(default)]
    batch: Option<String>,
    #[serde(default)]
    count: Option<u64>,
}

/// What one batch came to.
enum Outcome {
    Stored(Appended),
    /// The server refused the batch as a whole (nothing stored): append one at a time.
    Refused(String),
}

impl Bus {
    /// Appends `envs`, events of one chat in order, only if the chat's last event is still at
    /// `expected_stream_seq` (0: none), as one atomic batch (see the module docs). Returns the
    /// stream sequence of the last one. One event is a plain [`Bus::append`].
    pub async fn append_all(
        &self,
        envs: &[Envelope],
        expected_stream_seq: u64,
    ) -> Result<Appended, Error> {
        let mut last = Appended {
            stream_seq: expected_stream_seq,
        };
        for chunk in envs.chunks(MAX_BATCH_EVENTS) {
            last = match chunk {
                [one] => self.append(one, last.stream_seq).await?,
                _ => match self.append_batch(chunk, last.stream_seq).await? {
                    Outcome::Stored(a) => a,
                    Outcome::Refused(reason) => {
                        metrics::counter!(m::APPEND_BATCH_FALLBACKS).increment(1);
                        warn!(
                            events = chunk.len(),
                            reason, "The server refused an atomic batch; appending one at a time."
                        );
                        let mut a = last;
                        for env in chunk {
                            a = self.append(env, a.stream_seq).await?;
                        }
                        a
                    }
                },
            };
        }
        Ok(last)
    }

    /// One atomic batch of two or more events of one chat.
    async fn append_batch(
        &self,
        envs: &[Envelope],
        expected_stream_seq: u64,
    ) -> Result<Outcome, Error> {
        let started = Instant::now();
        let first = &envs[0];
        if envs
            .iter()
            .any(|e| e.app_id != first.app_id || e.chat_id != first.chat_id)
        {
            return Err(Error::Malformed {
                op: OP.into(),
                what: "an atomic append holds the events of one chat".into(),
            });
        }
        let chat_subject = self.subjects().chat_events(&first.app_id, &first.chat_id);
        let batch_id = uuid::Uuid::now_v7().simple().to_string();
        let expected = expected_stream_seq.to_string();
        let n = envs.len();
        let mut reply = None;
        for (i, env) in envs.iter().enumerate() {
            let subject = self
                .subjects()
                .event(&env.app_id, &env.chat_id, env.event.type_name());
            let payload = Bytes::from(codec::encode_event(env)?);
            let seq = (i + 1).to_string();
            let mut pairs: Vec<(&'static str, &str)> = vec![
                ("Nats-Batch-Id", &batch_id),
                ("Nats-Batch-Sequence", &seq),
                (CODEC_HEADER, codec::CODEC),
            ];
            if i == 0 {
                pairs.push(("Nats-Expected-Last-Subject-Sequence", &expected));
                pairs.push(("Nats-Expected-Last-Subject-Sequence-Subject", &chat_subject));
            }
            if i + 1 < n {
                // On the same connection as the commit, so the server has it first.
                self.client()
                    .publish_with_headers(subject, headers(&pairs)?, payload)
                    .await
                    .map_err(|e| Error::nats(OP, e))?;
            } else {
                pairs.push(("Nats-Batch-Commit", "1"));
                reply = Some(
                    self.client()
                        .request_with_headers(subject, headers(&pairs)?, payload)
                        .await
                        .map_err(|e| Error::nats(OP, e))?,
                );
            }
        }
        let malformed = |what: String| Error::Malformed {
            op: OP.into(),
            what,
        };
        let reply = reply.ok_or_else(|| malformed("an empty batch".into()))?;
        let ack: Response<BatchAck> = serde_json::from_slice(&reply.payload)
            .map_err(|e| malformed(format!("the acknowledgement does not decode: {e}")))?;
        match ack {
            Response::Ok(ack) => {
                if ack.batch.as_deref() != Some(batch_id.as_str()) || ack.count != Some(n as u64) {
                    return Err(malformed(format!(
                        "acknowledged as batch {:?} of {:?} events, sent as {batch_id} of {n}",
                        ack.batch, ack.count
                    )));
                }
                metrics::counter!(m::APPENDS).increment(n as u64);
                metrics::counter!(m::APPEND_BATCHES).increment(1);
                metrics::histogram!(m::APPEND_SECONDS).record(started.elapsed().as_secs_f64());
                Ok(Outcome::Stored(Appended {
                    stream_seq: ack.sequence,
                }))
            }
            Response::Err { error } if is_conflict(&error) => {
                metrics::counter!(m::APPEND_CONFLICTS).increment(1);
                Err(Error::Conflict {
                    chat_id: first.chat_id.clone(),
                })
            }
            Response::Err { error } => Ok(Outcome::Refused(error.to_string())),
        }
    }
}

fn is_conflict(e: &jetstream::Error) -> bool {
    e.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE
        || e.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
}
