//! Storage per app, for the fleet dashboard's storage panels: every
//! `MOZAIKS_METRICS_STORAGE_SECONDS` (300; 0 turns it off) a projector takes each live app's
//! storage measure ([`mozaiks_store::storage_size`]: its documents and bytes in each read-model
//! collection of its database, the app's placement) and sets
//! `mozaiks_storage_documents{app_id, collection}` and `mozaiks_storage_bytes{app_id, collection}`.
//! The measure is the one the usage endpoint's `storage_bytes` answers: recorded in Mongo and
//! taken again only when none is recent enough (a gateway's measure of the last period is reused
//! here, and this one there). `app_id` is bounded by the metrics layer like every other label
//! (the rest sum as `other`).

use std::time::Duration;

use mozaiks_control::{AppStatus, Registry};
use mozaiks_store::Store;

pub const DOCUMENTS: &str = "mozaiks_storage_documents";
pub const BYTES: &str = "mozaiks_storage_bytes";

pub fn describe() {
    metrics::describe_gauge!(
        DOCUMENTS,
        "Documents of an app in its read-model database, by app_id and collection (sampled by projectors)."
    );
    metrics::describe_gauge!(
        BYTES,
        "Bytes of an app's documents in its read-model database, by app_id and collection (sampled by projectors; their sum is the usage endpoint's storage_bytes)."
    );
}

/// Samples every `every` until `stopped` resolves (nothing when `every` is zero). The first
/// sample is one period after the start: a measure taken at start, of an app that has written
/// nothing yet, would be answered by the usage endpoint meanwhile.
pub fn spawn(
    store: Store,
    registry: Registry,
    every: Duration,
    stopped: impl std::future::Future<Output = ()> + Send + 'static,
) {
    if every.is_zero() {
        return;
    }
    tokio::spawn(async move {
        tokio::pin!(stopped);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            for app in registry.all() {
                if app.status == AppStatus::Deleted {
                    continue;
                }
                sample(&store, &app.app_id, every).await;
            }
        }
    });
}

/// Sets `app_id`'s gauges from a measure at most `every` old.
async fn sample(store: &Store, app_id: &str, every: Duration) {
    let m = match store.storage_measure(app_id, every).await {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(app_id, error = %e, "Cannot measure the app's storage.");
            return;
        }
    };
    for c in m.collections {
        let labels = [("app_id", app_id.to_string()), ("collection", c.collection)];
        metrics::gauge!(DOCUMENTS, &labels).set(c.documents as f64);
        metrics::gauge!(BYTES, &labels).set(c.bytes as f64);
    }
}
