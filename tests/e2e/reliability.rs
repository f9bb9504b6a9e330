//! Nothing acknowledged is ever lost (issue 9): a restarted nats-server heals without restarting
//! any role and strands no command; a chat's commands take effect in the order they were
//! accepted, even when a message overtakes its session's start on another worker.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Value, json};

use crate::fleet::{Fleet, free_port, next_frame, send_json};

/// Reads frames until `run.completed`; returns them all (durable and ephemeral).
async fn until_completed(ws: &mut crate::fleet::Ws) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let f = next_frame(ws).await;
        let done = f["type"] == "run.completed";
        out.push(f);
        if done {
            return out;
        }
    }
}

async fn status(http: &reqwest::Client, url: &str) -> Option<u16> {
    http.get(url)
        .timeout(Duration::from_secs(3))
        .send()
        .await
        .ok()
        .map(|r| r.status().as_u16())
}

/// Messages left on the fleet's `MZ_CMD` (acknowledged commands are removed from the work queue).
async fn commands_left(fleet: &Fleet) -> u64 {
    let client = async_nats::connect(&fleet.servers.nats_url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let name = mozaiks_events::subjects::Subjects::new(&fleet.servers.namespace).name("MZ_CMD");
    let mut stream = js.get_stream(name).await.unwrap();
    stream.info().await.unwrap().state.messages
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_commands_survive_a_nats_restart_and_readiness_tells_the_truth() {
    let mut fleet = Fleet::start(1).await;
    let worker_health = free_port();
    let addr = format!("127.0.0.1:{worker_health}");
    fleet.spawn_with("worker", None, &[("MOZAIKS_HEALTH_LISTEN", addr.as_str())]);
    let worker_ready = format!("http://{addr}/health/ready");
    let gateway_ready = format!("{}/health/ready", fleet.gateways[0]);
    let http = reqwest::Client::new();
    fleet
        .eventually("the worker's readiness", || async {
            (status(&http, &worker_ready).await == Some(200)).then_some(())
        })
        .await;

    let token = Fleet::token("restart-user", "default", &["user"]);
    let mut acked = Vec::new();
    for i in 0..10 {
        acked.push(
            fleet
                .session(0, &token, "hello", Some(&format!("before {i}")))
                .await,
        );
    }

    fleet.servers.kill_nats().unwrap();
    // While NATS is down, no role can work, and none says it is ready.
    fleet
        .eventually("the gateway to turn not ready", || async {
            (status(&http, &gateway_ready).await != Some(200)).then_some(())
        })
        .await;
    fleet
        .eventually("the worker to turn not ready", || async {
            (status(&http, &worker_ready).await != Some(200)).then_some(())
        })
        .await;
    // Nothing is acknowledged meanwhile.
    let body = json!({"app_id": "default", "workflow_name": "hello", "message": "during"});
    let (s, refusal) = fleet.post_session(0, &token, body).await;
    assert!(s >= 500, "a session start acknowledged with NATS down: {s}");
    // A 503 keeps its stable code and says what failed in general terms, never the internal
    // error's text (the server's address, async-nats's message): that goes to the log.
    assert_eq!(s, 503, "{refusal}");
    assert_eq!(refusal["error"]["code"], "unavailable", "{refusal}");
    let message = refusal["error"]["message"].as_str().unwrap_or_default();
    assert!(message.ends_with("is unavailable; retry"), "{refusal}");
    for internal in [
        "127.0.0.1",
        "nats",
        "timed out",
        "connection",
        "disconnected",
    ] {
        assert!(
            !refusal.to_string().to_lowercase().contains(internal),
            "{refusal}"
        );
    }

    // The server comes back with its file store, without its memory buckets.
    fleet.servers.restart_nats().await.unwrap();
    // Sessions started right after the restart, while the roles are still healing.
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..20 {
        loop {
            let body = json!({
                "app_id": "default",
                "workflow_name": "hello",
                "message": format!("after {i}"),
            });
            let (s, ticket) = fleet.post_session(0, &token, body).await;
            if s == 201 {
                acked.push(ticket);
                break;
            }
            assert!(
                Instant::now() < deadline,
                "no session start acknowledged after the restart: {s} {ticket}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Every acknowledged start produced its run, whichever worker took it. A command in a
    // worker's hands when NATS died is redelivered after `ack_wait` (30 s: its nak was lost with
    // the connection), so a chat may take that long; the client reconnects with `after` and reads on.
    for (i, ticket) in acked.iter().enumerate() {
        let mut frames: Vec<Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(90);
        while !frames.iter().any(|f| f["type"] == "run.completed") {
            assert!(
                Instant::now() < deadline,
                "session {i} never completed: {frames:#?}"
            );
            let mut ws = fleet.connect(0, ticket, frames.len() as u64).await;
            while let Ok(Some(Ok(m))) =
                tokio::time::timeout(Duration::from_secs(10), ws.next()).await
            {
                let tokio_tungstenite::tungstenite::Message::Text(t) = m else {
                    continue;
                };
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                assert_ne!(f["type"], "error", "session {i} got an error: {f}");
                let done = f["type"] == "run.completed";
                if !f["seq"].is_null() {
                    frames.push(f);
                }
                if done {
                    break;
                }
            }
        }
        assert!(
            frames.iter().all(|f| f["type"] != "error"),
            "session {i} got an error: {frames:#?}"
        );
        assert!(
            frames.iter().any(|f| f["type"] == "message.user"),
            "session {i} lost its message: {frames:#?}"
        );
    }
    // Nothing is stranded in the command queue.
    fleet
        .eventually("MZ_CMD to be empty", || async {
            (commands_left(&fleet).await == 0).then_some(())
        })
        .await;
    // Every role healed without a restart.
    fleet
        .eventually("every role ready again", || async {
            (status(&http, &gateway_ready).await == Some(200)
                && status(&http, &worker_ready).await == Some(200))
            .then_some(())
        })
        .await;
    for p in &mut fleet.procs {
        assert!(
            p.child.try_wait().unwrap().is_none(),
            "{} exited after the NATS restart",
            p.role
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_sent_right_after_connect_is_never_refused_on_a_two_worker_fleet() {
    let mut fleet = Fleet::start(2).await;
    fleet.spawn("worker", None);
    let fleet = &fleet;
    let results: Vec<Result<(), String>> = futures::stream::iter(0..200)
        .map(|i| async move {
            let token = Fleet::token(&format!("order-{i}"), "default", &["user"]);
            let ticket = fleet.session(i % 2, &token, "hello", None).await;
            // What a chat UI does: connect and send at once, to the other replica.
            let mut ws = fleet.connect((i + 1) % 2, &ticket, 0).await;
            let id = format!("m-{i}");
            send_json(
                &mut ws,
                json!({"type": "user.message", "text": format!("hi {i}"), "client_msg_id": id}),
            )
            .await;
            let mut frames = until_completed(&mut ws).await;
            // The ack is ephemeral and may trail the run's events by a hair.
            while !frames.iter().any(|f| f["type"] == "ack") {
                frames.push(next_frame(&mut ws).await);
            }
            if let Some(e) = frames.iter().find(|f| f["type"] == "error") {
                return Err(format!("session {i} refused: {e}"));
            }
            let acked = frames.iter().any(|f| f["type"] == "ack");
            let stored = frames
                .iter()
                .any(|f| f["type"] == "message.user" && f["data"]["client_msg_id"] == id);
            if !(acked && stored) {
                return Err(format!(
                    "session {i}: ack {acked}, stored {stored}: {frames:#?}"
                ));
            }
            Ok(())
        })
        .buffer_unordered(16)
        .collect()
        .await;
    let failures: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    assert!(
        failures.is_empty(),
        "{} of 200 failed: {:#?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_instance_on_a_busy_port_fails_before_joining_the_fleet() {
    let mut fleet = Fleet::start(1).await;
    let busy = fleet.gateways[0]
        .rsplit(':')
        .next()
        .unwrap()
        .parse::<u16>()
        .unwrap();
    let i = fleet.spawn("all", Some(busy));
    let started = Instant::now();
    let status = loop {
        if let Some(s) = fleet.procs[i].child.try_wait().unwrap() {
            break s;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a second instance on a busy port keeps running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(&fleet.procs[i].log).unwrap();
    assert!(log.contains("cannot listen"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    // It never joined: the running replica does not count a phantom gateway or worker.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (s, ready) = fleet.get(0, "/health/ready", "").await;
    assert_eq!(s, 200, "{ready}");
    assert_eq!(ready["fleet"]["gateways"], 1, "{ready}");
    assert_eq!(ready["fleet"]["workers"], 1, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn roles_whose_servers_are_gone_stop_promptly_on_sigterm() {
    let mut fleet = Fleet::start(1).await;
    let token = Fleet::token("stop-user", "default", &["user"]);
    let ticket = fleet.session(0, &token, "hello", Some("hi")).await;
    let mut ws = fleet.connect(0, &ticket, 0).await;
    until_completed(&mut ws).await;
    fleet.servers.kill_nats().unwrap();
    fleet.servers.kill_mongo().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for role in ["projector", "billing", "worker"] {
        let p = fleet.procs.iter_mut().find(|p| p.role == role).unwrap();
        let pid = p.child.id().to_string();
        let sent = Instant::now();
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap();
        let status = loop {
            if let Some(s) = p.child.try_wait().unwrap() {
                break s;
            }
            assert!(
                sent.elapsed() < Duration::from_secs(8),
                "{role} ignores SIGTERM with its servers gone"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let log = std::fs::read_to_string(&p.log).unwrap();
        assert!(!log.contains("panicked"), "{role}: {log}");
        eprintln!("{role} stopped in {:?} ({status})", sent.elapsed());
    }
}
