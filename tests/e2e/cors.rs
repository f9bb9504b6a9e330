//! CORS on the HTTP API (issue 13): an app's `allowed_origins` and the fleet-wide
//! `MOZAIKS_CORS_ORIGINS` decide; allowed origins are echoed (never `*`, never with credentials),
//! other origins get no CORS headers, refused preflights get 403 `origin_not_allowed`, and
//! another tenant's origin is another origin.

use reqwest::header::HeaderMap;
use serde_json::{Value, json};

use crate::fleet::*;

const A: &str = "https://a.example.com";
const B: &str = "https://b.example.com";
const CONSOLE: &str = "https://console.example.com";
const EVIL: &str = "https://evil.example.com";

/// A request (`line`: `"GET /path"`) on gateway `gw` with an `Origin` and optional bearer token,
/// body and headers.
pub async fn with_origin(
    fleet: &Fleet,
    gw: usize,
    line: &str,
    origin: &str,
    token: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, HeaderMap, Value) {
    let (method, path) = line.split_once(' ').unwrap();
    let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut req = fleet
        .http
        .request(m, format!("{}{path}", fleet.gateways[gw]))
        .header("origin", origin);
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let h = r.headers().clone();
    let text = r.text().await.unwrap();
    (
        status,
        h,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

pub fn allow_origin(h: &HeaderMap) -> Option<&str> {
    h.get("access-control-allow-origin")
        .map(|v| v.to_str().unwrap())
}

fn varies_on_origin(h: &HeaderMap) -> bool {
    h.get_all("vary")
        .iter()
        .any(|v| v.to_str().unwrap().to_ascii_lowercase().contains("origin"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_apps_origins_and_the_fleets_govern_http() {
    let mut fleet = Fleet::start(1).await;
    // A second gateway with a fleet-wide origin (an operator's console).
    let port = free_port();
    fleet.spawn_with(
        "gateway",
        Some(port),
        &[
            ("MOZAIKS_DRAIN_SECONDS", "3"),
            ("MOZAIKS_CORS_ORIGINS", &format!("{CONSOLE}, ")),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    fleet.wait_ready(&base).await;
    fleet.gateways.push(base);
    for (app, origin) in [("tenant-a", A), ("tenant-b", B)] {
        let (s, v, _) = fleet
            .call(
                0,
                "POST",
                "/api/apps",
                &root(),
                Some(
                    json!({"app_id": app, "name": app, "tier": "starter", "workflows": ["hello"],
                            "limits": {"allowed_origins": [origin]}}),
                ),
            )
            .await;
        assert_eq!(s, 201, "{v}");
    }
    let a_user = Fleet::token("ann", "tenant-a", &["user"]);
    let a_admin = Fleet::token("ada", "tenant-a", &["admin"]);
    let start = json!({"app_id": "tenant-a", "workflow_name": "hello", "message": "hi"});
    // Both replicas have seen the apps (the registry is a watched KV bucket).
    for gw in 0..2 {
        fleet
            .eventually("the apps on every replica", || async {
                let (s, _) = fleet.get(gw, "/api/apps/tenant-b", &root()).await;
                (s == 200).then_some(())
            })
            .await;
    }

    // The app's own origin: echoed, with Vary, never `*`, no credentials.
    let (s, h, ticket) = with_origin(
        &fleet,
        0,
        "POST /api/sessions",
        A,
        Some(&a_user),
        Some(start.clone()),
        &[],
    )
    .await;
    assert_eq!(s, 201, "{ticket}");
    assert_eq!(allow_origin(&h), Some(A));
    assert!(varies_on_origin(&h));
    assert!(h.get("access-control-allow-credentials").is_none());
    // Another origin, and another tenant's origin: served (a browser decides), but unreadable.
    for origin in [EVIL, B] {
        let (s, h, _) = with_origin(
            &fleet,
            0,
            "POST /api/sessions",
            origin,
            Some(&a_user),
            Some(start.clone()),
            &[],
        )
        .await;
        assert_eq!(s, 201);
        assert_eq!(allow_origin(&h), None, "{origin}");
        assert!(varies_on_origin(&h), "{origin}");
    }
    // The path names the app: A's admin reading A's app from B's origin gets nothing to read.
    let (s, h, _) = with_origin(
        &fleet,
        0,
        "GET /api/apps/tenant-a",
        B,
        Some(&a_admin),
        None,
        &[],
    )
    .await;
    assert_eq!((s, allow_origin(&h)), (200, None));
    let (s, h, _) = with_origin(
        &fleet,
        0,
        "GET /api/apps/tenant-a",
        A,
        Some(&a_admin),
        None,
        &[],
    )
    .await;
    assert_eq!((s, allow_origin(&h)), (200, Some(A)));
    // A bad token's 401 is readable by the app's page (so it can get a fresh one).
    let forged = Fleet::auth_with("another-secret-that-is-long-enough-0123456789")
        .mint_user("ann", "tenant-a", &["user"], 3600)
        .unwrap();
    let (s, h, v) = with_origin(&fleet, 0, "GET /api/workflows", A, Some(&forged), None, &[]).await;
    assert_eq!((s, allow_origin(&h)), (401, Some(A)), "{v}");

    // Preflights: answered for an allowed origin, refused with the error envelope otherwise.
    let preflight = [
        ("access-control-request-method", "POST"),
        (
            "access-control-request-headers",
            "authorization, content-type",
        ),
    ];
    let (s, h, _) = with_origin(
        &fleet,
        0,
        "OPTIONS /api/sessions",
        A,
        None,
        None,
        &preflight,
    )
    .await;
    assert_eq!((s, allow_origin(&h)), (204, Some(A)));
    let methods = h["access-control-allow-methods"].to_str().unwrap();
    assert!(
        methods.contains("POST") && methods.contains("PATCH"),
        "{methods}"
    );
    let allowed = h["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        allowed.contains("authorization") && allowed.contains("last-event-id"),
        "{allowed}"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert!(varies_on_origin(&h));
    let (s, h, v) = with_origin(
        &fleet,
        0,
        "OPTIONS /api/sessions",
        EVIL,
        None,
        None,
        &preflight,
    )
    .await;
    assert_eq!(
        (s, code(&v), allow_origin(&h)),
        (403, "origin_not_allowed", None)
    );
    assert!(varies_on_origin(&h));
    // A path that names an app: only that app's origins, not another tenant's.
    let (s, _, v) = with_origin(
        &fleet,
        0,
        "OPTIONS /api/apps/tenant-a/keys",
        B,
        None,
        None,
        &preflight,
    )
    .await;
    assert_eq!((s, code(&v)), (403, "origin_not_allowed"));
    let (s, h, _) = with_origin(
        &fleet,
        0,
        "OPTIONS /api/apps/tenant-a/keys",
        A,
        None,
        None,
        &preflight,
    )
    .await;
    assert_eq!((s, allow_origin(&h)), (204, Some(A)));
    // OPTIONS that is not a preflight is still not a method the API takes.
    let (s, _, v) = with_origin(&fleet, 0, "OPTIONS /api/sessions", A, None, None, &[]).await;
    assert_eq!((s, code(&v)), (405, "method_not_allowed"));

    // The fleet-wide origin works for every app, on the replica configured with it only.
    let (s, h, _) = with_origin(
        &fleet,
        1,
        "GET /api/workflows",
        CONSOLE,
        Some(&a_user),
        None,
        &[],
    )
    .await;
    assert_eq!((s, allow_origin(&h)), (200, Some(CONSOLE)));
    let (s, h, _) = with_origin(
        &fleet,
        1,
        "OPTIONS /api/apps/tenant-b",
        CONSOLE,
        None,
        None,
        &preflight,
    )
    .await;
    assert_eq!((s, allow_origin(&h)), (204, Some(CONSOLE)));
    let (_, h, _) = with_origin(
        &fleet,
        0,
        "GET /api/workflows",
        CONSOLE,
        Some(&a_user),
        None,
        &[],
    )
    .await;
    assert_eq!(allow_origin(&h), None);

    // The AG-UI stream: the app's origin may read it, another may not.
    let token = ticket["runtime_token"].as_str().unwrap();
    let path = format!(
        "/api/agui/tenant-a/{}?token={token}",
        ticket["chat_id"].as_str().unwrap()
    );
    for (origin, want) in [(A, Some(A)), (B, None)] {
        let r = fleet
            .http
            .get(format!("{}{path}", fleet.gateways[0]))
            .header("origin", origin)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(allow_origin(r.headers()), want, "{origin}");
    }

    // Refused preflights are counted.
    let (_, text) = {
        let r = fleet
            .http
            .get(format!("{}/metrics", fleet.gateways[0]))
            .send()
            .await
            .unwrap();
        (r.status(), r.text().await.unwrap())
    };
    assert!(
        text.lines()
            .any(|l| l.starts_with("mozaiks_http_cors_refused_total{kind=\"preflight\"}")),
        "no refusal metric"
    );
}
