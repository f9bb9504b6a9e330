//! Metric names of the workers.

pub const COMMANDS: &str = "mozaiks_worker_commands_total";
pub const RUNS_STARTED: &str = "mozaiks_runs_started_total";
pub const RUNS_ENDED: &str = "mozaiks_runs_ended_total";
pub const ACTIVE_RUNS: &str = "mozaiks_active_runs";
pub const RUN_SECONDS: &str = "mozaiks_run_seconds";
pub const MODEL_SECONDS: &str = "mozaiks_llm_latency_seconds";
pub const TOKENS: &str = "mozaiks_tokens_total";
pub const ACTIVE_CHATS: &str = "mozaiks_worker_active_chats";
pub const TOOL_SECONDS: &str = "mozaiks_tool_seconds";
pub const CHILDREN: &str = "mozaiks_child_workflows_total";
pub const REFUSALS_NOTIFIED: &str = "mozaiks_worker_refusals_notified_total";
pub const LEASES: &str = "mozaiks_worker_chat_leases_total";
pub const LEASES_HELD: &str = "mozaiks_worker_chat_leases_held";
pub const FORWARDED: &str = "mozaiks_worker_commands_forwarded_total";
pub const FORWARDS_RECEIVED: &str = "mozaiks_worker_forwarded_commands_received_total";
pub const RUN_TIMEOUTS: &str = "mozaiks_worker_run_timeouts_total";
pub const COMMAND_ORDER: &str = "mozaiks_worker_command_order_total";
pub const CONSUMER_ERRORS: &str = "mozaiks_worker_consumer_errors_total";
pub const DELTAS_PUBLISHED: &str = "mozaiks_worker_deltas_published_total";
pub const CREDIT_REFUSALS: &str = "mozaiks_worker_credit_refusals_total";

pub fn describe() {
    metrics::describe_counter!(
        CREDIT_REFUSALS,
        "Model calls not made because the app's credits (credits_exhausted) or the user's daily budget (user_budget_exhausted) were spent; each ends its run. By app_id and code."
    );
    metrics::describe_counter!(COMMANDS, "Commands handled, by type and outcome.");
    metrics::describe_counter!(
        COMMAND_ORDER,
        "Commands that waited for an earlier command of their chat (outcome waited), or stopped waiting (gave_up_waiting)."
    );
    metrics::describe_counter!(
        CONSUMER_ERRORS,
        "Errors of the worker's command consumer (each one makes the worker not ready until a pull succeeds)."
    );
    metrics::describe_counter!(RUNS_STARTED, "Workflow runs started, by app_id.");
    metrics::describe_counter!(RUNS_ENDED, "Workflow runs ended, by app_id and outcome.");
    metrics::describe_gauge!(ACTIVE_RUNS, "Runs in progress on this worker, by app_id.");
    metrics::describe_histogram!(RUN_SECONDS, metrics::Unit::Seconds, "Run duration.");
    metrics::describe_histogram!(
        MODEL_SECONDS,
        metrics::Unit::Seconds,
        "Model call latency, by model kind."
    );
    metrics::describe_counter!(
        TOKENS,
        "Tokens charged, by app_id and kind (prompt, completion)."
    );
    metrics::describe_gauge!(ACTIVE_CHATS, "Chats with a live actor on this worker.");
    metrics::describe_counter!(
        CHILDREN,
        "Child workflows, by app_id and event (spawned, cancelled)."
    );
    metrics::describe_counter!(
        REFUSALS_NOTIFIED,
        "Refused client commands reported to the user's sockets, by code."
    );
    metrics::describe_counter!(
        DELTAS_PUBLISHED,
        "Token-delta messages published on core NATS, by outcome (ok, error)."
    );
    metrics::describe_counter!(
        LEASES,
        "Chat ownership leases, by event (acquired, taken_over, released, lost)."
    );
    metrics::describe_gauge!(LEASES_HELD, "Chat ownership leases this worker holds.");
    metrics::describe_counter!(
        FORWARDED,
        "Commands pulled for a chat another worker owns and forwarded to it, by outcome (accepted, not_owner, no_answer)."
    );
    metrics::describe_counter!(
        FORWARDS_RECEIVED,
        "Commands other workers forwarded to this one, by outcome (accepted, not_owner, invalid)."
    );
    metrics::describe_counter!(RUN_TIMEOUTS, "Runs failed with code timeout, by app_id.");
    metrics::describe_histogram!(
        TOOL_SECONDS,
        metrics::Unit::Seconds,
        "HTTP tool call latency, by outcome."
    );
}
