//! Replaying a slice of a stream: every message of a subject filter from a stream sequence up to
//! the stream's end at the time of the call (for rebuilding read models from the log).

use std::time::Duration;

use async_nats::jetstream::consumer;
use futures::StreamExt;
use mozaiks_events::{Envelope, codec};
use tracing::warn;

use crate::{Bus, Error};

/// One batch of a replay.
#[derive(Debug, Default)]
pub struct ReplayBatch {
    pub events: Vec<Envelope>,
    /// The stream sequence of each event of `events`.
    pub seqs: Vec<u64>,
    /// The stream sequence the next batch starts from.
    pub next: u64,
    /// Whether the replay reached the end it saw when the batch was read.
    pub done: bool,
}

impl Bus {
    /// Up to `max` events of stream `base` (`"MZ_EVT"`, `"MZ_USAGE"`) on subjects matching
    /// `filter` (with this namespace's prefix, e.g. `mz.evt.acme.>`), from stream sequence `from`
    /// (≥ 1) up to the stream's last sequence at the call. Messages that do not decode are
    /// skipped with a warning (the projector skips them too). Call again from `next` until `done`.
    pub async fn replay(
        &self,
        base: &str,
        filter: &str,
        from: u64,
        max: usize,
    ) -> Result<ReplayBatch, Error> {
        let from = from.max(1);
        let mut stream = self.stream(base).await?;
        let op = || format!("replay of {filter}");
        let end = stream
            .info()
            .await
            .map_err(|e| Error::jetstream(op(), e))?
            .state
            .last_sequence;
        let mut out = ReplayBatch {
            events: Vec::new(),
            seqs: Vec::new(),
            next: from,
            done: true,
        };
        if end < from {
            return Ok(out);
        }
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects().apply(filter),
                deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: from,
                },
                ..Default::default()
            })
            .await
            .map_err(|e| Error::jetstream(op(), e))?;
        if consumer
            .info()
            .await
            .map_err(|e| Error::jetstream(op(), e))?
            .num_pending
            == 0
        {
            out.next = end + 1;
            return Ok(out);
        }
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| Error::jetstream(op(), e))?;
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
                .await
                .map_err(|_| Error::TimedOut { op: op() })?
                .ok_or_else(|| Error::Ended { op: op() })?
                .map_err(|e| Error::jetstream(op(), e))?;
            let info = msg.info().map_err(|e| Error::Malformed {
                op: op(),
                what: e.to_string(),
            })?;
            let (seq, pending) = (info.stream_sequence, info.pending);
            match codec::decode_event(&msg.payload) {
                Ok(env) => {
                    out.events.push(env);
                    out.seqs.push(seq);
                }
                Err(e) => {
                    warn!(subject = %msg.subject, seq, error = %e, "Replay skips a message that does not decode.")
                }
            }
            out.next = seq + 1;
            if seq >= end || pending == 0 {
                out.next = out.next.max(end + 1);
                return Ok(out);
            }
            if out.events.len() >= max {
                out.done = false;
                return Ok(out);
            }
        }
    }
}
