//! Notifications across replicas: `POST /api/notify` (role `admin` of the app) sends an ephemeral
//! `notification` frame to one user on all their sockets on every replica, or to every socket of
//! the app.
//!
//! The handler publishes on core NATS `{ns}mz.ntf.{app_id}` (the app from the verified token, the
//! target user in the payload, so user ids need not be subject tokens); every replica subscribes to
//! `{ns}mz.ntf.>` once and hands the frame to its matching sockets ([`crate::hub::Hub::deliver`]).
//! Notifications are not durable: a user with no open socket misses them, and they never replay.

use axum::Json;
use axum::extract::State as St;
use axum::extract::ws::Utf8Bytes;
use axum::http::StatusCode;
use futures::StreamExt;
use mozaiks_events::Frame;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::State;
use crate::authz::User;
use crate::error::{ApiError, Body};
use crate::hub::Hub;
use crate::metrics as m;

/// Largest `data` of a notification, serialized.
pub const MAX_DATA_BYTES: usize = 16 * 1024;
/// Longest `user_id`.
pub const MAX_USER_ID: usize = 128;

/// `POST /api/notify` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NotifyRequest {
    /// The user to notify; without it, every user of the app.
    #[serde(default)]
    pub user_id: Option<String>,
    pub data: Value,
}

/// What travels on `mz.ntf.{app_id}`.
#[derive(Debug, Serialize, Deserialize)]
struct Wire {
    id: Uuid,
    app_id: String,
    #[serde(default)]
    user_id: Option<String>,
    /// The frame's type: `notification` (the default) or `error` (a worker refused a command).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    kind: Option<String>,
    data: Value,
}

pub async fn notify(
    St(state): St<State>,
    User(user): User,
    Body(req): Body<NotifyRequest>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    if !user.is_admin() {
        return Err(ApiError::forbidden(
            "admin_required",
            "sending notifications needs role admin of the app",
        ));
    }
    if let Some(u) = &req.user_id
        && (u.is_empty() || u.len() > MAX_USER_ID || u.chars().any(char::is_control))
    {
        return Err(ApiError::bad_request(
            "invalid_user_id",
            format!("user_id must be 1 to {MAX_USER_ID} printable characters"),
        ));
    }
    if serde_json::to_vec(&req.data).map_or(0, |v| v.len()) > MAX_DATA_BYTES {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("data is larger than {MAX_DATA_BYTES} bytes"),
        ));
    }
    let wire = Wire {
        id: Uuid::now_v7(),
        app_id: user.app_id.clone(),
        user_id: req.user_id,
        kind: None,
        data: req.data,
    };
    let payload = serde_json::to_vec(&wire).map_err(|e| ApiError::internal(e.to_string()))?;
    let subject = state.bus.subjects().notifications(&wire.app_id);
    state
        .bus
        .client()
        .publish(subject, payload.into())
        .await
        .map_err(|e| ApiError::unavailable_from("the notification bus", e))?;
    let target = if wire.user_id.is_some() {
        "user"
    } else {
        "app"
    };
    metrics::counter!(m::NOTIFICATIONS_SENT, "app_id" => wire.app_id.clone(), "target" => target)
        .increment(1);
    info!(app_id = %wire.app_id, target, id = %wire.id, "Notification published.");
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({ "id": wire.id, "target": target })),
    ))
}

/// Subscribes this replica to every app's notifications and delivers them to its sockets.
pub async fn listen(bus: &mozaiks_bus::Bus, hub: Hub) -> Result<(), mozaiks_bus::Error> {
    let subjects = bus.subjects().clone();
    let subject = subjects.all_notifications();
    let mut sub = bus
        .client()
        .subscribe(subject)
        .await
        .map_err(|e| mozaiks_bus::Error::nats("subscribe to the notifications", e))?;
    tokio::spawn(async move {
        while let Some(msg) = sub.next().await {
            let wire: Wire = match serde_json::from_slice(&msg.payload) {
                Ok(w) => w,
                Err(e) => {
                    warn!(subject = %msg.subject, error = %e, "Ignoring a notification that does not parse.");
                    continue;
                }
            };
            // The subject names the app; a payload claiming another app is refused.
            if subjects.notifications_app(msg.subject.as_str()) != Some(wire.app_id.as_str()) {
                warn!(subject = %msg.subject, app_id = %wire.app_id, "Ignoring a notification for another app than its subject.");
                continue;
            }
            let kind = match wire.kind.as_deref() {
                Some("error") => "error",
                _ => "notification",
            };
            let mut frame = Frame::ephemeral(kind, wire.data);
            frame.id = wire.id;
            let json = Utf8Bytes::from(frame.to_json());
            let n = hub.deliver(&wire.app_id, wire.user_id.as_deref(), &json);
            metrics::counter!(m::NOTIFICATIONS_DELIVERED, "app_id" => wire.app_id.clone())
                .increment(n as u64);
            debug!(app_id = %wire.app_id, sockets = n, "Notification delivered.");
        }
        warn!("Notification subscription ended.");
    });
    Ok(())
}
