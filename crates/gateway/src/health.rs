//! Health: liveness answers while the process runs; readiness only when NATS and Mongo answer,
//! every stream, consumer and bucket exists on the server, no role of the process reports a
//! problem (`mozaiks_bus::Bus::readiness`: in `mozaiks all`, a worker whose command consumer
//! fails makes the process not ready), and the replica is not draining.

use std::time::Duration;

use axum::Json;
use axum::extract::State as St;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::State;

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

pub async fn ready(St(state): St<State>) -> Response {
    let t = Duration::from_secs(2);
    let nats = matches!(tokio::time::timeout(t, state.bus.ping()).await, Ok(Ok(())));
    let mongo = matches!(
        tokio::time::timeout(t, state.store.ping()).await,
        Ok(Ok(()))
    );
    let draining = *state.shutdown.borrow();
    let readiness = state.bus.readiness();
    let ok = nats && mongo && !draining && readiness.is_ready();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let word = |b: bool| if b { "ok" } else { "down" };
    (
        status,
        Json(json!({
            "status": if ok { "ready" } else { "not_ready" },
            "nats": word(nats),
            "mongo": word(mongo),
            "draining": draining,
            "problems": readiness.problems,
            // What this replica knows of the fleet (MZ_PRESENCE, MZ_PERF), for fleet-wide limits.
            "fleet": {
                "gateways": state.presence.live_gateways(),
                "workers": state.presence.live_workers(),
            },
        })),
    )
        .into_response()
}

/// The bearer token `/metrics` asks for (`MOZAIKS_METRICS_TOKEN`), set once by the binary.
static METRICS_TOKEN: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes `/metrics` ask for `Authorization: Bearer <token>` (process-wide, like the recorder).
pub fn protect_metrics(token: Option<String>) {
    if let Some(t) = token.filter(|t| !t.is_empty()) {
        let _ = METRICS_TOKEN.set(t);
    }
}

fn metrics_authorized(headers: &axum::http::HeaderMap) -> bool {
    let Some(token) = METRICS_TOKEN.get() else {
        return true;
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Constant time in the token's content.
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

pub async fn metrics(St(state): St<State>, headers: axum::http::HeaderMap) -> Response {
    if !metrics_authorized(&headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                axum::http::header::WWW_AUTHENTICATE,
                "Bearer realm=\"metrics\"",
            )],
            "metrics need a bearer token\n",
        )
            .into_response();
    }
    match &state.prometheus {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        // MOZAIKS_METRICS_LISTEN gave /metrics a listener of its own (or no recorder runs).
        None => (
            StatusCode::NOT_FOUND,
            "/metrics is not served on this port (see MOZAIKS_METRICS_LISTEN)\n",
        )
            .into_response(),
    }
}
