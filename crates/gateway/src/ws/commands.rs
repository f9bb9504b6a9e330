//! The client's frames: `ping` answered here, `user.message` (after the credit check),
//! `input.response` and `cancel` sent to the chat's owner as commands and acknowledged.

use axum::extract::ws::Utf8Bytes;
use mozaiks_auth::RuntimeClaims;
use mozaiks_events::{ClientFrame, Command, CommandEnvelope, Event, Frame};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::warn;

use super::send;
use crate::State;
use crate::metrics as m;

pub(super) async fn on_client_frame(
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
