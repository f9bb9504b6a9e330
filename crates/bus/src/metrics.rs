//! Metric names of the bus.

pub const APPENDS: &str = "mozaiks_bus_appends_total";
pub const APPEND_CONFLICTS: &str = "mozaiks_bus_append_conflicts_total";
pub const APPEND_SECONDS: &str = "mozaiks_bus_append_seconds";
pub const APPEND_BATCHES: &str = "mozaiks_bus_append_batches_total";
pub const APPEND_BATCH_FALLBACKS: &str = "mozaiks_bus_append_batch_fallbacks_total";
pub const COMMANDS_SENT: &str = "mozaiks_bus_commands_sent_total";
pub const BATCH_GETS: &str = "mozaiks_bus_batch_gets_total";
pub const DEAD_LETTERS: &str = "mozaiks_bus_dead_letters_total";
pub const DEFINITIONS_HEALED: &str = "mozaiks_bus_definitions_healed_total";

pub fn describe() {
    metrics::describe_counter!(
        DEAD_LETTERS,
        "Commands that can never apply, moved to MZ_DLQ."
    );
    metrics::describe_counter!(
        DEFINITIONS_HEALED,
        "Times streams, consumers or buckets were found missing on the server and applied again."
    );
    metrics::describe_counter!(APPENDS, "Events appended to chat logs.");
    metrics::describe_counter!(
        APPEND_CONFLICTS,
        "Appends refused because another writer appended to the chat first."
    );
    metrics::describe_histogram!(
        APPEND_SECONDS,
        metrics::Unit::Seconds,
        "Time to append one event, or one atomic batch of a step's events."
    );
    metrics::describe_counter!(
        APPEND_BATCHES,
        "Atomic batches appended (a step's events under one acknowledgement)."
    );
    metrics::describe_counter!(
        APPEND_BATCH_FALLBACKS,
        "Atomic batches the server refused as a whole (nothing stored), appended one event at a time instead."
    );
    metrics::describe_counter!(COMMANDS_SENT, "Commands published to MZ_CMD.");
    metrics::describe_counter!(
        BATCH_GETS,
        "Batched direct-get requests reading a chat's log (catch-ups and reloads; no consumer)."
    );
}
