//! The credits and usage endpoints' refusals, in process (moved from the e2e tests
//! `credits::spent_credits_stop_every_replica_before_the_next_model_call_and_a_grant_restores_them`
//! and `credits::usage_grouped_and_exported_as_csv_and_cloudevents_equal_the_log`, which keep the
//! grants, runs and charges that need workers, billing and a second replica).

mod support;

use serde_json::json;
use support::{Gw, root, token};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_grants_and_usage_queries_get_stable_codes() {
    let gw = Gw::start().await;
    let admin = token("ada", "default", &["admin"]);
    let root = root();

    // Bad grants get stable codes; only the operator may grant, only to an app that exists.
    let grant_path = "/api/apps/default/credits";
    for (body, status, want) in [
        (
            json!({"amount": -5, "reason": "r", "idempotency_key": "k"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": 0, "reason": "r", "idempotency_key": "k"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": 2.5, "reason": "r", "idempotency_key": "k"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": "100", "reason": "r", "idempotency_key": "k"}),
            422,
            "invalid_amount",
        ),
        (
            json!({"amount": 1e30, "reason": "r", "idempotency_key": "k"}),
            422,
            "amount_too_large",
        ),
        (
            json!({"amount": 1, "reason": "r", "idempotency_key": "k", "bonus": 1}),
            422,
            "unknown_field",
        ),
        (
            json!({"amount": 1, "reason": "r", "idempotency_key": "k", "expires_at": "2020-01-01T00:00:00Z"}),
            422,
            "expires_at_in_past",
        ),
        (
            json!({"amount": 1, "idempotency_key": "k"}),
            422,
            "invalid_reason",
        ),
        (
            json!({"amount": 1, "reason": "r"}),
            422,
            "invalid_idempotency_key",
        ),
    ] {
        let r = gw
            .call("POST", grant_path, Some(&root), Some(body.clone()))
            .await;
        assert_eq!((r.status, r.code()), (status, want), "{body}: {}", r.body);
    }
    let ok = json!({"amount": 100000, "reason": "top-up", "idempotency_key": "order-1"});
    let r = gw
        .call("POST", grant_path, Some(&admin), Some(ok.clone()))
        .await;
    assert_eq!((r.status, r.code()), (403, "superadmin_required"));
    let r = gw
        .call(
            "POST",
            "/api/apps/no-such-app/credits",
            Some(&root),
            Some(ok),
        )
        .await;
    assert_eq!((r.status, r.code()), (404, "app_not_found"));

    // Bad usage queries: stable codes.
    for (path, want) in [
        ("/api/usage/default?group_by=tenant", "invalid_group_by"),
        ("/api/usage/default?from=yesterday", "invalid_from"),
        ("/api/usage/default/export", "invalid_format"),
        ("/api/usage/default/export?format=xml", "invalid_format"),
        (
            "/api/usage/default/export?format=csv&page=2",
            "unknown_field",
        ),
    ] {
        let r = gw.get(path, &admin).await;
        assert_eq!((r.status, r.code()), (422, want), "{path}: {}", r.body);
    }
}
