//! Control plane figures through real processes on loopback (see benches/README.md):
//!
//! 1. `POST /api/sessions` latency at a sustained, open-loop rate (default 500 requests/s for
//!    10 s): requests are sent on a fixed schedule whatever the answers' speed, so a slow answer
//!    does not slow the load (no coordinated omission). Reported: service time (send → answer)
//!    and latency from the scheduled send.
//! 2. The time a limit change takes to reach every replica: `PATCH /api/apps/{id}` lowers the
//!    app's `requests_per_minute` to 1, then both gateways are polled until each refuses with
//!    429; then the limit is raised again and polled until each accepts. Reported from the
//!    PATCH's answer (the change is in the log and the view) to the first poll that saw it.
//!
//! The fleet: nats-server and the Mongo-wire server (test kit), two `mozaiks gateway` processes,
//! one worker, one projector, one billing, all on this machine. Bounded: `BENCH_RPS` (500),
//! `BENCH_SECS` (10), `BENCH_ROUNDS` (20) propagation rounds, each polled for at most 5 s.
//! Without `--bench` (`cargo test --benches`) it runs a short smoke version.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use common::{binary, free_port};
use mozaiks_testkit::TestServers;
use serde_json::json;

const SECRET: &str = "bench-secret-that-is-long-enough-0123456789";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(
    bin: &Path,
    servers: &TestServers,
    role: &str,
    port: Option<u16>,
    log: &PathBuf,
) -> anyhow::Result<Proc> {
    let out = std::fs::File::create(log)?;
    let mut cmd = common::mozaiks(bin, servers);
    cmd.arg(role)
        .env("JWT_SECRET", SECRET)
        .env(
            "MOZAIKS_WORKFLOWS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/workflows"),
        )
        .env("MOZAIKS_RETENTION", "off")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out));
    if let Some(p) = port {
        cmd.env("MOZAIKS_LISTEN", format!("127.0.0.1:{p}"));
    }
    Ok(Proc(cmd.spawn().context("spawn mozaiks")?))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn summary(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    println!(
        "{name:<34} n={:<6} p50={:>7.2} p90={:>7.2} p99={:>7.2} max={:>7.2} ms",
        ms.len(),
        percentile(&ms, 50.0),
        percentile(&ms, 90.0),
        percentile(&ms, 99.0),
        ms.last().copied().unwrap_or(f64::NAN)
    );
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let env_num = |k: &str, d: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let (rps, secs, rounds) = if full {
        (
            env_num("BENCH_RPS", 500),
            env_num("BENCH_SECS", 10),
            env_num("BENCH_ROUNDS", 20),
        )
    } else {
        (50, 1, 2)
    };
    let bin = match binary() {
        Ok(b) => b,
        Err(e) if !full => {
            println!("control_plane: skipped ({e})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!("control_plane: binary {}", bin.display());
    let servers = TestServers::start().await.context("test servers")?;
    let dir = std::env::temp_dir().join(format!("mz-bench-ctl-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut procs = Vec::new();
    for role in ["worker", "projector", "billing"] {
        procs.push(spawn(
            &bin,
            &servers,
            role,
            None,
            &dir.join(format!("{role}.log")),
        )?);
    }
    let mut gateways = Vec::new();
    for i in 0..2 {
        let port = free_port();
        procs.push(spawn(
            &bin,
            &servers,
            "gateway",
            Some(port),
            &dir.join(format!("gateway-{i}.log")),
        )?);
        gateways.push(format!("http://127.0.0.1:{port}"));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()?;
    for gw in &gateways {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(r) = http.get(format!("{gw}/health/ready")).send().await
                && r.status() == 200
            {
                break;
            }
            if Instant::now() > deadline {
                bail!("{gw} not ready; logs in {}", dir.display());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(SECRET, false))?;
    let root = auth.mint_user("root", "default", &["superadmin"], 3600)?;

    // An app for the load, with limits far above the rate (runs pile up at 500 sessions/s, and
    // max_concurrent_runs counts every worker's).
    let r = http
        .post(format!("{}/api/apps", gateways[0]))
        .bearer_auth(&root)
        .json(
            &json!({"app_id": "bench", "name": "Bench", "tier": "starter",
                      "limits": {"requests_per_minute": 10_000_000,
                                 "max_concurrent_runs": 10_000_000}}),
        )
        .send()
        .await?;
    anyhow::ensure!(r.status() == 201, "create app: {}", r.text().await?);
    let user = Arc::new(auth.mint_user("bench-user", "bench", &["user"], 3600)?);

    // 1. Sustained open-loop load on gateway 0.
    let url = Arc::new(format!("{}/api/sessions", gateways[0]));
    let body = Arc::new(json!({"app_id": "bench", "workflow_name": "hello"}));
    for _ in 0..50 {
        http.post(url.as_str())
            .bearer_auth(user.as_str())
            .json(body.as_ref())
            .send()
            .await?;
    }
    let total = rps * secs;
    let interval = Duration::from_secs_f64(1.0 / rps as f64);
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled).await;
        let (http, url, body, user) = (http.clone(), url.clone(), body.clone(), user.clone());
        tasks.spawn(async move {
            let sent = tokio::time::Instant::now();
            let r = http
                .post(url.as_str())
                .bearer_auth(user.as_str())
                .json(body.as_ref())
                .timeout(Duration::from_secs(10))
                .send()
                .await;
            let done = tokio::time::Instant::now();
            let ok = matches!(&r, Ok(r) if r.status() == 201);
            (
                ok,
                (done - sent).as_secs_f64() * 1e3,
                (done - scheduled).as_secs_f64() * 1e3,
            )
        });
    }
    let elapsed_send = (tokio::time::Instant::now() - start).as_secs_f64();
    let (mut service, mut from_schedule, mut failed) = (Vec::new(), Vec::new(), 0);
    while let Some(res) = tasks.join_next().await {
        let (ok, s, l) = res?;
        if ok {
            service.push(s);
            from_schedule.push(l);
        } else {
            failed += 1;
        }
    }
    println!(
        "POST /api/sessions at {rps}/s for {secs} s: {} requests sent in {elapsed_send:.2} s, {failed} failed",
        total
    );
    summary("service time (send → 201)", service);
    summary("latency from scheduled send", from_schedule);

    // 2. A limit change reaching every replica.
    let patch = |rpm: u32| {
        let (http, root, gw) = (http.clone(), root.clone(), gateways[0].clone());
        async move {
            http.patch(format!("{gw}/api/apps/bench"))
                .bearer_auth(&root)
                .json(&json!({"limits": {"requests_per_minute": rpm,
                                          "max_concurrent_runs": 10_000_000}}))
                .send()
                .await
        }
    };
    let (mut lowered, mut raised) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (rpm, want, out) in [(1u32, 429u16, &mut lowered), (10_000_000, 201, &mut raised)] {
            let r = patch(rpm).await?;
            anyhow::ensure!(r.status() == 200, "patch: {}", r.text().await?);
            let changed = Instant::now();
            let mut polls = Vec::new();
            for gw in &gateways {
                let (http, user, url) = (http.clone(), user.clone(), format!("{gw}/api/sessions"));
                polls.push(tokio::spawn(async move {
                    let deadline = changed + Duration::from_secs(5);
                    loop {
                        let s = http
                            .post(&url)
                            .bearer_auth(user.as_str())
                            .json(&json!({"app_id": "bench", "workflow_name": "hello"}))
                            .send()
                            .await
                            .map(|r| r.status().as_u16())
                            .unwrap_or(0);
                        if s == want {
                            return Some(changed.elapsed().as_secs_f64() * 1e3);
                        }
                        if Instant::now() > deadline {
                            return None;
                        }
                    }
                }));
            }
            let mut slowest: f64 = 0.0;
            for p in polls {
                match p.await? {
                    Some(ms) => slowest = slowest.max(ms),
                    None => bail!("a replica did not apply requests_per_minute={rpm} within 5 s"),
                }
            }
            out.push(slowest);
        }
    }
    summary("limit lowered → every replica 429", lowered);
    summary("limit raised → every replica 201", raised);
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
