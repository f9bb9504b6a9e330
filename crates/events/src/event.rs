//! The event envelope and the event types.

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Version of the envelope layout. Readers accept every version up to their own.
pub const ENVELOPE_VERSION: u16 = 1;

/// One fact in a chat's log.
///
/// `seq` is per chat, starting at 1 and gapless: the chat's owner assigns it and JetStream's
/// expected-last-subject-sequence check makes sure only one writer wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Envelope {
    /// Envelope layout version ([`ENVELOPE_VERSION`]).
    #[serde(default = "default_version")]
    pub v: u16,
    /// UUID v7, unique per event; also the JetStream message id (dedup).
    pub event_id: Uuid,
    pub app_id: String,
    pub chat_id: String,
    pub user_id: String,
    /// The workflow pack the chat runs.
    pub workflow: String,
    /// Per-chat sequence, from 1, gapless.
    pub seq: u64,
    pub ts: DateTime<Utc>,
    /// The chat that spawned this one, for child workflows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_chat_id: Option<String>,
    /// The command or event that caused this event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub causation_id: Option<Uuid>,
    /// `type` and `data`.
    #[serde(flatten)]
    pub event: Event,
}

fn default_version() -> u16 {
    ENVELOPE_VERSION
}

crate::named_enum! {
    /// The event types. `type` names have exactly two dot-separated parts, because the type is the
    /// last two tokens of the event's subject. Each name is written once, here.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
    #[serde(tag = "type", content = "data")]
    pub enum Event {
        SessionStarted(SessionStarted) = "session.started",
        MessageUser(MessageUser) = "message.user",
        RunStarted(RunStarted) = "run.started",
        StepStarted(StepStarted) = "step.started",
        AgentMessage(AgentMessage) = "agent.message",
        ToolCall(ToolCall) = "tool.call",
        ToolResult(ToolResult) = "tool.result",
        UsageCharged(UsageCharged) = "usage.charged",
        StepCompleted(StepCompleted) = "step.completed",
        ChildSpawned(ChildSpawned) = "child.spawned",
        ChildCompleted(ChildCompleted) = "child.completed",
        InputRequested(InputRequested) = "input.requested",
        RunCompleted(RunCompleted) = "run.completed",
        RunFailed(RunFailed) = "run.failed",
        RunCancelled(RunCancelled) = "run.cancelled",
        ModelReplied(ModelReplied) = "model.replied",
        SpeakerSelected(SpeakerSelected) = "speaker.selected",
        ContextUpdated(ContextUpdated) = "context.updated",
        InputReceived(InputReceived) = "input.received",
    }
}

impl Event {
    /// Whether the event ends a run.
    pub fn ends_run(&self) -> bool {
        matches!(
            self,
            Event::RunCompleted(_) | Event::RunFailed(_) | Event::RunCancelled(_)
        )
    }
}

/// A session was opened.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SessionStarted {
    /// Context variables the chat starts with (app defaults merged with the request's).
    #[serde(default)]
    pub context: serde_json::Map<String, serde_json::Value>,
}

/// A user's message entered the chat.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MessageUser {
    pub text: String,
    /// The client's idempotency key; a repeated key is not appended twice.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_msg_id: Option<String>,
}

/// A run of the workflow began (one per user message that the workflow answers).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunStarted {
    pub run_id: Uuid,
    /// Seq of the `message.user` that triggered the run.
    pub trigger_seq: u64,
}

/// An agent's turn began.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepStarted {
    pub run_id: Uuid,
    /// Turn number within the run, from 1.
    pub step: u32,
    pub agent: String,
}

/// An agent spoke.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentMessage {
    pub run_id: Uuid,
    pub step: u32,
    pub agent: String,
    pub text: String,
    /// For an agent with an `output_schema`: its reply parsed as JSON, checked against the
    /// schema (`text` is the same JSON as written by the model).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structured: Option<serde_json::Value>,
}

/// An agent called a tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolCall {
    pub run_id: Uuid,
    pub step: u32,
    pub call_id: String,
    pub tool: String,
    pub arguments: serde_json::Value,
}

/// A tool answered (or failed: `error` is set and the run goes on).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ToolResult {
    pub run_id: Uuid,
    pub step: u32,
    pub call_id: String,
    pub tool: String,
    #[serde(default)]
    pub result: serde_json::Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Tokens charged for one model call.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct UsageCharged {
    pub run_id: Uuid,
    pub step: u32,
    pub agent: String,
    pub model: String,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// Why the model was called when it was not `agent`'s own turn: `speaker_selection` (the
    /// `auto` pattern asking who speaks after `agent`). Absent for an agent's turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// What the charge costs in credits, computed once when it was appended at the price then in
    /// force (`config/prices.yaml`): `ceil((prompt_tokens × price.prompt + completion_tokens ×
    /// price.completion) / 1,000,000)`. Absent on charges appended before prices existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<u64>,
    /// The price `credits` was computed with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub price: Option<ChargePrice>,
}

/// A model's price: credits per million prompt tokens and per million completion tokens.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ChargePrice {
    pub prompt: u64,
    pub completion: u64,
}

impl ChargePrice {
    /// The credits `prompt_tokens` and `completion_tokens` cost at this price, rounded up
    /// (saturating at `u64::MAX`).
    pub fn cost(&self, prompt_tokens: u64, completion_tokens: u64) -> u64 {
        let micro = u128::from(prompt_tokens) * u128::from(self.prompt)
            + u128::from(completion_tokens) * u128::from(self.completion);
        u64::try_from(micro.div_ceil(1_000_000)).unwrap_or(u64::MAX)
    }
}

/// An agent's turn ended.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct StepCompleted {
    pub run_id: Uuid,
    pub step: u32,
    pub agent: String,
    /// The agent that speaks next, if any (a handoff).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// A child workflow was spawned.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChildSpawned {
    pub run_id: Uuid,
    pub child_chat_id: String,
    pub workflow: String,
    /// The step (agent turn) that spawned it.
    #[serde(default)]
    pub step: u32,
    /// Position among the step's children, from 0.
    #[serde(default)]
    pub index: u32,
    /// The child's first user message.
    #[serde(default)]
    pub input: String,
}

/// A child workflow finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ChildCompleted {
    pub run_id: Uuid,
    pub child_chat_id: String,
    /// The step that spawned the child.
    #[serde(default)]
    pub step: u32,
    /// Position among the step's children, from 0.
    #[serde(default)]
    pub index: u32,
    /// `completed`, `failed` or `cancelled`.
    pub status: String,
    #[serde(default)]
    pub output: serde_json::Value,
}

/// The run waits for the user.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InputRequested {
    pub run_id: Uuid,
    pub request_id: String,
    pub prompt: String,
}

/// The run finished.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCompleted {
    pub run_id: Uuid,
    pub steps: u32,
    /// The last agent message, as the run's output.
    #[serde(default)]
    pub output: String,
}

/// The run failed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunFailed {
    pub run_id: Uuid,
    /// A stable code, e.g. `model_error`, `timeout`.
    pub code: String,
    pub reason: String,
}

/// The run was cancelled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RunCancelled {
    pub run_id: Uuid,
    pub reason: String,
}

/// A model answered one call of an agent's turn: the durable record of the call, written before
/// the `agent.message`, `usage.charged` and `tool.call` events derived from it, so a worker that
/// takes the chat over finishes those instead of calling (and charging) the model again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ModelReplied {
    pub run_id: Uuid,
    pub step: u32,
    /// Model call within the step, from 1 (a turn with tool calls takes several). Round 0 is
    /// the speaker-selection call of `pattern: auto` after the step's agent spoke: its `text` is
    /// the selector's answer, its charge follows, then `speaker.selected` with `by: "model"`.
    pub round: u32,
    pub agent: String,
    pub model: String,
    #[serde(default)]
    pub text: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<RequestedToolCall>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

/// A tool call the model asked for.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RequestedToolCall {
    pub call_id: String,
    pub tool: String,
    pub arguments: serde_json::Value,
}

/// Who speaks next, and why: `condition` (a handoff condition held), `after_work`,
/// `round_robin`, `terminate_when` (a terminate condition held), `max_turns`, and for
/// `pattern: auto`: `auto` (the selector named the agent) or `auto_fallback` (its answer named
/// no agent: the agent's `after_work`, else declaration order; `detail` says why).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct SpeakerSelected {
    pub run_id: Uuid,
    pub step: u32,
    /// The agent whose turn ended.
    pub from: String,
    /// The next agent; none ends the run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
    pub reason: String,
    /// `model` when a speaker-selection call decided (`pattern: auto`); absent for rules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub by: Option<String>,
    /// For `auto_fallback`: the selector's answer and why it was not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// A context variable of the chat changed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ContextUpdated {
    pub run_id: Uuid,
    pub key: String,
    pub value: serde_json::Value,
    /// What changed it, e.g. the tool's name.
    #[serde(default)]
    pub source: String,
    /// The tool call whose result this is, if a tool changed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call_id: Option<String>,
}

/// The user answered an `input.requested`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InputReceived {
    pub run_id: Uuid,
    pub request_id: String,
    pub text: String,
}
