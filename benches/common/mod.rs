//! What the fleet benchmarks share: finding the `mozaiks` binary, a free loopback port, and a
//! `mozaiks` command whose environment points at the test kit's servers and nothing else.
//! Included with `mod common;` by the benches that start `mozaiks` processes.

// Each bench uses the part it needs.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use mozaiks_testkit::TestServers;
use serde_json::{Value, json};

pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// `MOZAIKS_BIN`, else the binary Cargo built alongside this bench (`CARGO_BIN_EXE_mozaiks`),
/// else `mozaiks` next to this bench's profile dir (`target/release/deps/..`), else
/// `<manifest>/target/release/mozaiks`, else `<manifest>/target/debug/mozaiks`.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var("MOZAIKS_BIN")
        && !p.is_empty()
    {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "MOZAIKS_BIN={} is not a file", p.display());
        return Ok(p);
    }
    let mut candidates = Vec::new();
    // Cargo builds the package's binaries for its benches (bench profile) and says where.
    if let Some(p) = option_env!("CARGO_BIN_EXE_mozaiks") {
        candidates.push(PathBuf::from(p));
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(profile_dir) = exe.parent().and_then(Path::parent)
    {
        candidates.push(profile_dir.join("mozaiks"));
    }
    candidates.push(manifest_dir().join("target/release/mozaiks"));
    candidates.push(manifest_dir().join("target/debug/mozaiks"));
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .context("no mozaiks binary: run `cargo build --release --bin mozaiks` or set MOZAIKS_BIN")
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

/// A `mozaiks` command with a clean environment pointing at the test servers (NATS, Mongo, the
/// test's namespace and database), logging at `warn`. Callers add their role's settings.
pub fn mozaiks(bin: &Path, servers: &TestServers) -> Command {
    let mut cmd = Command::new(bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NATS_URL", &servers.nats_url)
        .env("MONGO_URI", &servers.mongo_uri)
        .env("MOZAIKS_MONGO_DB", &servers.mongo_db)
        .env("MOZAIKS_NAMESPACE", &servers.namespace)
        .env("LOG_LEVEL", "warn");
    cmd
}

/// Kills the `mozaiks` process when dropped, also while unwinding from a panic; keeps its log
/// unless the bench finished.
pub struct ChildGuard {
    pub child: Child,
    pub log: PathBuf,
    pub finished: bool,
}

impl ChildGuard {
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(lines).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.finished {
            let _ = std::fs::remove_file(&self.log);
        } else {
            eprintln!("mozaiks log kept at {}", self.log.display());
        }
    }
}

/// A `mozaiks` command for the test servers, in development mode, with the shipped packs.
pub fn mozaiks_dev(bin: &Path, servers: &TestServers) -> Command {
    let mut cmd = mozaiks(bin, servers);
    cmd.env("MOZAIKS_DEV", "1")
        .env("MOZAIKS_WORKFLOWS_DIR", manifest_dir().join("workflows"));
    cmd
}

pub fn mint_token(
    bin: &Path,
    servers: &TestServers,
    sub: &str,
    roles: &str,
) -> anyhow::Result<String> {
    let out = mozaiks_dev(bin, servers)
        .args(["token", "--sub", sub, "--roles", roles])
        .stderr(Stdio::inherit())
        .output()
        .context("run mozaiks token")?;
    ensure!(out.status.success(), "mozaiks token failed: {}", out.status);
    let token = BufReader::new(&out.stdout[..])
        .lines()
        .next()
        .context("mozaiks token printed nothing")??;
    Ok(token.trim().to_string())
}

/// Lifts the default app's WebSocket limits (as an operator) so the loop is not refused.
///
/// A socket closed by the client keeps its slot for a moment after the close (the gateway's
/// writer waits for its queue to end), so a sequential loop at a few hundred sessions/s holds
/// hundreds of sockets and hits the per-user limit (50 per replica) and the tier's per-app
/// limit. Other overrides of the app (e.g. `requests_per_minute`) are kept.
pub async fn lift_websocket_limits(
    http: &reqwest::Client,
    base: &str,
    operator: &str,
) -> anyhow::Result<()> {
    let url = format!("{base}/api/apps/default");
    let r = http.get(&url).bearer_auth(operator).send().await?;
    let status = r.status();
    let app: Value = r.json().await.unwrap_or(Value::Null);
    ensure!(status == 200, "GET /api/apps/default: {status} {app}");
    let mut limits = app["limits"].as_object().cloned().unwrap_or_default();
    for key in ["max_websockets", "max_websockets_per_user"] {
        limits.insert(key.into(), json!(100_000));
    }
    let r = http
        .patch(&url)
        .bearer_auth(operator)
        .json(&json!({ "limits": limits }))
        .send()
        .await?;
    let status = r.status();
    let body: Value = r.json().await.unwrap_or(Value::Null);
    ensure!(status == 200, "PATCH /api/apps/default: {status} {body}");
    // The registry view follows the app's events; wait until this replica has it.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let app: Value = http
            .get(&url)
            .bearer_auth(operator)
            .send()
            .await?
            .json()
            .await?;
        if app["effective_limits"]["max_websockets"] == 100_000
            && app["limits"]["max_websockets_per_user"] == 100_000
        {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the new limits did not apply within 5 s: {app}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub async fn wait_ready(
    http: &reqwest::Client,
    base: &str,
    guard: &mut ChildGuard,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{base}/health/ready")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        if let Some(status) = guard.child.try_wait()? {
            bail!("mozaiks exited with {status}:\n{}", guard.log_tail(40));
        }
        if Instant::now() > deadline {
            bail!("{base} not ready after 60 s:\n{}", guard.log_tail(40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Nearest-rank percentile of sorted values.
pub fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

pub fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

pub fn env_num(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().with_context(|| format!("{name}={v}")),
        _ => Ok(default),
    }
}

/// A client's WebSocket to a gateway.
pub type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Starts a session of `workflow` in the default app with a message (POST /api/sessions) and
/// opens the ticket's WebSocket from `after=0`. Returns when the ticket arrived, counted from
/// `t0`, and the socket.
pub async fn start_session(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    workflow: &str,
    t0: Instant,
) -> anyhow::Result<(Duration, Ws)> {
    let r = http
        .post(format!("{base}/api/sessions"))
        .bearer_auth(token)
        .json(&json!({"app_id": "default", "workflow_name": workflow, "message": "ping"}))
        .send()
        .await?;
    let status = r.status();
    let ticket: Value = r.json().await?;
    ensure!(status == 201, "POST /api/sessions: {status} {ticket}");
    let ticket_at = t0.elapsed();
    let url = format!(
        "{}?token={}&after=0",
        ticket["ws_url"].as_str().context("ticket lacks ws_url")?,
        ticket["runtime_token"]
            .as_str()
            .context("ticket lacks runtime_token")?
    );
    let (ws, _) = tokio_tungstenite::connect_async(url).await?;
    Ok((ticket_at, ws))
}
