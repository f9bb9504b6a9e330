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

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use common::{
    ChildGuard, binary, env_num, free_port, lift_websocket_limits, mint_token, mozaiks_dev, pct,
    sorted, start_session, wait_ready,
};
use futures::StreamExt;
use mozaiks_testkit::TestServers;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const WORKFLOWS: [&str; 2] = ["hello", "triage_handoff"];
const WARMUP: usize = 5;
const FRAME_TIMEOUT: Duration = Duration::from_secs(10);

fn profile_of(bin: &Path) -> &'static str {
    let parent = bin.parent().and_then(Path::file_name);
    match parent.and_then(|n| n.to_str()) {
        // `cargo bench` and `cargo build --release` both put their builds here.
        Some("release") => "optimised: bench or release profile",
        Some("debug") => "debug (unoptimised: figures are not representative)",
        _ => "unknown",
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
    let (ticket_at, mut ws) = start_session(http, base, token, workflow, t0).await?;
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
    let child = mozaiks_dev(&bin, &servers)
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
