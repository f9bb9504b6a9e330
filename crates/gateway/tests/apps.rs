//! The apps API's refusals, each a test of its own code, in process (moved from the e2e test
//! `control::apps_lifecycle_and_live_limits_on_every_replica`, which keeps what needs
//! two replicas: changes seen by the other replica, rate limits shared by the fleet, suspension
//! and resumption across replicas, and a dedicated app's tickets).

mod support;

use serde_json::{Value, json};
use support::{Gw, root, token};

fn start(app: &str, workflow: &str) -> Value {
    json!({"app_id": app, "workflow_name": workflow})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_creation_patching_and_the_broker_refuse_bad_input_with_stable_codes() {
    let gw = Gw::start().await;
    let admin = token("ann", "acme", &["admin"]);
    let user = token("uma", "acme", &["user"]);
    let root = root();

    // Create (superadmin only).
    let r = gw
        .call(
            "POST",
            "/api/apps",
            Some(&root),
            Some(json!({"app_id": "acme", "name": "Acme", "tier": "starter", "workflows": ["hello"]})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    let app = r.body;
    assert_eq!(app["tier"], "starter");
    assert_eq!(app["status"], "active");
    assert_eq!(app["runtime"], "shared");
    assert_eq!(app["effective_limits"]["requests_per_minute"], 600);
    assert!(app["version"].as_u64().unwrap() > 0);
    let bad_creates = [
        (
            json!({"app_id": "acme", "name": "Again", "tier": "starter"}),
            409,
            "app_exists",
        ),
        (
            json!({"app_id": "bad id!", "name": "X", "tier": "starter"}),
            422,
            "invalid_id",
        ),
        (
            json!({"app_id": "x", "name": "X", "tier": "platinum"}),
            422,
            "unknown_tier",
        ),
        (
            json!({"app_id": "x", "name": "X", "tier": "starter", "workflows": ["ghost"]}),
            422,
            "unknown_workflow",
        ),
        (
            json!({"app_id": "x", "name": "", "tier": "starter"}),
            422,
            "invalid_name",
        ),
        (
            json!({"app_id": "x", "name": "X", "tier": "starter", "runtime_url": "wss://x.example.com"}),
            422,
            "invalid_runtime_url",
        ),
        (
            json!({"app_id": "x", "name": "X", "tier": "starter", "limits": {"speed": 1}}),
            422,
            "unknown_limit",
        ),
        (
            json!({"app_id": "x", "name": "X", "tier": "starter", "colour": "red"}),
            422,
            "invalid_body",
        ),
        (json!({"app_id": "x", "name": "X"}), 422, "invalid_body"),
    ];
    for (body, status, want) in bad_creates {
        let r = gw
            .call("POST", "/api/apps", Some(&root), Some(body.clone()))
            .await;
        assert_eq!((r.status, r.code()), (status, want), "{body}");
    }
    let r = gw
        .call(
            "POST",
            "/api/apps",
            Some(&admin),
            Some(json!({"name": "Mine", "tier": "starter"})),
        )
        .await;
    assert_eq!((r.status, r.code()), (403, "superadmin_required"));
    // A generated app_id.
    let r = gw
        .call(
            "POST",
            "/api/apps",
            Some(&root),
            Some(json!({"name": "No id", "tier": "horizons"})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.body["app_id"].as_str().unwrap().starts_with("app-"));

    // Read and patch: the app's admin may change its own settings, not its entitlements.
    let r = gw.get("/api/apps/acme", &admin).await;
    assert_eq!((r.status, r.body["name"].as_str()), (200, Some("Acme")));
    let r = gw.get("/api/apps/acme", &user).await;
    assert_eq!((r.status, r.code()), (403, "admin_required"));
    let r = gw
        .call(
            "PATCH",
            "/api/apps/acme",
            Some(&admin),
            Some(json!({"name": "Acme Inc", "context": {"brand": "acme"}})),
        )
        .await;
    assert_eq!(
        (r.status, r.body["name"].as_str()),
        (200, Some("Acme Inc")),
        "{}",
        r.body
    );
    let bad_patches = [
        (
            &admin,
            json!({"tier": "business"}),
            403,
            "superadmin_required",
        ),
        (
            &admin,
            json!({"limits": {"requests_per_minute": 1}}),
            403,
            "superadmin_required",
        ),
        (
            &admin,
            json!({"status": "suspended"}),
            403,
            "superadmin_required",
        ),
        (
            &admin,
            json!({"workflows": ["ghost"]}),
            422,
            "unknown_workflow",
        ),
        (&admin, json!({"favourite": 1}), 422, "invalid_body"),
        (&root, json!({"tier": "gold"}), 422, "unknown_tier"),
        (&root, json!({"limits": {"rpm": 1}}), 422, "unknown_limit"),
        (
            &root,
            json!({"limits": {"requests_per_minute": 0}}),
            422,
            "invalid_limits",
        ),
        (&root, json!({"status": "deleted"}), 422, "invalid_status"),
    ];
    for (token, body, status, want) in bad_patches {
        let r = gw
            .call("PATCH", "/api/apps/acme", Some(token), Some(body.clone()))
            .await;
        assert_eq!((r.status, r.code()), (status, want), "{body}");
    }
    let r = gw
        .call(
            "PATCH",
            "/api/apps/nope",
            Some(&root),
            Some(json!({"name": "N"})),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "app_not_found"));

    // The broker: allowlist, unknown app.
    let r = gw.post_session(&user, start("acme", "hello")).await;
    assert_eq!(r.status, 201, "{}", r.body);
    let r = gw
        .post_session(&user, start("acme", "triage_handoff"))
        .await;
    assert_eq!((r.status, r.code()), (403, "workflow_not_allowed"));
    let stranger = token("sam", "nope", &["user"]);
    let r = gw.post_session(&stranger, start("nope", "hello")).await;
    assert_eq!((r.status, r.code()), (404, "app_not_found"));
}
