//! Replay-to-live stitching: a chat's events after the client's seq from the log, then its live
//! feed and token deltas, with no gap and no duplicate (see [`super`]).

use std::time::{Duration, Instant};

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use mozaiks_auth::RuntimeClaims;
use mozaiks_bus::{ChatPosition, ErrorKind};
use mozaiks_events::Frame;
use serde_json::json;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::deltas::Deltas;
use super::send;
use crate::State;
use crate::hub::message_of;
use crate::metrics as m;

/// How often a socket holding a merged delta looks for room in its queue.
const DELTA_RETRY: Duration = Duration::from_millis(20);

/// How long a replay may wait for the next event of the log before giving up.
const CATCH_UP_STALL: Duration = Duration::from_secs(10);

/// The close reason of a chat stream whose log is unavailable for the moment.
pub(super) const LOG_UNAVAILABLE: &str = "event log unavailable; reconnect with after";

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
    /// [`super::connection`]).
    Log(ErrorKind, &'static str),
    /// The socket's queue is full.
    Slow(String),
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
