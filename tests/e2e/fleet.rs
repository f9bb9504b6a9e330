//! A fleet for end-to-end tests: real nats-server and Mongo-wire server (from the test kit) and
//! real `mozaiks` processes, one per role, with N gateway replicas that share nothing but NATS.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use mozaiks_testkit::TestServers;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

pub const SECRET: &str = "e2e-test-secret-that-is-long-enough-0123456789";

pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Proc {
    pub role: String,
    pub child: Child,
    pub log: std::path::PathBuf,
}

pub struct Fleet {
    pub servers: TestServers,
    pub gateways: Vec<String>,
    pub procs: Vec<Proc>,
    pub http: reqwest::Client,
    dir: std::path::PathBuf,
}

/// A `mozaiks {role}` process for `servers`, with only the environment a test sets (the shipped
/// workflows, the test secret), its output in `log`.
pub fn command(servers: &TestServers, role: &str, log: &std::path::Path) -> Command {
    let out = std::fs::File::create(log).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mozaiks"));
    cmd.arg(role)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATS_URL", &servers.nats_url)
        .env("MONGO_URI", &servers.mongo_uri)
        .env("MOZAIKS_MONGO_DB", &servers.mongo_db)
        .env("MOZAIKS_NAMESPACE", &servers.namespace)
        .env("JWT_SECRET", SECRET)
        .env(
            "MOZAIKS_WORKFLOWS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/workflows"),
        )
        // MOZAIKS_TEST_LOG_LEVEL gives the processes another filter (to debug a test).
        .env(
            "LOG_LEVEL",
            std::env::var("MOZAIKS_TEST_LOG_LEVEL")
                .unwrap_or_else(|_| "info,async_nats=warn".into()),
        )
        .stdout(out.try_clone().unwrap())
        .stderr(out);
    cmd
}

/// A loopback port for a role to listen on (the test kit's pick, below the ephemeral range, so
/// an outgoing connection cannot take it before the role binds it).
pub fn free_port() -> u16 {
    mozaiks_testkit::free_port().expect("a free loopback port")
}

impl Fleet {
    /// Servers, `gateways` gateway processes, and one worker, projector and billing process.
    pub async fn start(gateways: usize) -> Fleet {
        Fleet::start_with(gateways, 1, &[]).await
    }

    /// Servers, `gateways` gateways, `workers` workers, one projector and one billing process,
    /// every process with `env` too.
    pub async fn start_with(gateways: usize, workers: usize, env: &[(&str, &str)]) -> Fleet {
        let servers = TestServers::start().await.expect("test servers");
        let dir =
            std::env::temp_dir().join(format!("mozaiks-e2e-{}", uuid::Uuid::now_v7().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut fleet = Fleet {
            servers,
            gateways: Vec::new(),
            procs: Vec::new(),
            http: reqwest::Client::new(),
            dir,
        };
        // Workers first: they apply the stream definitions too, but any role may.
        let roles = std::iter::repeat_n("worker", workers.max(1)).chain(["projector", "billing"]);
        let env: Vec<(&str, &str)> = [("MOZAIKS_DRAIN_SECONDS", "3")]
            .into_iter()
            .chain(env.iter().copied())
            .collect();
        for role in roles {
            fleet.spawn_with(role, None, &env);
        }
        for _ in 0..gateways {
            let port = free_port();
            fleet.spawn_with("gateway", Some(port), &env);
            fleet.gateways.push(format!("http://127.0.0.1:{port}"));
        }
        for gw in fleet.gateways.clone() {
            fleet.wait_ready(&gw).await;
        }
        fleet
    }

    pub fn spawn(&mut self, role: &str, port: Option<u16>) -> usize {
        self.spawn_with(role, port, &[("MOZAIKS_DRAIN_SECONDS", "3")])
    }

    /// Like [`Fleet::spawn`], with more environment (later entries win).
    pub fn spawn_with(&mut self, role: &str, port: Option<u16>, env: &[(&str, &str)]) -> usize {
        let log = self.dir.join(format!("{role}-{}.log", self.procs.len()));
        let mut cmd = command(&self.servers, role, &log);
        cmd.env("MOZAIKS_ARCHIVE_DIR", self.archive_dir());
        cmd.envs(env.iter().copied());
        if let Some(p) = port {
            cmd.env("MOZAIKS_LISTEN", format!("127.0.0.1:{p}"));
        }
        let child = cmd.spawn().expect("spawn mozaiks");
        self.procs.push(Proc {
            role: role.to_string(),
            child,
            log,
        });
        self.procs.len() - 1
    }

    /// Where this fleet's projectors archive (`MOZAIKS_ARCHIVE_DIR`).
    pub fn archive_dir(&self) -> std::path::PathBuf {
        self.dir.join("archive")
    }

    pub async fn wait_ready(&self, base: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = self.http.get(format!("{base}/health/ready")).send().await
                && r.status() == 200
            {
                return;
            }
            if Instant::now() > deadline {
                panic!("{base} not ready; logs:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Starts one more gateway (with `env`) on a free port, waits until it is ready, and adds it
    /// to `gateways`; returns its base URL.
    pub async fn add_gateway(&mut self, env: &[(&str, &str)]) -> String {
        let port = free_port();
        self.spawn_with("gateway", Some(port), env);
        let base = format!("http://127.0.0.1:{port}");
        self.wait_ready(&base).await;
        self.gateways.push(base.clone());
        base
    }

    pub fn logs(&self) -> String {
        self.procs
            .iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(40).collect();
                format!(
                    "--- {} ---\n{}",
                    p.role,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn auth() -> mozaiks_auth::Auth {
        Self::auth_with(SECRET)
    }

    pub fn auth_with(secret: &str) -> mozaiks_auth::Auth {
        mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(secret, false)).unwrap()
    }

    pub fn token(sub: &str, app: &str, roles: &[&str]) -> String {
        Self::auth().mint_user(sub, app, roles, 3600).unwrap()
    }

    /// Any HTTP call on gateway `gw` with `Authorization: Bearer {bearer}` and/or
    /// `X-Api-Key: {api_key}`; returns (status, JSON body or Null, Retry-After).
    pub async fn call_as(
        &self,
        gw: usize,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        api_key: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value, Option<String>) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(m, format!("{}{path}", self.gateways[gw]));
        if let Some(t) = bearer {
            req = req.bearer_auth(t);
        }
        if let Some(k) = api_key {
            req = req.header("x-api-key", k);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let retry = r
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_string());
        (status, r.json().await.unwrap_or(Value::Null), retry)
    }

    /// Any HTTP call on gateway `gw` with a bearer token.
    pub async fn call(
        &self,
        gw: usize,
        method: &str,
        path: &str,
        token: &str,
        body: Option<Value>,
    ) -> (u16, Value, Option<String>) {
        self.call_as(gw, method, path, Some(token), None, body)
            .await
    }

    /// POST /api/sessions; returns (status, body).
    pub async fn post_session(&self, gw: usize, token: &str, body: Value) -> (u16, Value) {
        let (status, v, _) = self
            .call(gw, "POST", "/api/sessions", token, Some(body))
            .await;
        (status, v)
    }

    /// Starts a session that must succeed.
    pub async fn session(
        &self,
        gw: usize,
        token: &str,
        workflow: &str,
        message: Option<&str>,
    ) -> Value {
        let mut body = json!({ "app_id": "default", "workflow_name": workflow });
        if let Some(m) = message {
            body["message"] = json!(m);
        }
        let (status, ticket) = self.post_session(gw, token, body).await;
        assert_eq!(status, 201, "session start failed: {ticket}");
        ticket
    }

    pub async fn get(&self, gw: usize, path: &str, token: &str) -> (u16, Value) {
        let (status, v, _) = self.call(gw, "GET", path, token, None).await;
        (status, v)
    }

    /// The WebSocket URL of a ticket on gateway `gw`.
    pub fn ws_url(&self, gw: usize, ticket: &Value, after: u64) -> String {
        let ws_base = self.gateways[gw].replace("http://", "ws://");
        let path = ticket["ws_url"].as_str().unwrap();
        let path = &path[path.find("/ws/").unwrap()..];
        format!(
            "{ws_base}{path}?token={}&after={after}",
            ticket["runtime_token"].as_str().unwrap()
        )
    }

    pub async fn connect(&self, gw: usize, ticket: &Value, after: u64) -> Ws {
        let (ws, _) = tokio_tungstenite::connect_async(self.ws_url(gw, ticket, after))
            .await
            .expect("websocket connect");
        ws
    }

    /// Polls `f` until it returns Some, for up to 20 s.
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut f: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            if Instant::now() > deadline {
                panic!("timed out waiting for {what}; logs:\n{}", self.logs());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("process logs kept in {}", self.dir.display());
        }
    }
}

/// The `code` of an error answer, or `<none>`.
pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("<none>")
}

/// A superadmin token (the fleet operator).
pub fn root() -> String {
    Fleet::token("root", "default", &["superadmin"])
}

/// Reads the next JSON text frame (10 s timeout).
pub async fn next_frame(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("timed out waiting for a frame")
            .expect("socket ended")
            .expect("socket error");
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("frame is JSON"),
            Message::Close(c) => panic!("socket closed: {c:?}"),
            _ => continue,
        }
    }
}

/// Reads durable event frames (skipping ephemeral ones) until one of type `until`.
pub async fn events_until(ws: &mut Ws, until: &str) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = next_frame(ws).await;
        if f["seq"].is_null() {
            continue;
        }
        let done = f["type"] == until;
        out.push(f);
        if done {
            return out;
        }
    }
}

/// Reads durable event frames until `n` arrived.
pub async fn events_n(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut out = Vec::new();
    while out.len() < n {
        let f = next_frame(ws).await;
        if !f["seq"].is_null() {
            out.push(f);
        }
    }
    out
}

pub async fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::Text(v.to_string().into())).await.unwrap();
}

/// Asserts that frames have seqs `from..` consecutive and distinct ids.
pub fn assert_gapless(frames: &[Value], from: u64) {
    let mut ids = std::collections::HashSet::new();
    for (i, f) in frames.iter().enumerate() {
        assert_eq!(
            f["seq"].as_u64().unwrap(),
            from + i as u64,
            "gap or duplicate at {i}: {frames:#?}"
        );
        assert!(
            ids.insert(f["id"].as_str().unwrap().to_string()),
            "duplicate id"
        );
    }
}

pub fn types(frames: &[Value]) -> Vec<String> {
    frames
        .iter()
        .map(|f| f["type"].as_str().unwrap().to_string())
        .collect()
}
