//! A runtime token that expires during a connection (issue 3 item 5, DESIGN.md §4): the gateway
//! closes the socket with 1008 and a reason; the client gets a fresh token from the broker and
//! resumes with `after`, on another replica, without a gap or a duplicate.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

use crate::fleet::{Fleet, SECRET, Ws, assert_gapless, events_until, send_json};

/// Reads until the server closes; returns the close frame's code and reason. Durable frames read
/// on the way are returned too, so nothing the server sent before closing goes unchecked.
async fn until_closed(ws: &mut Ws) -> (u16, String, Vec<Value>) {
    let mut frames = Vec::new();
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("the server never closed the socket");
        match msg {
            Some(Ok(Message::Close(Some(c)))) => {
                return (u16::from(c.code), c.reason.to_string(), frames);
            }
            Some(Ok(Message::Text(t))) => {
                let f: Value = serde_json::from_str(t.as_str()).unwrap();
                if !f["seq"].is_null() {
                    frames.push(f);
                }
            }
            Some(Ok(_)) => continue,
            other => panic!("socket ended without a close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_expiring_mid_connection_closes_1008_and_a_fresh_ticket_resumes_elsewhere() {
    let fleet = Fleet::start(2).await;
    let user = Fleet::token("expiring-user", "default", &["user"]);
    let ticket = fleet.session(0, &user, "hello", Some("hello there")).await;
    let chat_id = ticket["chat_id"].as_str().unwrap().to_string();

    // The same chat, but a runtime token that lives two seconds (signed like the broker's).
    let short = mozaiks_auth::Auth::new(mozaiks_auth::Config {
        runtime_ttl_secs: 2,
        ..mozaiks_auth::Config::hs256(SECRET, false)
    })
    .unwrap();
    let (token, _) = short
        .mint_runtime("default", "expiring-user", &chat_id, "hello")
        .unwrap();
    let mut short_ticket = ticket.clone();
    short_ticket["runtime_token"] = json!(token);

    let mut ws = fleet.connect(0, &short_ticket, 0).await;
    let first = events_until(&mut ws, "run.completed").await;
    assert_gapless(&first, 1);
    let (code, reason, late) = until_closed(&mut ws).await;
    assert_eq!(code, u16::from(CloseCode::Policy), "close code: {reason}");
    assert!(reason.contains("token expired"), "close reason: {reason}");
    assert!(late.is_empty(), "no event arrived after the run: {late:?}");
    let last = first.last().unwrap()["seq"].as_u64().unwrap();

    // Reconnecting with the expired token never streams: refused before the upgrade, or (within
    // the verifier's clock-skew leeway) closed with 1008 at once.
    let url = fleet.ws_url(1, &short_ticket, last);
    match tokio_tungstenite::connect_async(url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 401)
        }
        Err(e) => panic!("unexpected connect error: {e}"),
        Ok((mut ws, _)) => {
            let (code, reason, frames) = until_closed(&mut ws).await;
            assert_eq!(code, u16::from(CloseCode::Policy), "close code: {reason}");
            assert!(frames.is_empty(), "an expired token streamed {frames:?}");
        }
    }

    // A fresh ticket from the broker (only the owner may resume), on the other replica.
    let (status, fresh) = fleet
        .post_session(
            1,
            &user,
            json!({ "app_id": "default", "workflow_name": "hello", "chat_id": chat_id }),
        )
        .await;
    assert_eq!(status, 200, "{fresh}");
    assert_eq!(fresh["resumed"], true);
    assert_eq!(fresh["last_seq"].as_u64(), Some(last));
    let mut ws = fleet.connect(1, &fresh, last).await;
    send_json(
        &mut ws,
        json!({ "type": "user.message", "text": "and again", "client_msg_id": "m-after-expiry" }),
    )
    .await;
    let second = events_until(&mut ws, "run.completed").await;
    assert_gapless(&second, last + 1);
    assert_eq!(second[0]["type"], "message.user");
    assert_eq!(second[0]["data"]["text"], "and again");

    // Someone else cannot get a ticket for the chat.
    let mallory = Fleet::token("mallory", "default", &["user"]);
    let (status, body) = fleet
        .post_session(
            0,
            &mallory,
            json!({ "app_id": "default", "workflow_name": "hello", "chat_id": chat_id }),
        )
        .await;
    assert_eq!(status, 404, "{body}");
}
