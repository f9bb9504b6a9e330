//! The gateway role: the HTTP + WebSocket front door.

use std::time::Duration;

use anyhow::Context;

use super::{Shared, Shutdown, Task};
use crate::config::{GatewayArgs, Plan};

/// What the gateway checks and binds before the process connects to anything: its tokens'
/// configuration, and its port (a second instance on a busy port fails here, before it joins the
/// fleet: no presence snapshot, no consumer, nothing to undo).
pub struct Prepared {
    args: GatewayArgs,
    auth: mozaiks_auth::Auth,
    enforce_credits: bool,
    listener: tokio::net::TcpListener,
}

pub async fn prepare(plan: &Plan) -> anyhow::Result<Prepared> {
    let args = plan.gateway.clone().context("gateway settings")?;
    let auth = plan.auth.as_ref().context("token settings")?;
    let auth = mozaiks_auth::Auth::new(auth.auth_config()?)
        .context("JWT_SECRET / JWT_JWKS_URL / JWT_ALGORITHMS")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    Ok(Prepared {
        args,
        auth,
        enforce_credits: plan.monetization_enabled(),
        listener,
    })
}

pub async fn start(
    shared: &Shared,
    prepared: Prepared,
    shutdown: Shutdown,
) -> anyhow::Result<Task> {
    let Prepared {
        args,
        auth,
        enforce_credits,
        listener,
    } = prepared;
    let gateway = mozaiks_gateway::Gateway::new(
        mozaiks_gateway::Parts {
            bus: shared.bus.clone(),
            store: shared.store()?,
            auth,
            registry: shared.registry()?,
            catalog: shared.catalog()?,
            prometheus: shared.global.metrics.on_shared_ports(&shared.prometheus),
            instance: shared.instance.clone(),
            plugins: shared.plugins.clone(),
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
            enforce_credits,
        },
    )
    .await?;
    Ok(Box::pin(async move {
        gateway.serve(listener, shutdown.wait()).await?;
        Ok(())
    }))
}
