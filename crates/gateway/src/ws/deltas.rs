//! Token deltas for one socket.
//!
//! While the socket keeps up, each delta goes into its queue as it comes (the frame the hub
//! rendered once for every socket). Once more than [`crate::hub::Tuning::delta_backlog`] frames
//! wait in the queue, deltas are held back and consecutive ones of the same message are merged
//! into one frame, sent when the queue has room again; a held delta that cannot be sent before
//! the next durable event or the next message's delta is dropped. Deltas never fill the queue
//! past the backlog, so they are never the reason a slow socket is closed: durable events are
//! what count, and a step's `agent.message` carries its whole text. Deltas of a message whose
//! `agent.message` the socket already got are stale and dropped.

use axum::extract::ws::Utf8Bytes;
use chrono::{DateTime, Utc};
use mozaiks_events::{AgentDelta, Frame};
use tokio::sync::mpsc;
use uuid::Uuid;

use crate::hub::Delta;
use crate::metrics as m;

/// A merged delta grows at most this large; past it, the next delta supersedes it (the socket's
/// memory stays bounded however long the message).
const MAX_HELD_BYTES: usize = 1024 * 1024;

/// A merged delta waiting for room in the queue.
struct Held {
    id: Uuid,
    ts: DateTime<Utc>,
    delta: AgentDelta,
}

impl Held {
    fn of(d: &Delta) -> Held {
        Held {
            id: d.id,
            ts: d.ts,
            delta: d.delta.clone(),
        }
    }
}

/// One socket's delta state.
pub(super) struct Deltas {
    backlog: usize,
    /// `(run_id, step, round)` of the last `agent.message` sent; `round` is the latest round
    /// seen in deltas of that step (1 when none was seen).
    done: Option<(Uuid, u32, u32)>,
    /// `(run_id, step, round)` of the latest delta seen.
    seen: Option<(Option<Uuid>, u32, u32)>,
    held: Option<Held>,
}

fn dropped(reason: &'static str, n: u64) {
    metrics::counter!(m::DELTAS_DROPPED, "reason" => reason).increment(n);
}

fn same_message(a: &AgentDelta, b: &AgentDelta) -> bool {
    a.run_id == b.run_id && a.step == b.step && a.round == b.round && a.agent == b.agent
}

impl Deltas {
    pub(super) fn new(backlog: usize) -> Deltas {
        Deltas {
            backlog,
            done: None,
            seen: None,
            held: None,
        }
    }

    pub(super) fn holding(&self) -> bool {
        self.held.is_some()
    }

    fn room(&self, tx: &mpsc::Sender<Utf8Bytes>) -> bool {
        tx.max_capacity() - tx.capacity() <= self.backlog
    }

    fn is_stale(&self, d: &AgentDelta) -> bool {
        match self.done {
            Some((run, step, round)) => {
                d.run_id == Some(run) && (d.step < step || (d.step == step && d.round <= round))
            }
            None => false,
        }
    }

    /// Queues `frame` if the queue is within the backlog.
    fn try_queue(&self, tx: &mpsc::Sender<Utf8Bytes>, frame: Utf8Bytes) -> bool {
        if self.room(tx) && tx.try_send(frame).is_ok() {
            metrics::counter!(m::DELTAS_OUT).increment(1);
            true
        } else {
            false
        }
    }

    /// A delta from the chat's feed.
    pub(super) fn on_delta(&mut self, d: &Delta, tx: &mpsc::Sender<Utf8Bytes>) {
        if self.is_stale(&d.delta) {
            dropped("stale", 1);
            return;
        }
        self.seen = Some((d.delta.run_id, d.delta.step, d.delta.round));
        let Some(mut held) = self.held.take() else {
            if !self.try_queue(tx, d.json.clone()) {
                self.held = Some(Held::of(d));
            }
            return;
        };
        let h = &held.delta;
        let end = h.offset + h.text.len() as u64;
        if same_message(h, &d.delta)
            && h.offset <= d.delta.offset
            && d.delta.offset <= end
            && h.text.len() < MAX_HELD_BYTES
        {
            // Contiguous (or overlapping: a retried call rewrites the tail): one frame says both.
            let cut = (d.delta.offset - h.offset) as usize;
            if held.delta.text.is_char_boundary(cut) {
                held.delta.text.truncate(cut);
                held.delta.text.push_str(&d.delta.text);
                held.id = d.id;
                held.ts = d.ts;
                metrics::counter!(m::DELTAS_COALESCED).increment(1);
                self.held = Some(held);
                self.flush(tx);
                return;
            }
        }
        // Another message, a restart before the held text, or a gap: the held frame goes first
        // if there is room; otherwise the newer delta supersedes it.
        let frame = Utf8Bytes::from(Frame::delta(held.id, held.ts, &held.delta).to_json());
        if !self.try_queue(tx, frame) {
            dropped("superseded", 1);
        }
        self.held = Some(Held::of(d));
        self.flush(tx);
    }

    /// The socket fell behind the feed's delta buffer by `n` deltas.
    pub(super) fn lagged(&mut self, n: u64) {
        dropped("lagged", n);
    }

    /// Sends the held (merged) delta if the queue has room again.
    pub(super) fn flush(&mut self, tx: &mpsc::Sender<Utf8Bytes>) {
        let Some(held) = &self.held else { return };
        if !self.room(tx) {
            return;
        }
        let frame = Utf8Bytes::from(Frame::delta(held.id, held.ts, &held.delta).to_json());
        if self.try_queue(tx, frame) {
            self.held = None;
        }
    }

    /// Before a durable event goes into the queue: an `agent.message` (`message` is its
    /// `(run_id, step)`) makes its deltas stale; a held delta goes first or is dropped.
    pub(super) fn before_event(
        &mut self,
        message: Option<(Uuid, u32)>,
        tx: &mpsc::Sender<Utf8Bytes>,
    ) {
        if let Some((run, step)) = message {
            let round = match self.seen {
                Some((Some(r), s, round)) if r == run && s == step => round,
                _ => 1,
            };
            self.done = Some((run, step, round));
        }
        let Some(held) = self.held.take() else {
            return;
        };
        if self.is_stale(&held.delta) {
            dropped("stale", 1);
            return;
        }
        let frame = Utf8Bytes::from(Frame::delta(held.id, held.ts, &held.delta).to_json());
        if !self.try_queue(tx, frame) {
            dropped("queue_full", 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(step: u32, offset: u64, text: &str, run: Uuid) -> Delta {
        let d = AgentDelta {
            run_id: Some(run),
            step,
            round: 1,
            agent: "a".into(),
            offset,
            text: text.into(),
        };
        let id = Uuid::now_v7();
        let ts = Utc::now();
        Delta {
            id,
            ts,
            json: Utf8Bytes::from(Frame::delta(id, ts, &d).to_json()),
            delta: d,
        }
    }

    fn drain(rx: &mut mpsc::Receiver<Utf8Bytes>) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        while let Ok(f) = rx.try_recv() {
            out.push(serde_json::from_str(f.as_str()).unwrap());
        }
        out
    }

    #[test]
    fn a_socket_that_keeps_up_gets_every_delta_as_it_comes() {
        let (tx, mut rx) = mpsc::channel(16);
        let mut s = Deltas::new(4);
        let run = Uuid::now_v7();
        s.on_delta(&delta(1, 0, "ab", run), &tx);
        s.on_delta(&delta(1, 2, "cd", run), &tx);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 2);
        assert!(
            got.iter()
                .all(|f| f["seq"].is_null() && f["type"] == "agent.delta")
        );
        assert_eq!(got[1]["data"]["offset"], 2);
        assert!(!s.holding());
    }

    #[test]
    fn a_backed_up_socket_gets_consecutive_deltas_merged_and_is_never_filled_by_them() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Deltas::new(2);
        let run = Uuid::now_v7();
        // Three frames already wait (events the client has not read).
        for _ in 0..3 {
            tx.try_send(Utf8Bytes::from("{}")).unwrap();
        }
        let mut offset = 0;
        for piece in ["hel", "lo ", "wor", "ld"] {
            s.on_delta(&delta(1, offset, piece, run), &tx);
            offset += piece.len() as u64;
        }
        assert!(s.holding());
        assert_eq!(tx.capacity(), 5, "deltas went into a backed-up queue");
        // The client reads; the merged delta goes out as one frame.
        assert_eq!(drain(&mut rx).len(), 3);
        s.flush(&tx);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["data"]["offset"], 0);
        assert_eq!(got[0]["data"]["text"], "hello world");
        assert!(!s.holding());
    }

    #[test]
    fn deltas_after_their_agent_message_are_dropped() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Deltas::new(4);
        let run = Uuid::now_v7();
        s.on_delta(&delta(1, 0, "ab", run), &tx);
        s.before_event(Some((run, 1)), &tx);
        s.on_delta(&delta(1, 2, "late", run), &tx);
        s.on_delta(&delta(2, 0, "next", run), &tx);
        let got = drain(&mut rx);
        let texts: Vec<&str> = got
            .iter()
            .map(|f| f["data"]["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, vec!["ab", "next"]);
    }

    #[test]
    fn a_held_delta_goes_before_the_next_event_or_is_dropped_when_stale() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Deltas::new(0);
        let run = Uuid::now_v7();
        tx.try_send(Utf8Bytes::from("{}")).unwrap();
        s.on_delta(&delta(1, 0, "ab", run), &tx);
        assert!(s.holding());
        // Its agent.message arrives: the held text is stale.
        s.before_event(Some((run, 1)), &tx);
        assert!(!s.holding());
        assert_eq!(drain(&mut rx).len(), 1);
        // A held delta of another step goes out before an unrelated event when there is room.
        tx.try_send(Utf8Bytes::from("{}")).unwrap();
        s.on_delta(&delta(2, 0, "cd", run), &tx);
        assert!(s.holding());
        drain(&mut rx);
        s.before_event(None, &tx);
        let got = drain(&mut rx);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["data"]["text"], "cd");
    }

    #[test]
    fn a_retried_call_rewrites_the_held_tail() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Deltas::new(0);
        let run = Uuid::now_v7();
        tx.try_send(Utf8Bytes::from("{}")).unwrap();
        s.on_delta(&delta(1, 0, "abc", run), &tx);
        s.on_delta(&delta(1, 1, "XY", run), &tx);
        drain(&mut rx);
        s.flush(&tx);
        let got = drain(&mut rx);
        assert_eq!(got[0]["data"]["text"], "aXY");
        assert_eq!(got[0]["data"]["offset"], 0);
    }
}
