//! Billing's records on the log (`MZ_BILLING`, JSON): credit grants, period starts and alerts.
//!
//! A grant is appended once per idempotency key: its subject ends with a token derived from the
//! key ([`grant_key_token`]) and the append expects no earlier message on that subject, so a
//! second grant with the same key (on any replica, at any time) is refused by the server and
//! answered with the first one.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A top-up of an app's credits (`POST /api/apps/{app_id}/credits`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditGrant {
    /// The grant's id (UUID v7), also its `Nats-Msg-Id`.
    pub grant_id: String,
    pub app_id: String,
    /// Credits granted, at least 1.
    pub amount: u64,
    pub reason: String,
    /// When the grant's unspent credits lapse; `None`: never. Expiring grants are spent first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<DateTime<Utc>>,
    pub idempotency_key: String,
    pub granted_at: DateTime<Utc>,
    /// The `sub` of the superadmin who granted it.
    pub granted_by: String,
}

/// An app's credit period started (recorded once per app and period by billing).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodStarted {
    pub app_id: String,
    /// The period's key (its start, `YYYYMMDDTHHMMSSZ`).
    pub period: String,
    pub period_start: DateTime<Utc>,
    pub period_end: DateTime<Utc>,
    /// The tier's (or the app's) included credits for the period.
    pub included: u64,
}

/// `credits.low` (80 % of the period's credits used) or `credits.exhausted` (100 %), once per
/// threshold per period, on `mz.billing.alert.{app_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreditAlert {
    /// `credits.low` or `credits.exhausted`.
    #[serde(rename = "type")]
    pub kind: String,
    pub app_id: String,
    pub period: String,
    pub included: u64,
    pub granted: u64,
    pub consumed: u64,
    pub balance: i64,
    pub ts: DateTime<Utc>,
}

/// The subject token of an idempotency key: the first 128 bits of its SHA-256, in hex (any key is
/// safe in a subject, and two keys share a token only by a 128-bit collision).
pub fn grant_key_token(key: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key.as_bytes());
    digest[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_tokens_are_stable_subject_tokens() {
        let t = grant_key_token("order 42 / top-up.*>");
        assert_eq!(t.len(), 32);
        assert!(t.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(t, grant_key_token("order 42 / top-up.*>"));
        assert_ne!(t, grant_key_token("order 43 / top-up.*>"));
    }
}
