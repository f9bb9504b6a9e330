//! Token deltas (`agent.delta`, `"seq": null`) from the worker to clients on every replica,
//! coalesced for slow clients and never a reason to close them; malformed deltas on the bus; and
//! the live gap after a NATS reconnect (events stored while a gateway was disconnected reach its
//! clients without a later event).

use std::time::Duration;

use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{AgentDelta, DeltaMessage, Envelope, Event};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::fleet::{Fleet, Ws, next_frame, send_json};

async fn bus(fleet: &Fleet) -> Bus {
    Bus::connect(
        &fleet.servers.nats_url,
        &fleet.servers.namespace,
        "e2e-deltas",
    )
    .await
    .unwrap()
}

fn ids(ticket: &Value) -> (String, String) {
    (
        ticket["app_id"].as_str().unwrap().to_string(),
        ticket["chat_id"].as_str().unwrap().to_string(),
    )
}

/// Appends one agent message to the ticket's chat (retrying on a concurrent writer or while
/// JetStream comes back); returns its seq.
async fn append_message(bus: &Bus, ticket: &Value, run_id: Uuid, step: u32, text: &str) -> u64 {
    let (app, chat) = ids(ticket);
    let mut last_error = String::new();
    for _ in 0..200 {
        let pos = match bus.chat_position(&app, &chat).await {
            Ok(p) => p,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let env = Envelope {
            v: 1,
            event_id: Uuid::now_v7(),
            app_id: app.clone(),
            chat_id: chat.clone(),
            user_id: "streamer".into(),
            workflow: ticket["workflow_name"].as_str().unwrap().into(),
            seq: pos.seq + 1,
            ts: chrono::Utc::now(),
            parent_chat_id: None,
            causation_id: None,
            // Through JSON, so the test does not depend on every field of the type.
            event: serde_json::from_value::<Event>(json!({
                "type": "agent.message",
                "data": {"run_id": run_id, "step": step, "agent": "streamer", "text": text},
            }))
            .unwrap(),
        };
        match bus.append(&env, pos.stream_seq).await {
            Ok(_) => return env.seq,
            Err(e) => {
                last_error = e.to_string();
                tokio::time::sleep(Duration::from_millis(100)).await
            }
        }
    }
    panic!("could not append to the chat: {last_error}");
}

/// Publishes one delta on the chat's delta subject, as a worker does.
async fn publish_delta(bus: &Bus, ticket: &Value, delta: AgentDelta) {
    let (app, chat) = ids(ticket);
    let msg = DeltaMessage {
        v: 1,
        id: Uuid::now_v7(),
        app_id: app.clone(),
        chat_id: chat.clone(),
        ts: chrono::Utc::now(),
        delta,
    };
    bus.client()
        .publish(
            bus.subjects().deltas(&app, &chat),
            msg.encode().unwrap().into(),
        )
        .await
        .unwrap();
}

fn piece(run_id: Uuid, step: u32, offset: u64, text: &str) -> AgentDelta {
    AgentDelta {
        run_id: Some(run_id),
        step,
        round: 1,
        agent: "streamer".into(),
        offset,
        text: text.into(),
    }
}

/// A message's text as a client builds it from deltas: each one replaces everything from its
/// offset on.
fn apply(text: &mut String, delta: &Value) {
    let offset = delta["data"]["offset"].as_u64().unwrap() as usize;
    assert!(offset <= text.len(), "a delta past the text: {delta}");
    text.truncate(offset);
    text.push_str(delta["data"]["text"].as_str().unwrap());
}

async fn metrics_text(fleet: &Fleet, gw: usize) -> String {
    fleet
        .http
        .get(format!("{}/metrics", fleet.gateways[gw]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of a counter line that starts with `series` (0 when absent).
fn counter(metrics: &str, series: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(series))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A fresh chat with a socket on gateway `gw` that is live (has read the chat's first event).
async fn live_chat(fleet: &Fleet, gw: usize, user: &str, workflow: &str) -> (Value, Ws) {
    let token = Fleet::token(user, "default", &["user"]);
    let ticket = fleet.session(gw, &token, workflow, None).await;
    let mut ws = fleet.connect(gw, &ticket, 0).await;
    loop {
        let f = next_frame(&mut ws).await;
        if f["type"] == "session.started" {
            return (ticket, ws);
        }
    }
}

/// Every frame until the durable one of type `until` (inclusive).
async fn frames_until(ws: &mut Ws, until: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = next_frame(ws).await;
        let done = f["type"] == until && !f["seq"].is_null();
        out.push(f);
        if done {
            return out;
        }
    }
}

/// Checks that every `agent.message` is preceded by its step's deltas and that they add up to
/// its text; returns how many messages were checked.
fn check_deltas_before_messages(frames: &[Value]) -> usize {
    let mut checked = 0;
    for (i, msg) in frames.iter().enumerate() {
        if msg["type"] != "agent.message" {
            continue;
        }
        let step = &msg["data"]["step"];
        let run = &msg["data"]["run_id"];
        let deltas: Vec<&Value> = frames[..i]
            .iter()
            .filter(|f| {
                f["type"] == "agent.delta"
                    && f["data"]["step"] == *step
                    && f["data"]["run_id"] == *run
            })
            .collect();
        assert!(
            !deltas.is_empty(),
            "no agent.delta before the agent.message of step {step}: {frames:#?}"
        );
        let mut text = String::new();
        for d in &deltas {
            assert!(d["seq"].is_null(), "a delta with a seq: {d}");
            assert!(d["id"].is_string(), "a delta without an id: {d}");
            assert_eq!(d["data"]["agent"], msg["data"]["agent"]);
            apply(&mut text, d);
        }
        assert_eq!(text, msg["data"]["text"].as_str().unwrap(), "step {step}");
        // Nothing of that step after its message.
        assert!(
            !frames[i + 1..].iter().any(|f| f["type"] == "agent.delta"
                && f["data"]["step"] == *step
                && f["data"]["run_id"] == *run),
            "a delta of step {step} after its agent.message"
        );
        checked += 1;
    }
    checked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deltas_reach_clients_on_every_replica_before_each_agent_message() {
    let fleet = Fleet::start(2).await;
    let (ticket, mut a) = live_chat(&fleet, 0, "delta-reader", "triage_handoff").await;
    // The same chat on the other replica.
    let mut b = fleet.connect(1, &ticket, 0).await;
    loop {
        if next_frame(&mut b).await["type"] == "session.started" {
            break;
        }
    }
    send_json(
        &mut a,
        json!({"type": "user.message", "text": "where is my parcel?", "client_msg_id": "d-1"}),
    )
    .await;
    let on_a = frames_until(&mut a, "run.completed").await;
    let on_b = frames_until(&mut b, "run.completed").await;
    // triage and specialist: two agent messages, each streamed first.
    assert_eq!(check_deltas_before_messages(&on_a), 2, "{on_a:#?}");
    assert_eq!(check_deltas_before_messages(&on_b), 2, "{on_b:#?}");
    let specialist = on_b
        .iter()
        .find(|f| f["type"] == "agent.message" && f["data"]["agent"] == "specialist")
        .unwrap();
    assert_eq!(
        specialist["data"]["text"],
        "Specialist: here is my answer to \"where is my parcel?\"."
    );
    // Durable events are unaffected: gapless after session.started.
    let seqs: Vec<u64> = on_a.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(seqs, (2..2 + seqs.len() as u64).collect::<Vec<_>>());
    for gw in 0..2 {
        let m = metrics_text(&fleet, gw).await;
        assert!(
            counter(&m, "mozaiks_ws_deltas_in_total{outcome=\"accepted\"}") >= 2.0,
            "{m}"
        );
        assert!(counter(&m, "mozaiks_ws_deltas_out_total") >= 2.0, "{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_client_gets_coalesced_deltas_and_is_not_closed_for_them() {
    let fleet = Fleet::start(1).await;
    let bus = bus(&fleet).await;
    let (ticket, mut slow) = live_chat(&fleet, 0, "delta-sloth", "hello").await;
    let run = Uuid::now_v7();
    // The client stops reading; deltas of one long message pour in until the replica reports
    // merging them (its queue and the socket's buffers are full).
    const PIECE: usize = 4096;
    let chunk = "d".repeat(PIECE);
    let mut offset = 0u64;
    let mut published = 0u64;
    for round in 0.. {
        assert!(round < 60, "no delta was ever coalesced");
        for _ in 0..100 {
            publish_delta(&bus, &ticket, piece(run, 7, offset, &chunk)).await;
            offset += PIECE as u64;
            published += 1;
        }
        bus.client().flush().await.unwrap();
        let m = metrics_text(&fleet, 0).await;
        if counter(&m, "mozaiks_ws_deltas_coalesced_total") > 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The client reads again: what was queued, then the merged delta (several pieces in one
    // frame) once its queue has room.
    let mut frames = Vec::new();
    loop {
        let f = next_frame(&mut slow).await;
        let merged =
            f["type"] == "agent.delta" && f["data"]["text"].as_str().unwrap().len() > PIECE;
        frames.push(f);
        if merged {
            break;
        }
    }
    // The step's message is durable; once the client has it, later deltas of the step are
    // stale; the next step's deltas still come.
    let message = append_message(&bus, &ticket, run, 7, "a long streamed message").await;
    loop {
        let f = next_frame(&mut slow).await;
        let done = f["seq"].as_u64() == Some(message);
        frames.push(f);
        if done {
            break;
        }
    }
    for _ in 0..5 {
        publish_delta(&bus, &ticket, piece(run, 7, offset, "late")).await;
        offset += 4;
    }
    publish_delta(&bus, &ticket, piece(run, 8, 0, "next step")).await;
    loop {
        let f = next_frame(&mut slow).await;
        let done = f["type"] == "agent.delta" && f["data"]["step"] == 8;
        frames.push(f);
        if done {
            break;
        }
    }
    let marker = append_message(&bus, &ticket, run, 8, "next step").await;
    loop {
        let f = next_frame(&mut slow).await;
        let done = f["seq"].as_u64() == Some(marker);
        frames.push(f);
        if done {
            break;
        }
    }
    let deltas: Vec<&Value> = frames
        .iter()
        .filter(|f| f["type"] == "agent.delta")
        .collect();
    assert!(
        (deltas.len() as u64) < published,
        "{} delta frames for {published} deltas: nothing was merged",
        deltas.len()
    );
    assert!(deltas.iter().all(|d| d["seq"].is_null()));
    // Frames of one message keep its order: offsets never go back.
    let offsets: Vec<u64> = deltas
        .iter()
        .filter(|d| d["data"]["step"] == 7)
        .map(|d| d["data"]["offset"].as_u64().unwrap())
        .collect();
    assert!(offsets.windows(2).all(|w| w[0] < w[1]), "{offsets:?}");
    // None of step 7 after its message (the late ones are stale).
    let at = frames
        .iter()
        .position(|f| f["type"] == "agent.message" && f["data"]["step"] == 7)
        .unwrap();
    assert!(
        !frames[at..]
            .iter()
            .any(|f| f["type"] == "agent.delta" && f["data"]["step"] == 7)
    );
    let durable: Vec<u64> = frames.iter().filter_map(|f| f["seq"].as_u64()).collect();
    assert_eq!(durable, vec![marker - 1, marker]);
    // Still open: a ping gets its pong.
    send_json(&mut slow, json!({"type": "ping"})).await;
    loop {
        let f = next_frame(&mut slow).await;
        if f["type"] == "pong" {
            break;
        }
    }
    let m = metrics_text(&fleet, 0).await;
    assert_eq!(
        counter(&m, "mozaiks_ws_slow_consumer_closes_total"),
        0.0,
        "{m}"
    );
    assert!(counter(&m, "mozaiks_ws_deltas_coalesced_total") > 0.0);
    assert!(
        counter(&m, "mozaiks_ws_deltas_dropped_total{reason=\"stale\"}") >= 5.0,
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_deltas_on_the_bus_are_dropped_and_the_replica_stays_healthy() {
    let fleet = Fleet::start(1).await;
    let bus = bus(&fleet).await;
    let (ticket, mut ws) = live_chat(&fleet, 0, "delta-victim", "hello").await;
    let (app, chat) = ids(&ticket);
    let subject = bus.subjects().deltas(&app, &chat);
    let run = Uuid::now_v7();
    // Not MessagePack at all.
    bus.client()
        .publish(subject.clone(), "not a delta".into())
        .await
        .unwrap();
    // A delta that claims another chat than its subject.
    let mut other = DeltaMessage {
        v: 1,
        id: Uuid::now_v7(),
        app_id: app.clone(),
        chat_id: "someone-elses-chat".into(),
        ts: chrono::Utc::now(),
        delta: piece(run, 1, 0, "intruder"),
    };
    bus.client()
        .publish(subject.clone(), other.encode().unwrap().into())
        .await
        .unwrap();
    // Empty text; an oversized text.
    other.chat_id = chat.clone();
    other.delta.text = String::new();
    bus.client()
        .publish(subject.clone(), other.encode().unwrap().into())
        .await
        .unwrap();
    other.delta.text = "x".repeat(mozaiks_events::frame_limits::MAX_DELTA_BYTES + 1);
    bus.client()
        .publish(subject.clone(), other.encode().unwrap().into())
        .await
        .unwrap();
    // Then a good one: the only delta the client sees.
    publish_delta(&bus, &ticket, piece(run, 1, 0, "fine")).await;
    let f = loop {
        let f = next_frame(&mut ws).await;
        if f["type"] == "agent.delta" {
            break f;
        }
    };
    assert_eq!(f["data"]["text"], "fine");
    assert!(f["seq"].is_null());
    let m = metrics_text(&fleet, 0).await;
    assert_eq!(
        counter(&m, "mozaiks_ws_deltas_in_total{outcome=\"invalid\"}"),
        4.0,
        "{m}"
    );
    let ready = fleet
        .http
        .get(format!("{}/health/ready", fleet.gateways[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    // The socket still works.
    send_json(&mut ws, json!({"type": "ping"})).await;
    loop {
        if next_frame(&mut ws).await["type"] == "pong" {
            break;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_stored_while_nats_was_down_reach_a_live_client_without_a_later_event() {
    let mut fleet = Fleet::start(1).await;
    let (ticket, mut ws) = live_chat(&fleet, 0, "outage", "hello").await;
    let (app, chat) = ids(&ticket);
    let head = {
        let bus = bus(&fleet).await;
        bus.chat_position(&app, &chat).await.unwrap().seq
    };
    // NATS goes away for a while (the gateway's reconnect attempts back off), comes back.
    fleet.servers.kill_nats().unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    fleet.servers.restart_nats().await.unwrap();
    // A fresh connection appends at once, likely before the gateway is back.
    let bus = bus(&fleet).await;
    let run = Uuid::now_v7();
    let mut last = head;
    for i in 0..5 {
        last = append_message(&bus, &ticket, run, i, &format!("during outage {i}")).await;
    }
    assert_eq!(last, head + 5);
    // The client gets all five, in order, exactly once, with nothing appended after them.
    let mut seqs = Vec::new();
    while seqs.last() != Some(&last) {
        let f = match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Value>(t.as_str()).unwrap(),
            Ok(Some(Ok(Message::Close(c)))) => panic!("socket closed: {c:?}"),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no frame after the outage: {other:?}\n{}", fleet.logs()),
        };
        if let Some(s) = f["seq"].as_u64() {
            seqs.push(s);
        }
    }
    assert_eq!(seqs, (head + 1..=head + 5).collect::<Vec<_>>());
    // And nothing twice: the next event is the next seq.
    let after = append_message(&bus, &ticket, run, 9, "after").await;
    let next = loop {
        let f = next_frame(&mut ws).await;
        if let Some(s) = f["seq"].as_u64() {
            break s;
        }
    };
    assert_eq!(next, after);
    let m = metrics_text(&fleet, 0).await;
    assert!(
        counter(&m, "mozaiks_gateway_nats_reconnects_total") >= 1.0,
        "{m}"
    );
    assert!(
        counter(&m, "mozaiks_ws_reconnect_checks_total") >= 1.0,
        "{m}"
    );
}
