//! Documents of the read models.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `chat_sessions`: one per chat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SessionDoc {
    pub app_id: String,
    pub chat_id: String,
    pub user_id: String,
    pub workflow_name: String,
    /// `active`, `running`, `waiting_input`, `completed`, `failed` or `cancelled`.
    pub status: String,
    #[serde(default)]
    pub parent_chat_id: Option<String>,
    /// Seq of the last event projected.
    pub last_seq: i64,
    pub last_event_type: String,
    #[serde(with = "bson_datetime")]
    pub created_at: DateTime<Utc>,
    #[serde(with = "bson_datetime")]
    pub updated_at: DateTime<Utc>,
}

/// A chat as its session document names it: enough to address a command to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatRef {
    pub chat_id: String,
    pub user_id: String,
    pub workflow_name: String,
}

/// `chat_messages`: the transcript (user and agent messages, tool calls and results, input
/// requests).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MessageDoc {
    pub app_id: String,
    pub chat_id: String,
    pub seq: i64,
    pub event_id: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// `user`, `agent`, `tool` or `system`.
    pub role: String,
    #[serde(default)]
    pub agent: Option<String>,
    pub user_id: String,
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub data: serde_json::Value,
    #[serde(with = "bson_datetime")]
    pub ts: DateTime<Utc>,
}

/// An app's metered usage: its `usage_ledger` totals plus the charges not rolled into them yet
/// (see [`crate::ledger`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UsageDoc {
    pub app_id: String,
    #[serde(default)]
    pub prompt_tokens: i64,
    #[serde(default)]
    pub completion_tokens: i64,
    #[serde(default)]
    pub total_tokens: i64,
    /// Model calls charged.
    #[serde(default)]
    pub charges: i64,
    /// Distinct runs charged.
    #[serde(default)]
    pub runs: i64,
}

impl UsageDoc {
    pub fn empty(app_id: &str) -> UsageDoc {
        UsageDoc {
            app_id: app_id.to_string(),
            prompt_tokens: 0,
            completion_tokens: 0,
            total_tokens: 0,
            charges: 0,
            runs: 0,
        }
    }
}

/// chrono ⇄ BSON datetime, so dates sort and index as dates.
pub(crate) mod bson_datetime {
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        mongodb::bson::serde_helpers::chrono_datetime_as_bson_datetime::serialize(d, s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let b = mongodb::bson::DateTime::deserialize(d)?;
        Ok(b.to_chrono())
    }
}
