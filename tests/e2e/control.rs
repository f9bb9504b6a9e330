//! The control plane end to end: app lifecycle over the API, live limits on every replica, the
//! session broker's checks, deleting an app, and the cross-tenant matrix.

use std::collections::HashSet;

use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::fleet::*;

async fn create_app(fleet: &Fleet, body: Value) -> Value {
    let (s, v, _) = fleet
        .call(0, "POST", "/api/apps", &root(), Some(body))
        .await;
    assert_eq!(s, 201, "create app: {v}");
    v
}

fn start(app: &str, workflow: &str) -> Value {
    json!({"app_id": app, "workflow_name": workflow})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_lifecycle_and_live_limits_on_every_replica() {
    let fleet = Fleet::start(2).await;
    let admin = Fleet::token("ann", "acme", &["admin"]);
    let user = Fleet::token("uma", "acme", &["user"]);

    // Create (superadmin only).
    let app = create_app(
        &fleet,
        json!({"app_id": "acme", "name": "Acme", "tier": "starter", "workflows": ["hello"]}),
    )
    .await;
    assert_eq!(app["tier"], "starter");
    assert_eq!(app["status"], "active");
    assert_eq!(app["runtime"], "shared");
    assert_eq!(app["effective_limits"]["requests_per_minute"], 600);
    assert!(app["version"].as_u64().unwrap() > 0);
    // The app, created on replica 0, read on replica 1. Its refusals (creation, reading,
    // patching, the broker's allowlist), each a test of its own code, run in process:
    // crates/gateway/tests/apps.rs.
    let (s, v, _) = fleet.call(1, "GET", "/api/apps/acme", &admin, None).await;
    assert_eq!((s, v["name"].as_str()), (200, Some("Acme")), "{v}");
    let root = root();

    // An allowlist change on replica 0 reaches replica 1 without a restart.
    let (s, _, _) = fleet
        .call(
            0,
            "PATCH",
            "/api/apps/acme",
            &admin,
            Some(json!({"workflows": ["hello", "triage_handoff"]})),
        )
        .await;
    assert_eq!(s, 200);
    fleet
        .eventually("the allowlist on replica 1", || async {
            let (s, _) = fleet
                .post_session(1, &user, start("acme", "triage_handoff"))
                .await;
            (s == 201).then_some(())
        })
        .await;
    let (_, v) = fleet.get(1, "/api/workflows", &user).await;
    let names: HashSet<&str> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, HashSet::from(["hello", "triage_handoff"]));

    // A limit change reaches replica 1 too: requests per minute, then 429 with Retry-After.
    let (s, v, _) = fleet
        .call(
            0,
            "PATCH",
            "/api/apps/acme",
            &root,
            Some(json!({"limits": {"requests_per_minute": 2}})),
        )
        .await;
    assert_eq!(
        (s, v["effective_limits"]["requests_per_minute"].as_u64()),
        (200, Some(2))
    );
    let (retry, body) = fleet
        .eventually("rate limiting on replica 1", || async {
            let (s, v, retry) = fleet
                .call(
                    1,
                    "POST",
                    "/api/sessions",
                    &user,
                    Some(start("acme", "hello")),
                )
                .await;
            (s == 429).then_some((retry, v))
        })
        .await;
    assert_eq!(code(&body), "rate_limited");
    let retry: u64 = retry.expect("Retry-After").parse().unwrap();
    assert!((1..=60).contains(&retry), "Retry-After {retry}");
    // Other apps are not affected.
    let alice = Fleet::token("alice", "default", &["user"]);
    fleet.session(1, &alice, "hello", None).await;

    // Suspend and resume (superadmin), seen by the other replica.
    let (s, _, _) = fleet
        .call(
            0,
            "PATCH",
            "/api/apps/acme",
            &root,
            Some(json!({"status": "suspended", "limits": {}})),
        )
        .await;
    assert_eq!(s, 200);
    fleet
        .eventually("the suspension on replica 1", || async {
            let (s, v) = fleet.post_session(1, &user, start("acme", "hello")).await;
            (s == 403 && code(&v) == "app_suspended").then_some(())
        })
        .await;
    let (s, _, _) = fleet
        .call(
            1,
            "PATCH",
            "/api/apps/acme",
            &root,
            Some(json!({"status": "active"})),
        )
        .await;
    assert_eq!(s, 200);
    fleet
        .eventually("the resumption on replica 0", || async {
            let (s, _) = fleet.post_session(0, &user, start("acme", "hello")).await;
            (s == 201).then_some(())
        })
        .await;

    // resolve_runtime: a dedicated app's tickets point at its own runtime.
    create_app(
        &fleet,
        json!({"app_id": "ded", "name": "Ded", "tier": "dedicated", "runtime_url": "wss://ded.example.com/"}),
    )
    .await;
    let ded = Fleet::token("dora", "ded", &["user"]);
    let (s, t) = fleet.post_session(1, &ded, start("ded", "hello")).await;
    assert_eq!(s, 201, "{t}");
    let ws_url = t["ws_url"].as_str().unwrap();
    assert!(
        ws_url.starts_with("wss://ded.example.com/ws/hello/ded/"),
        "{ws_url}"
    );

    // The OpenAPI document lists the control plane with everything else.
    let r = fleet
        .http
        .get(format!("{}/openapi.json", fleet.gateways[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let doc: Value = r.json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    for p in [
        "/api/apps",
        "/api/apps/{app_id}",
        "/api/sessions",
        "/ws/{workflow}/{app_id}/{chat_id}/{user_id}",
    ] {
        assert!(doc["paths"][p].is_object(), "{p} missing");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_app_refuses_sessions_everywhere_archives_then_removes_its_read_models() {
    let fleet = Fleet::start(2).await;
    create_app(
        &fleet,
        json!({"app_id": "gone", "name": "Gone", "tier": "starter"}),
    )
    .await;
    create_app(
        &fleet,
        json!({"app_id": "kept", "name": "Kept", "tier": "starter"}),
    )
    .await;
    let user = Fleet::token("gus", "gone", &["user"]);
    let admin = Fleet::token("gia", "gone", &["admin"]);
    let kept_user = Fleet::token("kim", "kept", &["user"]);
    let mut chats = Vec::new();
    for (token, app) in [(&user, "gone"), (&kept_user, "kept")] {
        let mut body = start(app, "hello");
        body["message"] = json!("hi");
        let (s, t) = fleet.post_session(0, token, body).await;
        assert_eq!(s, 201, "{t}");
        chats.push(t["chat_id"].as_str().unwrap().to_string());
    }
    // Both runs finish and are projected.
    for (token, chat) in [(&user, &chats[0]), (&kept_user, &chats[1])] {
        fleet
            .eventually("the run to complete in the read model", || async {
                let (s, v) = fleet.get(0, &format!("/api/sessions/{chat}"), token).await;
                (s == 200 && v["status"] == "completed").then_some(())
            })
            .await;
    }

    // Only the operator deletes.
    let (s, v, _) = fleet
        .call(0, "DELETE", "/api/apps/gone", &admin, None)
        .await;
    assert_eq!((s, code(&v)), (403, "superadmin_required"));
    let (s, v, _) = fleet
        .call(0, "DELETE", "/api/apps/gone", &root(), None)
        .await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["status"].as_str(), v["read_models"].as_str()),
        (Some("deleted"), Some("archive_pending")),
        "{v}"
    );

    // Every replica refuses the app's sessions; the app is gone from the API.
    for gw in 0..2 {
        fleet
            .eventually("the deletion on every replica", || async {
                let (s, v) = fleet.post_session(gw, &user, start("gone", "hello")).await;
                (s == 404 && code(&v) == "app_not_found").then_some(())
            })
            .await;
    }
    let (s, v, _) = fleet.call(1, "GET", "/api/apps/gone", &root(), None).await;
    assert_eq!((s, code(&v)), (404, "app_not_found"));
    let (s, v) = fleet
        .get(1, &format!("/api/sessions/{}", chats[0]), &user)
        .await;
    assert_eq!((s, code(&v)), (404, "chat_not_found"));

    // The projector holding the retention lease archives the app's sessions with their
    // transcripts (JSON lines, one file per day of last activity), then removes them from Mongo;
    // the other app's documents are intact.
    let client = mongodb::Client::with_uri_str(&fleet.servers.mongo_uri)
        .await
        .unwrap();
    let db = client.database(&fleet.servers.mongo_db);
    let count = |coll: &'static str, app: &'static str| {
        let c = db.collection::<mongodb::bson::Document>(coll);
        async move {
            c.count_documents(mongodb::bson::doc! {"app_id": app})
                .await
                .unwrap()
        }
    };
    let kept_before = (
        count("chat_sessions", "kept").await,
        count("chat_messages", "kept").await,
    );
    fleet
        .eventually("the deleted app's read models to be removed", || async {
            (count("chat_sessions", "gone").await == 0 && count("chat_messages", "gone").await == 0)
                .then_some(())
        })
        .await;
    let kept_after = (
        count("chat_sessions", "kept").await,
        count("chat_messages", "kept").await,
    );
    assert_eq!(kept_after, kept_before, "the other app's documents");
    assert!(kept_after.0 == 1 && kept_after.1 >= 2, "{kept_after:?}");

    let folder = fleet.archive_dir().join("gone");
    let files: Vec<_> = std::fs::read_dir(&folder)
        .unwrap_or_else(|e| panic!("{}: {e}", folder.display()))
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_str().unwrap().to_string();
    assert!(
        name.ends_with(".jsonl")
            && chrono::NaiveDate::parse_from_str(&name[..10], "%Y-%m-%d").is_ok(),
        "{name}"
    );
    let text = std::fs::read_to_string(&files[0]).unwrap();
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Readers keep the last line per chat_id; here every line is the one chat.
    assert!(!lines.is_empty(), "{text}");
    for line in &lines {
        assert_eq!(line["reason"], "app_deleted", "{line}");
        assert_eq!(line["session"]["chat_id"], chats[0].as_str(), "{line}");
        assert_eq!(line["session"]["app_id"], "gone", "{line}");
    }
    let last = lines.last().unwrap();
    assert_eq!(last["session"]["status"], "completed", "{last}");
    let messages = last["messages"].as_array().unwrap();
    assert!(
        messages
            .iter()
            .any(|m| m["type"] == "message.user" && m["text"] == "hi"),
        "{last}"
    );
    assert!(
        messages.iter().any(|m| m["type"] == "agent.message"),
        "{last}"
    );
    let seqs: Vec<i64> = messages
        .iter()
        .map(|m| m["seq"].as_i64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ordered: {seqs:?}");
    assert!(
        !fleet.archive_dir().join("kept").exists(),
        "nothing of the live app is archived"
    );

    // Deleting again is harmless; the id is not reusable (its history is on the log).
    let (s, v, _) = fleet
        .call(1, "DELETE", "/api/apps/gone", &root(), None)
        .await;
    assert_eq!((s, v["runs_cancelled"].as_u64()), (200, Some(0)), "{v}");
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "gone", "name": "Again", "tier": "starter"})),
        )
        .await;
    assert_eq!((s, code(&v)), (409, "app_exists"));
    let (s, v, _) = fleet
        .call(0, "DELETE", "/api/apps/never", &root(), None)
        .await;
    assert_eq!((s, code(&v)), (404, "app_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_apps_tokens_are_refused_everywhere_without_leaking_existence() {
    let fleet = Fleet::start(1).await;
    create_app(
        &fleet,
        json!({"app_id": "tenant-a", "name": "A", "tier": "starter", "workflows": ["hello"]}),
    )
    .await;
    create_app(
        &fleet,
        json!({"app_id": "tenant-b", "name": "B", "tier": "business", "workflows": ["hello", "triage_handoff"],
               "limits": {"allowed_origins": [B_ORIGIN]}}),
    )
    .await;
    let b_user = Fleet::token("bob", "tenant-b", &["user"]);
    let b_ticket = fleet
        .post_session(0, &b_user, start("tenant-b", "hello"))
        .await
        .1;
    let b_chat = b_ticket["chat_id"].as_str().unwrap().to_string();
    fleet
        .eventually("b's session in the read model", || async {
            let (s, _) = fleet
                .get(0, &format!("/api/sessions/{b_chat}"), &b_user)
                .await;
            (s == 200).then_some(())
        })
        .await;

    // Tenant A's credentials: a user, an admin, and a runtime token of one of A's chats.
    let a_user = Fleet::token("ann", "tenant-a", &["user"]);
    let a_admin = Fleet::token("ada", "tenant-a", &["admin"]);
    let (s, a_ticket) = fleet
        .post_session(0, &a_user, start("tenant-a", "hello"))
        .await;
    assert_eq!(s, 201);
    let a_runtime = a_ticket["runtime_token"].as_str().unwrap().to_string();
    let missing_chat = "0000000000000000000000000000dead";
    // An API key of A's back-end.
    let new_key = |app: &'static str| {
        let fleet = &fleet;
        async move {
            let (s, v, _) = fleet
                .call(
                    0,
                    "POST",
                    &format!("/api/apps/{app}/keys"),
                    &root(),
                    Some(json!({"name": "backend"})),
                )
                .await;
            assert_eq!(s, 201, "{v}");
            v
        }
    };
    let a_key = new_key("tenant-a").await["key"]
        .as_str()
        .unwrap()
        .to_string();

    // Each request names B's resource and a twin that does not exist: the answers must be equal
    // (same status, same code), so nobody learns whether B's resource exists. Here the rows that
    // need B's chat in the read model; the rest of the HTTP matrix (apps, usage, storage, keys,
    // credits, ops, plugins, workflows: 29 rows for each of A's four credentials) runs in process,
    // crates/gateway/tests/cross_tenant.rs.
    let requests: Vec<(&str, String, String, Option<Value>)> = vec![
        (
            "POST",
            "/api/sessions".into(),
            "/api/sessions".into(),
            Some(json!({"app_id": "tenant-b", "workflow_name": "hello", "chat_id": b_chat})),
        ),
        (
            "POST",
            "/api/sessions".into(),
            "/api/sessions".into(),
            Some(
                json!({"app_id": "no-such-app", "workflow_name": "hello", "chat_id": missing_chat}),
            ),
        ),
        (
            "GET",
            format!("/api/sessions/{b_chat}"),
            format!("/api/sessions/{missing_chat}"),
            None,
        ),
        (
            "GET",
            format!("/api/sessions/{b_chat}/messages"),
            format!("/api/sessions/{missing_chat}/messages"),
            None,
        ),
    ];
    for (who, token) in [
        ("A's user", &a_user),
        ("A's admin", &a_admin),
        ("A's runtime token", &a_runtime),
        ("A's API key", &a_key),
    ] {
        for (method, real, twin, body) in &requests {
            let (s1, v1, _) = fleet.call(0, method, real, token, body.clone()).await;
            let (s2, v2, _) = fleet.call(0, method, twin, token, body.clone()).await;
            assert!(
                (400..500).contains(&s1),
                "{who} {method} {real} was not refused: {s1} {v1}"
            );
            assert_eq!(
                (s1, code(&v1)),
                (s2, code(&v2)),
                "{who} {method} {real} answers differently from its twin {twin}"
            );
            if token == &a_runtime {
                assert_eq!(
                    (s1, code(&v1)),
                    (401, "token_wrong_audience"),
                    "{method} {real}"
                );
            }
        }
    }
    // Nothing of B changed, and B's user still sees its chat.
    let (_, v, _) = fleet
        .call(0, "GET", "/api/apps/tenant-b", &root(), None)
        .await;
    assert_eq!(v["name"], "B");
    let (s, _) = fleet
        .get(0, &format!("/api/sessions/{b_chat}"), &b_user)
        .await;
    assert_eq!(s, 200);

    // WebSocket: B's chat with A's runtime token or A's user token is refused, exactly like a
    // chat that does not exist.
    let status = |u: String| async move {
        match tokio_tungstenite::connect_async(u.into_client_request().unwrap()).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("unexpected {e}"),
        }
    };
    let ws = fleet.gateways[0].replace("http://", "ws://");
    for token in [&a_runtime, &a_user, &a_admin, &a_key] {
        let real = status(format!("{ws}/ws/hello/tenant-b/{b_chat}/bob?token={token}")).await;
        let twin = status(format!(
            "{ws}/ws/hello/tenant-b/{missing_chat}/bob?token={token}"
        ))
        .await;
        assert!(real == 401 || real == 403, "{real}");
        assert_eq!(real, twin);
        // The AG-UI stream of B's chat: the same refusal as for a chat that does not exist.
        let sse = |chat: String| {
            let fleet = &fleet;
            async move {
                let r = fleet
                    .http
                    .get(format!(
                        "{}/api/agui/tenant-b/{chat}?token={token}",
                        fleet.gateways[0]
                    ))
                    .send()
                    .await
                    .unwrap();
                let s = r.status().as_u16();
                (s, code(&r.json().await.unwrap_or(Value::Null)).to_string())
            }
        };
        let (real, twin) = (sse(b_chat.clone()).await, sse(missing_chat.into()).await);
        assert!(real.0 == 401 || real.0 == 403, "{real:?}");
        assert_eq!(real, twin);
    }

    // B's browser origin is not A's: A's credentials from B's page get answers it cannot read,
    // and a preflight for A's app from B's origin is refused.
    for token in [&a_user, &a_admin, &a_runtime, &a_key] {
        for (line, body) in [
            ("GET /api/workflows", None),
            ("GET /api/apps/tenant-a", None),
            ("GET /api/usage/tenant-a", None),
            (
                "POST /api/sessions",
                Some(json!({"app_id": "tenant-a", "workflow_name": "hello"})),
            ),
        ] {
            let (s, h, _) =
                crate::cors::with_origin(&fleet, 0, line, B_ORIGIN, Some(token), body, &[]).await;
            assert_eq!(crate::cors::allow_origin(&h), None, "{line}: {s}");
        }
    }
    let (s, _, v) = crate::cors::with_origin(
        &fleet,
        0,
        "OPTIONS /api/apps/tenant-a",
        B_ORIGIN,
        None,
        None,
        &[("access-control-request-method", "PATCH")],
    )
    .await;
    assert_eq!((s, code(&v)), (403, "origin_not_allowed"));
}

/// Tenant B's browser origin in the cross-tenant matrix.
const B_ORIGIN: &str = "https://b.example.com";
