//! The ops role: rules over the fleet's live state, incidents on NATS, safe actions.

use std::time::Duration;

use anyhow::Context;

use super::{Shared, Shutdown, Task};
use crate::config::{Global, Plan};

/// What the ops role checks before the process connects to anything: the fleets it polls (a bad
/// `--poll` URL stops the start there).
pub struct Prepared {
    poll: Option<mozaiks_ops::poll::Poll>,
}

pub fn prepare(g: &Global, plan: &Plan) -> anyhow::Result<Prepared> {
    Ok(Prepared {
        poll: poll(g, plan)?,
    })
}

pub fn start(
    shared: &Shared,
    plan: &Plan,
    prepared: Prepared,
    shutdown: Shutdown,
) -> anyhow::Result<Task> {
    let args = plan.ops.as_ref().context("ops settings")?;
    let ops = mozaiks_ops::Ops::new(
        shared.bus.clone(),
        shared.instance.clone(),
        mozaiks_ops::Options {
            evaluate_every: Duration::from_millis(args.ops_evaluate_ms.max(100)),
            // Incident summaries by the workers' model (offline unless one is configured).
            model: Some(super::model(
                plan.model.as_ref().context("model settings")?,
            )?),
            poll: prepared.poll,
        },
    );
    Ok(Box::pin(async move {
        ops.run(shutdown.wait()).await?;
        Ok(())
    }))
}

/// The fleets `--poll` names, with their token: `--poll-token`, else a superadmin token minted
/// with JWT_SECRET (renewed before each poll; valid 10 minutes). A bad URL stops the start.
pub fn poll(g: &Global, plan: &Plan) -> anyhow::Result<Option<mozaiks_ops::poll::Poll>> {
    let args = plan.ops.as_ref().context("ops settings")?;
    let urls: Vec<String> = args
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
    let token: mozaiks_ops::poll::TokenSource = match args.ops_poll_token.clone() {
        Some(t) if !t.is_empty() => std::sync::Arc::new(move || Some(t.clone())),
        _ => {
            let auth = plan.auth.as_ref().context("token settings")?;
            let auth =
                mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(auth.jwt_secret()?, auth.dev))
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
        every: Duration::from_millis(args.ops_poll_ms.max(100)),
        token,
    }))
}
