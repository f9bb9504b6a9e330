//! One socket's connection: the reader (this task), the writer and the pump ([`super::stream`]),
//! the frame rate, the token's expiry, the idle timeout, and the close code of each way it ends.

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use mozaiks_auth::RuntimeClaims;
use mozaiks_bus::ErrorKind;
use mozaiks_events::Frame;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, warn};

use super::commands::on_client_frame;
use super::stream::{Stop, stream_chat};
use super::tasks::{Counted, Ended, Tasks};
use super::{
    CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_RESTART, CLOSE_TOO_BIG, CLOSE_TRY_AGAIN, send,
};
use crate::State;
use crate::hub::Admission;
use crate::metrics as m;

/// How long queued frames may take to flush before a close frame.
const FLUSH_BEFORE_CLOSE: Duration = Duration::from_millis(500);

/// Queued frames written to a socket before one flush.
const WRITE_BATCH: u64 = 64;

pub(super) struct Conn {
    pub(super) state: State,
    pub(super) claims: RuntimeClaims,
    pub(super) after: Option<u64>,
    pub(super) epoch: Option<String>,
    pub(super) tx: mpsc::Sender<Utf8Bytes>,
    pub(super) rx: mpsc::Receiver<Utf8Bytes>,
    pub(super) fps: u32,
    pub(super) _admission: Admission,
}

/// Frames per second of one socket: over the limit a frame is dropped (one error frame per
/// second); more than twice the limit in one second closes the socket.
struct Rate {
    max: u32,
    window: Instant,
    count: u32,
}

enum Verdict {
    Pass,
    Drop { warn: bool },
    Close,
}

impl Rate {
    fn hit(&mut self) -> Verdict {
        if self.window.elapsed() >= Duration::from_secs(1) {
            self.window = Instant::now();
            self.count = 0;
        }
        self.count += 1;
        if self.count <= self.max {
            Verdict::Pass
        } else if self.count <= self.max * 2 {
            Verdict::Drop {
                warn: self.count == self.max + 1,
            }
        } else {
            Verdict::Close
        }
    }
}

impl Conn {
    pub(super) async fn run(self, socket: WebSocket) {
        let Conn {
            state,
            claims,
            after,
            epoch,
            tx,
            mut rx,
            fps,
            _admission,
        } = self;
        let app_id = claims.app_id.clone();
        let tuning = state.hub.tuning().clone();
        // Released on drop, a panic included; so are `_admission` and the tasks below.
        let _counted = Counted::new(&app_id);
        info!(after, "Client connected.");
        let (mut sink, mut incoming) = socket.split();
        let (close_tx, mut close_rx) = mpsc::unbounded_channel::<(u16, String)>();

        // Writer: the only task that touches the sink; also pings the client.
        let ping_every = tuning.ping_interval;
        let writer = async move {
            let mut ping =
                tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
            loop {
                tokio::select! {
                    biased;
                    c = close_rx.recv() => {
                        let (code, reason) = c.unwrap_or((CLOSE_NORMAL, String::new()));
                        metrics::counter!(m::WS_CLOSED, "code" => code.to_string()).increment(1);
                        // Frames already queued (an error frame saying why, events) go first,
                        // for at most a moment: a slow client does not hold the close back.
                        let _ = tokio::time::timeout(FLUSH_BEFORE_CLOSE, async {
                            while let Ok(text) = rx.try_recv() {
                                if sink.send(Message::Text(text)).await.is_err() {
                                    break;
                                }
                            }
                        })
                        .await;
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) })))
                            .await;
                        break;
                    }
                    out = rx.recv() => match out {
                        Some(text) => {
                            // Write what is queued behind it too, then flush once: a burst
                            // (a replay, a busy chat) costs a few writes, not one per frame.
                            let mut frames = 1u64;
                            let mut ok = sink.feed(Message::Text(text)).await.is_ok();
                            while ok && frames < WRITE_BATCH {
                                let Ok(text) = rx.try_recv() else { break };
                                ok = sink.feed(Message::Text(text)).await.is_ok();
                                frames += 1;
                            }
                            if !ok || sink.flush().await.is_err() {
                                break;
                            }
                            metrics::counter!(m::FRAMES_OUT).increment(frames);
                        }
                        None => break,
                    },
                    _ = ping.tick() => {
                        if sink.send(Message::Ping(Default::default())).await.is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = sink.close().await;
        };
        let pump = pump(
            state.clone(),
            claims.clone(),
            after,
            epoch,
            tx.clone(),
            close_tx.clone(),
        );
        // Owned by this (the reader's) task: however it ends, they are aborted with it.
        let mut tasks = Tasks::spawn(writer.in_current_span(), pump.in_current_span());

        let expires_in = (claims.exp - Utc::now().timestamp()).max(0) as u64;
        let expiry = tokio::time::sleep(Duration::from_secs(expires_in));
        tokio::pin!(expiry);
        let idle = tokio::time::sleep(tuning.idle_timeout);
        tokio::pin!(idle);
        let mut rate = Rate {
            max: fps,
            window: Instant::now(),
            count: 0,
        };
        let mut shutdown = state.shutdown.clone();
        loop {
            tokio::select! {
                _ = &mut expiry => {
                    let _ = close_tx.send((CLOSE_POLICY, "token expired; get a fresh token and reconnect with after".into()));
                    break;
                }
                _ = &mut idle => {
                    let _ = close_tx.send((CLOSE_NORMAL, format!("idle: nothing received for {} s; reconnect with after", tuning.idle_timeout.as_secs())));
                    break;
                }
                _ = shutdown.changed() => {
                    let _ = close_tx.send((CLOSE_RESTART, "server restarting; reconnect with after".into()));
                    break;
                }
                ended = tasks.ended() => match ended {
                    // The socket cannot be written any more.
                    Ended::Writer | Ended::Panicked { writer: true } => break,
                    // It asked for the close it needed (if any); the writer ends with it.
                    Ended::Pump => {}
                    Ended::Panicked { writer: false } => {
                        let _ = close_tx.send((CLOSE_INTERNAL, "internal error; reconnect with after".into()));
                        break;
                    }
                },
                msg = incoming.next() => {
                    idle.as_mut().reset(tokio::time::Instant::now() + tuning.idle_timeout);
                    let counted = matches!(msg, Some(Ok(Message::Text(_) | Message::Binary(_))));
                    if counted {
                        match rate.hit() {
                            Verdict::Pass => {}
                            Verdict::Drop { warn } => {
                                metrics::counter!(m::RATE_LIMITED, "app_id" => app_id.clone()).increment(1);
                                if warn {
                                    send(&tx, &Frame::error("rate_limited", format!("more than {fps} frames per second; frames are dropped")));
                                }
                                continue;
                            }
                            Verdict::Close => {
                                warn!(fps, "Client exceeds its frame rate; closing.");
                                let _ = close_tx.send((CLOSE_POLICY, format!("more than {} frames per second", fps * 2)));
                                break;
                            }
                        }
                    }
                    match msg {
                        Some(Ok(Message::Text(text))) => {
                            // Boxed: the frame's future (a command publish) exists only while
                            // it runs, so an idle socket's task stays small.
                            Box::pin(on_client_frame(&state, &claims, text.as_str(), &tx)).await;
                        }
                        Some(Ok(Message::Binary(_))) => {
                            metrics::counter!(m::FRAMES_IN, "type" => "binary").increment(1);
                            send(&tx, &Frame::error("bad_frame", "binary frames are not supported; send JSON text"));
                        }
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Ok(_)) => {} // ping/pong: the library answers pings
                        Some(Err(e)) => {
                            debug!(error = %e, "WebSocket read failed.");
                            if is_too_big(e) {
                                let _ = close_tx.send((CLOSE_TOO_BIG, format!("frame larger than {} bytes", state.opts.max_frame_bytes)));
                            }
                            break;
                        }
                    }
                }
            }
        }
        tasks.stop_pump();
        drop(tx);
        // The writer ends on a close request, not on the queue closing (the replica's connection
        // table holds a sender for notifications): ask it to close in every case, so a client that
        // closed first frees its slot at once. A second request after an earlier one is ignored.
        let _ = close_tx.send((CLOSE_NORMAL, String::new()));
        // Give the writer a moment to send a close frame, then read what the client still sends
        // until its close: dropping a socket with unread input resets it, and the client would
        // lose the frames and the close reason in flight.
        let _ = tokio::time::timeout(Duration::from_secs(2), tasks.join()).await;
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            while let Some(Ok(m)) = incoming.next().await {
                if matches!(m, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }
}

/// Whether a read failed on a frame or message over the size limit (close 1009), by the kind of
/// the WebSocket library's error that axum wraps.
fn is_too_big(e: axum::Error) -> bool {
    use tungstenite::error::{Error as WsError, ProtocolError};
    matches!(
        e.into_inner().downcast_ref::<WsError>(),
        Some(WsError::Capacity(_) | WsError::Protocol(ProtocolError::ControlFrameTooBig))
    )
}

/// The close frame of a chat stream stopped by its log, chosen by the failure's kind, never its
/// text: 1013 (try again later) with `reason` for a failure of the moment (NATS down or slow, a
/// stream being re-created); 1011 (the server failed) for one that retrying will not cure (an
/// event that does not decode, a request the server refuses).
fn close_for(kind: ErrorKind, reason: &'static str) -> (u16, String) {
    if kind.is_retryable() {
        (CLOSE_TRY_AGAIN, reason.to_string())
    } else {
        (
            CLOSE_INTERNAL,
            "internal error; reconnect with after".to_string(),
        )
    }
}

async fn pump(
    state: State,
    claims: RuntimeClaims,
    after: Option<u64>,
    epoch: Option<String>,
    tx: mpsc::Sender<Utf8Bytes>,
    close: mpsc::UnboundedSender<(u16, String)>,
) {
    let app_id = claims.app_id.clone();
    match stream_chat(&state, &claims, after, epoch, &tx).await {
        Stop::Gone => {}
        Stop::Log(kind, reason) => {
            let _ = close.send(close_for(kind, reason));
        }
        Stop::Slow(reason) => {
            metrics::counter!(m::SLOW_CONSUMER_CLOSES, "app_id" => app_id).increment(1);
            let _ = close.send((CLOSE_TRY_AGAIN, reason));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::stream::LOG_UNAVAILABLE;
    use super::*;

    #[test]
    fn the_close_code_comes_from_the_failures_kind() {
        for kind in [
            ErrorKind::Disconnected,
            ErrorKind::TimedOut,
            ErrorKind::NoResponders,
            ErrorKind::Unavailable,
            ErrorKind::NotFound,
        ] {
            assert_eq!(
                close_for(kind, LOG_UNAVAILABLE),
                (CLOSE_TRY_AGAIN, LOG_UNAVAILABLE.to_string()),
                "{kind:?}"
            );
        }
        for kind in [ErrorKind::Corrupt, ErrorKind::Rejected] {
            let (code, reason) = close_for(kind, LOG_UNAVAILABLE);
            assert_eq!(code, CLOSE_INTERNAL, "{kind:?}");
            assert_eq!(reason, "internal error; reconnect with after");
        }
        // A bus error's kind, as the stream gets it: an event that does not decode.
        let corrupt = mozaiks_bus::Error::Codec(mozaiks_events::Error::InvalidId {
            what: "event",
            reason: "not a uuid".into(),
        });
        assert_eq!(close_for(corrupt.kind(), LOG_UNAVAILABLE).0, CLOSE_INTERNAL);
    }
}
