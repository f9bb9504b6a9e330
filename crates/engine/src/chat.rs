//! The chat aggregate: pure, no I/O.
//!
//! `Chat::apply(event)` folds the log into state; `Chat::handle(command)` decides which events a
//! command produces; `Chat::next(pack)` (in [`run`]) says what the run needs next: events to
//! append, a model call or an HTTP tool call to make, or nothing. The worker only drives this
//! over the bus, so a chat's state is always what its log says, and a worker that takes a chat
//! over continues exactly where the log ends.
//!
//! Exactly-once, by construction: a model call is recorded by one event (`model.replied`) before
//! anything derived from it (`agent.message`, `usage.charged`, `tool.call`), and a tool call by its
//! `tool.result`. A new owner finishes the derived events from the record and never repeats a
//! recorded model call or tool result, so nothing is charged twice.

use std::collections::{HashMap, HashSet, VecDeque};

use mozaiks_events::{
    ChildCompleted, Command, Event, InputReceived, MessageUser, RequestedToolCall, RunCancelled,
    SessionStarted,
};
use mozaiks_packs::Pack;
use uuid::Uuid;

#[cfg(test)]
mod auto_tests;
#[cfg(test)]
mod cancel_tests;
mod children;
#[cfg(test)]
mod children_tests;
pub mod run;
#[cfg(test)]
mod tests;

pub use children::{CHILDREN_SOURCE, PendingChild};
pub use run::{INVALID_STRUCTURED_OUTPUT, Next, OUTPUT_SOURCE, Purpose, SELECT_SPEAKER_ROUND};

/// How many transcript entries the aggregate keeps for model context.
const TRANSCRIPT_WINDOW: usize = 64;

/// Why a command was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the session has not been started")]
    NotStarted,
    #[error("no run is waiting for input")]
    NotWaitingForInput,
    #[error("the run waits for input request {expected:?}, not {got:?}")]
    UnknownRequest { expected: String, got: String },
    #[error("chat {0:?} is not a child of the run in progress")]
    UnknownChild(String),
    #[error("child status {0:?} is not completed, failed or cancelled")]
    InvalidChildStatus(String),
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NotStarted => "not_started",
            Refusal::NotWaitingForInput => "not_waiting_for_input",
            Refusal::UnknownRequest { .. } => "unknown_request",
            Refusal::UnknownChild(_) => "unknown_child",
            Refusal::InvalidChildStatus(_) => "invalid_child_status",
        }
    }
}

/// One tool call of a model reply, and how far it got.
#[derive(Clone, Debug, PartialEq)]
pub struct Call {
    pub call_id: String,
    pub tool: String,
    pub arguments: serde_json::Value,
    /// `tool.call` is durable.
    pub called: bool,
    /// `tool.result` is durable: the result, or the error.
    pub result: Option<Result<serde_json::Value, String>>,
    /// The user's answer, for `ask_user`.
    pub answer: Option<String>,
    /// `context.updated` for this call is durable.
    pub context_done: bool,
}

/// One model call of the current step (`model.replied`), and how far its derived events got.
#[derive(Clone, Debug, PartialEq)]
pub struct Round {
    pub round: u32,
    pub text: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub message_done: bool,
    pub charged: bool,
    pub calls: Vec<Call>,
}

/// The speaker-selection call of the current step (`model.replied` round 0, `pattern: auto`).
#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// The selector's answer.
    pub text: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Its `usage.charged` is durable.
    pub charged: bool,
}

/// An `input.requested` not yet answered.
#[derive(Clone, Debug, PartialEq)]
pub struct Waiting {
    pub request_id: String,
}

/// A child chat spawned by the run (`child.spawned`), and its end (`child.completed`).
#[derive(Clone, Debug, PartialEq)]
pub struct ChildRun {
    pub chat_id: String,
    pub workflow: String,
    pub step: u32,
    pub index: u32,
    pub input: String,
    /// `completed`, `failed` or `cancelled` once `child.completed` is durable.
    pub status: Option<String>,
    pub output: serde_json::Value,
}

/// The run in progress.
#[derive(Clone, Debug, PartialEq)]
pub struct Run {
    pub run_id: Uuid,
    pub trigger_seq: u64,
    /// The text of the message that triggered the run (`{input}`).
    pub input: String,
    /// The current turn (0 before the first step starts).
    pub step: u32,
    /// The agent whose turn it is.
    pub agent: String,
    /// Seq of the current `step.started`; transcript entries before it are history.
    pub step_seq: u64,
    /// Model calls of the current step.
    pub rounds: Vec<Round>,
    /// The agent spoke without a model (human input, or a log from before `model.replied`).
    pub spoke: bool,
    pub waiting: Option<Waiting>,
    /// The answer to a human-input agent's request.
    pub human_answer: Option<String>,
    /// `speaker.selected` of the current step: who is next.
    pub selected: Option<Option<String>>,
    /// Whether the current step completed, and who is next.
    pub completed_next: Option<Option<String>>,
    pub last_output: String,
    /// Children spawned during the run, in spawn order.
    pub children: Vec<ChildRun>,
    /// The current step's children's results are in the context.
    pub children_merged: bool,
    /// The current step's speaker-selection call, once recorded.
    pub selection: Option<Selection>,
    /// The current step's structured output is in its `output_into` variable.
    pub output_stored: bool,
}

/// One transcript entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Turn {
    /// Seq of the event.
    pub seq: u64,
    /// `user` or the agent's name.
    pub speaker: String,
    pub text: String,
}

/// A chat's state, as its log says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chat {
    pub started: bool,
    /// Last per-chat seq applied.
    pub seq: u64,
    pub context: serde_json::Map<String, serde_json::Value>,
    /// Commands already applied (causation ids) with how many of their events the log holds,
    /// for idempotency.
    seen_commands: HashMap<Uuid, usize>,
    seen_client_msg_ids: HashSet<String>,
    /// User messages not yet answered by a run, by seq.
    pub pending: VecDeque<(u64, String)>,
    pub run: Option<Run>,
    pub transcript: VecDeque<Turn>,
    pub runs_completed: u64,
    /// Children a run may have running at once (the app's `max_parallel_children`; 0: no
    /// limit). Set by the worker, not by the log.
    pub max_parallel_children: usize,
}

/// A model's answer for one call.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Reply {
    pub text: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub tool_calls: Vec<RequestedToolCall>,
}

impl Chat {
    /// Folds a chat's events.
    pub fn from_events<'a>(events: impl IntoIterator<Item = (&'a Event, Option<Uuid>)>) -> Chat {
        let mut chat = Chat::default();
        for (e, cause) in events {
            chat.apply(e, cause);
        }
        chat
    }

    /// The model's `{input}`: the message that triggered the run, else the user's latest.
    pub fn last_user_text(&self) -> &str {
        if let Some(run) = &self.run {
            return &run.input;
        }
        self.transcript
            .iter()
            .rev()
            .find(|t| t.speaker == "user")
            .map(|t| t.text.as_str())
            .unwrap_or("")
    }

    fn remember(&mut self, speaker: &str, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.transcript.len() == TRANSCRIPT_WINDOW {
            self.transcript.pop_front();
        }
        self.transcript.push_back(Turn {
            seq: self.seq,
            speaker: speaker.to_string(),
            text: text.to_string(),
        });
    }

    fn call_mut(&mut self, call_id: &str) -> Option<&mut Call> {
        self.run
            .as_mut()?
            .rounds
            .last_mut()?
            .calls
            .iter_mut()
            .find(|c| c.call_id == call_id)
    }

    /// Applies one event (with the id of the command that caused it).
    pub fn apply(&mut self, event: &Event, causation: Option<Uuid>) {
        self.seq += 1;
        if let Some(c) = causation {
            *self.seen_commands.entry(c).or_default() += 1;
        }
        match event {
            Event::SessionStarted(s) => {
                self.started = true;
                self.context = s.context.clone();
            }
            Event::MessageUser(m) => {
                if let Some(id) = &m.client_msg_id {
                    self.seen_client_msg_ids.insert(id.clone());
                }
                self.pending.push_back((self.seq, m.text.clone()));
                self.remember("user", &m.text);
            }
            Event::RunStarted(r) => {
                let input = self
                    .pending
                    .iter()
                    .find(|(s, _)| *s == r.trigger_seq)
                    .map(|(_, t)| t.clone())
                    .unwrap_or_default();
                self.pending.retain(|(s, _)| *s > r.trigger_seq);
                self.run = Some(Run {
                    run_id: r.run_id,
                    trigger_seq: r.trigger_seq,
                    input,
                    step: 0,
                    agent: String::new(),
                    step_seq: self.seq,
                    rounds: Vec::new(),
                    spoke: false,
                    waiting: None,
                    human_answer: None,
                    selected: None,
                    completed_next: None,
                    last_output: String::new(),
                    children: Vec::new(),
                    children_merged: false,
                    selection: None,
                    output_stored: false,
                });
            }
            Event::StepStarted(s) => {
                let seq = self.seq;
                if let Some(run) = self.run.as_mut() {
                    run.step = s.step;
                    run.agent = s.agent.clone();
                    run.step_seq = seq;
                    run.rounds.clear();
                    run.spoke = false;
                    run.waiting = None;
                    run.human_answer = None;
                    run.selected = None;
                    run.completed_next = None;
                    run.children_merged = false;
                    run.selection = None;
                    run.output_stored = false;
                }
            }
            Event::ModelReplied(r) if r.round == SELECT_SPEAKER_ROUND => {
                if let Some(run) = self.run.as_mut() {
                    run.selection = Some(Selection {
                        text: r.text.clone(),
                        model: r.model.clone(),
                        prompt_tokens: r.prompt_tokens,
                        completion_tokens: r.completion_tokens,
                        charged: false,
                    });
                }
            }
            Event::ModelReplied(r) => {
                if let Some(run) = self.run.as_mut() {
                    run.rounds.push(Round {
                        round: r.round,
                        text: r.text.clone(),
                        model: r.model.clone(),
                        prompt_tokens: r.prompt_tokens,
                        completion_tokens: r.completion_tokens,
                        message_done: false,
                        charged: false,
                        calls: r
                            .tool_calls
                            .iter()
                            .map(|c| Call {
                                call_id: c.call_id.clone(),
                                tool: c.tool.clone(),
                                arguments: c.arguments.clone(),
                                called: false,
                                result: None,
                                answer: None,
                                context_done: false,
                            })
                            .collect(),
                    });
                }
            }
            Event::AgentMessage(m) => {
                if let Some(run) = self.run.as_mut() {
                    match run.rounds.last_mut() {
                        Some(round) if !round.message_done => round.message_done = true,
                        _ => run.spoke = true,
                    }
                    run.last_output = m.text.clone();
                }
                self.remember(&m.agent, &m.text);
            }
            Event::UsageCharged(_) => {
                if let Some(sel) = self
                    .run
                    .as_mut()
                    .and_then(|r| r.selection.as_mut())
                    .filter(|s| !s.charged)
                {
                    sel.charged = true;
                } else if let Some(round) = self.run.as_mut().and_then(|r| r.rounds.last_mut()) {
                    round.charged = true;
                    // A model reply without text has no agent.message.
                    round.message_done = true;
                } else if let Some(run) = self.run.as_mut() {
                    // Logs from before `model.replied`: the charge ended the agent's speech.
                    run.spoke = true;
                }
            }
            Event::ToolCall(t) => {
                if let Some(c) = self.call_mut(&t.call_id) {
                    c.called = true;
                }
            }
            Event::ToolResult(t) => {
                if let Some(c) = self.call_mut(&t.call_id) {
                    c.called = true;
                    c.result = Some(match &t.error {
                        Some(e) => Err(e.clone()),
                        None => Ok(t.result.clone()),
                    });
                }
            }
            Event::ContextUpdated(u) => {
                self.context.insert(u.key.clone(), u.value.clone());
                if u.call_id.is_none()
                    && u.source == OUTPUT_SOURCE
                    && let Some(run) = self.run.as_mut()
                {
                    run.output_stored = true;
                }
                if u.call_id.is_none()
                    && u.source == CHILDREN_SOURCE
                    && let Some(run) = self.run.as_mut()
                {
                    run.children_merged = true;
                }
                if let Some(id) = &u.call_id
                    && let Some(c) = self.call_mut(id)
                {
                    c.context_done = true;
                }
            }
            Event::InputRequested(i) => {
                if let Some(run) = self.run.as_mut() {
                    run.waiting = Some(Waiting {
                        request_id: i.request_id.clone(),
                    });
                }
            }
            Event::InputReceived(i) => {
                let run_id = self.run.as_ref().map(|r| r.run_id).unwrap_or_default();
                let call_id = run::ask_user_call_id(run_id, &i.request_id).to_string();
                let is_call = self.call_mut(&call_id).is_some();
                if is_call {
                    if let Some(c) = self.call_mut(&call_id) {
                        c.answer = Some(i.text.clone());
                    }
                } else if let Some(run) = self.run.as_mut() {
                    run.human_answer = Some(i.text.clone());
                }
                if let Some(run) = self.run.as_mut() {
                    run.waiting = None;
                }
            }
            Event::SpeakerSelected(s) => {
                if let Some(run) = self.run.as_mut() {
                    run.selected = Some(s.next.clone());
                }
            }
            Event::StepCompleted(s) => {
                if let Some(run) = self.run.as_mut() {
                    run.completed_next = Some(s.next.clone());
                }
            }
            Event::RunCompleted(_) => {
                self.run = None;
                self.runs_completed += 1;
            }
            Event::RunFailed(_) | Event::RunCancelled(_) => self.run = None,
            Event::ChildSpawned(c) => {
                if let Some(run) = self.run.as_mut() {
                    run.children.push(ChildRun {
                        chat_id: c.child_chat_id.clone(),
                        workflow: c.workflow.clone(),
                        step: c.step,
                        index: c.index,
                        input: c.input.clone(),
                        status: None,
                        output: serde_json::Value::Null,
                    });
                }
            }
            Event::ChildCompleted(c) => {
                if let Some(child) = self
                    .run
                    .as_mut()
                    .and_then(|r| r.children.iter_mut().find(|x| x.chat_id == c.child_chat_id))
                {
                    child.status = Some(c.status.clone());
                    child.output = c.output.clone();
                }
            }
        }
    }

    /// The events of a command of which the log holds only the first `applied`. A command's
    /// events are appended one by one, and the worker can die or lose its connection between
    /// two of them (an append whose acknowledgement was lost may also have landed): the command
    /// is redelivered and produces the rest, so a session's first message is never lost behind
    /// its `session.started`.
    fn rest_of(&self, command_id: Uuid, command: &Command, applied: usize) -> Vec<Event> {
        match command {
            Command::StartSession {
                message: Some(text),
                ..
            } if applied == 1 => vec![Event::MessageUser(MessageUser {
                text: text.clone(),
                client_msg_id: None,
            })],
            // The run a cancel started to cancel it at once (see `handle`).
            Command::Cancel { reason }
                if applied == 1 && self.run.as_ref().is_some_and(|r| r.run_id == command_id) =>
            {
                vec![cancelled(command_id, reason)]
            }
            _ => Vec::new(),
        }
    }

    /// Decides the events a command produces. An already-applied command produces only what
    /// the log does not hold of it yet (see [`Chat::rest_of`]).
    pub fn handle(
        &self,
        command_id: Uuid,
        command: &Command,
        pack: &Pack,
        app_context: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Vec<Event>, Refusal> {
        if let Some(&applied) = self.seen_commands.get(&command_id) {
            return Ok(self.rest_of(command_id, command, applied));
        }
        match command {
            Command::StartSession {
                context, message, ..
            } => {
                if self.started {
                    return Ok(Vec::new());
                }
                // Pack defaults, then the app's, then the request's.
                let mut ctx = pack.context.clone();
                ctx.extend(app_context.clone());
                ctx.extend(context.clone());
                let mut events = vec![Event::SessionStarted(SessionStarted { context: ctx })];
                if let Some(text) = message {
                    events.push(Event::MessageUser(MessageUser {
                        text: text.clone(),
                        client_msg_id: None,
                    }));
                }
                Ok(events)
            }
            Command::UserMessage {
                text,
                client_msg_id,
            } => {
                if !self.started {
                    return Err(Refusal::NotStarted);
                }
                if client_msg_id
                    .as_ref()
                    .is_some_and(|id| self.seen_client_msg_ids.contains(id))
                {
                    return Ok(Vec::new());
                }
                Ok(vec![Event::MessageUser(MessageUser {
                    text: text.clone(),
                    client_msg_id: client_msg_id.clone(),
                })])
            }
            Command::Cancel { reason } => match &self.run {
                Some(run) => Ok(vec![cancelled(run.run_id, reason)]),
                // A run about to start (its message is queued: the run waits for a slot, or a
                // child chat's cancel overtook its start) is cancelled before it does anything;
                // the cancel's id is the run's id.
                None => match self.pending.front() {
                    Some((trigger_seq, _)) if self.started => Ok(vec![
                        Event::RunStarted(mozaiks_events::RunStarted {
                            run_id: command_id,
                            trigger_seq: *trigger_seq,
                        }),
                        cancelled(command_id, reason),
                    ]),
                    _ => Ok(Vec::new()),
                },
            },
            Command::InputResponse { request_id, text } => {
                let Some((run, waiting)) = self
                    .run
                    .as_ref()
                    .and_then(|r| r.waiting.as_ref().map(|w| (r, w)))
                else {
                    return Err(Refusal::NotWaitingForInput);
                };
                if let Some(got) = request_id
                    && *got != waiting.request_id
                {
                    return Err(Refusal::UnknownRequest {
                        expected: waiting.request_id.clone(),
                        got: got.clone(),
                    });
                }
                Ok(vec![Event::InputReceived(InputReceived {
                    run_id: run.run_id,
                    request_id: waiting.request_id.clone(),
                    text: text.clone(),
                })])
            }
            Command::ChildFinished {
                child_chat_id,
                status,
                output,
            } => {
                if !["completed", "failed", "cancelled"].contains(&status.as_str()) {
                    return Err(Refusal::InvalidChildStatus(status.clone()));
                }
                let Some((run, child)) = self.run.as_ref().and_then(|r| {
                    r.children
                        .iter()
                        .find(|c| c.chat_id == *child_chat_id)
                        .map(|c| (r, c))
                }) else {
                    return Err(Refusal::UnknownChild(child_chat_id.clone()));
                };
                if child.status.is_some() {
                    return Ok(Vec::new());
                }
                Ok(vec![Event::ChildCompleted(ChildCompleted {
                    run_id: run.run_id,
                    child_chat_id: child.chat_id.clone(),
                    step: child.step,
                    index: child.index,
                    status: status.clone(),
                    output: serde_json::Value::String(output.clone()),
                })])
            }
        }
    }
}

/// A run cancelled, with the user's reason or the default one.
fn cancelled(run_id: Uuid, reason: &str) -> Event {
    Event::RunCancelled(RunCancelled {
        run_id,
        reason: if reason.is_empty() {
            "cancelled by the user".into()
        } else {
            reason.to_string()
        },
    })
}
