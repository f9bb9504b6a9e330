//! WebSocket load tool (issue 3): fan-out latency through two gateway replicas against a raw
//! core-NATS floor measured in the same run, gateway RSS per idle connection, and resume catch-up
//! of 10k missed events. Loopback only, bounded in count and time.
//!
//! `cargo bench --bench wsload` (1,000 clients); `WSLOAD_CLIENTS=10000 cargo bench --bench wsload`
//! needs about 2 file descriptors per client in this process and 1 per client in each gateway
//! (`ulimit -n` ≥ 20,000 here). `WSLOAD_EVENTS` (default 300) events are published at
//! `WSLOAD_RATE` per second (default 100) across `WSLOAD_CHATS` chats (default 10).
//!
//! Memory with one chat per socket, as in a chat app (issue 16):
//! `WSLOAD_CLIENTS=10000 WSLOAD_CHATS=10000 WSLOAD_IDLE_ONLY=1 cargo bench --bench wsload` connects
//! the clients, each to its own chat, reports the gateways' RSS per idle connection and stops
//! (no fan-out or resume phase).
//!
//! `WSLOAD_BINS=/path/a,/path/b` runs gateway 1 from binary `a` and gateway 2 from `b` (an A/B of
//! two builds in one run: each replica gets half the clients and chats, round robin).

mod common;

use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{binary, free_port};
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_events::{AgentMessage, Envelope, Event};
use tokio::sync::Mutex;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "wsload-secret-that-is-long-enough-0123456789";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn percentiles(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "no samples".into();
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| v[((v.len() as f64 * q) as usize).min(v.len() - 1)];
    format!(
        "n={} p50={:.2} ms p99={:.2} ms p999={:.2} ms max={:.2} ms",
        v.len(),
        at(0.50),
        at(0.99),
        at(0.999),
        v[v.len() - 1]
    )
}

/// The raw value of a top-level `"key":` of a frame (frames are compact JSON rendered by the
/// gateway: `{"id":…,"seq":…,"type":…,"ts":…,"data":…}`, `data` last).
fn field<'a>(frame: &'a str, key: &str) -> Option<&'a str> {
    let head = &frame[..frame.find(",\"data\":").unwrap_or(frame.len())];
    let at = head.find(&format!("\"{key}\":"))? + key.len() + 3;
    let rest = &head[at..];
    Some(&rest[..rest.find(',').unwrap_or(rest.len())])
}

/// CPU time (user + system) a process has used, in seconds (`/proc/{pid}/stat`; "self" too).
fn cpu_secs(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after the name.
    (f.get(11).unwrap_or(&0) + f.get(12).unwrap_or(&0)) as f64 / 100.0
}

/// The machine's busy and total CPU time so far, in seconds (`/proc/stat`).
fn machine_secs() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let f: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = f.iter().sum();
    let idle = f.get(3).unwrap_or(&0.0) + f.get(4).unwrap_or(&0.0);
    ((total - idle) / 100.0, total / 100.0)
}

/// `perf record` of a process for `secs` seconds into `out` (call graphs), when `WSLOAD_PERF`
/// names an output prefix; `perf report -i <out>` shows where the gateway's CPU goes.
fn profile(pid: u32, secs: u64, out: &str) -> Option<Child> {
    Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o", out, "-p"])
        .arg(pid.to_string())
        .args(["--", "sleep"])
        .arg(secs.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("WSLOAD_PERF: cannot run perf: {e}"))
        .ok()
}

struct Gw {
    child: Child,
    base: String,
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The binary of gateway `i` (0 or 1): the `i`th of `WSLOAD_BINS` (two paths, comma-separated:
/// an A/B of two builds in one run, each replica getting the same load), else [`binary`].
fn gateway_binary(i: usize) -> std::path::PathBuf {
    match std::env::var("WSLOAD_BINS") {
        Ok(list) if !list.is_empty() => {
            let bins: Vec<&str> = list.split(',').collect();
            assert_eq!(bins.len(), 2, "WSLOAD_BINS takes two binaries");
            let p = std::path::PathBuf::from(bins[i]);
            assert!(p.is_file(), "WSLOAD_BINS: {} is not a file", p.display());
            p
        }
        _ => binary().expect("the mozaiks binary"),
    }
}

fn spawn_gateway(servers: &mozaiks_testkit::TestServers, i: usize) -> Gw {
    let port = free_port();
    let bin = gateway_binary(i);
    println!("gateway {}: {}", i + 1, bin.display());
    let child = common::mozaiks(&bin, servers)
        .arg("gateway")
        .env("JWT_SECRET", SECRET)
        .env(
            "MOZAIKS_WORKFLOWS_DIR",
            concat!(env!("CARGO_MANIFEST_DIR"), "/workflows"),
        )
        .env("MOZAIKS_LISTEN", format!("127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn mozaiks gateway");
    Gw {
        child,
        base: format!("127.0.0.1:{port}"),
    }
}

async fn wait_ready(base: &str) {
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if let Ok(r) = http.get(format!("http://{base}/health/ready")).send().await
            && r.status() == 200
        {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("gateway {base} not ready");
}

fn envelope(chat: &str, seq: u64, text: &str) -> Envelope {
    Envelope {
        v: 1,
        event_id: uuid::Uuid::now_v7(),
        app_id: "default".into(),
        chat_id: chat.into(),
        user_id: "load".into(),
        workflow: "hello".into(),
        seq,
        ts: chrono::Utc::now(),
        parent_chat_id: None,
        causation_id: None,
        event: Event::AgentMessage(AgentMessage {
            run_id: uuid::Uuid::nil(),
            step: 0,
            agent: "load".into(),
            text: text.into(),
            structured: None,
        }),
    }
}

fn ws_url(auth: &mozaiks_auth::Auth, base: &str, chat: &str, user: &str, after: u64) -> String {
    let (token, _) = auth.mint_runtime("default", user, chat, "hello").unwrap();
    format!("ws://{base}/ws/hello/default/{chat}/{user}?token={token}&after={after}")
}

#[tokio::main]
async fn main() {
    let clients = env_usize("WSLOAD_CLIENTS", 1000);
    let events = env_usize("WSLOAD_EVENTS", 300);
    let rate = env_usize("WSLOAD_RATE", 100).max(1);
    let chat_count = env_usize("WSLOAD_CHATS", 10).clamp(1, clients.max(1));
    let idle_only = std::env::var("WSLOAD_IDLE_ONLY").is_ok_and(|v| v == "1");
    let servers = mozaiks_testkit::TestServers::start()
        .await
        .expect("servers");
    let gws = [spawn_gateway(&servers, 0), spawn_gateway(&servers, 1)];
    for g in &gws {
        wait_ready(&g.base).await;
    }
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, "wsload")
        .await
        .unwrap();
    let auth = mozaiks_auth::Auth::new(mozaiks_auth::Config::hs256(SECRET, false)).unwrap();
    let chats: Vec<String> = (0..chat_count).map(|i| format!("load{i}")).collect();
    // One event per chat, so every client connects at the head and goes straight to live.
    let mut heads: Vec<(u64, u64)> = futures::stream::iter(&chats)
        .map(|c| {
            let bus = bus.clone();
            async move {
                let a = bus.append(&envelope(c, 1, "start"), 0).await.unwrap();
                (1, a.stream_seq)
            }
        })
        .buffered(64)
        .collect()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_before: Vec<u64> = gws.iter().map(|g| rss_kib(g.child.id())).collect();

    // Connect the clients, round robin over replicas and chats.
    let latencies = Arc::new(Mutex::new(Vec::<f64>::with_capacity(
        clients * events / chat_count,
    )));
    let started = Instant::now();
    let mut sockets = Vec::with_capacity(clients);
    for i in 0..clients {
        let url = ws_url(
            &auth,
            &gws[i % 2].base,
            &chats[i % chat_count],
            &format!("u{i}"),
            1,
        );
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("connect");
        sockets.push(ws);
    }
    let connect_secs = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_idle: Vec<u64> = gws.iter().map(|g| rss_kib(g.child.id())).collect();
    let per_conn: Vec<f64> = rss_idle
        .iter()
        .zip(&rss_before)
        .map(|(a, b)| (a.saturating_sub(*b)) as f64 * 2.0 / clients as f64)
        .collect();
    println!(
        "connected {clients} clients to {chat_count} chats in {connect_secs:.1} s; gateway RSS before {rss_before:?} KiB, idle {rss_idle:?} KiB => {:.1} / {:.1} KiB per idle connection; load average {}",
        per_conn[0],
        per_conn[1],
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
    );
    if idle_only {
        return;
    }

    // Readers: latency = receive time - the event's ts (set just before its append).
    let expected_per_client = events / chat_count;
    let mut readers = Vec::with_capacity(clients);
    for mut ws in sockets {
        let lat = latencies.clone();
        readers.push(tokio::spawn(async move {
            let mut got = 0;
            let mut mine = Vec::with_capacity(expected_per_client);
            while got < expected_per_client {
                match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
                    Ok(Some(Ok(Message::Text(t)))) => {
                        let now = chrono::Utc::now();
                        // Only `seq` and `ts` are needed: a full JSON parse per frame would make
                        // the load generator, not the gateways, the bottleneck.
                        let t = t.as_str();
                        if field(t, "seq").is_none_or(|s| s == "null") {
                            continue;
                        }
                        let ts: chrono::DateTime<chrono::Utc> =
                            field(t, "ts").unwrap().trim_matches('"').parse().unwrap();
                        mine.push((now - ts).num_microseconds().unwrap_or(0) as f64 / 1000.0);
                        got += 1;
                    }
                    Ok(Some(Ok(_))) => {}
                    _ => break,
                }
            }
            lat.lock().await.extend(mine);
            ws
        }));
    }

    // Floor: core NATS pub→sub, one subscriber per chat, same rate, same process.
    let floor = {
        let client = bus.client().clone();
        let subject = |c: &str| format!("{}floor.{c}", bus.subjects().prefix());
        let mut subs = Vec::new();
        for c in &chats {
            subs.push(client.subscribe(subject(c)).await.unwrap());
        }
        client.flush().await.unwrap();
        let collector = tokio::spawn(async move {
            let mut all = futures::stream::select_all(subs);
            let mut v = Vec::new();
            while v.len() < events {
                match tokio::time::timeout(Duration::from_secs(10), all.next()).await {
                    Ok(Some(m)) => {
                        let sent: i64 = std::str::from_utf8(&m.payload).unwrap().parse().unwrap();
                        let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
                        v.push((now - sent) as f64 / 1e6);
                    }
                    _ => break,
                }
            }
            v
        });
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
        for i in 0..events {
            tick.tick().await;
            let now = chrono::Utc::now().timestamp_nanos_opt().unwrap();
            client
                .publish(subject(&chats[i % chat_count]), now.to_string().into())
                .await
                .unwrap();
        }
        collector.await.unwrap()
    };

    // Through the gateways: appended to the log at the same rate.
    let perf_prefix = std::env::var("WSLOAD_PERF").ok();
    let mut perf = perf_prefix.as_deref().and_then(|p| {
        profile(
            gws[0].child.id(),
            (events / rate) as u64 + 1,
            &format!("{p}-fanout.data"),
        )
    });
    let cpu_before: Vec<f64> = gws
        .iter()
        .map(|g| cpu_secs(&g.child.id().to_string()))
        .chain([cpu_secs("self")])
        .collect();
    let (busy_before, total_before) = machine_secs();
    let fanout_started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    for i in 0..events {
        tick.tick().await;
        let c = i % chat_count;
        let (seq, ss) = heads[c];
        let a = bus
            .append(&envelope(&chats[c], seq + 1, "fan-out"), ss)
            .await
            .unwrap();
        heads[c] = (seq + 1, a.stream_seq);
    }
    let mut sockets = Vec::new();
    for r in readers {
        sockets.push(r.await.unwrap());
    }
    let fanout_secs = fanout_started.elapsed().as_secs_f64();
    let (busy_after, total_after) = machine_secs();
    let cpu: Vec<f64> = gws
        .iter()
        .map(|g| cpu_secs(&g.child.id().to_string()))
        .chain([cpu_secs("self")])
        .zip(&cpu_before)
        .map(|(a, b)| a - b)
        .collect();
    println!(
        "CPU during the fan-out ({fanout_secs:.1} s): machine {:.0}% busy ({} cores); cores used: gateway 1 {:.2}, gateway 2 {:.2}, load generator (clients + publisher) {:.2}",
        100.0 * (busy_after - busy_before) / (total_after - total_before).max(0.01),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        cpu[0] / fanout_secs,
        cpu[1] / fanout_secs,
        cpu[2] / fanout_secs,
    );
    if let Some(p) = perf.as_mut() {
        let _ = p.wait();
    }
    let lat = std::mem::take(&mut *latencies.lock().await);
    let delivered = lat.len();
    println!(
        "floor (core NATS pub→sub, {events} msgs at {rate}/s): {}",
        percentiles(floor)
    );
    println!(
        "gateways (append→WebSocket, {clients} clients on 2 replicas, {events} events at {rate}/s, {} frames expected, {delivered} delivered): {}",
        clients * expected_per_client,
        percentiles(lat)
    );
    drop(sockets);

    // Resume: 10k events appended with nobody listening, then one client catches up on replica 1.
    let chat = "resume";
    let mut pos = (0u64, 0u64);
    for _ in 0..10_000 {
        let a = bus
            .append(&envelope(chat, pos.0 + 1, "missed"), pos.1)
            .await
            .unwrap();
        pos = (pos.0 + 1, a.stream_seq);
    }
    let repeats = env_usize("WSLOAD_RESUME_REPEATS", 5).max(1);
    for (label, after) in [
        ("10k missed", 0u64),
        ("1k missed of 10k", 9_000),
        ("none missed of 10k", 10_000),
    ] {
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats {
            times.push(resume_once(&auth, &gws[1].base, chat, after).await);
        }
        times.sort_by(|a, b| a.total_cmp(b));
        println!(
            "resume on the other replica, {label}: median {:.1} ms, min {:.1} ms, max {:.1} ms over {repeats} (connect + seek + replay)",
            times[times.len() / 2],
            times[0],
            times[times.len() - 1]
        );
    }
}

/// One client connects with `after` and reads to the chat's last event (10,000); milliseconds.
async fn resume_once(auth: &mozaiks_auth::Auth, base: &str, chat: &str, after: u64) -> f64 {
    let url = ws_url(auth, base, chat, "resumer", after);
    let t = Instant::now();
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let mut last = after;
    // After the last event a ping answers with a pong: the resume is complete.
    futures::SinkExt::send(&mut ws, Message::Text(r#"{"type":"ping"}"#.into()))
        .await
        .unwrap();
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(t))) => {
                let t = t.as_str();
                let seq = field(t, "seq").and_then(|s| s.parse::<u64>().ok());
                if let Some(s) = seq {
                    assert_eq!(s, last + 1);
                    last = s;
                }
                if last == 10_000
                    && (after == 10_000
                        || seq == Some(10_000)
                        || field(t, "type") == Some("\"pong\""))
                {
                    break;
                }
            }
            Some(Ok(_)) => {}
            other => panic!("resume socket ended: {other:?}"),
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0;
    let _ = futures::SinkExt::close(&mut ws).await;
    ms
}
