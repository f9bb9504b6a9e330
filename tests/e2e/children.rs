//! Child workflows end to end: the shipped `research` pack fans out three `research_topic`
//! children through the real fleet; a worker SIGKILLed during a fan-out with two worker
//! processes; cancelling a parent cancels its running children; worker refusals reach the
//! client as error frames.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mozaiks_bus::Bus;
use mozaiks_events::Frame;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::engine::{Procs, assert_exactly_once, run};
use crate::fleet::*;

/// A child chat's log, as frames, with its envelopes' `parent_chat_id`s.
async fn child_log(bus: &Bus, chat_id: &str) -> (Vec<Value>, Vec<Option<String>>) {
    let events = bus.read_chat("default", chat_id, 0).await.unwrap();
    let frames = events
        .iter()
        .map(|(e, _)| serde_json::from_str(&Frame::from_envelope(e).to_json()).unwrap())
        .collect();
    let parents = events
        .iter()
        .map(|(e, _)| e.parent_chat_id.clone())
        .collect();
    (frames, parents)
}

/// Polls a chat's log until it holds an event of type `kind` (20 s at most).
async fn wait_for(bus: &Bus, chat_id: &str, kind: &str, logs: impl Fn() -> String) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (frames, _) = child_log(bus, chat_id).await;
        if frames.iter().any(|f| f["type"] == kind) {
            return frames;
        }
        assert!(
            Instant::now() < deadline,
            "chat {chat_id} has no {kind}: {frames:#?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn of_type<'a>(frames: &'a [Value], kind: &str) -> Vec<&'a Value> {
    frames.iter().filter(|f| f["type"] == kind).collect()
}

fn child_ids(frames: &[Value]) -> Vec<String> {
    of_type(frames, "child.spawned")
        .iter()
        .map(|f| f["data"]["child_chat_id"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_research_pack_fans_out_three_children_and_merges_their_results() {
    let fleet = Fleet::start(1).await;
    let (ticket, _ws, frames) = run(&fleet, "research", "event sourcing", "run.completed").await;
    assert_exactly_once(&frames);
    let parent = ticket["chat_id"].as_str().unwrap();
    let spawned = of_type(&frames, "child.spawned");
    assert_eq!(spawned.len(), 3);
    let inputs: Vec<_> = spawned.iter().map(|f| f["data"]["input"].clone()).collect();
    assert_eq!(
        inputs,
        [
            "event sourcing - history",
            "event sourcing - current state",
            "event sourcing - open problems"
        ]
    );
    let completed = of_type(&frames, "child.completed");
    assert_eq!(completed.len(), 3);
    assert!(completed.iter().all(|f| f["data"]["status"] == "completed"));

    let bus = Bus::connect(
        &fleet.servers.nats_url,
        &fleet.servers.namespace,
        "e2e-children",
    )
    .await
    .unwrap();
    let mut outputs = Vec::new();
    for id in child_ids(&frames) {
        let (log, parents) = child_log(&bus, &id).await;
        assert_gapless(&log, 1);
        assert_exactly_once(&log);
        assert!(parents.iter().all(|p| p.as_deref() == Some(parent)));
        let done = log.last().unwrap();
        assert_eq!(done["type"], "run.completed");
        let output = done["data"]["output"].as_str().unwrap().to_string();
        let recorded = completed
            .iter()
            .find(|f| f["data"]["child_chat_id"] == id.as_str())
            .unwrap();
        assert_eq!(recorded["data"]["output"], output.as_str());
        outputs.push(output);
    }
    assert!(
        outputs[0].contains("the project's changelog"),
        "{outputs:?}"
    );
    assert!(outputs[2].contains("the issue tracker"), "{outputs:?}");

    // The results are in the context before the coordinator speaks; the writer merges them.
    let merge = frames
        .iter()
        .position(|f| f["type"] == "context.updated" && f["data"]["key"] == "findings")
        .unwrap();
    let first_reply = frames
        .iter()
        .position(|f| f["type"] == "model.replied")
        .unwrap();
    assert!(merge < first_reply);
    let merged = frames.last().unwrap()["data"]["output"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        merged.starts_with("Report on \"event sourcing\""),
        "{merged}"
    );
    for o in &outputs {
        assert!(merged.contains(o.as_str()), "{merged} lacks {o}");
    }
}

/// A tool server whose calls wait until the gate opens. Returns its base URL, the call count and
/// the gate.
async fn gated_tool_server() -> (String, Arc<AtomicUsize>, watch::Sender<bool>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let (gate, rx) = watch::channel(false);
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            let h = h.clone();
            let mut rx = rx.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                let _ = rx.wait_for(|open| *open).await;
                axum::Json(json!("fetched"))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits, gate)
}

/// A parent pack `fan` with three `slow_topic` children, each calling the gated tool.
fn fan_packs(tool_base: &str) -> Vec<(&'static str, String)> {
    vec![
        (
            "slow_topic",
            format!(
                "name: slow_topic
start_agent: r
max_turns: 1
tools:
  - name: fetch
    parameters: {{type: object, properties: {{q: {{type: string}}}}}}
    http: {{method: GET, url: '{tool_base}/slow', timeout_ms: 300000}}
agents:
  - name: r
    tools: [fetch]
    offline:
      tool_calls: [{{tool: fetch, arguments: {{q: '{{input}}'}}}}]
      reply: 'notes on {{input}}: {{tool.fetch}}'
"
            ),
        ),
        (
            "fan",
            "name: fan
start_agent: lead
max_turns: 2
agents:
  - name: lead
    children: {workflow: slow_topic, inputs: ['{input} 1', '{input} 2', '{input} 3'], into: findings}
    offline: {reply: 'lead read {context.findings}'}
    handoff: {after_work: writer}
  - name: writer
    offline: {reply: merged}
"
            .to_string(),
        ),
    ]
}

/// Starts a `fan` session on the gateway at `port`; returns its ticket and socket.
async fn start_fan(port: u16) -> (Value, Ws) {
    let http = reqwest::Client::new();
    let token = Fleet::token("kim", "default", &["user"]);
    let r = http
        .post(format!("http://127.0.0.1:{port}/api/sessions"))
        .bearer_auth(&token)
        .json(&json!({"app_id": "default", "workflow_name": "fan", "message": "topic"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let ticket: Value = r.json().await.unwrap();
    let path = ticket["ws_url"].as_str().unwrap();
    let url = format!(
        "ws://127.0.0.1:{port}{}?token={}&after=0",
        &path[path.find("/ws/").unwrap()..],
        ticket["runtime_token"].as_str().unwrap()
    );
    let (ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
    (ticket, ws)
}

async fn wait_hits(hits: &AtomicUsize, n: usize, procs: &Procs) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while hits.load(Ordering::SeqCst) < n {
        assert!(
            Instant::now() < deadline,
            "the children never all called the tool:\n{}",
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_a_fan_out_leaves_the_run_to_the_other_worker() {
    let (tool_base, hits, gate) = gated_tool_server().await;
    let mut procs = Procs::new(&fan_packs(&tool_base)).await;
    let port = procs.gateway().await;
    let first = procs.spawn("worker", None);
    let (ticket, mut ws) = start_fan(port).await;
    let parent = ticket["chat_id"].as_str().unwrap().to_string();

    // The parent waits; each child is inside its tool call, all on the first worker.
    let mut frames = Vec::new();
    while of_type(&frames, "child.spawned").len() < 3 {
        frames.extend(events_n(&mut ws, 1).await);
    }
    wait_hits(&hits, 3, &procs).await;
    procs.spawn("worker", None);
    procs.kill(first); // SIGKILL
    let _ = gate.send(true);

    // The second worker resumes the children (their commands are redelivered) and the parent
    // (told by its children's ends).
    frames.extend(events_until(&mut ws, "run.completed").await);
    assert_gapless(&frames, 1);
    assert_exactly_once(&frames);
    assert_eq!(of_type(&frames, "child.spawned").len(), 3);
    let completed = of_type(&frames, "child.completed");
    assert_eq!(completed.len(), 3, "{frames:#?}");
    assert!(completed.iter().all(|f| f["data"]["status"] == "completed"));
    assert_eq!(frames.last().unwrap()["data"]["output"], "merged");

    let bus = Bus::connect(&procs.servers.nats_url, &procs.servers.namespace, "e2e")
        .await
        .unwrap();
    for id in child_ids(&frames) {
        let (log, parents) = child_log(&bus, &id).await;
        assert_gapless(&log, 1);
        assert_exactly_once(&log);
        assert_eq!(of_type(&log, "usage.charged").len(), 2, "{log:#?}");
        assert!(
            parents
                .iter()
                .all(|p| p.as_deref() == Some(parent.as_str()))
        );
        assert_eq!(log.last().unwrap()["type"], "run.completed");
    }
    // Only the three tool calls in flight on the killed worker were made again.
    assert_eq!(hits.load(Ordering::SeqCst), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_parent_cancels_its_running_children() {
    let (tool_base, hits, _gate) = gated_tool_server().await;
    let mut procs = Procs::new(&fan_packs(&tool_base)).await;
    let port = procs.gateway().await;
    procs.spawn("worker", None);
    let (_ticket, mut ws) = start_fan(port).await;
    let mut frames = Vec::new();
    while of_type(&frames, "child.spawned").len() < 3 {
        frames.extend(events_n(&mut ws, 1).await);
    }
    wait_hits(&hits, 3, &procs).await;

    send_json(&mut ws, json!({"type": "cancel"})).await;
    frames.extend(events_until(&mut ws, "run.cancelled").await);
    assert_gapless(&frames, 1);
    assert!(of_type(&frames, "child.completed").is_empty());

    // Each child is cancelled in the middle of its tool call (the gate never opens).
    let bus = Bus::connect(&procs.servers.nats_url, &procs.servers.namespace, "e2e")
        .await
        .unwrap();
    for id in child_ids(&frames) {
        let log = wait_for(&bus, &id, "run.cancelled", || procs.logs()).await;
        assert_gapless(&log, 1);
        assert!(of_type(&log, "run.completed").is_empty());
        assert!(of_type(&log, "tool.result").is_empty());
        assert_eq!(log.last().unwrap()["type"], "run.cancelled");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refusals_reach_the_client_and_an_answer_after_a_message_is_taken() {
    let fleet = Fleet::start(1).await;
    let (_, mut ws, frames) = run(
        &fleet,
        "support_triage",
        "Where is my parcel?",
        "input.requested",
    )
    .await;
    let request_id = frames.last().unwrap()["data"]["request_id"]
        .as_str()
        .unwrap()
        .to_string();

    // A message while the run waits: queued, and the chat's last event is no longer the request.
    send_json(
        &mut ws,
        json!({"type": "user.message", "text": "hello?", "client_msg_id": "m1"}),
    )
    .await;
    let queued = events_until(&mut ws, "message.user").await;
    assert_gapless(&queued, frames.len() as u64 + 1);

    // An answer to another request: the worker refuses, and says so on the socket.
    send_json(
        &mut ws,
        json!({"type": "input.response", "request_id": "nope", "text": "A-100"}),
    )
    .await;
    // The gateway's `ack` and the worker's `error` may arrive in either order.
    let (mut ack, mut err) = (None, None);
    while ack.is_none() || err.is_none() {
        let f = next_frame(&mut ws).await;
        match f["type"].as_str().unwrap() {
            "ack" => ack = Some(f),
            "error" => err = Some(f),
            other => panic!("unexpected {other}: {f}"),
        }
    }
    let (ack, err) = (ack.unwrap(), err.unwrap());
    assert!(err["seq"].is_null());
    assert_eq!(err["data"]["code"], "unknown_request");
    assert_eq!(err["data"]["command_id"], ack["data"]["command_id"]);

    // The right answer is taken although a message came after the request.
    send_json(
        &mut ws,
        json!({"type": "input.response", "request_id": request_id, "text": "A-100"}),
    )
    .await;
    let rest = events_until(&mut ws, "run.completed").await;
    assert_eq!(rest[0]["type"], "input.received");
    let result = rest.iter().find(|f| f["type"] == "tool.result").unwrap();
    assert_eq!(result["data"]["result"], "A-100");
}

/// GET `path` on the gateway at `port` with `token`.
async fn get(port: u16, path: &str, token: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

/// Polls `path` until `ok` holds for its body (30 s at most).
async fn poll(
    port: u16,
    path: &str,
    token: &str,
    procs: &Procs,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(port, path, token).await;
        assert_eq!(status, 200, "{path}: {body}");
        if ok(&body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never got there: {body}\n{}",
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ops_endpoints_answer_from_every_live_worker_per_tenant() {
    let (tool_base, hits, gate) = gated_tool_server().await;
    let mut procs = Procs::new(&fan_packs(&tool_base)).await;
    let port = procs.gateway().await;
    let worker = procs.spawn("worker", None);
    let root = Fleet::token("root", "default", &["superadmin"]);
    let admin = Fleet::token("ann", "default", &["admin"]);
    let stranger = Fleet::token("sam", "other", &["admin"]);
    let user = Fleet::token("kim", "default", &["user"]);

    // A parent waiting for three children, each inside its tool call: four runs in progress.
    let (ticket, _ws) = start_fan(port).await;
    wait_hits(&hits, 3, &procs).await;
    let parent = ticket["chat_id"].as_str().unwrap();
    let active = poll(port, "/health/active-runs", &root, &procs, |b| {
        b["count"] == 4
    })
    .await;
    assert_eq!(active["workers"], 1);
    let runs = active["runs"].as_array().unwrap();
    assert!(runs.iter().all(|r| r["app_id"] == "default"));
    let lead = runs.iter().find(|r| r["chat_id"] == parent).unwrap();
    assert_eq!(
        (
            lead["workflow"].as_str(),
            lead["step"].as_u64(),
            lead["agent"].as_str()
        ),
        (Some("fan"), Some(1), Some("lead"))
    );
    assert_eq!(
        runs.iter()
            .filter(|r| r["workflow"] == "slow_topic")
            .count(),
        3
    );
    // The app's admin sees the same; another app's admin sees nothing of it.
    let (s, mine) = get(port, "/health/active-runs", &admin).await;
    assert_eq!((s, mine["count"].as_u64()), (200, Some(4)));
    let (s, theirs) = get(port, "/health/active-runs", &stranger).await;
    assert_eq!((s, theirs["count"].as_u64()), (200, Some(0)));
    let (s, body) = get(port, "/metrics/perf/chats", &stranger).await;
    assert_eq!((s, body["chats"].as_array().map(Vec::len)), (200, Some(0)));
    let (s, body) = get(port, "/metrics/perf/aggregate", &stranger).await;
    assert_eq!(s, 200);
    assert_eq!(body["runs_started"], 0);
    assert!(body["apps"].as_object().unwrap().is_empty(), "{body}");
    // Refusals.
    for path in [
        "/health/active-runs",
        "/metrics/perf/aggregate",
        "/metrics/perf/chats",
    ] {
        let (s, body) = get(port, &format!("{path}?app_id=default"), &stranger).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (403, Some("app_mismatch")),
            "{path}"
        );
        let (s, body) = get(port, path, &user).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (403, Some("admin_required")),
            "{path}"
        );
        let (s, body) = get(port, &format!("{path}?color=red"), &admin).await;
        assert_eq!(
            (s, body["error"]["code"].as_str()),
            (400, Some("invalid_query")),
            "{path}"
        );
        let r = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}{path}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{path}");
    }
    let (s, scoped) = get(port, "/health/active-runs?app_id=other", &root).await;
    assert_eq!((s, scoped["count"].as_u64()), (200, Some(0)));

    // Per chat: the children have called the model once (the tool call), the parent not yet.
    let (_, chats) = get(port, "/metrics/perf/chats", &admin).await;
    let chats = chats["chats"].as_array().unwrap();
    assert_eq!(chats.len(), 4);
    for c in chats.iter().filter(|c| c["workflow"] == "slow_topic") {
        assert!(c["total_tokens"].as_u64().unwrap() > 0, "{c}");
        assert_eq!(c["step"], 1);
    }

    // The runs end: nothing active, and the totals count them.
    let _ = gate.send(true);
    poll(port, "/health/active-runs", &root, &procs, |b| {
        b["count"] == 0
    })
    .await;
    let agg = poll(port, "/metrics/perf/aggregate", &admin, &procs, |b| {
        b["runs_completed"] == 4
    })
    .await;
    assert_eq!(agg["runs_started"], 4);
    assert_eq!(agg["runs_failed"], 0);
    assert!(agg["total_tokens"].as_u64().unwrap() > 0);
    assert!(agg["turns"].as_u64().unwrap() >= 5, "{agg}");
    assert_eq!(agg["apps"]["default"]["runs_completed"], 4);

    // A dead worker drops out once its snapshot ages out.
    procs.kill(worker);
    poll(port, "/metrics/perf/aggregate", &root, &procs, |b| {
        b["workers"] == 0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_cancelled_before_it_started_ends_cancelled_and_the_parent_sees_it() {
    let (tool_base, hits, gate) = gated_tool_server().await;
    let mut procs = Procs::new(&fan_packs(&tool_base)).await;
    let port = procs.gateway().await;
    procs.spawn("worker", None);
    // One child at a time: the second child is spawned only when the first has ended.
    let root = Fleet::token("root", "default", &["superadmin"]);
    let r = reqwest::Client::new()
        .patch(format!("http://127.0.0.1:{port}/api/apps/default"))
        .bearer_auth(&root)
        .json(&json!({"limits": {"max_parallel_children": 1}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["effective_limits"]["max_parallel_children"], 1);
    // The worker's registry follows the app bucket; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;

    let (_ticket, mut ws) = start_fan(port).await;
    let mut frames = Vec::new();
    while of_type(&frames, "child.spawned").is_empty() {
        frames.extend(events_n(&mut ws, 1).await);
    }
    wait_hits(&hits, 1, &procs).await;
    assert_eq!(of_type(&frames, "child.spawned").len(), 1);
    // The second child's id is known before it exists (run id, step, index).
    let run_id = of_type(&frames, "run.started")[0]["data"]["run_id"]
        .as_str()
        .unwrap()
        .replace('-', "");
    let second = format!("{run_id}-1-1");

    // Its cancel arrives before its session starts.
    let bus = Bus::connect(&procs.servers.nats_url, &procs.servers.namespace, "e2e")
        .await
        .unwrap();
    let cancel = mozaiks_events::CommandEnvelope::new(
        "default",
        &second,
        "kim",
        "slow_topic",
        mozaiks_events::Command::Cancel {
            reason: "not needed".into(),
        },
    );
    bus.send_command(&cancel, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        bus.read_chat("default", &second, 0)
            .await
            .unwrap()
            .is_empty()
    );

    // The first child ends; the second starts and ends cancelled before any step; the third runs.
    let _ = gate.send(true);
    frames.extend(events_until(&mut ws, "run.completed").await);
    assert_gapless(&frames, 1);
    let completed = of_type(&frames, "child.completed");
    let statuses: Vec<(&str, &str)> = completed
        .iter()
        .map(|f| {
            (
                f["data"]["child_chat_id"].as_str().unwrap(),
                f["data"]["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(statuses.len(), 3, "{frames:#?}");
    assert_eq!(
        statuses.iter().find(|(id, _)| *id == second).map(|s| s.1),
        Some("cancelled"),
        "{statuses:?}"
    );
    assert_eq!(
        statuses.iter().filter(|(_, s)| *s == "completed").count(),
        2
    );
    let (log, _) = child_log(&bus, &second).await;
    assert_gapless(&log, 1);
    assert_eq!(
        types(&log),
        [
            "session.started",
            "message.user",
            "run.started",
            "run.cancelled"
        ]
    );
    assert_eq!(log[3]["data"]["reason"], "not needed");
    // Only the two children that ran called the tool.
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
