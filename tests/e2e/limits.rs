//! Fleet-wide limits with two gateway replicas (and two workers): WebSockets opened on both count
//! against one `max_websockets`; `requests_per_minute` is shared among the live replicas;
//! `max_concurrent_runs` counts the runs on every worker. All are eventually consistent within
//! about 2 s (the snapshots' period), so each test waits until the fleet's view has settled
//! before asserting a refusal.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite;

use crate::fleet::*;

async fn create_app(fleet: &Fleet, app: &str, limits: Value) {
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": app, "name": app, "tier": "starter", "limits": limits})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
}

/// The sockets of `app` the gateways published in `MZ_PRESENCE`, by replica.
async fn published(fleet: &Fleet, app: &str) -> Vec<u64> {
    let bus = mozaiks_bus::Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "test")
        .await
        .unwrap();
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_PRESENCE"))
        .await
        .unwrap();
    let mut keys = kv.keys().await.unwrap();
    let mut out = Vec::new();
    use futures::StreamExt;
    while let Some(k) = keys.next().await {
        if let Some(v) = kv.get(k.unwrap()).await.unwrap() {
            let v: Value = serde_json::from_slice(&v).unwrap();
            out.push(v["sockets"][app].as_u64().unwrap_or(0));
        }
    }
    out.sort();
    out
}

/// Waits until every gateway counts `n` live gateway replicas.
async fn gateways_see(fleet: &Fleet, n: u64) {
    for gw in 0..fleet.gateways.len() {
        fleet
            .eventually("the replicas to see each other", || async {
                let r = fleet
                    .http
                    .get(format!("{}/health/ready", fleet.gateways[gw]))
                    .send()
                    .await
                    .ok()?;
                let v: Value = r.json().await.ok()?;
                (v["fleet"]["gateways"] == n).then_some(())
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websockets_on_two_replicas_count_against_one_limit_and_requests_share_one_budget() {
    let fleet = Fleet::start(2).await;
    gateways_see(&fleet, 2).await;

    // max_websockets 2: one socket on each replica, then a third is refused on both, before
    // the upgrade, with 429.
    create_app(&fleet, "socky", json!({"max_websockets": 2})).await;
    let user = Fleet::token("sam", "socky", &["user"]);
    let (s, ticket) = fleet
        .post_session(
            0,
            &user,
            json!({"app_id": "socky", "workflow_name": "hello"}),
        )
        .await;
    assert_eq!(s, 201, "{ticket}");
    let _a = fleet.connect(0, &ticket, 0).await;
    let b = fleet.connect(1, &ticket, 0).await;
    fleet
        .eventually("both replicas' sockets in MZ_PRESENCE", || async {
            (published(&fleet, "socky").await == vec![1, 1]).then_some(())
        })
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await; // the watches deliver within ms
    for gw in [0, 1] {
        match tokio_tungstenite::connect_async(fleet.ws_url(gw, &ticket, 0)).await {
            Err(tungstenite::Error::Http(resp)) => {
                assert_eq!(resp.status().as_u16(), 429, "replica {gw}");
                let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or(b"{}"))
                    .unwrap_or(Value::Null);
                assert_eq!(code(&body), "too_many_websockets", "{body}");
            }
            other => panic!("replica {gw}: a third socket was not refused: {other:?}"),
        }
    }
    // A socket closed on replica 1 frees the slot for replica 0 once its snapshot says so.
    drop(b);
    fleet
        .eventually("replica 1's socket gone from MZ_PRESENCE", || async {
            (published(&fleet, "socky").await == vec![0, 1]).then_some(())
        })
        .await;
    let _c = fleet
        .eventually("a socket on replica 0 to be admitted again", || async {
            tokio_tungstenite::connect_async(fleet.ws_url(0, &ticket, 0))
                .await
                .ok()
                .map(|(ws, _)| ws)
        })
        .await;

    // requests_per_minute 4 with two live replicas: 2 each, 4 for the fleet, not 8.
    create_app(&fleet, "ratty", json!({"requests_per_minute": 4})).await;
    let rat = Fleet::token("rat", "ratty", &["user"]);
    let body = json!({"app_id": "ratty", "workflow_name": "hello"});
    let mut accepted = 0;
    let mut refused = Vec::new();
    for i in 0..8 {
        let (s, v, retry) = fleet
            .call(i % 2, "POST", "/api/sessions", &rat, Some(body.clone()))
            .await;
        match s {
            201 => accepted += 1,
            429 => {
                assert_eq!(code(&v), "rate_limited", "{v}");
                assert!(retry.is_some());
                refused.push(i % 2);
            }
            _ => panic!("{s} {v}"),
        }
    }
    assert_eq!(accepted, 4, "the fleet admits the app's budget once");
    assert_eq!(refused.iter().filter(|&&g| g == 0).count(), 2);
    assert_eq!(refused.iter().filter(|&&g| g == 1).count(), 2);
}

/// A tool server that holds each call until the test opens the gate.
async fn gated_tool_server() -> (String, Arc<tokio::sync::Semaphore>) {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let g = gate.clone();
    let app = axum::Router::new().route(
        "/hold",
        axum::routing::get(move || {
            let g = g.clone();
            async move {
                let _ = g.acquire().await.map(|p| p.forget());
                axum::Json(json!({"status": "released"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), gate)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_concurrent_runs_counts_the_runs_of_every_worker() {
    let (tool_base, gate) = gated_tool_server().await;
    let dir = std::env::temp_dir().join(format!(
        "mozaiks-e2e-limits-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(dir.join("hold")).unwrap();
    std::fs::write(
        dir.join("hold/workflow.yaml"),
        format!(
            "name: hold
start_agent: holder
max_turns: 3
tools:
  - name: hold
    parameters: {{type: object, properties: {{q: {{type: string}}}}}}
    http: {{method: GET, url: '{tool_base}/hold', timeout_ms: 300000}}
agents:
  - name: holder
    tools: [hold]
    offline:
      tool_calls:
        - {{tool: hold, arguments: {{q: '{{input}}'}}}}
      reply: 'held {{tool.hold}}'
"
        ),
    )
    .unwrap();
    let workflows = dir.to_str().unwrap().to_string();
    // Two workers that know the pack, one run each at most (so the runs are on both), and two
    // gateways; the fleet's own worker does not know the pack and is stopped.
    let mut fleet = Fleet::start(0).await;
    let default_worker = fleet.procs.iter().position(|p| p.role == "worker").unwrap();
    fleet.procs[default_worker].child.kill().unwrap();
    fleet.procs[default_worker].child.wait().unwrap();
    let env = [
        ("MOZAIKS_WORKFLOWS_DIR", workflows.as_str()),
        ("MAX_CONCURRENT_WORKFLOWS", "1"),
    ];
    for _ in 0..2 {
        fleet.spawn_with("worker", None, &env);
    }
    for _ in 0..2 {
        fleet.add_gateway(&env).await;
    }
    create_app(&fleet, "busy", json!({"max_concurrent_runs": 2})).await;
    let user = Fleet::token("bea", "busy", &["user"]);
    let body = json!({"app_id": "busy", "workflow_name": "hold", "message": "wait"});
    for gw in [0, 1] {
        let (s, v) = fleet.post_session(gw, &user, body.clone()).await;
        assert_eq!(s, 201, "{v}");
    }
    // Both runs are in progress, one on each worker (MZ_PERF, as the ops endpoint shows it).
    let runs = fleet
        .eventually("two runs in progress on two workers", || async {
            let (s, v) = fleet
                .get(0, "/health/active-runs?app_id=busy", &root())
                .await;
            (s == 200 && v["count"] == 2).then_some(v)
        })
        .await;
    let workers: std::collections::HashSet<&str> = runs["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["worker_id"].as_str().unwrap())
        .collect();
    assert_eq!(workers.len(), 2, "{runs}");
    tokio::time::sleep(Duration::from_millis(300)).await; // the watches deliver within ms
    for gw in [0, 1] {
        let (s, v, retry) = fleet
            .call(gw, "POST", "/api/sessions", &user, Some(body.clone()))
            .await;
        assert_eq!((s, code(&v)), (429, "too_many_runs"), "replica {gw}: {v}");
        assert_eq!(retry.as_deref(), Some("2"));
    }
    // The runs end; a new session is admitted again.
    gate.add_permits(2);
    fleet
        .eventually("a session to be admitted after the runs ended", || async {
            let (s, _) = fleet.post_session(1, &user, body.clone()).await;
            (s == 201).then_some(())
        })
        .await;
    gate.add_permits(10);
    let _ = std::fs::remove_dir_all(&dir);
}
