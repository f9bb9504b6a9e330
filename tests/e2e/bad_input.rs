//! Bad input gets a clear error and loses nothing; one tenant never sees another's data.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

use crate::fleet::*;

/// The rest of the HTTP error-code and authorization matrix (tokens, bodies, listing, usage,
/// workflows, unknown endpoints and methods) runs in process: crates/gateway/tests/http_errors.rs.
/// What stays here needs a worker and a projector: a chat in the read model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projected_chat_is_hidden_from_other_users_and_apps() {
    let fleet = Fleet::start(1).await;
    let alice = Fleet::token("alice", "default", &["user"]);
    let body = json!({"app_id": "default", "workflow_name": "hello"});
    let (ticket_status, ticket) = fleet.post_session(0, &alice, body.clone()).await;
    assert_eq!(ticket_status, 201);

    // Cross-user and cross-tenant reads: another user of the app gets 404 for alice's chat, as
    // does a user of another app; nobody learns whether it exists.
    let chat = ticket["chat_id"].as_str().unwrap().to_string();
    fleet
        .eventually("alice's session projected", || async {
            (fleet
                .get(0, &format!("/api/sessions/{chat}"), &alice)
                .await
                .0
                == 200)
                .then_some(())
        })
        .await;
    let mallory = Fleet::token("mallory", "default", &["user"]);
    let outsider = Fleet::token("alice", "ghost", &["user", "admin"]);
    for (who, token) in [("other user", &mallory), ("other app", &outsider)] {
        for path in [
            format!("/api/sessions/{chat}"),
            format!("/api/sessions/{chat}/messages"),
        ] {
            let (s, v) = fleet.get(0, &path, token).await;
            assert_eq!((s, code(&v)), (404, "chat_not_found"), "{who} {path}");
        }
    }
    // Resuming someone else's chat: 404, and no ticket.
    let (s, v) = fleet
        .post_session(
            0,
            &mallory,
            json!({"app_id": "default", "workflow_name": "hello", "chat_id": chat}),
        )
        .await;
    assert_eq!((s, code(&v)), (404, "chat_not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_bad_input_is_refused_and_the_connection_survives() {
    let fleet = Fleet::start(1).await;
    let alice = Fleet::token("alice", "default", &["user"]);
    let ticket = fleet.session(0, &alice, "hello", None).await;
    let other = fleet.session(0, &alice, "hello", None).await;

    // Upgrade refusals: no token, a user token, a runtime token for another chat, path user/app mismatch.
    let url = fleet.ws_url(0, &ticket, 0);
    let base = url.split("?token=").next().unwrap().to_string();
    let status = |u: String| async move {
        match tokio_tungstenite::connect_async(u.into_client_request().unwrap()).await {
            Ok(_) => 101,
            Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
            Err(e) => panic!("unexpected {e}"),
        }
    };
    assert_eq!(status(base.clone()).await, 401);
    assert_eq!(status(format!("{base}?token={alice}")).await, 401);
    assert_eq!(
        status(format!(
            "{base}?token={}",
            other["runtime_token"].as_str().unwrap()
        ))
        .await,
        403
    );
    let rt = ticket["runtime_token"].as_str().unwrap();
    assert_eq!(
        status(format!("{}?token={rt}", base.replace("/alice", "/mallory"))).await,
        403
    );
    assert_eq!(
        status(format!(
            "{}?token={rt}",
            base.replace("/default/", "/ghost/")
        ))
        .await,
        403
    );
    assert_eq!(status(format!("{base}?token={rt}&after=-1")).await, 400);

    // A good connection; malformed frames get error frames and it stays up.
    let mut ws = fleet.connect(0, &ticket, 0).await;
    let mut bystander = fleet.connect(0, &ticket, 0).await;
    events_n(&mut ws, 1).await;
    events_n(&mut bystander, 1).await;
    for (frame, want) in [
        ("not json", "bad_json"),
        ("[]", "bad_frame"),
        (r#"{"type":"launch"}"#, "unknown_type"),
        (r#"{"type":"user.message"}"#, "bad_frame"),
        (r#"{"type":"user.message","text":""}"#, "bad_frame"),
        (
            r#"{"type":"input.response","text":"yes"}"#,
            "not_waiting_for_input",
        ),
    ] {
        ws.send(Message::Text(frame.into())).await.unwrap();
        let f = next_frame(&mut ws).await;
        assert_eq!(f["type"], "error", "{frame}");
        assert!(f["seq"].is_null());
        assert_eq!(f["data"]["code"], want, "{frame}");
    }
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(next_frame(&mut ws).await["data"]["code"], "bad_frame");
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_frame(&mut ws).await["type"], "pong");
    // after beyond the head: an error frame, then live events.
    let mut ahead = fleet.connect(0, &ticket, 99).await;
    let f = next_frame(&mut ahead).await;
    assert_eq!(f["data"]["code"], "after_beyond_head");

    // An oversized frame closes only that connection, with a reason.
    let big = "x".repeat(70 * 1024);
    let _ = ws
        .send(Message::Text(
            json!({"type": "user.message", "text": big})
                .to_string()
                .into(),
        ))
        .await;
    let close = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("close in time")
        {
            Some(Ok(Message::Close(c))) => break c,
            Some(Ok(_)) => continue,
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    let close = close.expect("a close code");
    assert_eq!(u16::from(close.code), 1009);
    assert!(!close.reason.is_empty());
    // The bystander on the same chat still works.
    send_json(
        &mut bystander,
        json!({"type": "user.message", "text": "still here"}),
    )
    .await;
    let frames = events_until(&mut bystander, "run.completed").await;
    assert_eq!(frames[0]["data"]["text"], "still here");
    assert_gapless(&frames, 2);
}

/// `mozaiks_active_connections{app_id="{app}"}` on gateway `gw` (0 when absent).
async fn active_connections(fleet: &Fleet, gw: usize, app: &str) -> f64 {
    let text = fleet
        .http
        .get(format!("{}/metrics", fleet.gateways[gw]))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!("mozaiks_active_connections{{app_id=\"{app}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(series.as_str()))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

/// Waits until gateway `gw` counts `n` open WebSockets of `app`.
async fn connections_become(fleet: &Fleet, gw: usize, app: &str, n: f64) {
    fleet
        .eventually(&format!("{n} open connections of {app}"), || async {
            (active_connections(fleet, gw, app).await == n).then_some(())
        })
        .await;
}

/// The status of a WebSocket upgrade (101 when it opened; the socket is dropped).
async fn upgrade_status(url: String) -> u16 {
    match tokio_tungstenite::connect_async(url.into_client_request().unwrap()).await {
        Ok(_) => 101,
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => r.status().as_u16(),
        Err(e) => panic!("unexpected {e}"),
    }
}

/// Issue 9, defect 3: a CR or LF in a client's id panicked the socket's handler inside the NATS
/// header conversion (`Nats-Msg-Id`) and left a zombie socket: streaming, but past its token's
/// expiry, outside the per-user limit and never leaving the connection gauge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_in_client_ids_get_an_error_frame_and_the_socket_lives_on() {
    let fleet = Fleet::start(1).await;
    // An app with a per-user limit of 2, so the test sees whether the socket still counts.
    let (s, v, _) = fleet
        .call(
            0,
            "POST",
            "/api/apps",
            &root(),
            Some(json!({"app_id": "crlf", "name": "crlf", "tier": "starter",
                        "limits": {"max_websockets_per_user": 2}})),
        )
        .await;
    assert_eq!(s, 201, "{v}");
    let alice = Fleet::token("alice", "crlf", &["user"]);
    let (s, ticket) = fleet
        .post_session(
            0,
            &alice,
            json!({"app_id": "crlf", "workflow_name": "hello"}),
        )
        .await;
    assert_eq!(s, 201, "{ticket}");
    let mut ws = fleet.connect(0, &ticket, 0).await;
    events_n(&mut ws, 1).await;
    connections_become(&fleet, 0, "crlf", 1.0).await;

    for (frame, what) in [
        (
            json!({"type": "user.message", "text": "hi", "client_msg_id": "a\nb"}),
            "client_msg_id",
        ),
        (
            json!({"type": "user.message", "text": "hi", "client_msg_id": "a\r\nNats-Expected-Stream: x"}),
            "client_msg_id",
        ),
        (
            json!({"type": "user.message", "text": "hi", "client_msg_id": "nul\u{0}"}),
            "client_msg_id",
        ),
        (
            json!({"type": "input.response", "text": "yes", "request_id": "r\n1"}),
            "request_id",
        ),
    ] {
        send_json(&mut ws, frame.clone()).await;
        let f = next_frame(&mut ws).await;
        assert_eq!(f["type"], "error", "{frame}: {f}");
        assert!(f["seq"].is_null());
        assert_eq!(f["data"]["code"], "bad_frame", "{frame}: {f}");
        assert!(f["data"]["message"].as_str().unwrap().contains(what), "{f}");
    }

    // The socket still works: a ping, then a message with a good id runs to the end.
    send_json(&mut ws, json!({"type": "ping"})).await;
    assert_eq!(next_frame(&mut ws).await["type"], "pong");
    send_json(
        &mut ws,
        json!({"type": "user.message", "text": "still here", "client_msg_id": "ok-1"}),
    )
    .await;
    let frames = events_until(&mut ws, "run.completed").await;
    assert_eq!(frames[0]["type"], "message.user");
    assert_eq!(frames[0]["data"]["text"], "still here");
    assert_gapless(&frames, 2);

    // The server is healthy, and the socket still counts: against the gauge and the per-user
    // limit (one more fits, a third is refused).
    let r = fleet
        .http
        .get(format!("{}/health/ready", fleet.gateways[0]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(active_connections(&fleet, 0, "crlf").await, 1.0);
    let mut second = fleet.connect(0, &ticket, 0).await;
    events_n(&mut second, 1).await;
    assert_eq!(upgrade_status(fleet.ws_url(0, &ticket, 0)).await, 429);

    // Closed, the socket leaves the gauge and frees its slot.
    ws.close(None).await.unwrap();
    drop(ws);
    connections_become(&fleet, 0, "crlf", 1.0).await;
    let mut third = fleet.connect(0, &ticket, 0).await;
    events_n(&mut third, 1).await;
    connections_become(&fleet, 0, "crlf", 2.0).await;
    drop(second);
    drop(third);
    connections_become(&fleet, 0, "crlf", 0.0).await;
}

/// A connection is in `mozaiks_active_connections` while open, and leaves it whichever way it
/// ends: a close frame, a dropped TCP connection, a protocol error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_gauge_goes_back_down_however_a_socket_ends() {
    let fleet = Fleet::start(1).await;
    let alice = Fleet::token("alice", "default", &["user"]);
    let ticket = fleet.session(0, &alice, "hello", None).await;
    let mut polite = fleet.connect(0, &ticket, 0).await;
    let rude = fleet.connect(0, &ticket, 0).await;
    let mut oversized = fleet.connect(0, &ticket, 0).await;
    events_n(&mut polite, 1).await;
    connections_become(&fleet, 0, "default", 3.0).await;
    polite.close(None).await.unwrap();
    connections_become(&fleet, 0, "default", 2.0).await;
    // Gone without a close frame.
    drop(rude);
    connections_become(&fleet, 0, "default", 1.0).await;
    // Closed by the server (1009).
    let _ = oversized
        .send(Message::Text("x".repeat(70 * 1024).into()))
        .await;
    connections_become(&fleet, 0, "default", 0.0).await;
}

/// Issue 9, defect 4: `?%74oken=<runtime token>` is read as `token` by the WebSocket route, so
/// the request log must redact it as well (it was logged in full at `tower_http=debug`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_percent_encoded_token_parameter_works_and_is_redacted_from_the_log() {
    let mut fleet = Fleet::start(1).await;
    // A second gateway logging every request (tower_http's request events carry the URI).
    let port = free_port();
    let traced = fleet.spawn_with(
        "gateway",
        Some(port),
        &[("LOG_LEVEL", "debug,async_nats=warn,hyper=info,h2=info")],
    );
    let base = format!("http://127.0.0.1:{port}");
    fleet.wait_ready(&base).await;
    fleet.gateways.push(base);
    let gw = fleet.gateways.len() - 1;
    let alice = Fleet::token("alice", "default", &["user"]);
    let ticket = fleet.session(gw, &alice, "hello", None).await;
    let token = ticket["runtime_token"].as_str().unwrap().to_string();
    for name in ["%74oken", "t%6Fken", "%74%6F%6B%65%6E"] {
        let url = fleet
            .ws_url(gw, &ticket, 0)
            .replacen("?token=", &format!("?{name}="), 1);
        assert!(url.contains(&format!("?{name}={token}")), "{url}");
        let (mut ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("the route reads the encoded name as token");
        assert_eq!(events_n(&mut ws, 1).await[0]["type"], "session.started");
        ws.close(None).await.unwrap();
    }
    let log_path = fleet.procs[traced].log.clone();
    let logged = fleet
        .eventually("the requests in the gateway's log", || async {
            let log = std::fs::read_to_string(&log_path).unwrap_or_default();
            log.contains("%74%6F%6B%65%6E=").then_some(log)
        })
        .await;
    assert!(
        !logged.contains(&token),
        "the runtime token is in the log:\n{logged}"
    );
    // The signature alone (the part that makes the token usable) is not there either.
    let signature = token.rsplit('.').next().unwrap();
    assert!(!logged.contains(signature), "{logged}");
    for name in ["%74oken", "t%6Fken", "%74%6F%6B%65%6E"] {
        assert!(
            logged.contains(&format!("{name}=REDACTED")),
            "{name} not redacted:\n{logged}"
        );
    }
}
