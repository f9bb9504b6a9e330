//! The upgrade: the runtime token, its scope and the origin checked, then the socket counted
//! against the app's limits ([`admit`]) before the connection ([`super::connection`]) starts.

use axum::extract::ws::{Utf8Bytes, WebSocketUpgrade};
use axum::extract::{Path, State as St};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;
use tracing::{Instrument, info_span};

use super::connection::Conn;
use crate::State;
use crate::error::{ApiError, Query};
use crate::hub::{Admission, Refused};
use crate::metrics as m;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WsQuery {
    /// The runtime token from POST /api/sessions (its absence is answered 401 token_missing).
    #[schemars(required)]
    pub token: Option<String>,
    /// Replay every event with seq > after, then live.
    #[serde(default)]
    pub after: Option<u64>,
    /// The log epoch from the ticket; a mismatch answers resync.
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
        // Allocated with the socket and kept while it lives; client frames are small, and a
        // larger one gets its own room (tungstenite reserves a frame's length as it reads it).
        .read_buffer_size(1024)
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
