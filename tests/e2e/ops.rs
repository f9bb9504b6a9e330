//! The ops agent end to end (issue 12): real workers, two gateways, `mozaiks ops` processes, the
//! `/api/ops/*` API, with short `for` durations set through the policy API.
//!
//! - app X floods while Y runs normally → one `noisy_neighbour` incident for X on its subject, X
//!   throttled on both gateways, the throttle over at its TTL, the ops leader killed mid-incident
//!   and the incident resolved by the other replica without a duplicate;
//! - a live policy change makes the next incident pause X's runs (503 `app_paused`, Retry-After)
//!   on both gateways until a superadmin reverts it by hand;
//! - a cost spike only proposes suspending the app; nothing runs until a superadmin approves;
//! - bad bodies and queries get clear 4xx codes, and an app's admin sees only its own incidents
//!   and cannot touch the policy: checked in process, crates/gateway/tests/ops.rs.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::fleet::{Fleet, code, root};

/// A tool server whose `/hold` answers only while the gate is open.
async fn gate_server() -> (String, watch::Sender<bool>) {
    let (tx, rx) = watch::channel(false);
    let app = axum::Router::new().route(
        "/hold",
        axum::routing::get(move || {
            let mut rx = rx.clone();
            async move {
                let _ = rx.wait_for(|open| *open).await;
                axum::Json(json!({"status": "released"}))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), tx)
}

/// A workflows directory with `hold` (a run that waits on the gate's tool).
fn hold_pack(tool_base: &str) -> std::path::PathBuf {
    let dir =
        std::env::temp_dir().join(format!("mozaiks-e2e-ops-{}", uuid::Uuid::now_v7().simple()));
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
    std::fs::create_dir_all(dir.join("hello")).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/workflows/hello/workflow.yaml"),
        dir.join("hello/workflow.yaml"),
    )
    .unwrap();
    dir
}

async fn create_app(fleet: &Fleet, body: Value) {
    let (s, v, _) = fleet
        .call(0, "POST", "/api/apps", &root(), Some(body))
        .await;
    assert_eq!(s, 201, "{v}");
}

/// Every rule off but the ones a test turns on.
fn quiet_rules() -> Value {
    json!({
        "noisy_neighbour": {"enabled": false},
        "error_spike": {"enabled": false},
        "cost_spike": {"enabled": false},
        "socket_share": {"enabled": false},
        "slow_start": {"enabled": false},
    })
}

fn spawn_ops(fleet: &mut Fleet) -> usize {
    fleet.spawn_with(
        "ops",
        None,
        &[
            ("MOZAIKS_OPS_EVALUATE_MS", "200"),
            ("MOZAIKS_DRAIN_SECONDS", "1"),
        ],
    )
}

/// The next CloudEvent on `sub` of type `kind` (30 s).
async fn next_event(sub: &mut async_nats::Subscriber, kind: &str) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let m = tokio::time::timeout_at(deadline, sub.next())
            .await
            .unwrap_or_else(|_| panic!("no {kind} event within 30 s"))
            .expect("subscription ended");
        let v: Value = serde_json::from_slice(&m.payload).unwrap();
        if v["type"] == kind {
            return v;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_neighbour_is_throttled_on_every_replica_survives_a_takeover_and_a_policy_change_pauses_it()
 {
    let (tool_base, gate) = gate_server().await;
    let dir = hold_pack(&tool_base);
    let workflows = dir.to_str().unwrap().to_string();
    let env = [
        ("MOZAIKS_WORKFLOWS_DIR", workflows.as_str()),
        ("MAX_CONCURRENT_WORKFLOWS", "40"),
    ];
    let mut fleet = Fleet::start_with(2, 1, &env).await;
    let ops = [spawn_ops(&mut fleet), spawn_ops(&mut fleet)];
    for (app, name) in [("x", "X"), ("y", "Y")] {
        create_app(
            &fleet,
            json!({"app_id": app, "name": name, "tier": "business", "workflows": ["hold", "hello"],
                   "limits": {"max_concurrent_runs": 50, "requests_per_minute": 6000}}),
        )
        .await;
    }
    let mut rules = quiet_rules();
    rules["noisy_neighbour"] = json!({"enabled": true, "threshold": 0.4, "min_total": 3, "for_seconds": 1,
                                      "actions": ["throttle", "notify"]});
    let (s, v, _) = fleet
        .call(
            0,
            "PUT",
            "/api/ops/policy",
            &root(),
            Some(json!({"rules": rules, "actions": {"throttle": {"ttl_seconds": 6, "max_concurrent_runs": 2}}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["policy"]["rules"]["noisy_neighbour"]["for_seconds"], 1.0);

    let nats = async_nats::connect(&fleet.servers.nats_url).await.unwrap();
    let subjects = mozaiks_events::subjects::Subjects::new(&fleet.servers.namespace);
    let mut incidents = nats
        .subscribe(subjects.ops("incident.noisy_neighbour.x"))
        .await
        .unwrap();
    let x_user = Fleet::token("xena", "x", &["user"]);
    let y_user = Fleet::token("yuri", "y", &["user"]);
    let start = |app: &str| json!({"app_id": app, "workflow_name": "hold", "message": "wait"});
    for i in 0..5 {
        let (s, v) = fleet.post_session(i % 2, &x_user, start("x")).await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = fleet.post_session(1, &y_user, start("y")).await;
    assert_eq!(s, 201, "{v}");

    // One incident for X on its subject, a CloudEvent with what fired it and what was done.
    let firing = next_event(&mut incidents, "mozaiks.ops.incident.firing").await;
    assert_eq!(firing["specversion"], "1.0");
    assert_eq!(firing["subject"], "x");
    let data = &firing["data"];
    assert_eq!(data["rule"], "noisy_neighbour");
    assert_eq!(data["status"], "firing");
    assert_eq!(data["fingerprint"], "noisy_neighbour.x");
    assert!(data["values"]["share"].as_f64().unwrap() > 0.4, "{data}");
    assert!(!data["annotations"]["summary"].as_str().unwrap().is_empty());
    // The offline model's summary and playbook (item 6): text only, nothing executed.
    assert!(
        data["annotations"]["llm_summary"]
            .as_str()
            .unwrap()
            .contains("noisy_neighbour")
    );
    assert!(
        data["annotations"]["playbook"]
            .as_str()
            .unwrap()
            .contains("/health/active-runs?app_id=x"),
        "{data}"
    );
    let kinds: Vec<&str> = data["actions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"throttle"), "{kinds:?}");
    let incident_id = data["incident_id"].as_str().unwrap().to_string();

    // X is throttled on both gateways; Y is not.
    for gw in [0, 1] {
        fleet
            .eventually("X throttled", || async {
                let (s, v, _) = fleet
                    .call(gw, "POST", "/api/sessions", &x_user, Some(start("x")))
                    .await;
                (s == 429 && code(&v) == "too_many_runs").then_some(())
            })
            .await;
        let (s, v) = fleet.post_session(gw, &y_user, start("y")).await;
        assert_eq!(s, 201, "Y is not throttled: {v}");
    }

    // The ops leader dies mid-incident; the other replica takes over.
    let leader = fleet
        .eventually("the ops leader", || async {
            ops.iter().copied().find(|&i| {
                std::fs::read_to_string(&fleet.procs[i].log)
                    .unwrap_or_default()
                    .contains("Ops leader")
            })
        })
        .await;
    fleet.procs[leader].child.kill().unwrap();
    fleet.procs[leader].child.wait().unwrap();

    // The throttle ends at its TTL on both gateways (6 s).
    for gw in [0, 1] {
        fleet
            .eventually("X's throttle over at its TTL", || async {
                let (s, _) = fleet.post_session(gw, &x_user, start("x")).await;
                (s == 201).then_some(())
            })
            .await;
    }
    // X's runs end: the incident resolves, once, recorded by the replica that took over.
    gate.send_replace(true);
    let resolved = next_event(&mut incidents, "mozaiks.ops.incident.resolved").await;
    assert_eq!(resolved["data"]["incident_id"], incident_id.as_str());
    assert!(resolved["data"]["ends_at"].is_string());
    let (s, v) = fleet
        .get(0, "/api/ops/incidents?app_id=x&status=resolved", &root())
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["count"], 1,
        "one incident, no duplicate after the takeover: {v}"
    );
    let (_, v) = fleet.get(1, "/api/ops/actions?app_id=x", &root()).await;
    let throttles: Vec<&Value> = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == "throttle")
        .collect();
    assert_eq!(throttles.len(), 1, "{v}");
    assert_eq!(throttles[0]["status"], "expired", "{v}");
    assert_eq!(throttles[0]["max_concurrent_runs"], 2);

    // Tenants: X's admin sees X's incident, Y's admin none and cannot read it or the policy.
    let x_admin = Fleet::token("xa", "x", &["admin"]);
    let y_admin = Fleet::token("ya", "y", &["admin"]);
    let (s, v) = fleet.get(0, "/api/ops/incidents", &x_admin).await;
    assert_eq!((s, v["count"].as_u64()), (200, Some(1)), "{v}");
    let (s, v) = fleet.get(0, "/api/ops/incidents", &y_admin).await;
    assert_eq!((s, v["count"].as_u64()), (200, Some(0)), "{v}");
    let (s, v) = fleet
        .get(0, &format!("/api/ops/incidents/{incident_id}"), &x_admin)
        .await;
    assert_eq!(
        (s, v["incident_id"].as_str()),
        (200, Some(incident_id.as_str()))
    );
    let real = fleet
        .get(0, &format!("/api/ops/incidents/{incident_id}"), &y_admin)
        .await;
    let twin = fleet
        .get(
            0,
            "/api/ops/incidents/0190aaaa-0000-7000-8000-000000000000",
            &y_admin,
        )
        .await;
    assert_eq!((real.0, code(&real.1)), (404, "incident_not_found"));
    assert_eq!((real.0, code(&real.1)), (twin.0, code(&twin.1)));
    let (s, v) = fleet.get(0, "/api/ops/incidents?app_id=x", &y_admin).await;
    assert_eq!((s, code(&v)), (403, "app_mismatch"));
    let (s, v, _) = fleet
        .call(0, "PUT", "/api/ops/policy/y", &y_admin, Some(json!({})))
        .await;
    assert_eq!((s, code(&v)), (403, "superadmin_required"));

    // A live policy change: X's next incident pauses its runs instead.
    gate.send_replace(false);
    let mut rules = json!({"noisy_neighbour": {"actions": ["pause_runs", "disable_pack"]}});
    rules["noisy_neighbour"]["severity"] = json!("critical");
    let (s, v, _) = fleet
        .call(
            1,
            "PUT",
            "/api/ops/policy/x",
            &root(),
            Some(json!({"rules": rules, "actions": {"pause_runs": {"ttl_seconds": 300, "retry_after_seconds": 7}}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["policy"]["rules"]["noisy_neighbour"]["actions"],
        json!(["pause_runs", "disable_pack"])
    );
    let hello = json!({"app_id": "x", "workflow_name": "hello", "message": "hi"});
    for i in 0..5 {
        let (s, v) = fleet.post_session(i % 2, &x_user, start("x")).await;
        assert_eq!(s, 201, "{v}");
    }
    let second = next_event(&mut incidents, "mozaiks.ops.incident.firing").await;
    assert_ne!(second["data"]["incident_id"], incident_id.as_str());
    assert_eq!(second["data"]["severity"], "critical");
    for gw in [0, 1] {
        let (retry, _) = fleet
            .eventually("X paused", || async {
                let (s, v, retry) = fleet
                    .call(gw, "POST", "/api/sessions", &x_user, Some(hello.clone()))
                    .await;
                (s == 503 && code(&v) == "app_paused").then_some((retry, v))
            })
            .await;
        assert_eq!(retry.as_deref(), Some("7"));
        // X's busiest workflow is off its allowlist meanwhile.
        fleet
            .eventually("X's hold pack disabled", || async {
                let (s, v) = fleet.post_session(gw, &x_user, start("x")).await;
                (s == 403 && code(&v) == "workflow_disabled").then_some(())
            })
            .await;
        let (s, v) = fleet.post_session(gw, &y_user, start("y")).await;
        assert_eq!(s, 201, "Y is not paused: {v}");
    }
    let (_, v) = fleet
        .get(0, "/api/ops/actions?app_id=x&status=applied", &root())
        .await;
    let applied = v.clone();
    let pause = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "pause_runs")
        .unwrap_or_else(|| panic!("no pause_runs applied: {v}"))
        .clone();
    let path = format!(
        "/api/ops/actions/{}/revert",
        pause["action_id"].as_str().unwrap()
    );
    let (s, v, _) = fleet.call(0, "POST", &path, &x_admin, None).await;
    assert_eq!((s, code(&v)), (403, "superadmin_required"));
    let (s, v, _) = fleet.call(0, "POST", &path, &root(), None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("reverted")), "{v}");
    let (s, v, _) = fleet.call(1, "POST", &path, &root(), None).await;
    assert_eq!((s, code(&v)), (409, "action_not_in_force"));
    for gw in [0, 1] {
        fleet
            .eventually("X's pause reverted by hand", || async {
                let (s, _) = fleet.post_session(gw, &x_user, hello.clone()).await;
                (s == 201).then_some(())
            })
            .await;
        let (s, v) = fleet.post_session(gw, &x_user, start("x")).await;
        assert_eq!((s, code(&v)), (403, "workflow_disabled"), "still disabled");
    }
    let disabled = applied["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "disable_pack")
        .unwrap_or_else(|| panic!("no disable_pack applied: {applied}"))
        .clone();
    assert_eq!(disabled["workflow"], "hold");
    let path = format!(
        "/api/ops/actions/{}/revert",
        disabled["action_id"].as_str().unwrap()
    );
    let (s, v, _) = fleet.call(1, "POST", &path, &root(), None).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("reverted")), "{v}");
    for gw in [0, 1] {
        fleet
            .eventually("X's hold pack enabled again", || async {
                let (s, _) = fleet.post_session(gw, &x_user, start("x")).await;
                (s == 201).then_some(())
            })
            .await;
    }
    gate.send_replace(true);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cost_spike_only_proposes_and_nothing_runs_until_a_superadmin_approves() {
    let mut fleet = Fleet::start(1).await;
    spawn_ops(&mut fleet);
    create_app(
        &fleet,
        json!({"app_id": "spendy", "name": "S", "tier": "business", "workflows": ["hello"]}),
    )
    .await;
    let mut rules = quiet_rules();
    rules["cost_spike"] = json!({"enabled": true, "threshold": 3, "min_total": 1, "for_seconds": 0.5,
                                 "window_seconds": 60, "propose": ["suspend_app"], "actions": ["notify"]});
    let (s, v, _) = fleet
        .call(
            0,
            "PUT",
            "/api/ops/policy",
            &root(),
            Some(json!({"rules": rules})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let user = Fleet::token("sam", "spendy", &["user"]);
    let body = json!({"app_id": "spendy", "workflow_name": "hello", "message": "spend some tokens please"});
    for _ in 0..2 {
        let (s, v) = fleet.post_session(0, &user, body.clone()).await;
        assert_eq!(s, 201, "{v}");
    }
    let approval = fleet
        .eventually("a proposal to suspend the app", || async {
            let (_, v) = fleet
                .get(0, "/api/ops/approvals?status=approval_required", &root())
                .await;
            v["approvals"]
                .as_array()
                .and_then(|a| a.iter().find(|a| a["app_id"] == "spendy").cloned())
        })
        .await;
    assert_eq!(approval["kind"], "suspend_app");
    assert_eq!(approval["rule"], "cost_spike");
    assert_eq!(approval["executed"], false);
    let (_, v) = fleet
        .get(0, "/api/ops/incidents?app_id=spendy&status=firing", &root())
        .await;
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["incidents"][0]["proposed"][0]["kind"], "suspend_app");
    // Nothing was executed: the app is active and starts sessions.
    let (_, app, _) = fleet
        .call(0, "GET", "/api/apps/spendy", &root(), None)
        .await;
    assert_eq!(app["status"], "active");
    let (s, _) = fleet.post_session(0, &user, body.clone()).await;
    assert_eq!(s, 201);

    let id = approval["approval_id"].as_str().unwrap();
    let approve = format!("/api/ops/approvals/{id}/approve");
    let reject = format!("/api/ops/approvals/{id}/reject");
    let admin = Fleet::token("sa", "spendy", &["admin"]);
    for (path, token, body, want) in [
        (&approve, &admin, json!({}), (403, "superadmin_required")),
        (&reject, &admin, json!({}), (403, "superadmin_required")),
        (
            &approve,
            &root(),
            json!({"bogus": 1}),
            (422, "invalid_body"),
        ),
        (
            &approve,
            &root(),
            json!({"comment": "x".repeat(1001)}),
            (422, "invalid_comment"),
        ),
        (
            &reject,
            &root(),
            json!({"db_name": "x"}),
            (422, "invalid_body"),
        ),
    ] {
        let (s, v, _) = fleet.call(0, "POST", path, token, Some(body)).await;
        assert_eq!((s, code(&v)), want, "{path}: {v}");
    }
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/ops/approvals/0190aaaa-0000-7000-8000-000000000000/approve",
            &root(),
            Some(json!({})),
        )
        .await;
    assert_eq!((s, code(&v)), (404, "approval_not_found"));
    // Still nothing executed.
    let (_, app, _) = fleet
        .call(0, "GET", "/api/apps/spendy", &root(), None)
        .await;
    assert_eq!(app["status"], "active");

    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            &approve,
            &root(),
            Some(json!({"comment": "runaway spend"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["status"], "approved");
    assert_eq!(v["executed"], true);
    assert_eq!(v["decided_by"], "user:root");
    let (_, app, _) = fleet
        .call(0, "GET", "/api/apps/spendy", &root(), None)
        .await;
    assert_eq!(app["status"], "suspended");
    fleet
        .eventually("sessions refused once suspended", || async {
            let (s, v) = fleet.post_session(0, &user, body.clone()).await;
            (s == 403 && code(&v) == "app_suspended").then_some(())
        })
        .await;
    // Decided once: a second decision is refused.
    for path in [&approve, &reject] {
        let (s, v, _) = fleet.call(0, "POST", path, &root(), Some(json!({}))).await;
        assert_eq!((s, code(&v)), (409, "approval_not_pending"), "{path}");
    }
    let (_, v) = fleet
        .get(0, "/api/ops/approvals?app_id=spendy", &root())
        .await;
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["approvals"][0]["status"], "approved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_error_spike_fires_and_notifies_the_webhook() {
    // A pack whose tool always fails (nothing listens on port 1), and a webhook that records.
    let dir = std::env::temp_dir().join(format!(
        "mozaiks-e2e-ops-errors-{}",
        uuid::Uuid::now_v7().simple()
    ));
    std::fs::create_dir_all(dir.join("flaky")).unwrap();
    std::fs::write(
        dir.join("flaky/workflow.yaml"),
        "name: flaky
start_agent: caller
max_turns: 3
tools:
  - name: broken
    parameters: {type: object, properties: {q: {type: string}}}
    http: {method: GET, url: 'http://127.0.0.1:1/broken', timeout_ms: 2000}
agents:
  - name: caller
    tools: [broken]
    offline:
      tool_calls:
        - {tool: broken, arguments: {q: '{input}'}}
      reply: 'tried {tool.broken}'
",
    )
    .unwrap();
    let (hook_tx, mut hook_rx) = tokio::sync::mpsc::unbounded_channel::<Value>();
    let hook = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(v): axum::Json<Value>| {
            let tx = hook_tx.clone();
            async move {
                let _ = tx.send(v);
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook_url = format!("http://{}/hook", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, hook).await.unwrap() });

    let workflows = dir.to_str().unwrap().to_string();
    let mut fleet = Fleet::start_with(1, 1, &[("MOZAIKS_WORKFLOWS_DIR", workflows.as_str())]).await;
    spawn_ops(&mut fleet);
    create_app(
        &fleet,
        json!({"app_id": "errs", "name": "E", "tier": "business", "workflows": ["flaky"]}),
    )
    .await;
    let mut rules = quiet_rules();
    rules["error_spike"] = json!({"enabled": true, "threshold": 1, "min_total": 2, "for_seconds": 0.5,
                                  "window_seconds": 60, "actions": ["notify"]});
    let (s, v, _) = fleet
        .call(
            0,
            "PUT",
            "/api/ops/policy",
            &root(),
            Some(json!({"rules": rules, "actions": {"notify": {"webhook_url": hook_url, "format": "slack"}}})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let user = Fleet::token("eve", "errs", &["user"]);
    for _ in 0..3 {
        let (s, v) = fleet
            .post_session(
                0,
                &user,
                json!({"app_id": "errs", "workflow_name": "flaky", "message": "go"}),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let incident = fleet
        .eventually("an error_spike incident", || async {
            let (_, v) = fleet
                .get(0, "/api/ops/incidents?app_id=errs&status=firing", &root())
                .await;
            v["incidents"]
                .as_array()
                .and_then(|a| a.iter().find(|i| i["rule"] == "error_spike").cloned())
        })
        .await;
    assert!(
        incident["values"]["errors_in_window"].as_f64().unwrap() >= 2.0,
        "{incident}"
    );
    assert_eq!(incident["values"]["errors_in_previous_window"], 0.0);
    assert_eq!(incident["labels"]["rule"], "error_spike");
    // The webhook got a Slack-compatible body naming the rule and the app.
    let body = tokio::time::timeout(Duration::from_secs(10), hook_rx.recv())
        .await
        .expect("the webhook was called")
        .unwrap();
    let text = body["text"].as_str().unwrap_or_default();
    assert!(
        text.contains("error_spike") && text.contains("errs"),
        "{body}"
    );
    // The notify action is recorded, with nothing to revert.
    let (_, v) = fleet.get(0, "/api/ops/actions?app_id=errs", &root()).await;
    let notify = v["actions"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["kind"] == "notify")
        .unwrap_or_else(|| panic!("{v}"))
        .clone();
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            &format!(
                "/api/ops/actions/{}/revert",
                notify["action_id"].as_str().unwrap()
            ),
            &root(),
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (409, "action_not_in_force"));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A tool server whose `/hold` answers one call per permit.
async fn permit_server() -> (String, Arc<tokio::sync::Semaphore>) {
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

/// Waits until the chat's start is in its read model: the worker took the start (appended
/// `session.started` and the message) and its run waits for a slot (or holds one).
async fn queued(fleet: &Fleet, chat: &str, token: &str) {
    fleet
        .eventually("the chat's start taken by the worker", || async {
            let (s, v) = fleet.get(0, &format!("/api/sessions/{chat}"), token).await;
            (s == 200 && v["last_event_type"].is_string()).then_some(())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workers_slots_go_round_robin_across_apps_so_a_backlog_does_not_starve_another_app() {
    // One slot on the worker: X's five runs hold it in turn; Y's run, queued after them, gets
    // the slot after X's next run, not after X's whole backlog (first come, first served).
    let (tool_base, gate) = permit_server().await;
    let dir = hold_pack(&tool_base);
    let workflows = dir.to_str().unwrap().to_string();
    let fleet = Fleet::start_with(
        1,
        1,
        &[
            ("MOZAIKS_WORKFLOWS_DIR", workflows.as_str()),
            ("MAX_CONCURRENT_WORKFLOWS", "1"),
        ],
    )
    .await;
    for app in ["fx", "fy"] {
        create_app(
            &fleet,
            json!({"app_id": app, "name": app, "tier": "starter", "workflows": ["hold", "hello"]}),
        )
        .await;
    }
    let x = Fleet::token("xo", "fx", &["user"]);
    let y = Fleet::token("yo", "fy", &["user"]);
    let hold = json!({"app_id": "fx", "workflow_name": "hold", "message": "wait"});
    let (s, v) = fleet.post_session(0, &x, hold.clone()).await;
    assert_eq!(s, 201, "{v}");
    fleet
        .eventually("X's first run holding the slot", || async {
            let (_, v) = fleet.get(0, "/health/active-runs?app_id=fx", &root()).await;
            (v["count"] == 1).then_some(())
        })
        .await;
    let mut x_chats = Vec::new();
    for _ in 0..4 {
        let (s, v) = fleet.post_session(0, &x, hold.clone()).await;
        assert_eq!(s, 201, "{v}");
        x_chats.push(v["chat_id"].as_str().unwrap().to_string());
    }
    // X's four runs reach the worker's queue before Y's: each chat's start is in its log (the
    // worker appends it, then waits for a slot at once), so its read model has it.
    for chat in &x_chats {
        queued(&fleet, chat, &x).await;
    }
    let (s, ticket) = fleet
        .post_session(
            0,
            &y,
            json!({"app_id": "fy", "workflow_name": "hello", "message": "hi"}),
        )
        .await;
    assert_eq!(s, 201, "{ticket}");
    let y_chat = ticket["chat_id"].as_str().unwrap().to_string();
    let y_done = || async {
        let (_, v) = fleet.get(0, &format!("/api/sessions/{y_chat}"), &y).await;
        v["last_event_type"] == "run.completed"
    };
    // Y's run reaches the worker's queue too (behind X's four).
    queued(&fleet, &y_chat, &y).await;
    assert!(!y_done().await, "Y waits: the slot is X's");

    // Three of X's runs end. Both apps are starters, weight 2 each (starter's 10 runs against
    // horizons' 5); Y, which started waiting behind X's backlog, takes the next released slot,
    // so Y's run is done while X's fourth run holds the slot and its fifth still waits (first
    // come, first served: Y after all five).
    gate.add_permits(3);
    fleet
        .eventually("Y's run completed after three of X's", || async {
            y_done().await.then_some(())
        })
        .await;
    let (_, v) = fleet.get(0, "/health/active-runs?app_id=fx", &root()).await;
    assert_eq!(v["count"], 1, "X's fourth run holds the slot: {v}");
    gate.add_permits(10);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ops_agent_that_polls_a_fleet_over_http_sees_its_noisy_neighbour() {
    // The ops agent lives in another namespace (its own gateway for the policy and incidents)
    // and cannot read this fleet's bus: what it knows of X's runs comes from `--poll`, the
    // fleet's /api/health, /health/active-runs and /metrics/perf/aggregate.
    let (tool_base, gate) = gate_server().await;
    let dir = hold_pack(&tool_base);
    let workflows = dir.to_str().unwrap().to_string();
    let mut fleet = Fleet::start_with(1, 1, &[("MOZAIKS_WORKFLOWS_DIR", workflows.as_str())]).await;
    for app in ["x", "y"] {
        create_app(
            &fleet,
            json!({"app_id": app, "name": app, "tier": "business", "workflows": ["hold", "hello"]}),
        )
        .await;
    }
    let ns = format!("{}o", fleet.servers.namespace);
    fleet
        .add_gateway(&[
            ("MOZAIKS_NAMESPACE", ns.as_str()),
            ("MOZAIKS_WORKFLOWS_DIR", workflows.as_str()),
        ])
        .await;
    let mut rules = quiet_rules();
    rules["noisy_neighbour"] = json!({"enabled": true, "threshold": 0.4, "min_total": 3,
                                      "for_seconds": 1, "actions": ["notify"]});
    let (s, v, _) = fleet
        .call(
            1,
            "PUT",
            "/api/ops/policy",
            &root(),
            Some(json!({"rules": rules})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let nats = async_nats::connect(&fleet.servers.nats_url).await.unwrap();
    let subjects = mozaiks_events::subjects::Subjects::new(&ns);
    let mut incidents = nats
        .subscribe(subjects.ops("incident.noisy_neighbour.x"))
        .await
        .unwrap();
    let polled = fleet.gateways[0].clone();
    fleet.spawn_with(
        "ops",
        None,
        &[
            ("MOZAIKS_NAMESPACE", ns.as_str()),
            ("MOZAIKS_OPS_EVALUATE_MS", "200"),
            ("MOZAIKS_OPS_POLL", polled.as_str()),
            ("MOZAIKS_OPS_POLL_MS", "200"),
        ],
    );

    let x_user = Fleet::token("xena", "x", &["user"]);
    let y_user = Fleet::token("yuri", "y", &["user"]);
    let start = |app: &str| json!({"app_id": app, "workflow_name": "hold", "message": "wait"});
    for _ in 0..4 {
        let (s, v) = fleet.post_session(0, &x_user, start("x")).await;
        assert_eq!(s, 201, "{v}");
    }
    let (s, v) = fleet.post_session(0, &y_user, start("y")).await;
    assert_eq!(s, 201, "{v}");

    let firing = next_event(&mut incidents, "mozaiks.ops.incident.firing").await;
    let data = &firing["data"];
    assert_eq!(data["rule"], "noisy_neighbour");
    assert_eq!(data["app_id"], "x");
    assert_eq!(data["values"]["app_active_runs"], 4.0, "{data}");
    assert_eq!(data["values"]["fleet_active_runs"], 5.0, "{data}");
    // Recorded where the agent lives, not on the polled fleet's bus.
    let (s, v) = fleet
        .get(1, "/api/ops/incidents?app_id=x&status=firing", &root())
        .await;
    assert_eq!((s, v["count"].clone()), (200, json!(1)), "{v}");
    let (_, v) = fleet.get(0, "/api/ops/incidents", &root()).await;
    assert_eq!(v["count"], 0, "{v}");

    // X's runs end: the polled fleet shows none, and the incident resolves.
    gate.send_replace(true);
    let resolved = next_event(&mut incidents, "mozaiks.ops.incident.resolved").await;
    assert_eq!(resolved["data"]["incident_id"], data["incident_id"]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_ops_role_refuses_a_poll_url_that_is_not_http() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_mozaiks"))
        .args(["ops", "--poll", "ftp://fleet.example"])
        .env_clear()
        .env("MOZAIKS_DEV", "1")
        .env("NATS_URL", "nats://127.0.0.1:1")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--poll") && err.contains("not an http(s) URL"),
        "{err}"
    );
}
