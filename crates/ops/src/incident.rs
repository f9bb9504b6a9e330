//! Incidents and actions as CloudEvents 1.0 (JSON, structured mode) on `MZ_OPS`:
//!
//! - `mz.ops.incident.{rule}.{app_id}`: types `mozaiks.ops.incident.firing` and
//!   `mozaiks.ops.incident.resolved`, data [`Incident`];
//! - `mz.ops.action.{kind}.{app_id}`: types `mozaiks.ops.action.applied` and
//!   `mozaiks.ops.action.reverted`, data [`mozaiks_control::ops_actions::OpsAction`] with its
//!   `status`.
//!
//! Subjects go through [`mozaiks_events::subjects::Subjects::ops`], so they carry the namespace.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use mozaiks_control::ops_actions::OpsAction;
use mozaiks_events::subjects::Subjects;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::policy::{ProposalKind, Severity};

pub const TYPE_FIRING: &str = "mozaiks.ops.incident.firing";
pub const TYPE_RESOLVED: &str = "mozaiks.ops.incident.resolved";
pub const TYPE_ACTION_APPLIED: &str = "mozaiks.ops.action.applied";
pub const TYPE_ACTION_REVERTED: &str = "mozaiks.ops.action.reverted";

/// The subject of an incident of `rule` for `app_id`.
pub fn incident_subject(s: &Subjects, rule: &str, app_id: &str) -> String {
    s.ops(&format!("incident.{rule}.{app_id}"))
}

/// The subject of an action of `kind` on `app_id`.
pub fn action_subject(s: &Subjects, kind: &str, app_id: &str) -> String {
    s.ops(&format!("action.{kind}.{app_id}"))
}

/// A CloudEvents 1.0 envelope (structured JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CloudEvent<T> {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The app id, or `fleet`.
    pub subject: String,
    pub time: DateTime<Utc>,
    pub datacontenttype: String,
    pub data: T,
}

impl<T> CloudEvent<T> {
    pub fn new(source: &str, kind: &str, subject: &str, data: T) -> CloudEvent<T> {
        CloudEvent {
            specversion: "1.0".into(),
            id: Uuid::now_v7().to_string(),
            source: source.into(),
            kind: kind.into(),
            subject: subject.into(),
            time: Utc::now(),
            datacontenttype: "application/json".into(),
            data,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Annotations {
    pub summary: String,
    pub description: String,
    /// The model's short summary ([`crate::summary`]), when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub llm_summary: Option<String>,
    /// The model's suggested playbook: steps for a person, never executed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub playbook: Option<String>,
}

/// A risky action the agent proposes and never executes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Proposal {
    pub kind: ProposalKind,
    pub app_id: String,
    pub reason: String,
}

/// The `data` of an incident event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Incident {
    pub incident_id: String,
    pub rule: String,
    pub status: Status,
    pub severity: Severity,
    pub app_id: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: Annotations,
    pub starts_at: DateTime<Utc>,
    #[serde(default)]
    pub ends_at: Option<DateTime<Utc>>,
    /// `{rule}.{app_id}`: one open incident per rule and app.
    pub fingerprint: String,
    /// The metric values that fired it.
    pub values: BTreeMap<String, f64>,
    /// Safe actions taken (each also an event on `mz.ops.action.{kind}.{app_id}`).
    #[serde(default)]
    pub actions: Vec<OpsAction>,
    /// Risky actions proposed, never executed.
    #[serde(default)]
    pub proposed: Vec<Proposal>,
}

/// The id of the action of `kind` an incident takes: derived from both, so a new leader that
/// finishes a dead leader's incident takes the same action, never a second one.
pub fn action_id(incident_id: &str, kind: &str) -> String {
    let ns = Uuid::parse_str(incident_id).unwrap_or(Uuid::NAMESPACE_OID);
    Uuid::new_v5(&ns, kind.as_bytes()).to_string()
}

/// The `data` of an action event: the action and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ActionEvent {
    #[serde(flatten)]
    pub action: OpsAction,
    /// `applied`, `reverted` (by hand) or `expired` (at its TTL).
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_at: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reverted_by: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_carry_rule_kind_and_app() {
        let s = Subjects::new("t1");
        assert_eq!(
            incident_subject(&s, "noisy_neighbour", "x"),
            "t1.mz.ops.incident.noisy_neighbour.x"
        );
        assert_eq!(
            action_subject(&s, "throttle", "x"),
            "t1.mz.ops.action.throttle.x"
        );
    }

    #[test]
    fn an_incidents_action_ids_are_stable_and_distinct() {
        let i = Uuid::now_v7().to_string();
        assert_eq!(action_id(&i, "throttle"), action_id(&i, "throttle"));
        assert_ne!(action_id(&i, "throttle"), action_id(&i, "notify"));
    }

    #[test]
    fn the_cloudevent_has_the_required_attributes() {
        let e = CloudEvent::new("mozaiks/ops/x", TYPE_FIRING, "app1", serde_json::json!({}));
        let v = serde_json::to_value(&e).unwrap();
        for k in [
            "specversion",
            "id",
            "source",
            "type",
            "subject",
            "time",
            "data",
        ] {
            assert!(v.get(k).is_some(), "{k}");
        }
        assert_eq!(v["specversion"], "1.0");
    }
}
