//! HTTP tools against a local HTTP server: success, query parameters, error status, timeout.

use std::collections::HashMap;
use std::time::Duration;

use axum::Json;
use axum::extract::Query;
use axum::http::StatusCode;
use axum::routing::{get, post};
use mozaiks_engine::tools::call_http;
use mozaiks_packs::HttpTool;
use serde_json::{Value, json};

async fn server() -> String {
    let app = axum::Router::new()
        .route(
            "/echo",
            post(|Json(body): Json<Value>| async move { Json(json!({ "got": body })) }),
        )
        .route(
            "/order",
            get(|Query(q): Query<HashMap<String, String>>| async move {
                match q.get("id").map(String::as_str) {
                    Some("A1") => (StatusCode::OK, "shipped".to_string()),
                    _ => (StatusCode::NOT_FOUND, "no such order".to_string()),
                }
            }),
        )
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(30)).await;
                "late"
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    format!("http://{addr}")
}

fn tool(yaml: &str) -> HttpTool {
    serde_norway::from_str(yaml).unwrap()
}

#[tokio::test]
async fn a_post_tool_sends_json_and_returns_json() {
    let base = server().await;
    let t = tool(&format!("{{url: '{base}/echo', headers: {{x-demo: '1'}}}}"));
    let r = call_http(&reqwest::Client::new(), &t, &json!({"q": 1}))
        .await
        .unwrap();
    assert_eq!(r, json!({"got": {"q": 1}}));
}

#[tokio::test]
async fn a_get_tool_sends_query_parameters_and_errors_on_a_bad_status() {
    let base = server().await;
    let t = tool(&format!("{{method: GET, url: '{base}/order'}}"));
    let http = reqwest::Client::new();
    assert_eq!(
        call_http(&http, &t, &json!({"id": "A1"})).await.unwrap(),
        json!("shipped")
    );
    let e = call_http(&http, &t, &json!({"id": "B2"}))
        .await
        .unwrap_err();
    assert!(
        e.starts_with("HTTP 404") && e.contains("no such order"),
        "{e}"
    );
    let e = call_http(&http, &t, &json!("not an object"))
        .await
        .unwrap_err();
    assert!(e.contains("object"), "{e}");
}

#[tokio::test]
async fn a_slow_tool_times_out_and_an_absent_one_fails() {
    let base = server().await;
    let http = reqwest::Client::new();
    let t = tool(&format!(
        "{{method: GET, url: '{base}/slow', timeout_ms: 200}}"
    ));
    let e = call_http(&http, &t, &json!({})).await.unwrap_err();
    assert_eq!(e, "timed out after 200 ms");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let t = tool(&format!("{{url: 'http://127.0.0.1:{port}/x'}}"));
    let e = call_http(&http, &t, &json!({})).await.unwrap_err();
    assert!(e.starts_with("request failed"), "{e}");
}
