//! JSON Schemas of what the ops agent publishes on `MZ_OPS`, for ops agents outside the runtime
//! (`schemas/ops.*.schema.json`, written by `mozaiks schemas`; a test fails when the checked-in
//! copies drift):
//!
//! - `ops.incident.schema.json`: `mz.ops.incident.{rule}.{app_id}` (types
//!   `mozaiks.ops.incident.firing` / `.resolved`);
//! - `ops.action.schema.json`: `mz.ops.action.{kind}.{app_id}` (types `mozaiks.ops.action.applied`
//!   / `.reverted`);
//! - `ops.approval.schema.json`: `mz.ops.approval.{app_id}.{approval_id}` (types
//!   `mozaiks.ops.approval.requested` / `.approved` / `.rejected` / `.expired`).

use schemars::schema_for;

use crate::approvals::Approval;
use crate::incident::{ActionEvent, CloudEvent, Incident};

/// `(file name, pretty JSON)` of every ops schema.
pub fn all() -> Vec<(&'static str, String)> {
    let pretty = |mut s: schemars::Schema, title: &str, description: &str| {
        s.insert("title".into(), title.into());
        s.insert("description".into(), description.into());
        serde_json::to_string_pretty(&s).unwrap_or_default() + "\n"
    };
    vec![
        (
            "ops.incident.schema.json",
            pretty(
                schema_for!(CloudEvent<Incident>),
                "OpsIncident",
                "An incident of the ops agent: a CloudEvent 1.0 (structured JSON) on mz.ops.incident.{rule}.{app_id} of stream MZ_OPS, type mozaiks.ops.incident.firing or mozaiks.ops.incident.resolved. One open incident per rule and app (data.fingerprint).",
            ),
        ),
        (
            "ops.action.schema.json",
            pretty(
                schema_for!(CloudEvent<ActionEvent>),
                "OpsAction",
                "An action of the ops agent: a CloudEvent 1.0 on mz.ops.action.{kind}.{app_id} of stream MZ_OPS, type mozaiks.ops.action.applied or mozaiks.ops.action.reverted (data.status reverted by hand, expired at its TTL).",
            ),
        ),
        (
            "ops.approval.schema.json",
            pretty(
                schema_for!(CloudEvent<Approval>),
                "OpsApproval",
                "A risky action the ops agent proposed: a CloudEvent 1.0 on mz.ops.approval.{app_id}.{approval_id} of stream MZ_OPS, type mozaiks.ops.approval.requested, .approved, .rejected or .expired; the subject's last event is the approval's state.",
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_schema_names_its_subject_and_parses() {
        for (file, text) in super::all() {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert!(
                v["description"].as_str().unwrap().contains("mz.ops."),
                "{file}"
            );
            assert!(v["properties"]["data"].is_object(), "{file}");
        }
    }
}
