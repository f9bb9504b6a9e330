//! The HTTP error-code and authorization matrix of the session broker and the read endpoints,
//! in process (moved from the e2e test `bad_input::http_bad_input_and_cross_tenant_requests_are_
//! refused`, which keeps the cases that need a worker and a projector: another user's or app's
//! read of a projected chat, and resuming another user's chat).

mod support;

use serde_json::json;
use support::{Gw, SECRET, auth_with, jwt, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_bad_input_and_cross_tenant_requests_are_refused() {
    let gw = Gw::start().await;
    let alice = token("alice", "default", &["user"]);
    let body = json!({"app_id": "default", "workflow_name": "hello"});

    // Missing, expired, wrongly signed, wrong-audience tokens: 401.
    let r = gw
        .call("POST", "/api/sessions", None, Some(body.clone()))
        .await;
    assert_eq!((r.status, r.code()), (401, "token_missing"));
    let expired = {
        // A token that expired an hour ago (beyond the leeway), signed with the right key.
        let now = chrono::Utc::now().timestamp();
        let claims = json!({"sub": "alice", "app_id": "default", "roles": ["user"], "exp": now - 3600, "iat": now - 7200, "iss": "mozaiks", "aud": "mozaiks"});
        jwt(&claims, SECRET)
    };
    let forged = auth_with("another-secret-that-is-also-long-enough-000")
        .mint_user("alice", "default", &["user"], 600)
        .unwrap();
    let ticket = gw.post_session(&alice, body.clone()).await;
    assert_eq!(ticket.status, 201, "{}", ticket.body);
    let runtime = ticket.body["runtime_token"].as_str().unwrap().to_string();
    for (name, token, want) in [
        ("expired", expired.as_str(), "token_expired"),
        ("forged", forged.as_str(), "token_bad_signature"),
        (
            "runtime token as user token",
            runtime.as_str(),
            "token_wrong_audience",
        ),
        ("garbage", "not-a-jwt", "token_malformed"),
    ] {
        let r = gw.post_session(token, body.clone()).await;
        assert_eq!((r.status, r.code()), (401, want), "{name}: {}", r.body);
    }

    // A body app_id other than the token's: 403.
    let r = gw
        .post_session(&alice, json!({"app_id": "other", "workflow_name": "hello"}))
        .await;
    assert_eq!((r.status, r.code()), (403, "app_mismatch"));
    // Malformed bodies.
    let r = gw
        .raw(
            "POST",
            "/api/sessions",
            Some(&alice),
            Some(("application/json", "{not json".into())),
        )
        .await;
    assert_eq!(r.status, 400);
    for (name, body, status, code) in [
        (
            "no workflow_name",
            json!({"app_id": "default"}),
            422,
            "invalid_body",
        ),
        (
            "an unknown field",
            json!({"app_id": "default", "workflow_name": "hello", "surprise": 1}),
            422,
            "invalid_body",
        ),
        (
            "a bad app_id",
            json!({"app_id": "de.fault", "workflow_name": "hello"}),
            422,
            "invalid_id",
        ),
        (
            "a workflow not allowed",
            json!({"app_id": "default", "workflow_name": "nope"}),
            403,
            "workflow_not_allowed",
        ),
        (
            "a blank message",
            json!({"app_id": "default", "workflow_name": "hello", "message": "  "}),
            422,
            "invalid_message",
        ),
    ] {
        let r = gw.post_session(&alice, body).await;
        assert_eq!((r.status, r.code()), (status, code), "{name}: {}", r.body);
    }
    // An app that does not exist (token for it): 404.
    let ghost = token("gina", "ghost", &["user"]);
    let r = gw
        .post_session(&ghost, json!({"app_id": "ghost", "workflow_name": "hello"}))
        .await;
    assert_eq!((r.status, r.code()), (404, "app_not_found"));

    // A chat that does not exist.
    let r = gw.get("/api/sessions/nope/messages", &alice).await;
    assert_eq!(r.status, 404);
    // Listing: another app's sessions 403; another user's sessions 403 unless admin.
    let mallory = token("mallory", "default", &["user"]);
    let outsider = token("alice", "ghost", &["user", "admin"]);
    let list = "/api/sessions?app_id=default&user_id=alice";
    let r = gw.get(list, &outsider).await;
    assert_eq!((r.status, r.code()), (403, "app_mismatch"));
    let r = gw.get(list, &mallory).await;
    assert_eq!((r.status, r.code()), (403, "user_mismatch"));
    let r = gw.get("/api/sessions?user_id=alice", &alice).await;
    assert_eq!((r.status, r.code()), (400, "invalid_query"));
    let admin = token("root", "default", &["admin"]);
    let r = gw.get(list, &admin).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Usage: admins of the app only.
    let r = gw.get("/api/usage/default", &alice).await;
    assert_eq!((r.status, r.code()), (403, "admin_required"));
    let r = gw.get("/api/usage/default", &outsider).await;
    assert_eq!((r.status, r.code()), (403, "app_mismatch"));
    let r = gw.get("/api/usage/default", &admin).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // Workflows: the caller's app only.
    let r = gw.get("/api/workflows", &alice).await;
    assert_eq!(r.status, 200);
    let names: Vec<_> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap().to_string())
        .collect();
    assert!(
        names.contains(&"hello".to_string()) && names.contains(&"triage_handoff".to_string()),
        "{names:?}"
    );
    let r = gw.get("/api/workflows", &outsider).await;
    assert_eq!(r.status, 404);
    // Unknown endpoints.
    let r = gw.get("/api/nothing", &alice).await;
    assert_eq!((r.status, r.code()), (404, "not_found"));
    // A known endpoint with a method it does not take: 405, the error envelope and `Allow`.
    let r = gw.call("DELETE", "/api/sessions", Some(&alice), None).await;
    assert_eq!(r.status, 405);
    let allow = r.headers["allow"].to_str().unwrap().to_string();
    assert!(allow.contains("GET") && allow.contains("POST"), "{allow}");
    assert_eq!(r.code(), "method_not_allowed", "{}", r.body);
    assert_eq!(
        r.body["error"]["message"],
        "this endpoint does not take DELETE"
    );
}
