//! Token deltas while a model streams its answer.
//!
//! A model call gets an optional [`Sink`]; the provider pushes each piece of content into it in
//! order (the OpenAI client per SSE content delta, the offline model in a few chunks). The
//! worker drains the sink with [`publish`]: pieces are batched for a moment (up to
//! [`FLUSH_EVERY`] or [`FLUSH_BYTES`]) and published on core NATS under the chat's live subject
//! (`mz.live.{app_id}.{chat_id}.delta`, where the gateways' one subscription per chat gets them)
//! and on their first subject (`mz.dlt.{app_id}.{chat_id}`, for consumers outside the runtime),
//! never in JetStream. They are ephemeral: the step's durable `agent.message` carries the
//! whole text, and a delta that cannot be published is dropped, never failing the run.

use std::time::Duration;

use chrono::Utc;
use mozaiks_bus::Bus;
use mozaiks_events::{AgentDelta, DeltaMessage, ENVELOPE_VERSION, frame_limits::MAX_DELTA_BYTES};
use tokio::sync::mpsc;
use tracing::debug;
use uuid::Uuid;

use crate::metrics as m;

/// Pieces are held at most this long before they are published.
pub const FLUSH_EVERY: Duration = Duration::from_millis(30);
/// Pieces are published at once when this many bytes are waiting.
pub const FLUSH_BYTES: usize = 2048;
/// One publish may wait this long for the connection (e.g. while NATS reconnects).
const PUBLISH_TIMEOUT: Duration = Duration::from_millis(500);

/// What a provider pushes.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// The next piece of text.
    Text(String),
    /// The call starts over (a retried attempt): later text is at offset 0 again.
    Restart,
}

/// Where a model call's streamed text goes. Cheap to clone; pushing never blocks or fails.
#[derive(Clone, Debug)]
pub struct Sink(mpsc::UnboundedSender<Piece>);

impl Sink {
    /// A sink and the receiver [`publish`] drains.
    pub fn channel() -> (Sink, mpsc::UnboundedReceiver<Piece>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (Sink(tx), rx)
    }

    /// The next piece of the answer's text (empty pieces are ignored).
    pub fn text(&self, piece: &str) {
        if !piece.is_empty() {
            let _ = self.0.send(Piece::Text(piece.to_string()));
        }
    }

    /// The call restarts (another attempt after an error).
    pub fn restart(&self) {
        let _ = self.0.send(Piece::Restart);
    }
}

/// Which message the deltas belong to.
#[derive(Clone, Debug)]
pub struct Target {
    pub app_id: String,
    pub chat_id: String,
    pub run_id: Uuid,
    pub step: u32,
    pub round: u32,
    pub agent: String,
}

/// Publishes what arrives on `rx` until every [`Sink`] is dropped, then flushes the rest.
pub async fn publish(bus: Bus, target: Target, mut rx: mpsc::UnboundedReceiver<Piece>) {
    let subjects = [
        bus.subjects().deltas(&target.app_id, &target.chat_id),
        bus.subjects()
            .legacy_deltas(&target.app_id, &target.chat_id),
    ];
    let mut offset: u64 = 0;
    let mut pending = String::new();
    let mut due = tokio::time::Instant::now();
    loop {
        let piece = tokio::select! {
            p = rx.recv() => p,
            _ = tokio::time::sleep_until(due), if !pending.is_empty() => {
                send(&bus, &subjects, &target, &mut offset, &mut pending).await;
                continue;
            }
        };
        match piece {
            Some(Piece::Text(t)) => {
                if pending.is_empty() {
                    due = tokio::time::Instant::now() + FLUSH_EVERY;
                }
                pending.push_str(&t);
                if pending.len() >= FLUSH_BYTES {
                    send(&bus, &subjects, &target, &mut offset, &mut pending).await;
                }
            }
            Some(Piece::Restart) => {
                send(&bus, &subjects, &target, &mut offset, &mut pending).await;
                offset = 0;
            }
            None => {
                send(&bus, &subjects, &target, &mut offset, &mut pending).await;
                return;
            }
        }
    }
}

/// Publishes `pending` (split at char boundaries to fit [`MAX_DELTA_BYTES`]) and advances
/// `offset`. A failure is counted and forgotten.
async fn send(
    bus: &Bus,
    subjects: &[String; 2],
    target: &Target,
    offset: &mut u64,
    pending: &mut String,
) {
    let mut rest = std::mem::take(pending);
    while !rest.is_empty() {
        let mut cut = rest.len().min(MAX_DELTA_BYTES);
        while !rest.is_char_boundary(cut) {
            cut -= 1;
        }
        let tail = rest.split_off(cut);
        let text = std::mem::replace(&mut rest, tail);
        let len = text.len() as u64;
        let msg = DeltaMessage {
            v: ENVELOPE_VERSION,
            id: Uuid::now_v7(),
            app_id: target.app_id.clone(),
            chat_id: target.chat_id.clone(),
            ts: Utc::now(),
            delta: AgentDelta {
                run_id: Some(target.run_id),
                step: target.step,
                round: target.round,
                agent: target.agent.clone(),
                offset: *offset,
                text,
            },
        };
        *offset += len;
        let outcome = match msg.encode() {
            Ok(payload) => {
                let payload = bytes::Bytes::from(payload);
                let publish = async {
                    for subject in subjects {
                        bus.client()
                            .publish(subject.clone(), payload.clone())
                            .await?;
                    }
                    Ok::<_, async_nats::PublishError>(())
                };
                match tokio::time::timeout(PUBLISH_TIMEOUT, publish).await {
                    Ok(Ok(())) => "ok",
                    Ok(Err(e)) => {
                        debug!(error = %e, "Cannot publish a delta; dropped.");
                        "error"
                    }
                    Err(_) => {
                        debug!("Publishing a delta timed out; dropped.");
                        "error"
                    }
                }
            }
            Err(e) => {
                debug!(error = %e, "Cannot encode a delta; dropped.");
                "error"
            }
        };
        metrics::counter!(m::DELTAS_PUBLISHED, "outcome" => outcome).increment(1);
    }
}

/// Splits `text` into about `parts` pieces at char boundaries (the offline model's "stream").
pub fn chunks(text: &str, parts: usize) -> Vec<&str> {
    let size = text.len().div_ceil(parts.max(1)).max(1);
    let mut out = Vec::new();
    let mut start = 0;
    while start < text.len() {
        let mut end = (start + size).min(text.len());
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(&text[start..end]);
        start = end;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_the_text_at_char_boundaries() {
        for text in ["", "a", "hello world, this is a reply", "héllo wörld ✓✓✓"] {
            for parts in [1, 3, 4, 100] {
                let c = chunks(text, parts);
                assert_eq!(c.concat(), text);
                assert!(c.len() <= parts.max(1));
                assert!(c.iter().all(|p| !p.is_empty()));
            }
        }
        assert_eq!(chunks("abcdefgh", 4), vec!["ab", "cd", "ef", "gh"]);
    }

    /// Against a real nats-server: a delta goes out under the chat's live subject, where the
    /// gateways' one subscription per chat gets it, and, the same message, on its first subject,
    /// for consumers outside the runtime.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deltas_go_out_under_the_live_subject_and_on_their_first_subject() {
        use futures::StreamExt;
        let servers = mozaiks_testkit::TestServers::start_nats().await.unwrap();
        let bus = Bus::connect(&servers.nats_url, &servers.namespace, "deltas")
            .await
            .unwrap();
        let s = bus.subjects().clone();
        let mut live = bus
            .client()
            .subscribe(s.chat_live("app1", "chat1"))
            .await
            .unwrap();
        let mut first = bus
            .client()
            .subscribe(s.legacy_deltas("app1", "chat1"))
            .await
            .unwrap();
        bus.client().flush().await.unwrap();
        let (sink, rx) = Sink::channel();
        sink.text("hello ");
        sink.text("world");
        drop(sink);
        let target = Target {
            app_id: "app1".into(),
            chat_id: "chat1".into(),
            run_id: Uuid::now_v7(),
            step: 1,
            round: 1,
            agent: "a".into(),
        };
        publish(bus.clone(), target, rx).await;
        let wait = std::time::Duration::from_secs(5);
        let on_live = tokio::time::timeout(wait, live.next())
            .await
            .unwrap()
            .unwrap();
        let on_first = tokio::time::timeout(wait, first.next())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(on_live.subject.as_str(), s.deltas("app1", "chat1"));
        assert_eq!(
            on_live.subject.as_str(),
            s.apply("mz.live.app1.chat1.delta")
        );
        assert_eq!(on_first.subject.as_str(), s.apply("mz.dlt.app1.chat1"));
        assert!(
            on_live.headers.is_none(),
            "no Nats-Sequence: never taken for a stored event"
        );
        assert_eq!(on_live.payload, on_first.payload);
        let dm = DeltaMessage::decode(&on_live.payload).unwrap();
        assert_eq!((dm.app_id.as_str(), dm.chat_id.as_str()), ("app1", "chat1"));
        assert_eq!(
            (dm.delta.offset, dm.delta.text.as_str()),
            (0, "hello world")
        );
    }

    #[test]
    fn the_sink_keeps_order_and_ignores_empty_pieces() {
        let (sink, mut rx) = Sink::channel();
        sink.text("a");
        sink.text("");
        sink.restart();
        sink.text("b");
        drop(sink);
        let mut got = Vec::new();
        while let Ok(p) = rx.try_recv() {
            got.push(p);
        }
        assert_eq!(
            got,
            vec![
                Piece::Text("a".into()),
                Piece::Restart,
                Piece::Text("b".into())
            ]
        );
    }
}
