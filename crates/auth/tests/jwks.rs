//! RS256/ES256 user tokens verified with keys from a JWKS URL served by a real local HTTP server:
//! caching, `kid` rotation, refresh rate limit, unknown keys, algorithm confusion.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mozaiks_auth::{Auth, Config, Error, parse_algorithms};
use serde_json::json;

const SECRET: &str = "jwks-test-secret-that-is-long-enough-0123";
const ISSUER: &str = "https://kc.example.com/realms/acme";

fn rsa(n: u8) -> EncodingKey {
    let pem = match n {
        1 => include_str!("keys/rsa1.pem"),
        _ => include_str!("keys/rsa2.pem"),
    };
    EncodingKey::from_rsa_pem(pem.as_bytes()).unwrap()
}

fn ec() -> EncodingKey {
    EncodingKey::from_ec_pem(include_str!("keys/ec1.pem").as_bytes()).unwrap()
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Jwk {
    let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();
    let mut j = Jwk::from_encoding_key(key, alg).unwrap();
    j.common.key_id = Some(kid.into());
    j
}

/// A JWKS server on loopback whose key set the test changes, counting fetches.
struct Issuer {
    url: String,
    set: Arc<Mutex<JwkSet>>,
    fetches: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Issuer {
    async fn start(keys: Vec<Jwk>) -> Issuer {
        let set = Arc::new(Mutex::new(JwkSet { keys }));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (s, f) = (set.clone(), fetches.clone());
        let app = axum::Router::new().route(
            "/realms/acme/protocol/openid-connect/certs",
            axum::routing::get(move || {
                let (s, f) = (s.clone(), f.clone());
                async move {
                    f.fetch_add(1, Ordering::SeqCst);
                    let body = serde_json::to_value(&*s.lock().unwrap()).unwrap();
                    axum::Json(body)
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Issuer {
            url: format!("http://{addr}/realms/acme/protocol/openid-connect/certs"),
            set,
            fetches,
            task,
        }
    }

    fn set_keys(&self, keys: Vec<Jwk>) {
        self.set.lock().unwrap().keys = keys;
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for Issuer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn auth(url: &str, algs: &[Algorithm], min_refresh: Duration) -> Auth {
    let mut cfg = Config::hs256(SECRET, false).with_jwks(url, algs);
    cfg.jwks_issuer = ISSUER.into();
    cfg.jwks_min_refresh = min_refresh;
    Auth::new(cfg).unwrap()
}

fn token(key: &EncodingKey, alg: Algorithm, kid: Option<&str>, iss: &str) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(String::from);
    let claims = json!({
        "sub": "alice", "app_id": "acme", "roles": ["user"],
        "exp": chrono::Utc::now().timestamp() + 600,
        "iss": iss, "aud": "mozaiks",
    });
    jsonwebtoken::encode(&header, &claims, key).unwrap()
}

#[tokio::test]
async fn rs256_and_es256_tokens_verify_with_cached_keys_and_rotation() {
    let issuer = Issuer::start(vec![
        jwk(&rsa(1), Algorithm::RS256, "k1"),
        jwk(&ec(), Algorithm::ES256, "e1"),
    ])
    .await;
    let auth = auth(
        &issuer.url,
        &[Algorithm::RS256, Algorithm::ES256],
        Duration::ZERO,
    );

    // First use fetches the set; the next tokens use the cache.
    let t1 = token(&rsa(1), Algorithm::RS256, Some("k1"), ISSUER);
    assert!(
        matches!(auth.verify_user(&t1), Err(Error::UnknownKey)),
        "nothing cached yet"
    );
    let claims = auth.verify_user_fetching(&t1).await.unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.app_id.as_str()),
        ("alice", "acme")
    );
    let te = token(&ec(), Algorithm::ES256, Some("e1"), ISSUER);
    assert_eq!(auth.verify_user_fetching(&te).await.unwrap().sub, "alice");
    auth.verify_user_fetching(&t1).await.unwrap();
    assert_eq!(issuer.fetches(), 1, "known kids are served from the cache");

    // Rotation: the issuer adds k2 and drops k1; a k2 token triggers a refresh.
    issuer.set_keys(vec![
        jwk(&rsa(2), Algorithm::RS256, "k2"),
        jwk(&ec(), Algorithm::ES256, "e1"),
    ]);
    let t2 = token(&rsa(2), Algorithm::RS256, Some("k2"), ISSUER);
    assert_eq!(auth.verify_user_fetching(&t2).await.unwrap().sub, "alice");
    assert_eq!(issuer.fetches(), 2);
    // k1 left the set with that refresh.
    let err = auth.verify_user_fetching(&t1).await.unwrap_err();
    assert!(matches!(err, Error::UnknownKey), "{err:?}");
    assert_eq!(err.code(), "token_unknown_key");

    // A kid that is nowhere, after a refresh: 401.
    let t9 = token(&rsa(2), Algorithm::RS256, Some("k9"), ISSUER);
    let err = auth.verify_user_fetching(&t9).await.unwrap_err();
    assert_eq!(err.code(), "token_unknown_key");
    assert_eq!(err.kind(), mozaiks_auth::ErrorKind::Unauthorized);

    // The right kid with the wrong key, another issuer, no kid, an unconfigured algorithm, HS256
    // (not in this verifier's list): all refused.
    let forged = token(&rsa(1), Algorithm::RS256, Some("k2"), ISSUER);
    assert_eq!(
        auth.verify_user_fetching(&forged).await.unwrap_err().code(),
        "token_bad_signature"
    );
    let wrong_iss = token(
        &rsa(2),
        Algorithm::RS256,
        Some("k2"),
        "https://evil.example.com",
    );
    assert_eq!(
        auth.verify_user_fetching(&wrong_iss)
            .await
            .unwrap_err()
            .code(),
        "token_wrong_issuer"
    );
    let no_kid = token(&rsa(2), Algorithm::RS256, None, ISSUER);
    assert_eq!(
        auth.verify_user_fetching(&no_kid).await.unwrap_err().code(),
        "token_malformed"
    );
    let rs384 = token(&rsa(2), Algorithm::RS384, Some("k2"), ISSUER);
    assert_eq!(
        auth.verify_user_fetching(&rs384).await.unwrap_err().code(),
        "token_wrong_algorithm"
    );
    let hs = Auth::new(Config::hs256(SECRET, false))
        .unwrap()
        .mint_user("alice", "acme", &["user"], 600)
        .unwrap();
    assert_eq!(
        auth.verify_user_fetching(&hs).await.unwrap_err().code(),
        "token_wrong_algorithm",
        "HS256 user tokens are not accepted unless configured"
    );
    // An ES256 token naming an RSA key's kid: the key's family does not fit.
    let cross = token(&ec(), Algorithm::ES256, Some("k2"), ISSUER);
    assert_eq!(
        auth.verify_user_fetching(&cross).await.unwrap_err().code(),
        "token_unknown_key"
    );
    // Runtime tokens are still HS256 with the secret.
    let (rt, _) = auth.mint_runtime("acme", "alice", "c1", "hello").unwrap();
    assert_eq!(auth.verify_runtime(&rt).unwrap().chat_id, "c1");
}

#[tokio::test]
async fn unknown_kids_refetch_at_most_once_per_interval() {
    let issuer = Issuer::start(vec![jwk(&rsa(1), Algorithm::RS256, "k1")]).await;
    let auth = auth(&issuer.url, &[Algorithm::RS256], Duration::from_secs(3600));
    let t1 = token(&rsa(1), Algorithm::RS256, Some("k1"), ISSUER);
    auth.verify_user_fetching(&t1).await.unwrap();
    for i in 0..20 {
        let bogus = token(
            &rsa(1),
            Algorithm::RS256,
            Some(&format!("made-up-{i}")),
            ISSUER,
        );
        assert_eq!(
            auth.verify_user_fetching(&bogus).await.unwrap_err().code(),
            "token_unknown_key"
        );
    }
    assert_eq!(issuer.fetches(), 1, "made-up kids do not hammer the issuer");
    // A rotation within the interval is seen only once the interval has passed.
    issuer.set_keys(vec![jwk(&rsa(2), Algorithm::RS256, "k2")]);
    let t2 = token(&rsa(2), Algorithm::RS256, Some("k2"), ISSUER);
    assert_eq!(
        auth.verify_user_fetching(&t2).await.unwrap_err().code(),
        "token_unknown_key"
    );
}

#[tokio::test]
async fn secret_and_jwks_together_never_confuse_keys() {
    let issuer = Issuer::start(vec![jwk(&rsa(1), Algorithm::RS256, "k1")]).await;
    let auth = auth(
        &issuer.url,
        &[Algorithm::HS256, Algorithm::RS256],
        Duration::ZERO,
    );
    // Secret-signed user tokens still verify.
    let hs = auth.mint_user("bob", "acme", &["admin"], 600).unwrap();
    assert_eq!(auth.verify_user_fetching(&hs).await.unwrap().sub, "bob");
    let rs = token(&rsa(1), Algorithm::RS256, Some("k1"), ISSUER);
    assert_eq!(auth.verify_user_fetching(&rs).await.unwrap().sub, "alice");
    // The classic confusion: HS256 "signed" with the RSA public key as the HMAC secret.
    let public = {
        let set = issuer.set.lock().unwrap();
        serde_json::to_vec(&set.keys[0]).unwrap()
    };
    let confused = token(
        &EncodingKey::from_secret(&public),
        Algorithm::HS256,
        Some("k1"),
        "mozaiks",
    );
    assert_eq!(
        auth.verify_user_fetching(&confused)
            .await
            .unwrap_err()
            .code(),
        "token_bad_signature"
    );
}

#[tokio::test]
async fn an_unreachable_issuer_is_unavailable_not_unauthorized() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/certs");
    let auth = auth(&url, &[Algorithm::RS256], Duration::ZERO);
    let t = token(&rsa(1), Algorithm::RS256, Some("k1"), ISSUER);
    let err = auth.verify_user_fetching(&t).await.unwrap_err();
    assert_eq!(err.kind(), mozaiks_auth::ErrorKind::Unavailable, "{err:?}");
    assert_eq!(err.code(), "auth_keys_unavailable");
}

#[test]
fn bad_configurations_are_refused_at_start() {
    let url = "https://kc.example.com/certs";
    let cases: Vec<(Config, &str)> = vec![
        (
            Config {
                user_algorithms: vec![Algorithm::RS256],
                ..Config::hs256(SECRET, false)
            },
            "JWT_JWKS_URL",
        ),
        (
            Config::hs256(SECRET, false).with_jwks(url, &[Algorithm::HS256]),
            "public-key",
        ),
        (
            Config::hs256(SECRET, false).with_jwks("file:///etc/keys", &[Algorithm::RS256]),
            "http",
        ),
        (
            Config::hs256(SECRET, false).with_jwks(url, &[]),
            "no algorithm",
        ),
    ];
    for (cfg, want) in cases {
        let err = Auth::new(cfg).unwrap_err();
        assert_eq!(err.code(), "auth_config");
        assert!(err.to_string().contains(want), "{err} lacks {want}");
    }
    assert_eq!(
        parse_algorithms(" RS256, ES256 ").unwrap(),
        vec![Algorithm::RS256, Algorithm::ES256]
    );
    for bad in ["", "none", "RS256,RS256", "HS512", "rs256"] {
        assert_eq!(
            parse_algorithms(bad).unwrap_err().code(),
            "auth_config",
            "{bad}"
        );
    }
}
