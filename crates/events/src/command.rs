//! Commands: requests to a chat's owner (a worker). Commands may be refused; events may not.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A command addressed to one chat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CommandEnvelope {
    #[serde(default = "one")]
    pub v: u16,
    /// UUID v7; the JetStream message id unless the command carries its own idempotency key.
    pub command_id: Uuid,
    pub app_id: String,
    pub chat_id: String,
    /// The verified user the command is from.
    pub user_id: String,
    pub workflow: String,
    pub ts: DateTime<Utc>,
    #[serde(flatten)]
    pub command: Command,
}

fn one() -> u16 {
    1
}

/// What is asked.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", content = "data")]
pub enum Command {
    /// Open the chat (idempotent: a started chat ignores it).
    #[serde(rename = "session.start")]
    StartSession {
        #[serde(default)]
        context: serde_json::Map<String, serde_json::Value>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        parent_chat_id: Option<String>,
        /// A first user message, answered right away.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        message: Option<String>,
    },
    /// A user's message (idempotent on `client_msg_id`).
    #[serde(rename = "user.message")]
    UserMessage {
        text: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        client_msg_id: Option<String>,
    },
    /// The user's answer to `input.requested`.
    #[serde(rename = "input.response")]
    InputResponse {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
        text: String,
    },
    /// Stop the current run.
    #[serde(rename = "cancel")]
    Cancel {
        #[serde(default)]
        reason: String,
    },
    /// To a parent chat, from the worker of one of its child chats: the child's run ended.
    /// Idempotent on `child_chat_id`; never sent by clients.
    #[serde(rename = "child.finished")]
    ChildFinished {
        child_chat_id: String,
        /// `completed`, `failed` or `cancelled`.
        status: String,
        /// The child's `run.completed` output (empty otherwise).
        #[serde(default)]
        output: String,
    },
}

impl Command {
    pub fn type_name(&self) -> &'static str {
        match self {
            Command::StartSession { .. } => "session.start",
            Command::UserMessage { .. } => "user.message",
            Command::InputResponse { .. } => "input.response",
            Command::Cancel { .. } => "cancel",
            Command::ChildFinished { .. } => "child.finished",
        }
    }
}
