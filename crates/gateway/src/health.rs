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

pub async fn metrics(St(state): St<State>) -> Response {
    match &state.prometheus {
        Some(h) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4",
            )],
            h.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics recorder not installed").into_response(),
    }
}
