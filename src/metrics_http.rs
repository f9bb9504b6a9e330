//! Where and to whom `/metrics` is served, and the recorder's installation.
//!
//! - `MOZAIKS_METRICS_LISTEN=0.0.0.0:9464`: `/metrics` on a listener of its own (a port the
//!   Ingress does not route); the API port and the health listener then answer 404 there.
//! - `MOZAIKS_METRICS_TOKEN=…`: `/metrics`, wherever it is served, asks for
//!   `Authorization: Bearer <token>` (401 without it).
//! - `MOZAIKS_METRICS_TOP_APPS` / `MOZAIKS_METRICS_APPS_WINDOW_SECONDS`: how many apps keep their
//!   own `app_id` label and how often they are ranked (see [`crate::metrics_layer`]).
//! - `MOZAIKS_METRICS_STORAGE_SECONDS`: how often projectors count each app's documents (see
//!   [`crate::storage_metrics`]).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use clap::Args;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::metrics_layer::{self, Layer, SECONDS_BUCKETS};

#[derive(Args, Debug, Clone)]
pub struct MetricsArgs {
    /// Address of a listener serving only `/metrics` (e.g. 0.0.0.0:9464). When set, the API port
    /// and the health listener no longer serve `/metrics`.
    #[arg(long, env = "MOZAIKS_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,
    /// Bearer token `/metrics` asks for (Prometheus: `authorization: {credentials: …}`).
    #[arg(
        long,
        env = "MOZAIKS_METRICS_TOKEN",
        hide_env_values = true,
        global = true
    )]
    pub metrics_token: Option<String>,
    /// Apps with their own `app_id` label in metrics, the most active ones; the rest are `other`.
    #[arg(
        long,
        env = "MOZAIKS_METRICS_TOP_APPS",
        default_value_t = 20,
        global = true
    )]
    pub metrics_top_apps: usize,
    /// Seconds between two rankings of apps by activity for their `app_id` label.
    #[arg(
        long,
        env = "MOZAIKS_METRICS_APPS_WINDOW_SECONDS",
        default_value_t = 300,
        global = true
    )]
    pub metrics_apps_window_seconds: u64,
    /// Seconds between two counts of every app's documents by a projector
    /// (`mozaiks_storage_documents`); 0 turns them off.
    #[arg(
        long,
        env = "MOZAIKS_METRICS_STORAGE_SECONDS",
        default_value_t = 300,
        global = true
    )]
    pub metrics_storage_seconds: u64,
}

impl MetricsArgs {
    /// The token, when one is set and not empty.
    pub fn token(&self) -> Option<String> {
        self.metrics_token.clone().filter(|t| !t.is_empty())
    }

    /// The handle the API port and the health listener serve `/metrics` with: none when
    /// `/metrics` has a listener of its own.
    pub fn on_shared_ports(&self, handle: &PrometheusHandle) -> Option<PrometheusHandle> {
        self.metrics_listen.is_none().then(|| handle.clone())
    }
}

/// Installs the process's recorder (Prometheus behind [`Layer`]) and describes every metric.
pub fn install(args: &MetricsArgs) -> anyhow::Result<PrometheusHandle> {
    let recorder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .context("metric buckets")?
        .build_recorder();
    let handle = recorder.handle();
    let (layer, ranker) = Layer::new(recorder, args.metrics_top_apps);
    metrics::set_global_recorder(layer)
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    ranker.spawn(Duration::from_secs(args.metrics_apps_window_seconds.max(1)));
    metrics_layer::describe();
    metrics_layer::record_build_info();
    Ok(handle)
}

#[derive(Clone)]
struct Exposition {
    handle: PrometheusHandle,
    token: Option<String>,
}

/// `GET /metrics`, behind the bearer token when there is one.
pub fn router(handle: PrometheusHandle, token: Option<String>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .with_state(Exposition { handle, token })
}

/// Whether `headers` carry `Authorization: Bearer <token>` (compared in constant time).
pub fn authorized(headers: &HeaderMap, token: Option<&str>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    given.len() == token.len()
        && given
            .bytes()
            .zip(token.bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

/// 401 with `WWW-Authenticate: Bearer`.
pub fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer realm=\"metrics\"")],
        "metrics need a bearer token\n",
    )
        .into_response()
}

async fn metrics(State(e): State<Exposition>, headers: HeaderMap) -> Response {
    if !authorized(&headers, e.token.as_deref()) {
        return unauthorized();
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        e.handle.render(),
    )
        .into_response()
}

/// Binds `MOZAIKS_METRICS_LISTEN` when set (before the process joins the fleet).
pub async fn bind(args: &MetricsArgs) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    match args.metrics_listen {
        Some(addr) => Ok(Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (MOZAIKS_METRICS_LISTEN)"))?,
        )),
        None => Ok(None),
    }
}

/// Serves `/metrics` on `listener` until `stopped` resolves.
pub fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(addr = %addr, "Metrics listener started.");
    }
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(stopped)
            .await
        {
            tracing::warn!(error = %e, "Metrics listener failed.");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_token_is_asked_for_only_when_set() {
        let mut h = HeaderMap::new();
        assert!(authorized(&h, None));
        assert!(!authorized(&h, Some("s3cret")));
        h.insert(header::AUTHORIZATION, "Bearer s3cre".parse().unwrap());
        assert!(!authorized(&h, Some("s3cret")));
        h.insert(header::AUTHORIZATION, "Bearer s3cret".parse().unwrap());
        assert!(authorized(&h, Some("s3cret")));
        h.insert(header::AUTHORIZATION, "Basic s3cret".parse().unwrap());
        assert!(!authorized(&h, Some("s3cret")));
    }
}
