//! Per-event codec cost: MessagePack (named fields) on the bus, JSON frames toward browsers.
//!
//! `cargo bench --bench codec` (see benches/README.md). Two typical events: an `agent.message`
//! with a ~200-byte reply and a `usage.charged`. For each: `encode_event`, `decode_event`, and
//! `Frame::from_envelope(&env).to_json()` (what the gateway sends over the WebSocket).

use std::hint::black_box;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mozaiks_events::codec::{decode_event, encode_event};
use mozaiks_events::{AgentMessage, ENVELOPE_VERSION, Envelope, Event, Frame, UsageCharged};
use uuid::Uuid;

/// A ~200-byte assistant reply (ASCII, with a quote and a newline to escape in JSON).
const REPLY: &str = "Specialist: here is my answer to \"how do I reset my password?\". \
Open Settings, choose Security, then Reset password; we email a link that is valid for 30 \
minutes.\nIf it does not arrive, check spam.";

fn envelope(seq: u64, event: Event) -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        event_id: Uuid::now_v7(),
        app_id: "default".into(),
        chat_id: "c_0192f0a1b2c3d4e5f6a7b8c9d0e1f2a3".into(),
        user_id: "bench-user".into(),
        workflow: "triage_handoff".into(),
        seq,
        ts: Utc.with_ymd_and_hms(2026, 11, 21, 12, 0, 0).unwrap(),
        parent_chat_id: None,
        causation_id: Some(Uuid::now_v7()),
        event,
    }
}

fn cases() -> Vec<(&'static str, Envelope)> {
    let run_id = Uuid::now_v7();
    vec![
        (
            "agent.message",
            envelope(
                9,
                Event::AgentMessage(AgentMessage {
                    run_id,
                    step: 2,
                    agent: "specialist".into(),
                    text: REPLY.into(),
                    structured: None,
                }),
            ),
        ),
        (
            "usage.charged",
            envelope(
                10,
                Event::UsageCharged(UsageCharged {
                    run_id,
                    step: 2,
                    agent: "specialist".into(),
                    model: "offline".into(),
                    prompt_tokens: 412,
                    completion_tokens: 57,
                    total_tokens: 469,
                    purpose: None,
                    credits: Some(15),
                    price: Some(mozaiks_events::ChargePrice {
                        prompt: 10_000,
                        completion: 30_000,
                    }),
                }),
            ),
        ),
    ]
}

fn codec(c: &mut Criterion) {
    assert!(
        (180..=230).contains(&REPLY.len()),
        "reply is {} bytes",
        REPLY.len()
    );
    for (name, env) in cases() {
        let bytes = encode_event(&env).expect("encode");
        assert_eq!(decode_event(&bytes).expect("decode"), env);
        let json = Frame::from_envelope(&env).to_json();
        eprintln!(
            "{name}: msgpack {} bytes, JSON frame {} bytes",
            bytes.len(),
            json.len()
        );

        let mut g = c.benchmark_group(name);
        g.throughput(Throughput::Elements(1));
        g.bench_function("encode_msgpack", |b| {
            b.iter(|| encode_event(black_box(&env)).unwrap())
        });
        g.bench_function("decode_msgpack", |b| {
            b.iter(|| decode_event(black_box(&bytes)).unwrap())
        });
        g.bench_function("frame_to_json", |b| {
            b.iter(|| Frame::from_envelope(black_box(&env)).to_json())
        });
        g.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    targets = codec
}
criterion_main!(benches);
