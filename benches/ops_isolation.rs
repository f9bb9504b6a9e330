//! Isolation between apps on one worker (issue 12, benchmark "Isolation"): app X submits runs at
//! 20 times app Y's rate, more than the worker's slots can take; Y's latency from submission to
//! its run's end, with and without X, with the worker's fair slots
//! (`mozaiks_engine::worker::fair::FairSlots`, by app), with them and a reserve of one slot for
//! lingering apps (the worker's default), and with a plain FIFO semaphore (what the worker used
//! before), measured in the same run.
//!
//! The runs are simulated (a run holds a slot for `BENCH_RUN_MS`, default 20 ms) so that the
//! figure isolates the queueing policy from the model, the bus and the database: it is the
//! worker's queue, not a fleet. `cargo bench --bench ops_isolation` (or `cargo test --bench
//! ops_isolation -- --bench` for the debug build; the scheduler's own cost is microseconds
//! against milliseconds of runs). Bounded: `BENCH_SECS` per scenario (default 5).

use std::sync::Arc;
use std::time::{Duration, Instant};

use mozaiks_engine::worker::fair::FairSlots;
use tokio::sync::{Semaphore, mpsc};

#[derive(Clone)]
enum Sched {
    Fifo(Arc<Semaphore>),
    Fair(FairSlots),
}

impl Sched {
    async fn run(&self, app: &str, hold: Duration) {
        match self {
            Sched::Fifo(s) => {
                let _p = s.acquire().await.expect("open");
                tokio::time::sleep(hold).await;
            }
            Sched::Fair(s) => {
                let _p = s.acquire(app, 1).await;
                tokio::time::sleep(hold).await;
            }
        }
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Y's latencies (ms) over `secs`, with X flooding when `flood`.
async fn scenario(
    sched: Sched,
    flood: bool,
    secs: u64,
    hold: Duration,
    y_every: Duration,
) -> Vec<f64> {
    let (tx, mut rx) = mpsc::unbounded_channel::<f64>();
    let mut tasks = tokio::task::JoinSet::new();
    let end = Instant::now() + Duration::from_secs(secs);
    let x_every = y_every / 20;
    let mut y_tick = tokio::time::interval(y_every);
    let mut x_tick = tokio::time::interval(x_every);
    x_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    while Instant::now() < end {
        tokio::select! {
            _ = y_tick.tick() => {
                let (s, tx) = (sched.clone(), tx.clone());
                tasks.spawn(async move {
                    let t = Instant::now();
                    s.run("y", hold).await;
                    let _ = tx.send(t.elapsed().as_secs_f64() * 1000.0);
                });
            }
            _ = x_tick.tick(), if flood => {
                let s = sched.clone();
                tasks.spawn(async move { s.run("x", hold).await });
            }
        }
    }
    // Y's runs submitted before the end are counted when they finish (up to 30 s more).
    let deadline = Instant::now() + Duration::from_secs(30);
    drop(tx);
    let mut out = Vec::new();
    while let Ok(Some(v)) = tokio::time::timeout_at(deadline.into(), rx.recv()).await {
        out.push(v);
    }
    tasks.abort_all();
    out.sort_by(|a, b| a.total_cmp(b));
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let smoke = !std::env::args().any(|a| a == "--bench");
    let secs = if smoke { 1 } else { env_num("BENCH_SECS", 5) };
    let slots = env_num("BENCH_SLOTS", 4) as usize;
    let hold = Duration::from_millis(env_num("BENCH_RUN_MS", 20));
    // Y alone uses a fifth of the worker; X at 20 times Y's rate wants 4 times its capacity.
    let y_every = hold * 5 / slots as u32;
    println!(
        "ops_isolation: {slots} slots, runs of {} ms, Y every {} ms, X every {} ms, {secs} s per scenario{}",
        hold.as_millis(),
        y_every.as_millis(),
        (y_every / 20).as_millis(),
        if smoke { " (smoke)" } else { "" }
    );
    let fifo = || Sched::Fifo(Arc::new(Semaphore::new(slots)));
    let fair = || Sched::Fair(FairSlots::new(slots));
    let reserve = || Sched::Fair(FairSlots::with_policy(slots, true, 1));
    let rows = [
        ("Y alone (fair slots)", fair(), false),
        ("Y alone (FIFO)", fifo(), false),
        ("Y with X flooding, FIFO", fifo(), true),
        ("Y with X flooding, fair slots", fair(), true),
        ("Y with X flooding, fair slots + reserve 1", reserve(), true),
    ];
    let mut alone_p99 = f64::NAN;
    println!("| scenario | Y runs | p50 ms | p99 ms | max ms | p99 / alone |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (name, sched, flood) in rows {
        let l = scenario(sched, flood, secs, hold, y_every).await;
        let p99 = pct(&l, 99.0);
        if alone_p99.is_nan() {
            alone_p99 = p99;
        }
        println!(
            "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.2} |",
            l.len(),
            pct(&l, 50.0),
            p99,
            l.last().copied().unwrap_or(f64::NAN),
            p99 / alone_p99
        );
    }
}
