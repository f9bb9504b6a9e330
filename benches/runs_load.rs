//! Completed runs per second and server CPU per run under concurrent load, through the public
//! API, for the default durability and for `sync_interval: always` (issue 16's measurements).
//!
//! `cargo bench --bench runs_load` (see benches/README.md).
//!
//! For each configuration it starts one nats-server (the test kit's `NatsCluster` of one node,
//! with or without `jetstream { sync_interval: always }`) and the Mongo-wire server, spawns
//! `mozaiks all`, lifts the default app's WebSocket limits, and then:
//!
//! 1. a sequential loop of `BENCH_SEQ` runs (default 100): POST /api/sessions, open the
//!    ticket's WebSocket with `after=0`, read frames until `run.completed` (each socket on its
//!    own chat, as in a chat app);
//! 2. `BENCH_CONCURRENCY` clients (default 20) doing the same in a loop for `BENCH_SECS`
//!    seconds (default 15), while it measures the CPU time of every server process (nats-server,
//!    the Mongo-wire server and its children, `mozaiks`) from `/proc/<pid>/stat` and, when
//!    `perf` can count syscall tracepoints, their `fsync`/`fdatasync` calls.
//!
//! It prints runs/s, latency percentiles, CPU milliseconds per completed run per process and
//! fsyncs per run, with the load average.
//!
//! Comparing builds: `BENCH_BINS=/tmp/mozaiks-before,/tmp/mozaiks-after` measures each binary in
//! turn (interleaved: configuration by configuration, `BENCH_ROUNDS` rounds, default 1) so that
//! both see the same neighbours on a shared machine; each row names its binary.
//! `BENCH_CONFIGS=default` or `always` measures one configuration only. `BENCH_PERF=<dir>` also
//! records a CPU profile of each measured `mozaiks` process during the concurrent phase
//! (`perf record -g`, `<dir>/<binary>-<configuration>-<round>.data`; read it with `perf report`). Loopback only; bounded by its settings. Without
//! `--bench` (`cargo test --benches`) it does a few runs of the default configuration as a
//! smoke test.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use common::{
    ChildGuard, binary, env_num, free_port, lift_websocket_limits, mint_token, mozaiks_dev, pct,
    sorted, start_session, wait_ready,
};
use futures::StreamExt;
use mozaiks_testkit::{NatsCluster, NatsOptions, TestServers};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const FRAME_TIMEOUT: Duration = Duration::from_secs(30);

/// One session: POST /api/sessions, its WebSocket from `after=0`, frames until `run.completed`.
/// Returns the time from just before the POST to `run.completed`'s arrival.
async fn one_run(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    workflow: &str,
) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    let (_, mut ws) = start_session(http, base, token, workflow, t0).await?;
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
        match frame["type"].as_str() {
            Some("run.completed") if !frame["seq"].is_null() => {
                let took = t0.elapsed();
                let _ = ws.close(None).await;
                return Ok(took);
            }
            Some(t @ ("run.failed" | "run.cancelled")) => bail!("{t}: {}", frame["data"]),
            _ => {}
        }
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`, 100 if that fails).
fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// Every process's parent and user + system CPU ticks, from `/proc/*/stat`.
fn processes() -> HashMap<u32, (u32, u64)> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, ... utime (14th), stime (15th).
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.len() > 12 {
            let ppid = f[1].parse().unwrap_or(0);
            let ticks = f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0);
            out.insert(pid, (ppid, ticks));
        }
    }
    out
}

/// `root` and its descendants.
fn tree(root: u32, procs: &HashMap<u32, (u32, u64)>) -> Vec<u32> {
    let mut out = vec![root];
    let mut i = 0;
    while i < out.len() {
        let parent = out[i];
        out.extend(
            procs
                .iter()
                .filter(|(_, (ppid, _))| *ppid == parent)
                .map(|(pid, _)| *pid),
        );
        i += 1;
    }
    out
}

/// CPU ticks of each named process tree.
fn cpu_ticks(roots: &[(&'static str, u32)]) -> Vec<(&'static str, u64)> {
    let procs = processes();
    roots
        .iter()
        .map(|(name, root)| {
            let ticks = tree(*root, &procs)
                .iter()
                .filter_map(|p| procs.get(p).map(|(_, t)| *t))
                .sum();
            (*name, ticks)
        })
        .collect()
}

/// `perf stat` counting the `fsync` and `fdatasync` syscalls of `pids` until stopped.
struct FsyncCounter {
    child: Child,
    out: std::path::PathBuf,
}

impl FsyncCounter {
    fn start(pids: &[u32], out: &Path) -> Option<FsyncCounter> {
        let list: Vec<String> = pids.iter().map(u32::to_string).collect();
        let child = Command::new("perf")
            .args([
                "stat",
                "-x,",
                "-e",
                "syscalls:sys_enter_fsync,syscalls:sys_enter_fdatasync",
                "-o",
            ])
            .arg(out)
            .args(["-p", &list.join(",")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(FsyncCounter {
            child,
            out: out.to_path_buf(),
        })
    }

    /// Stops counting (SIGINT, as perf expects) and returns the calls counted.
    fn stop(mut self) -> Option<u64> {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.out).ok()?;
        let counts: Vec<u64> = text
            .lines()
            .filter(|l| l.contains("syscalls:sys_enter_f"))
            .filter_map(|l| l.split(',').next()?.trim().parse().ok())
            .collect();
        (counts.len() == 2).then(|| counts.iter().sum())
    }
}

/// `perf record -g` of one process until stopped (a CPU profile of the concurrent phase).
struct Recorder {
    child: Child,
}

impl Recorder {
    fn start(pid: u32, out: &Path) -> Option<Recorder> {
        let child = Command::new("perf")
            .args(["record", "-g", "-F", "999", "-o"])
            .arg(out)
            .args(["-p", &pid.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(Recorder { child })
    }

    fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// The Mongo-wire server's `serverStatus.opcounters` (insert, query, update, delete, getmore,
/// command), to count its operations per run; `None` if it does not answer them.
async fn mongo_ops(uri: &str) -> Option<Vec<(String, i64)>> {
    let client = mongodb::Client::with_uri_str(uri).await.ok()?;
    let status = client
        .database("admin")
        .run_command(mongodb::bson::doc! { "serverStatus": 1 })
        .await
        .ok()?;
    let ops = status.get_document("opcounters").ok()?;
    Some(
        ops.iter()
            .filter_map(|(k, v)| {
                let n = v.as_i64().or_else(|| v.as_i32().map(i64::from))?;
                Some((k.clone(), n))
            })
            .collect(),
    )
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

struct Settings {
    workflow: String,
    sequential: usize,
    concurrency: usize,
    seconds: u64,
}

struct Figures {
    config: &'static str,
    /// The binary's file name (the rows of a comparison).
    binary: String,
    seq_p50: f64,
    seq_p99: f64,
    runs: usize,
    runs_per_sec: f64,
    p50: f64,
    p99: f64,
    /// CPU milliseconds per completed run, per process, and their sum.
    cpu: Vec<(&'static str, f64)>,
    /// Mongo-wire operations per completed run, by `opcounters` kind.
    mongo_ops: Vec<(String, f64)>,
    fsyncs_per_run: Option<f64>,
    load: String,
}

async fn measure(
    bin: &Path,
    config: &'static str,
    sync_always: bool,
    s: &Settings,
    profile: Option<std::path::PathBuf>,
) -> anyhow::Result<Figures> {
    let nats = NatsCluster::start_with(1, NatsOptions { sync_always })
        .await
        .context("start nats-server")?;
    let servers = TestServers::start_with_nats(&nats.url)
        .await
        .context("start the Mongo-wire server")?;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("mozaiks-load-{}.log", servers.namespace));
    let out = std::fs::File::create(&log)?;
    let child = mozaiks_dev(bin, &servers)
        .arg("all")
        .env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("spawn mozaiks all")?;
    let mut guard = ChildGuard {
        child,
        log,
        finished: false,
    };
    let http = reqwest::Client::new();
    wait_ready(&http, &base, &mut guard).await?;
    let token = mint_token(bin, &servers, "load-user", "user")?;
    let operator = mint_token(bin, &servers, "load-operator", "superadmin")?;
    lift_websocket_limits(&http, &base, &operator).await?;

    let roots = [
        ("nats-server", nats.node_pid(0).context("nats-server pid")?),
        ("mongo-wire", servers.mongo_pid().context("Mongo-wire pid")?),
        ("mozaiks", guard.child.id()),
    ];

    // Warm-up, then the sequential loop.
    for _ in 0..10 {
        one_run(&http, &base, &token, &s.workflow).await?;
    }
    let mut seq = Vec::with_capacity(s.sequential);
    for i in 0..s.sequential {
        let d = one_run(&http, &base, &token, &s.workflow)
            .await
            .with_context(|| format!("sequential run {}", i + 1))?;
        seq.push(d.as_secs_f64() * 1e3);
    }
    let seq = sorted(seq);

    // The concurrent phase, measured.
    let procs = processes();
    let pids: Vec<u32> = roots
        .iter()
        .flat_map(|(_, root)| tree(*root, &procs))
        .collect();
    let perf_out = std::env::temp_dir().join(format!("mozaiks-load-{}.perf", servers.namespace));
    let counter = FsyncCounter::start(&pids, &perf_out);
    let recorder = profile.and_then(|out| Recorder::start(guard.child.id(), &out));
    tokio::time::sleep(Duration::from_millis(300)).await; // perf attaches
    let mongo_before = mongo_ops(&servers.mongo_uri).await;
    let cpu_before = cpu_ticks(&roots);
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..s.concurrency {
        let (http, base, token, wf, stop) = (
            http.clone(),
            base.clone(),
            token.clone(),
            s.workflow.clone(),
            stop.clone(),
        );
        tasks.spawn(async move {
            let mut took = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                took.push(one_run(&http, &base, &token, &wf).await?.as_secs_f64() * 1e3);
            }
            anyhow::Ok(took)
        });
    }
    tokio::time::sleep(Duration::from_secs(s.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let wall = started.elapsed().as_secs_f64();
    let cpu_after = cpu_ticks(&roots);
    let mongo_after = mongo_ops(&servers.mongo_uri).await;
    let fsyncs = counter.and_then(FsyncCounter::stop);
    if let Some(r) = recorder {
        r.stop();
    }
    let _ = std::fs::remove_file(&perf_out);
    let load = load_average();

    let runs = all.len();
    ensure!(runs > 0, "no run completed");
    let all = sorted(all);
    let tick_ms = 1e3 / clock_ticks();
    let mut cpu: Vec<(&'static str, f64)> = cpu_before
        .iter()
        .zip(&cpu_after)
        .map(|((name, b), (_, a))| (*name, (a - b) as f64 * tick_ms / runs as f64))
        .collect();
    let total = cpu.iter().map(|(_, v)| v).sum();
    cpu.push(("total", total));
    let mongo_ops: Vec<(String, f64)> = match (mongo_before, mongo_after) {
        (Some(b), Some(a)) => a
            .iter()
            .map(|(k, n)| {
                let before = b.iter().find(|(bk, _)| bk == k).map_or(0, |(_, v)| *v);
                (k.clone(), (n - before) as f64 / runs as f64)
            })
            .collect(),
        _ => Vec::new(),
    };
    if let Some(status) = guard.child.try_wait()? {
        bail!("mozaiks exited with {status}:\n{}", guard.log_tail(40));
    }
    guard.finished = true;
    drop(guard);
    drop(servers);
    drop(nats);
    Ok(Figures {
        config,
        binary: bin
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        seq_p50: pct(&seq, 50.0),
        seq_p99: pct(&seq, 99.0),
        runs,
        runs_per_sec: runs as f64 / wall,
        p50: pct(&all, 50.0),
        p99: pct(&all, 99.0),
        cpu,
        mongo_ops,
        fsyncs_per_run: fsyncs.map(|n| n as f64 / runs as f64),
        load,
    })
}

async fn run() -> anyhow::Result<()> {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let settings = Settings {
        workflow: std::env::var("BENCH_WORKFLOW")
            .ok()
            .filter(|w| !w.is_empty())
            .unwrap_or_else(|| "triage_handoff".into()),
        sequential: if bench_mode {
            env_num("BENCH_SEQ", 100)? as usize
        } else {
            3
        },
        concurrency: if bench_mode {
            env_num("BENCH_CONCURRENCY", 20)?.max(1) as usize
        } else {
            2
        },
        seconds: if bench_mode {
            env_num("BENCH_SECS", 15)?.max(1)
        } else {
            1
        },
    };
    let bins: Vec<std::path::PathBuf> = match std::env::var("BENCH_BINS") {
        Ok(list) if !list.trim().is_empty() => {
            let bins: Vec<std::path::PathBuf> = list
                .split(',')
                .map(|p| std::path::PathBuf::from(p.trim()))
                .collect();
            for b in &bins {
                ensure!(b.is_file(), "BENCH_BINS: {} is not a file", b.display());
            }
            bins
        }
        _ => match binary() {
            Ok(bin) => vec![bin],
            Err(e) if !bench_mode => {
                println!("runs_load: skipped ({e:#})");
                return Ok(());
            }
            Err(e) => return Err(e),
        },
    };
    let rounds = if bench_mode {
        env_num("BENCH_ROUNDS", 1)?.max(1)
    } else {
        1
    };
    let profile_dir = std::env::var("BENCH_PERF")
        .ok()
        .filter(|d| !d.is_empty())
        .map(std::path::PathBuf::from);
    if let Some(dir) = &profile_dir {
        std::fs::create_dir_all(dir)?;
    }
    println!(
        "binaries: {}; workflow {}; {} sequential runs; concurrency {} for {} s; {} round(s)",
        bins.iter()
            .map(|b| b.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
        settings.workflow,
        settings.sequential,
        settings.concurrency,
        settings.seconds,
        rounds
    );
    let all_configs: &[(&'static str, bool)] = if bench_mode {
        &[("default", false), ("sync_interval: always", true)]
    } else {
        &[("default", false)]
    };
    let only = std::env::var("BENCH_CONFIGS").unwrap_or_default();
    let configs: Vec<(&'static str, bool)> = all_configs
        .iter()
        .copied()
        .filter(|(_, always)| match only.as_str() {
            "default" => !always,
            "always" => *always,
            _ => true,
        })
        .collect();
    let mut figures = Vec::new();
    for round in 1..=rounds {
        for (name, sync_always) in &configs {
            for bin in &bins {
                let profile = profile_dir.as_ref().map(|d| {
                    let label = bin.file_name().unwrap_or_default().to_string_lossy();
                    let cfg = if *sync_always { "always" } else { "default" };
                    d.join(format!("{label}-{cfg}-{round}.data"))
                });
                let f = measure(bin, name, *sync_always, &settings, profile).await?;
                eprintln!(
                    "{} / {name} (round {round}): {} runs, {:.0} runs/s, load average {}",
                    f.binary, f.runs, f.runs_per_sec, f.load
                );
                figures.push(f);
            }
        }
    }
    println!(
        "\n| binary | configuration | runs/s (c={}) | p50 ms | p99 ms | sequential p50 ms | sequential p99 ms | fsyncs/run | load avg (1, 5, 15 min) |",
        settings.concurrency
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---|");
    for f in &figures {
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {:.1} | {:.1} | {} | {} |",
            f.binary,
            f.config,
            f.runs_per_sec,
            f.p50,
            f.p99,
            f.seq_p50,
            f.seq_p99,
            f.fsyncs_per_run
                .map(|n| format!("{n:.1}"))
                .unwrap_or_else(|| "n/a (perf)".into()),
            f.load
        );
    }
    println!("\nServer CPU per completed run (ms), concurrent phase:\n");
    let names: Vec<&str> = figures[0].cpu.iter().map(|(n, _)| *n).collect();
    println!("| binary | configuration | {} |", names.join(" | "));
    println!("|---|---|{}", "---:|".repeat(names.len()));
    for f in &figures {
        let cells: Vec<String> = f.cpu.iter().map(|(_, v)| format!("{v:.2}")).collect();
        println!("| {} | {} | {} |", f.binary, f.config, cells.join(" | "));
    }
    println!(
        "\nMongo-wire operations per completed run (serverStatus opcounters), concurrent phase:\n"
    );
    for f in &figures {
        let cells: Vec<String> = f
            .mongo_ops
            .iter()
            .map(|(k, v)| format!("{k} {v:.2}"))
            .collect();
        println!("- {} / {}: {}", f.binary, f.config, cells.join(", "));
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(run())
}
