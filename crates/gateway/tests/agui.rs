//! The AG-UI stream's refusals (`GET /api/agui/{app_id}/{chat_id}`), in process: the WebSocket's
//! token rules and bad resume input, answered before any stream starts (moved from the e2e test
//! `agui::agui_takes_the_websockets_auth_and_refuses_bad_input`, now
//! `agui_takes_the_ticket_as_a_bearer_and_tells_an_after_beyond_the_head`, which keeps the
//! streams: the ticket as a bearer, `after` beyond the head, a live message).

mod support;

use axum::body::Body;
use axum::http::Request;
use serde_json::{Value, json};
use support::{Gw, auth_with, token};

fn agui_path(ticket: &Value) -> String {
    format!(
        "/api/agui/{}/{}",
        ticket["app_id"].as_str().unwrap(),
        ticket["chat_id"].as_str().unwrap()
    )
}

fn token_of(ticket: &Value) -> String {
    ticket["runtime_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agui_takes_the_websockets_auth_and_refuses_bad_input() {
    let gw = Gw::start().await;
    let user = token("eve", "default", &["user"]);
    let start = json!({"app_id": "default", "workflow_name": "hello", "message": "hi"});
    let ticket = gw.post_session(&user, start.clone()).await;
    assert_eq!(ticket.status, 201, "{}", ticket.body);
    let other = gw.post_session(&user, start).await;
    assert_eq!(other.status, 201, "{}", other.body);
    let (ticket, other) = (ticket.body, other.body);
    let (path, token) = (agui_path(&ticket), token_of(&ticket));
    // (path and query, headers, status, code)
    type Case<'a> = (String, Vec<(&'a str, String)>, u16, &'a str);
    let cases: Vec<Case> = vec![
        (path.clone(), vec![], 401, "token_missing"),
        (format!("{path}?token="), vec![], 401, "token_missing"),
        (
            format!("{path}?token={user}"),
            vec![],
            401,
            "token_wrong_audience",
        ),
        (
            path.clone(),
            vec![("Authorization", format!("Bearer {user}"))],
            401,
            "token_wrong_audience",
        ),
        (
            format!("{path}?token={}", token_of(&other)),
            vec![],
            403,
            "token_scope",
        ),
        (
            format!(
                "/api/agui/other-app/{}?token={token}",
                ticket["chat_id"].as_str().unwrap()
            ),
            vec![],
            403,
            "token_scope",
        ),
        (
            format!("{path}?token={token}"),
            vec![("Last-Event-ID", "seven".into())],
            400,
            "invalid_last_event_id",
        ),
        (
            format!("{path}?token={token}&after=-1"),
            vec![],
            400,
            "invalid_query",
        ),
    ];
    let open = async |p: &str, headers: &[(&str, String)]| {
        let mut req = Request::builder()
            .uri(p)
            .header("accept", "text/event-stream");
        for (k, v) in headers {
            req = req.header(*k, v);
        }
        gw.send(req.body(Body::empty()).unwrap()).await
    };
    for (p, headers, status, want) in cases {
        let r = open(&p, &headers).await;
        assert_eq!(
            (r.status, r.code()),
            (status, want),
            "{p} {headers:?}: {}",
            r.body
        );
    }
    let forged = auth_with("another-secret-that-is-long-enough-0123456789")
        .mint_runtime(
            "default",
            "eve",
            ticket["chat_id"].as_str().unwrap(),
            "hello",
        )
        .unwrap()
        .0;
    let r = open(&format!("{path}?token={forged}"), &[]).await;
    assert_eq!(r.status, 401, "{}", r.body);
}
