//! The walking skeleton's slice, end to end.

use serde_json::json;

use crate::fleet::*;

const RUN_TYPES: [&str; 8] = [
    "run.started",
    "step.started",
    "model.replied",
    "agent.message",
    "usage.charged",
    "speaker.selected",
    "step.completed",
    "run.completed",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_message_and_run_stream_through_two_gateways() {
    let fleet = Fleet::start(2).await;
    let token = Fleet::token("alice", "default", &["user"]);
    let ticket = fleet.session(0, &token, "hello", None).await;
    assert_eq!(ticket["resumed"], false);
    assert!(
        ticket["ws_url"]
            .as_str()
            .unwrap()
            .contains("/ws/hello/default/")
    );

    // Gateway A: the session starts.
    let mut a = fleet.connect(0, &ticket, 0).await;
    let first = events_n(&mut a, 1).await;
    assert_eq!(types(&first), ["session.started"]);
    assert_gapless(&first, 1);

    // Gateway B: the same chat, a user message.
    let mut b = fleet.connect(1, &ticket, 1).await;
    send_json(
        &mut b,
        json!({"type": "user.message", "text": "hi there", "client_msg_id": "m-1"}),
    )
    .await;
    let on_b = events_until(&mut b, "run.completed").await;
    let mut expected = vec!["message.user".to_string()];
    expected.extend(RUN_TYPES.iter().map(|s| s.to_string()));
    assert_eq!(types(&on_b), expected);
    assert_gapless(&on_b, 2);
    assert_eq!(on_b[0]["data"]["text"], "hi there");
    assert_eq!(on_b[0]["data"]["client_msg_id"], "m-1");
    let reply = on_b.iter().find(|f| f["type"] == "agent.message").unwrap();
    assert_eq!(reply["data"]["text"], "Hello! You said: hi there");
    let usage = on_b.iter().find(|f| f["type"] == "usage.charged").unwrap();
    for k in [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "model",
    ] {
        assert!(!usage["data"][k].is_null(), "usage.charged lacks {k}");
    }

    // Gateway A sees the same events live, with the same ids.
    let on_a = events_until(&mut a, "run.completed").await;
    assert_eq!(
        on_a.iter().map(|f| f["id"].clone()).collect::<Vec<_>>(),
        on_b.iter().map(|f| f["id"].clone()).collect::<Vec<_>>()
    );

    // The same client_msg_id again is not a second message; a new one is.
    send_json(
        &mut b,
        json!({"type": "user.message", "text": "hi there", "client_msg_id": "m-1"}),
    )
    .await;
    send_json(
        &mut b,
        json!({"type": "user.message", "text": "again", "client_msg_id": "m-2"}),
    )
    .await;
    let next = events_until(&mut b, "run.completed").await;
    assert_eq!(next[0]["type"], "message.user");
    assert_eq!(next[0]["data"]["text"], "again");
    assert_gapless(&next, 11);

    // Replay from after=0 on B: every event exactly once, in order.
    let mut c = fleet.connect(1, &ticket, 0).await;
    let all = events_until(&mut c, "run.completed").await;
    let all = if all.len() < 19 {
        let mut all = all;
        all.extend(events_until(&mut c, "run.completed").await);
        all
    } else {
        all
    };
    assert_gapless(&all, 1);
    assert_eq!(all.len(), 19);
    assert_eq!(
        all.iter().filter(|f| f["type"] == "message.user").count(),
        2
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resumes_on_the_other_replica_with_after() {
    let fleet = Fleet::start(2).await;
    let token = Fleet::token("bob", "default", &["user"]);
    let ticket = fleet
        .session(0, &token, "triage_handoff", Some("route me"))
        .await;

    // Read the first four events on A, then drop the connection.
    let mut a = fleet.connect(0, &ticket, 0).await;
    let head = events_n(&mut a, 4).await;
    assert_gapless(&head, 1);
    drop(a);

    // Resume on B after seq 4: the rest, exactly once, in order.
    let mut b = fleet.connect(1, &ticket, 4).await;
    let rest = events_until(&mut b, "run.completed").await;
    assert_gapless(&rest, 5);
    let all: Vec<_> = head.iter().chain(rest.iter()).cloned().collect();
    assert_eq!(
        types(&all),
        [
            "session.started",
            "message.user",
            "run.started",
            "step.started",
            "model.replied",
            "agent.message",
            "usage.charged",
            "speaker.selected",
            "step.completed",
            "step.started",
            "model.replied",
            "agent.message",
            "usage.charged",
            "speaker.selected",
            "step.completed",
            "run.completed"
        ]
    );
    let agents: Vec<_> = all
        .iter()
        .filter(|f| f["type"] == "agent.message")
        .map(|f| f["data"]["agent"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        agents,
        ["triage", "specialist"],
        "the handoff chain ran in order"
    );

    // A fresh ticket for the same chat (resume through the broker) also replays from after=0.
    let (status, resumed) = fleet
        .post_session(1, &token, json!({"app_id": "default", "workflow_name": "triage_handoff", "chat_id": ticket["chat_id"]}))
        .await;
    assert_eq!(status, 200, "{resumed}");
    assert_eq!(resumed["resumed"], true);
    assert_eq!(resumed["last_seq"], 16);
    let mut c = fleet.connect(1, &resumed, 0).await;
    let replay = events_until(&mut c, "run.completed").await;
    assert_gapless(&replay, 1);
    assert_eq!(replay.len(), 16);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn projections_serve_the_read_endpoints_with_the_seed_indexes() {
    let fleet = Fleet::start(1).await;
    let token = Fleet::token("carol", "default", &["user"]);
    let first = fleet.session(0, &token, "hello", Some("one")).await;
    let first_id = first["chat_id"].as_str().unwrap().to_string();
    // The second session starts after the first is done, so "newest first" is well defined.
    fleet
        .eventually("the first session to complete", || async {
            let (s, v) = fleet
                .get(0, &format!("/api/sessions/{first_id}"), &token)
                .await;
            (s == 200 && v["status"] == "completed").then_some(())
        })
        .await;
    let second = fleet
        .session(0, &token, "triage_handoff", Some("two"))
        .await;
    let chat = second["chat_id"].as_str().unwrap().to_string();

    let session = fleet
        .eventually("the session to complete in the read model", || async {
            let (s, v) = fleet.get(0, &format!("/api/sessions/{chat}"), &token).await;
            (s == 200 && v["status"] == "completed").then_some(v)
        })
        .await;
    assert_eq!(session["app_id"], "default");
    assert_eq!(session["user_id"], "carol");
    assert_eq!(session["workflow_name"], "triage_handoff");
    assert_eq!(session["last_seq"], 16);

    let (s, msgs) = fleet
        .get(0, &format!("/api/sessions/{chat}/messages"), &token)
        .await;
    assert_eq!(s, 200);
    let texts: Vec<_> = msgs["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["role"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, ["user", "agent", "agent"]);
    let (_, after) = fleet
        .get(0, &format!("/api/sessions/{chat}/messages?after=2"), &token)
        .await;
    assert_eq!(after["messages"].as_array().unwrap().len(), 2);

    // Newest first.
    let first_chat = first["chat_id"].as_str().unwrap().to_string();
    let list = fleet
        .eventually("both sessions listed", || async {
            let (s, v) = fleet
                .get(0, "/api/sessions?app_id=default&user_id=carol", &token)
                .await;
            (s == 200 && v["sessions"].as_array().map(|a| a.len()) == Some(2)).then_some(v)
        })
        .await;
    let ids: Vec<_> = list["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["chat_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(ids, [chat.clone(), first_chat.clone()]);

    // The seeds' indexes exist.
    let client = mongodb::Client::with_uri_str(&fleet.servers.mongo_uri)
        .await
        .unwrap();
    let db = client.database(&fleet.servers.mongo_db);
    let sessions = db
        .collection::<mongodb::bson::Document>("chat_sessions")
        .list_index_names()
        .await
        .unwrap();
    for want in [
        "app_id_1_user_id_1_updated_at_-1",
        "app_id_1_workflow_name_1_status_1_updated_at_-1",
        "app_id_1_chat_id_1",
    ] {
        assert!(
            sessions.iter().any(|n| n == want),
            "missing index {want} in {sessions:?}"
        );
    }
    let messages = db
        .collection::<mongodb::bson::Document>("chat_messages")
        .list_index_names()
        .await
        .unwrap();
    assert!(
        messages.iter().any(|n| n == "app_id_1_chat_id_1_seq_1"),
        "{messages:?}"
    );
    // Every document carries app_id.
    let without = db
        .collection::<mongodb::bson::Document>("chat_messages")
        .count_documents(mongodb::bson::doc! { "app_id": { "$exists": false } })
        .await
        .unwrap();
    assert_eq!(without, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_totals_equal_the_sum_of_usage_charged_events() {
    let fleet = Fleet::start(1).await;
    let token = Fleet::token("dave", "default", &["user"]);
    let admin = Fleet::token("ops", "default", &["admin"]);
    let (mut prompt, mut completion, mut total, mut runs) = (0u64, 0u64, 0u64, 0u64);
    for (i, wf) in ["hello", "triage_handoff", "hello"].iter().enumerate() {
        let ticket = fleet
            .session(0, &token, wf, Some(&format!("message {i}")))
            .await;
        let mut ws = fleet.connect(0, &ticket, 0).await;
        let frames = events_until(&mut ws, "run.completed").await;
        runs += 1;
        for f in frames.iter().filter(|f| f["type"] == "usage.charged") {
            prompt += f["data"]["prompt_tokens"].as_u64().unwrap();
            completion += f["data"]["completion_tokens"].as_u64().unwrap();
            total += f["data"]["total_tokens"].as_u64().unwrap();
        }
    }
    assert_eq!(total, prompt + completion);
    let usage = fleet
        .eventually("the ledger to catch up", || async {
            let (s, v) = fleet.get(0, "/api/usage/default", &admin).await;
            (s == 200 && v["total_tokens"].as_u64() == Some(total)).then_some(v)
        })
        .await;
    assert_eq!(usage["prompt_tokens"].as_u64(), Some(prompt));
    assert_eq!(usage["completion_tokens"].as_u64(), Some(completion));
    assert_eq!(usage["runs"].as_u64(), Some(runs));
    assert_eq!(usage["charges"].as_u64(), Some(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_metrics_tell_the_truth() {
    let mut fleet = Fleet::start(1).await;
    let http = fleet.http.clone();
    for path in ["/api/health", "/health", "/health/live", "/health/ready"] {
        let r = http
            .get(format!("{}{path}", fleet.gateways[0]))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{path}");
    }
    let token = Fleet::token("erin", "default", &["user"]);
    let ticket = fleet.session(0, &token, "hello", Some("hi")).await;
    let mut ws = fleet.connect(0, &ticket, 0).await;
    events_until(&mut ws, "run.completed").await;
    let metrics = http
        .get(format!("{}/metrics", fleet.gateways[0]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("mozaiks_active_connections{app_id=\"default\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("mozaiks_sessions_started_total"),
        "{metrics}"
    );
    drop(ws);

    // Mongo down: not ready, still live.
    fleet.servers.kill_mongo().unwrap();
    let r = http
        .get(format!("{}/health/ready", fleet.gateways[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["mongo"], "down");
    assert_eq!(body["nats"], "ok");
    let r = http
        .get(format!("{}/health/live", fleet.gateways[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    fleet.servers.restart_mongo().await.unwrap();
    fleet.wait_ready(&fleet.gateways[0].clone()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_gateway_with_close_1012() {
    let mut fleet = Fleet::start(1).await;
    let token = Fleet::token("fay", "default", &["user"]);
    let ticket = fleet.session(0, &token, "hello", None).await;
    let mut ws = fleet.connect(0, &ticket, 0).await;
    events_n(&mut ws, 1).await;
    let gw = fleet
        .procs
        .iter_mut()
        .find(|p| p.role == "gateway")
        .unwrap();
    let pid = gw.child.id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    let close = loop {
        match tokio::time::timeout(
            std::time::Duration::from_secs(10),
            futures::StreamExt::next(&mut ws),
        )
        .await
        {
            Ok(Some(Ok(tokio_tungstenite::tungstenite::Message::Close(c)))) => break c,
            Ok(Some(Ok(_))) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("close frame with a code");
    assert_eq!(u16::from(close.code), 1012);
    assert!(close.reason.contains("reconnect"));
    let status = gw.child.wait().unwrap();
    assert!(status.success(), "gateway exited with {status}");
}
