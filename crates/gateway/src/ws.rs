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

use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State as St};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use mozaiks_auth::RuntimeClaims;
use mozaiks_bus::{ChatPosition, ErrorKind};
use mozaiks_events::{ClientFrame, Command, CommandEnvelope, Event, Frame};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::State;
use crate::error::{ApiError, Query};
use crate::hub::{Admission, Refused, message_of};
use crate::metrics as m;

mod deltas;
mod tasks;
use deltas::Deltas;
use tasks::{Counted, Ended, Tasks};

/// How often a socket holding a merged delta looks for room in its queue.
const DELTA_RETRY: Duration = Duration::from_millis(20);

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_TRY_AGAIN: u16 = 1013;

/// How long queued frames may take to flush before a close frame.
const FLUSH_BEFORE_CLOSE: Duration = Duration::from_millis(500);

/// Queued frames written to a socket before one flush.
const WRITE_BATCH: u64 = 64;

/// How long a replay may wait for the next event of the log before giving up.
const CATCH_UP_STALL: Duration = Duration::from_secs(10);

#[derive(Debug, Deserialize)]
pub struct WsQuery {
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub after: Option<u64>,
    #[serde(default)]
    pub epoch: Option<String>,
}

pub async fn upgrade(
    St(state): St<State>,
    Path((workflow, app_id, chat_id, user_id)): Path<(String, String, String, String)>,
    Query(q): Query<WsQuery>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    let token = q
        .token
        .as_deref()
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized("token_missing", "the token query parameter is required")
        })?;
    let claims = state.auth.verify_runtime(token)?;
    if claims.app_id != app_id
        || claims.chat_id != chat_id
        || claims.sub != user_id
        || claims.workflow != workflow
    {
        return Err(ApiError::forbidden(
            "token_scope",
            "the runtime token was minted for another app, chat, user or workflow",
        ));
    }
    let tuning = state.hub.tuning().clone();
    let app = state.registry.get(&app_id);
    let limits = app.as_ref().map(|a| a.limits.clone()).unwrap_or_default();
    let refuse = |reason: &'static str| {
        metrics::counter!(m::WS_REFUSED, "app_id" => app_id.clone(), "reason" => reason)
            .increment(1);
    };
    // Browsers always send Origin; a client without one is not a browser and needs no CSWSH guard.
    if let (Some(allowed), Some(origin)) =
        (limits.allowed_origins.as_ref(), headers.get(header::ORIGIN))
    {
        let origin = origin.to_str().unwrap_or_default();
        if !allowed.iter().any(|a| a == origin) {
            refuse("origin");
            return Err(ApiError::forbidden(
                "origin_not_allowed",
                "this origin may not open WebSockets for the app",
            ));
        }
    }
    let (tx, rx) = mpsc::channel::<Utf8Bytes>(tuning.queue_frames);
    let admission = admit(&state, &app_id, &user_id, &limits, tx.clone())?;
    let fps = limits
        .max_frames_per_second
        .unwrap_or(tuning.max_frames_per_second)
        .max(1);
    let max = state.opts.max_frame_bytes;
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| {
            let span = info_span!("ws", app_id = %claims.app_id, chat_id = %claims.chat_id);
            let conn = Conn {
                state,
                claims,
                after: q.after,
                epoch: q.epoch,
                tx,
                rx,
                fps,
                _admission: admission,
            };
            conn.run(socket).instrument(span)
        })
        .into_response())
}

/// Counts a client (a WebSocket or an AG-UI stream, [`crate::agui`]) against the app's fleet-wide
/// and per-user socket limits and registers it for notifications; 429 `too_many_websockets` over
/// a limit.
pub(crate) fn admit(
    state: &State,
    app_id: &str,
    user_id: &str,
    limits: &mozaiks_control::Limits,
    tx: mpsc::Sender<Utf8Bytes>,
) -> Result<Admission, ApiError> {
    let tuning = state.hub.tuning();
    // max_websockets is fleet-wide: the other replicas' last snapshots count (crate::presence).
    let max_app = limits
        .max_websockets
        .unwrap_or(tuning.max_websockets_per_app);
    let elsewhere = state.presence.other_sockets(app_id);
    state
        .hub
        .admit(
            app_id,
            user_id,
            max_app.saturating_sub(elsewhere),
            limits
                .max_websockets_per_user
                .unwrap_or(tuning.max_websockets_per_user),
            tx,
        )
        .map_err(|r| {
            let (reason, message) = match r {
                Refused::App(_) => (
                    "app_limit",
                    format!(
                        "the app has {max_app} WebSockets open across the fleet ({elsewhere} on other replicas), its limit"
                    ),
                ),
                Refused::User(n) => (
                    "user_limit",
                    format!(
                        "the user has {n} WebSockets open on this replica, the app's per-user limit"
                    ),
                ),
            };
            metrics::counter!(m::WS_REFUSED, "app_id" => app_id.to_string(), "reason" => reason)
                .increment(1);
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_websockets",
                message,
            )
        })
}

struct Conn {
    state: State,
    claims: RuntimeClaims,
    after: Option<u64>,
    epoch: Option<String>,
    tx: mpsc::Sender<Utf8Bytes>,
    rx: mpsc::Receiver<Utf8Bytes>,
    fps: u32,
    _admission: Admission,
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
    async fn run(self, socket: WebSocket) {
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

fn send(tx: &mpsc::Sender<Utf8Bytes>, frame: &Frame) -> bool {
    tx.try_send(Utf8Bytes::from(frame.to_json())).is_ok()
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

/// The close reason of a chat stream whose log is unavailable for the moment.
const LOG_UNAVAILABLE: &str = "event log unavailable; reconnect with after";

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

/// How far one socket got: the last seq sent and its stream sequence (0: unknown).
#[derive(Clone, Copy, Debug)]
struct Cursor {
    seq: u64,
    stream_seq: u64,
}

/// Why a pump stopped.
pub(crate) enum Stop {
    /// The socket is gone.
    Gone,
    /// The log failed, with this kind; the reason is for a failure of the moment (see
    /// [`close_for`]).
    Log(ErrorKind, &'static str),
    /// The socket's queue is full.
    Slow(String),
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

/// Streams a chat's events to `tx` as JSON frames: the replay after `after`, then live events and
/// token deltas, gapless and without duplicates (see the module's documentation). Shared by the
/// WebSocket and the AG-UI stream ([`crate::agui`]).
pub(crate) async fn stream_chat(
    state: &State,
    claims: &RuntimeClaims,
    after: Option<u64>,
    epoch: Option<String>,
    tx: &mpsc::Sender<Utf8Bytes>,
) -> Stop {
    let started = Instant::now();
    let (app_id, chat_id) = (claims.app_id.as_str(), claims.chat_id.as_str());
    let unavailable = |e: mozaiks_bus::Error| {
        warn!(error = %e, "Cannot read the chat's log.");
        Stop::Log(e.kind(), LOG_UNAVAILABLE)
    };
    // Join the live feed before reading the head: every event stored later reaches `feed`.
    let mut feed = match Box::pin(state.hub.follow(app_id, chat_id)).await {
        Ok(f) => f,
        Err(e) => return unavailable(e),
    };
    let mut after_n = after.unwrap_or(0);
    if after_n > 0 {
        metrics::counter!(m::RESUMES, "app_id" => app_id.to_string()).increment(1);
    }
    if let Some(e) = epoch
        && e != state.epoch
    {
        // The log was recreated: the client's seqs belong to another history.
        metrics::counter!(m::RESYNCS, "app_id" => app_id.to_string(), "reason" => "log_recreated")
            .increment(1);
        send(
            tx,
            &Frame::ephemeral(
                "resync",
                json!({ "reason": "log_recreated", "epoch": state.epoch }),
            ),
        );
        after_n = 0;
    }
    let head = match Box::pin(state.bus.chat_position(app_id, chat_id)).await {
        Ok(p) => p,
        Err(e) => return unavailable(e),
    };
    if after_n > head.seq {
        send(
            tx,
            &Frame::error(
                "after_beyond_head",
                format!("after={after_n} but the chat's last seq is {}", head.seq),
            ),
        );
        after_n = head.seq;
    }
    let seek = match Box::pin(state.bus.seek_chat(app_id, chat_id, after_n, head)).await {
        Ok(s) => s,
        Err(e) => return unavailable(e),
    };
    metrics::histogram!(m::SEEK_PROBES).record(f64::from(seek.probes));
    if seek.first_seq > after_n + 1 {
        metrics::counter!(m::RESYNCS, "app_id" => app_id.to_string(), "reason" => "log_truncated")
            .increment(1);
        info!(
            after = after_n,
            first_seq = seek.first_seq,
            "Events after the client's seq are gone; asking it to resync."
        );
        let frame = Frame::ephemeral(
            "resync",
            json!({
                "reason": "log_truncated",
                "after": after_n,
                "first_seq": seek.first_seq,
                "message": "events after your seq are no longer in the log; reload the transcript, then apply these frames",
            }),
        );
        if tx.send(Utf8Bytes::from(frame.to_json())).await.is_err() {
            return Stop::Gone;
        }
    }
    let mut cur = Cursor {
        seq: after_n,
        stream_seq: if after_n == head.seq {
            head.stream_seq
        } else {
            0
        },
    };
    let mut deltas = Deltas::new(state.hub.tuning().delta_backlog);
    if seek.from_stream_seq != 0 {
        // Boxed like every rare step here: a live socket's task holds only what the live loop needs.
        match Box::pin(catch_up(
            state,
            claims,
            seek.from_stream_seq,
            head,
            &mut cur,
            tx,
            &mut deltas,
        ))
        .await
        {
            Ok(n) => metrics::histogram!(m::REPLAYED).record(n as f64),
            Err(stop) => return stop,
        }
    } else {
        metrics::histogram!(m::REPLAYED).record(0.0);
    }
    metrics::histogram!(m::REPLAY_SECONDS).record(started.elapsed().as_secs_f64());
    debug!(seq = cur.seq, "Replay done; live.");
    // Deltas that came during the replay are old news: start from the newest.
    feed.deltas = feed.deltas.resubscribe();
    let mut deltas_open = true;
    loop {
        let live = tokio::select! {
            // Deltas first: the feed hands a step's deltas over before its `agent.message`.
            biased;
            d = feed.deltas.recv(), if deltas_open => {
                match d {
                    Ok(d) => deltas.on_delta(&d, tx),
                    Err(RecvError::Lagged(n)) => deltas.lagged(n),
                    Err(RecvError::Closed) => deltas_open = false,
                }
                if tx.is_closed() {
                    return Stop::Gone;
                }
                continue;
            }
            live = feed.rx.recv() => live,
            _ = tokio::time::sleep(DELTA_RETRY), if deltas.holding() => {
                deltas.flush(tx);
                continue;
            }
        };
        let live = match live {
            Ok(l) => l,
            // Missed live events: catch up from the log now; the chat's next event may be far.
            Err(RecvError::Lagged(n)) => {
                debug!(missed = n, "Live feed lagged; catching up from the log.");
                metrics::counter!(m::GAP_FETCHES).increment(1);
                let head = match Box::pin(state.bus.chat_position(app_id, chat_id)).await {
                    Ok(h) => h,
                    Err(e) => return unavailable(e),
                };
                if head.seq > cur.seq
                    && let Err(stop) =
                        Box::pin(fill_gap(state, claims, &mut cur, head, tx, &mut deltas)).await
                {
                    return stop;
                }
                continue;
            }
            Err(RecvError::Closed) => {
                return Stop::Log(
                    ErrorKind::Disconnected,
                    "live feed ended; reconnect with after",
                );
            }
        };
        if live.seq <= cur.seq {
            continue;
        }
        if live.seq > cur.seq + 1 {
            metrics::counter!(m::GAP_FETCHES).increment(1);
            let head = ChatPosition {
                seq: live.seq,
                stream_seq: live.stream_seq,
            };
            if let Err(stop) =
                Box::pin(fill_gap(state, claims, &mut cur, head, tx, &mut deltas)).await
            {
                return stop;
            }
            continue;
        }
        deltas.before_event(live.message, tx);
        if tx.try_send(live.json.clone()).is_err() {
            if tx.is_closed() {
                return Stop::Gone;
            }
            warn!(seq = live.seq, "Slow consumer; closing.");
            return Stop::Slow(format!("slow consumer; reconnect with after={}", cur.seq));
        }
        cur = Cursor {
            seq: live.seq,
            stream_seq: live.stream_seq,
        };
    }
}

/// Catches the socket up from its cursor through `head` (an event known to be in the log).
async fn fill_gap(
    state: &State,
    claims: &RuntimeClaims,
    cur: &mut Cursor,
    head: ChatPosition,
    tx: &mpsc::Sender<Utf8Bytes>,
    deltas: &mut Deltas,
) -> Result<(), Stop> {
    let from = if cur.stream_seq > 0 {
        cur.stream_seq + 1
    } else {
        match state
            .bus
            .seek_chat(&claims.app_id, &claims.chat_id, cur.seq, head)
            .await
        {
            Ok(s) if s.from_stream_seq > 0 => s.from_stream_seq,
            Ok(_) => head.stream_seq,
            Err(e) => {
                warn!(error = %e, "Cannot read the chat's log.");
                return Err(Stop::Log(e.kind(), LOG_UNAVAILABLE));
            }
        }
    };
    catch_up(state, claims, from, head, cur, tx, deltas)
        .await
        .map(|_| ())
}

/// Replays the chat's events from stream sequence `from` through `head` (inclusive) that come
/// after the cursor, waiting for the socket (the replay is paced by the client, not queued).
async fn catch_up(
    state: &State,
    claims: &RuntimeClaims,
    from: u64,
    head: ChatPosition,
    cur: &mut Cursor,
    tx: &mpsc::Sender<Utf8Bytes>,
    deltas: &mut Deltas,
) -> Result<usize, Stop> {
    if from > head.stream_seq {
        return Ok(0);
    }
    let log = |e: mozaiks_bus::Error| {
        warn!(error = %e, "Replay failed.");
        Stop::Log(e.kind(), LOG_UNAVAILABLE)
    };
    // Short catch-ups (the usual reconnect) read with batched direct gets, so a reconnect storm
    // creates no consumer per client; long ones stream through an ordered consumer. Either way
    // the socket paces the replay: the next event is read only once the last one is queued.
    let (until, missed) = (head.stream_seq, head.seq.saturating_sub(cur.seq));
    let mut events = state
        .bus
        .replay_chat(&claims.app_id, &claims.chat_id, from, until, missed)
        .await
        .map_err(log)?;
    let mut sent = 0;
    loop {
        let item = match tokio::time::timeout(CATCH_UP_STALL, events.next()).await {
            Ok(Some(item)) => item,
            // Nothing left up to `until` (purged meanwhile): the live feed takes over from here.
            Ok(None) => break,
            Err(_) => {
                return Err(Stop::Log(
                    ErrorKind::TimedOut,
                    "replay stalled; reconnect with after",
                ));
            }
        };
        let (env, stream_seq) = item.map_err(log)?;
        if env.seq > cur.seq {
            deltas.before_event(message_of(&env), tx);
            let json = Utf8Bytes::from(Frame::from_envelope(&env).to_json());
            if tx.send(json).await.is_err() {
                return Err(Stop::Gone);
            }
            sent += 1;
            cur.seq = env.seq;
        }
        cur.stream_seq = cur.stream_seq.max(stream_seq);
    }
    cur.stream_seq = cur.stream_seq.max(until);
    Ok(sent)
}

async fn on_client_frame(
    state: &State,
    claims: &RuntimeClaims,
    text: &str,
    tx: &mpsc::Sender<Utf8Bytes>,
) {
    let frame = match ClientFrame::parse(text) {
        Ok(f) => f,
        Err(e) => {
            metrics::counter!(m::FRAMES_IN, "type" => "invalid").increment(1);
            send(tx, &Frame::error(e.code, e.message));
            return;
        }
    };
    let (kind, command, msg_id) = match frame {
        ClientFrame::Ping {} => {
            metrics::counter!(m::FRAMES_IN, "type" => "ping").increment(1);
            send(tx, &Frame::ephemeral("pong", json!({})));
            return;
        }
        ClientFrame::UserMessage {
            text,
            client_msg_id,
        } => {
            // A message starts (or queues) a run: refused while the app's credits, or the user's
            // budget, are spent (MONETIZATION_ENABLED; crate::credits).
            if let Err(r) = crate::credits::check(state, &claims.app_id, &claims.sub) {
                metrics::counter!(m::FRAMES_IN, "type" => "user.message").increment(1);
                send(tx, &Frame::error(r.code(), r.to_string()));
                return;
            }
            let msg_id = client_msg_id
                .as_ref()
                .map(|id| format!("msg:{}:{}:{id}", claims.app_id, claims.chat_id));
            (
                "user.message",
                Command::UserMessage {
                    text,
                    client_msg_id,
                },
                msg_id,
            )
        }
        // Whether a run waits for this answer is the chat owner's decision: its refusal comes
        // back from the worker as an `error` frame (`not_waiting_for_input`, `unknown_request`).
        // Only the plain case is answered here: no run at all (a chat whose last event opened
        // it or ended a run).
        ClientFrame::InputResponse { request_id, text } => {
            match state.bus.last_event(&claims.app_id, &claims.chat_id).await {
                Ok(Some((env, _)))
                    if !env.event.ends_run() && !matches!(env.event, Event::SessionStarted(_)) => {}
                Ok(_) => {
                    send(
                        tx,
                        &Frame::error("not_waiting_for_input", "no run is waiting for input"),
                    );
                    return;
                }
                Err(e) => {
                    send(tx, &Frame::error("unavailable", e.to_string()));
                    return;
                }
            }
            (
                "input.response",
                Command::InputResponse { request_id, text },
                None,
            )
        }
        ClientFrame::Cancel { reason } => (
            "cancel",
            Command::Cancel {
                reason: reason.unwrap_or_default(),
            },
            None,
        ),
    };
    metrics::counter!(m::FRAMES_IN, "type" => kind).increment(1);
    let cmd = CommandEnvelope::new(
        &claims.app_id,
        &claims.chat_id,
        &claims.sub,
        &claims.workflow,
        command,
    );
    match state.bus.send_command(&cmd, msg_id.as_deref()).await {
        Ok(()) => {
            send(
                tx,
                &Frame::ephemeral(
                    "ack",
                    json!({ "command": kind, "command_id": cmd.command_id }),
                ),
            );
        }
        // An id the headers cannot carry (the frame's validation should have caught it).
        Err(mozaiks_bus::Error::Codec(e @ mozaiks_events::Error::InvalidId { .. })) => {
            send(tx, &Frame::error("bad_frame", e.to_string()));
        }
        Err(e) => {
            warn!(error = %e, "Cannot send a command.");
            send(
                tx,
                &Frame::error("unavailable", "could not accept the frame; retry"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
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
