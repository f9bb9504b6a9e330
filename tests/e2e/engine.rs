//! The workflow engine end to end: every shipped pack through the real fleet, human input over
//! the WebSocket, and a worker killed mid-run whose run another worker finishes without
//! repeating a recorded model call or charging it twice.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use mozaiks_testkit::TestServers;
use serde_json::{Value, json};

use crate::fleet::*;

/// Asserts the run's bookkeeping: every model call charged exactly once, every tool call
/// answered exactly once.
pub(crate) fn assert_exactly_once(frames: &[Value]) {
    let key = |f: &Value| (f["data"]["step"].as_u64(), f["data"]["round"].as_u64());
    let replied: Vec<_> = frames
        .iter()
        .filter(|f| f["type"] == "model.replied")
        .map(key)
        .collect();
    let unique: HashSet<_> = replied.iter().collect();
    assert_eq!(
        unique.len(),
        replied.len(),
        "a model call was recorded twice"
    );
    let charged = frames
        .iter()
        .filter(|f| f["type"] == "usage.charged")
        .count();
    assert_eq!(charged, replied.len(), "each model call is charged once");
    let mut results = HashMap::new();
    for f in frames.iter().filter(|f| f["type"] == "tool.result") {
        *results
            .entry(f["data"]["call_id"].as_str().unwrap().to_string())
            .or_insert(0) += 1;
    }
    let calls: HashSet<_> = frames
        .iter()
        .filter(|f| f["type"] == "tool.call")
        .map(|f| f["data"]["call_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(calls.len(), results.len(), "every tool call has a result");
    assert!(results.values().all(|n| *n == 1), "a tool result twice");
}

fn selections(frames: &[Value]) -> Vec<(String, Value, String)> {
    frames
        .iter()
        .filter(|f| f["type"] == "speaker.selected")
        .map(|f| {
            (
                f["data"]["from"].as_str().unwrap().to_string(),
                f["data"]["next"].clone(),
                f["data"]["reason"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn context_updates(frames: &[Value]) -> Vec<(String, Value)> {
    frames
        .iter()
        .filter(|f| f["type"] == "context.updated")
        .map(|f| {
            (
                f["data"]["key"].as_str().unwrap().to_string(),
                f["data"]["value"].clone(),
            )
        })
        .collect()
}

/// Starts `workflow` with `message` and reads its events until `until`.
pub(crate) async fn run(
    fleet: &Fleet,
    workflow: &str,
    message: &str,
    until: &str,
) -> (Value, Ws, Vec<Value>) {
    let token = Fleet::token("eve", "default", &["user"]);
    let ticket = fleet.session(0, &token, workflow, Some(message)).await;
    let mut ws = fleet.connect(0, &ticket, 0).await;
    let frames = events_until(&mut ws, until).await;
    assert_gapless(&frames, 1);
    (ticket, ws, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_shipped_pack_runs_through_the_fleet() {
    let fleet = Fleet::start(1).await;
    let shipped =
        mozaiks_packs::Catalog::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows"))
            .unwrap();
    let cases = [
        ("hello", "hi there"),
        ("triage_handoff", "my invoice is wrong"),
        ("support_triage", "I was charged twice on my invoice"),
        ("research_topic", "event sourcing - history"),
        ("research", "event sourcing"),
        ("concierge", "Please book a table for dinner at 8"),
    ];
    let covered: HashSet<&str> = cases.iter().map(|(w, _)| *w).collect();
    for name in shipped.names() {
        assert!(
            covered.contains(name),
            "shipped pack {name} has no end-to-end run"
        );
    }
    for (workflow, message) in cases {
        let (_, _, frames) = run(&fleet, workflow, message, "run.completed").await;
        assert_exactly_once(&frames);
        let steps = frames
            .iter()
            .filter(|f| f["type"] == "step.started")
            .count();
        let done = frames.last().unwrap();
        assert_eq!(
            done["data"]["steps"].as_u64().unwrap() as usize,
            steps,
            "{workflow}"
        );
        assert!(
            !done["data"]["output"].as_str().unwrap().is_empty(),
            "{workflow}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_triage_routes_on_context_and_asks_the_user() {
    let fleet = Fleet::start(1).await;

    // A billing request: the classify tool sets `category`, the condition hands off, the
    // specialist sets `resolved`, and the terminate condition ends the run.
    let (_, _, frames) = run(
        &fleet,
        "support_triage",
        "Refund my invoice please",
        "run.completed",
    )
    .await;
    assert_eq!(
        context_updates(&frames),
        [
            ("category".to_string(), json!("billing")),
            ("resolved".to_string(), json!(true)),
        ]
    );
    assert_eq!(
        selections(&frames),
        [
            (
                "triage".to_string(),
                json!("billing"),
                "condition".to_string()
            ),
            (
                "billing".to_string(),
                Value::Null,
                "terminate_when".to_string()
            ),
        ]
    );
    let said: Vec<_> = frames
        .iter()
        .filter(|f| f["type"] == "agent.message")
        .map(|f| f["data"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        said,
        [
            "Triage: this is a billing request; routing it.",
            "Billing: I corrected the charge behind \"Refund my invoice please\". Resolved: true.",
        ]
    );

    // Nothing matches: general support asks the user (ask_user), and the answer is the result.
    let (_, mut ws, frames) = run(
        &fleet,
        "support_triage",
        "Where is my parcel?",
        "input.requested",
    )
    .await;
    assert_eq!(
        selections(&frames),
        [(
            "triage".to_string(),
            json!("general"),
            "after_work".to_string()
        )]
    );
    let asked = frames.last().unwrap();
    assert_eq!(
        asked["data"]["prompt"],
        "Could you give me your order number?"
    );
    let request_id = asked["data"]["request_id"].as_str().unwrap().to_string();
    send_json(
        &mut ws,
        json!({"type": "input.response", "request_id": request_id, "text": "A-300"}),
    )
    .await;
    let rest = events_until(&mut ws, "run.completed").await;
    assert_gapless(&rest, frames.len() as u64 + 1);
    assert_eq!(rest[0]["type"], "input.received");
    let result = rest.iter().find(|f| f["type"] == "tool.result").unwrap();
    assert_eq!(result["data"]["result"], "A-300");
    let reply = rest.iter().find(|f| f["type"] == "agent.message").unwrap();
    assert_eq!(
        reply["data"]["text"],
        "General: thanks, I noted \"A-300\". A colleague will follow up."
    );
    let all: Vec<Value> = frames.iter().chain(rest.iter()).cloned().collect();
    assert_exactly_once(&all);

    // Nothing waits any more: a second answer is refused with an error frame.
    send_json(&mut ws, json!({"type": "input.response", "text": "again"})).await;
    let err = loop {
        let f = next_frame(&mut ws).await;
        if f["type"] == "error" {
            break f;
        }
    };
    assert_eq!(err["data"]["code"], "not_waiting_for_input");
}

// ---- a worker killed mid-run -------------------------------------------------------------

/// Processes started with a workflows folder and stream definitions of the test's own.
pub(crate) struct Procs {
    pub servers: TestServers,
    pub dir: PathBuf,
    pub children: Vec<(String, Child)>,
}

impl Procs {
    /// Servers, the shipped stream definitions with a 2 s `ack_wait` (so that a dead worker's
    /// command is redelivered within seconds; production: 30 s), and a workflows folder with
    /// `packs` (name, YAML). Nothing runs yet.
    pub async fn new(packs: &[(&str, String)]) -> Procs {
        let servers = TestServers::start().await.expect("test servers");
        let dir = std::env::temp_dir().join(format!(
            "mozaiks-e2e-engine-{}",
            uuid::Uuid::now_v7().simple()
        ));
        copy_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("streams"),
            &dir.join("streams"),
        );
        let workers = dir.join("streams/consumers/workers.json");
        let mut def: Value =
            serde_json::from_str(&std::fs::read_to_string(&workers).unwrap()).unwrap();
        def["config"]["ack_wait"] = json!(2_000_000_000u64);
        std::fs::write(&workers, def.to_string()).unwrap();
        for (name, yaml) in packs {
            std::fs::create_dir_all(dir.join("workflows").join(name)).unwrap();
            std::fs::write(dir.join("workflows").join(name).join("workflow.yaml"), yaml).unwrap();
        }
        Procs {
            servers,
            dir,
            children: Vec::new(),
        }
    }

    /// Starts a gateway and waits until it is ready; returns its port.
    pub async fn gateway(&mut self) -> u16 {
        let port = free_port();
        self.spawn("gateway", Some(port));
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !matches!(http.get(format!("http://127.0.0.1:{port}/health/ready")).send().await, Ok(r) if r.status() == 200)
        {
            assert!(
                Instant::now() < deadline,
                "gateway not ready:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        port
    }

    /// SIGKILLs process `i`.
    pub fn kill(&mut self, i: usize) {
        self.children[i].1.kill().unwrap();
        self.children[i].1.wait().unwrap();
    }

    pub fn spawn(&mut self, role: &str, port: Option<u16>) -> usize {
        self.spawn_env(role, port, &[])
    }

    /// Like [`Procs::spawn`], with more environment.
    pub fn spawn_env(&mut self, role: &str, port: Option<u16>, env: &[(&str, &str)]) -> usize {
        let log = self.dir.join(format!("{role}-{}.log", self.children.len()));
        let mut cmd = command(&self.servers, role, &log);
        cmd.env("MOZAIKS_WORKFLOWS_DIR", self.dir.join("workflows"))
            .env("MOZAIKS_STREAMS_DIR", self.dir.join("streams"))
            .envs(env.iter().copied());
        if let Some(p) = port {
            cmd.env("MOZAIKS_LISTEN", format!("127.0.0.1:{p}"));
        }
        self.children
            .push((role.to_string(), cmd.spawn().expect("spawn mozaiks")));
        self.children.len() - 1
    }

    pub fn logs(&self) -> String {
        (0..self.children.len())
            .map(|i| {
                let role = &self.children[i].0;
                let text = std::fs::read_to_string(self.dir.join(format!("{role}-{i}.log")))
                    .unwrap_or_default();
                format!("--- {role} ---\n{text}")
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        for (_, c) in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub(crate) fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

/// A tool server whose first call never answers (the worker is killed during it); later calls
/// answer at once. Returns its base URL and the number of calls.
async fn slow_tool_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/slow",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                if h.fetch_add(1, Ordering::SeqCst) == 0 {
                    tokio::time::sleep(Duration::from_secs(600)).await;
                }
                axum::Json(json!({"status": "fetched"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_tool_call_hands_the_run_over_without_recharging() {
    let (tool_base, hits) = slow_tool_server().await;
    let servers = TestServers::start().await.expect("test servers");
    let dir = std::env::temp_dir().join(format!(
        "mozaiks-e2e-engine-{}",
        uuid::Uuid::now_v7().simple()
    ));
    // The shipped stream definitions, with a short ack wait so that a dead worker's command is
    // redelivered within seconds (production: 30 s).
    copy_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("streams"),
        &dir.join("streams"),
    );
    let workers = dir.join("streams/consumers/workers.json");
    let mut def: Value = serde_json::from_str(&std::fs::read_to_string(&workers).unwrap()).unwrap();
    def["config"]["ack_wait"] = json!(2_000_000_000u64);
    std::fs::write(&workers, def.to_string()).unwrap();
    std::fs::create_dir_all(dir.join("workflows/slow_tool")).unwrap();
    std::fs::write(
        dir.join("workflows/slow_tool/workflow.yaml"),
        format!(
            "name: slow_tool
start_agent: fetcher
max_turns: 3
tools:
  - name: fetch
    parameters: {{type: object, properties: {{q: {{type: string}}}}}}
    http: {{method: GET, url: '{tool_base}/slow', timeout_ms: 300000}}
    sets_context: fetched
agents:
  - name: fetcher
    tools: [fetch, set_context]
    offline:
      tool_calls:
        - {{tool: set_context, arguments: {{key: started, value: true}}}}
        - {{tool: fetch, arguments: {{q: '{{input}}'}}}}
      reply: 'fetched {{tool.fetch}}'
    handoff: {{after_work: writer}}
  - name: writer
    offline: {{reply: 'writer done'}}
"
        ),
    )
    .unwrap();
    let mut procs = Procs {
        servers,
        dir,
        children: Vec::new(),
    };
    let port = free_port();
    procs.spawn("gateway", Some(port));
    let first_worker = procs.spawn("worker", None);
    let base = format!("http://127.0.0.1:{port}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !matches!(http.get(format!("{base}/health/ready")).send().await, Ok(r) if r.status() == 200)
    {
        assert!(
            Instant::now() < deadline,
            "gateway not ready:\n{}",
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let token = Fleet::token("kim", "default", &["user"]);
    let r = http
        .post(format!("{base}/api/sessions"))
        .bearer_auth(&token)
        .json(&json!({"app_id": "default", "workflow_name": "slow_tool", "message": "report"}))
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
    let (mut ws, _) = tokio_tungstenite::connect_async(&url).await.unwrap();

    // The slow HTTP tool is being called: its tool.call is durable; kill the worker.
    let mut frames = Vec::new();
    loop {
        let mut got = events_until(&mut ws, "tool.call").await;
        let slow = got.last().unwrap()["data"]["tool"] == "fetch";
        frames.append(&mut got);
        if slow {
            break;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while hits.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the tool was never called:\n{}",
            procs.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    procs.children[first_worker].1.kill().unwrap(); // SIGKILL
    procs.children[first_worker].1.wait().unwrap();

    // A second worker takes the chat over when the command is redelivered.
    procs.spawn("worker", None);
    let rest = events_until(&mut ws, "run.completed").await;
    frames.extend(rest);
    assert_gapless(&frames, 1);
    assert_exactly_once(&frames);
    assert_eq!(
        frames
            .iter()
            .filter(|f| f["type"] == "usage.charged")
            .count(),
        3,
        "fetcher's two model calls and writer's one, each charged once"
    );
    // The unfinished tool call was the only thing done again.
    assert_eq!(hits.load(Ordering::SeqCst), 2);
    let fetched = frames
        .iter()
        .find(|f| f["type"] == "agent.message" && f["data"]["agent"] == "fetcher")
        .unwrap();
    assert_eq!(fetched["data"]["text"], r#"fetched {"status":"fetched"}"#);
    assert_eq!(frames.last().unwrap()["data"]["output"], "writer done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concierge_selects_the_speaker_by_model_from_a_structured_output() {
    let fleet = Fleet::start(1).await;

    // Dining: intake's JSON lands in `request`, the selector (a recorded, charged model call)
    // names `dining`, whose `handled` ends the run.
    let message = "A table for \"two\" at the restaurant, please";
    let (_, _, frames) = run(&fleet, "concierge", message, "run.completed").await;
    assert_exactly_once(&frames);
    let intake = frames
        .iter()
        .find(|f| f["type"] == "agent.message" && f["data"]["agent"] == "intake")
        .unwrap();
    let request = json!({"topic": "dining", "summary": message});
    assert_eq!(intake["data"]["structured"], request);
    assert_eq!(
        serde_json::from_str::<Value>(intake["data"]["text"].as_str().unwrap()).unwrap(),
        request
    );
    let stored = frames
        .iter()
        .find(|f| f["type"] == "context.updated" && f["data"]["key"] == "request")
        .unwrap();
    assert_eq!(stored["data"]["value"], request);
    assert_eq!(stored["data"]["source"], "agent.output");
    assert_eq!(
        selections(&frames),
        [
            ("intake".to_string(), json!("dining"), "auto".to_string()),
            (
                "dining".to_string(),
                Value::Null,
                "terminate_when".to_string()
            ),
        ]
    );
    let selected = frames
        .iter()
        .find(|f| f["type"] == "speaker.selected")
        .unwrap();
    assert_eq!(selected["data"]["by"], "model");
    let selector = frames
        .iter()
        .find(|f| f["type"] == "model.replied" && f["data"]["round"] == 0)
        .expect("the selector's call is recorded");
    assert_eq!(selector["data"]["text"], "dining");
    // the selector's charge follows its record, before the choice
    let at = |pred: &dyn Fn(&Value) -> bool| frames.iter().position(pred).unwrap();
    let replied = at(&|f| f["type"] == "model.replied" && f["data"]["round"] == 0);
    assert_eq!(frames[replied + 1]["type"], "usage.charged");
    assert_eq!(frames[replied + 2]["type"], "speaker.selected");
    let done = frames.last().unwrap();
    assert!(
        done["data"]["output"]
            .as_str()
            .unwrap()
            .starts_with("Dining: I booked a table"),
        "{done}"
    );

    // Transport: the same path, another agent.
    let (_, _, frames) = run(
        &fleet,
        "concierge",
        "I need a taxi to the airport",
        "run.completed",
    )
    .await;
    assert_exactly_once(&frames);
    assert_eq!(selections(&frames)[0].1, json!("transport"));

    // Neither: the selector names no agent ("other"), the run falls back to intake's
    // after_work (terminate) and says why.
    let (_, _, frames) = run(&fleet, "concierge", "Where is the spa?", "run.completed").await;
    assert_exactly_once(&frames);
    assert_eq!(
        selections(&frames),
        [(
            "intake".to_string(),
            Value::Null,
            "auto_fallback".to_string()
        )]
    );
    let fallback = frames
        .iter()
        .find(|f| f["type"] == "speaker.selected")
        .unwrap();
    assert!(
        fallback["data"]["detail"]
            .as_str()
            .unwrap()
            .contains("\"other\""),
        "{fallback}"
    );
    assert_eq!(frames.last().unwrap()["data"]["steps"], 1);
}

// ---- run timeouts ------------------------------------------------------------------------

/// Starts `workflow` with `message` on the gateway at `port`; returns its ticket and socket.
pub(crate) async fn start_at(port: u16, workflow: &str, message: &str) -> (Value, Ws) {
    let token = Fleet::token("kim", "default", &["user"]);
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{port}/api/sessions"))
        .bearer_auth(&token)
        .json(&json!({"app_id": "default", "workflow_name": workflow, "message": message}))
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

/// A tool server that never answers; returns its base URL and the number of calls.
async fn silent_tool_server() -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let app = axum::Router::new().route(
        "/silent",
        axum::routing::get(move || {
            let h = h.clone();
            async move {
                h.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_secs(600)).await;
                axum::Json(json!("too late"))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), hits)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_past_its_timeout_fails_with_timeout_mid_step_and_while_waiting_for_input() {
    let (tool_base, hits) = silent_tool_server().await;
    let packs = [
        (
            "stuck_tool",
            format!(
                "name: stuck_tool
start_agent: fetcher
max_turns: 2
tools:
  - name: fetch
    parameters: {{type: object, properties: {{q: {{type: string}}}}}}
    http: {{method: GET, url: '{tool_base}/silent', timeout_ms: 300000}}
agents:
  - name: fetcher
    tools: [fetch]
    offline:
      tool_calls: [{{tool: fetch, arguments: {{q: '{{input}}'}}}}]
      reply: 'fetched {{tool.fetch}}'
"
            ),
        ),
        (
            "asks",
            "name: asks
start_agent: human
max_turns: 2
agents:
  - name: human
    human_input: true
    system_message: Approve?
"
            .to_string(),
        ),
    ];
    let mut procs = Procs::new(&packs).await;
    let port = procs.gateway().await;
    procs.spawn_env("worker", None, &[("WORKFLOW_TIMEOUT_SECONDS", "2")]);

    // A step that never ends (the HTTP tool does not answer within its own 300 s timeout): the
    // run's 2 s timeout interrupts it.
    let (_, mut ws) = start_at(port, "stuck_tool", "report").await;
    let frames = events_until(&mut ws, "run.failed").await;
    assert_gapless(&frames, 1);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the tool was called once");
    let kinds = types(&frames);
    assert!(kinds.contains(&"tool.call".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"tool.result".to_string()), "{kinds:?}");
    let failed = frames.last().unwrap();
    assert_eq!(failed["data"]["code"], "timeout", "{failed}");
    assert_eq!(failed["data"]["reason"], "the run exceeded 2 s");
    // The model call before the tool was charged once; the tool call never got a result.
    let count = |kind: &str| frames.iter().filter(|f| f["type"] == kind).count();
    assert_eq!((count("model.replied"), count("usage.charged")), (1, 1));

    // A run waiting for input with nothing driving it: its timer fails it all the same.
    let (_, mut ws) = start_at(port, "asks", "may I?").await;
    let frames = events_until(&mut ws, "run.failed").await;
    assert_gapless(&frames, 1);
    assert_eq!(
        types(&frames),
        [
            "session.started",
            "message.user",
            "run.started",
            "step.started",
            "input.requested",
            "run.failed"
        ]
    );
    assert_eq!(frames.last().unwrap()["data"]["code"], "timeout");
    // Nothing waits any more: an answer now is refused.
    send_json(&mut ws, json!({"type": "input.response", "text": "yes"})).await;
    let err = loop {
        let f = next_frame(&mut ws).await;
        if f["type"] == "error" {
            break f;
        }
    };
    assert_eq!(err["data"]["code"], "not_waiting_for_input");
}

// ---- two workers, one owner per chat -------------------------------------------------------

/// Every live worker's snapshot in `MZ_PERF`.
async fn snapshots(bus: &mozaiks_bus::Bus) -> Vec<mozaiks_engine::perf::Snapshot> {
    use futures::StreamExt;
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_PERF"))
        .await
        .unwrap();
    let keys: Vec<String> = kv
        .keys()
        .await
        .unwrap()
        .filter_map(|k| async move { k.ok() })
        .collect()
        .await;
    let mut out = Vec::new();
    for k in keys {
        if let Ok(Some(body)) = kv.get(&k).await
            && let Ok(s) = serde_json::from_slice(&body)
        {
            out.push(s);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_the_chats_with_one_owner_each_and_no_write_conflicts() {
    let mut fleet = Fleet::start(1).await;
    fleet.spawn("worker", None);
    let bus = mozaiks_bus::Bus::connect(
        &fleet.servers.nats_url,
        &fleet.servers.namespace,
        "e2e-owners",
    )
    .await
    .unwrap();
    fleet
        .eventually("both workers publishing", || async {
            (snapshots(&bus).await.len() == 2).then_some(())
        })
        .await;

    // Research runs in parallel: each parent's three child.finished commands (and the children's
    // starts) land on whichever worker pulls them.
    const RUNS: usize = 12;
    let token = Fleet::token("eve", "default", &["user"]);
    let mut sockets = Vec::new();
    for i in 0..RUNS {
        let ticket = fleet
            .session(0, &token, "research", Some(&format!("topic {i}")))
            .await;
        let ws = fleet.connect(0, &ticket, 0).await;
        sockets.push(ws);
    }
    let mut chats = Vec::new();
    for ws in &mut sockets {
        let frames = events_until(ws, "run.completed").await;
        assert_gapless(&frames, 1);
        assert_exactly_once(&frames);
        let completed: Vec<_> = frames
            .iter()
            .filter(|f| f["type"] == "child.completed")
            .collect();
        assert_eq!(completed.len(), 3);
        assert!(completed.iter().all(|f| f["data"]["status"] == "completed"));
        for f in completed {
            chats.push(f["data"]["child_chat_id"].as_str().unwrap().to_string());
        }
    }
    for id in &chats {
        let log = bus.read_chat("default", id, 0).await.unwrap();
        let seqs: Vec<u64> = log.iter().map(|(e, _)| e.seq).collect();
        assert_eq!(seqs, (1..=log.len() as u64).collect::<Vec<_>>(), "{id}");
        assert_eq!(log.last().unwrap().0.event.type_name(), "run.completed");
    }

    // Both workers worked, commands reached owners by forwarding, and no append was ever refused
    // for a concurrent writer: one owner per chat at a time.
    let snaps = fleet
        .eventually("every run counted", || async {
            let snaps = snapshots(&bus).await;
            let done: u64 = snaps
                .iter()
                .filter_map(|s| s.apps.get("default"))
                .map(|c| c.runs_completed)
                .sum();
            (snaps.len() == 2 && done == (RUNS * 4) as u64).then_some(snaps)
        })
        .await;
    let total = |f: fn(&mozaiks_engine::perf::Ownership) -> u64| -> u64 {
        snaps.iter().map(|s| f(&s.ownership)).sum()
    };
    assert_eq!(total(|o| o.conflicts), 0, "{snaps:#?}");
    assert_eq!(total(|o| o.leases_lost), 0, "{snaps:#?}");
    assert!(total(|o| o.forwarded) > 0, "{snaps:#?}");
    assert_eq!(total(|o| o.forwarded), total(|o| o.forwards_received));
    assert!(total(|o| o.leases_acquired) >= (RUNS * 4) as u64);
    assert!(
        snaps
            .iter()
            .all(|s| s.apps.get("default").is_some_and(|c| c.runs_started > 0)),
        "both workers ran chats: {snaps:#?}"
    );
    assert!(fleet.procs.iter().all(|p| p.role != "worker" || {
        let log = std::fs::read_to_string(&p.log).unwrap_or_default();
        !log.contains("written concurrently")
    }));
}
