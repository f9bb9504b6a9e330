//! User tokens signed RS256 by an identity provider (Keycloak-like), verified by a gateway of
//! the fleet with keys from the provider's JWKS URL, served by a local HTTP server in the test:
//! a token with a known `kid` opens a session that streams; an unknown `kid` is 401; a rotation
//! (a new `kid` served, the old one dropped) is accepted without restarting the gateway.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::fleet::*;

const ISSUER: &str = "https://kc.example.com/realms/acme";

fn rsa(n: u8) -> EncodingKey {
    let pem = match n {
        1 => include_str!("../../crates/auth/tests/keys/rsa1.pem"),
        _ => include_str!("../../crates/auth/tests/keys/rsa2.pem"),
    };
    EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
}

fn jwk(key: &EncodingKey, kid: &str) -> Jwk {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let mut j = Jwk::from_encoding_key(key, Algorithm::RS256).unwrap();
    j.common.key_id = Some(kid.into());
    j
}

fn token(key: &EncodingKey, kid: &str, sub: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.into());
    let claims = json!({
        "sub": sub, "app_id": "default", "roles": ["user"],
        "exp": chrono::Utc::now().timestamp() + 600,
        "iss": ISSUER, "aud": "mozaiks",
    });
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

/// The identity provider's JWKS endpoint, with a key set the test changes.
async fn issuer(keys: Vec<Jwk>) -> (String, Arc<Mutex<JwkSet>>, tokio::task::JoinHandle<()>) {
    let set = Arc::new(Mutex::new(JwkSet { keys }));
    let served = set.clone();
    let app = axum::Router::new().route(
        "/realms/acme/protocol/openid-connect/certs",
        axum::routing::get(move || {
            let s = served.clone();
            async move { axum::Json(serde_json::to_value(&*s.lock().unwrap()).unwrap()) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (
        format!("http://{addr}/realms/acme/protocol/openid-connect/certs"),
        set,
        task,
    )
}

fn start(text: &str) -> serde_json::Value {
    json!({"app_id": "default", "workflow_name": "hello", "message": text})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rs256_user_tokens_from_a_jwks_open_sessions_that_stream_and_rotation_needs_no_restart() {
    let (url, set, server) = issuer(vec![jwk(&rsa(1), "k1")]).await;
    let mut fleet = Fleet::start(0).await;
    let port = free_port();
    fleet.spawn_with(
        "gateway",
        Some(port),
        &[
            ("JWT_JWKS_URL", url.as_str()),
            ("JWT_JWKS_ISSUER", ISSUER),
            ("JWT_ALGORITHMS", "HS256,RS256"),
            ("JWT_JWKS_MIN_REFRESH_SECONDS", "1"),
        ],
    );
    let base = format!("http://127.0.0.1:{port}");
    fleet.wait_ready(&base).await;
    fleet.gateways.push(base);

    // A token signed with the provider's key k1 opens a session, which streams to the end.
    let alice = token(&rsa(1), "k1", "alice");
    let (s, ticket) = fleet
        .post_session(0, &alice, start("hello over jwks"))
        .await;
    assert_eq!(s, 201, "{ticket}");
    assert!(
        ticket["ws_url"].as_str().unwrap().ends_with("/alice"),
        "{ticket}"
    );
    let mut ws = fleet.connect(0, &ticket, 0).await;
    let frames = events_until(&mut ws, "run.completed").await;
    assert_gapless(&frames, 1);
    assert_eq!(frames[0]["type"], "session.started");
    let chat = ticket["chat_id"].as_str().unwrap();
    fleet
        .eventually("alice's session in the read model", || async {
            let (s, v) = fleet.get(0, &format!("/api/sessions/{chat}"), &alice).await;
            (s == 200 && v["user_id"] == "alice").then_some(())
        })
        .await;
    let (s, v) = fleet.get(0, "/api/workflows", &alice).await;
    assert_eq!(s, 200, "{v}");

    // A token naming a kid the provider does not serve: 401, after one fetch of the set.
    let (s, v) = fleet
        .post_session(0, &token(&rsa(2), "k-unknown", "mallory"), start("x"))
        .await;
    assert_eq!((s, code(&v)), (401, "token_unknown_key"), "{v}");
    // Signed with another key under a known kid: 401 as well.
    let (s, v) = fleet
        .post_session(0, &token(&rsa(2), "k1", "mallory"), start("x"))
        .await;
    assert_eq!(s, 401, "{v}");

    // Rotation: the provider now serves k2 only. Without a restart, k2 tokens are accepted (the
    // gateway fetches the set again for the new kid) and k1 tokens no longer are.
    set.lock().unwrap().keys = vec![jwk(&rsa(2), "k2")];
    tokio::time::sleep(Duration::from_millis(1100)).await; // the refresh floor set above
    let bob = token(&rsa(2), "k2", "bob");
    let (s, ticket) = fleet.post_session(0, &bob, start("after rotation")).await;
    assert_eq!(s, 201, "{ticket}");
    let mut ws = fleet.connect(0, &ticket, 0).await;
    let frames = events_until(&mut ws, "run.completed").await;
    assert_gapless(&frames, 1);
    let (s, v) = fleet.post_session(0, &alice, start("old key")).await;
    assert_eq!(s, 401, "the dropped key no longer verifies: {v}");
    server.abort();
}
