//! Properties of every parser of untrusted input, one function per fuzz target.
//!
//! Each target takes the fuzzer's bytes and panics when a property fails; a refusal is never a
//! failure. The same functions run under libFuzzer (`fuzz/`, `cargo fuzz run <target>`, millions
//! of inputs, outside CI) and under proptest in this crate's tests (a smoke run in CI). Targets
//! with "structured" in their description read the bytes through [`arbitrary::Unstructured`] to
//! build well-typed values (envelopes, frames, mutated packs) and check round trips.
//!
//! | target | parser |
//! | --- | --- |
//! | [`client_frame`] | WebSocket client frames, raw text: never panics, an accepted frame round-trips, a refusal has a stable code |
//! | [`client_frame_structured`] | structured: a frame that keeps the contract's rules is accepted as itself |
//! | [`bus_decode`] | MessagePack from the bus (events, commands, deltas), raw bytes: never panics, decode∘encode is stable |
//! | [`bus_round_trip`] | structured: every envelope, command and delta survives encode → decode |
//! | [`pack_yaml`] | workflow packs, raw YAML: never panics, an accepted pack round-trips through YAML |
//! | [`pack_mutated`] | structured: the shipped packs with random edits to their YAML tree |
//! | [`output_schema`] | structured: agents' output schemas and the model replies checked against them |
//! | [`http_body`] | HTTP bodies and query strings of the gateway, through axum's extractors and the app aggregate |
//! | [`control_record`] | control-plane JSON (`MZ_CTL` app events, app views, API key records) |
//! | [`perf_snapshot`] | `MZ_PERF` / `MZ_PRESENCE` snapshots as the ops endpoints and presence read them |
//! | [`token`] | user and runtime tokens (JWT) and the log redaction of URLs |

pub mod make;
mod packs;
mod web;

pub use packs::{SEEDS as PACK_SEEDS, output_schema, pack_mutated, pack_yaml};
pub use web::{control_record, http_body, perf_snapshot, token};

use arbitrary::Unstructured;
use mozaiks_events::frame_limits::{MAX_CLIENT_MSG_ID, MAX_TEXT_BYTES};
use mozaiks_events::{ClientFrame, CommandEnvelope, DeltaMessage, Envelope, Frame, codec};
use serde_json::Value;

/// A target: checks the properties on one input, panicking when one fails.
pub type Target = fn(&[u8]);

/// Every target, by name (the names of `fuzz/fuzz_targets/*.rs`).
pub const TARGETS: [(&str, Target); 11] = [
    ("client_frame", client_frame),
    ("client_frame_structured", client_frame_structured),
    ("bus_decode", bus_decode),
    ("bus_round_trip", bus_round_trip),
    ("pack_yaml", pack_yaml),
    ("pack_mutated", pack_mutated),
    ("output_schema", output_schema),
    ("http_body", http_body),
    ("control_record", control_record),
    ("perf_snapshot", perf_snapshot),
    ("token", token),
];

/// The codes a refused client frame may carry.
const FRAME_CODES: [&str; 5] = [
    "bad_json",
    "bad_frame",
    "unknown_type",
    "too_large",
    "invalid_id",
];

fn check_client_frame(text: &str) -> Option<ClientFrame> {
    match ClientFrame::parse(text) {
        Ok(frame) => {
            // What the rest of the system relies on: bounded text, and ids that can go into a
            // NATS header and a log line (no control characters, issue 9 defect 3).
            let (text, id) = match &frame {
                ClientFrame::UserMessage {
                    text,
                    client_msg_id,
                } => (Some(text), client_msg_id.as_ref()),
                ClientFrame::InputResponse { text, request_id } => {
                    (Some(text), request_id.as_ref())
                }
                ClientFrame::Cancel { .. } | ClientFrame::Ping {} => (None, None),
            };
            assert!(text.is_none_or(|t| !t.trim().is_empty() && t.len() <= MAX_TEXT_BYTES));
            assert!(id.is_none_or(|id| plain_id(id)), "accepted id {id:?}");
            let again = serde_json::to_string(&frame).expect("a frame serializes");
            assert_eq!(
                ClientFrame::parse(&again).as_ref(),
                Ok(&frame),
                "an accepted frame round-trips: {again}"
            );
            Some(frame)
        }
        Err(e) => {
            assert!(FRAME_CODES.contains(&e.code), "unexpected code {}", e.code);
            assert!(!e.message.is_empty());
            // The error frame the socket sends back is valid JSON.
            let json = Frame::error(e.code, e.message).to_json();
            let v: Value = serde_json::from_str(&json).expect("an error frame is JSON");
            assert_eq!(v["type"], "error");
            None
        }
    }
}

/// WebSocket client frames, raw text.
pub fn client_frame(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        check_client_frame(text);
    }
}

/// Whether an id is one the contract certainly accepts (printable, within the length limit).
fn plain_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_CLIENT_MSG_ID && !id.chars().any(char::is_control)
}

/// Client frames, structured: a frame that keeps the contract's rules is accepted as itself; a
/// refused one breaks a rule (or carries an id with control characters, which the contract
/// leaves to the reader's id rules).
pub fn client_frame_structured(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(frame) = make::client_frame(&mut u) else {
        return;
    };
    let json = serde_json::to_string(&frame).expect("a frame serializes");
    let text_ok = |t: &str| !t.trim().is_empty() && t.len() <= MAX_TEXT_BYTES;
    let surely_valid = match &frame {
        ClientFrame::UserMessage {
            text,
            client_msg_id,
        } => text_ok(text) && client_msg_id.as_deref().is_none_or(plain_id),
        ClientFrame::InputResponse { text, request_id } => {
            text_ok(text) && request_id.as_deref().is_none_or(plain_id)
        }
        ClientFrame::Cancel { .. } | ClientFrame::Ping {} => true,
    };
    match check_client_frame(&json) {
        Some(parsed) => assert_eq!(parsed, frame, "{json}"),
        None => assert!(!surely_valid, "a valid frame was refused: {json}"),
    }
}

fn check_envelope_frame(env: &Envelope) {
    let v: Value =
        serde_json::from_str(&Frame::from_envelope(env).to_json()).expect("a frame is JSON");
    assert_eq!(v["seq"], env.seq);
    assert_eq!(v["type"], env.event.type_name());
}

/// MessagePack from the bus, raw bytes: decoding never panics; what decodes re-encodes to bytes
/// that decode to the same value; the browser frame of a decoded event is JSON.
pub fn bus_decode(data: &[u8]) {
    if let Ok(env) = codec::decode_event(data) {
        let bytes = codec::encode_event(&env).expect("a decoded event encodes");
        assert_eq!(codec::decode_event(&bytes).expect("re-decodes"), env);
        check_envelope_frame(&env);
    }
    if let Ok(cmd) = codec::decode_command(data) {
        let bytes = codec::encode_command(&cmd).expect("a decoded command encodes");
        assert_eq!(codec::decode_command(&bytes).expect("re-decodes"), cmd);
    }
    if let Ok(m) = DeltaMessage::decode(data) {
        let bytes = m.encode().expect("a decoded delta encodes");
        assert_eq!(DeltaMessage::decode(&bytes).expect("re-decodes"), m);
        let f = Frame::delta(m.id, m.ts, &m.delta);
        serde_json::from_str::<Value>(&f.to_json()).expect("a delta frame is JSON");
    }
}

fn delta_valid(m: &DeltaMessage) -> bool {
    let token = |s: &str| mozaiks_events::ids::check_token("id", s).is_ok();
    m.v <= mozaiks_events::ENVELOPE_VERSION
        && token(&m.app_id)
        && token(&m.chat_id)
        && (1..=128).contains(&m.delta.agent.len())
        && (1..=mozaiks_events::frame_limits::MAX_DELTA_BYTES).contains(&m.delta.text.len())
}

/// Bus messages, structured: every envelope and command survives encode → decode unchanged;
/// a delta does exactly when it is valid.
pub fn bus_round_trip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(which) = u.int_in_range(0..=2u8) else {
        return;
    };
    match which {
        0 => {
            let Ok(env) = make::envelope(&mut u) else {
                return;
            };
            let bytes = codec::encode_event(&env).expect("an envelope encodes");
            assert_eq!(codec::decode_event(&bytes).expect("decodes"), env);
            check_envelope_frame(&env);
        }
        1 => {
            let Ok(cmd): Result<CommandEnvelope, _> = make::command(&mut u) else {
                return;
            };
            let bytes = codec::encode_command(&cmd).expect("a command encodes");
            assert_eq!(codec::decode_command(&bytes).expect("decodes"), cmd);
        }
        _ => {
            let Ok(m) = make::delta(&mut u) else {
                return;
            };
            let bytes = m.encode().expect("a delta encodes");
            match DeltaMessage::decode(&bytes) {
                Ok(back) => {
                    assert!(delta_valid(&m), "an invalid delta was accepted: {m:?}");
                    assert_eq!(back, m);
                }
                Err(_) => assert!(!delta_valid(&m), "a valid delta was refused: {m:?}"),
            }
        }
    }
}

/// Inputs each target starts from (written to `fuzz/seeds/<target>/` for libFuzzer by the
/// `seed_corpus` test with `MOZAIKS_WRITE_SEEDS=1`): valid examples of each format.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let frames: Vec<Vec<u8>> = [
        r#"{"type":"user.message","text":"hi","client_msg_id":"m1"}"#,
        r#"{"type":"user.message","text":"hello there"}"#,
        r#"{"type":"input.response","request_id":"r-1","text":"yes"}"#,
        r#"{"type":"cancel","reason":"stop"}"#,
        r#"{"type":"cancel"}"#,
        r#"{"type":"ping"}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    // Structured targets read any bytes; a few fixed patterns give each a start.
    let patterns: Vec<Vec<u8>> = (0u8..8)
        .map(|i| {
            (0..256u32)
                .map(|j| (j as u8).wrapping_mul(31).wrapping_add(i * 17))
                .collect()
        })
        .collect();
    match target {
        "client_frame" => frames,
        "bus_decode" => {
            let mut out = Vec::new();
            for p in &patterns {
                let mut u = Unstructured::new(p);
                if let Ok(env) = make::envelope(&mut u) {
                    out.extend(codec::encode_event(&env));
                }
                let mut u = Unstructured::new(p);
                if let Ok(cmd) = make::command(&mut u) {
                    out.extend(codec::encode_command(&cmd));
                }
                let mut u = Unstructured::new(p);
                if let Ok(m) = make::delta(&mut u) {
                    out.extend(m.encode());
                }
            }
            // Small seeds keep libFuzzer's inputs small (its -max_len follows the seeds).
            out.retain(|s| s.len() <= 4096);
            out
        }
        "pack_yaml" => PACK_SEEDS.iter().map(|(_, y)| y.as_bytes().to_vec()).collect(),
        "http_body" => {
            let bodies: [(u8, &str); 7] = [
                (
                    0,
                    r#"{"app_id":"default","workflow_name":"hello","message":"hi","user_id":"alice"}"#,
                ),
                (
                    1,
                    r#"{"app_id":"acme","name":"Acme","tier":"dedicated","workflows":["hello"],"limits":{"max_concurrent_runs":5},"runtime_url":"wss://acme.example.com"}"#,
                ),
                (
                    2,
                    r#"{"name":"Acme 2","tier":"business","workflows":null,"context":{"k":1},"status":"suspended"}"#,
                ),
                (3, r#"{"name":"backend"}"#),
                (4, r#"{"user_id":"alice","data":{"kind":"x","n":[1,2]}}"#),
                (5, r#"{"db_name":"mzapp_acme","mongo_uri":"mongodb://db:27017"}"#),
                (0xf0, "app_id=default&user_id=alice&limit=20&after=3&token=abc"),
            ];
            bodies
                .iter()
                .map(|(k, b)| [&[*k][..], b.as_bytes()].concat())
                .collect()
        }
        "control_record" => vec![
            br#"{"v":1,"event_id":"0190a0b0-0000-7000-8000-000000000001","app_id":"acme","ts":"2025-01-01T00:00:00Z","actor":"root","type":"app.created","data":{"name":"Acme","tier":"starter","workflows":["hello"],"limits":{"max_concurrent_runs":3},"context":{"a":1}}}"#.to_vec(),
            br#"{"v":1,"event_id":"0190a0b0-0000-7000-8000-000000000002","app_id":"acme","ts":"2025-01-01T00:00:01Z","type":"app.suspended","data":{"reason":"x"}}"#.to_vec(),
            br#"{"app_id":"acme","name":"Acme","tier":"starter","status":"active","workflows":null,"limits":{},"context":{},"created_at":"2025-01-01T00:00:00Z","updated_at":"2025-01-01T00:00:00Z","version":4}"#.to_vec(),
            br#"{"key_id":"0123456789abcdef","app_id":"acme","name":"k","hash":"ab","created_at":"2025-01-01T00:00:00Z"}"#.to_vec(),
        ],
        "perf_snapshot" => vec![
            [
                &br#"{"worker_id":"w1","active_runs":[{"app_id":"acme","chat_id":"c1","started_at":"2025-01-01T00:00:00Z","prompt_tokens":5,"completion_tokens":7}],"apps":{"acme":{"runs_started":3,"turns":2,"turn_ms_total":10.5,"turn_ms_max":7.0}}}"#[..],
                &[0xff],
                &br#"{"replica":"g1","at":"2025-01-01T00:00:00Z","sockets":{"acme":2}}"#[..],
            ]
            .concat(),
        ],
        "token" => {
            let mut out = vec![b"\0a.b.c".to_vec()];
            if let Ok((t, _)) = auth_token() {
                out.push([&[0u8][..], t.as_bytes()].concat());
            }
            out.extend(patterns.iter().map(|p| [&[1u8][..], p].concat()));
            out
        }
        _ => patterns,
    }
}

fn auth_token() -> Result<(String, chrono::DateTime<chrono::Utc>), mozaiks_auth::Error> {
    web::auth().mint_runtime("default", "alice", "c1", "hello")
}
