//! A three-node NATS cluster on loopback with R3 streams and buckets
//! (`MOZAIKS_STREAM_REPLICAS=3`): the node leading the event log is killed under load; the fleet
//! keeps serving and loses nothing; the node comes back and catches up.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use mozaiks_bus::Bus;
use mozaiks_testkit::{NatsCluster, TestServers};
use serde_json::Value;

use crate::Mode;
use crate::checks::{self, Report};
use crate::harness::Harness;
use crate::load::{self, Shared};
use crate::matrix::{finish_load, serving};

/// The streams whose replicas must agree once the node is back.
const STREAMS: [&str; 3] = ["MZ_EVT", "MZ_CMD", "MZ_USAGE"];

/// Per stream of the namespace, what node `i` holds: (messages, last_seq).
async fn node_state(
    http: &reqwest::Client,
    cluster: &NatsCluster,
    i: usize,
    namespace: &str,
) -> Result<BTreeMap<String, (u64, u64)>, String> {
    let url = format!("{}/jsz?streams=true", cluster.monitor_url(i));
    let v: Value = http
        .get(&url)
        .send()
        .await
        .map_err(|e| e.to_string())?
        .json()
        .await
        .map_err(|e| e.to_string())?;
    let mut out = BTreeMap::new();
    for account in v["account_details"].as_array().into_iter().flatten() {
        for s in account["stream_detail"].as_array().into_iter().flatten() {
            let name = s["name"].as_str().unwrap_or_default();
            if let Some(base) = STREAMS
                .iter()
                .find(|b| name == format!("{namespace}_{b}") || name == **b)
            {
                out.insert(
                    base.to_string(),
                    (
                        s["state"]["messages"].as_u64().unwrap_or(0),
                        s["state"]["last_seq"].as_u64().unwrap_or(0),
                    ),
                );
            }
        }
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_node_cluster_loses_nothing_when_a_node_dies_and_catches_it_up() {
    let mode = Mode::from_env();
    let started = Instant::now();
    let mut cluster = NatsCluster::start(3)
        .await
        .expect("a three-node NATS cluster");
    let servers = TestServers::start_with_nats(&cluster.url)
        .await
        .expect("the Mongo-wire server");
    let namespace = servers.namespace.clone();
    let mut h = Harness::start(servers, &[("MOZAIKS_STREAM_REPLICAS", "3")]).await;
    let bus = Bus::connect(&cluster.url, &namespace, "faults-cluster")
        .await
        .expect("NATS");
    let mut report = Report::default();

    // Every stream is replicated on the three nodes.
    for base in STREAMS {
        let mut s = bus.stream(base).await.expect("stream");
        let info = s.info().await.expect("stream info");
        let replicas = info.cluster.as_ref().map(|c| c.replicas.len()).unwrap_or(0);
        assert_eq!(
            (info.config.num_replicas, replicas),
            (3, 2),
            "{base} is not R3 on the cluster: {:?}",
            info.cluster
        );
    }

    let mut plan = mode.plan;
    plan.in_flight = plan.in_flight.min(10);
    let shared = Shared::new(h.gateway_urls());
    let load = tokio::spawn(load::run(shared.clone(), plan));
    tokio::time::sleep(mode.dwell).await;

    // Kill the node that leads the event log.
    let leader = {
        let mut s = bus.stream("MZ_EVT").await.expect("MZ_EVT");
        let info = s.info().await.expect("MZ_EVT info");
        let name = info
            .cluster
            .as_ref()
            .and_then(|c| c.leader.clone())
            .expect("MZ_EVT has a leader");
        cluster
            .node_index(&name)
            .expect("the leader is one of ours")
    };
    let before = shared.runs_ended.load(std::sync::atomic::Ordering::Relaxed);
    cluster.kill_node(leader).expect("kill the leader");
    let killed_at = started.elapsed().as_secs_f64();
    // The fleet keeps serving on two nodes.
    if !serving(&shared, before, plan.in_flight, Duration::from_secs(60)).await {
        report.failures.push(format!(
            "fewer than {} runs ended within 60 s of killing node {leader}",
            plan.in_flight
        ));
    }
    let during = shared.runs_ended.load(std::sync::atomic::Ordering::Relaxed) - before;
    tokio::time::sleep(mode.dwell).await;
    let while_down = shared.runs_ended.load(std::sync::atomic::Ordering::Relaxed) - before;
    let restart_at = started.elapsed().as_secs_f64();
    cluster
        .restart_node(leader)
        .await
        .expect("the node restarts and reports healthy");
    let healthy_at = started.elapsed().as_secs_f64();
    tokio::time::sleep(mode.dwell).await;
    let records = finish_load(&shared, load, mode.settle).await;
    let checked = checks::run(&mut h, &records, mode.settle).await;
    report.failures.extend(checked.failures);
    report.facts.extend(checked.facts);

    // The node caught up: each of the three holds the same messages up to the same sequence.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let states = loop {
        let mut states = Vec::new();
        for i in 0..cluster.len() {
            states.push(node_state(&http, &cluster, i, &namespace).await);
        }
        let agree = states.iter().all(
            |s| matches!((s, &states[0]), (Ok(a), Ok(b)) if a == b && a.len() == STREAMS.len()),
        );
        if agree || Instant::now() > deadline {
            break states;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let agree = states
        .iter()
        .all(|s| matches!((s, &states[0]), (Ok(a), Ok(b)) if a == b && a.len() == STREAMS.len()));
    if !agree {
        report.failures.push(format!(
            "the nodes' replicas differ after the restart (stream: (messages, last_seq)): {states:?}"
        ));
    }
    report.facts.push(format!(
        "node {leader} (MZ_EVT's leader) killed at {killed_at:.1} s; {during} runs ended before the first check, {while_down} while it was down; restarted at {restart_at:.1} s, healthy at {healthy_at:.1} s; replicas per node: {:?}",
        states.first()
    ));
    if !report.failures.is_empty() {
        report.facts.push(crate::disk_space());
        report.facts.push(format!("process logs:\n{}", h.logs()));
    }
    report.assert_clean("three-node cluster");
}
