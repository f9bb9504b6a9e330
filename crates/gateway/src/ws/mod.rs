//! `WS /ws/{workflow}/{app_id}/{chat_id}/{user_id}?token=T&after=N&epoch=E`
//!
//! **Resume.** On connect the gateway joins the chat's shared live feed ([`crate::hub`]) first,
//! then reads the chat's head, finds where `seq > after` starts in the stream with a few direct
//! gets ([`mozaiks_bus::Bus::seek_chat`]) and replays up to the head from JetStream, paced by the
//! socket. Live events that arrive meanwhile wait in the feed; afterwards each live event is sent
//! only if its seq is the next one (older ones are duplicates of the replay and dropped; a jump
//! past the next seq refetches the gap from JetStream), so the switch from replay to live has no
//! gap, no duplicate and keeps order while events keep arriving. `after` beyond the head gets an
//! `after_beyond_head` error frame; events after `after` already gone from the log (retention,
//! purge) get a `resync` frame (`reason: "log_truncated"`, `first_seq`) — reload the transcript
//! from the read model — and then whatever the log still holds.
//!
//! **Backpressure.** Live frames go through a bounded per-socket queue; a client that lets it fill
//! is closed with 1013 and resumes with `after`. The replay waits for the socket instead.
//!
//! **Token deltas.** Once live (never during the replay), a socket also gets the chat's
//! `agent.delta` frames (`"seq": null`), before the step's `agent.message`; when its queue is
//! backed up they are merged, or dropped, never queued past a backlog and never a reason to close
//! ([`deltas`]). A lagging live feed, or a NATS reconnect ([`crate::hub`]), makes the socket
//! catch up from the log at once rather than when the chat's next event shows the gap.
//!
//! Close codes: 1000 idle (no frame or pong within the idle timeout), 1008 token expired or too
//! many frames per second, 1009 frame too large, 1011 an internal error (reconnect with `after`),
//! 1012 server restarting (reconnect elsewhere with `after`), 1013 slow consumer or log
//! unavailable (reconnect with `after`).
//!
//! **Teardown.** A connection's tasks (reader, writer, pump) end together on every exit path, a
//! panic included, and its gauge and slots are released by guards ([`tasks`]).
//!
//! **Layout.** [`admission`]: the upgrade (token, scope, origin) and the socket limits;
//! [`connection`]: one socket's tasks (reader, writer, pump), its frame rate and close codes;
//! [`stream`]: a chat's replay stitched to its live feed, shared with the AG-UI stream;
//! [`commands`]: the client's frames turned into commands; [`deltas`], [`tasks`] as above.

use axum::extract::ws::Utf8Bytes;
use mozaiks_events::Frame;
use tokio::sync::mpsc;

mod admission;
mod commands;
mod connection;
mod deltas;
mod stream;
mod tasks;

pub(crate) use admission::admit;
pub use admission::{WsQuery, upgrade};
pub(crate) use stream::{Stop, stream_chat};

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_TRY_AGAIN: u16 = 1013;

fn send(tx: &mpsc::Sender<Utf8Bytes>, frame: &Frame) -> bool {
    tx.try_send(Utf8Bytes::from(frame.to_json())).is_ok()
}
