//! The mapping from a chat's frames to AG-UI events (<https://docs.ag-ui.com/concepts/events>).
//!
//! One [`Mapper`] per stream: it turns each frame the WebSocket would get (a durable event, an
//! `agent.delta`, an `error`, a `resync`, a `notification`) into zero or more AG-UI events, and
//! keeps the little state the mapping needs (the text message being streamed, the last model
//! call's round). Every durable event yields at least one AG-UI event; the last of them carries
//! the event's `seq` as its SSE `id`, so `Last-Event-ID` always names a whole event.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use mozaiks_events::{AgentDelta, Event, Frame};
use serde_json::{Value, json};
use uuid::Uuid;

/// One AG-UI event to write, with the SSE id it carries (the seq of the durable event it ends).
#[derive(Debug, Clone, PartialEq)]
pub struct Out {
    pub id: Option<u64>,
    pub event: Value,
}

/// The assistant message being streamed from deltas.
#[derive(Debug)]
struct Streaming {
    key: (Uuid, u32, u32),
    id: String,
    /// `TEXT_MESSAGE_START` was sent (a message joined mid-way is not streamed).
    started: bool,
    /// The text sent so far (a prefix of the message while `ok`).
    text: String,
    /// Deltas still extend `text` (false after one that does not fit).
    ok: bool,
}

pub struct Mapper {
    thread_id: String,
    streaming: Option<Streaming>,
    /// The last finished streamed message: its late deltas are ignored.
    finished: Option<(Uuid, u32, u32)>,
    /// The round of the last model call of each step (`model.replied`), for message ids.
    rounds: HashMap<(Uuid, u32), u32>,
    /// The id of the last assistant message of each step: tool calls name it as their parent.
    last_message: HashMap<(Uuid, u32), String>,
}

fn message_id(run_id: Uuid, step: u32, round: u32) -> String {
    format!("{run_id}.{step}.{round}")
}

fn ms(ts: DateTime<Utc>) -> i64 {
    ts.timestamp_millis()
}

/// A JSON Pointer token (RFC 6901).
fn pointer(key: &str) -> String {
    format!("/{}", key.replace('~', "~0").replace('/', "~1"))
}

impl Mapper {
    pub fn new(chat_id: &str) -> Mapper {
        Mapper {
            thread_id: chat_id.to_string(),
            streaming: None,
            finished: None,
            rounds: HashMap::new(),
            last_message: HashMap::new(),
        }
    }

    /// The AG-UI events of one frame.
    pub fn frame(&mut self, frame: &Frame) -> Vec<Out> {
        let ts = ms(frame.ts);
        let mut out: Vec<Value> = Vec::new();
        match frame.seq {
            Some(seq) => {
                let typed = serde_json::from_value::<Event>(
                    json!({"type": frame.kind, "data": frame.data}),
                );
                match typed {
                    Ok(event) => self.event(frame, &event, ts, &mut out),
                    // A type this gateway does not know (a newer writer): passed on as is.
                    Err(_) => out.push(custom(&frame.kind, frame.data.clone(), ts)),
                }
                let n = out.len();
                return out
                    .into_iter()
                    .enumerate()
                    .map(|(i, event)| Out {
                        id: (i + 1 == n).then_some(seq),
                        event,
                    })
                    .collect();
            }
            None if frame.kind == "agent.delta" => {
                if let Ok(d) = serde_json::from_value::<AgentDelta>(frame.data.clone()) {
                    self.delta(&d, ts, &mut out);
                }
            }
            None => out.push(custom(&frame.kind, frame.data.clone(), ts)),
        }
        out.into_iter()
            .map(|event| Out { id: None, event })
            .collect()
    }

    fn event(&mut self, frame: &Frame, event: &Event, ts: i64, out: &mut Vec<Value>) {
        let thread = self.thread_id.clone();
        match event {
            Event::SessionStarted(s) => out.push(json!({
                "type": "STATE_SNAPSHOT", "snapshot": s.context, "timestamp": ts,
            })),
            Event::MessageUser(m) => {
                text_message(&frame.id.to_string(), "user", &m.text, ts, out);
            }
            Event::InputReceived(m) => {
                text_message(&frame.id.to_string(), "user", &m.text, ts, out);
            }
            Event::RunStarted(r) => out.push(json!({
                "type": "RUN_STARTED", "threadId": thread, "runId": r.run_id.to_string(), "timestamp": ts,
            })),
            Event::StepStarted(s) => out.push(json!({
                "type": "STEP_STARTED", "stepName": s.agent, "timestamp": ts,
            })),
            Event::StepCompleted(s) => out.push(json!({
                "type": "STEP_FINISHED", "stepName": s.agent, "timestamp": ts,
            })),
            Event::ModelReplied(r) => {
                if r.round > 0 {
                    self.rounds.insert((r.run_id, r.step), r.round);
                }
                out.push(custom(&frame.kind, frame.data.clone(), ts));
            }
            Event::AgentMessage(m) => {
                let round = self.rounds.get(&(m.run_id, m.step)).copied().unwrap_or(1);
                let key = (m.run_id, m.step, round);
                let id = self.agent_message(key, &frame.id.to_string(), &m.text, ts, out);
                self.last_message.insert((m.run_id, m.step), id);
            }
            Event::ToolCall(c) => {
                let mut start = json!({
                    "type": "TOOL_CALL_START", "toolCallId": c.call_id, "toolCallName": c.tool, "timestamp": ts,
                });
                if let Some(parent) = self.last_message.get(&(c.run_id, c.step)) {
                    start["parentMessageId"] = json!(parent);
                }
                out.push(start);
                out.push(json!({
                    "type": "TOOL_CALL_ARGS", "toolCallId": c.call_id, "delta": c.arguments.to_string(), "timestamp": ts,
                }));
                out.push(json!({"type": "TOOL_CALL_END", "toolCallId": c.call_id, "timestamp": ts}));
            }
            Event::ToolResult(r) => {
                let content = match (&r.error, &r.result) {
                    (Some(e), _) => json!({"error": e}).to_string(),
                    (None, Value::String(s)) => s.clone(),
                    (None, v) => v.to_string(),
                };
                out.push(json!({
                    "type": "TOOL_CALL_RESULT", "messageId": frame.id.to_string(), "toolCallId": r.call_id,
                    "content": content, "role": "tool", "timestamp": ts,
                }));
            }
            Event::ContextUpdated(c) => out.push(json!({
                "type": "STATE_DELTA",
                "delta": [{"op": "add", "path": pointer(&c.key), "value": c.value}],
                "timestamp": ts,
            })),
            Event::RunCompleted(r) => {
                self.end_streaming(ts, out);
                out.push(json!({
                    "type": "RUN_FINISHED", "threadId": thread, "runId": r.run_id.to_string(),
                    "result": r.output, "timestamp": ts,
                }));
            }
            Event::RunFailed(r) => {
                self.end_streaming(ts, out);
                out.push(json!({"type": "RUN_ERROR", "message": r.reason, "code": r.code, "timestamp": ts}));
            }
            Event::RunCancelled(r) => {
                self.end_streaming(ts, out);
                let message = if r.reason.is_empty() {
                    "the run was cancelled"
                } else {
                    &r.reason
                };
                out.push(json!({"type": "RUN_ERROR", "message": message, "code": "cancelled", "timestamp": ts}));
            }
            // No AG-UI counterpart: passed on as CUSTOM events named by their type.
            Event::UsageCharged(_)
            | Event::ChildSpawned(_)
            | Event::ChildCompleted(_)
            | Event::InputRequested(_)
            | Event::SpeakerSelected(_) => out.push(custom(&frame.kind, frame.data.clone(), ts)),
        }
    }

    /// A durable `agent.message`: ends the message its deltas streamed, or sends it whole.
    /// Returns the message's id.
    fn agent_message(
        &mut self,
        key: (Uuid, u32, u32),
        event_id: &str,
        text: &str,
        ts: i64,
        out: &mut Vec<Value>,
    ) -> String {
        let streamed = self.streaming.take_if(|s| s.key == key && s.started);
        self.finished = Some(key);
        if let Some(s) = streamed {
            if let Some(rest) = text.strip_prefix(s.text.as_str()) {
                if !rest.is_empty() {
                    out.push(content(&s.id, rest, ts));
                }
                out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": s.id, "timestamp": ts}));
                return s.id;
            }
            // The streamed text went astray (a model call retried with another answer): close
            // it and send the message whole under the event's id.
            out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": s.id, "timestamp": ts}));
            text_message(event_id, "assistant", text, ts, out);
            return event_id.to_string();
        }
        self.end_streaming(ts, out);
        let id = message_id(key.0, key.1, key.2);
        text_message(&id, "assistant", text, ts, out);
        id
    }

    /// A token delta: starts or extends the streamed assistant message.
    fn delta(&mut self, d: &AgentDelta, ts: i64, out: &mut Vec<Value>) {
        let Some(run_id) = d.run_id else { return };
        let key = (run_id, d.step, d.round);
        if self.finished == Some(key) {
            return;
        }
        if self.streaming.as_ref().is_none_or(|s| s.key != key) {
            self.end_streaming(ts, out);
            let id = message_id(run_id, d.step, d.round);
            let started = d.offset == 0;
            if started {
                out.push(json!({"type": "TEXT_MESSAGE_START", "messageId": id, "role": "assistant", "timestamp": ts}));
            }
            self.streaming = Some(Streaming {
                key,
                id,
                started,
                text: String::new(),
                ok: started,
            });
        }
        let Some(s) = self.streaming.as_mut() else {
            return;
        };
        if !s.ok {
            return;
        }
        let offset = usize::try_from(d.offset).unwrap_or(usize::MAX);
        let fresh = if offset == s.text.len() {
            Some(d.text.as_str())
        } else if offset < s.text.len() {
            // A merged delta that overlaps what was sent: only its tail is new, if it agrees.
            let sent = &s.text[offset.min(s.text.len())..];
            d.text.strip_prefix(sent)
        } else {
            None
        };
        match fresh {
            Some("") => {}
            Some(t) => {
                s.text.push_str(t);
                out.push(content(&s.id, t, ts));
            }
            // A gap (missed deltas) or another answer: the durable message finishes it.
            None => s.ok = false,
        }
    }

    /// Closes a streamed message whose `agent.message` will not come (the run ended).
    fn end_streaming(&mut self, ts: i64, out: &mut Vec<Value>) {
        if let Some(s) = self.streaming.take()
            && s.started
        {
            out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": s.id, "timestamp": ts}));
        }
    }
}

fn content(id: &str, delta: &str, ts: i64) -> Value {
    json!({"type": "TEXT_MESSAGE_CONTENT", "messageId": id, "delta": delta, "timestamp": ts})
}

/// A whole text message: start, content (AG-UI refuses an empty delta) and end.
fn text_message(id: &str, role: &str, text: &str, ts: i64, out: &mut Vec<Value>) {
    out.push(json!({"type": "TEXT_MESSAGE_START", "messageId": id, "role": role, "timestamp": ts}));
    if !text.is_empty() {
        out.push(content(id, text, ts));
    }
    out.push(json!({"type": "TEXT_MESSAGE_END", "messageId": id, "timestamp": ts}));
}

fn custom(name: &str, value: Value, ts: i64) -> Value {
    json!({"type": "CUSTOM", "name": name, "value": value, "timestamp": ts})
}

#[cfg(test)]
mod tests {
    use super::*;
    use mozaiks_events::{AgentMessage, Envelope, MessageUser, RunStarted, ToolCall};

    fn env(seq: u64, event: Event) -> Frame {
        Frame::from_envelope(&Envelope {
            v: 1,
            event_id: Uuid::now_v7(),
            app_id: "a".into(),
            chat_id: "c".into(),
            user_id: "u".into(),
            workflow: "w".into(),
            seq,
            ts: Utc::now(),
            parent_chat_id: None,
            causation_id: None,
            event,
        })
    }

    fn delta(run_id: Uuid, offset: u64, text: &str) -> Frame {
        Frame::delta(
            Uuid::now_v7(),
            Utc::now(),
            &AgentDelta {
                run_id: Some(run_id),
                step: 1,
                round: 1,
                agent: "assistant".into(),
                offset,
                text: text.into(),
            },
        )
    }

    fn kinds(out: &[Out]) -> Vec<&str> {
        out.iter()
            .map(|o| o.event["type"].as_str().unwrap())
            .collect()
    }

    #[test]
    fn a_durable_event_ends_with_its_seq_as_the_sse_id() {
        let mut m = Mapper::new("c");
        let out = m.frame(&env(
            2,
            Event::MessageUser(MessageUser {
                text: "hi".into(),
                client_msg_id: None,
            }),
        ));
        assert_eq!(
            kinds(&out),
            [
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END"
            ]
        );
        let ids: Vec<_> = out.iter().map(|o| o.id).collect();
        assert_eq!(ids, [None, None, Some(2)]);
        assert_eq!(out[0].event["role"], "user");
        let run_id = Uuid::now_v7();
        let out = m.frame(&env(
            3,
            Event::RunStarted(RunStarted {
                run_id,
                trigger_seq: 2,
            }),
        ));
        assert_eq!(out[0].event["threadId"], "c");
        assert_eq!(out[0].event["runId"], run_id.to_string());
        assert_eq!(out[0].id, Some(3));
    }

    #[test]
    fn deltas_stream_a_message_that_its_agent_message_ends() {
        let mut m = Mapper::new("c");
        let run_id = Uuid::now_v7();
        let mut out = m.frame(&delta(run_id, 0, "Hel"));
        out.extend(m.frame(&delta(run_id, 3, "lo")));
        // A merged delta that overlaps what was sent adds only its tail.
        out.extend(m.frame(&delta(run_id, 3, "lo, w")));
        out.extend(m.frame(&env(
            9,
            Event::AgentMessage(AgentMessage {
                run_id,
                step: 1,
                agent: "assistant".into(),
                text: "Hello, world".into(),
                structured: None,
            }),
        )));
        // Late deltas of a finished message are ignored.
        out.extend(m.frame(&delta(run_id, 5, ", world")));
        assert_eq!(
            kinds(&out),
            [
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END"
            ]
        );
        let text: String = out
            .iter()
            .filter(|o| o.event["type"] == "TEXT_MESSAGE_CONTENT")
            .map(|o| o.event["delta"].as_str().unwrap())
            .collect();
        assert_eq!(text, "Hello, world");
        let ids: std::collections::HashSet<_> =
            out.iter().map(|o| o.event["messageId"].clone()).collect();
        assert_eq!(ids.len(), 1, "one message: {out:?}");
        assert_eq!(out.last().unwrap().id, Some(9));
    }

    #[test]
    fn a_message_joined_mid_stream_is_sent_whole() {
        let mut m = Mapper::new("c");
        let run_id = Uuid::now_v7();
        let mut out = m.frame(&delta(run_id, 4, "later"));
        assert!(out.is_empty());
        out.extend(m.frame(&env(
            5,
            Event::AgentMessage(AgentMessage {
                run_id,
                step: 1,
                agent: "assistant".into(),
                text: "all of it".into(),
                structured: None,
            }),
        )));
        assert_eq!(
            kinds(&out),
            [
                "TEXT_MESSAGE_START",
                "TEXT_MESSAGE_CONTENT",
                "TEXT_MESSAGE_END"
            ]
        );
        assert_eq!(out[1].event["delta"], "all of it");
    }

    #[test]
    fn tool_calls_name_their_message_and_context_is_a_json_patch() {
        let mut m = Mapper::new("c");
        let run_id = Uuid::now_v7();
        m.frame(&env(
            4,
            Event::AgentMessage(AgentMessage {
                run_id,
                step: 1,
                agent: "a".into(),
                text: "calling".into(),
                structured: None,
            }),
        ));
        let out = m.frame(&env(
            5,
            Event::ToolCall(ToolCall {
                run_id,
                step: 1,
                call_id: "call-1".into(),
                tool: "classify".into(),
                arguments: json!({"text": "x"}),
            }),
        ));
        assert_eq!(
            kinds(&out),
            ["TOOL_CALL_START", "TOOL_CALL_ARGS", "TOOL_CALL_END"]
        );
        assert_eq!(out[0].event["parentMessageId"], format!("{run_id}.1.1"));
        assert_eq!(out[1].event["delta"], r#"{"text":"x"}"#);
        let out = m.frame(&env(
            6,
            Event::ContextUpdated(mozaiks_events::ContextUpdated {
                run_id,
                key: "a/b~c".into(),
                value: json!(1),
                source: String::new(),
                call_id: None,
            }),
        ));
        assert_eq!(out[0].event["delta"][0]["path"], "/a~1b~0c");
    }
}
