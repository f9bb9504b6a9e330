//! The ops agent over a real NATS server: workers' snapshots in `MZ_PERF` make one app a noisy
//! neighbour; the incident fires once on its subject, the throttle applies through the app
//! registry and ends at its TTL, a second agent that takes the lead over adopts the incident
//! instead of firing another, and resolves it when the condition clears.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer;
use chrono::Utc;
use futures::StreamExt;
use mozaiks_bus::Bus;
use mozaiks_bus::definitions::Definitions;
use mozaiks_bus::fleet::{ActiveRun, InstanceId, WorkerSnapshot, worker_key};
use mozaiks_control::Registry;
use mozaiks_control::lease::Leases;
use mozaiks_ops::incident::{ActionEvent, CloudEvent, Incident, Status};
use mozaiks_ops::journal::Journal;
use mozaiks_ops::{LEASE, Ops, Options};
use mozaiks_testkit::TestServers;
use serde_json::json;
use tokio::sync::watch;

async fn bus(servers: &TestServers, name: &str) -> Bus {
    let bus = Bus::connect(&servers.nats_url, &servers.namespace, name)
        .await
        .unwrap();
    bus.apply(&Definitions::embedded().unwrap()).await.unwrap();
    bus
}

fn snapshot(runs: &[(&str, u32)]) -> Vec<u8> {
    let mut active = Vec::new();
    for (app, n) in runs {
        for i in 0..*n {
            active.push(ActiveRun {
                app_id: app.to_string(),
                chat_id: format!("{app}-{i}"),
                workflow: "hello".into(),
                run_id: uuid::Uuid::now_v7(),
                started_at: Utc::now(),
                ..Default::default()
            });
        }
    }
    serde_json::to_vec(&WorkerSnapshot {
        worker_id: "w1".into(),
        started_at: Utc::now(),
        updated_at: Utc::now(),
        active_run_count: active.len(),
        active_runs: active,
        ..Default::default()
    })
    .unwrap()
}

/// Every event recorded on `filter` of `MZ_OPS`.
async fn recorded<T: serde::de::DeserializeOwned>(bus: &Bus, filter: &str) -> Vec<T> {
    let mut stream = bus.stream("MZ_OPS").await.unwrap();
    if stream.info().await.unwrap().state.messages == 0 {
        return Vec::new();
    }
    let mut c = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: bus.subjects().ops(filter),
            ..Default::default()
        })
        .await
        .unwrap();
    if c.info().await.unwrap().num_pending == 0 {
        return Vec::new();
    }
    let mut msgs = c.messages().await.unwrap();
    let mut out = Vec::new();
    while let Ok(Some(Ok(m))) = tokio::time::timeout(Duration::from_secs(2), msgs.next()).await {
        out.push(serde_json::from_slice(&m.payload).unwrap());
        if m.info().unwrap().pending == 0 {
            break;
        }
    }
    out
}

async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn start_agent(bus: &Bus, name: &str) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = watch::channel(false);
    let ops = Ops::new(
        bus.clone(),
        InstanceId::new(name),
        Options {
            evaluate_every: Duration::from_millis(200),
            ..Options::default()
        },
    );
    let h = tokio::spawn(async move {
        ops.run(async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
        .unwrap();
    });
    (tx, h)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_neighbour_fires_once_throttles_until_its_ttl_and_survives_a_takeover() {
    let servers = TestServers::start_nats().await.expect("nats");
    let bus = bus(&servers, "ops-test").await;
    let registry = Registry::open(&bus).await.unwrap();
    registry.ensure_app("x", "X", "starter").await.unwrap();
    let tier_limit = registry
        .effective_limits(&registry.get("x").unwrap())
        .max_concurrent_runs;
    let journal = Journal::open(&bus, "test").await.unwrap();
    journal
        .put_policy(
            None,
            json!({
                "rules": {"noisy_neighbour": {"for_seconds": 1, "min_total": 2}},
                "actions": {"throttle": {"ttl_seconds": 6, "max_concurrent_runs": 2}}
            }),
        )
        .await
        .unwrap();

    // A worker whose runs are 6 of app x and 2 of app y, rewritten as a live worker does.
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_PERF"))
        .await
        .unwrap();
    let (runs_tx, runs_rx) = watch::channel(vec![("x", 6u32), ("y", 2u32)]);
    let writer = tokio::spawn(async move {
        loop {
            let runs = runs_rx.borrow().clone();
            let _ = kv.put(worker_key("w1"), snapshot(&runs).into()).await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });

    let (stop_a, agent_a) = start_agent(&bus, "a");
    let firing = |bus: Bus| async move {
        recorded::<CloudEvent<Incident>>(&bus, "incident.noisy_neighbour.x")
            .await
            .into_iter()
            .filter(|e| e.data.status == Status::Firing)
            .collect::<Vec<_>>()
    };
    eventually("the incident firing", || {
        let b = bus.clone();
        async move { !firing(b).await.is_empty() }
    })
    .await;
    let fired = firing(bus.clone()).await;
    let ev = &fired[0];
    assert_eq!(ev.kind, "mozaiks.ops.incident.firing");
    assert_eq!((ev.specversion.as_str(), ev.subject.as_str()), ("1.0", "x"));
    assert_eq!(ev.data.fingerprint, "noisy_neighbour.x");
    assert_eq!(ev.data.values["share"], 0.75);
    assert_eq!(
        ev.data
            .actions
            .iter()
            .filter(|a| a.kind == "throttle")
            .count(),
        1
    );
    let incident_id = ev.data.incident_id.clone();

    // The throttle applies through the registry (as on every replica).
    eventually("the throttle in the registry", || {
        let r = registry.clone();
        async move { r.effective_limits(&r.get("x").unwrap()).max_concurrent_runs == 2 }
    })
    .await;
    // Agent a stops (gives the lease up); agent b takes the lead over and adopts the incident.
    stop_a.send(true).unwrap();
    agent_a.await.unwrap();
    let (stop_b, agent_b) = start_agent(&bus, "b");
    let leases = Leases::open(&bus, "observer").await.unwrap();
    eventually("agent b leading", || {
        let l = leases.clone();
        async move {
            l.holder_of(LEASE)
                .await
                .unwrap()
                .is_some_and(|r| r.holder.starts_with("b-"))
        }
    })
    .await;
    // Several evaluations by b while the condition still holds: no second incident.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        firing(bus.clone()).await.len(),
        1,
        "a takeover fired the incident again"
    );

    // The throttle ends at its TTL (on its own) and is recorded as expired, once.
    eventually("the throttle expired", || {
        let r = registry.clone();
        async move { r.effective_limits(&r.get("x").unwrap()).max_concurrent_runs == tier_limit }
    })
    .await;
    eventually("the expiry recorded", || {
        let b = bus.clone();
        async move {
            recorded::<CloudEvent<ActionEvent>>(&b, "action.throttle.x")
                .await
                .iter()
                .any(|e| e.data.status == "expired")
        }
    })
    .await;
    let throttles = recorded::<CloudEvent<ActionEvent>>(&bus, "action.throttle.x").await;
    assert_eq!(
        throttles
            .iter()
            .filter(|e| e.data.status == "applied")
            .count(),
        1,
        "the throttle was applied more than once"
    );

    // The flood stops: b resolves the incident a fired.
    runs_tx.send(vec![("x", 1), ("y", 2)]).unwrap();
    eventually("the incident resolved", || {
        let b = bus.clone();
        let id = incident_id.clone();
        async move {
            recorded::<CloudEvent<Incident>>(&b, "incident.noisy_neighbour.x")
                .await
                .iter()
                .any(|e| e.data.status == Status::Resolved && e.data.incident_id == id)
        }
    })
    .await;
    let listed = journal.incidents(Some("x")).await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, Status::Resolved);
    assert!(listed[0].ends_at.is_some());
    stop_b.send(true).unwrap();
    agent_b.await.unwrap();
    writer.abort();
}
