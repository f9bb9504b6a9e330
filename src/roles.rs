//! Wiring of the roles.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use metrics_exporter_prometheus::PrometheusHandle;
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_bus::fleet::InstanceId;
use mozaiks_control::Registry;
use mozaiks_packs::Catalog;
use mozaiks_store::Store;
use tokio::sync::watch;
use tracing::info;

use crate::config::{GatewayArgs, Global, SchemasArgs, TokenArgs, WorkflowsCmd};

/// Which roles a process runs.
#[derive(Clone, Copy, Debug, Default)]
pub struct Roles {
    gateway: bool,
    worker: bool,
    projector: bool,
    billing: bool,
    ops: bool,
}

impl Roles {
    pub fn all() -> Roles {
        Roles {
            gateway: true,
            worker: true,
            projector: true,
            billing: true,
            ops: true,
        }
    }
    pub fn gateway() -> Roles {
        Roles {
            gateway: true,
            ..Default::default()
        }
    }
    pub fn worker() -> Roles {
        Roles {
            worker: true,
            ..Default::default()
        }
    }
    pub fn projector() -> Roles {
        Roles {
            projector: true,
            ..Default::default()
        }
    }
    pub fn billing() -> Roles {
        Roles {
            billing: true,
            ..Default::default()
        }
    }
    pub fn ops() -> Roles {
        Roles {
            ops: true,
            ..Default::default()
        }
    }
    fn names(&self) -> String {
        let mut v = Vec::new();
        for (on, name) in [
            (self.gateway, "gateway"),
            (self.worker, "worker"),
            (self.projector, "projector"),
            (self.billing, "billing"),
            (self.ops, "ops"),
        ] {
            if on {
                v.push(name);
            }
        }
        v.join(",")
    }
}

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
fn model(g: &Global) -> anyhow::Result<mozaiks_engine::model::Model> {
    use mozaiks_engine::model::{Model, openai};
    let m = &g.model;
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

fn load_catalog(g: &Global) -> anyhow::Result<Catalog> {
    Catalog::load_dir(&g.workflows_dir).map_err(|e| anyhow::anyhow!("invalid workflow pack: {e}"))
}

/// The fleets `--poll` names for the ops role, with their token: `--poll-token`, else a
/// superadmin token minted with JWT_SECRET (renewed before each poll; valid 10 minutes).
fn ops_poll(g: &Global) -> anyhow::Result<Option<mozaiks_ops::poll::Poll>> {
    let urls: Vec<String> = g
        .ops_poll
        .iter()
        .map(|u| u.trim().to_string())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Ok(None);
    }
    for u in &urls {
        let rest = u
            .strip_prefix("http://")
            .or_else(|| u.strip_prefix("https://"));
        anyhow::ensure!(
            rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/')),
            "--poll {u:?}: not an http(s) URL"
        );
    }
    let token: mozaiks_ops::poll::TokenSource = match g.ops_poll_token.clone() {
        Some(t) if !t.is_empty() => std::sync::Arc::new(move || Some(t.clone())),
        _ => {
            let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(g.jwt_secret()?, g.dev))
                .context("--poll without --poll-token mints a token with JWT_SECRET")?;
            let app = g.default_app_id.clone();
            std::sync::Arc::new(move || {
                auth.mint_user("mozaiks-ops", &app, &["superadmin"], 600)
                    .map_err(|e| tracing::warn!(error = %e, "Cannot mint the --poll token."))
                    .ok()
            })
        }
    };
    Ok(Some(mozaiks_ops::poll::Poll {
        urls,
        every: Duration::from_millis(g.ops_poll_ms.max(100)),
        token,
    }))
}

/// Runs `roles` until SIGTERM.
pub async fn serve(g: &Global, roles: Roles, gw: Option<GatewayArgs>) -> anyhow::Result<ExitCode> {
    init_tracing(g);
    let prometheus = init_metrics(g)?;
    info!(roles = %roles.names(), version = env!("CARGO_PKG_VERSION"), "Mozaiks starting.");
    mozaiks_store::credits::set_period_seconds(g.credits_period_seconds);
    // Configuration errors first, before any connection is tried.
    let auth = if roles.gateway {
        Some(
            mozaiks_auth::Auth::new(g.auth_config()?)
                .context("JWT_SECRET / JWT_JWKS_URL / JWT_ALGORITHMS")?,
        )
    } else {
        None
    };
    // The fleets the ops role polls (--poll): a bad URL stops the start.
    let ops_poll = if roles.ops { ops_poll(g)? } else { None };
    // Model prices (config/prices.yaml or MOZAIKS_PRICES_FILE): a bad file stops the start.
    let prices = if roles.worker || roles.billing {
        Some(mozaiks_control::prices::Prices::load(
            g.prices_file.as_deref(),
        )?)
    } else {
        None
    };
    // Listen before anything starts: a second instance on a busy port fails here, before it
    // joins the fleet (no presence snapshot, no consumer, nothing to undo).
    let listener = match (&gw, roles.gateway) {
        (Some(args), true) => Some(
            tokio::net::TcpListener::bind(args.listen)
                .await
                .with_context(|| format!("cannot listen on {}", args.listen))?,
        ),
        _ => None,
    };
    let health_listener = match g.health_listen.filter(|_| !roles.gateway) {
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
        &format!("mozaiks-{}", roles.names()),
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

    let needs_store = roles.gateway || roles.projector || roles.billing;
    let needs_catalog = roles.gateway || roles.worker;
    let catalog = if needs_catalog {
        Some(load_catalog(g)?)
    } else {
        None
    };
    // Plugins (gateways' /api/execute, workers' plugin tools): packs compiled once at start.
    let plugins = if roles.gateway || roles.worker {
        Some(
            mozaiks_plugins::Plugins::open(&bus, &g.plugins_dir)
                .await
                .map_err(|e| anyhow::anyhow!("plugins: {e}"))?,
        )
    } else {
        None
    };
    // Every role but a lone worker resolves apps' databases through the registry.
    let registry = if roles.gateway || roles.worker || needs_store {
        let tiers = mozaiks_control::Tiers::load(g.tiers_file.as_deref())?;
        let reg = Registry::open_with(&bus, tiers)
            .await
            .context("app registry")?;
        if roles.gateway || roles.worker {
            reg.ensure_app(&g.default_app_id, "Default app", "starter")
                .await?;
        }
        Some(reg)
    } else {
        None
    };
    let store = if needs_store {
        let store = Store::connect(&g.mongo_uri(), &g.mongo_db)
            .await
            .context("MongoDB")?;
        let reg = registry.as_ref().context("registry")?;
        Some(store.with_resolver(mozaiks_admin::storage::resolver(reg)))
    } else {
        None
    };

    // Who this process is in the fleet, made once: the worker's MZ_PERF key and chat leases, the
    // gateway's presence key, the holder of the retention lease and of storage moves.
    let instance = InstanceId::new(&std::env::var("HOSTNAME").unwrap_or_else(|_| "host".into()));
    info!(instance = %instance, "Instance id chosen.");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    };
    let mut tasks = tokio::task::JoinSet::new();

    if roles.projector {
        let p = mozaiks_projector::Projector::new(bus.clone(), store.clone().context("store")?);
        let s = stopped();
        tasks.spawn(async move {
            p.run(s)
                .await
                .map_err(anyhow::Error::from)
                .context("projector")
        });
    }
    if roles.projector && g.retention {
        let r = mozaiks_projector::retention::Retention::new(
            bus.clone(),
            store.clone().context("store")?,
            registry.clone().context("registry")?,
            mozaiks_projector::retention::Options {
                dir: g.archive_dir.clone(),
                every: Duration::from_secs(g.retention_interval_seconds.max(60)),
                purge_log: g.retention_purge_log,
                deleted_every: Duration::from_secs(g.app_archive_interval_seconds.max(1)),
            },
            instance.clone(),
        );
        let s = stopped();
        tasks.spawn(async move {
            r.run(s)
                .await
                .map_err(anyhow::Error::from)
                .context("retention")
        });
    }
    if roles.billing {
        let b = mozaiks_billing::Billing::new(bus.clone(), store.clone().context("store")?)
            .with_credits(
                registry.clone().context("registry")?,
                prices.clone().context("prices")?,
            );
        let s = stopped();
        tasks.spawn(async move {
            b.run(s)
                .await
                .map_err(anyhow::Error::from)
                .context("billing")
        });
    }
    if roles.worker {
        let opts = mozaiks_engine::Options {
            max_concurrent_runs: g.max_concurrent_workflows,
            run_timeout: Duration::from_secs(g.workflow_timeout_seconds.max(1)),
            enforce_credits: g.monetization_enabled,
            fair_slots: g.fair_slots,
            ..Default::default()
        };
        let w = mozaiks_engine::Worker::new(
            bus.clone(),
            registry.clone().context("registry")?,
            catalog.clone().context("catalog")?,
            model(g)?,
            opts,
            instance.clone(),
        )
        .with_prices(prices.clone().context("prices")?);
        let w = match plugins.clone() {
            Some(p) => w.with_plugins(p),
            None => w,
        };
        let s = stopped();
        tasks.spawn(async move {
            w.run(s)
                .await
                .map_err(anyhow::Error::from)
                .context("worker")
        });
    }
    if roles.ops {
        let o = mozaiks_ops::Ops::new(
            bus.clone(),
            instance.clone(),
            mozaiks_ops::Options {
                evaluate_every: Duration::from_millis(g.ops_evaluate_ms.max(100)),
                // Incident summaries by the workers' model (offline unless one is configured).
                model: Some(model(g)?),
                poll: ops_poll.clone(),
            },
        );
        let s = stopped();
        tasks.spawn(async move { o.run(s).await.map_err(anyhow::Error::from).context("ops") });
    }
    if roles.gateway {
        let args = gw.context("gateway arguments")?;
        let auth = auth.clone().context("auth")?;
        let gateway = mozaiks_gateway::Gateway::new(
            mozaiks_gateway::Parts {
                bus: bus.clone(),
                store: store.clone().context("store")?,
                auth,
                registry: registry.clone().context("registry")?,
                catalog: catalog.clone().context("catalog")?,
                prometheus: g.metrics.on_shared_ports(&prometheus),
                instance: instance.clone(),
                plugins: plugins.clone(),
            },
            mozaiks_gateway::Options {
                listen: args.listen,
                public_ws_url: args.public_ws_url.clone(),
                max_frame_bytes: args.max_frame_bytes,
                drain_timeout: Duration::from_secs(args.drain_seconds),
                cors_origins: args
                    .cors_origins
                    .iter()
                    .map(|o| o.trim().to_string())
                    .filter(|o| !o.is_empty())
                    .collect(),
                ws_ping: args.ws_ping_seconds.map(Duration::from_secs),
                ws_idle: args.ws_idle_seconds.map(Duration::from_secs),
                enforce_credits: g.monetization_enabled,
            },
        )
        .await?;
        let listener = listener.context("gateway listener")?;
        let s = stopped();
        tasks.spawn(async move {
            gateway
                .serve(listener, s)
                .await
                .map_err(anyhow::Error::from)
                .context("gateway")
        });
    }

    if let Some(listener) = health_listener {
        let app = crate::health::router(
            bus.clone(),
            store.clone(),
            g.metrics.on_shared_ports(&prometheus),
            g.metrics.token(),
        );
        let mut s = Box::pin(stopped());
        info!(addr = %listener.local_addr()?, "Health and metrics listener started.");
        tokio::spawn(async move {
            let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
                (&mut s).await;
            });
            if let Err(e) = serve.await {
                tracing::warn!(error = %e, "Health listener failed.");
            }
        });
    }

    if let Some(listener) = metrics_listener {
        let app = crate::metrics_http::router(prometheus.clone(), g.metrics.token());
        crate::metrics_http::serve(listener, app, stopped());
    }
    // Projector lag, billing lag, the workers' pending commands (crate::lag).
    crate::lag::spawn(
        bus.clone(),
        crate::lag::consumers(roles.worker, roles.projector, roles.billing),
        stopped(),
    );
    // Documents per app and collection (crate::storage_metrics).
    if roles.projector
        && let (Some(store), Some(registry)) = (store.clone(), registry.clone())
    {
        crate::storage_metrics::spawn(
            store,
            registry,
            Duration::from_secs(g.metrics.metrics_storage_seconds),
            stopped(),
        );
    }

    // Upkeep: render the prometheus histograms' buckets periodically.
    let upkeep = prometheus.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(5)).await;
            upkeep.run_upkeep();
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

pub fn token(g: &Global, args: TokenArgs) -> anyhow::Result<ExitCode> {
    let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(g.jwt_secret()?, g.dev))?;
    let app = args.app.unwrap_or_else(|| g.default_app_id.clone());
    let roles: Vec<&str> = args
        .roles
        .split(',')
        .map(str::trim)
        .filter(|r| !r.is_empty())
        .collect();
    let token = auth.mint_user(&args.sub, &app, &roles, args.ttl)?;
    println!("{token}");
    Ok(ExitCode::SUCCESS)
}

pub fn workflows(g: &Global, cmd: WorkflowsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        WorkflowsCmd::Check { dir } => {
            let dir = dir.unwrap_or_else(|| g.workflows_dir.clone());
            match Catalog::load_dir(&dir) {
                Ok(c) => {
                    for p in c.iter() {
                        println!(
                            "ok  {:<24} {} agent(s)  {}",
                            p.name,
                            p.agents.len(),
                            p.description
                        );
                    }
                    println!("{} pack(s) valid in {}", c.len(), dir.display());
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

pub fn plugins(g: &Global, cmd: crate::config::PluginsCmd) -> anyhow::Result<ExitCode> {
    let crate::config::PluginsCmd::Check { dir } = cmd;
    let dir = dir.unwrap_or_else(|| g.plugins_dir.clone());
    let checked = mozaiks_plugins::Packs::load_dir(&dir).and_then(|packs| {
        mozaiks_plugins::Access::load(&dir)?;
        let sandbox = mozaiks_plugins::Sandbox::new()?;
        for (name, pack) in &packs.packs {
            sandbox.compile(&pack.module).map_err(|e| {
                mozaiks_plugins::Error::InvalidModule(format!("{name}: {}", e.message()))
            })?;
        }
        Ok(packs)
    });
    match checked {
        Ok(packs) => {
            for (name, p) in &packs.packs {
                let m = &p.manifest;
                println!("ok  {name:<24} {:<10} {}", m.version, m.description);
            }
            println!("{} plugin(s) valid in {}", packs.packs.len(), dir.display());
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("error: {e}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// Every generated schema: `(file, text)`.
pub fn generated_schemas() -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = mozaiks_events::schema::all()
        .into_iter()
        .map(|(f, t)| (f.to_string(), t))
        .collect();
    all.push(("workflow-pack.schema.json".into(), mozaiks_packs::schema()));
    all.extend(
        mozaiks_ops::schema::all()
            .into_iter()
            .map(|(f, t)| (f.to_string(), t)),
    );
    all.push((
        "plugin.executed.schema.json".into(),
        mozaiks_plugins::schema(),
    ));
    all
}

pub fn schemas(args: SchemasArgs) -> anyhow::Result<ExitCode> {
    let mut drift = Vec::new();
    for (file, text) in generated_schemas() {
        let path = args.dir.join(&file);
        if args.check {
            if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
                drift.push(file);
            }
        } else {
            std::fs::create_dir_all(&args.dir)?;
            std::fs::write(&path, text)?;
            println!("wrote {}", path.display());
        }
    }
    if !drift.is_empty() {
        eprintln!(
            "schemas out of date: {} (run `mozaiks schemas`)",
            drift.join(", ")
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
