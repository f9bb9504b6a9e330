//! The health and metrics listener of a process without a gateway (`MOZAIKS_HEALTH_LISTEN`), for
//! orchestrators' probes and Prometheus: the same answers a gateway gives on its own port.
//!
//! - `/health/live`: 200 while the process runs.
//! - `/health/ready`: 200 only when every role of the process can work: the NATS connection is
//!   up, every stream, consumer and bucket exists (see `mozaiks_bus::keeper`), no role reports a
//!   problem (a worker whose command consumer fails, say), and Mongo answers when a role needs it;
//!   503 otherwise, with the reasons.
//! - `/metrics`: Prometheus exposition.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;
use mozaiks_bus::Bus;
use mozaiks_store::Store;
use serde_json::json;

#[derive(Clone)]
struct Probe {
    bus: Bus,
    store: Option<Store>,
    prometheus: PrometheusHandle,
}

pub fn router(bus: Bus, store: Option<Store>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/health", get(live))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(Probe {
            bus,
            store,
            prometheus,
        })
}

async fn live() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "status": "ok" }))
}

async fn ready(State(p): State<Probe>) -> Response {
    let mut readiness = p.bus.readiness();
    if let Some(store) = &p.store {
        let up = matches!(
            tokio::time::timeout(Duration::from_secs(2), store.ping()).await,
            Ok(Ok(()))
        );
        if !up {
            readiness
                .problems
                .insert("mongo".into(), "does not answer".into());
        }
    }
    let ok = readiness.is_ready();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        axum::Json(json!({
            "status": if ok { "ready" } else { "not_ready" },
            "problems": readiness.problems,
        })),
    )
        .into_response()
}

async fn metrics(State(p): State<Probe>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        p.prometheus.render(),
    )
        .into_response()
}
