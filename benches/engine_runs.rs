//! Workflow engine: completed runs per second and per-turn overhead, offline model.
//!
//! `cargo bench --bench engine_runs` (see benches/README.md). Two parts:
//!
//! 1. **In process** (no I/O): the pure chat aggregate driving a run with the offline model, and
//!    every event through the bus codec (encode + decode), as a worker does minus the appends:
//!    the engine's own cost per agent turn, model time excluded.
//! 2. **Fleet**: real nats-server and Mongo-wire server (test kit), `mozaiks all` (every role in
//!    one process), then one more `mozaiks worker`. The bench publishes `session.start` commands
//!    with a first message straight to `MZ_CMD` (64 in flight) and counts `run.completed` on the
//!    live feed (`mz.live.*.*.run.completed`): completed runs per second for `hello` (one turn)
//!    and `research` (a parent with three children); then the latency of a three-step run
//!    (`bench_three`: a → b → c), one at a time, from just before the publish to the arrival of
//!    its `run.completed`.
//!
//! Bounded: `BENCH_RUNS` runs per throughput case (default 2000; research: a quarter), 200
//! latency runs, each case at most `BENCH_MAX_SECS` seconds (default 30). Without `--bench`
//! (e.g. `cargo test --benches`) it does a few runs of each as a smoke test.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chrono::Utc;
use common::{binary, free_port, manifest_dir};
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_engine::chat::{Chat, Next};
use mozaiks_engine::model::offline_reply;
use mozaiks_events::{Command as Cmd, CommandEnvelope, codec};
use mozaiks_packs::Pack;
use mozaiks_testkit::TestServers;
use uuid::Uuid;

const THREE: &str = "name: bench_three
description: Three agents in a row (a benchmark pack).
start_agent: a
max_turns: 3
agents:
  - {name: a, offline: {reply: 'a: {input}'}, handoff: {after_work: b}}
  - {name: b, offline: {reply: 'b: {input}'}, handoff: {after_work: c}}
  - {name: c, offline: {reply: 'c: {input}'}}
";

fn bench_mode() -> bool {
    std::env::args().any(|a| a == "--bench")
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---- 1. in process ---------------------------------------------------------------------------

/// Drives one run of `pack` to its end in memory; returns (turns, events).
fn one_run(pack: &Pack) -> (usize, usize) {
    let mut chat = Chat::default();
    let start = Cmd::StartSession {
        context: Default::default(),
        parent_chat_id: None,
        message: Some("ping".into()),
    };
    let mut pending = chat
        .handle(Uuid::now_v7(), &start, pack, &Default::default())
        .unwrap();
    let (mut turns, mut events) = (0, 0);
    loop {
        for event in pending.drain(..) {
            turns += usize::from(event.type_name() == "step.started");
            // What the worker and the log do with each event: encode, and a reader decodes.
            let env = mozaiks_events::Envelope {
                v: mozaiks_events::ENVELOPE_VERSION,
                event_id: Uuid::now_v7(),
                app_id: "default".into(),
                chat_id: "bench".into(),
                user_id: "u".into(),
                workflow: pack.name.clone(),
                seq: chat.seq + 1,
                ts: Utc::now(),
                parent_chat_id: None,
                causation_id: None,
                event,
            };
            let bytes = codec::encode_event(&env).unwrap();
            let back = codec::decode_event(&bytes).unwrap();
            chat.apply(&back.event, None);
            events += 1;
        }
        pending = match chat.next(pack, Uuid::now_v7()) {
            Next::Emit(e) => e,
            Next::CallModel { agent, round, .. } => {
                let a = pack.agent(&agent).unwrap();
                chat.on_reply(round, &offline_reply(a, &chat, round))
            }
            _ => return (turns, events),
        };
    }
}

fn in_process() {
    let pack = Pack::parse(Path::new("bench_three/workflow.yaml"), "bench_three", THREE).unwrap();
    let iters = if bench_mode() { 20_000 } else { 10 };
    for _ in 0..iters.min(500) {
        one_run(&pack);
    }
    let started = Instant::now();
    let mut events = 0;
    let mut turns = 0;
    for _ in 0..iters {
        let (t, n) = one_run(&pack);
        turns += t;
        events += n;
    }
    let took = started.elapsed();
    println!(
        "in process: {iters} three-step runs, {turns} turns, {events} events in {:.2} s: {:.1} µs per turn, {:.2} µs per event, {:.0} runs/s on one core",
        took.as_secs_f64(),
        took.as_secs_f64() * 1e6 / turns as f64,
        took.as_secs_f64() * 1e6 / events as f64,
        iters as f64 / took.as_secs_f64()
    );
}

// ---- 2. fleet --------------------------------------------------------------------------------

struct Procs(Vec<Child>, PathBuf);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

fn spawn(procs: &mut Procs, servers: &TestServers, role: &str) -> anyhow::Result<()> {
    let port = free_port();
    let log = std::fs::File::create(procs.1.join(format!("{role}-{}.log", procs.0.len())))?;
    let child = common::mozaiks(&binary()?, servers)
        .arg(role)
        .env("MOZAIKS_DEV", "1")
        .env("MOZAIKS_WORKFLOWS_DIR", procs.1.join("workflows"))
        .env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"))
        .env("MAX_CONCURRENT_WORKFLOWS", "200")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    procs.0.push(child);
    Ok(())
}

/// Starts `n` runs of `workflow` (64 commands in flight) and waits for their `run.completed`.
/// Returns (runs completed, seconds).
async fn throughput(
    bus: &Bus,
    workflow: &str,
    n: usize,
    max: Duration,
) -> anyhow::Result<(usize, f64)> {
    let s = bus.subjects();
    let mut done = bus
        .client()
        .subscribe(s.live_event("*", "*", "run.completed"))
        .await?;
    bus.client().flush().await?;
    let chats: Vec<String> = (0..n)
        .map(|_| Uuid::now_v7().simple().to_string())
        .collect();
    let wanted: HashSet<&str> = chats.iter().map(String::as_str).collect();
    let started = Instant::now();
    let publisher = {
        let bus = bus.clone();
        let chats = chats.clone();
        let workflow = workflow.to_string();
        tokio::spawn(async move {
            futures::stream::iter(chats)
                .map(|chat_id| {
                    let bus = bus.clone();
                    let workflow = workflow.clone();
                    async move {
                        let cmd = CommandEnvelope::new(
                            "default",
                            &chat_id,
                            "bench",
                            workflow,
                            Cmd::StartSession {
                                context: Default::default(),
                                parent_chat_id: None,
                                message: Some("ping".into()),
                            },
                        );
                        bus.send_command(&cmd, None).await
                    }
                })
                .buffer_unordered(64)
                .for_each(|r| async move { r.expect("publish") })
                .await;
        })
    };
    let mut completed = 0;
    let deadline = tokio::time::Instant::now() + max;
    while completed < n {
        let msg = match tokio::time::timeout_at(deadline, done.next()).await {
            Ok(Some(m)) => m,
            _ => break,
        };
        let env = codec::decode_event(&msg.payload)?;
        if wanted.contains(env.chat_id.as_str()) {
            completed += 1;
        }
    }
    let took = started.elapsed().as_secs_f64();
    publisher.abort();
    Ok((completed, took))
}

/// One run of `workflow` at a time; start → `run.completed` latencies in ms, sorted.
async fn latency(bus: &Bus, workflow: &str, n: usize, max: Duration) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    let end = Instant::now() + max;
    while out.len() < n && Instant::now() < end {
        let chat_id = Uuid::now_v7().simple().to_string();
        let mut sub = bus
            .client()
            .subscribe(
                bus.subjects()
                    .live_event("default", &chat_id, "run.completed"),
            )
            .await?;
        bus.client().flush().await?;
        let cmd = CommandEnvelope::new(
            "default",
            &chat_id,
            "bench",
            workflow,
            Cmd::StartSession {
                context: Default::default(),
                parent_chat_id: None,
                message: Some("ping".into()),
            },
        );
        let t = Instant::now();
        bus.send_command(&cmd, None).await?;
        tokio::time::timeout(Duration::from_secs(10), sub.next())
            .await
            .context("no run.completed within 10 s")?;
        out.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    out.sort_by(f64::total_cmp);
    Ok(out)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn fleet() -> anyhow::Result<()> {
    let servers = TestServers::start().await.context("test servers")?;
    let dir = std::env::temp_dir().join(format!("mozaiks-bench-{}", Uuid::now_v7().simple()));
    for name in ["hello", "research", "research_topic"] {
        let from = manifest_dir()
            .join("workflows")
            .join(name)
            .join("workflow.yaml");
        std::fs::create_dir_all(dir.join("workflows").join(name))?;
        std::fs::copy(from, dir.join("workflows").join(name).join("workflow.yaml"))?;
    }
    std::fs::create_dir_all(dir.join("workflows/bench_three"))?;
    std::fs::write(dir.join("workflows/bench_three/workflow.yaml"), THREE)?;
    let mut procs = Procs(Vec::new(), dir);
    spawn(&mut procs, &servers, "all")?;
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "bench").await?;
    // Ready once a run completes.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(l) = latency(&bus, "hello", 1, Duration::from_secs(5)).await
            && !l.is_empty()
        {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "mozaiks all never completed a run"
        );
    }
    let full = bench_mode();
    let runs = if full {
        env_num("BENCH_RUNS", 2000) as usize
    } else {
        8
    };
    let max = Duration::from_secs(env_num("BENCH_MAX_SECS", 30));
    for workers in [1, 2] {
        if workers == 2 {
            spawn(&mut procs, &servers, "worker")?;
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let label = if workers == 1 {
            "mozaiks all"
        } else {
            "mozaiks all + 1 worker"
        };
        // Warm-up.
        throughput(&bus, "hello", runs.min(200), max).await?;
        let (n, secs) = throughput(&bus, "hello", runs, max).await?;
        println!(
            "{label}: hello (one turn): {n}/{runs} runs in {secs:.2} s = {:.0} runs/s",
            n as f64 / secs
        );
        let r = (runs / 4).max(2);
        let (n, secs) = throughput(&bus, "research", r, max).await?;
        println!(
            "{label}: research (three children each): {n}/{r} runs in {secs:.2} s = {:.0} runs/s ({:.0} chats/s)",
            n as f64 / secs,
            4.0 * n as f64 / secs
        );
        let l = latency(&bus, "bench_three", if full { 200 } else { 3 }, max).await?;
        println!(
            "{label}: bench_three start -> run.completed, {} runs one at a time: p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            l.len(),
            pct(&l, 0.5),
            pct(&l, 0.9),
            pct(&l, 0.99),
            pct(&l, 1.0)
        );
        ownership(&bus, label).await;
    }
    Ok(())
}

/// Prints how the workers shared chats so far (their `MZ_PERF` snapshots' `ownership`; zeros
/// from a binary without ownership leases).
async fn ownership(bus: &Bus, label: &str) {
    let Ok(kv) = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_PERF"))
        .await
    else {
        return;
    };
    let Ok(keys) = kv.keys().await else { return };
    let keys: Vec<String> = keys.filter_map(|k| async move { k.ok() }).collect().await;
    let mut total = mozaiks_engine::perf::Ownership::default();
    for k in keys {
        let Ok(Some(body)) = kv.get(&k).await else {
            continue;
        };
        let Ok(snap) = serde_json::from_slice::<mozaiks_engine::perf::Snapshot>(&body) else {
            continue;
        };
        let o = snap.ownership;
        total.leases_acquired += o.leases_acquired;
        total.leases_taken_over += o.leases_taken_over;
        total.forwarded += o.forwarded;
        total.conflicts += o.conflicts;
    }
    println!(
        "{label}: since start: {} chat leases claimed, {} taken over, {} commands forwarded to their chat's owner, {} appends refused for a concurrent writer",
        total.leases_acquired, total.leases_taken_over, total.forwarded, total.conflicts
    );
}

fn main() -> anyhow::Result<()> {
    in_process();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(fleet())
}
