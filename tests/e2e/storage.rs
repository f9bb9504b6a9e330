//! `resolve_storage` end to end: apps of dedicated-database tiers get their own database, a
//! storage move rebuilds an app's read models from the log while sessions keep coming, and the
//! projector skips events of a deleted app.

use std::collections::HashSet;
use std::time::Duration;

use mongodb::bson::{Document, doc};
use serde_json::{Value, json};

use crate::fleet::*;

async fn start_chat(fleet: &Fleet, gw: usize, token: &str, app: &str, text: &str) -> String {
    let (s, v) = fleet
        .post_session(
            gw,
            token,
            json!({"app_id": app, "workflow_name": "hello", "message": text}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    v["chat_id"].as_str().unwrap().to_string()
}

async fn sessions_in(db: &mongodb::Database, app: &str) -> Vec<Document> {
    use futures::TryStreamExt;
    db.collection::<Document>("chat_sessions")
        .find(doc! {"app_id": app})
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_an_app_rebuilds_its_read_models_from_the_log_without_losing_events() {
    let fleet = Fleet::start(2).await;
    let mongo = mongodb::Client::with_uri_str(&fleet.servers.mongo_uri)
        .await
        .unwrap();
    let shared = mongo.database(&fleet.servers.mongo_db);
    let user = Fleet::token("mia", "movy", &["user"]);
    let admin = Fleet::token("max", "movy", &["admin"]);

    // A business app gets its own database from the start; its sessions live there only.
    let (s, biz, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "biz", "name": "Biz", "tier": "business"})),
        )
        .await;
    assert_eq!(s, 201, "{biz}");
    let biz_db_name = format!("{}_biz", fleet.servers.mongo_db);
    assert_eq!(biz["storage"]["db_name"], biz_db_name.as_str());
    assert_eq!(biz["database"], "dedicated");
    let biz_user = Fleet::token("bo", "biz", &["user"]);
    let biz_chat = start_chat(&fleet, 1, &biz_user, "biz", "hi").await;
    fleet
        .eventually("biz's session completed", || async {
            let (s, v) = fleet
                .get(0, &format!("/api/sessions/{biz_chat}"), &biz_user)
                .await;
            (s == 200 && v["status"] == "completed").then_some(())
        })
        .await;
    let biz_db = mongo.database(&biz_db_name);
    assert_eq!(sessions_in(&biz_db, "biz").await.len(), 1);
    assert!(
        sessions_in(&shared, "biz").await.is_empty(),
        "biz's session is not in the shared database"
    );

    // A starter app on the shared database, with sessions before the move.
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "movy", "name": "Movy", "tier": "starter"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    assert!(v["storage"].is_null());
    let mut before = Vec::new();
    for i in 0..3 {
        before.push(start_chat(&fleet, i % 2, &user, "movy", &format!("before {i}")).await);
    }
    for chat in &before {
        fleet
            .eventually("a session before the move completed", || async {
                let (s, v) = fleet.get(0, &format!("/api/sessions/{chat}"), &user).await;
                (s == 200 && v["status"] == "completed").then_some(())
            })
            .await;
    }

    // Refusals, each with its code; nothing moves.
    let target = format!("{}_movy", fleet.servers.mongo_db);
    let path = "/api/apps/movy/storage";
    let cases: Vec<(String, Value, u16, &str)> = vec![
        (
            admin.clone(),
            json!({"db_name": target}),
            403,
            "superadmin_required",
        ),
        (
            Fleet::token("eve", "biz", &["admin"]),
            json!({"db_name": target}),
            403,
            "app_mismatch",
        ),
        (root(), json!({"db_name": target}), 422, "invalid_storage"), // starter: shared database
        (
            root(),
            json!({"db_name": target, "colour": 1}),
            422,
            "invalid_body",
        ),
        (root(), json!({"db_name": 7}), 422, "invalid_body"),
    ];
    for (token, body, status, want) in cases {
        let (s, v, _) = fleet
            .call(0, "POST", path, &token, Some(body.clone()))
            .await;
        assert_eq!((s, code(&v)), (status, want), "{body}");
    }
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps/nope/storage",
            &root(),
            Some(json!({"db_name": "x"})),
        )
        .await;
    assert_eq!((s, code(&v)), (404, "app_not_found"));
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps/bad!id/storage",
            &root(),
            Some(json!({"db_name": "x"})),
        )
        .await;
    assert_eq!((s, code(&v)), (422, "invalid_id"));

    // Business now: still on the shared database until moved.
    let (s, v, _) = fleet
        .call(
            0,
            "PATCH",
            "/api/apps/movy",
            &root(),
            Some(json!({"tier": "business"})),
        )
        .await;
    assert_eq!(s, 200, "{v}");
    assert!(v["storage"].is_null());
    for (body, why) in [
        (json!({"db_name": "a.b"}), "db_name"),
        (
            json!({"db_name": "x", "mongo_uri": "mongodb://u:secret@db1/"}),
            "credentials",
        ),
        (json!({"mongo_uri": "mongodb://db1/"}), "db_name"),
        (
            json!({"db_name": "x", "mongo_uri": "http://db1/"}),
            "mongodb://",
        ),
    ] {
        let (s, v, _) = fleet
            .call(0, "POST", path, &root(), Some(body.clone()))
            .await;
        assert_eq!((s, code(&v)), (422, "invalid_storage"), "{body}");
        assert!(v["error"]["message"].as_str().unwrap().contains(why), "{v}");
    }

    // The move, while sessions keep starting on both replicas.
    let during = {
        let gateways = fleet.gateways.clone();
        let user = user.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut chats = Vec::new();
            for i in 0..8 {
                let r = http
                    .post(format!("{}/api/sessions", gateways[i % 2]))
                    .bearer_auth(&user)
                    .json(&json!({"app_id": "movy", "workflow_name": "hello", "message": format!("during {i}")}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                let v: Value = r.json().await.unwrap();
                chats.push(v["chat_id"].as_str().unwrap().to_string());
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            chats
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (s, moved, _) = fleet
        .call(1, "POST", path, &root(), Some(json!({"db_name": target})))
        .await;
    assert_eq!(s, 200, "{moved}");
    assert_eq!(moved["storage"]["db_name"], target.as_str());
    assert_eq!(moved["previous_left_intact"], true);
    assert!(moved["events_replayed"].as_u64().unwrap() > 0, "{moved}");
    let during = during.await.unwrap();

    // Every replica reads the new placement; admins see it.
    let (_, v, _) = fleet.call(0, "GET", "/api/apps/movy", &admin, None).await;
    assert_eq!(v["storage"]["db_name"], target.as_str());
    // Down to a shared-database tier only after moving back.
    let (s, v, _) = fleet
        .call(
            0,
            "PATCH",
            "/api/apps/movy",
            &root(),
            Some(json!({"tier": "starter"})),
        )
        .await;
    assert_eq!((s, code(&v)), (422, "invalid_storage"));

    let mut after = Vec::new();
    for i in 0..2 {
        after.push(start_chat(&fleet, i % 2, &user, "movy", &format!("after {i}")).await);
    }

    // Every session — before, during, after — completes and is readable from either replica,
    // from the new database.
    let all: Vec<String> = before
        .iter()
        .chain(&during)
        .chain(&after)
        .cloned()
        .collect();
    for (n, chat) in all.iter().enumerate() {
        fleet
            .eventually("every session completed and readable", || async {
                let (s, v) = fleet
                    .get(n % 2, &format!("/api/sessions/{chat}"), &user)
                    .await;
                (s == 200 && v["status"] == "completed").then_some(())
            })
            .await;
        let (s, v) = fleet
            .get(n % 2, &format!("/api/sessions/{chat}/messages"), &user)
            .await;
        assert_eq!(s, 200);
        let msgs = v["messages"].as_array().unwrap();
        assert!(msgs.iter().any(|m| m["role"] == "user"), "{v}");
        assert!(msgs.iter().any(|m| m["role"] == "agent"), "{v}");
        let seqs: Vec<u64> = msgs.iter().map(|m| m["seq"].as_u64().unwrap()).collect();
        let mut sorted = seqs.clone();
        sorted.dedup();
        assert_eq!(seqs, sorted, "no duplicate transcript lines");
    }
    let new_db = mongo.database(&target);
    let in_new: HashSet<String> = sessions_in(&new_db, "movy")
        .await
        .iter()
        .map(|d| d.get_str("chat_id").unwrap().to_string())
        .collect();
    assert_eq!(
        in_new,
        all.iter().cloned().collect::<HashSet<_>>(),
        "the new database holds every session"
    );
    // The usage ledger was rebuilt there too: one run per chat.
    fleet
        .eventually("the ledger counts every run", || async {
            let (_, u) = fleet.get(0, "/api/usage/movy", &admin).await;
            (u["runs"].as_u64() == Some(all.len() as u64)).then_some(())
        })
        .await;
    // The shared database was left intact: the sessions from before the move are still there.
    let in_old: HashSet<String> = sessions_in(&shared, "movy")
        .await
        .iter()
        .map(|d| d.get_str("chat_id").unwrap().to_string())
        .collect();
    for chat in &before {
        assert!(in_old.contains(chat), "the old database is left intact");
    }
    for chat in &after {
        assert!(
            !in_old.contains(chat),
            "sessions after the move are not written to the old database"
        );
    }

    // Moving back to the shared database: reads follow, and the sessions after the first move
    // are replayed there.
    let (s, back, _) = fleet
        .call(0, "POST", path, &root(), Some(json!({"db_name": null})))
        .await;
    assert_eq!(s, 200, "{back}");
    assert!(back["storage"].is_null());
    let in_old: HashSet<String> = sessions_in(&shared, "movy")
        .await
        .iter()
        .map(|d| d.get_str("chat_id").unwrap().to_string())
        .collect();
    assert_eq!(in_old, all.iter().cloned().collect::<HashSet<_>>());
    let (_, u) = fleet.get(1, "/api/usage/movy", &admin).await;
    assert_eq!(u["runs"].as_u64(), Some(all.len() as u64), "{u}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_skips_events_of_a_deleted_app() {
    let fleet = Fleet::start(1).await;
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "late", "name": "Late", "tier": "starter"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let (s, v, _) = fleet
        .call(0, "DELETE", "/api/apps/late", &root(), None)
        .await;
    assert_eq!(s, 200, "{v}");

    // An event of the deleted app reaches the log after the delete (a run still finishing), then
    // one of a live app.
    let bus = mozaiks_bus::Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "test")
        .await
        .unwrap();
    let event = |app: &str, chat: &str| mozaiks_events::Envelope {
        v: mozaiks_events::ENVELOPE_VERSION,
        event_id: uuid::Uuid::now_v7(),
        app_id: app.into(),
        chat_id: chat.into(),
        user_id: "u1".into(),
        workflow: "hello".into(),
        seq: 1,
        ts: chrono::Utc::now(),
        parent_chat_id: None,
        causation_id: None,
        event: mozaiks_events::Event::SessionStarted(Default::default()),
    };
    bus.append(&event("late", "latechat"), 0).await.unwrap();
    bus.append(&event("default", "livechat"), 0).await.unwrap();

    // Once the projector has acknowledged both, the live app's session exists and the deleted
    // app's does not.
    let mut evt = bus.stream("MZ_EVT").await.unwrap();
    let last = evt.info().await.unwrap().state.last_sequence;
    let consumer_name = bus.subjects().name("projector");
    fleet
        .eventually("the projector acknowledged both events", || {
            let stream = evt.clone();
            let name = consumer_name.clone();
            async move {
                let info = stream.consumer_info(&name).await.ok()?;
                (info.ack_floor.stream_sequence >= last).then_some(())
            }
        })
        .await;
    let mongo = mongodb::Client::with_uri_str(&fleet.servers.mongo_uri)
        .await
        .unwrap();
    let db = mongo.database(&fleet.servers.mongo_db);
    assert_eq!(
        sessions_in(&db, "default")
            .await
            .iter()
            .filter(|d| d.get_str("chat_id") == Ok("livechat"))
            .count(),
        1
    );
    assert!(
        sessions_in(&db, "late").await.is_empty(),
        "no read model re-created for the deleted app"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_move_of_an_app_at_a_time_across_every_replica() {
    let fleet = Fleet::start(2).await;
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "solo", "name": "Solo", "tier": "business"})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let first_db = format!("{}_solo", fleet.servers.mongo_db);
    let user = Fleet::token("sol", "solo", &["user"]);
    let chat = start_chat(&fleet, 0, &user, "solo", "hi").await;
    fleet
        .eventually("the session completed", || async {
            let (s, v) = fleet.get(1, &format!("/api/sessions/{chat}"), &user).await;
            (s == 200 && v["status"] == "completed").then_some(())
        })
        .await;
    let path = "/api/apps/solo/storage";

    // GET /api/apps/{id}/storage: the operator's; another app's tokens are refused before any
    // lookup, with the same answer whether the app exists or not.
    let (s, v) = fleet.get(1, path, &root()).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        (v["db_name"].as_str(), v["shared"].as_bool(), &v["move"]),
        (Some(first_db.as_str()), Some(false), &Value::Null),
        "{v}"
    );
    for (token, want) in [
        (
            Fleet::token("ann", "solo", &["admin"]),
            "superadmin_required",
        ),
        (Fleet::token("eve", "default", &["admin"]), "app_mismatch"),
        (Fleet::token("eve", "default", &["user"]), "app_mismatch"),
    ] {
        let (s, v) = fleet.get(0, path, &token).await;
        assert_eq!((s, code(&v)), (403, want), "{v}");
        let (s, v) = fleet.get(0, "/api/apps/nosuch/storage", &token).await;
        if want == "app_mismatch" {
            assert_eq!((s, code(&v)), (403, want), "no leak: {v}");
        }
    }
    let (s, v) = fleet.get(0, "/api/apps/nosuch/storage", &root()).await;
    assert_eq!((s, code(&v)), (404, "app_not_found"));
    let (s, v) = fleet.get(0, "/api/apps/bad.id/storage", &root()).await;
    assert_eq!((s, code(&v)), (422, "invalid_id"), "{v}");
    let (s, _) = fleet.get(0, path, "not-a-token").await;
    assert_eq!(s, 401);

    // A move runs on replica 0; while it does, every replica refuses another move of the app.
    let second_db = format!("{}_solo2", fleet.servers.mongo_db);
    let mover = {
        let http = fleet.http.clone();
        let url = format!("{}{path}", fleet.gateways[0]);
        let body = json!({"db_name": second_db});
        tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(root())
                .json(&body)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        })
    };
    let running = fleet
        .eventually("the move to show on the other replica", || async {
            let (s, v) = fleet.get(1, path, &root()).await;
            (s == 200 && v["move"]["state"] == "running").then_some(v)
        })
        .await;
    assert_eq!(running["move"]["target"], second_db.as_str(), "{running}");
    assert!(running["move"]["replica"].is_string(), "{running}");
    for gw in [1, 0] {
        let (s, v, _) = fleet
            .call(
                gw,
                "POST",
                path,
                &root(),
                Some(json!({"db_name": first_db})),
            )
            .await;
        assert_eq!(
            (s, code(&v)),
            (409, "move_in_progress"),
            "replica {gw}: {v}"
        );
    }
    // Reads are served throughout.
    let (s, v) = fleet.get(1, &format!("/api/sessions/{chat}"), &user).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("completed")), "{v}");

    let (s, v) = mover.await.unwrap();
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["db_name"], second_db.as_str());
    // Done: the lease is released, the placement shows, and the next move is accepted at once.
    let (s, v) = fleet.get(1, path, &root()).await;
    assert_eq!(
        (s, v["db_name"].as_str(), &v["move"]),
        (200, Some(second_db.as_str()), &Value::Null),
        "{v}"
    );

    // A replica that died in the middle of a move holds the lease until it ages out: simulated
    // by holding it from here.
    let bus = mozaiks_bus::Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "test")
        .await
        .unwrap();
    let leases = mozaiks_control::lease::Leases::open(&bus, "a-dead-replica")
        .await
        .unwrap();
    let held = leases
        .try_acquire("storage-move-solo", Some("elsewhere"))
        .await
        .unwrap()
        .expect("the lease is free after a move");
    let (s, v, _) = fleet
        .call(1, "POST", path, &root(), Some(json!({"db_name": first_db})))
        .await;
    assert_eq!((s, code(&v)), (409, "move_in_progress"), "{v}");
    held.release().await;
    let (s, v, _) = fleet
        .call(1, "POST", path, &root(), Some(json!({"db_name": first_db})))
        .await;
    assert_eq!(
        (s, v["db_name"].as_str()),
        (200, Some(first_db.as_str())),
        "{v}"
    );
    let (s, v) = fleet.get(0, &format!("/api/sessions/{chat}"), &user).await;
    assert_eq!((s, v["status"].as_str()), (200, Some("completed")), "{v}");
}
