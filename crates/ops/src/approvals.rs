//! Risky actions wait for a person: an incident's proposals (suspend the app, raise its limits,
//! move its storage, scale) become `approval_required` entries, executed only after a
//! superadmin's `POST /api/ops/approvals/{id}/approve`, dropped on reject or at their TTL
//! (`actions.approval.ttl_seconds` of the policy).
//!
//! Each approval is its own subject of `MZ_OPS`, `mz.ops.approval.{app_id}.{approval_id}`, whose
//! events (CloudEvents, types `mozaiks.ops.approval.{status}`) are its history; the last is its
//! state. Every write expects the subject's last sequence, so an approval is requested once (a
//! new leader that requests it again is refused), and decided once (two superadmins approving at
//! the same moment: one wins, the other gets 409) — the decision is recorded *before* the
//! action runs, so it never runs twice.
//!
//! The ops agent never executes an approval; the gateway's handler does, as the approving user.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::incident::CloudEvent;
use crate::journal::{Appended, Error, Journal};
use crate::policy::ProposalKind;

/// The subject of one approval.
pub fn approval_subject(
    s: &mozaiks_events::subjects::Subjects,
    app_id: &str,
    approval_id: &str,
) -> String {
    s.ops(&format!("approval.{app_id}.{approval_id}"))
}

/// The id of the approval an incident requests for `kind`: derived from both, so a takeover
/// requests the same one, never a second.
pub fn approval_id(incident_id: &str, kind: ProposalKind) -> String {
    let ns = Uuid::parse_str(incident_id).unwrap_or(Uuid::NAMESPACE_OID);
    Uuid::new_v5(&ns, format!("approval:{}", kind.as_str()).as_bytes()).to_string()
}

/// Where an approval stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalStatus {
    /// Waiting for a superadmin (`approval_required`).
    #[serde(rename = "approval_required")]
    Pending,
    Approved,
    Rejected,
    /// Not decided within its TTL: dropped.
    Expired,
}

impl ApprovalStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalStatus::Pending => "approval_required",
            ApprovalStatus::Approved => "approved",
            ApprovalStatus::Rejected => "rejected",
            ApprovalStatus::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<ApprovalStatus> {
        [
            ApprovalStatus::Pending,
            ApprovalStatus::Approved,
            ApprovalStatus::Rejected,
            ApprovalStatus::Expired,
        ]
        .into_iter()
        .find(|x| x.as_str() == s)
    }
}

/// An approval as recorded (the `data` of its events).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Approval {
    pub approval_id: String,
    /// The risky action proposed.
    pub kind: ProposalKind,
    pub app_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    pub reason: String,
    /// Who proposed it (`ops:{instance}`).
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    /// Dropped if not decided by then.
    pub expires_at: DateTime<Utc>,
    pub status: ApprovalStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_at: Option<DateTime<Utc>>,
    /// The decision's comment (a reject's reason).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// Whether the approved action ran (recorded after it did).
    #[serde(default)]
    pub executed: bool,
    /// What the approved action did, in a sentence, or why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
}

impl Approval {
    /// The status as of `now`: a pending approval past its TTL reads `expired`.
    pub fn status_at(&self, now: DateTime<Utc>) -> ApprovalStatus {
        if self.status == ApprovalStatus::Pending && now >= self.expires_at {
            ApprovalStatus::Expired
        } else {
            self.status
        }
    }
}

/// The CloudEvents type of an approval event of `status`.
pub fn event_type(status: ApprovalStatus) -> String {
    let s = match status {
        ApprovalStatus::Pending => "requested",
        other => other.as_str(),
    };
    format!("mozaiks.ops.approval.{s}")
}

impl Journal {
    fn approval_subject(&self, a: &Approval) -> String {
        approval_subject(self.bus().subjects(), &a.app_id, &a.approval_id)
    }

    /// Appends `a` as its subject's next event if the subject's last sequence is `expected`
    /// (0: a new approval).
    pub async fn append_approval(&self, a: &Approval, expected: u64) -> Result<Appended, Error> {
        let ev = CloudEvent::new(self.source(), &event_type(a.status), &a.app_id, a.clone());
        let id = format!("appr:{}:{expected}", a.approval_id);
        self.append_expecting(self.approval_subject(a), &id, expected, &ev)
            .await
    }

    /// Requests `a` (status `approval_required`) unless it was requested already. Idempotent.
    pub async fn request_approval(&self, a: &Approval) -> Result<bool, Error> {
        Ok(matches!(self.append_approval(a, 0).await?, Appended::At(_)))
    }

    /// Every approval (of `app_id`, or of every app) as its last event, newest first, with its
    /// subject's sequence; a pending one past its TTL reads `expired`.
    pub async fn approvals(&self, app_id: Option<&str>) -> Result<Vec<(u64, Approval)>, Error> {
        let filter = self
            .bus()
            .subjects()
            .ops(&format!("approval.{}.*", app_id.unwrap_or("*")));
        let now = Utc::now();
        let mut out: Vec<(u64, Approval)> = self
            .read_events::<CloudEvent<Approval>>(filter, true)
            .await?
            .into_iter()
            .map(|(seq, ev)| {
                let mut a = ev.data;
                a.status = a.status_at(now);
                (seq, a)
            })
            .collect();
        out.sort_by_key(|(_, a)| std::cmp::Reverse(a.created_at));
        Ok(out)
    }

    /// One approval by id, as its last event with its sequence (status as recorded).
    pub async fn approval(&self, approval_id: &str) -> Result<Option<(u64, Approval)>, Error> {
        let filter = self
            .bus()
            .subjects()
            .ops(&format!("approval.*.{approval_id}"));
        Ok(self
            .read_events::<CloudEvent<Approval>>(filter, true)
            .await?
            .into_iter()
            .map(|(seq, ev)| (seq, ev.data))
            .next_back())
    }

    /// Records the expiry of every pending approval past its TTL; returns how many.
    pub async fn expire_approvals(&self, by: &str) -> Result<usize, Error> {
        let now = Utc::now();
        let mut n = 0;
        for (seq, a) in self.approvals(None).await? {
            if a.status == ApprovalStatus::Expired && a.decided_at.is_none() {
                let done = Approval {
                    status: ApprovalStatus::Expired,
                    decided_by: Some(by.to_string()),
                    decided_at: Some(now),
                    ..a
                };
                if matches!(self.append_approval(&done, seq).await?, Appended::At(_)) {
                    n += 1;
                }
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(expires_in: i64) -> Approval {
        let now = Utc::now();
        Approval {
            approval_id: "a".into(),
            kind: ProposalKind::SuspendApp,
            app_id: "x".into(),
            incident_id: None,
            rule: None,
            reason: "r".into(),
            requested_by: "ops:test".into(),
            created_at: now,
            expires_at: now + chrono::Duration::seconds(expires_in),
            status: ApprovalStatus::Pending,
            decided_by: None,
            decided_at: None,
            comment: None,
            executed: false,
            outcome: None,
        }
    }

    #[test]
    fn a_pending_approval_past_its_ttl_reads_expired() {
        let now = Utc::now();
        assert_eq!(pending(60).status_at(now), ApprovalStatus::Pending);
        assert_eq!(pending(-1).status_at(now), ApprovalStatus::Expired);
        let decided = Approval {
            status: ApprovalStatus::Rejected,
            ..pending(-1)
        };
        assert_eq!(decided.status_at(now), ApprovalStatus::Rejected);
    }

    #[test]
    fn an_incidents_approval_ids_are_stable_and_distinct() {
        let i = Uuid::now_v7().to_string();
        assert_eq!(
            approval_id(&i, ProposalKind::SuspendApp),
            approval_id(&i, ProposalKind::SuspendApp)
        );
        assert_ne!(
            approval_id(&i, ProposalKind::SuspendApp),
            approval_id(&i, ProposalKind::Scale)
        );
        assert_eq!(
            event_type(ApprovalStatus::Pending),
            "mozaiks.ops.approval.requested"
        );
        assert_eq!(
            ApprovalStatus::parse("approved"),
            Some(ApprovalStatus::Approved)
        );
        assert_eq!(ApprovalStatus::parse("nope"), None);
    }
}
