//! What a run needs next, and the events of a model's reply or a tool's result. Pure.

use mozaiks_events::{
    AgentMessage, ContextUpdated, Event, InputRequested, ModelReplied, RunCompleted, RunFailed,
    RunStarted, SpeakerSelected, StepCompleted, StepStarted, ToolCall, ToolResult, UsageCharged,
};
use mozaiks_packs::{ASK_USER, Agent, Pack, Pattern, SET_CONTEXT, TERMINATE};
use uuid::Uuid;

use super::{Call, Chat, Reply, Round, Run};

/// Model calls per agent turn at most (each answers the previous call's tool results).
pub const MAX_ROUNDS: u32 = 8;

/// The `round` of a speaker-selection call (`pattern: auto`); an agent's calls count from 1.
pub const SELECT_SPEAKER_ROUND: u32 = 0;

/// `source` of the `context.updated` that stores a structured output in `output_into` (not a
/// valid tool name).
pub const OUTPUT_SOURCE: &str = "agent.output";

/// `run.failed` code when an agent's reply did not match its `output_schema`, twice.
pub const INVALID_STRUCTURED_OUTPUT: &str = "invalid_structured_output";

/// What a model call is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Purpose {
    /// A round of the agent's turn: its reply is the agent's speech or tool calls.
    Turn,
    /// `pattern: auto`'s speaker selection after `agent`'s turn (round
    /// [`SELECT_SPEAKER_ROUND`]): the reply names the next agent; it is not the agent's speech.
    SelectSpeaker,
}

/// What the run needs next.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing to do until a command arrives (no run, or the run waits for input).
    Idle,
    /// Append these events.
    Emit(Vec<Event>),
    /// Ask the model for `agent`'s turn.
    CallModel {
        run_id: Uuid,
        step: u32,
        agent: String,
        round: u32,
        /// [`Purpose::SelectSpeaker`] for round [`SELECT_SPEAKER_ROUND`].
        purpose: Purpose,
    },
    /// The run waits for these child chats to end (their `child.finished` commands). Like
    /// `Idle` for the worker, which checks the children's logs once when it takes the chat over.
    AwaitChildren {
        run_id: Uuid,
        step: u32,
        pending: Vec<super::PendingChild>,
    },
    /// Call the pack's HTTP tool, then append [`Chat::on_tool_result`].
    CallTool {
        run_id: Uuid,
        step: u32,
        call_id: String,
        tool: String,
        arguments: serde_json::Value,
    },
}

impl Next {
    /// Nothing to do until a command arrives.
    pub fn is_idle(&self) -> bool {
        matches!(self, Next::Idle | Next::AwaitChildren { .. })
    }
}

impl Chat {
    /// What the run needs next. `new_run_id` is used if a run starts.
    pub fn next(&self, pack: &Pack, new_run_id: Uuid) -> Next {
        let Some(run) = &self.run else {
            return match self.pending.front() {
                Some((trigger_seq, _)) if self.started => Next::Emit(vec![
                    Event::RunStarted(RunStarted {
                        run_id: new_run_id,
                        trigger_seq: *trigger_seq,
                    }),
                    Event::StepStarted(StepStarted {
                        run_id: new_run_id,
                        step: 1,
                        agent: pack.start_agent.clone(),
                    }),
                ]),
                _ => Next::Idle,
            };
        };
        if run.step == 0 {
            return Next::Emit(vec![Event::StepStarted(StepStarted {
                run_id: run.run_id,
                step: 1,
                agent: pack.start_agent.clone(),
            })]);
        }
        if let Some(next) = &run.completed_next {
            return match next {
                Some(agent) => Next::Emit(vec![Event::StepStarted(StepStarted {
                    run_id: run.run_id,
                    step: run.step + 1,
                    agent: agent.clone(),
                })]),
                None => Next::Emit(vec![Event::RunCompleted(RunCompleted {
                    run_id: run.run_id,
                    steps: run.step,
                    output: run.last_output.clone(),
                })]),
            };
        }
        if let Some(next) = &run.selected {
            return Next::Emit(vec![step_completed(run, next.clone())]);
        }
        if run.waiting.is_some() {
            return Next::Idle;
        }
        let Some(agent) = pack.agent(&run.agent) else {
            return Next::Idle;
        };
        if run.spoke {
            return self.end_turn(pack, run);
        }
        if agent.human_input {
            return match &run.human_answer {
                None => Next::Emit(vec![Event::InputRequested(InputRequested {
                    run_id: run.run_id,
                    request_id: format!("{}:{}", run.run_id, run.step),
                    prompt: if agent.system_message.is_empty() {
                        format!("{} needs your input.", agent.name)
                    } else {
                        agent.system_message.clone()
                    },
                })]),
                Some(text) => Next::Emit(vec![Event::AgentMessage(AgentMessage {
                    run_id: run.run_id,
                    step: run.step,
                    agent: agent.name.clone(),
                    text: text.clone(),
                    structured: None,
                })]),
            };
        }
        if let Some(spec) = &agent.children
            && run.rounds.is_empty()
            && let Some(next) = self.fan_out(agent, spec, run)
        {
            return next;
        }
        let Some(round) = run.rounds.last() else {
            return self.call_model(run, 1);
        };
        let output = structured_output(agent, round);
        let derived = derived_events(run, round, output.as_ref());
        if !derived.is_empty() {
            return Next::Emit(derived);
        }
        for call in &round.calls {
            if let Some(next) = self.tool_step(pack, run, call) {
                return next;
            }
        }
        match output {
            Some(Ok(value)) => {
                if let Some(key) = &agent.output_into
                    && !run.output_stored
                {
                    return Next::Emit(vec![Event::ContextUpdated(ContextUpdated {
                        run_id: run.run_id,
                        key: key.clone(),
                        value,
                        source: OUTPUT_SOURCE.into(),
                        call_id: None,
                    })]);
                }
            }
            Some(Err(error)) => {
                let failures = run
                    .rounds
                    .iter()
                    .filter(|r| matches!(structured_output(agent, r), Some(Err(_))))
                    .count();
                if failures < 2 {
                    // One retry, with the error in the prompt (see `model::prompt`).
                    return self.call_model(run, round.round + 1);
                }
                return Next::Emit(vec![Event::RunFailed(RunFailed {
                    run_id: run.run_id,
                    code: INVALID_STRUCTURED_OUTPUT.into(),
                    reason: format!(
                        "agent {:?} answered twice without output matching its output_schema: {error}",
                        agent.name
                    ),
                })]);
            }
            None => {}
        }
        if round.calls.is_empty() || round.round >= MAX_ROUNDS {
            return self.end_turn(pack, run);
        }
        self.call_model(run, round.round + 1)
    }

    fn call_model(&self, run: &Run, round: u32) -> Next {
        Next::CallModel {
            run_id: run.run_id,
            step: run.step,
            agent: run.agent.clone(),
            round,
            purpose: Purpose::Turn,
        }
    }

    /// The next thing to do for one tool call, if it is not finished.
    fn tool_step(&self, pack: &Pack, run: &Run, call: &Call) -> Option<Next> {
        match &call.result {
            Some(Ok(value)) if !call.context_done => {
                let update = |key: String, value: serde_json::Value| {
                    Some(Next::Emit(vec![Event::ContextUpdated(ContextUpdated {
                        run_id: run.run_id,
                        key,
                        value,
                        source: call.tool.clone(),
                        call_id: Some(call.call_id.clone()),
                    })]))
                };
                if call.tool == SET_CONTEXT {
                    // The result of set_context is `{key, value}`.
                    let key = value.get("key").and_then(|k| k.as_str())?.to_string();
                    return update(key, value.get("value").cloned().unwrap_or_default());
                }
                let var = pack.tool(&call.tool)?.sets_context.clone()?;
                update(var, value.clone())
            }
            Some(_) => None,
            None if call.tool == ASK_USER => match &call.answer {
                Some(text) => Some(Next::Emit(self.on_tool_result(
                    pack,
                    &call.call_id,
                    Ok(serde_json::Value::String(text.clone())),
                ))),
                None => {
                    let prompt = match call.arguments.get("question") {
                        Some(serde_json::Value::String(q)) if !q.is_empty() => q.clone(),
                        _ => {
                            return Some(Next::Emit(self.on_tool_result(
                                pack,
                                &call.call_id,
                                Err("ask_user needs a non-empty string `question`".into()),
                            )));
                        }
                    };
                    Some(Next::Emit(vec![Event::InputRequested(InputRequested {
                        run_id: run.run_id,
                        request_id: ask_user_request_id(run.run_id, &call.call_id),
                        prompt,
                    })]))
                }
            },
            None => {
                if call.tool == SET_CONTEXT {
                    return Some(Next::Emit(self.on_tool_result(
                        pack,
                        &call.call_id,
                        set_context(&call.arguments),
                    )));
                }
                let allowed = pack
                    .agent(&run.agent)
                    .is_some_and(|a| a.tools.contains(&call.tool));
                let tool = pack.tool(&call.tool).filter(|_| allowed);
                let Some(tool) = tool else {
                    return Some(Next::Emit(self.on_tool_result(
                        pack,
                        &call.call_id,
                        Err(format!(
                            "unknown tool {:?} for agent {:?}",
                            call.tool, run.agent
                        )),
                    )));
                };
                if let Some(lookup) = &tool.lookup {
                    return Some(Next::Emit(self.on_tool_result(
                        pack,
                        &call.call_id,
                        lookup.run(&call.arguments),
                    )));
                }
                Some(Next::CallTool {
                    run_id: run.run_id,
                    step: run.step,
                    call_id: call.call_id.clone(),
                    tool: call.tool.clone(),
                    arguments: call.arguments.clone(),
                })
            }
        }
    }

    /// The end of the current turn: who speaks next, and why. Rules first (terminate
    /// conditions, handoff conditions, the pattern); with `pattern: auto` and no rule, a
    /// speaker-selection call, its charge, then its choice.
    fn end_turn(&self, pack: &Pack, run: &Run) -> Next {
        let Some((next, reason)) = self.by_rule(pack, run) else {
            return self.auto_select(pack, run);
        };
        Next::Emit(selected(run, next, reason, None, None))
    }

    /// The next speaker by the pack's rules, or `None` when the model chooses.
    fn by_rule(&self, pack: &Pack, run: &Run) -> Option<(Option<String>, &'static str)> {
        let message = &run.last_output;
        if pack
            .terminate_when
            .iter()
            .any(|c| c.holds(&self.context, message))
        {
            return Some((None, "terminate_when"));
        }
        let agent = pack.agent(&run.agent);
        let by_condition = agent.and_then(|a| {
            a.handoff
                .conditions
                .iter()
                .find(|h| h.when.holds(&self.context, message))
        });
        let (target, reason) = match (by_condition, pack.pattern) {
            (Some(h), _) => (Some(h.target.clone()), "condition"),
            (None, Pattern::RoundRobin) => (Some(next_in_order(pack, &run.agent)), "round_robin"),
            (None, Pattern::Sequential) => (
                agent.and_then(|a| a.handoff.after_work.clone()),
                "after_work",
            ),
            (None, Pattern::Auto) if run.step >= pack.max_turns => (None, "max_turns"),
            (None, Pattern::Auto) => return None,
        };
        Some(match target.filter(|t| t != TERMINATE) {
            Some(_) if run.step >= pack.max_turns => (None, "max_turns"),
            t => (t, reason),
        })
    }

    /// `pattern: auto`: ask the selector once (its reply is recorded, so a new owner does not
    /// ask again), charge it, then take its choice or fall back.
    fn auto_select(&self, pack: &Pack, run: &Run) -> Next {
        let Some(sel) = &run.selection else {
            return Next::CallModel {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
                round: SELECT_SPEAKER_ROUND,
                purpose: Purpose::SelectSpeaker,
            };
        };
        if !sel.charged {
            return Next::Emit(vec![Event::UsageCharged(UsageCharged {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
                model: sel.model.clone(),
                prompt_tokens: sel.prompt_tokens,
                completion_tokens: sel.completion_tokens,
                total_tokens: sel.prompt_tokens + sel.completion_tokens,
                purpose: Some("speaker_selection".into()),
                credits: None,
                price: None,
            })]);
        }
        if let Some(name) = named_agent(pack, &sel.text) {
            return Next::Emit(selected(run, Some(name), "auto", Some("model"), None));
        }
        let after_work = pack
            .agent(&run.agent)
            .and_then(|a| a.handoff.after_work.clone());
        let (next, via) = match after_work {
            Some(t) => ((t != TERMINATE).then_some(t), "after_work"),
            None => (Some(next_in_order(pack, &run.agent)), "declaration order"),
        };
        let answer: String = sel.text.chars().take(200).collect();
        let detail = format!(
            "the selector answered {answer:?}, which names no agent or several; falling back to {via}"
        );
        Next::Emit(selected(
            run,
            next,
            "auto_fallback",
            Some("model"),
            Some(detail),
        ))
    }

    /// The record of a model's reply for the current step (`round` from [`Next::CallModel`]).
    /// Its derived events (`agent.message`, `usage.charged`, `tool.call`) follow from
    /// [`Chat::next`].
    pub fn on_reply(&self, round: u32, reply: &Reply) -> Vec<Event> {
        let Some(run) = &self.run else {
            return Vec::new();
        };
        vec![Event::ModelReplied(ModelReplied {
            run_id: run.run_id,
            step: run.step,
            round,
            agent: run.agent.clone(),
            model: reply.model.clone(),
            text: reply.text.clone(),
            tool_calls: reply.tool_calls.clone(),
            prompt_tokens: reply.prompt_tokens,
            completion_tokens: reply.completion_tokens,
        })]
    }

    /// The events of a tool's result (an error is a result too: the run goes on).
    pub fn on_tool_result(
        &self,
        _pack: &Pack,
        call_id: &str,
        result: Result<serde_json::Value, String>,
    ) -> Vec<Event> {
        let Some(run) = &self.run else {
            return Vec::new();
        };
        let Some(call) = run
            .rounds
            .last()
            .and_then(|r| r.calls.iter().find(|c| c.call_id == call_id))
        else {
            return Vec::new();
        };
        let (result, error) = match result {
            Ok(v) => (v, None),
            Err(e) => (serde_json::Value::Null, Some(e)),
        };
        vec![Event::ToolResult(ToolResult {
            run_id: run.run_id,
            step: run.step,
            call_id: call.call_id.clone(),
            tool: call.tool.clone(),
            result,
            error,
        })]
    }
}

/// The agent's structured output in a round: `None` when the agent has no `output_schema` or
/// the round called tools (it is not the final answer); else the checked value or the error.
pub fn structured_output(
    agent: &Agent,
    round: &Round,
) -> Option<Result<serde_json::Value, String>> {
    let schema = agent.output_schema.as_ref()?;
    if !round.calls.is_empty() {
        return None;
    }
    Some(mozaiks_packs::output::parse_reply(schema, &round.text))
}

/// `agent.message`, `usage.charged` and `tool.call` events of a recorded reply not yet durable.
/// A reply that fails its agent's output schema is charged but not spoken.
fn derived_events(
    run: &Run,
    round: &Round,
    output: Option<&Result<serde_json::Value, String>>,
) -> Vec<Event> {
    let mut events = Vec::new();
    if !round.charged {
        let speaks = !matches!(output, Some(Err(_)));
        if speaks && !round.message_done && !round.text.is_empty() {
            events.push(Event::AgentMessage(AgentMessage {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
                text: round.text.clone(),
                structured: output.and_then(|o| o.as_ref().ok()).cloned(),
            }));
        }
        events.push(Event::UsageCharged(UsageCharged {
            run_id: run.run_id,
            step: run.step,
            agent: run.agent.clone(),
            model: round.model.clone(),
            prompt_tokens: round.prompt_tokens,
            completion_tokens: round.completion_tokens,
            total_tokens: round.prompt_tokens + round.completion_tokens,
            purpose: None,
            credits: None,
            price: None,
        }));
    }
    for c in round.calls.iter().filter(|c| !c.called) {
        events.push(Event::ToolCall(ToolCall {
            run_id: run.run_id,
            step: run.step,
            call_id: c.call_id.clone(),
            tool: c.tool.clone(),
            arguments: c.arguments.clone(),
        }));
    }
    events
}

/// The agent after `name` in declaration order (wrapping).
fn next_in_order(pack: &Pack, name: &str) -> String {
    let i = pack.agents.iter().position(|a| a.name == name).unwrap_or(0);
    pack.agents[(i + 1) % pack.agents.len()].name.clone()
}

/// The agent a selector's answer names: the whole answer (quotes and punctuation aside), else
/// the only agent it mentions as a word (AG2's rule; several mentioned is no answer).
fn named_agent(pack: &Pack, answer: &str) -> Option<String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
    let bare = answer.trim().trim_matches(|c: char| !is_word(c));
    if let Some(a) = pack.agent(bare) {
        return Some(a.name.clone());
    }
    let mentioned: Vec<&str> = pack
        .agents
        .iter()
        .map(|a| a.name.as_str())
        .filter(|name| {
            answer.match_indices(name).any(|(i, _)| {
                let before = answer[..i].chars().next_back();
                let after = answer[i + name.len()..].chars().next();
                !before.is_some_and(is_word) && !after.is_some_and(is_word)
            })
        })
        .collect();
    match mentioned.as_slice() {
        [one] => Some(one.to_string()),
        _ => None,
    }
}

/// `speaker.selected` and `step.completed`.
fn selected(
    run: &Run,
    next: Option<String>,
    reason: &str,
    by: Option<&str>,
    detail: Option<String>,
) -> Vec<Event> {
    vec![
        Event::SpeakerSelected(SpeakerSelected {
            run_id: run.run_id,
            step: run.step,
            from: run.agent.clone(),
            next: next.clone(),
            reason: reason.into(),
            by: by.map(String::from),
            detail,
        }),
        step_completed(run, next),
    ]
}

fn step_completed(run: &Run, next: Option<String>) -> Event {
    Event::StepCompleted(StepCompleted {
        run_id: run.run_id,
        step: run.step,
        agent: run.agent.clone(),
        next,
    })
}

/// The built-in `set_context {key, value}`: its result is `{key, value}`.
fn set_context(arguments: &serde_json::Value) -> Result<serde_json::Value, String> {
    let key = match arguments.get("key") {
        Some(serde_json::Value::String(k)) => k,
        _ => return Err("set_context needs a string `key`".into()),
    };
    if let Err(e) = mozaiks_events::ids::check_token("context variable", key) {
        return Err(e.to_string());
    }
    let value = arguments
        .get("value")
        .cloned()
        .unwrap_or(serde_json::Value::Null);
    Ok(serde_json::json!({ "key": key, "value": value }))
}

/// The `request_id` of an `ask_user` call's question: unique in the chat (a model's call ids, like
/// the offline model's `call-{step}-{round}-{i}`, repeat from run to run), so a client answering by
/// `request_id` cannot answer another run's question.
pub(crate) fn ask_user_request_id(run_id: uuid::Uuid, call_id: &str) -> String {
    format!("{run_id}:call:{call_id}")
}

/// The call an `ask_user` question's `request_id` names (logs written before ids were unique
/// carry the bare call id).
pub(crate) fn ask_user_call_id(run_id: uuid::Uuid, request_id: &str) -> &str {
    request_id
        .strip_prefix(&format!("{run_id}:call:"))
        .unwrap_or(request_id)
}
