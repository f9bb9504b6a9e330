//! Models. The built-in offline model is deterministic and follows the pack's script, so
//! everything runs and is testable without a network. The OpenAI-compatible client is issue #4.

use mozaiks_packs::Agent;

use crate::chat::{Chat, Reply};

/// The name the offline model reports in `usage.charged`.
pub const OFFLINE_MODEL: &str = "mozaiks-offline-1";

/// A model provider.
#[derive(Clone, Debug, Default)]
pub enum Model {
    /// The built-in deterministic model.
    #[default]
    Offline,
}

/// Why a model call failed.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ModelError {
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl Model {
    /// Produces `agent`'s turn in `chat`.
    pub async fn complete(&self, agent: &Agent, chat: &Chat) -> Result<Reply, ModelError> {
        match self {
            Model::Offline => Ok(offline_reply(agent, chat)),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Model::Offline => "offline",
        }
    }
}

/// Rough token count: one token per 4 bytes, at least one.
fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// The offline model's answer: the agent's `offline.reply` template with `{input}`, `{agent}`
/// and `{context.KEY}` filled in.
pub fn offline_reply(agent: &Agent, chat: &Chat) -> Reply {
    let input = chat.last_user_text();
    let template = agent
        .offline
        .reply
        .clone()
        .unwrap_or_else(|| "{agent}: I received \"{input}\".".to_string());
    let mut text = template
        .replace("{input}", input)
        .replace("{agent}", &agent.name);
    for (k, v) in &chat.context {
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        text = text.replace(&format!("{{context.{k}}}"), &value);
    }
    let prompt: usize = agent.system_message.len()
        + chat
            .transcript
            .iter()
            .map(|t| t.text.len() + t.speaker.len())
            .sum::<usize>();
    Reply {
        prompt_tokens: (prompt as u64).div_ceil(4).max(1),
        completion_tokens: tokens(&text),
        text,
        model: OFFLINE_MODEL.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mozaiks_events::{Event, MessageUser, SessionStarted};

    #[test]
    fn offline_model_is_deterministic_and_fills_the_template() {
        let agent: Agent = serde_yaml::from_str(
            "name: a\nsystem_message: be brief\noffline: {reply: '{agent} hears {input} in {context.tone} tone'}",
        )
        .unwrap();
        let mut ctx = serde_json::Map::new();
        ctx.insert("tone".into(), "calm".into());
        let started = Event::SessionStarted(SessionStarted { context: ctx });
        let msg = Event::MessageUser(MessageUser {
            text: "hello".into(),
            client_msg_id: None,
        });
        let chat = Chat::from_events([(&started, None), (&msg, None)]);
        let a = offline_reply(&agent, &chat);
        let b = offline_reply(&agent, &chat);
        assert_eq!(a, b);
        assert_eq!(a.text, "a hears hello in calm tone");
        assert!(a.prompt_tokens > 0 && a.completion_tokens > 0);
    }
}
