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

impl CommandEnvelope {
    /// Layout version written by this code.
    pub const VERSION: u16 = 1;

    /// A new command to `chat_id` of `app_id`, from `user_id`, with a fresh UUID v7 id and the
    /// current time.
    pub fn new(
        app_id: impl Into<String>,
        chat_id: impl Into<String>,
        user_id: impl Into<String>,
        workflow: impl Into<String>,
        command: Command,
    ) -> Self {
        Self {
            v: Self::VERSION,
            command_id: Uuid::now_v7(),
            app_id: app_id.into(),
            chat_id: chat_id.into(),
            user_id: user_id.into(),
            workflow: workflow.into(),
            ts: Utc::now(),
            command,
        }
    }
}

fn one() -> u16 {
    CommandEnvelope::VERSION
}

crate::named_enum! {
    /// What is asked.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(tag = "type", content = "data")]
    pub enum Command {
        /// Open the chat (idempotent: a started chat ignores it).
        StartSession {
            #[serde(default)]
            context: serde_json::Map<String, serde_json::Value>,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            parent_chat_id: Option<String>,
            /// A first user message, answered right away.
            #[serde(default, skip_serializing_if = "Option::is_none")]
            message: Option<String>,
        } = "session.start",
        /// A user's message (idempotent on `client_msg_id`).
        UserMessage {
            text: String,
            #[serde(default, skip_serializing_if = "Option::is_none")]
            client_msg_id: Option<String>,
        } = "user.message",
        /// The user's answer to `input.requested`.
        InputResponse {
            #[serde(default, skip_serializing_if = "Option::is_none")]
            request_id: Option<String>,
            text: String,
        } = "input.response",
        /// Stop the current run.
        Cancel {
            #[serde(default)]
            reason: String,
        } = "cancel",
        /// To a parent chat, from the worker of one of its child chats: the child's run ended.
        /// Idempotent on `child_chat_id`; never sent by clients.
        ChildFinished {
            child_chat_id: String,
            /// `completed`, `failed` or `cancelled`.
            status: String,
            /// The child's `run.completed` output (empty otherwise).
            #[serde(default)]
            output: String,
        } = "child.finished",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_addresses_the_chat_with_a_fresh_v7_id_and_the_current_time() {
        let before = Utc::now();
        let cmd = CommandEnvelope::new(
            "app1",
            "c1",
            "alice",
            "hello",
            Command::Cancel { reason: "r".into() },
        );
        let other = CommandEnvelope::new("app1", "c1", "alice", "hello", cmd.command.clone());
        assert_eq!(cmd.v, CommandEnvelope::VERSION);
        assert_eq!(
            (
                cmd.app_id.as_str(),
                cmd.chat_id.as_str(),
                cmd.user_id.as_str(),
                cmd.workflow.as_str()
            ),
            ("app1", "c1", "alice", "hello")
        );
        assert_eq!(cmd.command_id.get_version_num(), 7);
        assert_ne!(cmd.command_id, other.command_id);
        assert!(cmd.ts >= before && cmd.ts <= Utc::now());
    }
}
