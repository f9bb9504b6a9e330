//! What a run needs next, and the events of a model's reply or a tool's result. Pure.

use mozaiks_events::{
    AgentMessage, ContextUpdated, Event, InputRequested, ModelReplied, RunCompleted, RunStarted,
    SpeakerSelected, StepCompleted, StepStarted, ToolCall, ToolResult, UsageCharged,
};
use mozaiks_packs::{ASK_USER, Pack, Pattern, SET_CONTEXT, TERMINATE};
use uuid::Uuid;

use super::{Call, Chat, Reply, Round, Run};

/// Model calls per agent turn at most (each answers the previous call's tool results).
pub const MAX_ROUNDS: u32 = 8;

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
            return Next::Emit(self.select(pack, run));
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
        let derived = derived_events(run, round);
        if !derived.is_empty() {
            return Next::Emit(derived);
        }
        for call in &round.calls {
            if let Some(next) = self.tool_step(pack, run, call) {
                return next;
            }
        }
        if round.calls.is_empty() || round.round >= MAX_ROUNDS {
            return Next::Emit(self.select(pack, run));
        }
        self.call_model(run, round.round + 1)
    }

    fn call_model(&self, run: &Run, round: u32) -> Next {
        Next::CallModel {
            run_id: run.run_id,
            step: run.step,
            agent: run.agent.clone(),
            round,
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
                        request_id: call.call_id.clone(),
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

    /// The events that end the current turn: who speaks next, and why.
    fn select(&self, pack: &Pack, run: &Run) -> Vec<Event> {
        let message = &run.last_output;
        let (next, reason) = if pack
            .terminate_when
            .iter()
            .any(|c| c.holds(&self.context, message))
        {
            (None, "terminate_when")
        } else {
            let agent = pack.agent(&run.agent);
            let by_condition = agent.and_then(|a| {
                a.handoff
                    .conditions
                    .iter()
                    .find(|h| h.when.holds(&self.context, message))
            });
            let (target, reason) = match (by_condition, pack.pattern) {
                (Some(h), _) => (Some(h.target.clone()), "condition"),
                (None, Pattern::RoundRobin | Pattern::Auto) => {
                    let i = pack
                        .agents
                        .iter()
                        .position(|a| a.name == run.agent)
                        .unwrap_or(0);
                    let next = &pack.agents[(i + 1) % pack.agents.len()];
                    (Some(next.name.clone()), "round_robin")
                }
                (None, Pattern::Sequential) => (
                    agent.and_then(|a| a.handoff.after_work.clone()),
                    "after_work",
                ),
            };
            match target.filter(|t| t != TERMINATE) {
                Some(_) if run.step >= pack.max_turns => (None, "max_turns"),
                t => (t, reason),
            }
        };
        vec![
            Event::SpeakerSelected(SpeakerSelected {
                run_id: run.run_id,
                step: run.step,
                from: run.agent.clone(),
                next: next.clone(),
                reason: reason.into(),
            }),
            step_completed(run, next),
        ]
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

/// `agent.message`, `usage.charged` and `tool.call` events of a recorded reply not yet durable.
fn derived_events(run: &Run, round: &Round) -> Vec<Event> {
    let mut events = Vec::new();
    if !round.charged {
        if !round.message_done && !round.text.is_empty() {
            events.push(Event::AgentMessage(AgentMessage {
                run_id: run.run_id,
                step: run.step,
                agent: run.agent.clone(),
                text: round.text.clone(),
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
