//! The ops benchmarks on a real fleet (issue 12, "Benchmarks"): real `mozaiks` processes
//! (gateway, worker, projector, ops) on the test kit's nats-server and Mongo-wire server, driven
//! through the public API.
//!
//! 1. **Isolation.** Apps X and Y, same tier, caps lifted. A run holds its worker slot for
//!    `BENCH_RUN_MS` (default 200 ms: the pack's one tool is an HTTP call to this bench, which
//!    answers after that long). The worker has `BENCH_SLOTS` slots (4); Y starts a session every
//!    `5 × run / slots` (a fifth of the worker), X twenty times as often (four times what the
//!    worker can run). Y's latency is from just before its `POST /api/sessions` to the
//!    `run.completed` frame on the ticket's WebSocket (`after=0`). For each mode of the worker
//!    in `BENCH_MODES` (`reserve,fair,fifo`: fair slots with the default reserve of one slot,
//!    `MOZAIKS_RESERVE_SLOTS=1`; fair slots without it, `0`; first come first served,
//!    `MOZAIKS_FAIR_SLOTS=false`) a fresh fleet measures Y alone for `BENCH_SECS` (15), then Y
//!    while X floods for as long; Y's runs still waiting at the end are waited for up to
//!    `BENCH_DRAIN_SECS` (120) and counted as unfinished after that. The modes run over
//!    `BENCH_ROUNDS` rounds (1) in one run, in reverse order every other round.
//! 2. **Detection.** Two gateways, a worker, a projector and two `mozaiks ops` replicas
//!    (`BENCH_OPS_EVALUATE_MS`, 500); the policy's `noisy_neighbour` with `for_seconds` =
//!    `BENCH_FOR_SECS` (2), `min_total` 4 and the action `disable_pack`. Each of
//!    `BENCH_DETECT_ROUNDS` (5) rounds uses a fresh app that starts four runs held by this bench
//!    (its cap is 4): the condition (one app above 40 % of the fleet's runs, at least 4 runs)
//!    becomes true when the fourth run starts (its `started_at` from `/health/active-runs`, the
//!    server's clock, same host). Then each gateway is asked to start a fifth run every 10 ms —
//!    429 `too_many_runs` while the pack is allowed (no run starts), 403 `workflow_disabled`
//!    once the action is in force on that replica. The figure is from the condition to the
//!    action in force on the last gateway (target: the `for` duration + < 2 s), split at the
//!    incident's `starts_at` (`GET /api/ops/incidents`).
//!
//! `cargo bench --bench ops_fleet` (`-- isolation` or `-- detection` for one part). Without
//! `--bench` (`cargo test --bench ops_fleet`) it runs a short smoke of both. The load average
//! is printed with every figure: the machine is shared, so compare rows of the same run.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::{DateTime, Utc};
use common::{ChildGuard, binary, env_num, free_port, mozaiks_dev, pct, sorted, wait_ready};
use futures::StreamExt;
use mozaiks_testkit::TestServers;
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

fn load() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

/// The bench's tool server: `/sleep` answers after the run time, `/hold?q=r{N}` once round N is
/// released.
struct Tools {
    base: String,
    released: watch::Sender<u64>,
}

async fn tools(run: Duration) -> anyhow::Result<Tools> {
    let (tx, rx) = watch::channel(0u64);
    let app = axum::Router::new()
        .route(
            "/sleep",
            axum::routing::get(move || async move {
                tokio::time::sleep(run).await;
                axum::Json(json!({"status": "slept"}))
            }),
        )
        .route(
            "/hold",
            axum::routing::get(move |q: axum::extract::Query<BTreeMap<String, String>>| {
                let mut rx = rx.clone();
                async move {
                    let round: u64 = q
                        .get("q")
                        .and_then(|s| s.trim_start_matches('r').parse().ok())
                        .unwrap_or(0);
                    let _ = rx.wait_for(|r| *r >= round).await;
                    axum::Json(json!({"status": "released"}))
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(Tools {
        base: format!("http://{addr}"),
        released: tx,
    })
}

/// A workflows folder with `sleep` (one tool call to `/sleep`) and `hold` (to `/hold`).
fn packs(tool_base: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!(
        "mozaiks-bench-ops-{}",
        uuid::Uuid::now_v7().simple()
    ));
    for name in ["sleep", "hold"] {
        std::fs::create_dir_all(dir.join(name))?;
        std::fs::write(
            dir.join(name).join("workflow.yaml"),
            format!(
                "name: {name}
start_agent: runner
max_turns: 3
tools:
  - name: {name}
    parameters: {{type: object, properties: {{q: {{type: string}}}}}}
    http: {{method: GET, url: '{tool_base}/{name}', timeout_ms: 300000}}
agents:
  - name: runner
    tools: [{name}]
    offline:
      tool_calls:
        - {{tool: {name}, arguments: {{q: '{{input}}'}}}}
      reply: 'done {{tool.{name}}}'
"
            ),
        )?;
    }
    Ok(dir)
}

/// A fleet of `mozaiks` processes on fresh test servers.
struct Fleet {
    servers: TestServers,
    bin: PathBuf,
    workflows: PathBuf,
    procs: Vec<ChildGuard>,
    gateways: Vec<String>,
    http: reqwest::Client,
    operator: String,
}

impl Fleet {
    async fn start(bin: &Path, workflows: &Path) -> anyhow::Result<Fleet> {
        let servers = TestServers::start().await.context("test servers")?;
        Ok(Fleet {
            servers,
            bin: bin.to_path_buf(),
            workflows: workflows.to_path_buf(),
            procs: Vec::new(),
            gateways: Vec::new(),
            http: reqwest::Client::new(),
            operator: String::new(),
        })
    }

    fn spawn(&mut self, role: &str, env: &[(&str, &str)]) -> anyhow::Result<Option<String>> {
        let log = std::env::temp_dir().join(format!(
            "mozaiks-bench-ops-{role}-{}.log",
            uuid::Uuid::now_v7().simple()
        ));
        let out = std::fs::File::create(&log)?;
        let mut cmd = mozaiks_dev(&self.bin, &self.servers);
        cmd.arg(role)
            .env("MOZAIKS_WORKFLOWS_DIR", &self.workflows)
            .env("MOZAIKS_DRAIN_SECONDS", "1")
            .envs(env.iter().copied())
            .stdout(out.try_clone()?)
            .stderr(out);
        let base = (role == "gateway").then(|| {
            let port = free_port();
            cmd.env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"));
            format!("http://127.0.0.1:{port}")
        });
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn mozaiks {role}"))?;
        self.procs.push(ChildGuard {
            child,
            log,
            finished: false,
        });
        if let Some(b) = &base {
            self.gateways.push(b.clone());
        }
        Ok(base)
    }

    async fn ready(&mut self) -> anyhow::Result<()> {
        for (i, base) in self.gateways.clone().iter().enumerate() {
            let idx = self
                .procs
                .iter()
                .enumerate()
                .filter(|(_, p)| p.log.to_string_lossy().contains("-gateway-"))
                .nth(i)
                .map(|(j, _)| j)
                .context("gateway process")?;
            wait_ready(&self.http, base, &mut self.procs[idx]).await?;
        }
        self.operator = self.token("bench-operator", "default", "superadmin")?;
        Ok(())
    }

    fn token(&self, sub: &str, app: &str, roles: &str) -> anyhow::Result<String> {
        let out = mozaiks_dev(&self.bin, &self.servers)
            .args(["token", "--sub", sub, "--app", app, "--roles", roles])
            .stderr(Stdio::inherit())
            .output()
            .context("run mozaiks token")?;
        ensure!(out.status.success(), "mozaiks token failed: {}", out.status);
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }

    async fn call(&self, gw: usize, method: &str, path: &str, body: Value) -> (u16, Value) {
        let url = format!("{}{path}", self.gateways[gw]);
        let req = match method {
            "GET" => self.http.get(url),
            "PUT" => self.http.put(url),
            _ => self.http.post(url),
        };
        let req = if method == "GET" {
            req
        } else {
            req.json(&body)
        };
        match req.bearer_auth(&self.operator).send().await {
            Ok(r) => {
                let s = r.status().as_u16();
                (s, r.json().await.unwrap_or(Value::Null))
            }
            Err(e) => (0, json!({"error": e.to_string()})),
        }
    }

    async fn create_app(&self, app: &str, workflows: &[&str], limits: Value) -> anyhow::Result<()> {
        let (s, v) = self
            .call(
                0,
                "POST",
                "/api/apps",
                json!({"app_id": app, "name": app, "tier": "business", "workflows": workflows,
                       "limits": limits}),
            )
            .await;
        ensure!(s == 201, "POST /api/apps {app}: {s} {v}");
        // Every gateway's registry follows the app's events: wait until each knows it.
        for gw in 0..self.gateways.len() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let (s, _) = self
                    .call(gw, "GET", &format!("/api/apps/{app}"), json!({}))
                    .await;
                if s == 200 {
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "app {app} unknown to gateway {gw}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    fn finish(&mut self) {
        for p in &mut self.procs {
            p.finished = true;
        }
    }
}

async fn post_session(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    app: &str,
    workflow: &str,
    message: &str,
) -> anyhow::Result<(u16, Value)> {
    let r = http
        .post(format!("{base}/api/sessions"))
        .bearer_auth(token)
        .json(&json!({"app_id": app, "workflow_name": workflow, "message": message}))
        .send()
        .await?;
    let s = r.status().as_u16();
    Ok((s, r.json().await.unwrap_or(Value::Null)))
}

/// Where a run's time went, in ms, from the server's event timestamps (same host, same clock):
/// POST → `session.started` (the start command reaching the chat's worker), `session.started`
/// → `run.started` (mostly the wait for a slot), `run.started` → `run.completed` (the run),
/// `run.completed` → received.
#[derive(Clone, Copy, Default)]
struct Split([f64; 4]);

const SPLIT: [&str; 4] = [
    "POST → session.started",
    "session.started → run.started",
    "run.started → run.completed",
    "run.completed → received",
];

/// One run of `app`: POST /api/sessions, the ticket's WebSocket from `after=0`, frames until
/// `run.completed`; the time from just before the POST, and where it went.
async fn one_run(
    http: &reqwest::Client,
    base: &str,
    token: &str,
    app: &str,
    limit: Duration,
) -> anyhow::Result<(Duration, Split)> {
    let t0 = Instant::now();
    let w0 = Utc::now();
    let (s, ticket) = post_session(http, base, token, app, "sleep", "y").await?;
    ensure!(s == 201, "POST /api/sessions ({app}): {s} {ticket}");
    let url = format!(
        "{}?token={}&after=0",
        ticket["ws_url"].as_str().context("ws_url")?,
        ticket["runtime_token"].as_str().context("runtime_token")?
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let deadline = t0 + limit;
    let ts = |f: &Value| {
        f["ts"]
            .as_str()
            .and_then(|s| s.parse::<DateTime<Utc>>().ok())
    };
    let ms = |a: DateTime<Utc>, b: DateTime<Utc>| {
        (b - a).num_microseconds().unwrap_or(0) as f64 / 1000.0
    };
    let (mut started, mut run_started) = (None, None);
    loop {
        let msg = tokio::time::timeout_at(deadline.into(), ws.next())
            .await
            .context("run not completed in time")?
            .context("socket ended")??;
        let Message::Text(text) = msg else { continue };
        let frame: Value = serde_json::from_str(text.as_str())?;
        match frame["type"].as_str() {
            Some("session.started") => started = ts(&frame),
            Some("run.started") if run_started.is_none() => run_started = ts(&frame),
            Some("run.completed") if !frame["seq"].is_null() => {
                let took = t0.elapsed();
                let now = Utc::now();
                let _ = ws.close(None).await;
                let mut split = Split::default();
                if let (Some(a), Some(b), Some(c)) = (started, run_started, ts(&frame)) {
                    split = Split([ms(w0, a), ms(a, b), ms(b, c), ms(c, now)]);
                }
                return Ok((took, split));
            }
            Some(t @ ("run.failed" | "run.cancelled")) => bail!("{t}: {}", frame["data"]),
            _ => {}
        }
    }
}

struct IsoCfg {
    slots: u64,
    run: Duration,
    secs: u64,
    drain: Duration,
}

struct Phase {
    lat: Vec<f64>,
    splits: Vec<Split>,
    unfinished: usize,
    x_statuses: BTreeMap<u16, u64>,
    load_start: String,
    load_end: String,
}

/// Y every `y_every` for `secs` (and X twenty times as often when `flood`).
async fn phase(
    http: &reqwest::Client,
    base: &str,
    y_token: &str,
    x_token: &str,
    flood: bool,
    cfg: &IsoCfg,
) -> Phase {
    let load_start = load();
    let y_every = cfg.run * 5 / cfg.slots as u32;
    let x_every = y_every / 20;
    let mut ys = tokio::task::JoinSet::new();
    let mut xs = tokio::task::JoinSet::new();
    let end = Instant::now() + Duration::from_secs(cfg.secs);
    let mut y_tick = tokio::time::interval(y_every);
    let mut x_tick = tokio::time::interval(x_every);
    x_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let limit = Duration::from_secs(cfg.secs) + cfg.drain;
    while Instant::now() < end {
        tokio::select! {
            _ = y_tick.tick() => {
                let (http, base, t) = (http.clone(), base.to_string(), y_token.to_string());
                ys.spawn(async move { one_run(&http, &base, &t, "y", limit).await });
            }
            _ = x_tick.tick(), if flood => {
                let (http, base, t) = (http.clone(), base.to_string(), x_token.to_string());
                xs.spawn(async move {
                    post_session(&http, &base, &t, "x", "sleep", "x").await.map(|(s, _)| s).unwrap_or(0)
                });
            }
        }
    }
    let mut x_statuses = BTreeMap::new();
    while let Some(s) = xs.join_next().await {
        *x_statuses.entry(s.unwrap_or(0)).or_default() += 1;
    }
    let mut lat = Vec::new();
    let mut splits = Vec::new();
    let mut unfinished = 0;
    while let Some(r) = ys.join_next().await {
        match r {
            Ok(Ok((d, split))) => {
                lat.push(d.as_secs_f64() * 1000.0);
                splits.push(split);
            }
            Ok(Err(e)) => {
                unfinished += 1;
                if unfinished == 1 {
                    eprintln!("  a Y run did not complete: {e:#}");
                }
            }
            Err(_) => unfinished += 1,
        }
    }
    Phase {
        lat: sorted(lat),
        splits,
        unfinished,
        x_statuses,
        load_start,
        load_end: load(),
    }
}

/// Where Y's time went: p50 / p99 of each part.
fn split_rows(name: &str, p: &Phase) -> Vec<String> {
    (0..4)
        .map(|i| {
            let v = sorted(p.splits.iter().map(|s| s.0[i]).collect());
            if v.is_empty() {
                return format!("| {name} | {} | - | - |", SPLIT[i]);
            }
            format!(
                "| {name} | {} | {:.1} | {:.1} |",
                SPLIT[i],
                pct(&v, 50.0),
                pct(&v, 99.0)
            )
        })
        .collect()
}

fn row(name: &str, p: &Phase, alone_p99: f64) {
    let l = &p.lat;
    let (p50, p90, p99, max) = if l.is_empty() {
        (f64::NAN, f64::NAN, f64::NAN, f64::NAN)
    } else {
        (pct(l, 50.0), pct(l, 90.0), pct(l, 99.0), l[l.len() - 1])
    };
    let xs: Vec<String> = p
        .x_statuses
        .iter()
        .map(|(s, n)| format!("{s}: {n}"))
        .collect();
    println!(
        "| {name} | {} | {} | {p50:.0} | {p90:.0} | {p99:.0} | {max:.0} | {:.2} | {} | {} → {} |",
        l.len(),
        p.unfinished,
        p99 / alone_p99,
        if xs.is_empty() {
            "-".into()
        } else {
            xs.join(", ")
        },
        p.load_start,
        p.load_end
    );
}

/// How the worker hands out its slots.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    /// First come, first served (`MOZAIKS_FAIR_SLOTS=false`).
    Fifo,
    /// Fair slots without a reserve (`MOZAIKS_RESERVE_SLOTS=0`).
    Fair,
    /// Fair slots with one slot kept for lingering apps (the default).
    Reserve,
}

impl Mode {
    fn parse(s: &str) -> anyhow::Result<Mode> {
        Ok(match s.trim() {
            "fifo" => Mode::Fifo,
            "fair" => Mode::Fair,
            "reserve" => Mode::Reserve,
            other => bail!("BENCH_MODES: unknown mode {other:?} (fifo, fair, reserve)"),
        })
    }

    fn name(self) -> &'static str {
        match self {
            Mode::Fifo => "FIFO",
            Mode::Fair => "fair slots, no reserve",
            Mode::Reserve => "fair slots + reserve 1",
        }
    }
}

async fn isolation(
    bin: &Path,
    workflows: &Path,
    mode: Mode,
    cfg: &IsoCfg,
    splits: &mut Vec<String>,
    kv: &mut Vec<String>,
) -> anyhow::Result<()> {
    let mut fleet = Fleet::start(bin, workflows).await?;
    let slots = cfg.slots.to_string();
    let fair_s = (mode != Mode::Fifo).to_string();
    let reserve = if mode == Mode::Reserve { "1" } else { "0" };
    let env = [
        ("MAX_CONCURRENT_WORKFLOWS", slots.as_str()),
        ("MOZAIKS_FAIR_SLOTS", fair_s.as_str()),
        ("MOZAIKS_RESERVE_SLOTS", reserve),
    ];
    fleet.spawn("worker", &env)?;
    fleet.spawn("projector", &env)?;
    let base = fleet.spawn("gateway", &env)?.context("gateway")?;
    fleet.ready().await?;
    let big = json!({"max_concurrent_runs": 100000, "requests_per_minute": 1000000,
                     "max_websockets": 100000, "max_websockets_per_user": 100000});
    for app in ["x", "y"] {
        fleet.create_app(app, &["sleep"], big.clone()).await?;
    }
    let y_token = fleet.token("yuri", "y", "user")?;
    let x_token = fleet.token("xena", "x", "user")?;
    let limit = Duration::from_secs(30);
    for _ in 0..3 {
        one_run(&fleet.http, &base, &y_token, "y", limit).await?;
    }
    let mode = mode.name();
    let nats = async_nats::connect(&fleet.servers.nats_url).await?;
    let owners = format!(
        "KV_{}",
        mozaiks_events::subjects::Subjects::new(&fleet.servers.namespace).name("MZ_OWNERS")
    );
    let js = async_nats::jetstream::new(nats);
    let writes = || {
        let (js, owners) = (js.clone(), owners.clone());
        async move {
            let mut s = js.get_stream(&owners).await?;
            anyhow::Ok(s.info().await?.state.last_sequence)
        }
    };
    let (w0, t0) = (writes().await?, Instant::now());
    let alone = phase(&fleet.http, &base, &y_token, &x_token, false, cfg).await;
    let (w1, t1) = (writes().await?, Instant::now());
    splits.extend(split_rows(&format!("Y alone, {mode}"), &alone));
    let alone_p99 = if alone.lat.is_empty() {
        f64::NAN
    } else {
        pct(&alone.lat, 99.0)
    };
    row(&format!("Y alone, {mode}"), &alone, alone_p99);
    let flood = phase(&fleet.http, &base, &y_token, &x_token, true, cfg).await;
    let (w2, t2) = (writes().await?, Instant::now());
    row(&format!("Y with X flooding, {mode}"), &flood, alone_p99);
    for (name, w, t) in [
        ("Y alone", w1 - w0, t1 - t0),
        ("Y with X flooding", w2 - w1, t2 - t1),
    ] {
        kv.push(format!(
            "| {name}, {mode} | {w} | {:.1} | {:.0} |",
            t.as_secs_f64(),
            w as f64 / t.as_secs_f64()
        ));
    }
    splits.extend(split_rows(&format!("Y with X flooding, {mode}"), &flood));
    fleet.finish();
    Ok(())
}

struct DetectCfg {
    rounds: u64,
    for_secs: f64,
    evaluate_ms: u64,
}

async fn detection(
    bin: &Path,
    workflows: &Path,
    tools: &Tools,
    cfg: &DetectCfg,
) -> anyhow::Result<()> {
    let mut fleet = Fleet::start(bin, workflows).await?;
    let eval = cfg.evaluate_ms.to_string();
    let env = [
        ("MAX_CONCURRENT_WORKFLOWS", "200"),
        ("MOZAIKS_OPS_EVALUATE_MS", eval.as_str()),
    ];
    fleet.spawn("worker", &env)?;
    fleet.spawn("projector", &env)?;
    fleet.spawn("ops", &env)?;
    fleet.spawn("ops", &env)?;
    fleet.spawn("gateway", &env)?;
    fleet.spawn("gateway", &env)?;
    fleet.ready().await?;
    let off = json!({"enabled": false});
    let policy = json!({
        "rules": {
            "noisy_neighbour": {"enabled": true, "threshold": 0.4, "min_total": 4,
                                "for_seconds": cfg.for_secs, "actions": ["disable_pack"]},
            "error_spike": off, "cost_spike": off, "socket_share": off, "slow_start": off,
        },
        "actions": {"disable_pack": {"ttl_seconds": 3600}},
    });
    let (s, v) = fleet.call(0, "PUT", "/api/ops/policy", policy).await;
    ensure!(s == 200, "PUT /api/ops/policy: {s} {v}");
    println!(
        "| round | condition → incident (ms) | incident → in force on the last gateway (ms) | condition → in force, gateway 1 / 2 (ms) | minus `for` (ms) | load |"
    );
    println!("|---:|---:|---:|---:|---:|---|");
    let mut over = Vec::new();
    for round in 1..=cfg.rounds {
        let app = format!("d{round}");
        let limits = json!({"max_concurrent_runs": 4, "requests_per_minute": 1000000});
        fleet.create_app(&app, &["hold"], limits).await?;
        let token = fleet.token(&format!("u{round}"), &app, "user")?;
        let msg = format!("r{round}");
        for i in 0..4 {
            let (s, v) = post_session(
                &fleet.http,
                &fleet.gateways[i % 2],
                &token,
                &app,
                "hold",
                &msg,
            )
            .await?;
            ensure!(s == 201, "start {i} of {app}: {s} {v}");
        }
        // The condition holds from the fourth run's start (server clock); each gateway sees
        // the four runs (the workers' MZ_PERF snapshots) before it is probed, so a probe never
        // starts a fifth run (the app's cap is 4).
        let mut cond: Option<DateTime<Utc>> = None;
        for gw in 0..2 {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let (_, v) = fleet
                    .call(
                        gw,
                        "GET",
                        &format!("/health/active-runs?app_id={app}"),
                        json!({}),
                    )
                    .await;
                if v["count"] == 4 {
                    let latest = v["runs"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r["started_at"].as_str()?.parse::<DateTime<Utc>>().ok())
                        .max();
                    cond = cond.max(latest);
                    break;
                }
                ensure!(
                    Instant::now() < deadline,
                    "gateway {gw} never saw {app}'s 4 runs: {v}"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let cond = cond.context("no started_at")?;
        let mut seen = [None::<DateTime<Utc>>; 2];
        let deadline = Instant::now() + Duration::from_secs(30 + cfg.for_secs as u64);
        while seen.iter().any(Option::is_none) {
            ensure!(
                Instant::now() < deadline,
                "disable_pack not in force within 30 s + for"
            );
            for (gw, at) in seen.iter_mut().enumerate() {
                if at.is_some() {
                    continue;
                }
                let (s, v) =
                    post_session(&fleet.http, &fleet.gateways[gw], &token, &app, "hold", &msg)
                        .await?;
                match (s, v["error"]["code"].as_str().unwrap_or("")) {
                    (403, "workflow_disabled") => *at = Some(Utc::now()),
                    (429, "too_many_runs") => {}
                    _ => bail!("probe of {app} on gateway {gw}: {s} {v}"),
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, inc) = fleet
            .call(
                0,
                "GET",
                &format!("/api/ops/incidents?app_id={app}"),
                json!({}),
            )
            .await;
        let fired = inc["incidents"][0]["starts_at"]
            .as_str()
            .or_else(|| inc["incidents"][0]["data"]["starts_at"].as_str())
            .and_then(|s| s.parse::<DateTime<Utc>>().ok());
        let ms = |a: DateTime<Utc>, b: DateTime<Utc>| (b - a).num_milliseconds();
        let last = seen.iter().flatten().max().copied().context("seen")?;
        let total = ms(cond, last);
        over.push(total as f64 - cfg.for_secs * 1000.0);
        println!(
            "| {round} | {} | {} | {} / {} | {} | {} |",
            fired.map(|f| ms(cond, f).to_string()).unwrap_or("?".into()),
            fired.map(|f| ms(f, last).to_string()).unwrap_or("?".into()),
            ms(cond, seen[0].context("seen")?),
            ms(cond, seen[1].context("seen")?),
            total as f64 - cfg.for_secs * 1000.0,
            load()
        );
        // The round's runs end; the next round's app has the fleet to itself.
        tools.released.send_replace(round);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let (_, v) = fleet.call(0, "GET", "/health/active-runs", json!({})).await;
            if v["count"] == 0 {
                break;
            }
            ensure!(
                Instant::now() < deadline,
                "round {round}'s runs did not end: {v}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let over = sorted(over);
    println!(
        "detection, `for` {} s, evaluated every {} ms: condition → in force on every gateway minus `for`: median {:.0} ms, max {:.0} ms (target < 2000 ms) over {} rounds",
        cfg.for_secs,
        cfg.evaluate_ms,
        pct(&over, 50.0),
        over[over.len() - 1],
        over.len()
    );
    fleet.finish();
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let smoke = !args.iter().any(|a| a == "--bench");
    let only = |part: &str| {
        !args.iter().any(|a| a == "isolation" || a == "detection") || args.iter().any(|a| a == part)
    };
    let bin = match binary() {
        Ok(b) => b,
        Err(e) if smoke => {
            println!("ops_fleet: skipped ({e})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    let run = Duration::from_millis(env_num("BENCH_RUN_MS", 200)?);
    let tools = tools(run).await?;
    let workflows = packs(&tools.base)?;
    println!(
        "ops_fleet: {} ({}), load {}",
        bin.display(),
        if smoke { "smoke" } else { "bench" },
        load()
    );
    if only("isolation") {
        let cfg = IsoCfg {
            slots: env_num("BENCH_SLOTS", 4)?.max(1),
            run,
            secs: if smoke { 2 } else { env_num("BENCH_SECS", 15)? },
            drain: Duration::from_secs(if smoke {
                30
            } else {
                env_num("BENCH_DRAIN_SECS", 120)?
            }),
        };
        let rounds = if smoke {
            1
        } else {
            env_num("BENCH_ROUNDS", 1)?
        };
        let modes = std::env::var("BENCH_MODES")
            .unwrap_or_else(|_| "reserve,fair,fifo".into())
            .split(',')
            .map(Mode::parse)
            .collect::<anyhow::Result<Vec<Mode>>>()?;
        let y_every = cfg.run * 5 / cfg.slots as u32;
        println!(
            "\nisolation: {modes:?}, {} slots, runs of {} ms, Y every {} ms, X every {:.1} ms, {} s per phase, {rounds} round(s)\n",
            cfg.slots,
            cfg.run.as_millis(),
            y_every.as_millis(),
            (y_every / 20).as_secs_f64() * 1000.0,
            cfg.secs
        );
        println!(
            "| scenario | Y runs | unfinished | p50 ms | p90 ms | p99 ms | max ms | p99 / alone | X's POSTs by status | load before → after |"
        );
        println!("|---|---:|---:|---:|---:|---:|---:|---:|---|---|");
        let mut splits = Vec::new();
        let mut kv = Vec::new();
        for r in 0..rounds {
            // Alternate which mode goes first.
            let mut order = modes.clone();
            if r % 2 == 1 {
                order.reverse();
            }
            for mode in order {
                isolation(&bin, &workflows, mode, &cfg, &mut splits, &mut kv).await?;
            }
        }
        println!("\nwhere Y's time went (server timestamps), ms:\n");
        println!("| scenario | part | p50 | p99 |");
        println!("|---|---|---:|---:|");
        for s in splits {
            println!("{s}");
        }
        println!(
            "\nchat lease writes (MZ_OWNERS: claims, renewals, releases) per phase, Y's drain included:\n"
        );
        println!("| scenario | writes | s | writes/s |");
        println!("|---|---:|---:|---:|");
        for s in kv {
            println!("{s}");
        }
    }
    if only("detection") {
        let cfg = DetectCfg {
            rounds: if smoke {
                1
            } else {
                env_num("BENCH_DETECT_ROUNDS", 5)?
            },
            for_secs: env_num("BENCH_FOR_SECS", 2)? as f64,
            evaluate_ms: env_num("BENCH_OPS_EVALUATE_MS", 500)?,
        };
        println!("\ndetection: {} round(s)\n", cfg.rounds);
        detection(&bin, &workflows, &tools, &cfg).await?;
    }
    let _ = std::fs::remove_dir_all(&workflows);
    Ok(())
}
