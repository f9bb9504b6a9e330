//! Billing figures through real processes on loopback (issue 11; see benches/README.md):
//!
//! 1. **Billing throughput**: `BENCH_CHARGES` (default 20,000) `usage.charged` events are appended
//!    to the log (one fresh chat each) before any billing runs; then one `mozaiks billing` starts
//!    and the ledger is polled (`GET /api/usage`) until it counts them all. Reported: charges per
//!    second from the first charge counted to the last, next to the Mongo-wire server's own
//!    ceiling for the same documents measured in the same run (`insert_many` of ledger-shaped
//!    documents in batches of 256, billing's batch, with the same unique index). `BENCH_PER_RUN`
//!    charges per run (default 1: every charge its own run). `MOZAIKS_BIN` picks the binary, so
//!    two builds can be compared run after run on the same machine.
//! 2. **Enforcement delay**: with `MONETIZATION_ENABLED=true`, a charge that spends the app's
//!    whole balance is appended; a client polls the *other* gateway with `POST /api/sessions`
//!    every 2 ms until it answers 402 `credits_exhausted`. Reported: append acknowledged → first
//!    402, over `BENCH_ROUNDS` (default 30) rounds, each restored by a grant first.
//! 3. **The balance check** on the model-call path: `Wallets::check` (a map lookup in the
//!    replica's copy of `MZ_CREDITS`) timed over a million calls in this process.
//!
//! The load average is printed before and after (the machine is shared). Without `--bench`
//! (`cargo test --benches`) it runs a short smoke version.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chrono::Utc;
use common::{ChildGuard, binary, free_port};
use mozaiks_bus::Bus;
use mozaiks_events::{ENVELOPE_VERSION, Envelope, Event, UsageCharged};
use mozaiks_testkit::TestServers;
use serde_json::{Value, json};
use uuid::Uuid;

const SECRET: &str = "bench-secret-that-is-long-enough-0123456789";
const APP: &str = "metered";

fn spawn(
    bin: &Path,
    servers: &TestServers,
    role: &str,
    port: Option<u16>,
    dir: &Path,
    name: &str,
) -> anyhow::Result<ChildGuard> {
    let log: PathBuf = dir.join(format!("{name}.log"));
    let out = std::fs::File::create(&log)?;
    let mut cmd = common::mozaiks(bin, servers);
    cmd.arg(role)
        .env("JWT_SECRET", SECRET)
        .env(
            "MOZAIKS_WORKFLOWS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/workflows"),
        )
        .env("MOZAIKS_RETENTION", "off")
        .env("MONETIZATION_ENABLED", "true")
        .stdout(Stdio::from(out.try_clone()?))
        .stderr(Stdio::from(out));
    if let Some(p) = port {
        cmd.env("MOZAIKS_LISTEN", format!("127.0.0.1:{p}"));
    }
    Ok(ChildGuard {
        child: cmd.spawn().context("spawn mozaiks")?,
        log,
        finished: false,
    })
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A `usage.charged` of `credits` credits, alone in a fresh chat of `app`, for run `run_id`.
fn charge(app: &str, credits: u64, run_id: Uuid) -> Envelope {
    Envelope {
        v: ENVELOPE_VERSION,
        event_id: Uuid::now_v7(),
        app_id: app.into(),
        chat_id: Uuid::now_v7().simple().to_string(),
        user_id: "bench-user".into(),
        workflow: "hello".into(),
        seq: 1,
        ts: Utc::now(),
        parent_chat_id: None,
        causation_id: None,
        event: Event::UsageCharged(UsageCharged {
            run_id,
            step: 1,
            agent: "assistant".into(),
            model: "mozaiks-offline-1".into(),
            prompt_tokens: credits / 2,
            completion_tokens: credits - credits / 2,
            total_tokens: credits,
            purpose: None,
            credits: Some(credits),
            price: Some(mozaiks_events::ChargePrice {
                prompt: 1_000_000,
                completion: 1_000_000,
            }),
        }),
    }
}

async fn wait_ready(http: &reqwest::Client, gw: &str, dir: &Path) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(format!("{gw}/health/ready")).send().await
            && r.status() == 200
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{gw} not ready; logs in {}", dir.display());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The Mongo-wire server's operation counters (`serverStatus.opcounters`), by kind.
async fn opcounters(
    client: &mozaiks_store::mongodb::Client,
) -> anyhow::Result<std::collections::BTreeMap<String, i64>> {
    use mozaiks_store::mongodb::bson::{Bson, doc};
    let status = client
        .database("admin")
        .run_command(doc! { "serverStatus": 1 })
        .await?;
    let mut out = std::collections::BTreeMap::new();
    if let Ok(ops) = status.get_document("opcounters") {
        for (k, v) in ops {
            let n = match v {
                Bson::Int32(n) => i64::from(*n),
                Bson::Int64(n) => *n,
                Bson::Double(f) => *f as i64,
                _ => continue,
            };
            out.insert(k.clone(), n);
        }
    }
    Ok(out)
}

/// The Mongo-wire server's ceiling for ledger-shaped documents: `n` inserted with `insert_many`
/// in batches of 256 into a collection with billing's unique index. Documents per second.
async fn mongo_ceiling(servers: &TestServers, n: usize) -> anyhow::Result<f64> {
    use mozaiks_store::mongodb::bson::{self, doc};
    use mozaiks_store::mongodb::{IndexModel, options::IndexOptions};
    let client = mozaiks_store::mongodb::Client::with_uri_str(&servers.mongo_uri).await?;
    let coll = client
        .database(&format!("{}_ceiling", servers.mongo_db))
        .collection::<bson::Document>("usage_events");
    coll.create_index(
        IndexModel::builder()
            .keys(doc! {"app_id": 1, "event_id": 1})
            .options(IndexOptions::builder().unique(true).build())
            .build(),
    )
    .await?;
    let docs: Vec<bson::Document> = (0..n)
        .map(|i| {
            doc! {
                "app_id": "ceiling", "event_id": Uuid::now_v7().to_string(),
                "chat_id": format!("c{i}"), "user_id": "bench-user", "workflow": "hello",
                "run_id": Uuid::now_v7().to_string(), "step": 1i64, "agent": "assistant",
                "model": "mozaiks-offline-1", "prompt_tokens": 5i64, "completion_tokens": 5i64,
                "total_tokens": 10i64, "ts": bson::DateTime::now(), "billed_at": bson::DateTime::now(),
                "rolled": false, "credits": 10i64, "period": "20261201T000000Z", "day": "20261207",
            }
        })
        .collect();
    let started = Instant::now();
    for chunk in docs.chunks(256) {
        coll.insert_many(chunk.to_vec()).ordered(false).await?;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
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
    let (charges, rounds, checks) = if full {
        (
            env_num("BENCH_CHARGES", 20_000),
            env_num("BENCH_ROUNDS", 30),
            1_000_000u64,
        )
    } else {
        (500, 3, 10_000)
    };
    let bin = match binary() {
        Ok(b) => b,
        Err(e) if !full => {
            println!("billing: skipped ({e})");
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    println!("billing: binary {}", bin.display());
    println!("billing: load average before: {}", load_average());
    let servers = TestServers::start().await.context("test servers")?;
    let dir = std::env::temp_dir().join(format!("mz-bench-billing-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mut procs = vec![spawn(&bin, &servers, "worker", None, &dir, "worker")?];
    let mut gateways = Vec::new();
    for i in 0..2 {
        let port = free_port();
        procs.push(spawn(
            &bin,
            &servers,
            "gateway",
            Some(port),
            &dir,
            &format!("gateway-{i}"),
        )?);
        gateways.push(format!("http://127.0.0.1:{port}"));
    }
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()?;
    for gw in &gateways {
        wait_ready(&http, gw, &dir).await?;
    }
    let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(SECRET, false))?;
    let root = auth.mint_user("root", "default", &["superadmin"], 3600)?;
    let admin = auth.mint_user("ada", APP, &["admin"], 3600)?;
    let user = auth.mint_user("bench-user", APP, &["user"], 3600)?;
    let r = http
        .post(format!("{}/api/apps", gateways[0]))
        .bearer_auth(&root)
        .json(&json!({"app_id": APP, "name": "Metered", "tier": "starter",
                      "limits": {"requests_per_minute": 10_000_000,
                                 "included_credits": 1_000_000_000u64}}))
        .send()
        .await?;
    ensure!(r.status() == 201, "create app: {}", r.text().await?);
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "bench").await?;

    // 1. Throughput: the charges wait on the log, then billing starts. `BENCH_PER_RUN` charges
    // per run (1: every charge its own run, so billing writes a run per charge).
    let per_run = env_num("BENCH_PER_RUN", 1).max(1);
    let t = Instant::now();
    let mut appends = tokio::task::JoinSet::new();
    for chunk in 0..16u64 {
        let (bus, n) = (bus.clone(), charges / 16 + u64::from(chunk < charges % 16));
        appends.spawn(async move {
            let mut run = Uuid::now_v7();
            for i in 0..n {
                if i % per_run == 0 {
                    run = Uuid::now_v7();
                }
                bus.append(&charge(APP, 10, run), 0).await?;
            }
            Ok::<_, mozaiks_bus::Error>(())
        });
    }
    while let Some(r) = appends.join_next().await {
        r??;
    }
    println!(
        "billing: {charges} charges ({per_run} per run) appended in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mongo = mozaiks_store::mongodb::Client::with_uri_str(&servers.mongo_uri).await?;
    let ops_before = opcounters(&mongo).await?;
    procs.push(spawn(&bin, &servers, "billing", None, &dir, "billing")?);
    let polls = std::sync::atomic::AtomicU64::new(0);
    let counted = || async {
        polls.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let r = http
            .get(format!("{}/api/usage/{APP}", gateways[0]))
            .bearer_auth(&admin)
            .send()
            .await
            .ok()?;
        let v: Value = r.json().await.ok()?;
        v["charges"].as_u64()
    };
    // Each poll is a read of the ledger on the same Mongo-wire server: not too often, so the
    // figure is billing's and not the poller's.
    let poll_ms = env_num("BENCH_POLL_MS", 200);
    let deadline = Instant::now() + Duration::from_secs(600);
    let (mut first, mut first_n) = (None, 0);
    let last = loop {
        let n = counted().await.unwrap_or(0);
        if n > 0 && first.is_none() {
            first = Some(Instant::now());
            first_n = n;
        }
        if n >= charges {
            break Instant::now();
        }
        ensure!(
            Instant::now() < deadline,
            "billing counted {n} of {charges}"
        );
        tokio::time::sleep(Duration::from_millis(poll_ms)).await;
    };
    let rate = (charges - first_n) as f64 / (last - first.unwrap()).as_secs_f64().max(1e-6);
    let ops_after = opcounters(&mongo).await?;
    let polls = polls.load(std::sync::atomic::Ordering::Relaxed);
    let per_charge: Vec<String> = ops_after
        .iter()
        .map(|(k, v)| {
            let d = v - ops_before.get(k).copied().unwrap_or(0);
            format!("{k} {d} ({:.3}/charge)", d as f64 / charges as f64)
        })
        .collect();
    println!(
        "billing: Mongo operations while billing caught up (the server's opcounters, {polls} usage polls of the bench included): {}",
        per_charge.join(", ")
    );
    let ceiling = mongo_ceiling(&servers, charges as usize).await?;
    println!(
        "billing: throughput {rate:.0} charges/s; Mongo-wire insert_many ceiling {ceiling:.0} docs/s; ratio {:.0} %",
        100.0 * rate / ceiling
    );

    // 2. Enforcement delay: the exhausting charge on the log → a 402 on the other gateway.
    let wallet = || async {
        let r = http
            .get(format!("{}/api/apps/{APP}/credits", gateways[1]))
            .bearer_auth(&admin)
            .send()
            .await?;
        anyhow::Ok(r.json::<Value>().await?)
    };
    let session = |gw: usize| {
        let (http, url, user) = (
            http.clone(),
            format!("{}/api/sessions", gateways[gw]),
            user.clone(),
        );
        async move {
            http.post(url)
                .bearer_auth(user)
                .json(&json!({"app_id": APP, "workflow_name": "hello"}))
                .send()
                .await
                .map(|r| r.status().as_u16())
                .unwrap_or(0)
        }
    };
    let mut delays = Vec::new();
    for round in 0..rounds {
        // Service on: a grant (once the previous round's charge is in the wallet).
        if round > 0 {
            let r = http
                .post(format!("{}/api/apps/{APP}/credits", gateways[0]))
                .bearer_auth(&root)
                .json(&json!({"amount": 1000, "reason": "bench",
                              "idempotency_key": format!("round-{round}")}))
                .send()
                .await?;
            ensure!(r.status() == 201, "grant: {}", r.text().await?);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let balance = loop {
            let w = wallet().await?;
            if w["state"] != "exhausted" && session(1).await == 201 {
                break w["balance"].as_i64().unwrap_or(0);
            }
            ensure!(Instant::now() < deadline, "service not restored: {w}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        ensure!(balance > 0, "balance {balance}");
        let appended = Instant::now();
        bus.append(&charge(APP, balance as u64, Uuid::now_v7()), 0)
            .await?;
        let acked = Instant::now();
        let deadline = acked + Duration::from_secs(30);
        loop {
            if session(1).await == 402 {
                delays.push(acked.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            ensure!(Instant::now() < deadline, "no refusal within 30 s");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let _ = appended;
    }
    delays.sort_by(f64::total_cmp);
    println!(
        "billing: enforcement delay (charge acknowledged → 402 on the other gateway) n={} p50={:.1} p90={:.1} p99={:.1} max={:.1} ms",
        delays.len(),
        percentile(&delays, 50.0),
        percentile(&delays, 90.0),
        percentile(&delays, 99.0),
        delays.last().copied().unwrap_or(f64::NAN)
    );

    // 3. The balance check on the model-call path.
    let wallets = mozaiks_control::credits::Wallets::open(&bus, true).await?;
    ensure!(wallets.get(APP).is_some(), "no wallet of {APP}");
    let started = Instant::now();
    let mut refused = 0u64;
    for _ in 0..checks {
        refused += u64::from(std::hint::black_box(wallets.check(APP, "bench-user")).is_err());
    }
    let per = started.elapsed().as_secs_f64() * 1e9 / checks as f64;
    println!("billing: balance check {per:.0} ns per call ({checks} calls, {refused} refused)");
    println!("billing: load average after: {}", load_average());
    for p in &mut procs {
        p.finished = true;
    }
    Ok(())
}
