//! `/metrics` safely exposed (issue 14, item 5): behind `MOZAIKS_METRICS_TOKEN`, on a listener of
//! its own (`MOZAIKS_METRICS_LISTEN`, the API port then answers 404), on the health listener of a
//! process without a gateway, per-app labels bounded to `MOZAIKS_METRICS_TOP_APPS`, and
//! `mozaiks_build_info` with the binary's version and commit.

use serde_json::json;

use crate::fleet::{Fleet, free_port, root};

const TOKEN: &str = "metrics-token-for-the-e2e-tests";

/// (status, WWW-Authenticate, body) of `GET {url}` with the bearer token `bearer`.
async fn scrape(fleet: &Fleet, url: &str, bearer: Option<&str>) -> (u16, Option<String>, String) {
    let mut req = fleet.http.get(url);
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_string());
    (status, challenge, r.text().await.unwrap())
}

/// Waits until `url` answers (a listener that is not up yet refuses connections).
async fn wait_up(fleet: &Fleet, url: &str) {
    fleet
        .eventually(&format!("{url} to answer"), || async {
            fleet.http.get(url).send().await.ok().map(|_| ())
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_behind_a_token_on_their_own_listener_with_bounded_app_labels() {
    let env = [
        ("MOZAIKS_METRICS_TOKEN", TOKEN),
        ("MOZAIKS_METRICS_TOP_APPS", "1"),
    ];
    let mut fleet = Fleet::start_with(1, 1, &env).await;
    let api = format!("{}/metrics", fleet.gateways[0]);

    // The token: 401 with a Bearer challenge without it or with a wrong one, 200 with it.
    let (s, challenge, _) = scrape(&fleet, &api, None).await;
    assert_eq!(s, 401);
    assert!(challenge.unwrap().starts_with("Bearer"));
    let (s, _, _) = scrape(&fleet, &api, Some("metrics-token-for-the-e2e-testz")).await;
    assert_eq!(s, 401);
    let (s, _, text) = scrape(&fleet, &api, Some(TOKEN)).await;
    assert_eq!(s, 200);
    let build = format!(
        "mozaiks_build_info{{version=\"{}\",commit=\"",
        env!("CARGO_PKG_VERSION")
    );
    assert!(text.contains(&build), "no build info in:\n{text}");
    // `mozaiks --version` names the same version and commit as mozaiks_build_info.
    let version = std::process::Command::new(env!("CARGO_BIN_EXE_mozaiks"))
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    let commit = text
        .split(&build)
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .unwrap();
    assert!(
        commit == "unknown"
            || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "{commit}"
    );
    assert_eq!(
        version.trim(),
        format!("mozaiks {} ({commit})", env!("CARGO_PKG_VERSION"))
    );

    // A listener of its own: the API port no longer serves /metrics.
    let port = free_port();
    let metrics_port = free_port();
    let listen = format!("127.0.0.1:{metrics_port}");
    let mut env2 = env.to_vec();
    env2.push(("MOZAIKS_METRICS_LISTEN", &listen));
    fleet.spawn_with("gateway", Some(port), &env2);
    let gw = format!("http://127.0.0.1:{port}");
    fleet.gateways.push(gw.clone());
    fleet.wait_ready(&gw).await;
    let own = format!("http://{listen}/metrics");
    wait_up(&fleet, &own).await;
    let (s, _, body) = scrape(&fleet, &format!("{gw}/metrics"), Some(TOKEN)).await;
    assert_eq!(s, 404, "the API port still serves /metrics");
    assert!(body.contains("MOZAIKS_METRICS_LISTEN"), "{body}");
    let (s, _, _) = scrape(&fleet, &own, None).await;
    assert_eq!(s, 401);
    let (s, _, text) = scrape(&fleet, &own, Some(TOKEN)).await;
    assert_eq!(s, 200);
    assert!(text.contains(&build), "{text}");

    // A process without a gateway serves /metrics on its health listener, behind the token.
    let health = free_port();
    let health_listen = format!("127.0.0.1:{health}");
    let mut env3 = env.to_vec();
    env3.push(("MOZAIKS_HEALTH_LISTEN", &health_listen));
    fleet.spawn_with("projector", None, &env3);
    let probe = format!("http://{health_listen}/metrics");
    wait_up(&fleet, &probe).await;
    let (s, _, _) = scrape(&fleet, &probe, None).await;
    assert_eq!(s, 401);
    let (s, _, text) = scrape(&fleet, &probe, Some(TOKEN)).await;
    assert_eq!(s, 200);
    assert!(text.contains(&build), "{text}");

    // Bounded app labels: with a limit of one app, the second app's sessions count as `other`.
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "acme", "name": "Acme", "tier": "starter", "workflows": ["hello"]})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let default_user = Fleet::token("dora", "default", &["user"]);
    fleet.session(0, &default_user, "hello", None).await;
    let acme_user = Fleet::token("abe", "acme", &["user"]);
    let (s, v) = fleet
        .post_session(
            0,
            &acme_user,
            json!({"app_id": "acme", "workflow_name": "hello"}),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let text = fleet
        .eventually("both sessions in the gateway's metrics", || async {
            let (_, _, text) = scrape(&fleet, &api, Some(TOKEN)).await;
            let started: f64 = text
                .lines()
                .filter(|l| l.starts_with("mozaiks_sessions_started_total{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (started >= 2.0).then_some(text)
        })
        .await;
    // One app keeps its own label, whichever was seen first; the other one is `other`.
    let apps: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split("app_id=\"").nth(1)?.split('"').next())
        .collect();
    assert!(apps.contains("other"), "{apps:?}\n{text}");
    assert_eq!(
        apps.len(),
        2,
        "more than one app has its own label: {apps:?}"
    );
}

/// `mozaiks probe URL` (the image's healthcheck): 0 on a 200, 1 on anything else, an error on
/// a URL it cannot probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_exits_zero_only_on_a_200() {
    let fleet = Fleet::start(1).await;
    let probe = |url: String| {
        std::process::Command::new(env!("CARGO_BIN_EXE_mozaiks"))
            .arg("probe")
            .arg(url)
            .env_clear()
            .output()
            .expect("mozaiks probe")
    };
    let gw = &fleet.gateways[0];
    let ready = probe(format!("{gw}/health/ready"));
    assert!(ready.status.success(), "{ready:?}");
    let missing = probe(format!("{gw}/no/such/page"));
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
    let closed = probe(format!("http://127.0.0.1:{}/health/ready", free_port()));
    assert_eq!(closed.status.code(), Some(1), "{closed:?}");
    let https = probe("https://example.invalid/".into());
    assert!(!https.status.success());
    assert!(
        String::from_utf8_lossy(&https.stderr).contains("only http:// URLs"),
        "{https:?}"
    );
}
