//! Getting a command to the worker that owns its chat.
//!
//! Workers share one pull consumer, so a command may reach a worker that does not own its chat.
//! That worker forwards it to the owner over core NATS (request `mz.own.{owner_id}`, the
//! command's bytes as the body, header `Mz-Ack` naming the JetStream message's ack subject). The
//! owner answers `accepted` once the command is in its chat actor's queue, and from then on the
//! owner acknowledges the JetStream message itself: a JetStream ack is a publish to the message's
//! reply subject, which any connection may send. So the command stays unacknowledged (with
//! progress acks) until its events are durable, and if its run continues, until the run
//! settles, exactly as if the owner had pulled it; if the owner dies, JetStream redelivers it and
//! it is taken over like any other. Forwarding costs no delivery attempt (`max_deliver`).
//!
//! `not_owner`: the owner gave the chat up meanwhile (the forwarder claims it again). No answer
//! (no responders, or a timeout): the owner is gone; the forwarder waits for its lease to expire
//! and takes the chat over.

use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use tracing::debug;

use crate::metrics as m;

/// Header naming the forwarded command's ack subject.
pub const ACK_HEADER: &str = "Mz-Ack";
pub const ACCEPTED: &str = "accepted";
pub const NOT_OWNER: &str = "not_owner";
/// How long a forwarder waits for the owner's answer.
const ANSWER_WITHIN: Duration = Duration::from_secs(2);

/// Acknowledges one JetStream message, from whichever worker holds it.
#[derive(Clone, Debug)]
pub struct Acker {
    client: async_nats::Client,
    reply: Option<Subject>,
}

impl Acker {
    pub fn of(client: &async_nats::Client, msg: &jetstream::Message) -> Acker {
        Acker {
            client: client.clone(),
            reply: msg.reply.clone(),
        }
    }

    pub fn remote(client: &async_nats::Client, reply: &str) -> Acker {
        Acker {
            client: client.clone(),
            reply: Some(Subject::from(reply)),
        }
    }

    /// The ack subject (for forwarding).
    pub fn subject(&self) -> Option<&str> {
        self.reply.as_deref()
    }

    pub async fn send(&self, kind: AckKind) {
        if let Some(reply) = &self.reply
            && let Err(e) = self.client.publish(reply.clone(), kind.into()).await
        {
            debug!(error = %e, "Cannot send an ack.");
        }
    }

    pub async fn ack(&self) {
        self.send(AckKind::Ack).await
    }
}

/// The subject a worker takes forwarded commands on.
pub fn inbox(bus: &mozaiks_bus::Bus, worker_id: &str) -> String {
    bus.subjects().owner_inbox(worker_id)
}

/// What became of a forwarded command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forwarded {
    /// The owner has it (and acknowledges it from now on).
    Accepted,
    /// The owner does not own the chat any more.
    NotOwner,
    /// Nobody answered: the owner is gone (or too slow).
    NoAnswer,
}

/// Forwards a command (its encoded bytes and ack) to worker `owner`.
pub async fn forward(
    bus: &mozaiks_bus::Bus,
    owner: &str,
    payload: &Bytes,
    ack: &Acker,
) -> Forwarded {
    let mut headers = HeaderMap::new();
    if let Some(s) = ack.subject() {
        headers.insert(ACK_HEADER, s);
    }
    let request = async_nats::Request::new()
        .payload(payload.clone())
        .headers(headers)
        .timeout(Some(ANSWER_WITHIN));
    let outcome = match bus.client().send_request(inbox(bus, owner), request).await {
        Ok(answer) if answer.payload.as_ref() == ACCEPTED.as_bytes() => Forwarded::Accepted,
        Ok(_) => Forwarded::NotOwner,
        Err(e) => {
            debug!(owner, error = %e, "The chat's owner did not answer.");
            Forwarded::NoAnswer
        }
    };
    let label = match outcome {
        Forwarded::Accepted => "accepted",
        Forwarded::NotOwner => "not_owner",
        Forwarded::NoAnswer => "no_answer",
    };
    metrics::counter!(m::FORWARDED, "outcome" => label).increment(1);
    outcome
}
