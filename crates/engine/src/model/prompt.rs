//! A chat as the chat-completions API's `messages` and `tools`. Pure.
//!
//! The system message (with `{context.KEY}` filled in) comes first, then the transcript before
//! the current turn: the user's messages as `user`, the agent's own as `assistant`, other
//! agents' as `user` with their `name` (AG2's group-chat view). The current turn's model calls
//! follow in full: `assistant` messages with `tool_calls`, each answered by a `tool` message;
//! a reply that failed the agent's `output_schema` is followed by a `user` message with the
//! error (the one retry).
//!
//! [`selection`] is `pattern: auto`'s speaker-selection prompt (AG2's GroupChat `auto`), and
//! [`response_format`] an agent's structured-output request.

use mozaiks_packs::{ASK_USER, Agent, Pack, SET_CONTEXT};
use serde_json::{Value, json};

use crate::chat::Chat;

pub fn messages(agent: &Agent, chat: &Chat) -> Vec<Value> {
    let mut out = Vec::new();
    let system = super::fill(&agent.system_message, agent, chat);
    if !system.is_empty() {
        out.push(json!({"role": "system", "content": system}));
    }
    let step_seq = chat.run.as_ref().map(|r| r.step_seq).unwrap_or(u64::MAX);
    for turn in chat.transcript.iter().filter(|t| t.seq < step_seq) {
        out.push(if turn.speaker == "user" {
            json!({"role": "user", "content": turn.text})
        } else if turn.speaker == agent.name {
            json!({"role": "assistant", "content": turn.text})
        } else {
            json!({"role": "user", "name": turn.speaker, "content": turn.text})
        });
    }
    if let Some(run) = &chat.run {
        for round in &run.rounds {
            let mut m = json!({"role": "assistant", "content": round.text});
            if !round.calls.is_empty() {
                m["tool_calls"] = round
                    .calls
                    .iter()
                    .map(|c| {
                        json!({
                            "id": c.call_id,
                            "type": "function",
                            "function": {"name": c.tool, "arguments": c.arguments.to_string()},
                        })
                    })
                    .collect();
            }
            out.push(m);
            if let Some(Err(error)) = crate::chat::run::structured_output(agent, round) {
                out.push(json!({"role": "user", "content": format!(
                    "Your reply does not match the required JSON schema: {error}. Answer again with only a JSON value that matches it."
                )}));
            }
            for c in &round.calls {
                let content = match &c.result {
                    Some(Ok(Value::String(s))) => s.clone(),
                    Some(Ok(v)) => v.to_string(),
                    Some(Err(e)) => json!({ "error": e }).to_string(),
                    None => continue,
                };
                out.push(json!({"role": "tool", "tool_call_id": c.call_id, "content": content}));
            }
        }
    }
    out
}

/// `response_format` for an agent with an `output_schema`: a strict JSON schema named after
/// the agent.
pub fn response_format(agent: &Agent) -> Option<Value> {
    let schema = agent.output_schema.as_ref()?;
    Some(json!({
        "type": "json_schema",
        "json_schema": {
            "name": agent.name,
            "schema": mozaiks_packs::output::wire_schema(schema),
            "strict": true,
        },
    }))
}

/// AG2's speaker-selection prompt: a system message with the roles (name: description), the
/// conversation so far (every speaker by name), then the request to name the next role.
pub fn selection(pack: &Pack, chat: &Chat) -> Vec<Value> {
    let roles: Vec<String> = pack
        .agents
        .iter()
        .map(|a| {
            let about = if a.description.is_empty() {
                a.system_message.lines().next().unwrap_or("").to_string()
            } else {
                a.description.clone()
            };
            format!("{}: {}", a.name, about)
        })
        .collect();
    let names: Vec<&str> = pack.agents.iter().map(|a| a.name.as_str()).collect();
    let list = format!("[{}]", names.join(", "));
    let mut out = vec![json!({"role": "system", "content": format!(
        "You are in a role play game. The following roles are available:\n{}.\nRead the following conversation.\nThen select the next role from {list} to play. Only return the role.",
        roles.join("\n")
    )})];
    for turn in &chat.transcript {
        out.push(if turn.speaker == "user" {
            json!({"role": "user", "content": turn.text})
        } else {
            json!({"role": "user", "name": turn.speaker, "content": turn.text})
        });
    }
    out.push(json!({"role": "system", "content": format!(
        "Read the above conversation. Then select the next role from {list} to play. Only return the role."
    )}));
    out
}

/// The function definitions of the tools `agent` may call.
pub fn tools(pack: &Pack, agent: &Agent) -> Vec<Value> {
    agent
        .tools
        .iter()
        .filter_map(|name| {
            let (description, parameters) = match name.as_str() {
                SET_CONTEXT => (
                    "Set a context variable of the conversation.".to_string(),
                    json!({"type": "object", "properties": {
                        "key": {"type": "string", "description": "The variable's name."},
                        "value": {"description": "The new value."}
                    }, "required": ["key", "value"]}),
                ),
                ASK_USER => (
                    "Ask the user a question and wait for the answer.".to_string(),
                    json!({"type": "object", "properties": {
                        "question": {"type": "string"}
                    }, "required": ["question"]}),
                ),
                other => {
                    let t = pack.tool(other)?;
                    (t.description.clone(), t.parameters.clone())
                }
            };
            Some(json!({
                "type": "function",
                "function": {"name": name, "description": description, "parameters": parameters},
            }))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::Reply;
    use mozaiks_events::{Event, MessageUser, RequestedToolCall};
    use std::path::Path;

    #[test]
    fn a_turn_with_tool_calls_becomes_assistant_and_tool_messages() {
        let pack = Pack::parse(
            Path::new("p/workflow.yaml"),
            "p",
            "name: p\nstart_agent: a\ncontext: {tier: gold}\nagents:\n  - name: a\n    system_message: 'Serve a {context.tier} customer.'\n    tools: [set_context]\n    handoff: {after_work: b}\n  - name: b\n",
        )
        .unwrap();
        let mut chat = Chat::default();
        let started = Chat::default()
            .handle(
                uuid::Uuid::now_v7(),
                &mozaiks_events::Command::StartSession {
                    context: Default::default(),
                    parent_chat_id: None,
                    message: Some("hi".into()),
                },
                &pack,
                &Default::default(),
            )
            .unwrap();
        let apply = |chat: &mut Chat, events: Vec<Event>| {
            for e in &events {
                chat.apply(e, None);
            }
        };
        apply(&mut chat, started);
        let crate::chat::Next::Emit(ev) = chat.next(&pack, uuid::Uuid::now_v7()) else {
            panic!()
        };
        apply(&mut chat, ev);
        let reply = Reply {
            tool_calls: vec![RequestedToolCall {
                call_id: "c1".into(),
                tool: "set_context".into(),
                arguments: json!({"key": "k", "value": 1}),
            }],
            model: "m".into(),
            ..Default::default()
        };
        let recorded = chat.on_reply(1, &reply);
        apply(&mut chat, recorded);
        for _ in 0..3 {
            if let crate::chat::Next::Emit(ev) = chat.next(&pack, uuid::Uuid::nil()) {
                apply(&mut chat, ev);
            }
        }
        let m = messages(&pack.agents[0], &chat);
        assert_eq!(
            m[0],
            json!({"role": "system", "content": "Serve a gold customer."})
        );
        assert_eq!(m[1], json!({"role": "user", "content": "hi"}));
        assert_eq!(m[2]["role"], "assistant");
        assert_eq!(m[2]["tool_calls"][0]["function"]["name"], "set_context");
        assert_eq!(
            m[2]["tool_calls"][0]["function"]["arguments"],
            r#"{"key":"k","value":1}"#
        );
        assert_eq!(m[3]["role"], "tool");
        assert_eq!(m[3]["tool_call_id"], "c1");
        assert_eq!(m.len(), 4);
        let t = tools(&pack, &pack.agents[0]);
        assert_eq!(t[0]["function"]["name"], "set_context");
        assert!(tools(&pack, &pack.agents[1]).is_empty());
    }

    #[test]
    fn other_agents_speak_as_named_users() {
        let msg = Event::MessageUser(MessageUser {
            text: "hi".into(),
            client_msg_id: None,
        });
        let run_id = uuid::Uuid::now_v7();
        let said = Event::AgentMessage(mozaiks_events::AgentMessage {
            run_id,
            step: 1,
            agent: "triage".into(),
            text: "routing".into(),
            structured: None,
        });
        let chat = Chat::from_events([(&msg, None), (&said, None)]);
        let agent: Agent = serde_norway::from_str("name: expert").unwrap();
        let m = messages(&agent, &chat);
        assert_eq!(
            m[1],
            json!({"role": "user", "name": "triage", "content": "routing"})
        );
        let me: Agent = serde_norway::from_str("name: triage").unwrap();
        assert_eq!(messages(&me, &chat)[1]["role"], "assistant");
    }
}
