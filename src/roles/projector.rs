//! The projector role: the read models from the log, retention and deleted apps' archiving
//! (one replica at a time, by lease), and the documents-per-app gauge.

use std::time::Duration;

use anyhow::Context;

use super::{Shared, Shutdown, Task};
use crate::config::Plan;

pub fn start(shared: &Shared, plan: &Plan, shutdown: Shutdown) -> anyhow::Result<Task> {
    let args = plan.projector.clone().context("projector settings")?;
    let store = shared.store()?;
    let projector = mozaiks_projector::Projector::new(shared.bus.clone(), store.clone());
    let registry = shared.registry()?;
    let retention = args.retention.then(|| {
        mozaiks_projector::retention::Retention::new(
            shared.bus.clone(),
            store.clone(),
            registry.clone(),
            mozaiks_projector::retention::Options {
                dir: args.archive_dir.clone(),
                every: Duration::from_secs(args.retention_interval_seconds.max(60)),
                purge_log: args.retention_purge_log,
                deleted_every: Duration::from_secs(args.app_archive_interval_seconds.max(1)),
            },
            shared.instance.clone(),
        )
    });
    // Documents per app and collection (crate::storage_metrics).
    crate::storage_metrics::spawn(
        store,
        registry,
        Duration::from_secs(shared.global.metrics.metrics_storage_seconds),
        shutdown.wait(),
    );
    let projecting = projector.run(shutdown.wait());
    Ok(Box::pin(async move {
        match retention {
            Some(r) => {
                let retaining = r.run(shutdown.wait());
                tokio::try_join!(
                    async { projecting.await.map_err(anyhow::Error::from) },
                    async {
                        retaining
                            .await
                            .map_err(anyhow::Error::from)
                            .context("retention")
                    },
                )?;
            }
            None => projecting.await?,
        }
        Ok(())
    }))
}
