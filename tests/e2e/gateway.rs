//! Gateways at scale (issue 3): shared live fan-out with a gapless replay→live handover, resume on
//! another replica after SIGKILL and SIGTERM, slow consumers, limits, origins, resync past
//! retention, notifications across replicas, heartbeats, hostile frames.

use std::collections::HashMap;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use mozaiks_bus::Bus;
use mozaiks_events::{AgentMessage, Envelope, Event};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::fleet::{Fleet, Ws, free_port, next_frame};

/// The test's own connection to the fleet's NATS, in its namespace.
async fn bus(fleet: &Fleet) -> Bus {
    Bus::connect(
        &fleet.servers.nats_url,
        &fleet.servers.namespace,
        "e2e-test",
    )
    .await
    .unwrap()
}

/// Appends `n` agent messages to the ticket's chat, retrying when another writer got there first.
async fn append_n(bus: &Bus, ticket: &Value, user: &str, n: usize, text_bytes: usize) {
    let app = ticket["app_id"].as_str().unwrap();
    let chat = ticket["chat_id"].as_str().unwrap();
    let text = "x".repeat(text_bytes.max(1));
    let mut done = 0;
    while done < n {
        let pos = bus.chat_position(app, chat).await.unwrap();
        let env = Envelope {
            v: 1,
            event_id: uuid::Uuid::now_v7(),
            app_id: app.into(),
            chat_id: chat.into(),
            user_id: user.into(),
            workflow: ticket["workflow_name"].as_str().unwrap().into(),
            seq: pos.seq + 1,
            ts: chrono::Utc::now(),
            parent_chat_id: None,
            causation_id: None,
            event: Event::AgentMessage(AgentMessage {
                run_id: uuid::Uuid::nil(),
                step: done as u32,
                agent: "load".into(),
                text: text.clone(),
                structured: None,
            }),
        };
        match bus.append(&env, pos.stream_seq).await {
            Ok(_) => done += 1,
            Err(mozaiks_bus::Error::Conflict { .. }) => continue,
            Err(e) => panic!("append failed: {e}"),
        }
    }
}

/// A chat that has settled (its owner appended its first events and went quiet).
async fn quiet_chat(fleet: &Fleet, bus: &Bus, user: &str) -> (Value, u64) {
    let token = Fleet::token(user, "default", &["user"]);
    let ticket = fleet.session(0, &token, "hello", None).await;
    let app = ticket["app_id"].as_str().unwrap().to_string();
    let chat = ticket["chat_id"].as_str().unwrap().to_string();
    let head = fleet
        .eventually("the session's first event", || {
            let (bus, app, chat) = (bus.clone(), app.clone(), chat.clone());
            async move {
                let p = bus.chat_position(&app, &chat).await.ok()?;
                (p.seq > 0).then_some(p.seq)
            }
        })
        .await;
    // Let the worker finish whatever the start command makes it append.
    let mut last = head;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = bus.chat_position(&app, &chat).await.unwrap().seq;
        if now == last {
            return (ticket, now);
        }
        last = now;
    }
}

enum Read {
    Frame(Value),
    Closed(Option<(u16, String)>),
}

async fn read(ws: &mut Ws) -> Read {
    loop {
        match tokio::time::timeout(Duration::from_secs(20), ws.next()).await {
            Err(_) => panic!("timed out waiting for a frame"),
            Ok(None) | Ok(Some(Err(_))) => return Read::Closed(None),
            Ok(Some(Ok(Message::Text(t)))) => {
                return Read::Frame(serde_json::from_str(t.as_str()).unwrap());
            }
            Ok(Some(Ok(Message::Close(c)))) => {
                return Read::Closed(c.map(|c| (u16::from(c.code), c.reason.to_string())));
            }
            Ok(Some(Ok(_))) => continue,
        }
    }
}

/// Reads durable frames until seq `last`, reconnecting (to `gws` in turn) with `after` whenever
/// the socket ends. Returns every durable seq received, in order.
async fn follow_to(
    fleet: &Fleet,
    ticket: &Value,
    gws: &[usize],
    after: u64,
    last: u64,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut seen = after;
    let mut attempt = 0;
    'connect: loop {
        let gw = gws[attempt % gws.len()];
        attempt += 1;
        assert!(attempt < 20, "too many reconnects");
        let Ok((mut ws, _)) =
            tokio_tungstenite::connect_async(fleet.ws_url(gw, ticket, seen)).await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while seen < last {
            match read(&mut ws).await {
                Read::Frame(f) => {
                    if let Some(s) = f["seq"].as_u64() {
                        seqs.push(s);
                        seen = s;
                    } else {
                        assert_ne!(f["type"], "error", "unexpected error frame {f}");
                    }
                }
                Read::Closed(_) => continue 'connect,
            }
        }
        return seqs;
    }
}

fn assert_exactly(seqs: &[u64], from: u64, to: u64) {
    let want: Vec<u64> = (from..=to).collect();
    assert_eq!(seqs, want.as_slice(), "gap, duplicate or reorder");
}

/// A small deterministic generator (no extra crate for randomness).
fn lcg(state: &mut u64) -> u64 {
    *state = state
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *state >> 33
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_to_live_handover_is_gapless_while_events_keep_arriving() {
    let fleet = Fleet::start(2).await;
    let bus = bus(&fleet).await;
    let (ticket, base) = quiet_chat(&fleet, &bus, "racer").await;
    const N: u64 = 400;
    let last = base + N;
    let appender = {
        let (bus, ticket) = (bus.clone(), ticket.clone());
        tokio::spawn(async move { append_n(&bus, &ticket, "racer", N as usize, 40).await })
    };
    let mut clients = Vec::new();
    let mut rng = 0x5eed_u64;
    for i in 0..24 {
        // Connect at random moments, with random `after` up to the current head.
        tokio::time::sleep(Duration::from_millis(lcg(&mut rng) % 40)).await;
        let head = bus
            .chat_position("default", ticket["chat_id"].as_str().unwrap())
            .await
            .unwrap()
            .seq;
        let after = lcg(&mut rng) % (head + 1);
        let (fleet_ref, ticket) = (&fleet, ticket.clone());
        clients.push(async move {
            let seqs = follow_to(fleet_ref, &ticket, &[i % 2], after, last).await;
            (after, seqs)
        });
    }
    let results = futures::future::join_all(clients).await;
    appender.await.unwrap();
    for (after, seqs) in results {
        assert_exactly(&seqs, after + 1, last);
    }
    // One live subscription per chat per replica, not one per socket.
    let (_, metrics) = metrics_text(&fleet, 0).await;
    assert!(metrics.contains("mozaiks_ws_resumes_total"), "{metrics}");
}

async fn metrics_text(fleet: &Fleet, gw: usize) -> (u16, String) {
    let r = fleet
        .http
        .get(format!("{}/metrics", fleet.gateways[gw]))
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap())
}

fn gateway_pid(fleet: &Fleet, gw: usize) -> u32 {
    fleet
        .procs
        .iter()
        .filter(|p| p.role == "gateway")
        .nth(gw)
        .unwrap()
        .child
        .id()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_a_replica_and_every_client_resumes_on_the_other() {
    let fleet = Fleet::start(2).await;
    let bus = bus(&fleet).await;
    let (ticket, base) = quiet_chat(&fleet, &bus, "victim").await;
    const N: u64 = 600;
    let last = base + N;
    let mut clients = Vec::new();
    for _ in 0..10 {
        let (fleet_ref, ticket) = (&fleet, ticket.clone());
        // Gateway 1 first; after it dies every reconnect goes to gateway 0.
        clients.push(async move { follow_to(fleet_ref, &ticket, &[1, 0], 0, last).await });
    }
    let killer = async {
        let (bus, ticket) = (bus.clone(), ticket.clone());
        append_n(&bus, &ticket, "victim", (N / 3) as usize, 40).await;
        let pid = gateway_pid(&fleet, 1);
        let status = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        append_n(&bus, &ticket, "victim", (N - N / 3) as usize, 40).await;
    };
    let (results, ()) = tokio::join!(futures::future::join_all(clients), killer);
    for seqs in results {
        assert_exactly(&seqs, 1, last);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_with_1012_and_clients_resume_elsewhere_without_loss() {
    let fleet = Fleet::start(2).await;
    let bus = bus(&fleet).await;
    let (ticket, base) = quiet_chat(&fleet, &bus, "drained").await;
    append_n(&bus, &ticket, "drained", 50, 40).await;
    let mut ws = fleet.connect(1, &ticket, 0).await;
    let mut seen = 0;
    while seen < base + 50 {
        if let Read::Frame(f) = read(&mut ws).await
            && let Some(s) = f["seq"].as_u64()
        {
            assert_eq!(s, seen + 1);
            seen = s;
        }
    }
    let pid = gateway_pid(&fleet, 1);
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    // Events keep coming while the replica drains.
    append_n(&bus, &ticket, "drained", 50, 40).await;
    let close = loop {
        match read(&mut ws).await {
            Read::Frame(f) => {
                if let Some(s) = f["seq"].as_u64() {
                    assert_eq!(s, seen + 1);
                    seen = s;
                }
            }
            Read::Closed(c) => break c,
        }
    };
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1012, "{reason}");
    assert!(reason.contains("after"), "{reason}");
    let rest = follow_to(&fleet, &ticket, &[0], seen, base + 100).await;
    assert_exactly(&rest, seen + 1, base + 100);
    // The drained process stops on its own once its sockets are closed.
    fleet
        .eventually("the drained gateway to stop", || async {
            let log = fleet
                .procs
                .iter()
                .filter(|p| p.role == "gateway")
                .nth(1)
                .map(|p| std::fs::read_to_string(&p.log).unwrap_or_default())
                .unwrap_or_default();
            log.contains("Gateway stopped.").then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_consumer_is_closed_with_1013_and_resumes_with_after() {
    let fleet = Fleet::start(1).await;
    let bus = bus(&fleet).await;
    let (ticket, base) = quiet_chat(&fleet, &bus, "sloth").await;
    let mut slow = fleet.connect(0, &ticket, base).await;
    let mut fast = fleet.connect(0, &ticket, base).await;
    // Both are live once the first live event reaches the fast one.
    append_n(&bus, &ticket, "sloth", 1, 10).await;
    assert_eq!(next_frame(&mut fast).await["seq"], base + 1);
    // 16 KiB frames: the 1024-frame queue plus both sockets' kernel buffers hold far less than this.
    const N: u64 = 2500;
    let fast_reader = async {
        let mut seqs = Vec::new();
        while seqs.len() < N as usize {
            if let Read::Frame(f) = read(&mut fast).await
                && let Some(s) = f["seq"].as_u64()
            {
                seqs.push(s);
            }
        }
        seqs
    };
    let (fast_seqs, ()) = tokio::join!(
        fast_reader,
        append_n(&bus, &ticket, "sloth", N as usize, 16 * 1024)
    );
    // The slow client did not slow the fast one down: it got everything.
    assert_exactly(&fast_seqs, base + 2, base + 1 + N);
    // Now the slow client reads: what was queued, then the close.
    let mut seen = base;
    let close = loop {
        match read(&mut slow).await {
            Read::Frame(f) => {
                if let Some(s) = f["seq"].as_u64() {
                    assert_eq!(s, seen + 1);
                    seen = s;
                }
            }
            Read::Closed(c) => break c,
        }
    };
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("slow consumer"), "{reason}");
    assert!(seen < base + 1 + N, "the slow client was never closed");
    let rest = follow_to(&fleet, &ticket, &[0], seen, base + 1 + N).await;
    assert_exactly(&rest, seen + 1, base + 1 + N);
    let (_, metrics) = metrics_text(&fleet, 0).await;
    assert!(
        metrics.contains("mozaiks_ws_slow_consumer_closes_total{app_id=\"default\"} 1"),
        "{metrics}"
    );
}

/// Changes the `default` app's limits in the registry bucket (read, modify, write).
async fn set_limits(fleet: &Fleet, bus: &Bus, limits: Value) {
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_APPS"))
        .await
        .unwrap();
    let current = kv.get("default").await.unwrap().expect("the default app");
    let mut app: Value = serde_json::from_slice(&current).unwrap();
    for (k, v) in limits.as_object().unwrap() {
        app["limits"][k] = v.clone();
    }
    kv.put("default", serde_json::to_vec(&app).unwrap().into())
        .await
        .unwrap();
    // Wait until the gateways' registries see it: refusals below depend on it.
    let _ = fleet;
    tokio::time::sleep(Duration::from_millis(500)).await;
}

async fn try_connect(url: String, origin: Option<&str>) -> Result<Ws, u16> {
    let mut req = url.into_client_request().unwrap();
    if let Some(o) = origin {
        req.headers_mut().insert("Origin", o.parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(ws),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => Err(resp.status().as_u16()),
        Err(e) => panic!("connect failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn limits_per_app_and_user_origin_allowlist_and_frame_rate() {
    let fleet = Fleet::start(1).await;
    let bus = bus(&fleet).await;
    let (a1, _) = quiet_chat(&fleet, &bus, "lim-a").await;
    let (a2, _) = quiet_chat(&fleet, &bus, "lim-a").await;
    let (b1, _) = quiet_chat(&fleet, &bus, "lim-b").await;
    set_limits(
        &fleet,
        &bus,
        json!({
            "max_websockets": 3,
            "max_websockets_per_user": 2,
            "max_frames_per_second": 5,
            "allowed_origins": ["https://app.example.com"]
        }),
    )
    .await;
    // Origin: a foreign one is refused before the upgrade; the allowed one and none (not a
    // browser) are accepted.
    assert_eq!(
        try_connect(fleet.ws_url(0, &a1, 0), Some("https://evil.example.com"))
            .await
            .err(),
        Some(403)
    );
    let s1 = try_connect(fleet.ws_url(0, &a1, 0), Some("https://app.example.com"))
        .await
        .expect("allowed origin");
    let s2 = try_connect(fleet.ws_url(0, &a2, 0), None)
        .await
        .expect("no origin");
    // Per user: lim-a has 2 open.
    assert_eq!(
        try_connect(fleet.ws_url(0, &a1, 0), None).await.err(),
        Some(429)
    );
    let mut s3 = try_connect(fleet.ws_url(0, &b1, 0), None)
        .await
        .expect("lim-b's first");
    // Per app: 3 open.
    assert_eq!(
        try_connect(fleet.ws_url(0, &b1, 0), None).await.err(),
        Some(429)
    );
    // Closing one frees a place.
    drop(s1);
    let reopened = fleet
        .eventually("a freed place", || async {
            try_connect(fleet.ws_url(0, &a1, 0), None).await.ok()
        })
        .await;
    // Frames per second: a flood gets one rate_limited error frame, then a 1008 close.
    for _ in 0..200 {
        if s3
            .send(Message::Text(r#"{"type":"ping"}"#.into()))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut codes = Vec::new();
    let close = loop {
        match read(&mut s3).await {
            Read::Frame(f) if f["type"] == "error" => codes.push(f["data"]["code"].clone()),
            Read::Frame(_) => {}
            Read::Closed(c) => break c,
        }
    };
    assert!(codes.contains(&json!("rate_limited")), "{codes:?}");
    let (code, reason) = close.expect("a close frame");
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.contains("frames per second"), "{reason}");
    drop((s2, reopened));
    // The refusals are counted.
    let (_, metrics) = metrics_text(&fleet, 0).await;
    assert!(metrics.contains("mozaiks_ws_refused_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_gone_from_the_log_get_an_explicit_resync() {
    let fleet = Fleet::start(1).await;
    let bus = bus(&fleet).await;
    let (ticket, base) = quiet_chat(&fleet, &bus, "forgetful").await;
    append_n(&bus, &ticket, "forgetful", 10, 10).await;
    let last = base + 10;
    // Retention: only the chat's last 3 events remain.
    let chat = ticket["chat_id"].as_str().unwrap();
    bus.stream("MZ_EVT")
        .await
        .unwrap()
        .purge()
        .filter(bus.subjects().chat_events("default", chat))
        .keep(3)
        .await
        .unwrap();
    let mut ws = fleet.connect(0, &ticket, 2).await;
    let first = next_frame(&mut ws).await;
    assert_eq!(first["type"], "resync", "{first}");
    assert_eq!(first["seq"], Value::Null);
    assert_eq!(first["data"]["reason"], "log_truncated");
    assert_eq!(first["data"]["first_seq"], last - 2);
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        let f = next_frame(&mut ws).await;
        seqs.push(f["seq"].as_u64().unwrap());
    }
    assert_eq!(seqs, vec![last - 2, last - 1, last]);
    // A client that saw everything still there resumes without a resync.
    let mut ws = fleet.connect(0, &ticket, last - 3).await;
    assert_eq!(next_frame(&mut ws).await["seq"], last - 2);
    // And `after` beyond the head is an error frame, then live.
    let mut ws = fleet.connect(0, &ticket, last + 50).await;
    let f = next_frame(&mut ws).await;
    assert_eq!(f["data"]["code"], "after_beyond_head", "{f}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn notifications_reach_a_user_on_every_replica_and_never_another_app() {
    let fleet = Fleet::start(2).await;
    let bus = bus(&fleet).await;
    let (t1, _) = quiet_chat(&fleet, &bus, "nina").await;
    let (t2, _) = quiet_chat(&fleet, &bus, "nina").await;
    let (t3, _) = quiet_chat(&fleet, &bus, "otto").await;
    let mut nina0 = fleet.connect(0, &t1, u64::MAX / 2).await;
    let mut nina1 = fleet.connect(1, &t2, u64::MAX / 2).await;
    let mut otto1 = fleet.connect(1, &t3, u64::MAX / 2).await;
    for ws in [&mut nina0, &mut nina1, &mut otto1] {
        // Each got after_beyond_head; now it is live.
        assert_eq!(next_frame(ws).await["type"], "error");
    }
    let post = |token: String, body: Value| {
        let http = fleet.http.clone();
        let url = format!("{}/api/notify", fleet.gateways[0]);
        async move {
            let r = http
                .post(url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let admin = Fleet::token("boss", "default", &["admin"]);
    let other_admin = Fleet::token("boss", "other-app", &["admin"]);
    // Another app's admin targets "nina": nothing reaches default's nina.
    let (s, _) = post(other_admin, json!({"user_id": "nina", "data": {"n": 0}})).await;
    assert_eq!(s, 202);
    // One user on all their sockets, on both replicas.
    let (s, body) = post(admin.clone(), json!({"user_id": "nina", "data": {"n": 1}})).await;
    assert_eq!(s, 202, "{body}");
    for ws in [&mut nina0, &mut nina1] {
        let f = next_frame(ws).await;
        assert_eq!(f["type"], "notification", "{f}");
        assert_eq!(f["seq"], Value::Null);
        assert_eq!(f["data"], json!({"n": 1}));
    }
    // Broadcast to the app: everyone, otto included; otto never saw n=1 nor the other app's.
    let (s, _) = post(admin.clone(), json!({"data": {"n": 2}})).await;
    assert_eq!(s, 202);
    for ws in [&mut nina0, &mut nina1, &mut otto1] {
        let f = next_frame(ws).await;
        assert_eq!(f["data"], json!({"n": 2}), "{f}");
    }
    // Refusals: not an admin, a bad body, a field naming another app, oversized data.
    let user = Fleet::token("nina", "default", &["user"]);
    let (s, b) = post(user, json!({"data": {}})).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (403, json!("admin_required"))
    );
    let (s, _) = post(admin.clone(), json!({"user_id": 7, "data": {}})).await;
    assert!(s == 400 || s == 422, "{s}");
    let (s, _) = post(admin.clone(), json!({"app_id": "other-app", "data": {}})).await;
    assert!(s == 400 || s == 422, "{s}");
    let (s, b) = post(admin.clone(), json!({"user_id": "", "data": {}})).await;
    assert_eq!(
        (s, b["error"]["code"].clone()),
        (400, json!("invalid_user_id"))
    );
    let (s, b) = post(admin, json!({"data": "x".repeat(20_000)})).await;
    assert_eq!((s, b["error"]["code"].clone()), (413, json!("too_large")));
    let (s, _) = post(String::new(), json!({"data": {}})).await;
    assert_eq!(s, 401);
}

/// Starts one more gateway process with extra environment.
fn spawn_gateway(fleet: &mut Fleet, env: &[(&str, &str)]) -> usize {
    let port = free_port();
    fleet.spawn_with("gateway", Some(port), env);
    fleet.gateways.push(format!("http://127.0.0.1:{port}"));
    fleet.gateways.len() - 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_pings_and_closes_a_silent_client() {
    let mut fleet = Fleet::start(1).await;
    let gw = spawn_gateway(
        &mut fleet,
        &[
            ("MOZAIKS_WS_PING_SECONDS", "1"),
            ("MOZAIKS_WS_IDLE_SECONDS", "3"),
        ],
    );
    let base = fleet.gateways[gw].clone();
    fleet.wait_ready(&base).await;
    let bus = bus(&fleet).await;
    let (ticket, head) = quiet_chat(&fleet, &bus, "quiet").await;
    // A client that reads answers pings (tungstenite replies with pongs) and stays up.
    let mut alive = fleet.connect(gw, &ticket, head).await;
    let mut pings = 0;
    while pings < 4 {
        match tokio::time::timeout(Duration::from_secs(20), alive.next())
            .await
            .unwrap()
        {
            Some(Ok(Message::Ping(_))) => pings += 1,
            Some(Ok(Message::Close(c))) => panic!("an answering client was closed: {c:?}"),
            Some(Ok(_)) => {}
            other => panic!("socket ended: {other:?}"),
        }
    }
    // A client that never reads never pongs: the server closes it.
    let mut silent = fleet.connect(gw, &ticket, head).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let close = loop {
        match read(&mut silent).await {
            Read::Frame(_) => {}
            Read::Closed(c) => break c,
        }
    };
    // The close frame may be lost: the client's late pongs hit a socket the server already
    // dropped, which resets it. If it arrived, it says why; either way the server counted it.
    if let Some((code, reason)) = close {
        assert_eq!(code, u16::from(CloseCode::Normal));
        assert!(reason.starts_with("idle"), "{reason}");
    }
    let (_, metrics) = metrics_text(&fleet, gw).await;
    assert!(
        metrics.contains("mozaiks_ws_closed_total{code=\"1000\"}"),
        "{metrics}"
    );
    // (The answering client outlived the idle timeout while it read: pongs count as activity.)
    drop(alive);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hostile_frames_leave_the_replica_healthy() {
    let fleet = Fleet::start(1).await;
    let bus = bus(&fleet).await;
    let (ticket, head) = quiet_chat(&fleet, &bus, "mallory").await;
    let mut hostile = Vec::new();
    for i in 0..8 {
        let mut ws = fleet.connect(0, &ticket, head).await;
        let frame = match i % 4 {
            0 => Message::Text("\u{0}\u{1}{{{{".into()),
            1 => Message::Binary(vec![0xff; 1000].into()),
            2 => Message::Text(
                json!({"type": "user.message", "text": "x", "client_msg_id": "y".repeat(5000)})
                    .to_string()
                    .into(),
            ),
            _ => Message::Text("z".repeat(200 * 1024).into()),
        };
        let _ = ws.send(frame).await;
        hostile.push((i % 4, ws));
    }
    let mut codes: HashMap<usize, Value> = HashMap::new();
    for (kind, mut ws) in hostile {
        let got = loop {
            match read(&mut ws).await {
                Read::Frame(f) if f["type"] == "error" => break json!(f["data"]["code"]),
                Read::Frame(_) => continue,
                Read::Closed(c) => break json!(c.map(|c| c.0)),
            }
        };
        codes.insert(kind, got);
    }
    assert_eq!(codes[&0], json!("bad_json"));
    assert_eq!(codes[&1], json!("bad_frame"));
    assert_eq!(codes[&2], json!("bad_frame"));
    assert_eq!(codes[&3], json!(1009));
    // The replica still serves: health, and a fresh client gets live events.
    let r = fleet
        .http
        .get(format!("{}/health/ready", fleet.gateways[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let mut ws = fleet.connect(0, &ticket, head).await;
    append_n(&bus, &ticket, "mallory", 1, 10).await;
    assert_eq!(next_frame(&mut ws).await["seq"], head + 1);
}

#[tokio::test]
async fn seek_finds_where_a_catch_up_starts_in_a_few_direct_gets() {
    let servers = mozaiks_testkit::TestServers::start_nats().await.unwrap();
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "seek-test")
        .await
        .unwrap();
    bus.apply(&mozaiks_bus::definitions::Definitions::embedded().unwrap())
        .await
        .unwrap();
    // Two chats interleaved, so a chat's seqs are not the stream's.
    let tickets: Vec<Value> = ["c1", "c2"]
        .iter()
        .map(|c| json!({"app_id": "a", "chat_id": c, "workflow_name": "hello"}))
        .collect();
    for _ in 0..30 {
        for t in &tickets {
            append_n(&bus, t, "u", 10, 10).await;
        }
    }
    let head = bus.chat_position("a", "c2").await.unwrap();
    assert_eq!(head.seq, 300);
    let stream = bus.stream("MZ_EVT").await.unwrap();
    for after in [0, 1, 9, 10, 11, 150, 298, 299] {
        let seek = bus.seek_chat("a", "c2", after, head).await.unwrap();
        assert_eq!(seek.first_seq, 1);
        let msg = stream.direct_get(seek.from_stream_seq).await.unwrap();
        let env = mozaiks_events::codec::decode_event(&msg.payload).unwrap();
        assert_eq!(
            (env.chat_id.as_str(), env.seq),
            ("c2", after + 1),
            "after={after}"
        );
        assert!(seek.probes <= 14, "after={after}: {} probes", seek.probes);
    }
    let at_head = bus.seek_chat("a", "c2", 300, head).await.unwrap();
    assert_eq!(at_head.from_stream_seq, 0);
    let none = bus
        .seek_chat("a", "nope", 0, Default::default())
        .await
        .unwrap();
    assert_eq!(none, Default::default());
}
