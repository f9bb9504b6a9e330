//! The health and metrics listener of a process without a gateway (`MOZAIKS_HEALTH_LISTEN`), for
//! orchestrators' probes and Prometheus: the same answers a gateway gives on its own port.
//!
//! - `/health/live`: 200 while the process runs.
//! - `/health/ready`: 200 only when every role of the process can work: the NATS connection is
//!   up, every stream, consumer and bucket exists (see `mozaiks_bus::keeper`), no role reports a
//!   problem (a worker whose command consumer fails, say), and Mongo answers when a role needs it;
//!   503 otherwise, with the reasons.
//! - `/metrics`: Prometheus exposition, unless `MOZAIKS_METRICS_LISTEN` gives it a listener of
//!   its own; behind `MOZAIKS_METRICS_TOKEN` when set (see [`crate::metrics_http`]).

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
}

/// `prometheus`: none when `/metrics` is served elsewhere; `token`: what `/metrics` asks for.
pub fn router(
    bus: Bus,
    store: Option<Store>,
    prometheus: Option<PrometheusHandle>,
    token: Option<String>,
) -> Router {
    let probes = Router::new()
        .route("/health", get(live))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(Probe { bus, store });
    match prometheus {
        Some(handle) => probes.merge(crate::metrics_http::router(handle, token)),
        None => probes,
    }
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

/// `mozaiks probe [URL]`: exits 0 when `GET URL` answers 200 within 3 s, 1 otherwise. For
/// container healthchecks in an image without a shell or curl (compose, `docker run`).
pub async fn probe(url: &str) -> anyhow::Result<std::process::ExitCode> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| anyhow::anyhow!("only http:// URLs can be probed: {url}"))?;
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let exchange = async {
        let mut s = tokio::net::TcpStream::connect(host).await?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes())
            .await?;
        let mut head = vec![0u8; 64];
        let n = s.read(&mut head).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&head[..n]).to_string())
    };
    let ok = match tokio::time::timeout(Duration::from_secs(3), exchange).await {
        Ok(Ok(head)) => head
            .split_whitespace()
            .nth(1)
            .is_some_and(|code| code == "200"),
        _ => false,
    };
    if !ok {
        eprintln!("mozaiks probe: {url} is not healthy");
    }
    Ok(if ok {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    })
}
