//! The cross-tenant matrix of the HTTP API, in process: tenant A's credentials (a user, an
//! admin, a runtime token, an API key) against tenant B's resources, each compared with a twin
//! that does not exist, so nobody learns whether B's resource exists. Moved from the e2e test
//! `control::another_apps_tokens_are_refused_everywhere_without_leaking_existence`, which keeps
//! the rows that need a chat in the read model (a worker and a projector), the WebSocket and
//! AG-UI upgrades and the browser-origin checks.

mod support;

use serde_json::{Value, json};
use support::{Gw, root, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_apps_credentials_are_refused_everywhere_without_leaking_existence() {
    let gw = Gw::start_with(true).await;
    for body in [
        json!({"app_id": "tenant-a", "name": "A", "tier": "starter", "workflows": ["hello"]}),
        json!({"app_id": "tenant-b", "name": "B", "tier": "business", "workflows": ["hello", "triage_handoff"],
               "limits": {"allowed_origins": ["https://b.example.com"]}}),
    ] {
        let r = gw
            .call("POST", "/api/apps", Some(&root()), Some(body))
            .await;
        assert_eq!(r.status, 201, "create app: {}", r.body);
    }

    // Tenant A's credentials: a user, an admin, and a runtime token of one of A's chats.
    let a_user = token("ann", "tenant-a", &["user"]);
    let a_admin = token("ada", "tenant-a", &["admin"]);
    let a_ticket = gw
        .post_session(
            &a_user,
            json!({"app_id": "tenant-a", "workflow_name": "hello"}),
        )
        .await;
    assert_eq!(a_ticket.status, 201, "{}", a_ticket.body);
    let a_runtime = a_ticket.body["runtime_token"].as_str().unwrap().to_string();
    let missing = "0000000000000000000000000000dead";
    // An API key of A's back-end, and one of B's (whose id A's credentials must not reach).
    let new_key = async |app: &str| -> Value {
        let r = gw
            .call(
                "POST",
                &format!("/api/apps/{app}/keys"),
                Some(&root()),
                Some(json!({"name": "backend"})),
            )
            .await;
        assert_eq!(r.status, 201, "{}", r.body);
        r.body
    };
    let a_key = new_key("tenant-a").await["key"]
        .as_str()
        .unwrap()
        .to_string();
    let b_key_id = new_key("tenant-b").await["key_id"]
        .as_str()
        .unwrap()
        .to_string();

    // Each request names B's resource and a twin that does not exist: the answers must be equal
    // (same status, same code).
    let requests: Vec<(&str, String, String, Option<Value>)> = vec![
        (
            "GET",
            "/api/sessions?app_id=tenant-b&user_id=bob".into(),
            "/api/sessions?app_id=no-such-app&user_id=bob".into(),
            None,
        ),
        (
            "GET",
            "/api/usage/tenant-b".into(),
            "/api/usage/no-such-app".into(),
            None,
        ),
        (
            "GET",
            "/api/usage/tenant-b?group_by=user".into(),
            "/api/usage/no-such-app?group_by=user".into(),
            None,
        ),
        (
            "GET",
            "/api/usage/tenant-b/export?format=csv".into(),
            "/api/usage/no-such-app/export?format=csv".into(),
            None,
        ),
        (
            "GET",
            "/api/apps/tenant-b".into(),
            "/api/apps/no-such-app".into(),
            None,
        ),
        (
            "PATCH",
            "/api/apps/tenant-b".into(),
            "/api/apps/no-such-app".into(),
            Some(json!({"name": "pwned"})),
        ),
        (
            "DELETE",
            "/api/apps/tenant-b".into(),
            "/api/apps/no-such-app".into(),
            None,
        ),
        (
            "POST",
            "/api/apps/tenant-b/storage".into(),
            "/api/apps/no-such-app/storage".into(),
            Some(json!({"db_name": "stolen"})),
        ),
        (
            "GET",
            "/api/apps/tenant-b/storage".into(),
            "/api/apps/no-such-app/storage".into(),
            None,
        ),
        (
            "GET",
            "/api/apps/tenant-b/keys".into(),
            "/api/apps/no-such-app/keys".into(),
            None,
        ),
        (
            "POST",
            "/api/apps/tenant-b/keys".into(),
            "/api/apps/no-such-app/keys".into(),
            Some(json!({"name": "stolen"})),
        ),
        (
            "DELETE",
            format!("/api/apps/tenant-b/keys/{b_key_id}"),
            format!("/api/apps/no-such-app/keys/{b_key_id}"),
            None,
        ),
        (
            "DELETE",
            format!("/api/apps/tenant-a/keys/{b_key_id}"),
            "/api/apps/tenant-a/keys/0000000000000000".into(),
            None,
        ),
        (
            "GET",
            "/api/apps/tenant-b/credits".into(),
            "/api/apps/no-such-app/credits".into(),
            None,
        ),
        (
            "POST",
            "/api/apps/tenant-b/credits".into(),
            "/api/apps/no-such-app/credits".into(),
            Some(json!({"amount": 1000, "reason": "stolen", "idempotency_key": "x"})),
        ),
        // The ops agent's API (issue 12): B's policy, incidents, actions and approvals.
        (
            "GET",
            "/api/ops/policy/tenant-b".into(),
            "/api/ops/policy/no-such-app".into(),
            None,
        ),
        (
            "PUT",
            "/api/ops/policy/tenant-b".into(),
            "/api/ops/policy/no-such-app".into(),
            Some(json!({"rules": {"noisy_neighbour": {"enabled": false}}})),
        ),
        (
            "PUT",
            "/api/ops/policy".into(),
            "/api/ops/policy".into(),
            Some(json!({"rules": {"noisy_neighbour": {"enabled": false}}})),
        ),
        (
            "GET",
            "/api/ops/incidents?app_id=tenant-b".into(),
            "/api/ops/incidents?app_id=no-such-app".into(),
            None,
        ),
        (
            "GET",
            "/api/ops/actions?app_id=tenant-b".into(),
            "/api/ops/actions?app_id=no-such-app".into(),
            None,
        ),
        (
            "GET",
            "/api/ops/approvals?app_id=tenant-b".into(),
            "/api/ops/approvals?app_id=no-such-app".into(),
            None,
        ),
        (
            "POST",
            format!("/api/ops/actions/{missing}/revert"),
            "/api/ops/actions/0000000000000000/revert".into(),
            None,
        ),
        (
            "POST",
            format!("/api/ops/approvals/{missing}/approve"),
            "/api/ops/approvals/0000000000000000/approve".into(),
            Some(json!({})),
        ),
        (
            "POST",
            format!("/api/ops/approvals/{missing}/reject"),
            "/api/ops/approvals/0000000000000000/reject".into(),
            Some(json!({})),
        ),
        // Plugins (issue 15): B's plugin list, upload and enabled list.
        (
            "GET",
            "/api/apps/tenant-b/plugins".into(),
            "/api/apps/no-such-app/plugins".into(),
            None,
        ),
        (
            "POST",
            "/api/apps/tenant-b/plugins".into(),
            "/api/apps/no-such-app/plugins".into(),
            Some(json!({"name": "stolen", "version": "1", "wat": "(module)"})),
        ),
        (
            "GET",
            "/api/apps/tenant-b/plugins/enabled".into(),
            "/api/apps/no-such-app/plugins/enabled".into(),
            None,
        ),
        (
            "GET",
            "/api/apps/tenant-b/plugins/usage".into(),
            "/api/apps/no-such-app/plugins/usage".into(),
            None,
        ),
        (
            "PUT",
            "/api/apps/tenant-b/plugins/enabled".into(),
            "/api/apps/no-such-app/plugins/enabled".into(),
            Some(json!({"plugins": []})),
        ),
    ];
    assert_eq!(requests.len(), 29);
    let mut checked = 0;
    for (who, token) in [
        ("A's user", &a_user),
        ("A's admin", &a_admin),
        ("A's runtime token", &a_runtime),
        ("A's API key", &a_key),
    ] {
        for (method, real, twin, body) in &requests {
            let r1 = gw.call(method, real, Some(token), body.clone()).await;
            let r2 = gw.call(method, twin, Some(token), body.clone()).await;
            assert!(
                (400..500).contains(&r1.status),
                "{who} {method} {real} was not refused: {} {}",
                r1.status,
                r1.body
            );
            assert_eq!(
                (r1.status, r1.code()),
                (r2.status, r2.code()),
                "{who} {method} {real} answers differently from its twin {twin}"
            );
            if token == &a_runtime {
                assert_eq!(
                    (r1.status, r1.code()),
                    (401, "token_wrong_audience"),
                    "{method} {real}"
                );
            }
            checked += 1;
        }
        // Workflows: always the caller's own app's list, never B's.
        let r = gw.get("/api/workflows", token).await;
        if token == &a_runtime {
            assert_eq!(r.status, 401);
        } else {
            let names: Vec<&str> = r
                .body
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["name"].as_str().unwrap())
                .collect();
            assert_eq!(names, ["hello"], "{who}");
        }
    }
    assert_eq!(checked, 4 * 29);
    // Nothing of B changed.
    let r = gw.get("/api/apps/tenant-b", &root()).await;
    assert_eq!(r.body["name"], "B");
}
