//! The three durability modes, each serving a fleet (two gateways, two workers, projector,
//! billing): development (one nats-server, JetStream's default fsync every 2 minutes), a single
//! node for production (`sync_interval: always`), and a three-node cluster with R3 streams.
//!
//! By default each mode serves a few `hello` runs (a smoke test: the configuration is taken and
//! every run completes). `MOZAIKS_FAULTS=measure` measures each mode's throughput instead:
//! `session.start` commands with a first message published straight to `MZ_CMD` (64 in flight, as
//! `benches/engine_runs.rs` does), completed runs counted on the live feed, several repetitions,
//! the median printed with the machine and its load average. The README's *Reliability* section
//! quotes those figures.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{Command, CommandEnvelope, codec};
use mozaiks_testkit::{NatsCluster, NatsOptions, TestServers};
use serde_json::Value;

use crate::harness::Harness;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durability {
    /// One nats-server with JetStream's defaults.
    Development,
    /// One nats-server with `sync_interval: always`.
    SyncAlways,
    /// Three nats-servers, every stream and bucket R3.
    Cluster,
}

impl Durability {
    fn name(self) -> &'static str {
        match self {
            Durability::Development => "development (1 node, default fsync)",
            Durability::SyncAlways => "single node, sync_interval: always",
            Durability::Cluster => "3-node cluster, R3",
        }
    }
}

/// Starts `n` runs of `hello` (64 commands in flight) and waits up to `max` for their
/// `run.completed`; returns (runs completed, seconds).
async fn throughput(bus: &Bus, n: usize, max: Duration) -> (usize, f64) {
    let mut done = bus
        .client()
        .subscribe(bus.subjects().apply("mz.live.*.*.run.completed"))
        .await
        .unwrap();
    bus.client().flush().await.unwrap();
    let chats: Vec<String> = (0..n)
        .map(|_| uuid::Uuid::now_v7().simple().to_string())
        .collect();
    let wanted: HashSet<String> = chats.iter().cloned().collect();
    let started = Instant::now();
    let publisher = {
        let bus = bus.clone();
        tokio::spawn(async move {
            futures::stream::iter(chats)
                .map(|chat_id| {
                    let bus = bus.clone();
                    async move {
                        let cmd = CommandEnvelope::new(
                            "default",
                            chat_id.clone(),
                            "durability",
                            "hello",
                            Command::StartSession {
                                context: Default::default(),
                                parent_chat_id: None,
                                message: Some("ping".into()),
                            },
                        );
                        bus.send_command(&cmd, Some(&format!("start:default:{chat_id}")))
                            .await
                    }
                })
                .buffer_unordered(64)
                .for_each(|r| async move { r.expect("publish a command") })
                .await;
        })
    };
    let mut completed = HashSet::new();
    let deadline = tokio::time::Instant::now() + max;
    while completed.len() < n {
        let Ok(Some(msg)) = tokio::time::timeout_at(deadline, done.next()).await else {
            break;
        };
        let env = codec::decode_event(&msg.payload).unwrap();
        if wanted.contains(&env.chat_id) {
            completed.insert(env.chat_id);
        }
    }
    let secs = started.elapsed().as_secs_f64();
    publisher.abort();
    (completed.len(), secs)
}

/// The machine, for the figures: CPUs, model, load average.
fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    format!(
        "{cpus} CPUs ({model}), load average {}",
        load.split(' ').take(3).collect::<Vec<_>>().join(" ")
    )
}

/// Starts the servers of `mode` and a fleet on them; returns the fleet, the NATS URL and the
/// cluster (kept alive by the caller).
async fn fleet(mode: Durability) -> (Harness, Option<NatsCluster>) {
    match mode {
        Durability::Development => {
            let servers = TestServers::start().await.expect("test servers");
            (Harness::start(servers, &[]).await, None)
        }
        Durability::SyncAlways | Durability::Cluster => {
            let (nodes, options, replicas) = if mode == Durability::Cluster {
                (3, NatsOptions::default(), "3")
            } else {
                (1, NatsOptions { sync_always: true }, "1")
            };
            let cluster = NatsCluster::start_with(nodes, options)
                .await
                .expect("nats-servers");
            let servers = TestServers::start_with_nats(&cluster.url)
                .await
                .expect("the Mongo-wire server");
            let h = Harness::start(servers, &[("MOZAIKS_STREAM_REPLICAS", replicas)]).await;
            (h, Some(cluster))
        }
    }
}

/// What the first node's `/jsz` says of its fsync policy.
async fn sync_policy(h: &Harness, cluster: Option<&NatsCluster>) -> String {
    let monitor = match cluster {
        Some(c) => c.monitor_url(0),
        // The test kit's server has no monitoring port: JetStream's defaults.
        None => return format!("JetStream defaults (NATS_URL {})", h.servers.nats_url),
    };
    let v: Value = reqwest::get(format!("{monitor}/jsz"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    format!(
        "sync_always: {}, sync_interval: {} s",
        v["config"]["sync_always"].as_bool().unwrap_or(false),
        v["config"]["sync_interval"].as_u64().unwrap_or(0) / 1_000_000_000
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_durability_mode_serves_runs() {
    let measure = std::env::var("MOZAIKS_FAULTS").is_ok_and(|v| v == "measure");
    let (runs, repeats) = if measure { (1000, 5) } else { (20, 1) };
    let mut lines = Vec::new();
    for mode in [
        Durability::Development,
        Durability::SyncAlways,
        Durability::Cluster,
    ] {
        let (h, cluster) = fleet(mode).await;
        let bus = Bus::connect(&h.servers.nats_url, &h.servers.namespace, "durability")
            .await
            .expect("NATS");
        let policy = sync_policy(&h, cluster.as_ref()).await;
        if mode == Durability::SyncAlways {
            assert!(policy.contains("sync_always: true"), "{policy}");
        }
        if measure {
            throughput(&bus, 200, Duration::from_secs(60)).await; // warm-up
        }
        let mut rates = Vec::new();
        for _ in 0..repeats {
            let (n, secs) = throughput(&bus, runs, Duration::from_secs(120)).await;
            assert_eq!(n, runs, "{}: {n} of {runs} runs completed", mode.name());
            rates.push(n as f64 / secs);
        }
        rates.sort_by(f64::total_cmp);
        lines.push(format!(
            "{}: median {:.0} runs/s of {repeats} x {runs} hello runs (each: {:?}); {policy}; {}; binary {}",
            mode.name(),
            rates[rates.len() / 2],
            rates.iter().map(|r| r.round()).collect::<Vec<_>>(),
            machine(),
            crate::harness::other_binary()
                .map(|p| p.display().to_string())
                .unwrap_or_else(|| "of this test build".into())
        ));
        drop(bus);
        drop(h);
        drop(cluster);
    }
    eprintln!("durability modes:\n  {}", lines.join("\n  "));
}
