//! API keys of app back-ends end to end: created by the app's admins, stored hashed, accepted on
//! the endpoints a back-end needs (acting for its app's users), refused everywhere else, revoked
//! on every replica.

use serde_json::{Value, json};

use crate::fleet::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_act_for_their_app_only_and_are_revocable_everywhere() {
    let fleet = Fleet::start(2).await;
    for (id, wf) in [("kapp", json!(["hello"])), ("other", json!(["hello"]))] {
        let (s, v, _) = fleet
            .call_as(
                0,
                "POST",
                "/api/apps",
                Some(&root()),
                None,
                Some(json!({"app_id": id, "name": id, "tier": "starter", "workflows": wf})),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let admin = Fleet::token("ada", "kapp", &["admin"]);
    let user = Fleet::token("uma", "kapp", &["user"]);
    let other_admin = Fleet::token("oz", "other", &["admin"]);

    // Creating keys: the app's admins (or a superadmin); every refusal has its code.
    let keys_path = "/api/apps/kapp/keys";
    let refusals = [
        (user.as_str(), json!({"name": "x"}), 403, "admin_required"),
        (
            other_admin.as_str(),
            json!({"name": "x"}),
            403,
            "app_mismatch",
        ),
        (admin.as_str(), json!({"name": "   "}), 422, "invalid_name"),
        (
            admin.as_str(),
            json!({"name": "x", "scope": "all"}),
            422,
            "invalid_body",
        ),
        (admin.as_str(), json!({}), 422, "invalid_body"),
    ];
    for (token, body, status, want) in refusals {
        let (s, v, _) = fleet
            .call_as(0, "POST", keys_path, Some(token), None, Some(body.clone()))
            .await;
        assert_eq!((s, code(&v)), (status, want), "{body}");
    }
    let (s, v, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/apps/ghost/keys",
            Some(&root()),
            None,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!((s, code(&v)), (404, "app_not_found"));
    let (s, v, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/apps/bad!/keys",
            Some(&root()),
            None,
            Some(json!({"name": "x"})),
        )
        .await;
    assert_eq!((s, code(&v)), (422, "invalid_id"));

    let (s, created, _) = fleet
        .call_as(
            0,
            "POST",
            keys_path,
            Some(&admin),
            None,
            Some(json!({"name": "backend"})),
        )
        .await;
    assert_eq!(s, 201, "{created}");
    let key = created["key"].as_str().unwrap().to_string();
    let key_id = created["key_id"].as_str().unwrap().to_string();
    assert!(key.starts_with("mzk_"), "{key}");
    assert_eq!(created["app_id"], "kapp");

    // Stored hashed: the bucket holds the SHA-256, never the key.
    let bus = mozaiks_bus::Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "test")
        .await
        .unwrap();
    let kv = bus
        .jetstream()
        .get_key_value(bus.subjects().name("MZ_KEYS"))
        .await
        .unwrap();
    let stored: Value = serde_json::from_slice(&kv.get(&key_id).await.unwrap().unwrap()).unwrap();
    let secret = key.rsplit('_').next().unwrap();
    assert!(
        !stored.to_string().contains(secret),
        "the key is not stored: {stored}"
    );
    assert_eq!(stored["hash"].as_str().unwrap().len(), 64);
    // Listed without the key or its hash.
    let (s, list, _) = fleet
        .call_as(1, "GET", keys_path, Some(&admin), None, None)
        .await;
    assert_eq!(s, 200);
    assert_eq!(list["keys"].as_array().unwrap().len(), 1, "{list}");
    assert!(list["keys"][0].get("key").is_none() && list["keys"][0].get("hash").is_none());

    // The back-end starts a session for one of its users, on the other replica, as Bearer or as
    // X-Api-Key.
    let start = |user_id: Option<&str>| {
        let mut b = json!({"app_id": "kapp", "workflow_name": "hello", "message": "hi"});
        if let Some(u) = user_id {
            b["user_id"] = json!(u);
        }
        b
    };
    let (s, t, _) = fleet
        .call_as(
            1,
            "POST",
            "/api/sessions",
            Some(&key),
            None,
            Some(start(Some("alice"))),
        )
        .await;
    assert_eq!(s, 201, "{t}");
    assert!(t["ws_url"].as_str().unwrap().ends_with("/alice"), "{t}");
    let chat = t["chat_id"].as_str().unwrap().to_string();
    let (s, t2, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/sessions",
            None,
            Some(&key),
            Some(start(Some("bob"))),
        )
        .await;
    assert_eq!(s, 201, "{t2}");
    let (s, v, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/sessions",
            Some(&key),
            None,
            Some(start(None)),
        )
        .await;
    assert_eq!((s, code(&v)), (422, "user_id_required"));
    let (s, v, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/sessions",
            Some(&key),
            None,
            Some(start(Some("bad user"))),
        )
        .await;
    assert_eq!((s, code(&v)), (422, "invalid_id"));
    // A user token may only name itself.
    let (s, v, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/sessions",
            Some(&user),
            None,
            Some(start(Some("alice"))),
        )
        .await;
    assert_eq!((s, code(&v)), (403, "user_mismatch"));
    let (s, v, _) = fleet
        .call_as(
            0,
            "POST",
            "/api/sessions",
            Some(&user),
            None,
            Some(start(Some("uma"))),
        )
        .await;
    assert_eq!(s, 201, "{v}");

    // It reads its app's sessions, transcripts, workflows and usage.
    fleet
        .eventually("alice's session in the read model", || async {
            let (s, v, _) = fleet
                .call_as(
                    0,
                    "GET",
                    &format!("/api/sessions/{chat}"),
                    Some(&key),
                    None,
                    None,
                )
                .await;
            (s == 200 && v["user_id"] == "alice").then_some(())
        })
        .await;
    let (s, v, _) = fleet
        .call_as(
            1,
            "GET",
            &format!("/api/sessions/{chat}/messages"),
            None,
            Some(&key),
            None,
        )
        .await;
    assert_eq!(s, 200, "{v}");
    let (s, v, _) = fleet
        .call_as(
            1,
            "GET",
            "/api/sessions?app_id=kapp&user_id=alice",
            Some(&key),
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, v["sessions"][0]["chat_id"].as_str()),
        (200, Some(chat.as_str())),
        "{v}"
    );
    let (s, v, _) = fleet
        .call_as(0, "GET", "/api/workflows", Some(&key), None, None)
        .await;
    assert_eq!((s, v[0]["name"].as_str()), (200, Some("hello")));
    let (s, _, _) = fleet
        .call_as(0, "GET", "/api/usage/kapp", Some(&key), None, None)
        .await;
    assert_eq!(s, 200);

    // Everywhere else a key is not a credential.
    for (method, path, body) in [
        ("GET", "/api/apps/kapp", None),
        ("PATCH", "/api/apps/kapp", Some(json!({"name": "x"}))),
        ("DELETE", "/api/apps/kapp", None),
        ("GET", "/api/apps", None),
        ("POST", "/api/apps/kapp/keys", Some(json!({"name": "more"}))),
        ("GET", "/api/apps/kapp/keys", None),
        (
            "POST",
            "/api/apps/kapp/storage",
            Some(json!({"db_name": "x"})),
        ),
        ("GET", "/api/apps/kapp/storage", None),
        ("POST", "/api/notify", Some(json!({"data": {}}))),
    ] {
        let (s, v, _) = fleet
            .call_as(0, method, path, Some(&key), None, body.clone())
            .await;
        assert_eq!(s, 401, "{method} {path} with a key as Bearer: {v}");
        let (s, v, _) = fleet.call_as(0, method, path, None, Some(&key), body).await;
        assert_eq!(
            (s, code(&v)),
            (401, "token_missing"),
            "{method} {path} with X-Api-Key"
        );
    }
    // A malformed or unknown key is refused like a bad one.
    for bad in [
        "mzk_nope".to_string(),
        format!("mzk_{}_{}", "0".repeat(16), "0".repeat(64)),
    ] {
        let (s, v, _) = fleet
            .call_as(
                0,
                "POST",
                "/api/sessions",
                None,
                Some(&bad),
                Some(start(Some("alice"))),
            )
            .await;
        assert_eq!((s, code(&v)), (401, "api_key_invalid"), "{bad}");
    }

    // Revoking: the app's admins; another app's admin or another app's path learn nothing.
    let revoke_path = format!("/api/apps/kapp/keys/{key_id}");
    let (s, v, _) = fleet
        .call_as(0, "DELETE", &revoke_path, Some(&other_admin), None, None)
        .await;
    assert_eq!((s, code(&v)), (403, "app_mismatch"));
    let (s, v, _) = fleet
        .call_as(
            0,
            "DELETE",
            &format!("/api/apps/other/keys/{key_id}"),
            Some(&root()),
            None,
            None,
        )
        .await;
    assert_eq!(
        (s, code(&v)),
        (404, "key_not_found"),
        "another app's key is not found"
    );
    let (s, v, _) = fleet
        .call_as(
            0,
            "DELETE",
            "/api/apps/kapp/keys/0000000000000000",
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (404, "key_not_found"));
    let (s, v, _) = fleet
        .call_as(
            0,
            "DELETE",
            "/api/apps/kapp/keys/not-hex",
            Some(&admin),
            None,
            None,
        )
        .await;
    assert_eq!((s, code(&v)), (404, "key_not_found"));
    let (s, v, _) = fleet
        .call_as(0, "DELETE", &revoke_path, Some(&admin), None, None)
        .await;
    assert_eq!((s, v["revoked"].as_bool()), (200, Some(true)), "{v}");
    for gw in 0..2 {
        fleet
            .eventually("the revocation on every replica", || async {
                let (s, v, _) = fleet
                    .call_as(
                        gw,
                        "POST",
                        "/api/sessions",
                        Some(&key),
                        None,
                        Some(start(Some("alice"))),
                    )
                    .await;
                (s == 401 && code(&v) == "api_key_invalid").then_some(())
            })
            .await;
    }
    let (_, list, _) = fleet
        .call_as(1, "GET", keys_path, Some(&admin), None, None)
        .await;
    assert_eq!(list["keys"][0]["revoked"], true);
}
