//! Models. The built-in offline model is deterministic and follows the pack's script, so
//! everything runs and is testable without a network; [`openai`] is the OpenAI-compatible
//! streaming client. [`prompt`] turns a chat into the API's messages and tools.

use mozaiks_events::RequestedToolCall;
use mozaiks_packs::{Agent, Pack};

use crate::chat::{Chat, Reply};

pub mod deltas;
pub mod openai;
pub mod prompt;

/// The name the offline model reports in `usage.charged`.
pub const OFFLINE_MODEL: &str = "mozaiks-offline-1";

/// Pieces the offline model splits its text into when asked to stream.
pub const OFFLINE_CHUNKS: usize = 4;

/// A model provider.
#[derive(Clone, Debug, Default)]
pub enum Model {
    /// The built-in deterministic model.
    #[default]
    Offline,
    /// An OpenAI-compatible server.
    OpenAi(openai::Client),
}

/// Why a model call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ModelError {
    /// Stable: `model_unauthorized`, `model_bad_request`, `model_rate_limited`,
    /// `model_unavailable`, `model_timeout`, `model_connection`, `model_bad_stream`,
    /// `model_incomplete`, `model_stream_error`, `model_config`.
    pub code: &'static str,
    pub message: String,
    pub retryable: bool,
}

impl Model {
    /// Produces call `round` of `agent`'s turn in `chat`. The answer's text is also pushed into
    /// `deltas`, piece by piece as it streams, when given.
    pub async fn complete(
        &self,
        pack: &Pack,
        agent: &Agent,
        chat: &Chat,
        round: u32,
        deltas: Option<&deltas::Sink>,
    ) -> Result<Reply, ModelError> {
        if round == crate::chat::SELECT_SPEAKER_ROUND {
            // Not the agent's speech: nothing streams.
            return self.select_speaker(pack, agent, chat).await;
        }
        if let (Model::OpenAi(client), Some(format)) = (self, prompt::response_format(agent)) {
            let model = agent
                .model
                .clone()
                .unwrap_or_else(|| client.default_model().to_string());
            let (messages, tools) = (prompt::messages(agent, chat), prompt::tools(pack, agent));
            return client
                .complete_structured(&model, messages, tools, format, deltas)
                .await;
        }
        match self {
            Model::Offline => {
                let reply = offline_reply(agent, chat, round);
                if let Some(sink) = deltas {
                    // The offline model "streams" its text in a few pieces, like a real one.
                    for piece in deltas::chunks(&reply.text, OFFLINE_CHUNKS) {
                        sink.text(piece);
                    }
                }
                Ok(reply)
            }
            Model::OpenAi(client) => {
                let model = agent
                    .model
                    .clone()
                    .unwrap_or_else(|| client.default_model().to_string());
                client
                    .complete_streaming(
                        &model,
                        prompt::messages(agent, chat),
                        prompt::tools(pack, agent),
                        deltas,
                    )
                    .await
            }
        }
    }

    /// `pattern: auto`'s speaker selection after `agent`'s turn: the offline model answers its
    /// script's `next_speaker` (else the next agent in declaration order); an OpenAI-compatible
    /// model gets AG2's selection prompt ([`prompt::selection`]) without tools, on the pack's
    /// `selector_model`.
    pub async fn select_speaker(
        &self,
        pack: &Pack,
        agent: &Agent,
        chat: &Chat,
    ) -> Result<Reply, ModelError> {
        match self {
            Model::Offline => Ok(offline_selection(pack, agent, chat)),
            Model::OpenAi(client) => {
                let model = pack
                    .selector_model
                    .clone()
                    .unwrap_or_else(|| client.default_model().to_string());
                client
                    .complete(&model, prompt::selection(pack, chat), Vec::new())
                    .await
            }
        }
    }

    /// The provider kind, a bounded metric label.
    pub fn name(&self) -> &'static str {
        match self {
            Model::Offline => "offline",
            Model::OpenAi(_) => "openai",
        }
    }
}

/// Rough token count: one token per 4 bytes, at least one.
pub(crate) fn tokens(text: &str) -> u64 {
    (text.len() as u64).div_ceil(4).max(1)
}

/// Fills `{input}`, `{agent}`, `{context.KEY}` and `{tool.NAME}` in a template.
pub fn fill(template: &str, agent: &Agent, chat: &Chat) -> String {
    let mut text = template
        .replace("{input}", chat.last_user_text())
        .replace("{agent}", &agent.name);
    if !text.contains('{') {
        return text;
    }
    let show = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    for (k, v) in &chat.context {
        text = text.replace(&format!("{{context.{k}}}"), &show(v));
    }
    // Dotted paths into object variables: `{context.request.topic}`.
    let mut from = 0;
    while let Some(i) = text[from..].find("{context.").map(|i| i + from) {
        let Some(len) = text[i..].find('}') else {
            break;
        };
        let path = &text[i + "{context.".len()..i + len];
        match mozaiks_packs::context_path(&chat.context, path) {
            Some(v) => {
                let value = show(v);
                text.replace_range(i..=i + len, &value);
                from = i + value.len();
            }
            None => from = i + len,
        }
    }
    if let Some(run) = &chat.run {
        for call in run.rounds.iter().flat_map(|r| &r.calls) {
            let value = match &call.result {
                Some(Ok(v)) => show(v),
                Some(Err(e)) => format!("error: {e}"),
                None => continue,
            };
            text = text.replace(&format!("{{tool.{}}}", call.tool), &value);
        }
    }
    text
}

fn fill_value(v: &serde_json::Value, agent: &Agent, chat: &Chat) -> serde_json::Value {
    match v {
        serde_json::Value::String(s) => serde_json::Value::String(fill(s, agent, chat)),
        serde_json::Value::Array(a) => a.iter().map(|x| fill_value(x, agent, chat)).collect(),
        serde_json::Value::Object(m) => m
            .iter()
            .map(|(k, x)| (k.clone(), fill_value(x, agent, chat)))
            .collect::<serde_json::Map<_, _>>()
            .into(),
        other => other.clone(),
    }
}

/// The offline model's answer. The first call of a turn returns the script's `tool_calls` (if
/// any); otherwise the `reply` template, filled in (see [`fill`]).
pub fn offline_reply(agent: &Agent, chat: &Chat, round: u32) -> Reply {
    let step = chat.run.as_ref().map(|r| r.step).unwrap_or(0);
    let (text, tool_calls) = if round == 1 && !agent.offline.tool_calls.is_empty() {
        let calls = agent
            .offline
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| RequestedToolCall {
                call_id: format!("call-{step}-{round}-{i}"),
                tool: c.tool.clone(),
                arguments: fill_value(&c.arguments, agent, chat),
            })
            .collect();
        (String::new(), calls)
    } else if let Some(schema) = &agent.output_schema {
        // JSON whose strings are templates, or the smallest value matching the schema.
        let value = match agent.offline.reply.as_deref().map(serde_json::from_str) {
            Some(Ok(v)) => fill_value(&v, agent, chat),
            _ => mozaiks_packs::output::sample(schema),
        };
        (value.to_string(), Vec::new())
    } else {
        let template = agent
            .offline
            .reply
            .as_deref()
            .unwrap_or("{agent}: I received \"{input}\".");
        (fill(template, agent, chat), Vec::new())
    };
    let prompt: usize = agent.system_message.len()
        + chat
            .transcript
            .iter()
            .map(|t| t.text.len() + t.speaker.len())
            .sum::<usize>();
    Reply {
        prompt_tokens: (prompt as u64).div_ceil(4).max(1),
        completion_tokens: tokens(&text) + tool_calls.len() as u64,
        text,
        model: OFFLINE_MODEL.to_string(),
        tool_calls,
    }
}

/// The offline speaker selector's answer after `agent`'s turn: its script's `next_speaker`,
/// filled in, else the next agent in declaration order.
pub fn offline_selection(pack: &Pack, agent: &Agent, chat: &Chat) -> Reply {
    let text = match &agent.offline.next_speaker {
        Some(template) => fill(template, agent, chat),
        None => {
            let i = pack
                .agents
                .iter()
                .position(|a| a.name == agent.name)
                .unwrap_or(0);
            pack.agents[(i + 1) % pack.agents.len()].name.clone()
        }
    };
    let prompt: usize = pack
        .agents
        .iter()
        .map(|a| a.name.len() + a.description.len())
        .chain(
            chat.transcript
                .iter()
                .map(|t| t.text.len() + t.speaker.len()),
        )
        .sum();
    Reply {
        prompt_tokens: (prompt as u64).div_ceil(4).max(1),
        completion_tokens: tokens(&text),
        text,
        model: OFFLINE_MODEL.to_string(),
        tool_calls: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mozaiks_events::{Event, MessageUser, SessionStarted};

    #[test]
    fn offline_model_is_deterministic_and_fills_the_template() {
        let agent: Agent = serde_norway::from_str(
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
        let a = offline_reply(&agent, &chat, 1);
        let b = offline_reply(&agent, &chat, 1);
        assert_eq!(a, b);
        assert_eq!(a.text, "a hears hello in calm tone");
        assert!(a.prompt_tokens > 0 && a.completion_tokens > 0);
    }

    #[test]
    fn offline_model_calls_scripted_tools_first_then_replies() {
        let agent: Agent = serde_norway::from_str(
            "name: a\ntools: [set_context]\noffline:\n  tool_calls: [{tool: set_context, arguments: {key: k, value: '{input}!'}}]\n  reply: done",
        )
        .unwrap();
        let msg = Event::MessageUser(MessageUser {
            text: "hi".into(),
            client_msg_id: None,
        });
        let chat = Chat::from_events([(&msg, None)]);
        let first = offline_reply(&agent, &chat, 1);
        assert_eq!(first.text, "");
        assert_eq!(first.tool_calls.len(), 1);
        assert_eq!(
            first.tool_calls[0].arguments,
            serde_json::json!({"key": "k", "value": "hi!"})
        );
        let second = offline_reply(&agent, &chat, 2);
        assert_eq!(second.text, "done");
        assert!(second.tool_calls.is_empty());
    }

    #[test]
    fn offline_selection_and_structured_replies_follow_the_pack() {
        let pack = Pack::parse(
            std::path::Path::new("p/workflow.yaml"),
            "p",
            "name: p\nstart_agent: a\npattern: auto\nagents:\n  - name: a\n    output_schema: {type: object, properties: {topic: {type: string}, said: {type: string}}, required: [topic, said]}\n    output_into: req\n    offline:\n      reply: '{\"topic\": \"b\", \"said\": \"{input}\"}'\n      next_speaker: '{context.req.topic}'\n  - name: b\n    output_schema: {type: object, properties: {n: {type: integer}, ok: {type: boolean}}, required: [n, ok]}\n",
        )
        .unwrap();
        let mut ctx = serde_json::Map::new();
        ctx.insert("req".into(), serde_json::json!({"topic": "b"}));
        let started = Event::SessionStarted(SessionStarted { context: ctx });
        let msg = Event::MessageUser(MessageUser {
            text: "say \"hi\"".into(),
            client_msg_id: None,
        });
        let chat = Chat::from_events([(&started, None), (&msg, None)]);
        // templates inside JSON strings are filled and stay valid JSON
        let a = offline_reply(&pack.agents[0], &chat, 1);
        let v: serde_json::Value = serde_json::from_str(&a.text).unwrap();
        assert_eq!(v, serde_json::json!({"topic": "b", "said": "say \"hi\""}));
        // without a scripted reply: the smallest value matching the schema
        let b = offline_reply(&pack.agents[1], &chat, 1);
        assert_eq!(b.text, r#"{"n":0,"ok":false}"#);
        // the selector fills a dotted context path; without a script, declaration order
        let sel = offline_selection(&pack, &pack.agents[0], &chat);
        assert_eq!(sel.text, "b");
        assert!(sel.prompt_tokens > 0 && sel.completion_tokens > 0);
        assert_eq!(offline_selection(&pack, &pack.agents[1], &chat).text, "a");
    }
}
