//! The roles, as data: [`Role`] names them, [`serve`] builds what they share once ([`Shared`]),
//! starts each role's task (one file per role beside this one, each `start(shared, plan,
//! shutdown)`), and stops them all on SIGTERM.
//!
//! Adding a role: a variant of [`Role`] (with what it needs of [`Shared`]), its settings group in
//! `config.rs` flattened into the sub-commands that run it (and into [`crate::config::AllArgs`]),
//! a sub-command in `main.rs`, and a `start` in a file here.

mod billing;
mod gateway;
mod ops;
mod projector;
mod worker;

use std::future::Future;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::Registry;
use mozaiks_control::prices::Prices;
use mozaiks_packs::Catalog;
use mozaiks_store::Store;
use tokio::sync::watch;
use tracing::info;

use crate::config::{Global, ModelArgs, Plan};

/// A role a process can run. `mozaiks all` runs every one; each other sub-command runs one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// HTTP + WebSocket front door.
    Gateway,
    /// Runs workflows for the chats it owns.
    Worker,
    /// Keeps the MongoDB read models from the log (and retention).
    Projector,
    /// Keeps the usage ledger and the credit wallets from the log.
    Billing,
    /// Rules over the fleet's live state, incidents, safe actions.
    Ops,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Gateway,
        Role::Worker,
        Role::Projector,
        Role::Billing,
        Role::Ops,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Worker => "worker",
            Role::Projector => "projector",
            Role::Billing => "billing",
            Role::Ops => "ops",
        }
    }

    /// Reads and writes MongoDB (the read models).
    fn needs_store(self) -> bool {
        matches!(self, Role::Gateway | Role::Projector | Role::Billing)
    }

    /// Knows the workflow and plugin packs.
    fn needs_packs(self) -> bool {
        matches!(self, Role::Gateway | Role::Worker)
    }

    /// Resolves apps (their tiers, limits and databases) through the registry.
    fn needs_registry(self) -> bool {
        !matches!(self, Role::Ops)
    }

    /// Costs charges.
    fn needs_prices(self) -> bool {
        matches!(self, Role::Worker | Role::Billing)
    }

    /// The durable consumers whose lag this role's process reports (crate::lag).
    fn consumers(self) -> Vec<(&'static str, &'static str)> {
        crate::lag::consumers(
            self == Role::Worker,
            self == Role::Projector,
            self == Role::Billing,
        )
    }
}

/// The roles of a process, e.g. `gateway` or `gateway,worker,projector,billing,ops`.
fn names(roles: &[Role]) -> String {
    roles.iter().map(|r| r.name()).collect::<Vec<_>>().join(",")
}

/// What the roles of one process share, built once by [`serve`]. A piece no role of the process
/// needs is `None`.
pub struct Shared {
    pub global: Global,
    pub bus: Bus,
    pub store: Option<Store>,
    pub registry: Option<Registry>,
    pub catalog: Option<Catalog>,
    pub plugins: Option<mozaiks_plugins::Plugins>,
    pub prices: Option<Prices>,
    /// Who this process is in the fleet, made once: the worker's MZ_PERF key and chat leases, the
    /// gateway's presence key, the holder of the retention lease and of storage moves.
    pub instance: InstanceId,
    pub prometheus: PrometheusHandle,
}

impl Shared {
    pub fn store(&self) -> anyhow::Result<Store> {
        self.store.clone().context("store")
    }
    pub fn registry(&self) -> anyhow::Result<Registry> {
        self.registry.clone().context("registry")
    }
    pub fn catalog(&self) -> anyhow::Result<Catalog> {
        self.catalog.clone().context("catalog")
    }
    pub fn prices(&self) -> anyhow::Result<Prices> {
        self.prices.clone().context("prices")
    }
}

/// Tells every task of the process that it is time to stop.
#[derive(Clone)]
pub struct Shutdown(watch::Receiver<bool>);

impl Shutdown {
    /// Resolves once shutdown was asked for.
    pub fn wait(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.0.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }
}

/// A started role: its task, ending when the role stops (by itself, on an error, or on shutdown).
type Task = std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>;

fn init_tracing(g: &Global) {
    let filter = tracing_subscriber::EnvFilter::try_new(&g.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a pipe gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()));
    let _ = if g.log_format == "json" {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init()
    } else {
        builder.try_init()
    };
}

fn init_metrics(g: &Global) -> anyhow::Result<PrometheusHandle> {
    // Prometheus behind the layer bounding app_id (crate::metrics_layer).
    let handle = crate::metrics_http::install(&g.metrics)?;
    mozaiks_gateway::health::protect_metrics(g.metrics.token());
    mozaiks_bus::metrics::describe();
    mozaiks_store::metrics::describe();
    crate::lag::describe();
    crate::storage_metrics::describe();
    Ok(handle)
}

/// Resolves on SIGTERM or Ctrl-C.
async fn terminated() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = match signal(SignalKind::terminate()) {
            Ok(s) => s,
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// The OpenAI-compatible client when `OPENAI_API_KEY` or `OPENAI_BASE_URL` is set, else offline.
fn model(m: &ModelArgs) -> anyhow::Result<mozaiks_engine::model::Model> {
    use mozaiks_engine::model::{Model, openai};
    let key = m.openai_api_key.clone().filter(|k| !k.is_empty());
    let base = m.openai_base_url.clone().filter(|b| !b.is_empty());
    if key.is_none() && base.is_none() {
        info!("No OPENAI_API_KEY or OPENAI_BASE_URL; agents use the offline model.");
        return Ok(Model::Offline);
    }
    let cfg = openai::Config {
        base_url: base.unwrap_or_else(|| openai::DEFAULT_BASE_URL.into()),
        api_key: key,
        api_key_header: m.openai_api_key_header.clone().filter(|h| !h.is_empty()),
        default_model: m.model.clone(),
        max_attempts: m.model_max_attempts.max(1),
        request_timeout: Duration::from_secs(m.model_timeout_seconds.max(1)),
        ..Default::default()
    };
    info!(base_url = %cfg.base_url, model = %cfg.default_model, "Agents use the OpenAI-compatible provider.");
    Ok(Model::OpenAi(
        openai::Client::new(cfg).map_err(|e| anyhow::anyhow!("OPENAI_BASE_URL: {e}"))?,
    ))
}

/// Runs the plan's roles until SIGTERM.
pub async fn serve(g: Global, plan: Plan) -> anyhow::Result<ExitCode> {
    init_tracing(&g);
    let prometheus = init_metrics(&g)?;
    let roles = plan.roles.clone();
    let has = |r: Role| roles.contains(&r);
    let any = |f: fn(Role) -> bool| roles.iter().any(|r| f(*r));
    info!(roles = %names(&roles), version = env!("CARGO_PKG_VERSION"), "Mozaiks starting.");
    mozaiks_store::credits::set_period_seconds(g.credits_period_seconds);
    // Configuration errors first, before any connection is tried.
    let prepared_gateway = if has(Role::Gateway) {
        Some(gateway::prepare(&plan).await?)
    } else {
        None
    };
    let prepared_ops = if has(Role::Ops) {
        Some(ops::prepare(&g, &plan)?)
    } else {
        None
    };
    // Model prices (config/prices.yaml or MOZAIKS_PRICES_FILE): a bad file stops the start.
    let prices = if any(Role::needs_prices) {
        let file = plan.prices.as_ref().and_then(|p| p.prices_file.as_deref());
        Some(Prices::load(file)?)
    } else {
        None
    };
    let health_listener = match g.health_listen.filter(|_| !has(Role::Gateway)) {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} (MOZAIKS_HEALTH_LISTEN)"))?,
        ),
        None => None,
    };
    let metrics_listener = crate::metrics_http::bind(&g.metrics).await?;

    let bus = Bus::connect(
        &g.nats_url,
        &g.namespace,
        &format!("mozaiks-{}", names(&roles)),
    )
    .await
    .context("NATS")?;
    let defs = match &g.streams_dir {
        Some(dir) => Definitions::load_dir(dir)?,
        None => Definitions::embedded()?,
    };
    let defs = match g.stream_replicas {
        Some(r) => defs.with_replicas(r),
        None => defs,
    };
    bus.apply(&defs)
        .await
        .context("applying stream definitions")?;
    // Re-applies the definitions whenever the server lost some (a restarted nats-server).
    let (keeper_stop, keeper_stopped) = tokio::sync::oneshot::channel::<()>();
    let keeper = {
        let bus = bus.clone();
        tokio::spawn(async move {
            bus.keep_definitions(async {
                let _ = keeper_stopped.await;
            })
            .await
        })
    };

    let (catalog, plugins) = match plan.packs.as_ref().filter(|_| any(Role::needs_packs)) {
        Some(packs) => {
            let catalog = Catalog::load_dir(&packs.workflows_dir)
                .map_err(|e| anyhow::anyhow!("invalid workflow pack: {e}"))?;
            // Plugins (gateways' /api/execute, workers' plugin tools): compiled once at start.
            let plugins = mozaiks_plugins::Plugins::open(&bus, &packs.plugins_dir)
                .await
                .map_err(|e| anyhow::anyhow!("plugins: {e}"))?;
            (Some(catalog), Some(plugins))
        }
        None => (None, None),
    };
    let registry = if any(Role::needs_registry) {
        let tiers = mozaiks_control::Tiers::load(g.tiers_file.as_deref())?;
        let reg = Registry::open_with(&bus, tiers)
            .await
            .context("app registry")?;
        if any(Role::needs_packs) {
            reg.ensure_app(&g.default_app_id, "Default app", "starter")
                .await?;
        }
        Some(reg)
    } else {
        None
    };
    let store = if any(Role::needs_store) {
        let store = Store::connect(&g.mongo_uri(), &g.mongo_db)
            .await
            .context("MongoDB")?;
        let reg = registry.as_ref().context("registry")?;
        Some(store.with_resolver(mozaiks_admin::storage::resolver(reg)))
    } else {
        None
    };
    let instance = InstanceId::new(&g.instance);
    info!(instance = %instance, "Instance id chosen.");
    let shared = Shared {
        global: g,
        bus,
        store,
        registry,
        catalog,
        plugins,
        prices,
        instance,
        prometheus,
    };

    let (stop_tx, stop_rx) = watch::channel(false);
    let shutdown = Shutdown(stop_rx);
    let mut tasks = tokio::task::JoinSet::new();
    let mut prepared_gateway = prepared_gateway;
    let mut prepared_ops = prepared_ops;
    for role in &roles {
        let task: Task = match role {
            Role::Gateway => {
                let prepared = prepared_gateway.take().context("gateway")?;
                gateway::start(&shared, prepared, shutdown.clone()).await?
            }
            Role::Worker => worker::start(&shared, &plan, shutdown.clone())?,
            Role::Projector => projector::start(&shared, &plan, shutdown.clone())?,
            Role::Billing => billing::start(&shared, shutdown.clone())?,
            Role::Ops => {
                let prepared = prepared_ops.take().context("ops")?;
                ops::start(&shared, &plan, prepared, shutdown.clone())?
            }
        };
        let name = role.name();
        tasks.spawn(async move { task.await.context(name) });
    }
    let (bus, store, g) = (&shared.bus, &shared.store, &shared.global);

    if let Some(listener) = health_listener {
        let app = crate::health::router(
            bus.clone(),
            store.clone(),
            g.metrics.on_shared_ports(&shared.prometheus),
            g.metrics.token(),
        );
        let stop = shutdown.wait();
        info!(addr = %listener.local_addr()?, "Health and metrics listener started.");
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(stop);
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "Health listener failed.");
            }
        });
    }
    if let Some(listener) = metrics_listener {
        let app = crate::metrics_http::router(shared.prometheus.clone(), g.metrics.token());
        crate::metrics_http::serve(listener, app, shutdown.wait());
    }
    // Projector lag, billing lag, the workers' pending commands (crate::lag).
    crate::lag::spawn(
        bus.clone(),
        roles.iter().flat_map(|r| r.consumers()).collect(),
        shutdown.wait(),
    );
    // Upkeep: render the prometheus histograms' buckets periodically, until shutdown.
    let upkeep = shared.prometheus.clone();
    let stop = shutdown.wait();
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                _ = &mut stop => break,
                _ = tokio::time::sleep(Duration::from_secs(5)) => upkeep.run_upkeep(),
            }
        }
    });

    info!("Mozaiks ready.");
    let mut failed = None;
    tokio::select! {
        _ = terminated() => info!("Termination requested; shutting down."),
        Some(done) = tasks.join_next() => {
            if let Ok(Err(e)) = done {
                failed = Some(e);
            }
        }
    }
    let _ = stop_tx.send(true);
    let deadline = tokio::time::sleep(Duration::from_secs(20));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            next = tasks.join_next() => match next {
                None => break,
                Some(Ok(Err(e))) if failed.is_none() => failed = Some(e),
                Some(_) => {}
            },
            _ = &mut deadline => {
                tracing::warn!("Shutdown deadline passed.");
                break;
            }
        }
    }
    let _ = keeper_stop.send(());
    let _ = keeper.await;
    // What is still buffered goes out if the server answers; a server that is gone does not hold
    // the process up.
    let _ = tokio::time::timeout(Duration::from_secs(2), bus.client().flush()).await;
    match failed {
        Some(e) => Err(e),
        None => {
            info!("Mozaiks stopped.");
            Ok(ExitCode::SUCCESS)
        }
    }
}
