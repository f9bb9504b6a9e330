//! Metric names of the control plane. Labels stay bounded: `app_id` yes, never a user or chat.

pub const APP_COMMANDS: &str = "mozaiks_app_commands_total";
pub const APP_EVENTS: &str = "mozaiks_app_events_appended_total";
pub const APP_CONFLICTS: &str = "mozaiks_app_append_conflicts_total";
pub const VIEW_WRITE_FAILURES: &str = "mozaiks_app_view_write_failures_total";
pub const VIEWS_RECONCILED: &str = "mozaiks_app_views_reconciled_total";
pub const RATE_LIMITED: &str = "mozaiks_rate_limited_total";

pub fn describe() {
    metrics::describe_counter!(
        APP_COMMANDS,
        "App commands handled, by command and outcome."
    );
    metrics::describe_counter!(APP_EVENTS, "App events appended to MZ_CTL, by type.");
    metrics::describe_counter!(
        APP_CONFLICTS,
        "App appends refused by optimistic concurrency (another writer first)."
    );
    metrics::describe_counter!(
        VIEW_WRITE_FAILURES,
        "App views that could not be written to MZ_APPS after their events were appended (reconcile repairs them)."
    );
    metrics::describe_counter!(
        VIEWS_RECONCILED,
        "App views rewritten from MZ_CTL by the reconcile loop because MZ_APPS was behind."
    );
    metrics::describe_counter!(
        RATE_LIMITED,
        "Requests refused by requests_per_minute, by app_id."
    );
}
