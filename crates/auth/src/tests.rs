//! Unit tests: verification rules, minting, error classification, redaction.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Utc;
use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{Value, json};

use crate::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-secret";
const OTHER_SECRET: &[u8] = b"an-attacker-controlled-secret-0123456789abcdef";

fn auth() -> Auth {
    Auth::new(Config::hs256(SECRET, false)).expect("valid config")
}

fn now() -> i64 {
    Utc::now().timestamp()
}

fn user_claims() -> Value {
    json!({
        "sub": "user-1",
        "app_id": "app_1",
        "roles": ["member"],
        "exp": now() + 600,
        "iat": now(),
        "iss": "mozaiks",
        "aud": "mozaiks",
    })
}

fn runtime_claims() -> Value {
    json!({
        "sub": "user-1",
        "app_id": "app_1",
        "chat_id": "chat_1",
        "workflow": "support",
        "exp": now() + 600,
        "iat": now(),
        "jti": "jti-1",
        "iss": "mozaiks",
        "aud": "mozaiks-runtime",
    })
}

/// Returns `claims` with `key` set to `value` (or removed when `value` is null).
fn with(mut claims: Value, key: &str, value: Value) -> Value {
    let map = claims.as_object_mut().expect("object");
    if value.is_null() {
        map.remove(key);
    } else {
        map.insert(key.to_owned(), value);
    }
    claims
}

fn encode_part(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).expect("json"))
}

/// Builds a token by hand: any header, any claims, signed with `key` using `alg`.
fn sign_with(header: Value, claims: &Value, key: &[u8], alg: Algorithm) -> String {
    let message = format!("{}.{}", encode_part(&header), encode_part(claims));
    let signature =
        jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(key), alg)
            .expect("sign");
    format!("{message}.{signature}")
}

fn hs256(claims: &Value) -> String {
    sign_with(
        json!({"alg": "HS256", "typ": "JWT"}),
        claims,
        SECRET,
        Algorithm::HS256,
    )
}

#[track_caller]
fn refused<T: std::fmt::Debug>(result: Result<T, Error>) -> Error {
    let err = result.expect_err("token should be refused");
    assert_eq!(err.kind(), ErrorKind::Unauthorized, "{err:?}");
    err
}

// ---- valid tokens ----

#[test]
fn valid_user_token() {
    let claims = auth().verify_user(&hs256(&user_claims())).expect("valid");
    assert_eq!(claims.user_id(), "user-1");
    assert_eq!(claims.app_id, "app_1");
    assert_eq!(claims.roles, ["member"]);
    assert_eq!(
        (claims.iss.as_str(), claims.aud.as_str()),
        ("mozaiks", "mozaiks")
    );
    assert!(claims.iat.is_some() && claims.nbf.is_none());
    assert!(!claims.is_admin() && !claims.is_superadmin());
}

#[test]
fn roles_admin_and_superadmin() {
    let auth = auth();
    let admin = auth
        .verify_user(&hs256(&with(user_claims(), "roles", json!(["admin"]))))
        .unwrap();
    assert!(admin.is_admin() && !admin.is_superadmin());
    let sup = auth
        .verify_user(&hs256(&with(user_claims(), "roles", json!(["superadmin"]))))
        .unwrap();
    assert!(sup.is_admin() && sup.is_superadmin());
    let none = auth
        .verify_user(&hs256(&with(user_claims(), "roles", Value::Null)))
        .unwrap();
    assert!(none.roles.is_empty() && !none.is_admin());
    let upper = auth
        .verify_user(&hs256(&with(user_claims(), "roles", json!(["ADMIN"]))))
        .unwrap();
    assert!(!upper.is_admin(), "roles are exact");
}

#[test]
fn nbf_in_the_past_is_accepted() {
    let token = hs256(&with(user_claims(), "nbf", json!(now() - 5)));
    assert!(auth().verify_user(&token).unwrap().nbf.is_some());
}

#[test]
fn aud_as_single_element_array_is_accepted() {
    let token = hs256(&with(user_claims(), "aud", json!(["mozaiks"])));
    assert_eq!(auth().verify_user(&token).unwrap().aud, "mozaiks");
}

// ---- time ----

#[test]
fn expired_token_is_refused() {
    let token = hs256(&with(user_claims(), "exp", json!(now() - 3600)));
    assert!(matches!(
        refused(auth().verify_user(&token)),
        Error::Expired
    ));
}

#[test]
fn nbf_in_the_future_is_refused() {
    let token = hs256(&with(user_claims(), "nbf", json!(now() + 600)));
    assert!(matches!(
        refused(auth().verify_user(&token)),
        Error::NotYetValid
    ));
}

#[test]
fn leeway_applies_to_exp() {
    let auth = auth();
    let recent = hs256(&with(user_claims(), "exp", json!(now() - 10)));
    auth.verify_user(&recent)
        .expect("10 s past exp is within the 30 s leeway");
    let old = hs256(&with(user_claims(), "exp", json!(now() - 60)));
    assert!(matches!(refused(auth.verify_user(&old)), Error::Expired));

    let strict = Auth::new(Config {
        leeway_secs: 0,
        ..Config::hs256(SECRET, false)
    })
    .unwrap();
    assert!(matches!(
        refused(strict.verify_user(&recent)),
        Error::Expired
    ));
}

#[test]
fn leeway_applies_to_nbf() {
    let token = hs256(&with(user_claims(), "nbf", json!(now() + 10)));
    auth()
        .verify_user(&token)
        .expect("10 s early is within the leeway");
}

#[test]
fn missing_or_non_numeric_exp_is_refused() {
    let auth = auth();
    for exp in [Value::Null, json!("tomorrow"), json!(-5)] {
        let token = hs256(&with(user_claims(), "exp", exp.clone()));
        assert!(
            matches!(refused(auth.verify_user(&token)), Error::InvalidClaims(_)),
            "{exp}"
        );
    }
}

// ---- signature and algorithms ----

#[test]
fn wrong_signature_is_refused() {
    let token = sign_with(
        json!({"alg": "HS256"}),
        &user_claims(),
        OTHER_SECRET,
        Algorithm::HS256,
    );
    assert!(matches!(
        refused(auth().verify_user(&token)),
        Error::BadSignature
    ));

    // A valid token with its payload swapped keeps a signature that no longer matches.
    let good = hs256(&user_claims());
    let parts: Vec<&str> = good.split('.').collect();
    let forged_payload = encode_part(&with(user_claims(), "roles", json!(["superadmin"])));
    let forged = format!("{}.{forged_payload}.{}", parts[0], parts[2]);
    assert!(matches!(
        refused(auth().verify_user(&forged)),
        Error::BadSignature
    ));
}

#[test]
fn alg_none_is_refused() {
    let auth = auth();
    for alg in ["none", "None", "NONE", "nOnE"] {
        let header = encode_part(&json!({"alg": alg, "typ": "JWT"}));
        for token in [
            format!("{header}.{}.", encode_part(&user_claims())),
            format!("{header}.{}.", encode_part(&runtime_claims())),
        ] {
            assert!(
                matches!(refused(auth.verify_user(&token)), Error::WrongAlgorithm),
                "{alg}"
            );
            assert!(matches!(
                refused(auth.verify_runtime(&token)),
                Error::WrongAlgorithm
            ));
        }
    }
}

#[test]
fn other_hmac_sizes_are_refused_even_with_our_secret() {
    let auth = auth();
    for (alg, name) in [(Algorithm::HS384, "HS384"), (Algorithm::HS512, "HS512")] {
        let token = sign_with(json!({"alg": name}), &user_claims(), SECRET, alg);
        let err = refused(auth.verify_user(&token));
        assert!(
            matches!(err, Error::WrongAlgorithm | Error::BadSignature),
            "{name}: {err:?}"
        );
    }
}

#[test]
fn header_alg_is_not_trusted() {
    // An HS256 signature labelled as an asymmetric algorithm (key-confusion attempt).
    let auth = auth();
    for name in ["RS256", "ES256", "PS256", "EdDSA", "hs256", ""] {
        let token = sign_with(
            json!({"alg": name}),
            &user_claims(),
            SECRET,
            Algorithm::HS256,
        );
        assert!(
            matches!(refused(auth.verify_user(&token)), Error::WrongAlgorithm),
            "{name}"
        );
    }
    let no_alg = sign_with(
        json!({"typ": "JWT"}),
        &user_claims(),
        SECRET,
        Algorithm::HS256,
    );
    assert!(matches!(
        refused(auth.verify_user(&no_alg)),
        Error::Malformed(_)
    ));
}

#[test]
fn header_keys_are_ignored() {
    let auth = auth();
    let attacker_jwk =
        json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode(OTHER_SECRET), "alg": "HS256"});
    let headers = [
        json!({"alg": "HS256", "kid": "attacker"}),
        json!({"alg": "HS256", "jwk": attacker_jwk}),
        json!({"alg": "HS256", "jku": "https://evil.example/jwks.json", "kid": "k1"}),
        json!({"alg": "HS256", "x5u": "https://evil.example/cert.pem"}),
    ];
    for header in headers {
        // Signed with the key the header points to: refused.
        let forged = sign_with(
            header.clone(),
            &user_claims(),
            OTHER_SECRET,
            Algorithm::HS256,
        );
        assert!(
            matches!(refused(auth.verify_user(&forged)), Error::BadSignature),
            "{header}"
        );
        // Signed with our key: the header is ignored and the token verifies.
        let ours = sign_with(header.clone(), &user_claims(), SECRET, Algorithm::HS256);
        auth.verify_user(&ours)
            .unwrap_or_else(|e| panic!("{header}: {e:?}"));
    }
}

#[test]
fn crit_header_is_refused() {
    let header = json!({"alg": "HS256", "crit": ["exp"], "exp": 1});
    let token = sign_with(header, &user_claims(), SECRET, Algorithm::HS256);
    assert!(matches!(
        refused(auth().verify_user(&token)),
        Error::Malformed(_)
    ));
}

// ---- malformed input ----

#[test]
fn malformed_strings_are_refused() {
    let auth = auth();
    assert!(matches!(refused(auth.verify_user("")), Error::Missing));
    assert!(matches!(refused(auth.verify_runtime("  ")), Error::Missing));
    let good = hs256(&user_claims());
    let too_long = format!("{good}{}", "A".repeat(MAX_TOKEN_LEN));
    let cases = [
        "a.b",
        "not-a-jwt",
        "a.b.c",
        "..",
        "a.b.c.d.e",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.e30",
        "W10.e30.sig",                  // header is an array
        "eyJhbGciOiJIUzI1NiJ9.!!!.sig", // payload not base64url
        &too_long,
    ];
    for token in cases {
        let err = refused(auth.verify_user(token));
        assert!(matches!(err, Error::Malformed(_)), "{token:.40}: {err:?}");
        assert!(matches!(
            refused(auth.verify_runtime(token)),
            Error::Malformed(_)
        ));
    }
    // Padded base64 is not compact JWS.
    let padded = format!("{good}==");
    assert!(refused(auth.verify_user(&padded)).kind() == ErrorKind::Unauthorized);
}

#[test]
fn the_header_must_be_unpadded_canonical_base64url() {
    let auth = auth();
    let claims = user_claims();
    // Signed properly, so only the header's encoding can be wrong.
    let token = |header: &str| {
        let message = format!("{header}.{}", encode_part(&claims));
        let key = EncodingKey::from_secret(SECRET);
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256).expect("sign");
        format!("{message}.{signature}")
    };
    // 25 bytes: the last group has two characters, the second with four unused bits.
    let json = r#"{"alg":"HS256","x":"~~~"}"#;
    let canonical = URL_SAFE_NO_PAD.encode(json);
    assert_eq!(canonical, "eyJhbGciOiJIUzI1NiIsIngiOiJ-fn4ifQ");
    auth.verify_user(&token(&canonical))
        .expect("the canonical header is accepted");
    for bad in [
        format!("{canonical}=="),      // padded
        canonical.replace('-', "+"),   // the standard alphabet
        canonical.replace("fQ", "fR"), // the same bytes with unused bits set
        format!("{canonical}AAA"),     // a length no encoding has
    ] {
        let err = refused(auth.verify_user(&token(&bad)));
        assert!(matches!(err, Error::Malformed(_)), "{bad}: {err:?}");
    }
}

#[test]
fn signed_non_object_payload_is_refused() {
    let message = format!(
        "{}.{}",
        encode_part(&json!({"alg": "HS256"})),
        encode_part(&json!([1]))
    );
    let sig = jsonwebtoken::crypto::sign(
        message.as_bytes(),
        &EncodingKey::from_secret(SECRET),
        Algorithm::HS256,
    )
    .unwrap();
    refused(auth().verify_user(&format!("{message}.{sig}")));
}

// ---- issuer, audience, claims ----

#[test]
fn wrong_issuer_is_refused() {
    let auth = auth();
    let token = hs256(&with(user_claims(), "iss", json!("evil")));
    assert!(matches!(
        refused(auth.verify_user(&token)),
        Error::WrongIssuer
    ));
    let token = hs256(&with(user_claims(), "iss", json!("Mozaiks")));
    assert!(matches!(
        refused(auth.verify_user(&token)),
        Error::WrongIssuer
    ));
    let token = hs256(&with(runtime_claims(), "iss", json!("evil")));
    assert!(matches!(
        refused(auth.verify_runtime(&token)),
        Error::WrongIssuer
    ));
    let token = hs256(&with(user_claims(), "iss", Value::Null));
    assert!(matches!(
        refused(auth.verify_user(&token)),
        Error::InvalidClaims(_)
    ));
}

#[test]
fn audiences_are_separated() {
    let auth = auth();
    let (runtime_token, _) = auth
        .mint_runtime("app_1", "user-1", "chat_1", "support")
        .unwrap();
    assert!(matches!(
        refused(auth.verify_user(&runtime_token)),
        Error::WrongAudience
    ));

    let user_token = auth.mint_user("user-1", "app_1", &["admin"], 600).unwrap();
    assert!(matches!(
        refused(auth.verify_runtime(&user_token)),
        Error::WrongAudience
    ));

    let token = hs256(&with(user_claims(), "aud", json!("someone-else")));
    assert!(matches!(
        refused(auth.verify_user(&token)),
        Error::WrongAudience
    ));
    let token = hs256(&with(user_claims(), "aud", Value::Null));
    refused(auth.verify_user(&token));
}

#[test]
fn multi_audience_tokens_are_refused() {
    let auth = auth();
    let both = json!(["mozaiks", "mozaiks-runtime"]);
    let user = hs256(&with(user_claims(), "aud", both.clone()));
    refused(auth.verify_user(&user));
    let runtime = hs256(&with(runtime_claims(), "aud", both));
    refused(auth.verify_runtime(&runtime));
    let empty = hs256(&with(user_claims(), "aud", json!([])));
    refused(auth.verify_user(&empty));
}

#[test]
fn invalid_identifiers_are_refused() {
    let auth = auth();
    let cases = [
        ("app_id", json!("a.b")),
        ("app_id", json!("")),
        ("app_id", json!("x".repeat(65))),
        ("app_id", Value::Null),
        ("sub", json!("")),
        ("sub", json!("user 1")),
        ("sub", json!("user/1")),
        ("sub", json!(42)),
    ];
    for (key, value) in cases {
        let token = hs256(&with(user_claims(), key, value.clone()));
        let err = refused(auth.verify_user(&token));
        assert!(
            matches!(err, Error::InvalidClaims(_)),
            "{key}={value}: {err:?}"
        );
    }
    for (key, value) in [
        ("chat_id", json!("chat.1")),
        ("chat_id", Value::Null),
        ("workflow", json!("a b")),
        ("app_id", json!("a.b")),
        ("sub", json!("")),
        ("jti", json!("")),
        ("iat", Value::Null),
    ] {
        let token = hs256(&with(runtime_claims(), key, value.clone()));
        let err = refused(auth.verify_runtime(&token));
        assert!(
            matches!(err, Error::InvalidClaims(_)),
            "{key}={value}: {err:?}"
        );
    }
}

#[test]
fn user_ids_from_identity_providers_are_accepted() {
    let token = hs256(&with(user_claims(), "sub", json!("auth0|abc@example.com")));
    assert_eq!(
        auth().verify_user(&token).unwrap().sub,
        "auth0|abc@example.com"
    );
}

// ---- configuration ----

#[test]
fn weak_secret_is_refused_unless_dev_mode() {
    let err = Auth::new(Config::hs256("short-secret", false)).unwrap_err();
    assert!(matches!(err, Error::WeakSecret));
    assert_eq!(err.kind(), ErrorKind::Config);
    let err = Auth::new(Config::hs256(vec![7u8; MIN_SECRET_LEN - 1], false)).unwrap_err();
    assert!(matches!(err, Error::WeakSecret));
    Auth::new(Config::hs256(vec![7u8; MIN_SECRET_LEN], false)).expect("32 bytes is enough");

    let dev = Auth::new(Config::hs256("dev", true)).expect("dev mode allows short secrets");
    assert!(dev.is_dev_mode());
    let token = dev.mint_user("u1", "app_1", &[], 60).unwrap();
    dev.verify_user(&token).expect("dev tokens verify");
}

#[test]
fn empty_secret_is_refused_even_in_dev_mode() {
    for dev_mode in [false, true] {
        let err = Auth::new(Config::hs256(Vec::new(), dev_mode)).unwrap_err();
        assert!(matches!(err, Error::Config(_)));
        assert_eq!(err.kind(), ErrorKind::Config);
    }
}

#[test]
fn out_of_range_leeway_and_ttl_are_refused() {
    let base = Config::hs256(SECRET, false);
    let cases = [
        Config {
            leeway_secs: MAX_LEEWAY_SECS + 1,
            ..base.clone()
        },
        Config {
            runtime_ttl_secs: 0,
            ..base.clone()
        },
        Config {
            runtime_ttl_secs: MAX_RUNTIME_TTL_SECS + 1,
            ..base.clone()
        },
    ];
    for cfg in cases {
        assert!(matches!(Auth::new(cfg), Err(Error::Config(_))));
    }
    assert_eq!(base.leeway_secs, 30);
    assert_eq!(base.runtime_ttl_secs, 900);
}

#[test]
fn secrets_are_not_printed() {
    let cfg = Config::hs256(SECRET, false);
    let needle = std::str::from_utf8(SECRET).unwrap();
    assert!(!format!("{cfg:?}").contains(needle));
    let auth = Auth::new(cfg).unwrap();
    assert!(!format!("{auth:?}").contains(needle));
}

#[test]
fn auth_is_cheap_to_share() {
    fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
    assert_send_sync::<Auth>();
    let a = auth();
    let b = a.clone();
    let token = a.mint_user("u1", "app_1", &[], 60).unwrap();
    b.verify_user(&token).unwrap();
}

// ---- minting ----

#[test]
fn mint_runtime_round_trips() {
    let auth = auth();
    let before = Utc::now();
    let (token, expires_at) = auth
        .mint_runtime("app_1", "user@x.io", "chat_1", "support")
        .unwrap();
    let claims = auth.verify_runtime(&token).unwrap();
    assert_eq!(claims.user_id(), "user@x.io");
    assert_eq!(
        (
            claims.app_id.as_str(),
            claims.chat_id.as_str(),
            claims.workflow.as_str()
        ),
        ("app_1", "chat_1", "support")
    );
    assert_eq!(
        (claims.iss.as_str(), claims.aud.as_str()),
        (ISSUER, RUNTIME_AUDIENCE)
    );
    assert_eq!(claims.exp, expires_at.timestamp());
    assert_eq!(claims.exp - claims.iat, 900);
    let expected = before + chrono::Duration::seconds(900);
    assert!(
        (expires_at - expected).num_seconds().abs() <= 2,
        "{expires_at} vs {expected}"
    );
    assert!(uuid::Uuid::parse_str(&claims.jti).is_ok());

    let (again, _) = auth
        .mint_runtime("app_1", "user@x.io", "chat_1", "support")
        .unwrap();
    assert_ne!(
        auth.verify_runtime(&again).unwrap().jti,
        claims.jti,
        "jti is unique"
    );
}

#[test]
fn mint_runtime_uses_configured_ttl() {
    let auth = Auth::new(Config {
        runtime_ttl_secs: 60,
        ..Config::hs256(SECRET, false)
    })
    .unwrap();
    assert_eq!(auth.runtime_ttl_secs(), 60);
    let (token, expires_at) = auth.mint_runtime("app_1", "u1", "chat_1", "wf").unwrap();
    assert!((expires_at - Utc::now()).num_seconds().abs() <= 61);
    let claims = auth.verify_runtime(&token).unwrap();
    assert_eq!(claims.exp - claims.iat, 60);
}

#[test]
fn minted_tokens_need_the_same_secret() {
    let (token, _) = auth().mint_runtime("app_1", "u1", "chat_1", "wf").unwrap();
    let other = Auth::new(Config::hs256(OTHER_SECRET, false)).unwrap();
    assert!(matches!(
        refused(other.verify_runtime(&token)),
        Error::BadSignature
    ));
}

#[test]
fn mint_refuses_invalid_input() {
    let auth = auth();
    for (app, user, chat, wf) in [
        ("a.b", "u1", "c1", "wf"),
        ("app_1", "", "c1", "wf"),
        ("app_1", "u1", "c/1", "wf"),
        ("app_1", "u1", "c1", ""),
    ] {
        let err = auth.mint_runtime(app, user, chat, wf).unwrap_err();
        assert!(matches!(err, Error::Mint(_)), "{err:?}");
        assert_eq!(err.kind(), ErrorKind::Internal);
    }
    assert!(matches!(
        auth.mint_user("u1", "app_1", &[], 0),
        Err(Error::Mint(_))
    ));
    assert!(matches!(
        auth.mint_user("u 1", "app_1", &[], 60),
        Err(Error::Mint(_))
    ));
    assert!(matches!(
        auth.mint_user("u1", "app_1", &[], u64::MAX),
        Err(Error::Mint(_))
    ));
}

#[test]
fn mint_user_round_trips() {
    let auth = auth();
    let token = auth
        .mint_user("user-9", "app_2", &["admin", "support"], 120)
        .unwrap();
    let claims = auth.verify_user(&token).unwrap();
    assert_eq!(claims.sub, "user-9");
    assert_eq!(claims.app_id, "app_2");
    assert_eq!(claims.roles, ["admin", "support"]);
    assert!(claims.is_admin());
    assert_eq!(claims.exp - claims.iat.unwrap(), 120);
    let header = jsonwebtoken::decode_header(&token).unwrap();
    assert_eq!(header.alg, Algorithm::HS256);
}

// ---- errors ----

#[test]
fn error_kinds_and_codes() {
    let all = [
        Error::Missing,
        Error::Malformed(String::new()),
        Error::BadSignature,
        Error::Expired,
        Error::NotYetValid,
        Error::WrongAudience,
        Error::WrongIssuer,
        Error::WrongAlgorithm,
        Error::InvalidClaims(String::new()),
        Error::WeakSecret,
        Error::Config(String::new()),
        Error::Mint(String::new()),
    ];
    let codes: HashSet<&str> = all.iter().map(Error::code).collect();
    assert_eq!(codes.len(), all.len(), "codes are unique");
    for code in &codes {
        assert!(
            code.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'),
            "{code}"
        );
    }
    assert_eq!(Error::Expired.code(), "token_expired");
    assert_eq!(Error::BadSignature.code(), "token_bad_signature");
    assert_eq!(Error::WrongAudience.code(), "token_wrong_audience");
    let unauthorized = all
        .iter()
        .filter(|e| e.kind() == ErrorKind::Unauthorized)
        .count();
    assert_eq!(unauthorized, 9);
    assert_eq!(Error::WeakSecret.kind(), ErrorKind::Config);
    assert_eq!(Error::Config(String::new()).kind(), ErrorKind::Config);
    assert_eq!(Error::Mint(String::new()).kind(), ErrorKind::Internal);
}

#[test]
fn errors_do_not_echo_the_token() {
    let auth = auth();
    let token = hs256(&with(user_claims(), "exp", json!(now() - 3600)));
    let signature = token.rsplit('.').next().unwrap();
    for bad in [token.clone(), format!("{token}x"), "x.y.z".to_owned()] {
        let err = refused(auth.verify_user(&bad));
        assert!(!err.to_string().contains(signature), "{err}");
    }
}

// ---- redaction ----

#[test]
fn redact_token_in_query_strings() {
    assert_eq!(redact_token("a=1&token=xyz&b=2"), "a=1&token=REDACTED&b=2");
    assert_eq!(redact_token("token=xyz"), "token=REDACTED");
    assert_eq!(redact_token("token="), "token=REDACTED");
    assert_eq!(redact_token("a=1&b=2"), "a=1&b=2");
    assert_eq!(redact_token(""), "");
    assert_eq!(
        redact_token("token=a&token=b"),
        "token=REDACTED&token=REDACTED"
    );
    assert_eq!(
        redact_token("access_token=abc&x"),
        "access_token=REDACTED&x"
    );
    assert_eq!(redact_token("Token=abc"), "Token=REDACTED");
    assert_eq!(
        redact_token("mytoken=abc&token_type=x"),
        "mytoken=abc&token_type=x"
    );
    assert_eq!(redact_token("token"), "token", "no value, nothing to hide");
}

#[test]
fn redact_token_in_uris() {
    assert_eq!(redact_token("/ws?token=abc.def.ghi"), "/ws?token=REDACTED");
    assert_eq!(
        redact_token("/v1/chats/c1/ws?app_id=a1&token=abc&x=1"),
        "/v1/chats/c1/ws?app_id=a1&token=REDACTED&x=1"
    );
    assert_eq!(
        redact_token("https://rt.example.com/ws?token=abc#frag"),
        "https://rt.example.com/ws?token=REDACTED#frag"
    );
    assert_eq!(
        redact_token("/ws?a=1&token=x=y=z"),
        "/ws?a=1&token=REDACTED"
    );
    assert_eq!(redact_token("/ws?"), "/ws?");
    assert_eq!(redact_token("/ws"), "/ws");
    assert_eq!(redact_token("/token/path"), "/token/path");
    assert_eq!(
        redact_token("/ws?q=a?token=b&token=c"),
        "/ws?q=a?token=b&token=REDACTED"
    );
}
