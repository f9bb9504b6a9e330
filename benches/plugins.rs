//! Plugins: the sandbox's costs in process, and `POST /api/execute/{plugin}` through a real
//! `mozaiks all` process (see benches/README.md, "Plugins").
//!
//! `cargo bench --bench plugins`
//!
//! 1. In process (`mozaiks_plugins::Sandbox`, no I/O): compiling the shipped modules (`echo`,
//!    `todo`) with a fresh engine each time; one call of an empty module (a fresh store and
//!    instance, fuel and the epoch deadline set, `run()` returning 0: the floor of every call);
//!    one call of `echo` with a 100-byte input (instantiate, copy in, copy out, parse).
//! 2. Over HTTP: nats-server and the Mongo-wire server (test kit), `mozaiks all`, a user token;
//!    `POST /api/execute/echo {"n": i}` sequentially, then from `BENCH_CLIENTS` concurrent
//!    clients (default 4: one app runs at most 4 calls at once per replica), each for
//!    `BENCH_MAX_SECS` seconds (default 10).
//!
//! Without `--bench` (e.g. `cargo test --benches`) every part does a few calls as a smoke test.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use common::{
    ChildGuard, binary, env_num, free_port, mint_token, mozaiks_dev, pct, sorted, wait_ready,
};
use mozaiks_plugins::{CallContext, Limits, Sandbox};
use mozaiks_testkit::TestServers;
use serde_json::json;

const EMPTY: &str =
    r#"(module (memory (export "memory") 1) (func (export "run") (result i32) (i32.const 0)))"#;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn summary(label: &str, samples_us: Vec<f64>, elapsed: Duration) {
    let n = samples_us.len();
    let s = sorted(samples_us);
    let mean = s.iter().sum::<f64>() / n as f64;
    println!(
        "{label:<40} n={n:<7} {:>9.0} calls/s  mean {mean:>8.1} µs  p50 {:>8.1} µs  p99 {:>8.1} µs  max {:>8.1} µs",
        n as f64 / elapsed.as_secs_f64(),
        pct(&s, 50.0),
        pct(&s, 99.0),
        s[n - 1],
    );
}

fn in_process(full: bool) -> anyhow::Result<()> {
    let dir = common::manifest_dir().join("plugins");
    for name in ["echo", "todo"] {
        let file = dir.join(name).join(format!("{name}.wat"));
        let bytes = std::fs::read(&file).with_context(|| file.display().to_string())?;
        let runs = if full { 10 } else { 1 };
        let mut times = Vec::new();
        for _ in 0..runs {
            let sb = Sandbox::new()?;
            let t = Instant::now();
            sb.compile(&bytes)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let s = sorted(times);
        println!(
            "compile {name:<32} n={runs:<7} median {:>6.2} ms  max {:>6.2} ms  ({} bytes of WAT)",
            pct(&s, 50.0),
            s[s.len() - 1],
            bytes.len()
        );
    }
    let sb = Sandbox::new()?;
    let iters = if full {
        env_num("BENCH_ITERS", 20_000)? as usize
    } else {
        20
    };
    let ctx = CallContext {
        app_id: "bench".into(),
        user_id: "u".into(),
        plugin: "p".into(),
        request_id: "r".into(),
        http_allowlist: Vec::new(),
    };
    let echo = std::fs::read(dir.join("echo/echo.wat"))?;
    let input = serde_json::to_vec(&json!({"text": "x".repeat(80), "n": 1}))?;
    for (label, module) in [
        ("call: empty module (instantiation)", EMPTY.as_bytes()),
        ("call: echo, 100-byte input", &echo[..]),
    ] {
        let compiled = sb.compile(module)?;
        let mut samples = Vec::with_capacity(iters);
        let started = Instant::now();
        for _ in 0..iters {
            let t = Instant::now();
            sb.run(
                &compiled,
                input.clone(),
                ctx.clone(),
                Limits::default(),
                None,
            )
            .map_err(|f| anyhow::anyhow!("{}", f.error))?;
            samples.push(micros(t.elapsed()));
        }
        summary(label, samples, started.elapsed());
    }
    Ok(())
}

async fn over_http(full: bool) -> anyhow::Result<()> {
    let servers = TestServers::start().await?;
    let bin = binary()?;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let log = std::env::temp_dir().join(format!("mozaiks-bench-plugins-{port}.log"));
    let out = std::fs::File::create(&log)?;
    let child = mozaiks_dev(&bin, &servers)
        .arg("all")
        .env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"))
        .env(
            "MOZAIKS_PLUGINS_DIR",
            common::manifest_dir().join("plugins"),
        )
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
    let token = mint_token(&bin, &servers, "bench-user", "user")?;
    let url = format!("{base}/api/execute/echo");
    let call = |http: reqwest::Client, url: String, token: String, n: u64| async move {
        let t = Instant::now();
        let r = http
            .post(&url)
            .bearer_auth(&token)
            .json(&json!({"n": n}))
            .send()
            .await?;
        let status = r.status();
        let body: serde_json::Value = r.json().await?;
        ensure!(status == 200 && body["n"] == n, "{status} {body}");
        Ok::<_, anyhow::Error>(micros(t.elapsed()))
    };
    // Warm-up: the first call of a module on a replica compiles nothing (packs are compiled at
    // start), but the connection pool and the registry's view warm up.
    for n in 0..20 {
        call(http.clone(), url.clone(), token.clone(), n).await?;
    }
    let secs = if full {
        env_num("BENCH_MAX_SECS", 10)?
    } else {
        1
    };
    let max_calls = if full { u64::MAX } else { 20 };
    let window = Duration::from_secs(secs);

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut n = 0;
    while started.elapsed() < window && n < max_calls {
        samples.push(call(http.clone(), url.clone(), token.clone(), n).await?);
        n += 1;
    }
    summary("http: echo, 1 client", samples, started.elapsed());

    let clients = if full {
        env_num("BENCH_CLIENTS", 4)?
    } else {
        2
    };
    let started = Instant::now();
    let all = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, url, token, all) = (http.clone(), url.clone(), token.clone(), all.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = c * 1_000_000;
            let mut mine = Vec::new();
            while started.elapsed() < window && (mine.len() as u64) < max_calls {
                mine.push(call(http.clone(), url.clone(), token.clone(), n).await?);
                n += 1;
            }
            all.lock().expect("samples").extend(mine);
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let samples = std::mem::take(&mut *all.lock().expect("samples"));
    summary(
        &format!("http: echo, {clients} clients"),
        samples,
        started.elapsed(),
    );
    guard.finished = true;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    println!(
        "plugins bench ({}), {} logical CPUs",
        if full { "full" } else { "smoke" },
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    in_process(full)?;
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(over_http(full))
}
