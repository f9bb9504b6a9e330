//! JSON Schemas of the wire types, generated from the Rust types into `schemas/`.
//! A test in the workspace root fails when the checked-in copies drift.

use schemars::schema_for;

/// `(file name, pretty JSON)` for every published schema.
pub fn all() -> Vec<(&'static str, String)> {
    let pretty = |s: schemars::Schema| serde_json::to_string_pretty(&s).unwrap_or_default() + "\n";
    vec![
        ("event.schema.json", pretty(schema_for!(crate::Envelope))),
        (
            "command.schema.json",
            pretty(schema_for!(crate::CommandEnvelope)),
        ),
        (
            "frame.server.schema.json",
            pretty(schema_for!(crate::Frame)),
        ),
        (
            "frame.agent-delta.schema.json",
            pretty(schema_for!(crate::AgentDelta)),
        ),
        (
            "frame.client.schema.json",
            pretty(schema_for!(crate::ClientFrame)),
        ),
    ]
}
