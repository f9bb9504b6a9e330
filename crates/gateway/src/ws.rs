//! `WS /ws/{workflow}/{app_id}/{chat_id}/{user_id}?token=T&after=N&epoch=E`
//!
//! On connect the gateway replays every event of the chat with `seq > after`, then streams live
//! events; both come from one ordered JetStream read of the chat's subject, so the switch from
//! replay to live has no gap and no duplicate. Client frames become commands on `MZ_CMD`.
//!
//! Close codes: 1008 token expired, 1009 frame too large, 1012 server restarting (reconnect
//! elsewhere with `after`), 1013 slow consumer (reconnect with `after`).

use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State as St};
use axum::response::{IntoResponse, Response};
use chrono::Utc;
use futures::{SinkExt, StreamExt};
use mozaiks_auth::RuntimeClaims;
use mozaiks_events::{ClientFrame, Command, CommandEnvelope, Event, Frame};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};
use uuid::Uuid;

use crate::State;
use crate::error::{ApiError, Query};
use crate::metrics as m;

/// Frames queued for one client before it counts as a slow consumer.
pub const QUEUE_FRAMES: usize = 1024;

pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_RESTART: u16 = 1012;
pub const CLOSE_TRY_AGAIN: u16 = 1013;

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
    let max = state.opts.max_frame_bytes;
    Ok(ws
        .max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(4 * 1024)
        .write_buffer_size(4 * 1024)
        .on_upgrade(move |socket| {
            let span = info_span!("ws", app_id = %claims.app_id, chat_id = %claims.chat_id);
            connection(state, claims, q.after.unwrap_or(0), q.epoch, socket).instrument(span)
        })
        .into_response())
}

enum Out {
    Text(String),
}

async fn connection(
    state: State,
    claims: RuntimeClaims,
    after: u64,
    epoch: Option<String>,
    socket: WebSocket,
) {
    let app_id = claims.app_id.clone();
    metrics::gauge!(m::ACTIVE_CONNECTIONS, "app_id" => app_id.clone()).increment(1.0);
    info!(after, "Client connected.");
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Out>(QUEUE_FRAMES);
    let (close_tx, mut close_rx) = mpsc::unbounded_channel::<(u16, String)>();

    // Writer: the only task that touches the sink.
    let writer = tokio::spawn(
        async move {
            loop {
                tokio::select! {
                    biased;
                    c = close_rx.recv() => {
                        let (code, reason) = c.unwrap_or((1000, String::new()));
                        metrics::counter!(m::WS_CLOSED, "code" => code.to_string()).increment(1);
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from(reason) })))
                            .await;
                        break;
                    }
                    out = rx.recv() => match out {
                        Some(Out::Text(text)) => {
                            if sink.send(Message::Text(Utf8Bytes::from(text))).await.is_err() {
                                break;
                            }
                            metrics::counter!(m::FRAMES_OUT).increment(1);
                        }
                        None => break,
                    },
                }
            }
            let _ = sink.close().await;
        }
        .in_current_span(),
    );

    // Pump: replay, then live.
    let pump = tokio::spawn(
        pump(
            state.clone(),
            claims.clone(),
            after,
            epoch,
            tx.clone(),
            close_tx.clone(),
        )
        .in_current_span(),
    );

    let expires_in = (claims.exp - Utc::now().timestamp()).max(0) as u64;
    let expiry = tokio::time::sleep(Duration::from_secs(expires_in));
    tokio::pin!(expiry);
    let mut shutdown = state.shutdown.clone();
    loop {
        tokio::select! {
            _ = &mut expiry => {
                let _ = close_tx.send((CLOSE_POLICY, "token expired; get a fresh token and reconnect with after".into()));
                break;
            }
            _ = shutdown.changed() => {
                let _ = close_tx.send((CLOSE_RESTART, "server restarting; reconnect with after".into()));
                break;
            }
            msg = incoming.next() => match msg {
                Some(Ok(Message::Text(text))) => {
                    on_client_frame(&state, &claims, text.as_str(), &tx).await;
                }
                Some(Ok(Message::Binary(_))) => {
                    metrics::counter!(m::FRAMES_IN, "type" => "binary").increment(1);
                    send(&tx, &Frame::error("bad_frame", "binary frames are not supported; send JSON text"));
                }
                Some(Ok(Message::Close(_))) | None => break,
                Some(Ok(_)) => {} // ping/pong handled by the library
                Some(Err(e)) => {
                    let text = e.to_string();
                    if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
                        let _ = close_tx.send((CLOSE_TOO_BIG, format!("frame larger than {} bytes", state.opts.max_frame_bytes)));
                    }
                    debug!(error = %text, "WebSocket read failed.");
                    break;
                }
            }
        }
    }
    pump.abort();
    drop(tx);
    // Give the writer a moment to send a close frame.
    let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
    metrics::gauge!(m::ACTIVE_CONNECTIONS, "app_id" => app_id).decrement(1.0);
    info!("Client disconnected.");
}

fn send(tx: &mpsc::Sender<Out>, frame: &Frame) -> bool {
    tx.try_send(Out::Text(frame.to_json())).is_ok()
}

async fn pump(
    state: State,
    claims: RuntimeClaims,
    mut after: u64,
    epoch: Option<String>,
    tx: mpsc::Sender<Out>,
    close: mpsc::UnboundedSender<(u16, String)>,
) {
    if let Some(e) = epoch
        && e != state.epoch
    {
        // The log was recreated: the client's seqs belong to another history.
        send(
            &tx,
            &Frame::ephemeral(
                "resync",
                json!({ "reason": "log_recreated", "epoch": state.epoch }),
            ),
        );
        after = 0;
    }
    let head = match state
        .bus
        .chat_position(&claims.app_id, &claims.chat_id)
        .await
    {
        Ok(p) => p,
        Err(e) => {
            warn!(error = %e, "Cannot read the chat's log.");
            let _ = close.send((CLOSE_TRY_AGAIN, "event log unavailable; retry".into()));
            return;
        }
    };
    if after > head.seq {
        send(
            &tx,
            &Frame::error(
                "after_beyond_head",
                format!("after={after} but the chat's last seq is {}", head.seq),
            ),
        );
        after = head.seq;
    }
    metrics::histogram!(m::REPLAYED).record((head.seq - after) as f64);
    let mut events = match state
        .bus
        .follow_chat(&claims.app_id, &claims.chat_id, 0)
        .await
    {
        Ok(s) => Box::pin(s),
        Err(e) => {
            warn!(error = %e, "Cannot follow the chat.");
            let _ = close.send((CLOSE_TRY_AGAIN, "event log unavailable; retry".into()));
            return;
        }
    };
    let mut last = after;
    while let Some(item) = events.next().await {
        let env = match item {
            Ok((env, _)) => env,
            Err(e) => {
                warn!(error = %e, "Chat follow failed.");
                let _ = close.send((
                    CLOSE_TRY_AGAIN,
                    "event log unavailable; reconnect with after".into(),
                ));
                return;
            }
        };
        if env.seq <= last {
            continue;
        }
        last = env.seq;
        if tx
            .try_send(Out::Text(Frame::from_envelope(&env).to_json()))
            .is_err()
        {
            warn!(seq = env.seq, "Slow consumer; closing.");
            let _ = close.send((
                CLOSE_TRY_AGAIN,
                format!("slow consumer; reconnect with after={}", env.seq - 1),
            ));
            return;
        }
    }
}

async fn on_client_frame(
    state: &State,
    claims: &RuntimeClaims,
    text: &str,
    tx: &mpsc::Sender<Out>,
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
        ClientFrame::InputResponse { request_id, text } => {
            match state.bus.last_event(&claims.app_id, &claims.chat_id).await {
                Ok(Some((env, _))) if matches!(env.event, Event::InputRequested(_)) => {}
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
    let cmd = CommandEnvelope {
        v: 1,
        command_id: Uuid::now_v7(),
        app_id: claims.app_id.clone(),
        chat_id: claims.chat_id.clone(),
        user_id: claims.sub.clone(),
        workflow: claims.workflow.clone(),
        ts: Utc::now(),
        command,
    };
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
        Err(e) => {
            warn!(error = %e, "Cannot send a command.");
            send(
                tx,
                &Frame::error("unavailable", "could not accept the frame; retry"),
            );
        }
    }
}
