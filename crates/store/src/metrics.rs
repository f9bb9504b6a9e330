//! Metric names of the store.

pub const QUERY_SECONDS: &str = "mozaiks_mongo_query_seconds";
pub const WRITE_SECONDS: &str = "mozaiks_mongo_write_seconds";
pub const SKIPPED_DELETED: &str = "mozaiks_projection_skipped_deleted_total";

pub fn describe() {
    metrics::describe_histogram!(
        QUERY_SECONDS,
        metrics::Unit::Seconds,
        "MongoDB read latency by operation."
    );
    metrics::describe_histogram!(
        WRITE_SECONDS,
        metrics::Unit::Seconds,
        "MongoDB projection write latency by operation."
    );
    metrics::describe_counter!(
        SKIPPED_DELETED,
        "Events not projected because their app was deleted, by app_id."
    );
}
