//! A chat's log: append with optimistic concurrency, read back, follow live.

use std::time::Instant;

use async_nats::jetstream::{self, consumer};
use async_nats::{HeaderMap, HeaderValue};
use futures::{Stream, StreamExt};
use mozaiks_events::{CommandEnvelope, Envelope, codec};

use crate::{Bus, Error, metrics as m};

/// Header naming the codec of a message's payload.
pub const CODEC_HEADER: &str = "Mz-Codec";

/// Where a chat's log ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChatPosition {
    /// The last per-chat `seq` (0 for a chat with no events).
    pub seq: u64,
    /// The stream sequence of that event (0 for none); the next append expects it.
    pub stream_seq: u64,
}

/// An event that reached the log.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Appended {
    pub stream_seq: u64,
}

/// Builds message headers without panicking: `HeaderMap::insert` with a `&str` or `String`
/// asserts that the value holds no CR or LF (they would end the header line), so a value that
/// may come from a client (a `client_msg_id` in a `Nats-Msg-Id`) is parsed fallibly and refused
/// as an invalid id ([`mozaiks_events::Error::InvalidId`] naming the header).
pub(crate) fn headers(pairs: &[(&'static str, &str)]) -> Result<HeaderMap, Error> {
    let mut headers = HeaderMap::new();
    for &(name, value) in pairs {
        let value = value.parse::<HeaderValue>().map_err(|_| {
            Error::Codec(mozaiks_events::Error::InvalidId {
                what: name,
                reason: "a header value must not contain CR or LF".into(),
            })
        })?;
        headers.insert(name, value);
    }
    Ok(headers)
}

impl Bus {
    /// Appends one event to its chat's log, only if the chat's last event is still at
    /// `expected_stream_seq` (0: the chat has no events). [`Error::Conflict`] means another writer
    /// got there first: reload the chat and decide again.
    pub async fn append(
        &self,
        env: &Envelope,
        expected_stream_seq: u64,
    ) -> Result<Appended, Error> {
        let started = Instant::now();
        let subject = self
            .subjects()
            .event(&env.app_id, &env.chat_id, env.event.type_name());
        let payload = codec::encode_event(env)?;
        let headers = headers(&[
            ("Nats-Msg-Id", &env.event_id.to_string()),
            (
                "Nats-Expected-Last-Subject-Sequence",
                &expected_stream_seq.to_string(),
            ),
            (
                "Nats-Expected-Last-Subject-Sequence-Subject",
                &self.subjects().chat_events(&env.app_id, &env.chat_id),
            ),
            (CODEC_HEADER, codec::CODEC),
        ])?;
        let ack = self
            .jetstream()
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| Error::jetstream("append", e))?
            .await;
        match ack {
            Ok(ack) => {
                metrics::counter!(m::APPENDS).increment(1);
                metrics::histogram!(m::APPEND_SECONDS).record(started.elapsed().as_secs_f64());
                Ok(Appended {
                    stream_seq: ack.sequence,
                })
            }
            Err(e) if crate::wrong_last_sequence(&e) => {
                metrics::counter!(m::APPEND_CONFLICTS).increment(1);
                Err(Error::Conflict {
                    chat_id: env.chat_id.clone(),
                })
            }
            Err(e) => Err(Error::jetstream("append", e)),
        }
    }

    /// Sends a command to a chat's owner. `msg_id` deduplicates within the stream's window (for
    /// example `chat_id:client_msg_id`); without it the command id is used.
    pub async fn send_command(
        &self,
        cmd: &CommandEnvelope,
        msg_id: Option<&str>,
    ) -> Result<(), Error> {
        let subject = self.subjects().command(&cmd.app_id, &cmd.chat_id);
        let id = msg_id
            .map(str::to_string)
            .unwrap_or_else(|| cmd.command_id.to_string());
        // `msg_id` may carry a client's id: a bad one is an error here, never a panic.
        let headers = headers(&[("Nats-Msg-Id", &id), (CODEC_HEADER, codec::CODEC)])?;
        self.jetstream()
            .publish_with_headers(subject, headers, codec::encode_command(cmd)?.into())
            .await
            .map_err(|e| Error::jetstream("send a command", e))?
            .await
            .map_err(|e| Error::jetstream("send a command", e))?;
        metrics::counter!(m::COMMANDS_SENT).increment(1);
        Ok(())
    }

    /// The end of a chat's log.
    pub async fn chat_position(&self, app_id: &str, chat_id: &str) -> Result<ChatPosition, Error> {
        Ok(self
            .last_event(app_id, chat_id)
            .await?
            .map(|(env, stream_seq)| ChatPosition {
                seq: env.seq,
                stream_seq,
            })
            .unwrap_or_default())
    }

    /// A chat's last event and its stream sequence, or `None` for a chat that does not exist.
    pub async fn last_event(
        &self,
        app_id: &str,
        chat_id: &str,
    ) -> Result<Option<(Envelope, u64)>, Error> {
        let stream = self.stream("MZ_EVT").await?;
        match stream
            .get_last_raw_message_by_subject(&self.subjects().chat_events(app_id, chat_id))
            .await
        {
            Ok(msg) => Ok(Some((codec::decode_event(&msg.payload)?, msg.sequence))),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(Error::jetstream("a chat's last event", e)),
        }
    }

    /// Every event of a chat with `seq > after`, in order, each with its stream sequence, up to
    /// the chat's end at the call (see [`Bus::replay_chat`] for how it is read).
    pub async fn read_chat(
        &self,
        app_id: &str,
        chat_id: &str,
        after: u64,
    ) -> Result<Vec<(Envelope, u64)>, Error> {
        let end = self.chat_position(app_id, chat_id).await?;
        if end.seq <= after {
            return Ok(Vec::new());
        }
        let from = if after == 0 {
            1
        } else {
            self.seek_chat(app_id, chat_id, after, end)
                .await?
                .from_stream_seq
        };
        let mut events = self
            .replay_chat(app_id, chat_id, from, end.stream_seq, end.seq - after)
            .await?;
        let mut out = Vec::with_capacity((end.seq - after) as usize);
        while let Some(item) = events.next().await {
            let (env, stream_seq) = item?;
            if env.seq > after {
                out.push((env, stream_seq));
            }
        }
        Ok(out)
    }

    /// The chat's events stored after stream sequence `after_stream_seq`, in order (batched direct
    /// gets from the stream leader, no consumer). For catching up a chat whose state is known up
    /// to `after_stream_seq`, e.g. after an append was refused as a conflict.
    pub async fn read_chat_since(
        &self,
        app_id: &str,
        chat_id: &str,
        after_stream_seq: u64,
    ) -> Result<Vec<(Envelope, u64)>, Error> {
        self.read_chat_range(app_id, chat_id, after_stream_seq + 1, u64::MAX, usize::MAX)
            .await
    }

    /// A chat's events from stream sequence `from_stream_seq` (0: from its first event), then live,
    /// in order, without gaps (an ordered consumer, recreated by the client on a gap).
    pub async fn follow_chat(
        &self,
        app_id: &str,
        chat_id: &str,
        from_stream_seq: u64,
    ) -> Result<impl Stream<Item = Result<(Envelope, u64), Error>> + use<>, Error> {
        let stream = self.stream("MZ_EVT").await?;
        let deliver_policy = if from_stream_seq == 0 {
            consumer::DeliverPolicy::All
        } else {
            consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from_stream_seq,
            }
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: self.subjects().chat_events(app_id, chat_id),
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| Error::jetstream("read a chat's log", e))?;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| Error::jetstream("read a chat's log", e))?;
        Ok(messages.map(|m| {
            let m = m.map_err(|e| Error::jetstream("read a chat's log", e))?;
            let stream_seq = m
                .info()
                .map_err(|e| Error::Malformed {
                    op: "read a chat's log".into(),
                    what: e.to_string(),
                })?
                .stream_sequence;
            let env = codec::decode_event(&m.payload)?;
            Ok((env, stream_seq))
        }))
    }
}

/// Where a catch-up of a chat after some `seq` starts (see [`Bus::seek_chat`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seek {
    /// The oldest per-chat `seq` still in the log (0: the chat has no events). Greater than
    /// `after + 1` means events the client has not seen are gone (retention or purge).
    pub first_seq: u64,
    /// The stream sequence of the first event with `seq > after` that is still in the log (0: none).
    pub from_stream_seq: u64,
    /// Direct gets it took to find it (for metrics and the benchmarks).
    pub probes: u32,
}

impl Bus {
    /// Finds where a chat's events after `after` start in the stream, without reading the
    /// events before them: a binary search over stream sequences with direct gets
    /// (`next_by_subj`), O(log n) round trips however long the chat is. `head` is the chat's
    /// current end ([`Bus::chat_position`]).
    pub async fn seek_chat(
        &self,
        app_id: &str,
        chat_id: &str,
        after: u64,
        head: ChatPosition,
    ) -> Result<Seek, Error> {
        if head.seq == 0 {
            return Ok(Seek::default());
        }
        let stream = self.stream("MZ_EVT").await?;
        let subject = self.subjects().chat_events(app_id, chat_id);
        let mut probes = 0u32;
        let mut next = async |from: u64| -> Result<Option<(u64, u64)>, Error> {
            probes += 1;
            match stream
                .direct_get_next_for_subject(subject.as_str(), Some(from))
                .await
            {
                Ok(m) => Ok(Some((codec::decode_event(&m.payload)?.seq, m.sequence))),
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::jetstream("seek a chat's log", e)),
            }
        };
        let Some((first_seq, first_ss)) = next(1).await? else {
            return Ok(Seek::default());
        };
        let mut seek = Seek {
            first_seq,
            from_stream_seq: 0,
            probes: 0,
        };
        if first_seq > after {
            seek.from_stream_seq = first_ss;
        } else if after < head.seq {
            // Invariant: the chat's event at or after `lo` has seq <= after, the one at `hi` > after.
            let (mut lo, mut hi) = (first_ss, head.stream_seq);
            while hi - lo > 1 {
                let mid = lo + (hi - lo) / 2;
                match next(mid).await? {
                    // `ss` is in [mid, hi): a real position with seq <= after.
                    Some((seq, ss)) if seq <= after => lo = ss,
                    Some(_) => hi = mid,
                    None => break,
                }
            }
            // `hi` is a stream position whose next chat event is the first one after `after`.
            seek.from_stream_seq = match next(hi).await? {
                Some((_, ss)) => ss,
                None => head.stream_seq,
            };
        }
        seek.probes = probes;
        Ok(seek)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_values_with_cr_or_lf_are_errors_not_panics() {
        let h = headers(&[("Nats-Msg-Id", "msg:a:c:m1"), (CODEC_HEADER, codec::CODEC)]).unwrap();
        assert_eq!(h.get("Nats-Msg-Id").unwrap().as_str(), "msg:a:c:m1");
        for bad in ["a\nb", "a\rb", "a\r\nNats-Expected-Stream: x"] {
            let e = headers(&[(CODEC_HEADER, codec::CODEC), ("Nats-Msg-Id", bad)]).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::Codec(mozaiks_events::Error::InvalidId {
                        what: "Nats-Msg-Id",
                        ..
                    })
                ),
                "{bad:?}: {e}"
            );
        }
    }
}
