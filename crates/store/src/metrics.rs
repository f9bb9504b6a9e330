//! Metric names of the store.

pub const QUERY_SECONDS: &str = "mozaiks_mongo_query_seconds";
pub const WRITE_SECONDS: &str = "mozaiks_mongo_write_seconds";
pub const SKIPPED_DELETED: &str = "mozaiks_projection_skipped_deleted_total";
pub const LEDGER_COMPACTIONS: &str = "mozaiks_ledger_compactions_total";
pub const LEDGER_COMPACTED: &str = "mozaiks_ledger_compacted_charges_total";
pub const LEDGER_READ_RETRIES: &str = "mozaiks_ledger_read_retries_total";
pub const LEDGER_SESSIONS_KILLED: &str = "mozaiks_ledger_sessions_killed_total";

pub fn describe() {
    metrics::describe_histogram!(
        QUERY_SECONDS,
        metrics::Unit::Seconds,
        "MongoDB read latency by operation."
    );
    metrics::describe_histogram!(
        WRITE_SECONDS,
        metrics::Unit::Seconds,
        "MongoDB write latency by operation (projection batches, charges, ledger compactions)."
    );
    metrics::describe_counter!(
        SKIPPED_DELETED,
        "Events not projected because their app was deleted, by app_id."
    );
    metrics::describe_counter!(
        LEDGER_COMPACTIONS,
        "Usage ledger rolls (compare-and-sets of the watermark, and transactions of the previous shape), by outcome (ok, conflict, timeout, error)."
    );
    metrics::describe_counter!(
        LEDGER_COMPACTED,
        "Charges rolled into an app's usage_ledger totals."
    );
    metrics::describe_counter!(
        LEDGER_READ_RETRIES,
        "Usage reads repeated because a roll committed while they ran."
    );
    metrics::describe_counter!(
        LEDGER_SESSIONS_KILLED,
        "Ledger transactions whose abort failed (server stalled), ended with killSessions."
    );
}
