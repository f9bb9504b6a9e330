//! Metric names of the ops agent (bounded labels: rule, kind, status, outcome; never app ids).

/// Counter: rule evaluations by this replica while it led.
pub const EVALUATIONS: &str = "mozaiks_ops_evaluations_total";
/// Counter: incident events appended, by rule and status (`firing`, `resolved`).
pub const INCIDENTS: &str = "mozaiks_ops_incidents_total";
/// Counter: actions by kind and event (`applied`, `expired`, `adopted`).
pub const ACTIONS: &str = "mozaiks_ops_actions_total";
/// Counter: webhook notifications by outcome (`sent`, `failed`).
pub const NOTIFICATIONS: &str = "mozaiks_ops_notifications_total";
/// Counter: approvals of risky actions by kind and event (`requested`, `expired`).
pub const APPROVALS: &str = "mozaiks_ops_approvals_total";
/// Counter: requests of the gateway's `/api/ops/*` endpoints, by endpoint and outcome.
pub const API: &str = "mozaiks_ops_api_requests_total";
/// Gauge: incidents open, as the leader sees them.
pub const OPEN_INCIDENTS: &str = "mozaiks_ops_open_incidents";
/// Counter: takeovers (this replica became the leader and adopted the open incidents).
pub const TAKEOVERS: &str = "mozaiks_ops_takeovers_total";
/// Counter: polls of the fleets given with `--poll`, by outcome (`ok`, `failed`).
pub const POLLS: &str = "mozaiks_ops_polls_total";

pub fn describe() {
    metrics::describe_counter!(EVALUATIONS, "Rule evaluations by the ops leader.");
    metrics::describe_counter!(
        INCIDENTS,
        "Incident events appended to MZ_OPS, by rule and status."
    );
    metrics::describe_counter!(ACTIONS, "Ops actions, by kind and event.");
    metrics::describe_counter!(
        NOTIFICATIONS,
        "Webhook notifications of the ops agent, by outcome."
    );
    metrics::describe_counter!(
        APPROVALS,
        "Approvals of risky actions proposed by the ops agent, by kind and event."
    );
    metrics::describe_counter!(
        API,
        "Requests of the /api/ops endpoints, by endpoint and outcome."
    );
    metrics::describe_gauge!(
        OPEN_INCIDENTS,
        "Incidents open, as the ops leader sees them."
    );
    metrics::describe_counter!(
        POLLS,
        "Polls of the fleets given with --poll (/api/health, /health/active-runs, /metrics/perf/aggregate), by outcome."
    );
    metrics::describe_counter!(
        TAKEOVERS,
        "Times this replica became the ops leader and adopted the open incidents."
    );
}
