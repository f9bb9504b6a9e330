//! The worker role: runs workflow packs for the chats it owns.

use std::time::Duration;

use anyhow::Context;

use super::{Shared, Shutdown, Task};
use crate::config::Plan;

pub fn start(shared: &Shared, plan: &Plan, shutdown: Shutdown) -> anyhow::Result<Task> {
    let args = plan.worker.as_ref().context("worker settings")?;
    let model = super::model(plan.model.as_ref().context("model settings")?)?;
    let options = mozaiks_engine::Options {
        max_concurrent_runs: args.max_concurrent_workflows,
        run_timeout: Duration::from_secs(args.workflow_timeout_seconds.max(1)),
        enforce_credits: plan.monetization_enabled(),
        fair_slots: args.fair_slots,
        reserve_slots: args.reserve_slots,
        ..Default::default()
    };
    let worker = mozaiks_engine::Worker::new(
        shared.bus.clone(),
        shared.registry()?,
        shared.catalog()?,
        model,
        options,
        shared.instance.clone(),
    )
    .with_prices(shared.prices()?);
    let worker = match shared.plugins.clone() {
        Some(p) => worker.with_plugins(p),
        None => worker,
    };
    Ok(Box::pin(async move {
        worker.run(shutdown.wait()).await?;
        Ok(())
    }))
}
