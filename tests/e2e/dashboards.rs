//! The dashboards and alert rules of `deploy/` against a live fleet (issue 14, items 1 and 2): a
//! real Prometheus (Debian's package, installed by scripts/prometheus.sh) scrapes a fleet under
//! load, with `/metrics` behind the bearer token; every panel's query of
//! `deploy/grafana/dashboards/*.json`, every alert rule of `deploy/prometheus/rules/` and every
//! dashboard variable's `label_values` query is evaluated through Prometheus's HTTP API and must
//! return data.
//!
//! Alert expressions are evaluated with their comparisons turned into `bool` comparisons
//! (`sum(x) > 5000` becomes `sum(x) > bool 5000`), so that a quiet fleet still returns a series:
//! what is checked is that every metric the rule names exists, not that it fires. Fallbacks of
//! panels and rules (`or vector(0)`, for counters without a series yet) are left out, so each
//! query must return a real series: the load includes a WebSocket that never reads while its
//! chat's log grows by 2,500 events of 16 KiB, until the gateway closes it as a slow consumer
//! (`mozaiks_ws_slow_consumer_closes_total`; its queue of 1,024 frames and the kernel's buffers
//! are full). `mozaiks_http_requests_total` must be labelled by route template, never by a
//! concrete path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use mozaiks_bus::Bus;
use mozaiks_events::{AgentMessage, Envelope, Event};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

use crate::fleet::{Fleet, Ws, free_port, next_frame, send_json};

const TOKEN: &str = "dashboards-metrics-token-0123456789";

/// The directory holding `prometheus` (scripts/prometheus.sh path).
fn prometheus_bin() -> PathBuf {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(repo.join("scripts/prometheus.sh"))
        .arg("install")
        .status()
        .expect("scripts/prometheus.sh");
    assert!(out.success(), "scripts/prometheus.sh install failed");
    let dir = Command::new(repo.join("scripts/prometheus.sh"))
        .arg("path")
        .output()
        .expect("scripts/prometheus.sh path");
    PathBuf::from(String::from_utf8(dir.stdout).unwrap().trim()).join("prometheus")
}

struct Prometheus {
    child: Child,
    url: String,
    dir: PathBuf,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("prometheus files kept in {}", self.dir.display());
        }
    }
}

/// A Prometheus scraping `targets` (`job`, `host:port`) every second with the bearer token,
/// with the alert rules of deploy/prometheus/rules loaded.
fn start_prometheus(targets: &[(&str, String)]) -> Prometheus {
    let bin = prometheus_bin();
    let dir = std::env::temp_dir().join(format!("mozaiks-prom-{}", uuid::Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/prometheus/rules");
    let mut config = format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nrule_files: [\"{}/*.yml\"]\nscrape_configs:\n",
        rules.display()
    );
    for (job, target) in targets {
        config.push_str(&format!(
            "  - job_name: {job}-{port}\n    authorization: {{credentials_file: {token}}}\n    static_configs: [{{targets: [\"{target}\"]}}]\n",
            port = target.rsplit(':').next().unwrap(),
            token = dir.join("token").display(),
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), config).unwrap();
    let port = free_port();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(bin)
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start prometheus");
    Prometheus {
        child,
        url: format!("http://127.0.0.1:{port}"),
        dir,
    }
}

/// An OpenAI-compatible endpoint that refuses every call with 400: the runs of the worker
/// pointed at it fail (the error-rate panels and the seeds' `mozaiks_workflow_errors_total`).
async fn refusing_model() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = vec![0u8; 65536];
                let _ = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await;
                let body =
                    r#"{"error":{"message":"refused by the test","type":"invalid_request_error"}}"#;
                let answer = format!(
                    "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(answer.as_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    format!("http://{addr}/v1")
}

/// Reads durable frames until the run ends; returns its last seq and whether it failed.
async fn until_run_ends(ws: &mut Ws) -> (u64, bool) {
    loop {
        let f = next_frame(ws).await;
        let t = f["type"].as_str().unwrap_or_default();
        if t == "run.completed" || t == "run.failed" {
            return (f["seq"].as_u64().unwrap(), t == "run.failed");
        }
    }
}

/// Every panel's queries of every dashboard: (dashboard file, panel title, expr).
fn panel_queries() -> Vec<(String, String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards");
    let mut out = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 2, "no dashboards in {}", dir.display());
    for f in files {
        let d: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        for p in d["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let expr = without_fallback(
                    &t["expr"]
                        .as_str()
                        .unwrap()
                        .replace("$__rate_interval", "30s")
                        .replace("$app_id", ".*"),
                );
                out.push((name.clone(), p["title"].as_str().unwrap().to_string(), expr));
            }
        }
    }
    out
}

/// `expr` without its `or vector(0)` fallbacks: the series itself must exist.
fn without_fallback(expr: &str) -> String {
    expr.replace(" or vector(0)", "")
}

/// Makes gateway `gw` close a socket as a slow consumer, as tests/e2e/gateway.rs does: a quiet
/// chat's WebSocket, once live, is never read while 2,500 agent messages of 16 KiB are appended to the chat's
/// log (the way its worker appends), more than the socket's queue (1,024 frames) and the
/// kernel's buffers hold. It sends a ping now and then, so the idle timeout does not close it
/// first.
async fn slow_consumer_close(fleet: &Fleet, token: &str, gw: usize) {
    let bus = Bus::connect(&fleet.servers.nats_url, &fleet.servers.namespace, "e2e")
        .await
        .unwrap();
    let ticket = fleet.session(gw, token, "hello", None).await;
    let (app, chat) = (
        ticket["app_id"].as_str().unwrap().to_string(),
        ticket["chat_id"].as_str().unwrap().to_string(),
    );
    // Quiet: whatever the start command makes the worker append is in.
    let mut last = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = bus.chat_position(&app, &chat).await.unwrap().seq;
        if now > 0 && now == last {
            break;
        }
        last = now;
    }
    let (mut pings, mut never_read) = fleet.connect(gw, &ticket, last).await.split();
    let text = "x".repeat(16 * 1024);
    let mut failures = 0;
    for step in 0..2501u32 {
        if step == 1 {
            // Live first: the socket reads the first appended event, and nothing after it. (A
            // socket that falls behind while it is still catching up from the log is not closed:
            // the catch-up waits for it.)
            loop {
                let f = match never_read.next().await {
                    Some(Ok(Message::Text(t))) => serde_json::from_str::<Value>(&t).unwrap(),
                    Some(Ok(_)) => continue,
                    other => panic!("the socket ended before it was live: {other:?}"),
                };
                if f["seq"].as_u64() == Some(last + 1) {
                    break;
                }
            }
        }
        if step % 250 == 0 {
            let _ = pings
                .send(Message::Text(json!({"type": "ping"}).to_string().into()))
                .await;
        }
        loop {
            let pos = bus.chat_position(&app, &chat).await.unwrap();
            let env = Envelope {
                v: 1,
                event_id: uuid::Uuid::now_v7(),
                app_id: app.clone(),
                chat_id: chat.clone(),
                user_id: "lou".into(),
                workflow: "hello".into(),
                seq: pos.seq + 1,
                ts: chrono::Utc::now(),
                parent_chat_id: None,
                causation_id: None,
                event: Event::AgentMessage(AgentMessage {
                    run_id: uuid::Uuid::nil(),
                    step,
                    agent: "load".into(),
                    text: text.clone(),
                    structured: None,
                }),
            };
            match bus.append(&env, pos.stream_seq).await {
                Ok(_) => {
                    // Paced: the socket's live feed must not lag (a lagging feed is caught up
                    // from the log, and that catch-up waits for the socket instead of closing it).
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    break;
                }
                Err(mozaiks_bus::Error::Conflict { .. }) => continue,
                // A loaded machine: an ack may be late (the event may have landed; the position
                // is read again either way).
                Err(e) => {
                    failures += 1;
                    assert!(failures < 20, "appends keep failing: {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = fleet
            .http
            .get(format!("{}/metrics", fleet.gateways[gw]))
            .bearer_auth(TOKEN)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics
            .lines()
            .any(|l| l.starts_with("mozaiks_ws_slow_consumer_closes_total"))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no slow-consumer close on {}",
            fleet.gateways[gw]
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Every `label_values(metric, label)` query of the dashboards' variables: (metric, label).
fn variable_queries() -> Vec<(String, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/grafana/dashboards");
    let mut out = Vec::new();
    for e in std::fs::read_dir(&dir).unwrap() {
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(e.unwrap().path()).unwrap()).unwrap();
        for v in d["templating"]["list"].as_array().unwrap() {
            let Some(q) = v["query"]["query"].as_str() else {
                continue;
            };
            let args = q
                .strip_prefix("label_values(")
                .and_then(|r| r.strip_suffix(')'))
                .unwrap_or_else(|| panic!("a variable query that is not label_values: {q}"));
            let (metric, label) = args.split_once(',').unwrap();
            out.push((metric.trim().to_string(), label.trim().to_string()));
        }
    }
    out
}

/// `expr` with every comparison against a number made a `bool` comparison.
fn comparisons_as_bool(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(i) = rest.find(['>', '<', '=', '!']) {
        let (head, tail) = rest.split_at(i);
        out.push_str(head);
        let op_len = if tail.len() > 1 && tail.as_bytes()[1] == b'=' {
            2
        } else {
            1
        };
        let (op, after) = tail.split_at(op_len);
        let trimmed = after.trim_start();
        let is_comparison =
            op != "=" && op != "!" && trimmed.starts_with(|c: char| c.is_ascii_digit());
        out.push_str(op);
        if is_comparison {
            out.push_str(" bool ");
            rest = trimmed;
        } else {
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

#[test]
fn comparisons_become_bool_and_matchers_stay() {
    assert_eq!(
        comparisons_as_bool(r#"sum(x{a!="b",c=~"d"}) > 5000 and on () (y >= 10) or up == 0"#),
        r#"sum(x{a!="b",c=~"d"}) > bool 5000 and on () (y >= bool 10) or up == bool 0"#
    );
}

/// The result of an instant query (the `data.result` array), or the error.
async fn query(http: &reqwest::Client, prom: &str, expr: &str) -> Result<Vec<Value>, String> {
    let r = http
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = r.json().await.map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(v.to_string());
    }
    Ok(v["data"]["result"].as_array().cloned().unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_returns_data_from_a_fleet_under_load() {
    let token_env = [("MOZAIKS_METRICS_TOKEN", TOKEN)];
    let mut fleet = Fleet::start_with(2, 1, &token_env).await;
    let model = refusing_model().await;

    // Processes with a health (and metrics) listener each: a worker on the offline model, a
    // worker whose model refuses every call, a projector, billing.
    let mut targets: Vec<(&str, String)> = fleet
        .gateways
        .iter()
        .map(|g| {
            (
                "mozaiks-gateway",
                g.trim_start_matches("http://").to_string(),
            )
        })
        .collect();
    for (role, extra) in [
        ("worker", None),
        ("worker", Some(model.as_str())),
        ("projector", None),
        ("billing", None),
    ] {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut env = vec![
            ("MOZAIKS_METRICS_TOKEN", TOKEN),
            ("MOZAIKS_HEALTH_LISTEN", addr.as_str()),
            ("MOZAIKS_DRAIN_SECONDS", "3"),
            // The projector counts every app's documents each second (storage panels).
            ("MOZAIKS_METRICS_STORAGE_SECONDS", "1"),
        ];
        if let Some(url) = extra {
            env.push(("OPENAI_BASE_URL", url));
            env.push(("OPENAI_API_KEY", "sk-test"));
        }
        fleet.spawn_with(role, None, &env);
        fleet.wait_ready(&format!("http://{addr}")).await;
        targets.push((
            match role {
                "worker" => "mozaiks-worker",
                "projector" => "mozaiks-projector",
                _ => "mozaiks-billing",
            },
            addr,
        ));
    }
    let prom = start_prometheus(&targets);

    // Load: chats on both gateways, each run to its end, sockets resumed on the other replica
    // and some left open while Prometheus scrapes.
    let user = Fleet::token("lou", "default", &["user"]);
    let mut open = Vec::new();
    let started = Instant::now();
    let mut chats = 0;
    let mut failed = 0;
    while chats < 12 || (failed == 0 && started.elapsed() < Duration::from_secs(60)) {
        let gw = chats % 2;
        let ticket = fleet.session(gw, &user, "hello", Some("hello there")).await;
        let mut ws = fleet.connect(gw, &ticket, 0).await;
        let (last, run_failed) = until_run_ends(&mut ws).await;
        ws.close(None).await.ok();
        // Resume on the other replica after the first event: a replay of the rest.
        let mut again = fleet.connect(1 - gw, &ticket, 1).await;
        for _ in 1..last {
            next_frame(&mut again).await;
        }
        // A client frame (the frames-in panel): a ping, answered without a durable event.
        send_json(&mut again, serde_json::json!({"type": "ping"})).await;
        open.push(again);
        failed += usize::from(run_failed);
        chats += 1;
    }

    // A slow consumer closed by gateway 0.
    slow_consumer_close(&fleet, &user, 0).await;

    // Every panel's query and every alert rule's expression, until all return data.
    let http = reqwest::Client::new();
    let panels = panel_queries();
    let variables = variable_queries();
    assert!(!variables.is_empty(), "no dashboard variable");
    let deadline = Instant::now() + Duration::from_secs(90);
    let missing = loop {
        let mut missing = Vec::new();
        for (file, title, expr) in &panels {
            match query(&http, &prom.url, expr).await {
                Ok(r) if !r.is_empty() => {}
                Ok(_) => missing.push(format!("{file} / {title}: no data for {expr}")),
                Err(e) => missing.push(format!("{file} / {title}: {e} in {expr}")),
            }
        }
        for (metric, label) in &variables {
            let values: Value = match http
                .get(format!("{}/api/v1/label/{label}/values", prom.url))
                .query(&[("match[]", metric.as_str())])
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(e) => Value::String(e.to_string()),
            };
            if values["data"].as_array().is_none_or(|v| v.is_empty()) {
                missing.push(format!("variable {label}: no values of {metric}: {values}"));
            }
        }
        match http.get(format!("{}/api/v1/rules", prom.url)).send().await {
            Ok(r) => {
                let v: Value = r.json().await.unwrap_or(Value::Null);
                let groups = v["data"]["groups"].as_array().cloned().unwrap_or_default();
                let rules: Vec<Value> = groups
                    .iter()
                    .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                    .collect();
                if rules.len() < 10 {
                    missing.push(format!(
                        "Prometheus loaded {} alert rules: {v}",
                        rules.len()
                    ));
                }
                for rule in rules {
                    let name = rule["name"].as_str().unwrap_or_default().to_string();
                    if rule["health"] == "err" {
                        missing.push(format!("alert {name}: {}", rule["lastError"]));
                    }
                    let expr = comparisons_as_bool(&without_fallback(
                        rule["query"].as_str().unwrap_or_default(),
                    ));
                    match query(&http, &prom.url, &expr).await {
                        Ok(r) if !r.is_empty() => {}
                        Ok(_) => missing.push(format!("alert {name}: no data for {expr}")),
                        Err(e) => missing.push(format!("alert {name}: {e} in {expr}")),
                    }
                }
            }
            Err(e) => missing.push(format!("rules: {e}")),
        }
        // HTTP requests by route template: never a concrete chat id or app id in the label.
        match query(
            &http,
            &prom.url,
            "count by (route) (mozaiks_http_requests_total)",
        )
        .await
        {
            Ok(series) => {
                let routes: Vec<&str> = series
                    .iter()
                    .filter_map(|s| s["metric"]["route"].as_str())
                    .collect();
                if !routes.contains(&"/api/sessions") {
                    missing.push(format!(
                        "no POST /api/sessions in the HTTP routes: {routes:?}"
                    ));
                }
                for r in &routes {
                    if *r != "unmatched" && (!r.starts_with('/') || r.contains("default")) {
                        missing.push(format!("an HTTP route label that is not a template: {r}"));
                    }
                }
            }
            Err(e) => missing.push(format!("HTTP routes: {e}")),
        }
        if missing.is_empty() || Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    };
    let prom_log = std::fs::read_to_string(prom.dir.join("prometheus.log")).unwrap_or_default();
    assert!(
        missing.is_empty(),
        "{} of {} queries return nothing ({chats} chats, {failed} failed):\n{}\nprometheus log tail:\n{}",
        missing.len(),
        panels.len(),
        missing.join("\n"),
        prom_log
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    drop(open);
}
