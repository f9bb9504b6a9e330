//! The gateway: the stateless HTTP and WebSocket front door.
//!
//! Any replica answers any request: sessions are tickets (a runtime token), events come from the
//! log, reads from the Mongo projections. Nothing is kept between requests but caches of shared
//! state (the app registry). See [`ws`] for the WebSocket protocol.

pub mod admins;
pub mod agui;
pub mod apps;
pub mod authz;
pub mod cors;
pub mod credits;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod health;
pub mod http_metrics;
pub mod hub;
pub mod keys;
pub mod metrics;
pub mod notify;
pub mod openapi;
pub mod ops;
pub mod ops_api;
pub mod page;
pub mod plugins;
pub mod presence;
pub mod sessions;
pub mod storage;
pub mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use aide::axum::ApiRouter;
use aide::axum::routing::{delete_with, get_with, post_with, put_with};
use axum::Router;
use axum::http::HeaderMap;
use metrics_exporter_prometheus::PrometheusHandle;
use mozaiks_auth::Auth;
use mozaiks_bus::Bus;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::Registry;
use mozaiks_packs::Catalog;
use mozaiks_store::Store;
use tokio::sync::watch;
use tower_http::trace::TraceLayer;
use tracing::info;

/// Gateway settings.
#[derive(Clone, Debug)]
pub struct Options {
    pub listen: SocketAddr,
    /// Base of the `ws_url` handed out, e.g. `wss://chat.example.com`; by default derived from the
    /// request's `Host` header.
    pub public_ws_url: Option<String>,
    /// Largest WebSocket frame accepted, in bytes.
    pub max_frame_bytes: usize,
    /// How long a draining replica waits for its sockets to close.
    pub drain_timeout: Duration,
    /// Browser origins allowed to call the HTTP API for every app (`MOZAIKS_CORS_ORIGINS`), on top
    /// of each app's `allowed_origins` ([`cors`]).
    pub cors_origins: Vec<String>,
    /// How often an idle socket is pinged (`MOZAIKS_WS_PING_SECONDS`; `None`: the default).
    pub ws_ping: Option<Duration>,
    /// How long a socket may stay silent before it is closed (`MOZAIKS_WS_IDLE_SECONDS`).
    pub ws_idle: Option<Duration>,
    /// Refuse sessions and messages of apps whose credits are spent (`MONETIZATION_ENABLED`).
    pub enforce_credits: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            listen: ([127, 0, 0, 1], 8000).into(),
            public_ws_url: None,
            max_frame_bytes: 64 * 1024,
            drain_timeout: Duration::from_secs(10),
            cors_origins: Vec::new(),
            ws_ping: None,
            ws_idle: None,
            enforce_credits: false,
        }
    }
}

/// What every handler shares. Cheap to clone.
#[derive(Clone)]
pub struct State(Arc<Inner>);

pub struct Inner {
    pub bus: Bus,
    pub store: Store,
    pub auth: Auth,
    pub registry: Registry,
    pub catalog: Catalog,
    pub prometheus: Option<PrometheusHandle>,
    pub opts: Options,
    /// The event log's epoch (see [`Bus::log_epoch`]).
    pub epoch: String,
    /// Flips to `true` when the replica starts draining.
    pub shutdown: watch::Receiver<bool>,
    /// Live fan-out and the replica's open WebSockets.
    pub hub: hub::Hub,
    /// API keys of app back-ends (a watched copy of `MZ_KEYS`).
    pub keys: mozaiks_control::keys::ApiKeys,
    /// Every app's wallet (a watched copy of `MZ_CREDITS`) and whether it is enforced.
    pub wallets: mozaiks_control::credits::Wallets,
    /// The apps' admins as the brokers saw them (a watched copy of `MZ_ADMINS`), who get the
    /// credit alerts as `notification` frames ([`admins`]).
    pub admins: admins::Admins,
    /// The other replicas' sockets and the workers' runs, for fleet-wide limits.
    pub presence: presence::Presence,
    /// The process's id: its presence key and the holder of the leases it takes (storage moves).
    pub instance: InstanceId,
    /// The control plane's workflows: app creation and deletion, storage moves.
    pub admin: mozaiks_admin::Admin,
    /// Plugins (`None`: the plugin endpoints answer 503 `plugins_disabled`).
    pub plugins: Option<mozaiks_plugins::Plugins>,
}

impl std::ops::Deref for State {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl State {
    /// `ws://host` or `wss://host` for the `ws_url` of a session ticket.
    pub fn ws_base(&self, headers: &HeaderMap) -> String {
        if let Some(url) = &self.opts.public_ws_url {
            return url.trim_end_matches('/').to_string();
        }
        let host = headers
            .get(axum::http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1:8000");
        let secure = headers
            .get("x-forwarded-proto")
            .and_then(|h| h.to_str().ok())
            .is_some_and(|p| p == "https");
        format!("{}://{host}", if secure { "wss" } else { "ws" })
    }
}

/// The gateway service.
pub struct Gateway {
    state: State,
    shutdown_tx: watch::Sender<bool>,
}

/// Everything the gateway needs from the rest of the process.
pub struct Parts {
    pub bus: Bus,
    pub store: Store,
    pub auth: Auth,
    pub registry: Registry,
    pub catalog: Catalog,
    pub prometheus: Option<PrometheusHandle>,
    /// The process's id, shared by every role in it.
    pub instance: InstanceId,
    /// The process's plugins, shared with its worker (workflow tools).
    pub plugins: Option<mozaiks_plugins::Plugins>,
}

impl Gateway {
    pub async fn new(parts: Parts, opts: Options) -> Result<Gateway, mozaiks_bus::Error> {
        metrics::describe();
        let epoch = parts.bus.log_epoch().await?;
        let (shutdown_tx, shutdown) = watch::channel(false);
        let hub = hub::Hub::new(
            parts.bus.clone(),
            hub::Tuning::with(opts.ws_ping, opts.ws_idle),
        );
        notify::listen(&parts.bus, hub.clone()).await?;
        let keys = mozaiks_control::keys::ApiKeys::open(&parts.bus)
            .await
            .map_err(|e| mozaiks_bus::Error::kv("open the API keys", e))?;
        let wallets = mozaiks_control::credits::Wallets::open(&parts.bus, opts.enforce_credits)
            .await
            .map_err(|e| mozaiks_bus::Error::kv("open the wallets", e))?;
        let admins = admins::Admins::open(&parts.bus);
        admins::listen(parts.bus.clone(), hub.clone(), admins.clone());
        let presence = presence::Presence::start(
            &parts.bus,
            parts.instance.clone(),
            hub.clone(),
            shutdown.clone(),
        )
        .await?;
        let admin = mozaiks_admin::Admin::new(
            parts.bus.clone(),
            parts.store.clone(),
            parts.registry.clone(),
            parts.instance.clone(),
        );
        let state = State(Arc::new(Inner {
            bus: parts.bus,
            store: parts.store,
            auth: parts.auth,
            registry: parts.registry,
            catalog: parts.catalog,
            prometheus: parts.prometheus,
            opts,
            epoch,
            shutdown,
            hub,
            keys,
            wallets,
            admins,
            presence,
            instance: parts.instance,
            admin,
            plugins: parts.plugins,
        }));
        Ok(Gateway { state, shutdown_tx })
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn router(&self) -> Router {
        router(self.state.clone())
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, tells every WebSocket to
    /// reconnect elsewhere (1012), and waits for connections to close up to the drain timeout.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let listener = tokio::net::TcpListener::bind(self.state.opts.listen).await?;
        self.serve(listener, shutdown).await
    }

    /// Like [`Gateway::run`] on a listener the caller bound.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        info!(listen = %listener.local_addr()?, "Gateway listening.");
        let app = self.router();
        let tx = self.shutdown_tx;
        let drain = self.state.opts.drain_timeout;
        let signal = async move {
            shutdown.await;
            info!("Gateway draining.");
            let _ = tx.send(true);
        };
        // TCP_NODELAY: the socket writer already coalesces queued frames into one flush, and
        // Nagle's algorithm would hold a trailing small write until the client's delayed ACK
        // (~40 ms on Linux), which showed up in every catch-up.
        use axum::serve::ListenerExt;
        let listener = listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "Cannot set TCP_NODELAY.");
            }
        });
        let server = axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .with_graceful_shutdown(signal);
        let server = tokio::spawn(async move { server.await });
        let mut rx = self.state.shutdown.clone();
        let _ = rx.wait_for(|d| *d).await;
        let draining = std::time::Instant::now();
        // Upgraded WebSockets leave hyper's books: wait for the hub's count too.
        let hub = self.state.hub.clone();
        let drained = async move {
            let joined = server.await;
            while hub.connections() > 0 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            joined
        };
        match tokio::time::timeout(drain, drained).await {
            Ok(joined) => joined.map_err(std::io::Error::other)??,
            Err(_) => tracing::warn!("Drain deadline passed with connections still open."),
        }
        ::metrics::histogram!(metrics::DRAIN_SECONDS).record(draining.elapsed().as_secs_f64());
        info!("Gateway stopped.");
        Ok(())
    }
}

/// The documented routes (all but the chat page's), each with its handler and its documentation
/// ([`openapi`]).
fn api_routes() -> ApiRouter<State> {
    ApiRouter::new()
        .api_route("/api/health", get_with(health::live, openapi::health_live))
        .api_route("/health", get_with(health::live, openapi::health_live))
        .api_route("/health/live", get_with(health::live, openapi::health_live))
        .api_route(
            "/health/ready",
            get_with(health::ready, openapi::health_ready),
        )
        .api_route(
            "/metrics",
            get_with(health::metrics, openapi::health_metrics),
        )
        .api_route(
            "/api/sessions",
            post_with(sessions::start, openapi::sessions_start)
                .get_with(sessions::list_sessions, openapi::sessions_list_sessions),
        )
        .api_route(
            "/api/sessions/{chat_id}",
            get_with(sessions::get_session, openapi::sessions_get_session),
        )
        .api_route(
            "/api/sessions/{chat_id}/messages",
            get_with(sessions::messages, openapi::sessions_messages),
        )
        .api_route(
            "/api/workflows",
            get_with(sessions::workflows, openapi::sessions_workflows),
        )
        .api_route(
            "/api/usage/{app_id}",
            get_with(credits::usage, openapi::credits_usage),
        )
        .api_route(
            "/api/usage/{app_id}/export",
            get_with(credits::export, openapi::credits_export),
        )
        .api_route(
            "/api/notify",
            post_with(notify::notify, openapi::notify_notify),
        )
        .api_route(
            "/api/apps",
            post_with(apps::create, openapi::apps_create).get_with(apps::list, openapi::apps_list),
        )
        .api_route(
            "/api/apps/{app_id}",
            get_with(apps::get_app, openapi::apps_get_app)
                .patch_with(apps::patch, openapi::apps_patch)
                .delete_with(apps::delete, openapi::apps_delete),
        )
        .api_route(
            "/api/apps/{app_id}/storage",
            post_with(storage::move_storage, openapi::storage_move_storage)
                .get_with(storage::get_storage, openapi::storage_get_storage),
        )
        .api_route(
            "/api/apps/{app_id}/keys",
            post_with(keys::create, openapi::keys_create).get_with(keys::list, openapi::keys_list),
        )
        .api_route(
            "/api/apps/{app_id}/keys/{key_id}",
            delete_with(keys::revoke, openapi::keys_revoke),
        )
        .api_route(
            "/api/apps/{app_id}/credits",
            get_with(credits::get_credits, openapi::credits_get_credits)
                .post_with(credits::grant, openapi::credits_grant),
        )
        .api_route(
            "/health/active-runs",
            get_with(ops::active_runs, openapi::ops_active_runs),
        )
        .api_route(
            "/metrics/perf/aggregate",
            get_with(ops::perf_aggregate, openapi::ops_perf_aggregate),
        )
        .api_route(
            "/metrics/perf/chats",
            get_with(ops::perf_chats, openapi::ops_perf_chats),
        )
        .api_route(
            "/api/ops/policy",
            put_with(ops_api::put_policy, openapi::ops_api_put_policy)
                .get_with(ops_api::get_policy, openapi::ops_api_get_policy),
        )
        .api_route(
            "/api/ops/policy/{app_id}",
            put_with(ops_api::put_app_policy, openapi::ops_api_put_app_policy)
                .get_with(ops_api::get_app_policy, openapi::ops_api_get_app_policy),
        )
        .api_route(
            "/api/ops/incidents",
            get_with(ops_api::list_incidents, openapi::ops_api_list_incidents),
        )
        .api_route(
            "/api/ops/incidents/{id}",
            get_with(ops_api::get_incident, openapi::ops_api_get_incident),
        )
        .api_route(
            "/api/ops/actions",
            get_with(ops_api::list_actions, openapi::ops_api_list_actions),
        )
        .api_route(
            "/api/ops/actions/{id}/revert",
            post_with(ops_api::revert_action, openapi::ops_api_revert_action),
        )
        .api_route(
            "/api/ops/approvals",
            get_with(ops_api::list_approvals, openapi::ops_api_list_approvals),
        )
        .api_route(
            "/api/ops/approvals/{id}/approve",
            post_with(ops_api::approve, openapi::ops_api_approve),
        )
        .api_route(
            "/api/ops/approvals/{id}/reject",
            post_with(ops_api::reject, openapi::ops_api_reject),
        )
        .api_route(
            "/openapi.json",
            get_with(openapi::serve, openapi::openapi_serve),
        )
        .api_route(
            "/ws/{workflow}/{app_id}/{chat_id}/{user_id}",
            get_with(ws::upgrade, openapi::ws_upgrade),
        )
        .api_route(
            "/api/agui/{app_id}/{chat_id}",
            get_with(agui::stream, openapi::agui_stream),
        )
        .api_route(
            "/api/execute/{plugin}",
            post_with(plugins::execute, openapi::plugins_execute),
        )
        .api_route(
            "/api/plugins/{plugin}/settings",
            get_with(plugins::get_settings, openapi::plugins_get_settings)
                .put_with(plugins::put_settings, openapi::plugins_put_settings),
        )
        .api_route(
            "/api/apps/{app_id}/plugins",
            get_with(plugins::list, openapi::plugins_list)
                .post_with(plugins::upload, openapi::plugins_upload)
                .layer(axum::extract::DefaultBodyLimit::max(
                    plugins::MAX_UPLOAD_BODY,
                )),
        )
        .api_route(
            "/api/apps/{app_id}/plugins/enabled",
            get_with(plugins::get_enabled, openapi::plugins_get_enabled)
                .put_with(plugins::put_enabled, openapi::plugins_put_enabled),
        )
        .api_route(
            "/api/apps/{app_id}/plugins/usage",
            get_with(plugins::usage, openapi::plugins_usage),
        )
}

/// `GET /openapi.json`'s document, as [`router`] generates it.
pub fn openapi_document() -> serde_json::Value {
    openapi::document(api_routes()).1.as_ref().clone()
}

/// Every route of the gateway.
pub fn router(state: State) -> Router {
    let (routes, doc) = openapi::document(api_routes());
    routes
        .layer(axum::Extension(doc))
        .merge(page::routes())
        .fallback(|| async { error::ApiError::not_found("not_found", "no such endpoint") })
        .method_not_allowed_fallback(error::method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(256 * 1024))
        .layer(axum::middleware::from_fn(error::log_server_errors))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            cors::guard,
        ))
        // Outside the CORS guard: its refusals are counted too.
        .layer(axum::middleware::from_fn(http_metrics::count))
        .layer(
            TraceLayer::new_for_http().make_span_with(|req: &axum::http::Request<_>| {
                // The token query parameter never reaches a log line.
                let uri = mozaiks_auth::redact_token(&req.uri().to_string());
                tracing::info_span!("http", method = %req.method(), uri = %uri)
            }),
        )
        .with_state(state)
}
