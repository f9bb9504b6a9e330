//! What the worker needs of `MZ_CMD` beyond pulling: the order of a chat's commands, and the
//! dead-letter stream.
//!
//! `MZ_CMD` is a work queue: it holds exactly the commands not yet acknowledged, in the order the
//! gateways (and workers) published them. So "is an earlier command of this chat still to be
//! applied?" is a question the stream answers: the first message on the chat's subject at or
//! after a sequence ([`Bus::pending_command_from`], a get from the stream's leader, so a replica
//! that lags cannot hide one).

use async_nats::HeaderMap;
use async_nats::jetstream::stream::RawMessageErrorKind;
use bytes::Bytes;

use crate::{Bus, Error, metrics as m};

/// Header of a dead letter: why the command can never apply.
pub const DLQ_REASON: &str = "Mz-Dlq-Reason";
/// Header of a dead letter: the command's subject on `MZ_CMD`.
pub const DLQ_SUBJECT: &str = "Mz-Dlq-Subject";
/// Header of a dead letter: the command's stream sequence on `MZ_CMD`.
pub const DLQ_SEQUENCE: &str = "Mz-Dlq-Sequence";

impl Bus {
    /// The stream sequence of the first command of the chat still in `MZ_CMD` at or after
    /// `from` (`None`: none).
    pub async fn pending_command_from(
        &self,
        app_id: &str,
        chat_id: &str,
        from: u64,
    ) -> Result<Option<u64>, Error> {
        let stream = self
            .jetstream()
            .get_stream_no_info(self.subjects().name("MZ_CMD"))
            .await
            .map_err(|e| Error::jetstream("stream MZ_CMD", e))?;
        let subject = self.subjects().command(app_id, chat_id);
        match stream
            .get_first_raw_message_by_subject(&subject, from.max(1))
            .await
        {
            Ok(msg) => Ok(Some(msg.sequence)),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(Error::jetstream("first pending command", e)),
        }
    }

    /// Stores a command that can never apply on `MZ_DLQ` (`mz.dlq.cmd.{app_id}.{chat_id}`, or
    /// `mz.dlq.cmd._._` when the command does not even say its chat), with why.
    pub async fn dead_letter(
        &self,
        app_chat: Option<(&str, &str)>,
        payload: Bytes,
        reason: &str,
        origin: Option<(&str, u64)>,
    ) -> Result<(), Error> {
        let (app, chat) = app_chat.unwrap_or(("_", "_"));
        let subject = self.subjects().dead_letter(app, chat);
        let mut headers = HeaderMap::new();
        // Header values must not hold control characters; the reason is ours, but be safe.
        let clean: String = reason.chars().filter(|c| !c.is_control()).collect();
        headers.insert(DLQ_REASON, clean.as_str());
        if let Some((subject, seq)) = origin {
            let subject: String = subject.chars().filter(|c| !c.is_control()).collect();
            headers.insert(DLQ_SUBJECT, subject.as_str());
            headers.insert(DLQ_SEQUENCE, seq.to_string().as_str());
            // The same command dead-lettered twice (a redelivery) is stored once.
            headers.insert("Nats-Msg-Id", format!("dlq-{seq}").as_str());
        }
        self.jetstream()
            .publish_with_headers(subject, headers, payload)
            .await
            .map_err(|e| Error::jetstream("dead-letter publish", e))?
            .await
            .map_err(|e| Error::jetstream("dead-letter publish", e))?;
        metrics::counter!(m::DEAD_LETTERS).increment(1);
        Ok(())
    }
}

/// The stream sequence and delivery count in a JetStream ack subject
/// (`$JS.ACK.<stream>.<consumer>.<delivered>.<stream_seq>.…`, or with domain and account hash
/// before the stream: ADR-15).
pub fn ack_subject_info(reply: &str) -> Option<(u64, u64)> {
    let rest = reply.strip_prefix("$JS.ACK.")?;
    let tokens: Vec<&str> = rest.split('.').collect();
    let base = match tokens.len() {
        7 => 0,
        n if n >= 9 => 2,
        _ => return None,
    };
    let delivered = tokens.get(base + 2)?.parse().ok()?;
    let stream_seq = tokens.get(base + 3)?.parse().ok()?;
    Some((stream_seq, delivered))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_subjects_of_both_formats() {
        assert_eq!(
            ack_subject_info("$JS.ACK.MZ_CMD.workers.3.42.17.1700000000000000000.0"),
            Some((42, 3))
        );
        assert_eq!(
            ack_subject_info("$JS.ACK.dom.acchash.MZ_CMD.workers.1.7.5.1700000000000000000.2.tok"),
            Some((7, 1))
        );
        assert_eq!(ack_subject_info("_INBOX.abc"), None);
        assert_eq!(ack_subject_info("$JS.ACK.a.b.c"), None);
    }
}
