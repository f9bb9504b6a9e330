//! The ops API's refusals and roles, in process (moved whole from the e2e test
//! `ops::the_ops_api_refuses_bad_input_with_clear_codes`; e2e keeps the ops agent at work: rules
//! firing, actions on every replica, approvals running).

mod support;

use axum::body::Body;
use axum::http::Request;
use serde_json::{Value, json};
use support::{Gw, code, root, token};

async fn get(gw: &Gw, path: &str, token: &str) -> (u16, Value) {
    gw.get(path, token).await.pair()
}

async fn call(
    gw: &Gw,
    method: &str,
    path: &str,
    token: &str,
    body: Option<Value>,
) -> (u16, Value, ()) {
    let (s, v) = gw.call(method, path, Some(token), body).await.pair();
    (s, v, ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ops_api_refuses_bad_input_with_clear_codes() {
    let gw = Gw::start().await;
    let r = root();
    let admin = token("ada", "default", &["admin"]);
    let user = token("ann", "default", &["user"]);
    // The default policy is the seeds' rule.
    let (s, v) = get(&gw, "/api/ops/policy", &r).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["policy"]["rules"]["noisy_neighbour"]["threshold"], 0.4);
    assert_eq!(
        v["policy"]["rules"]["noisy_neighbour"]["for_seconds"],
        300.0
    );
    assert_eq!(v["patch"], Value::Null);
    for (body, want) in [
        (json!([1, 2]), "invalid_policy"),
        (json!({"rules": {"nosy": {}}}), "invalid_policy"),
        (
            json!({"rules": {"noisy_neighbour": {"threshold": "high"}}}),
            "invalid_policy",
        ),
        (
            json!({"rules": {"noisy_neighbour": {"actions": ["reboot"]}}}),
            "invalid_policy",
        ),
        (
            json!({"rules": {"noisy_neighbour": {"threshold": 1.5}}}),
            "invalid_threshold",
        ),
        (
            json!({"rules": {"error_spike": {"threshold": -1}}}),
            "invalid_threshold",
        ),
        (
            json!({"rules": {"slow_start": {"for_seconds": -5}}}),
            "invalid_duration",
        ),
        (
            json!({"actions": {"throttle": {"ttl_seconds": 0}}}),
            "invalid_duration",
        ),
        (
            json!({"actions": {"approval": {"ttl_seconds": -1}}}),
            "invalid_duration",
        ),
        (
            json!({"actions": {"throttle": {"factor": 2}}}),
            "invalid_threshold",
        ),
        (
            json!({"actions": {"notify": {"webhook_url": "ftp://x"}}}),
            "invalid_webhook_url",
        ),
    ] {
        for path in ["/api/ops/policy", "/api/ops/policy/default"] {
            let (s, v, _) = call(&gw, "PUT", path, &r, Some(body.clone())).await;
            assert_eq!((s, code(&v)), (422, want), "{path} {body}: {v}");
        }
    }
    // A refused body stored nothing.
    let (_, v) = get(&gw, "/api/ops/policy", &r).await;
    assert_eq!(v["patch"], Value::Null);
    let raw = |path: &str, ct: Option<&str>, body: &str| {
        let mut req = Request::builder()
            .method("PUT")
            .uri(path)
            .header("authorization", format!("Bearer {r}"));
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let req = req.body(Body::from(body.to_string())).unwrap();
        let gw = &gw;
        async move { gw.send(req).await.pair() }
    };
    let (s, v) = raw("/api/ops/policy", Some("application/json"), "{not json").await;
    assert_eq!((s, code(&v)), (400, "bad_json"));
    let (s, v) = raw("/api/ops/policy", None, "{}").await;
    assert_eq!((s, code(&v)), (415, "unsupported_media_type"));
    // Per-app: an unknown app, a bad id.
    let (s, v, _) = call(
        &gw,
        "PUT",
        "/api/ops/policy/no-such-app",
        &r,
        Some(json!({})),
    )
    .await;
    assert_eq!((s, code(&v)), (404, "app_not_found"));
    let (s, v, _) = call(&gw, "GET", "/api/ops/policy/bad%20id", &r, None).await;
    assert_eq!((s, code(&v)), (422, "invalid_id"));
    // A good patch is stored, applied over the default, and readable back.
    let (s, v, _) = call(
        &gw,
        "PUT",
        "/api/ops/policy/default",
        &r,
        Some(json!({"rules": {"noisy_neighbour": {"threshold": 0.6}}})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (s, v) = get(&gw, "/api/ops/policy/default", &r).await;
    assert_eq!(s, 200);
    assert_eq!(v["policy"]["rules"]["noisy_neighbour"]["threshold"], 0.6);
    assert_eq!(v["patch"]["rules"]["noisy_neighbour"]["threshold"], 0.6);
    // Queries.
    for (path, want) in [
        ("/api/ops/incidents?status=burning", (422, "invalid_status")),
        ("/api/ops/actions?status=burning", (422, "invalid_status")),
        ("/api/ops/approvals?status=burning", (422, "invalid_status")),
        ("/api/ops/incidents?colour=red", (400, "invalid_query")),
        ("/api/ops/incidents?app_id=bad%20id", (422, "invalid_id")),
        ("/api/ops/incidents/bad%20id", (422, "invalid_id")),
        (
            "/api/ops/incidents/0190aaaa-0000-7000-8000-000000000000",
            (404, "incident_not_found"),
        ),
    ] {
        let (s, v) = get(&gw, path, &r).await;
        assert_eq!((s, code(&v)), want, "{path}: {v}");
    }
    let (s, v) = get(&gw, "/api/ops/incidents?status=firing", &r).await;
    assert_eq!((s, v["count"].as_u64()), (200, Some(0)), "{v}");
    let (s, v, _) = call(
        &gw,
        "POST",
        "/api/ops/actions/0190aaaa-0000-7000-8000-000000000000/revert",
        &r,
        None,
    )
    .await;
    assert_eq!((s, code(&v)), (404, "action_not_found"));
    // Roles: a user is not an ops reader; an app's admin reads its own incidents, not the
    // policy, the approvals, or anything to change.
    let (s, v) = get(&gw, "/api/ops/incidents", &user).await;
    assert_eq!((s, code(&v)), (403, "admin_required"));
    let (s, v) = get(&gw, "/api/ops/incidents", &admin).await;
    assert_eq!(s, 200, "{v}");
    for (method, path) in [
        ("GET", "/api/ops/policy"),
        ("PUT", "/api/ops/policy"),
        ("GET", "/api/ops/policy/default"),
        ("PUT", "/api/ops/policy/default"),
        ("GET", "/api/ops/approvals"),
        (
            "POST",
            "/api/ops/actions/0190aaaa-0000-7000-8000-000000000000/revert",
        ),
        (
            "POST",
            "/api/ops/approvals/0190aaaa-0000-7000-8000-000000000000/approve",
        ),
        (
            "POST",
            "/api/ops/approvals/0190aaaa-0000-7000-8000-000000000000/reject",
        ),
    ] {
        let body = (method != "GET").then(|| json!({}));
        let (s, v, _) = call(&gw, method, path, &admin, body).await;
        assert_eq!(
            (s, code(&v)),
            (403, "superadmin_required"),
            "{method} {path}"
        );
    }
    let (s, v) = gw
        .call("GET", "/api/ops/incidents", None, None)
        .await
        .pair();
    assert_eq!((s, code(&v)), (401, "token_missing"));
}
