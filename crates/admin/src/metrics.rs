//! Metric names of the control-plane workflows.

/// Counter: storage moves by `app_id` and `outcome` (`ok`, `error`).
pub const STORAGE_MOVES: &str = "mozaiks_storage_moves_total";
/// Histogram: how long a storage move took, the settle wait included.
pub const STORAGE_MOVE_SECONDS: &str = "mozaiks_storage_move_seconds";

pub fn describe() {
    metrics::describe_counter!(
        STORAGE_MOVES,
        "Storage moves of an app's read models, by app_id and outcome."
    );
    metrics::describe_histogram!(
        STORAGE_MOVE_SECONDS,
        metrics::Unit::Seconds,
        "Time to move an app's read models (copy, switch, settle, catch up)."
    );
}
