//! WebSocket frames (contract, DESIGN.md §4).

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Envelope;

/// A server → client frame: `{"id", "seq", "type", "ts", "data"}`.
///
/// Durable events carry their per-chat `seq`; ephemeral frames (errors, pongs, notices, token
/// deltas) carry `"seq": null`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Frame {
    pub id: Uuid,
    pub seq: Option<u64>,
    #[serde(rename = "type")]
    pub kind: String,
    pub ts: DateTime<Utc>,
    pub data: serde_json::Value,
}

impl Frame {
    /// The frame of a durable event.
    pub fn from_envelope(env: &Envelope) -> Frame {
        // Serializing the adjacently tagged enum yields {"type": .., "data": ..}.
        let data = match serde_json::to_value(&env.event) {
            Ok(serde_json::Value::Object(mut m)) => m.remove("data").unwrap_or_default(),
            _ => serde_json::Value::Null,
        };
        Frame {
            id: env.event_id,
            seq: Some(env.seq),
            kind: env.event.type_name().to_string(),
            ts: env.ts,
            data,
        }
    }

    /// An ephemeral frame (`seq: null`).
    pub fn ephemeral(kind: &str, data: serde_json::Value) -> Frame {
        Frame {
            id: Uuid::now_v7(),
            seq: None,
            kind: kind.to_string(),
            ts: Utc::now(),
            data,
        }
    }

    /// An error frame; the connection stays up.
    pub fn error(code: &str, message: impl Into<String>) -> Frame {
        Frame::ephemeral(
            "error",
            serde_json::to_value(ErrorFrame {
                code: code.to_string(),
                message: message.into(),
            })
            .unwrap_or_default(),
        )
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|_| "{}".to_string())
    }
}

/// The `data` of an `agent.delta` frame: a piece of the text an agent is streaming.
///
/// Ephemeral (`"seq": null`): deltas travel on core NATS, outside the durable log, and are
/// re-sendable from the step's final `agent.message`, which is what counts. `offset` is where
/// `text` starts in the message, in UTF-8 bytes: a client sets the message's text to its first
/// `offset` bytes followed by `text` (so a model call retried from the start, which restarts at
/// offset 0, replaces what was shown). A slow client gets consecutive deltas merged into one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentDelta {
    #[serde(default)]
    pub run_id: Option<Uuid>,
    pub step: u32,
    /// The model call of the step's turn (1 = first; a later round answers tool results).
    #[serde(default = "one")]
    pub round: u32,
    pub agent: String,
    pub offset: u64,
    pub text: String,
}

fn one() -> u32 {
    1
}

/// Longest `text` of one delta on the bus, in bytes.
pub const MAX_DELTA_BYTES: usize = 64 * 1024;

/// A delta on the bus: core NATS subject `mz.live.{app_id}.{chat_id}.delta` (and, for consumers
/// outside the runtime, `mz.dlt.{app_id}.{chat_id}`), MessagePack with field names. Not stored
/// anywhere.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct DeltaMessage {
    /// Envelope version.
    pub v: u16,
    /// UUID v7 of this delta; the frame's `id`.
    pub id: Uuid,
    pub app_id: String,
    pub chat_id: String,
    pub ts: DateTime<Utc>,
    pub delta: AgentDelta,
}

impl DeltaMessage {
    pub fn encode(&self) -> Result<Vec<u8>, crate::Error> {
        rmp_serde::to_vec_named(self).map_err(|e| crate::Error::Encode(e.to_string()))
    }

    /// Decodes and validates a delta from the bus.
    pub fn decode(bytes: &[u8]) -> Result<DeltaMessage, crate::Error> {
        let m: DeltaMessage =
            rmp_serde::from_slice(bytes).map_err(|e| crate::Error::Decode(e.to_string()))?;
        let bad = |reason: String| Err(crate::Error::Decode(reason));
        if m.v > crate::ENVELOPE_VERSION {
            return bad(format!("delta version {} is newer than this reader", m.v));
        }
        crate::ids::check_token("app_id", &m.app_id)?;
        crate::ids::check_token("chat_id", &m.chat_id)?;
        if m.delta.agent.is_empty() || m.delta.agent.len() > 128 {
            return bad("agent must be 1 to 128 bytes".into());
        }
        if m.delta.text.is_empty() || m.delta.text.len() > MAX_DELTA_BYTES {
            return bad(format!("text must be 1 to {MAX_DELTA_BYTES} bytes"));
        }
        Ok(m)
    }
}

impl Frame {
    /// The `agent.delta` frame of a delta (`seq: null`).
    pub fn delta(id: Uuid, ts: DateTime<Utc>, delta: &AgentDelta) -> Frame {
        Frame {
            id,
            seq: None,
            kind: "agent.delta".to_string(),
            ts,
            data: serde_json::to_value(delta).unwrap_or_default(),
        }
    }
}

/// The `data` of an `error` frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ErrorFrame {
    /// Stable, machine-readable code, e.g. `bad_frame`, `unknown_type`.
    pub code: String,
    pub message: String,
}

/// A client → server frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "type", deny_unknown_fields)]
pub enum ClientFrame {
    /// Idempotent on `client_msg_id`.
    #[serde(rename = "user.message")]
    UserMessage {
        text: String,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    #[serde(rename = "input.response")]
    InputResponse {
        #[serde(default)]
        request_id: Option<String>,
        text: String,
    },
    #[serde(rename = "cancel")]
    Cancel {
        #[serde(default)]
        reason: Option<String>,
    },
    #[serde(rename = "ping")]
    Ping {},
}

/// Why a client frame was refused.
#[derive(Debug, PartialEq, Eq)]
pub struct FrameError {
    pub code: &'static str,
    pub message: String,
}

/// Longest accepted `text` of a user message, in bytes.
pub const MAX_TEXT_BYTES: usize = 32 * 1024;
/// Longest accepted `client_msg_id` (and `request_id`), in bytes.
pub const MAX_CLIENT_MSG_ID: usize = crate::ids::MAX_CLIENT_ID;

impl ClientFrame {
    /// Parses and validates a text frame.
    pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| FrameError {
            code: "bad_json",
            message: format!("frame is not valid JSON: {e}"),
        })?;
        let kind = value
            .get("type")
            .and_then(|t| t.as_str())
            .ok_or_else(|| FrameError {
                code: "bad_frame",
                message: "frame needs a string field \"type\"".into(),
            })?
            .to_string();
        if !["user.message", "input.response", "cancel", "ping"].contains(&kind.as_str()) {
            return Err(FrameError {
                code: "unknown_type",
                message: format!(
                    "unknown frame type {kind:?}; expected user.message, input.response, cancel or ping"
                ),
            });
        }
        let frame: ClientFrame = serde_json::from_value(value).map_err(|e| FrameError {
            code: "bad_frame",
            message: format!("invalid {kind} frame: {e}"),
        })?;
        frame.validate()?;
        Ok(frame)
    }

    fn validate(&self) -> Result<(), FrameError> {
        let text_ok = |t: &str| {
            if t.trim().is_empty() {
                Err(FrameError {
                    code: "bad_frame",
                    message: "\"text\" must not be empty".into(),
                })
            } else if t.len() > MAX_TEXT_BYTES {
                Err(FrameError {
                    code: "too_large",
                    message: format!("\"text\" is longer than {MAX_TEXT_BYTES} bytes"),
                })
            } else {
                Ok(())
            }
        };
        // Ids a client chooses reach NATS headers and logs: no control characters, bounded.
        let id_ok = |what: &'static str, id: &Option<String>| match id {
            Some(id) => crate::ids::check_client_id(what, id).map_err(|e| FrameError {
                code: "bad_frame",
                message: e.to_string(),
            }),
            None => Ok(()),
        };
        match self {
            ClientFrame::UserMessage {
                text,
                client_msg_id,
            } => {
                text_ok(text)?;
                id_ok("client_msg_id", client_msg_id)
            }
            ClientFrame::InputResponse { text, request_id } => {
                text_ok(text)?;
                id_ok("request_id", request_id)
            }
            ClientFrame::Cancel { .. } | ClientFrame::Ping {} => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_contract_frames() {
        assert_eq!(
            ClientFrame::parse(r#"{"type":"user.message","text":"hi","client_msg_id":"m1"}"#),
            Ok(ClientFrame::UserMessage {
                text: "hi".into(),
                client_msg_id: Some("m1".into())
            })
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"ping"}"#),
            Ok(ClientFrame::Ping {})
        );
        assert_eq!(
            ClientFrame::parse(r#"{"type":"cancel"}"#),
            Ok(ClientFrame::Cancel { reason: None })
        );
        assert!(matches!(
            ClientFrame::parse(r#"{"type":"input.response","text":"yes"}"#),
            Ok(ClientFrame::InputResponse { .. })
        ));
    }

    #[test]
    fn deltas_round_trip_and_bad_ones_are_refused() {
        let m = DeltaMessage {
            v: 1,
            id: Uuid::now_v7(),
            app_id: "default".into(),
            chat_id: "c1".into(),
            ts: Utc::now(),
            delta: AgentDelta {
                run_id: Some(Uuid::now_v7()),
                step: 2,
                round: 1,
                agent: "a".into(),
                offset: 5,
                text: "héllo".into(),
            },
        };
        let back = DeltaMessage::decode(&m.encode().unwrap()).unwrap();
        assert_eq!(back, m);
        let f = Frame::delta(m.id, m.ts, &m.delta);
        let json: serde_json::Value = serde_json::from_str(&f.to_json()).unwrap();
        assert_eq!(json["seq"], serde_json::Value::Null);
        assert_eq!(json["type"], "agent.delta");
        assert_eq!(json["data"]["offset"], 5);
        assert_eq!(json["data"]["text"], "héllo");
        let refused = |f: &dyn Fn(&mut DeltaMessage)| {
            let mut bad = m.clone();
            f(&mut bad);
            DeltaMessage::decode(&bad.encode().unwrap()).is_err()
        };
        assert!(refused(&|b| b.delta.text.clear()));
        assert!(refused(&|b| b.delta.text = "x".repeat(MAX_DELTA_BYTES + 1)));
        assert!(refused(&|b| b.delta.agent.clear()));
        assert!(refused(&|b| b.chat_id = "a.b".into()));
        assert!(refused(&|b| b.v = 99));
        assert!(DeltaMessage::decode(b"not msgpack").is_err());
    }

    #[test]
    fn refuses_bad_frames_with_codes() {
        let code = |s: &str| ClientFrame::parse(s).unwrap_err().code;
        assert_eq!(code("not json"), "bad_json");
        assert_eq!(code("[1,2]"), "bad_frame");
        assert_eq!(code(r#"{"type":7}"#), "bad_frame");
        assert_eq!(code(r#"{"type":"launch.missiles"}"#), "unknown_type");
        assert_eq!(code(r#"{"type":"user.message"}"#), "bad_frame");
        assert_eq!(code(r#"{"type":"user.message","text":"  "}"#), "bad_frame");
        assert_eq!(
            code(r#"{"type":"user.message","text":"a","extra":1}"#),
            "bad_frame"
        );
        let long = format!(
            r#"{{"type":"user.message","text":"{}"}}"#,
            "x".repeat(MAX_TEXT_BYTES + 1)
        );
        assert_eq!(code(&long), "too_large");
    }

    #[test]
    fn refuses_client_ids_with_control_characters_or_bad_lengths() {
        let refused = |frame: serde_json::Value| {
            let e = ClientFrame::parse(&frame.to_string()).unwrap_err();
            assert_eq!(e.code, "bad_frame", "{frame}: {e:?}");
            e.message
        };
        for bad in [
            "a\nb",
            "a\rb",
            "a\r\nNats-Expected-Stream: x",
            "nul\0",
            "\u{1b}[2J",
            "\u{85}",
            "",
            &"x".repeat(MAX_CLIENT_MSG_ID + 1),
        ] {
            let m = refused(
                serde_json::json!({"type": "user.message", "text": "hi", "client_msg_id": bad}),
            );
            assert!(m.contains("client_msg_id"), "{m}");
            let m = refused(
                serde_json::json!({"type": "input.response", "text": "yes", "request_id": bad}),
            );
            assert!(m.contains("request_id"), "{m}");
        }
        // Escaped in the JSON text too, the way a browser sends it.
        assert_eq!(
            ClientFrame::parse(r#"{"type":"user.message","text":"hi","client_msg_id":"a\nb"}"#)
                .unwrap_err()
                .code,
            "bad_frame"
        );
        // Printable ids of any script pass, up to the limit.
        for good in ["m1", "msg 2", "é✓", &"x".repeat(MAX_CLIENT_MSG_ID)] {
            assert!(
                ClientFrame::parse(
                    &serde_json::json!({"type": "user.message", "text": "hi", "client_msg_id": good})
                        .to_string()
                )
                .is_ok(),
                "{good:?}"
            );
            assert!(
                ClientFrame::parse(
                    &serde_json::json!({"type": "input.response", "text": "yes", "request_id": good})
                        .to_string()
                )
                .is_ok(),
                "{good:?}"
            );
        }
    }
}
