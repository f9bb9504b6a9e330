//! Session start → `run.completed` latency through a real `mozaiks all` process, offline model.
//!
//! `cargo build --release && cargo bench --bench session_latency` (see benches/README.md).
//!
//! Starts nats-server and the Mongo-wire server (test kit) on free loopback ports, spawns
//! `mozaiks all` (the binary from `MOZAIKS_BIN`, else the one Cargo built for this bench, else
//! the release build, else the debug build), mints a token with `mozaiks token`, then for each
//! workflow runs a sequential loop: POST /api/sessions with a message, open the ticket's
//! WebSocket with `after=0`, read frames until `run.completed`. Latency runs from just before the POST to the arrival of `run.completed`.
//!
//! Bounded: `BENCH_ITERS` runs per workflow (default 200) and at most `BENCH_MAX_SECS` seconds
//! per workflow (default 30). Without `--bench` (e.g. `cargo test --benches`) it does 3 runs per
//! workflow as a smoke test.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use common::{binary, free_port, manifest_dir};
use futures::StreamExt;
use mozaiks_testkit::TestServers;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

const WORKFLOWS: [&str; 2] = ["hello", "triage_handoff"];
const WARMUP: usize = 5;
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

/// Kills the `mozaiks` process when dropped, also while unwinding from a panic; keeps its log
/// unless the bench finished.
struct ChildGuard {
    child: Child,
    log: PathBuf,
    finished: bool,
}

impl ChildGuard {
    fn log_tail(&self, lines: usize) -> String {
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

fn profile_of(bin: &Path) -> &'static str {
    let parent = bin.parent().and_then(Path::file_name);
    match parent.and_then(|n| n.to_str()) {
        // `cargo bench` and `cargo build --release` both put their builds here.
        Some("release") => "optimised: bench or release profile",
        Some("debug") => "debug (unoptimised: figures are not representative)",
        _ => "unknown",
    }
}

/// A `mozaiks` command for the test servers, in development mode, with the shipped packs.
fn mozaiks(bin: &Path, servers: &TestServers) -> Command {
    let mut cmd = common::mozaiks(bin, servers);
    cmd.env("MOZAIKS_DEV", "1")
        .env("MOZAIKS_WORKFLOWS_DIR", manifest_dir().join("workflows"));
    cmd
}

fn mint_token(bin: &Path, servers: &TestServers, sub: &str, roles: &str) -> anyhow::Result<String> {
    let out = mozaiks(bin, servers)
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
async fn lift_websocket_limits(
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

/// The gateway's open WebSockets (`mozaiks_active_connections`, summed over apps).
async fn open_sockets(http: &reqwest::Client, base: &str) -> Option<f64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    let values: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("mozaiks_active_connections"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

async fn wait_ready(
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

/// One run's timings, from just before the POST (`t0`).
///
/// The `*_ms` fields compare the events' `ts` (set by the server) with this process's wall
/// clock: both run on the same host, so they share a clock.
struct Sample {
    /// The ticket arrived.
    ticket: Duration,
    /// The WebSocket handshake finished.
    connected: Duration,
    /// `run.completed` arrived.
    total: Duration,
    /// `t0` → `session.started.ts`: the command reached the chat's owner.
    to_session_ms: f64,
    /// `session.started.ts` → `run.completed.ts`: the run, on the server.
    run_ms: f64,
    /// `run.completed.ts` → its arrival here: delivery.
    delivery_ms: f64,
    /// `run.completed` was stored before the WebSocket handshake finished (it came by replay).
    done_before_connect: bool,
    /// Types of the durable frames received, up to and including `run.completed`.
    types: Vec<String>,
}

async fn one_run(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    workflow: &str,
) -> anyhow::Result<Sample> {
    let t0 = Instant::now();
    let t0_wall = Utc::now();
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
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let connected = t0.elapsed();
    let connected_wall = Utc::now();
    let mut types = Vec::new();
    let mut session_ts = None;
    let ts_of = |frame: &Value| -> anyhow::Result<DateTime<Utc>> {
        let ts = frame["ts"].as_str().context("frame lacks ts")?;
        Ok(ts.parse::<DateTime<Utc>>()?)
    };
    loop {
        let msg = tokio::time::timeout(FRAME_TIMEOUT, ws.next())
            .await
            .context("timed out waiting for a frame")?
            .context("socket ended")??;
        let text = match msg {
            Message::Text(t) => t,
            Message::Close(c) => bail!("socket closed: {c:?}"),
            _ => continue,
        };
        let frame: Value = serde_json::from_str(text.as_str())?;
        if frame["seq"].is_null() {
            continue; // ephemeral
        }
        types.push(frame["type"].as_str().unwrap_or("?").to_string());
        match frame["type"].as_str() {
            Some("session.started") => session_ts = Some(ts_of(&frame)?),
            Some("run.completed") => {
                let total = t0.elapsed();
                let received = Utc::now();
                let done = ts_of(&frame)?;
                let started = session_ts.context("no session.started before run.completed")?;
                let _ = ws.close(None).await;
                let ms_between = |a: DateTime<Utc>, b: DateTime<Utc>| {
                    (b - a).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e3
                };
                return Ok(Sample {
                    ticket: ticket_at,
                    connected,
                    total,
                    to_session_ms: ms_between(t0_wall, started),
                    run_ms: ms_between(started, done),
                    delivery_ms: ms_between(done, received),
                    done_before_connect: done < connected_wall,
                    types,
                });
            }
            Some(t @ ("run.failed" | "run.cancelled")) => bail!("{t}: {}", frame["data"]),
            _ => {}
        }
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn sorted(mut v: Vec<f64>) -> Vec<f64> {
    v.sort_by(f64::total_cmp);
    v
}

struct Summary {
    row: String,
    phases: String,
}

async fn bench_workflow(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    workflow: &str,
    iters: usize,
    max_time: Duration,
) -> anyhow::Result<Summary> {
    for _ in 0..WARMUP.min(iters) {
        one_run(http, base, token, workflow).await?;
    }
    let mut samples = Vec::with_capacity(iters);
    let started = Instant::now();
    while samples.len() < iters && started.elapsed() < max_time {
        samples.push(
            one_run(http, base, token, workflow)
                .await
                .with_context(|| format!("{workflow} run {}", samples.len() + 1))?,
        );
    }
    let wall = started.elapsed();
    let n = samples.len();
    let total = sorted(samples.iter().map(|s| ms(s.total)).collect());
    let mean = total.iter().sum::<f64>() / n as f64;
    let frames = samples[0].types.len();
    ensure!(
        samples.iter().all(|s| s.types == samples[0].types),
        "{workflow}: runs differ in their events"
    );
    let p50_of = |f: &dyn Fn(&Sample) -> f64| pct(&sorted(samples.iter().map(f).collect()), 50.0);
    let post = p50_of(&|s| ms(s.ticket));
    let connect = p50_of(&|s| ms(s.connected - s.ticket));
    let to_session = p50_of(&|s| s.to_session_ms);
    let run = p50_of(&|s| s.run_ms);
    let delivery = p50_of(&|s| s.delivery_ms);
    let replayed = samples.iter().filter(|s| s.done_before_connect).count() * 100 / n;
    let row = format!(
        "| {workflow} | {frames} | {n} | {:.2} | {:.2} | {:.2} | {:.2} | {mean:.2} | {:.1} |",
        pct(&total, 50.0),
        pct(&total, 90.0),
        pct(&total, 99.0),
        total[n - 1],
        n as f64 / wall.as_secs_f64(),
    );
    let phases = format!(
        "| {workflow} | {post:.2} | {connect:.2} | {to_session:.2} | {run:.2} | {delivery:.2} | {replayed}% |"
    );
    eprintln!(
        "{workflow}: {n} runs in {:.2} s; events per run: {}",
        wall.as_secs_f64(),
        samples[0].types.join(", ")
    );
    Ok(Summary { row, phases })
}

fn env_num(name: &str, default: u64) -> anyhow::Result<u64> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => v.parse().with_context(|| format!("{name}={v}")),
        _ => Ok(default),
    }
}

async fn run() -> anyhow::Result<()> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let iters = if bench_mode {
        env_num("BENCH_ITERS", 200)?.max(1) as usize
    } else {
        3
    };
    let max_time = Duration::from_secs(env_num("BENCH_MAX_SECS", 30)?);

    let bin = match binary() {
        Ok(bin) => bin,
        Err(e) if !bench_mode => {
            println!("session_latency: skipped ({e:#})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!("binary: {} [{}]", bin.display(), profile_of(&bin));

    let servers = TestServers::start().await.context("start test servers")?;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("mozaiks-bench-{}.log", servers.namespace));
    let out = std::fs::File::create(&log)?;
    let child = mozaiks(&bin, &servers)
        .arg("all")
        .env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("spawn mozaiks all")?;
    // Declared after `servers`, so it is dropped (the process killed) before they stop.
    let mut guard = ChildGuard {
        child,
        log,
        finished: false,
    };

    let http = reqwest::Client::new();
    let boot = Instant::now();
    wait_ready(&http, &base, &mut guard).await?;
    println!("mozaiks all ready in {:.0} ms", ms(boot.elapsed()));
    let token = mint_token(&bin, &servers, "bench-user", "user,admin")?;
    let operator = mint_token(&bin, &servers, "bench-operator", "superadmin")?;
    match lift_websocket_limits(&http, &base, &operator).await {
        Ok(()) => {
            println!("default app: WebSocket limits lifted to 100000 (see benches/README.md)")
        }
        Err(e) => {
            println!("warning: could not lift the WebSocket limits ({e:#}); runs may be refused")
        }
    }

    println!(
        "sequential runs per workflow: {iters} (after {WARMUP} warm-up), at most {} s each\n",
        max_time.as_secs()
    );
    let mut summaries = Vec::new();
    for wf in WORKFLOWS {
        summaries.push(bench_workflow(&http, &base, &token, wf, iters, max_time).await?);
        if let Some(n) = open_sockets(&http, &base).await {
            eprintln!("{wf}: gateway reports {n} open WebSockets right after the last run");
        }
    }
    // Sockets the client closed linger on the gateway for a moment; show how long.
    for wait in [1, 2] {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(n) = open_sockets(&http, &base).await {
            eprintln!("{wait} s after the last run: gateway reports {n} open WebSockets");
        }
    }
    println!("\nSession start → run.completed (ms):\n");
    println!("| workflow | frames/run | runs | p50 | p90 | p99 | max | mean | runs/s |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &summaries {
        println!("{}", s.row);
    }
    println!("\nMedian of each phase (ms):\n");
    println!(
        "| workflow | POST → ticket | WS handshake | POST → session.started.ts | session.started.ts → run.completed.ts | run.completed.ts → received | run done before WS open |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for s in &summaries {
        println!("{}", s.phases);
    }
    if let Some(status) = guard.child.try_wait()? {
        bail!(
            "mozaiks exited early with {status}:\n{}",
            guard.log_tail(40)
        );
    }
    guard.finished = true;
    drop(guard);
    drop(servers);
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}
