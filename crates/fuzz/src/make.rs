//! Values built from fuzzer bytes ([`Unstructured`]): strings biased toward the shapes the
//! parsers care about (empty, control characters, dots, long), JSON values, envelopes and
//! commands of every type.

use arbitrary::{Result, Unstructured};
use chrono::{DateTime, Utc};
use mozaiks_events::*;
use serde_json::{Map, Number, Value};
use uuid::Uuid;

/// A string: often a plausible identifier, sometimes hostile (control characters, `.`/`*`/`>`,
/// non-ASCII, whitespace only, long).
pub fn string(u: &mut Unstructured) -> Result<String> {
    Ok(match u.int_in_range(0..=7u8)? {
        0 => String::new(),
        1 => ["default", "c1", "hello", "alice", "auth0|abc", "a-b_C9"][u.choose_index(6)?].into(),
        2 => {
            let c = *u.choose(&['\n', '\r', '\0', '\t', '\u{7f}', '\u{85}', '\u{2028}', ' '])?;
            format!("a{c}b")
        }
        3 => ["a.b", "a*", ">", "é", "  ", "a b", "💥", "\u{feff}x"][u.choose_index(8)?].into(),
        // Around the limits: ids (64, 128), client_msg_id (128), text (32 KiB), deltas (64 KiB).
        // The long ones are rarer: copying them dominated the cost of an input.
        4 => {
            let n = if u.ratio(1u8, 16)? {
                *u.choose(&[32_768, 32_769, 65_537])?
            } else {
                *u.choose(&[63, 64, 65, 127, 128, 129])?
            };
            "x".repeat(n)
        }
        _ => u.arbitrary::<String>()?,
    })
}

fn opt<T>(
    u: &mut Unstructured,
    f: impl FnOnce(&mut Unstructured) -> Result<T>,
) -> Result<Option<T>> {
    Ok(if u.arbitrary()? { Some(f(u)?) } else { None })
}

/// A JSON value of bounded depth (numbers include u64 past i64 and non-integral floats).
pub fn json(u: &mut Unstructured, depth: u32) -> Result<Value> {
    let top = if depth == 0 { 5 } else { 7 };
    Ok(match u.int_in_range(0..=top)? {
        0 => Value::Null,
        1 => Value::Bool(u.arbitrary()?),
        2 => Value::Number(Number::from(u.arbitrary::<i64>()?)),
        3 => Value::Number(Number::from(u.arbitrary::<u64>()?)),
        4 => Number::from_f64(u.arbitrary()?).map_or(Value::Null, Value::Number),
        5 => Value::String(string(u)?),
        6 => {
            let n = u.int_in_range(0..=4u8)?;
            Value::Array((0..n).map(|_| json(u, depth - 1)).collect::<Result<_>>()?)
        }
        _ => Value::Object(object(u, depth - 1)?),
    })
}

/// A JSON object of bounded depth.
pub fn object(u: &mut Unstructured, depth: u32) -> Result<Map<String, Value>> {
    let n = u.int_in_range(0..=4u8)?;
    let mut m = Map::new();
    for _ in 0..n {
        m.insert(string(u)?, json(u, depth)?);
    }
    Ok(m)
}

fn uuid(u: &mut Unstructured) -> Result<Uuid> {
    Ok(Uuid::from_u128(u.arbitrary()?))
}

/// A timestamp between 1970 and 2200 with nanoseconds (what workers write; chrono's RFC 3339
/// form does not carry years past 9999).
fn ts(u: &mut Unstructured) -> Result<DateTime<Utc>> {
    let secs = u.int_in_range(0..=7_258_118_400i64)?;
    let nanos = u.int_in_range(0..=999_999_999u32)?;
    Ok(DateTime::from_timestamp(secs, nanos).unwrap_or_default())
}

/// An event of any type.
pub fn event(u: &mut Unstructured) -> Result<Event> {
    let run_id = uuid(u)?;
    let step = u.arbitrary()?;
    Ok(match u.int_in_range(0..=18u8)? {
        0 => Event::SessionStarted(SessionStarted {
            context: object(u, 2)?,
        }),
        1 => Event::MessageUser(MessageUser {
            text: string(u)?,
            client_msg_id: opt(u, string)?,
        }),
        2 => Event::RunStarted(RunStarted {
            run_id,
            trigger_seq: u.arbitrary()?,
        }),
        3 => Event::StepStarted(StepStarted {
            run_id,
            step,
            agent: string(u)?,
        }),
        4 => Event::AgentMessage(AgentMessage {
            run_id,
            step,
            agent: string(u)?,
            text: string(u)?,
            // `Some(null)` is written as null and read back as absent: workers never write it
            // (a structured reply is an object).
            structured: opt(u, |u| json(u, 2))?.filter(|v| !v.is_null()),
        }),
        5 => Event::ToolCall(ToolCall {
            run_id,
            step,
            call_id: string(u)?,
            tool: string(u)?,
            arguments: json(u, 2)?,
        }),
        6 => Event::ToolResult(ToolResult {
            run_id,
            step,
            call_id: string(u)?,
            tool: string(u)?,
            result: json(u, 2)?,
            error: opt(u, string)?,
        }),
        7 => Event::UsageCharged(UsageCharged {
            run_id,
            step,
            agent: string(u)?,
            model: string(u)?,
            prompt_tokens: u.arbitrary()?,
            completion_tokens: u.arbitrary()?,
            total_tokens: u.arbitrary()?,
            purpose: opt(u, string)?,
            credits: opt(u, |u| u.arbitrary())?,
            price: None,
        }),
        8 => Event::StepCompleted(StepCompleted {
            run_id,
            step,
            agent: string(u)?,
            next: opt(u, string)?,
        }),
        9 => Event::ChildSpawned(ChildSpawned {
            run_id,
            child_chat_id: string(u)?,
            workflow: string(u)?,
            step,
            index: u.arbitrary()?,
            input: string(u)?,
        }),
        10 => Event::ChildCompleted(ChildCompleted {
            run_id,
            child_chat_id: string(u)?,
            step,
            index: u.arbitrary()?,
            status: string(u)?,
            output: json(u, 2)?,
        }),
        11 => Event::InputRequested(InputRequested {
            run_id,
            request_id: string(u)?,
            prompt: string(u)?,
        }),
        12 => Event::RunCompleted(RunCompleted {
            run_id,
            steps: u.arbitrary()?,
            output: string(u)?,
        }),
        13 => Event::RunFailed(RunFailed {
            run_id,
            code: string(u)?,
            reason: string(u)?,
        }),
        14 => Event::RunCancelled(RunCancelled {
            run_id,
            reason: string(u)?,
        }),
        15 => Event::ModelReplied(ModelReplied {
            run_id,
            step,
            round: u.arbitrary()?,
            agent: string(u)?,
            model: string(u)?,
            text: string(u)?,
            tool_calls: (0..u.int_in_range(0..=3u8)?)
                .map(|_| {
                    Ok(RequestedToolCall {
                        call_id: string(u)?,
                        tool: string(u)?,
                        arguments: json(u, 2)?,
                    })
                })
                .collect::<Result<_>>()?,
            prompt_tokens: u.arbitrary()?,
            completion_tokens: u.arbitrary()?,
        }),
        16 => Event::SpeakerSelected(SpeakerSelected {
            run_id,
            step,
            from: string(u)?,
            next: opt(u, string)?,
            reason: string(u)?,
            by: opt(u, string)?,
            detail: opt(u, string)?,
        }),
        17 => Event::ContextUpdated(ContextUpdated {
            run_id,
            key: string(u)?,
            value: json(u, 2)?,
            source: string(u)?,
            call_id: opt(u, string)?,
        }),
        _ => Event::InputReceived(InputReceived {
            run_id,
            request_id: string(u)?,
            text: string(u)?,
        }),
    })
}

/// An envelope of any event type, of any version this reader accepts.
pub fn envelope(u: &mut Unstructured) -> Result<Envelope> {
    Ok(Envelope {
        v: u.int_in_range(0..=ENVELOPE_VERSION)?,
        event_id: uuid(u)?,
        app_id: string(u)?,
        chat_id: string(u)?,
        user_id: string(u)?,
        workflow: string(u)?,
        seq: u.arbitrary()?,
        ts: ts(u)?,
        parent_chat_id: opt(u, string)?,
        causation_id: opt(u, uuid)?,
        event: event(u)?,
    })
}

/// A command of any type.
pub fn command(u: &mut Unstructured) -> Result<CommandEnvelope> {
    let command = match u.int_in_range(0..=4u8)? {
        0 => Command::StartSession {
            context: object(u, 2)?,
            parent_chat_id: opt(u, string)?,
            message: opt(u, string)?,
        },
        1 => Command::UserMessage {
            text: string(u)?,
            client_msg_id: opt(u, string)?,
        },
        2 => Command::InputResponse {
            request_id: opt(u, string)?,
            text: string(u)?,
        },
        3 => Command::Cancel { reason: string(u)? },
        _ => Command::ChildFinished {
            child_chat_id: string(u)?,
            status: string(u)?,
            output: string(u)?,
        },
    };
    Ok(CommandEnvelope {
        v: u.arbitrary()?,
        command_id: uuid(u)?,
        app_id: string(u)?,
        chat_id: string(u)?,
        user_id: string(u)?,
        workflow: string(u)?,
        ts: ts(u)?,
        command,
    })
}

/// A delta message (not necessarily valid).
pub fn delta(u: &mut Unstructured) -> Result<DeltaMessage> {
    Ok(DeltaMessage {
        v: u.int_in_range(0..=ENVELOPE_VERSION + 1)?,
        id: uuid(u)?,
        app_id: string(u)?,
        chat_id: string(u)?,
        ts: ts(u)?,
        delta: AgentDelta {
            run_id: opt(u, uuid)?,
            step: u.arbitrary()?,
            round: u.arbitrary()?,
            agent: string(u)?,
            offset: u.arbitrary()?,
            text: string(u)?,
        },
    })
}

/// A client frame (not necessarily valid).
pub fn client_frame(u: &mut Unstructured) -> Result<ClientFrame> {
    Ok(match u.int_in_range(0..=3u8)? {
        0 => ClientFrame::UserMessage {
            text: string(u)?,
            client_msg_id: opt(u, string)?,
        },
        1 => ClientFrame::InputResponse {
            request_id: opt(u, string)?,
            text: string(u)?,
        },
        2 => ClientFrame::Cancel {
            reason: opt(u, string)?,
        },
        _ => ClientFrame::Ping {},
    })
}
