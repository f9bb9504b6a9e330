//! Encoding: MessagePack with field names on the bus, JSON toward browsers.
//!
//! `rmp_serde::to_vec_named` writes maps keyed by field name, so events can gain fields
//! (`#[serde(default)]`) without breaking older readers.

use serde::{Serialize, de::DeserializeOwned};

use crate::{CommandEnvelope, ENVELOPE_VERSION, Envelope, Error};

/// Content type recorded in the `Mz-Codec` header of every bus message.
pub const CODEC: &str = "msgpack-named/1";

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, Error> {
    rmp_serde::to_vec_named(value).map_err(|e| Error::Encode(e.to_string()))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, Error> {
    rmp_serde::from_slice(bytes).map_err(|e| Error::Decode(e.to_string()))
}

pub fn encode_event(env: &Envelope) -> Result<Vec<u8>, Error> {
    encode(env)
}

pub fn decode_event(bytes: &[u8]) -> Result<Envelope, Error> {
    let env: Envelope = decode(bytes)?;
    if env.v > ENVELOPE_VERSION {
        return Err(Error::Decode(format!(
            "envelope version {} is newer than this reader ({ENVELOPE_VERSION})",
            env.v
        )));
    }
    Ok(env)
}

pub fn encode_command(cmd: &CommandEnvelope) -> Result<Vec<u8>, Error> {
    encode(cmd)
}

pub fn decode_command(bytes: &[u8]) -> Result<CommandEnvelope, Error> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{AgentMessage, Command, Event, UsageCharged};
    use chrono::Utc;
    use uuid::Uuid;

    fn sample(event: Event) -> Envelope {
        Envelope {
            v: ENVELOPE_VERSION,
            event_id: Uuid::now_v7(),
            app_id: "default".into(),
            chat_id: "c1".into(),
            user_id: "alice".into(),
            workflow: "hello".into(),
            seq: 3,
            ts: Utc::now(),
            parent_chat_id: None,
            causation_id: Some(Uuid::now_v7()),
            event,
        }
    }

    #[test]
    fn events_round_trip_through_msgpack() {
        let run_id = Uuid::now_v7();
        for event in [
            Event::AgentMessage(AgentMessage {
                run_id,
                step: 1,
                agent: "assistant".into(),
                text: "hello".into(),
                structured: None,
            }),
            Event::UsageCharged(UsageCharged {
                run_id,
                step: 1,
                agent: "assistant".into(),
                model: "offline".into(),
                prompt_tokens: 10,
                completion_tokens: 5,
                total_tokens: 15,
                purpose: None,
                credits: Some(15),
                price: Some(crate::ChargePrice {
                    prompt: 1_000_000,
                    completion: 1_000_000,
                }),
            }),
        ] {
            let env = sample(event);
            let bytes = encode_event(&env).unwrap();
            assert_eq!(decode_event(&bytes).unwrap(), env);
        }
    }

    #[test]
    fn msgpack_carries_field_names() {
        let bytes = encode_event(&sample(Event::RunCancelled(crate::RunCancelled {
            run_id: Uuid::nil(),
            reason: "user".into(),
        })))
        .unwrap();
        let needle = b"chat_id";
        assert!(bytes.windows(needle.len()).any(|w| w == needle));
    }

    #[test]
    fn newer_fields_are_ignored_and_newer_versions_refused() {
        #[derive(serde::Serialize)]
        struct Future<'a> {
            #[serde(flatten)]
            env: &'a Envelope,
            shiny_new_field: u32,
        }
        let env = sample(Event::RunCancelled(crate::RunCancelled {
            run_id: Uuid::nil(),
            reason: "x".into(),
        }));
        let bytes = rmp_serde::to_vec_named(&Future {
            env: &env,
            shiny_new_field: 9,
        })
        .unwrap();
        assert_eq!(decode_event(&bytes).unwrap(), env);

        let mut newer = env.clone();
        newer.v = ENVELOPE_VERSION + 1;
        assert!(matches!(
            decode_event(&encode_event(&newer).unwrap()),
            Err(Error::Decode(_))
        ));
    }

    #[test]
    fn garbage_is_a_decode_error() {
        assert!(matches!(decode_event(b"\xc1\xc1"), Err(Error::Decode(_))));
        assert!(matches!(decode_command(b""), Err(Error::Decode(_))));
    }

    #[test]
    fn commands_round_trip() {
        let cmd = CommandEnvelope::new(
            "a",
            "c",
            "u",
            "w",
            Command::UserMessage {
                text: "hi".into(),
                client_msg_id: Some("m1".into()),
            },
        );
        assert_eq!(decode_command(&encode_command(&cmd).unwrap()).unwrap(), cmd);
    }

    #[test]
    fn json_frame_has_contract_shape() {
        let env = sample(Event::AgentMessage(AgentMessage {
            run_id: Uuid::nil(),
            step: 1,
            agent: "a".into(),
            text: "t".into(),
            structured: None,
        }));
        let v: serde_json::Value =
            serde_json::from_str(&crate::Frame::from_envelope(&env).to_json()).unwrap();
        assert_eq!(v["seq"], 3);
        assert_eq!(v["type"], "agent.message");
        assert_eq!(v["data"]["text"], "t");
        assert_eq!(v["id"], env.event_id.to_string());
        assert!(v["ts"].is_string());
    }

    #[test]
    fn type_names_match_serde_names() {
        let env = sample(Event::RunCancelled(crate::RunCancelled {
            run_id: Uuid::nil(),
            reason: "x".into(),
        }));
        let v = serde_json::to_value(&env).unwrap();
        assert_eq!(v["type"], env.event.type_name());
        assert!(Event::TYPE_NAMES.iter().all(|t| t.split('.').count() == 2));
    }

    /// The `type` constants of the generated JSON Schema's variants, in order.
    fn schema_type_names(schema: schemars::Schema) -> Vec<String> {
        let v = serde_json::to_value(schema).unwrap();
        v["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|variant| {
                variant["properties"]["type"]["const"]
                    .as_str()
                    .unwrap()
                    .to_string()
            })
            .collect()
    }

    #[test]
    fn every_type_name_is_the_serde_name() {
        let events = schema_type_names(schemars::schema_for!(Envelope));
        assert_eq!(events, Event::TYPE_NAMES);
        let commands = schema_type_names(schemars::schema_for!(CommandEnvelope));
        assert_eq!(commands, Command::TYPE_NAMES);
        let cmd = Command::Cancel {
            reason: String::new(),
        };
        assert_eq!(serde_json::to_value(&cmd).unwrap()["type"], cmd.type_name());
    }
}
