//! Storage per app, for the fleet dashboard's storage panels: every
//! `MOZAIKS_METRICS_STORAGE_SECONDS` (300; 0 turns it off) a projector counts each live app's
//! documents in its database (the app's placement) and sets
//! `mozaiks_storage_documents{app_id, collection}` for `chat_sessions`, `chat_messages` and
//! `usage_events`. The counts filter on `app_id`, the first field of each collection's indexes;
//! `app_id` is bounded by the metrics layer like every other label (the rest sum as `other`).

use std::time::Duration;

use mongodb::bson::{Document, doc};
use mozaiks_control::{AppStatus, Registry};
use mozaiks_store::Store;

pub const DOCUMENTS: &str = "mozaiks_storage_documents";

/// The collections counted.
const COLLECTIONS: [&str; 3] = [
    mozaiks_store::SESSIONS,
    mozaiks_store::MESSAGES,
    mozaiks_store::USAGE_EVENTS,
];

pub fn describe() {
    metrics::describe_gauge!(
        DOCUMENTS,
        "Documents of an app in its read-model database, by app_id and collection (sampled by projectors)."
    );
}

/// Samples every `every` until `stopped` resolves (nothing when `every` is zero).
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
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = &mut stopped => return,
                _ = tick.tick() => {}
            }
            for app in registry.all() {
                if app.status == AppStatus::Deleted {
                    continue;
                }
                sample(&store, &app.app_id).await;
            }
        }
    });
}

async fn sample(store: &Store, app_id: &str) {
    let db = match store.resolve_storage(app_id).await {
        Ok(db) => db,
        Err(e) => {
            tracing::debug!(app_id, error = %e, "Cannot resolve the app's storage for its metrics.");
            return;
        }
    };
    for coll in COLLECTIONS {
        match db
            .collection::<Document>(coll)
            .count_documents(doc! { "app_id": app_id })
            .await
        {
            Ok(n) => {
                metrics::gauge!(DOCUMENTS, "app_id" => app_id.to_string(), "collection" => coll)
                    .set(n as f64)
            }
            Err(e) => {
                tracing::debug!(app_id, collection = coll, error = %e, "Cannot count the app's documents.")
            }
        }
    }
}
