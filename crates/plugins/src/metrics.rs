//! Metric names of the plugins. Labels stay bounded: `app_id` and `plugin` (a name from the
//! fleet's packs or the app's uploads), never a user or request.

pub const EXECUTIONS: &str = "mozaiks_plugin_executions_total";
pub const EXECUTION_SECONDS: &str = "mozaiks_plugin_execution_seconds";
pub const FUEL_USED: &str = "mozaiks_plugin_fuel_used";
pub const COMPILE_SECONDS: &str = "mozaiks_plugin_compile_seconds";
pub const HOST_CALLS: &str = "mozaiks_plugin_host_calls_total";
pub const UPLOADS: &str = "mozaiks_plugin_uploads_total";

pub fn describe() {
    metrics::describe_counter!(
        EXECUTIONS,
        "Plugin executions, by app_id, plugin, via (http, tool) and outcome (ok, plugin_error, plugin_trapped, plugin_timeout)."
    );
    metrics::describe_histogram!(
        EXECUTION_SECONDS,
        metrics::Unit::Seconds,
        "Wall-clock time of a plugin execution (instantiation included), by app_id and plugin."
    );
    metrics::describe_histogram!(
        FUEL_USED,
        "Fuel (about one unit per WebAssembly instruction) burnt by one execution, by app_id and plugin."
    );
    metrics::describe_histogram!(
        COMPILE_SECONDS,
        metrics::Unit::Seconds,
        "Time to compile a plugin module (once per module and replica)."
    );
    metrics::describe_counter!(
        HOST_CALLS,
        "Host function calls with I/O, by call (kv_get, kv_set, kv_delete, http, publish, notify) and outcome."
    );
    metrics::describe_counter!(UPLOADS, "Plugin uploads, by app_id and outcome.");
}
