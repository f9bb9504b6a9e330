//! `GET /api/agui/{app_id}/{chat_id}?token=T&after=N&epoch=E`: a chat's events as AG-UI events
//! (<https://docs.ag-ui.com>) over Server-Sent Events, AG-UI's HTTP transport.
//!
//! **Same stream as the WebSocket.** The events come from the machinery the WebSocket uses
//! ([`crate::ws::stream_chat`], [`crate::hub`]): the replay from the log after `after`, then live,
//! gapless and without duplicates, on any replica; token deltas once live. Each frame is mapped to
//! AG-UI events ([`map`]); the last AG-UI event of a durable event carries its `seq` as the SSE
//! `id`, so a client that reconnects (`EventSource` does it by itself, to any replica behind a
//! load balancer) sends `Last-Event-ID` and resumes right after the last whole event it got.
//! `Last-Event-ID` wins over `after`; `epoch` (from the ticket) works as on the WebSocket.
//!
//! **Auth** is the WebSocket's: a runtime token (the ticket of `POST /api/sessions`), in
//! `?token=` (what `EventSource` can send) or `Authorization: Bearer`, minted for this app and
//! chat. A stream counts against the app's socket limits like a WebSocket and gets the user's
//! notifications. Cross-origin pages need the origin allowed ([`crate::cors`]).
//!
//! **The end of a stream** is a `CUSTOM` event named `close` (`value: {reason, message}`):
//! `restarting` (the replica drains; reconnect, the load balancer picks another),
//! `token_expired` (get a fresh ticket, reconnect with `Last-Event-ID`/`after`),
//! `log_unavailable` or `slow_consumer` (reconnect). Idle streams get an SSE comment every 15 s.

pub mod map;

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use axum::extract::{Path, State as St};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::StreamExt;
use mozaiks_auth::RuntimeClaims;
use mozaiks_events::Frame;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tracing::{Instrument, info, info_span};

use crate::State;
use crate::error::{ApiError, Query};
use crate::hub::Admission;
use crate::metrics as m;
use crate::ws::{Stop, admit, stream_chat};
use map::{Mapper, Out};

/// How often an idle stream gets an SSE comment (keeps proxies from timing it out).
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct AguiQuery {
    /// The runtime token from POST /api/sessions (or Authorization: Bearer with it).
    #[serde(default)]
    pub token: Option<String>,
    /// Replay every event with seq > after, then live; the Last-Event-ID header wins.
    #[serde(default)]
    pub after: Option<u64>,
    /// The log epoch from the ticket; a mismatch sends a CUSTOM resync event and replays from
    /// the start.
    #[serde(default)]
    pub epoch: Option<String>,
}

pub async fn stream(
    St(state): St<State>,
    Path((app_id, chat_id)): Path<(String, String)>,
    Query(q): Query<AguiQuery>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let token = q
        .token
        .as_deref()
        .or(bearer)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            ApiError::unauthorized(
                "token_missing",
                "a runtime token is required (?token= or Authorization: Bearer)",
            )
        })?;
    let claims = state.auth.verify_runtime(token)?;
    if claims.app_id != app_id || claims.chat_id != chat_id {
        return Err(ApiError::forbidden(
            "token_scope",
            "the runtime token was minted for another app or chat",
        ));
    }
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "invalid_last_event_id",
                        "Last-Event-ID must be the seq of an event (a whole number)",
                    )
                })?,
        ),
    };
    let after = last_event_id.or(q.after);
    let limits = state
        .registry
        .get(&app_id)
        .map(|a| a.limits.clone())
        .unwrap_or_default();
    let (tx, rx) = mpsc::channel::<Utf8Bytes>(state.hub.tuning().queue_frames);
    let admission = admit(&state, &app_id, &claims.sub, &limits, tx.clone())?;

    let span = info_span!("agui", app_id = %claims.app_id, chat_id = %claims.chat_id);
    info!(parent: &span, after, "AG-UI stream opened.");
    let (stop_tx, stop_rx) = oneshot::channel();
    let producer = {
        let (state, claims, epoch) = (state.clone(), claims.clone(), q.epoch.clone());
        tokio::spawn(
            async move {
                let stop = stream_chat(&state, &claims, after, epoch, &tx).await;
                let _ = stop_tx.send(stop);
            }
            .instrument(span.clone()),
        )
    };
    let body = Body {
        app_id: app_id.clone(),
        rx,
        stop_rx,
        mapper: Mapper::new(&chat_id),
        expiry: expiry(&claims),
        shutdown: state.shutdown.clone(),
        done: false,
        _producer: AbortOnDrop(producer),
        _admission: admission,
        _open: Open::new(),
    };
    let events = futures::stream::unfold(body, next_batch)
        .flat_map(futures::stream::iter)
        .map(|o| Ok::<_, Infallible>(to_sse(o)));
    let mut resp = axum::response::Sse::new(events)
        .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx buffers proxied answers unless told not to.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(resp)
}

fn expiry(claims: &RuntimeClaims) -> tokio::time::Instant {
    let secs = (claims.exp - Utc::now().timestamp()).max(0) as u64;
    tokio::time::Instant::now() + Duration::from_secs(secs)
}

fn to_sse(o: Out) -> Sse {
    metrics::counter!(m::AGUI_EVENTS_OUT).increment(1);
    let e = Sse::default().data(o.event.to_string());
    match o.id {
        Some(id) => e.id(id.to_string()),
        None => e,
    }
}

/// Aborts the stream's producer when the response is dropped (the client went away).
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts the open stream in the gauge while it lives.
struct Open;

impl Open {
    fn new() -> Open {
        metrics::gauge!(m::AGUI_STREAMS).increment(1.0);
        Open
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        metrics::gauge!(m::AGUI_STREAMS).decrement(1.0);
    }
}

/// What the response body works with.
struct Body {
    app_id: String,
    rx: mpsc::Receiver<Utf8Bytes>,
    stop_rx: oneshot::Receiver<Stop>,
    mapper: Mapper,
    expiry: tokio::time::Instant,
    shutdown: watch::Receiver<bool>,
    done: bool,
    _producer: AbortOnDrop,
    _admission: Admission,
    _open: Open,
}

/// The AG-UI events of the next frame (or of the stream's end); `None` once the stream ended.
async fn next_batch(mut b: Body) -> Option<(Vec<Out>, Body)> {
    if b.done {
        return None;
    }
    let draining = *b.shutdown.borrow();
    let close = tokio::select! {
        biased;
        _ = async {}, if draining => ("restarting", "server restarting; reconnect"),
        frame = b.rx.recv() => match frame {
            Some(f) => {
                let out = map_frame(&mut b.mapper, &f);
                return Some((out, b));
            }
            None => ("gone", ""),
        },
        stop = &mut b.stop_rx => match stop {
            Ok(Stop::Gone) | Err(_) => ("gone", ""),
            Ok(Stop::Log(..)) => ("log_unavailable", "event log unavailable; reconnect with Last-Event-ID"),
            Ok(Stop::Slow(_)) => {
                metrics::counter!(m::SLOW_CONSUMER_CLOSES, "app_id" => b.app_id.clone()).increment(1);
                ("slow_consumer", "slow consumer; reconnect with Last-Event-ID")
            }
        },
        _ = tokio::time::sleep_until(b.expiry) => ("token_expired", "token expired; get a fresh ticket and reconnect with Last-Event-ID"),
        _ = b.shutdown.changed() => ("restarting", "server restarting; reconnect"),
    };
    // What the producer queued before it stopped goes first.
    let mut out = Vec::new();
    while let Ok(f) = b.rx.try_recv() {
        out.extend(map_frame(&mut b.mapper, &f));
    }
    let (reason, message) = close;
    if reason != "gone" {
        out.push(Out {
            id: None,
            event: json!({
                "type": "CUSTOM", "name": "close",
                "value": {"reason": reason, "message": message},
                "timestamp": Utc::now().timestamp_millis(),
            }),
        });
    }
    b.done = true;
    Some((out, b))
}

fn map_frame(mapper: &mut Mapper, json: &Utf8Bytes) -> Vec<Out> {
    match serde_json::from_str::<Frame>(json.as_str()) {
        Ok(frame) => mapper.frame(&frame),
        Err(e) => {
            tracing::warn!(error = %e, "A frame does not decode; skipped.");
            Vec::new()
        }
    }
}
