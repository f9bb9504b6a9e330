//! HTTP bodies and query strings, control-plane records, ops snapshots and tokens.

use std::sync::OnceLock;

use arbitrary::{Result, Unstructured};
use mozaiks_auth::{Auth, Config};
use mozaiks_control::keys::KeyRecord;
use mozaiks_control::{App, AppRecord, aggregate};
use mozaiks_gateway::fuzzing::{self, BodyKind};
use serde_json::{Map, Value};

use crate::make;

/// Field names of every body, so structured bodies reach the checks behind the extractor.
const FIELDS: [&str; 17] = [
    "app_id",
    "workflow_name",
    "chat_id",
    "context",
    "message",
    "user_id",
    "name",
    "tier",
    "workflows",
    "limits",
    "runtime_url",
    "status",
    "data",
    "db_name",
    "mongo_uri",
    "max_concurrent_runs",
    "allowed_origins",
];

/// Values that pass some checks: real tiers, workflows, statuses, URLs and limits.
fn field_value(u: &mut Unstructured) -> Result<Value> {
    Ok(match u.int_in_range(0..=9u8)? {
        0 => (*u.choose(&["starter", "business", "dedicated", "horizons", "gold"])?).into(),
        1 => (*u.choose(&["hello", "research", "nope"])?).into(),
        2 => (*u.choose(&["active", "suspended", "deleted"])?).into(),
        3 => (*u.choose(&[
            "wss://a.example.com",
            "ws://x",
            "wss://",
            "https://a",
            "ws://a b",
        ])?)
        .into(),
        4 => {
            let mut m = Map::new();
            for _ in 0..u.int_in_range(0..=3u8)? {
                let k = *u.choose(mozaiks_control::Limits::FIELDS)?;
                m.insert(k.into(), make::json(u, 1)?);
            }
            Value::Object(m)
        }
        5 => Value::Array(vec![(*u.choose(&["hello", "research"])?).into()]),
        _ => make::json(u, 2)?,
    })
}

/// HTTP bodies and query strings, through axum's JSON and query extractors, the rejection
/// mapping, and every check of the endpoint that needs no server (ids, limits, the app
/// aggregate's `handle`). The first byte picks the body (raw JSON bytes or a structured
/// object of the body's field names) or a query string.
pub fn http_body(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let kind = BodyKind::ALL[usize::from(first & 0x0f) % BodyKind::ALL.len()];
    match first >> 4 {
        0..=7 => {
            let _ = fuzzing::body(kind, rest);
        }
        8..=13 => {
            let mut u = Unstructured::new(rest);
            let mut m = Map::new();
            let n = u.int_in_range(0..=6u8).unwrap_or(0);
            for _ in 0..n {
                let (Ok(k), Ok(v)) = (u.choose(&FIELDS), field_value(&mut u)) else {
                    break;
                };
                m.insert((*k).into(), v);
            }
            let body = serde_json::to_vec(&Value::Object(m)).expect("JSON serializes");
            let _ = fuzzing::body(kind, &body);
        }
        _ => {
            if let Ok(q) = std::str::from_utf8(rest) {
                let _ = fuzzing::query(&format!("/api/sessions?{q}"));
                let _ = fuzzing::query(q);
            }
        }
    }
}

/// Control-plane JSON: app events from `MZ_CTL` (an accepted record round-trips and folds),
/// app views and API key records from their buckets.
pub fn control_record(data: &[u8]) {
    if let Ok(rec) = serde_json::from_slice::<AppRecord>(data) {
        let bytes = serde_json::to_vec(&rec).expect("a record serializes");
        let back: AppRecord = serde_json::from_slice(&bytes).expect("a record re-parses");
        assert_eq!(back.event, rec.event);
        let app = aggregate::fold([(&rec, 1), (&rec, 2)]);
        if let Some(app) = app {
            let view = serde_json::to_vec(&app).expect("a view serializes");
            let _ = serde_json::from_slice::<App>(&view).expect("a folded view re-parses");
        }
    }
    if let Ok(app) = serde_json::from_slice::<App>(data) {
        let _ = app.allows_workflow("hello");
        let _ = mozaiks_control::Tiers::embedded().map(|t| t.effective_limits(&app));
    }
    let _ = serde_json::from_slice::<KeyRecord>(data);
}

/// `MZ_PERF` and `MZ_PRESENCE` snapshots, split on `0xff` into entries of several workers,
/// through the ops endpoints' aggregation.
pub fn perf_snapshot(data: &[u8]) {
    let entries: Vec<&[u8]> = data.split(|b| *b == 0xff).collect();
    fuzzing::perf_snapshots(&entries);
}

pub(crate) fn auth() -> &'static Auth {
    static AUTH: OnceLock<Auth> = OnceLock::new();
    AUTH.get_or_init(|| {
        Auth::new(Config::hs256(
            b"fuzzing-secret-fuzzing-secret-32".to_vec(),
            false,
        ))
        .expect("an HS256 verifier")
    })
}

/// Tokens: verifying any string never panics; a minted runtime token verifies to its claims
/// exactly when its ids are valid, and no single-character change to it verifies. Also the
/// redaction of URLs for logs never panics.
pub fn token(data: &[u8]) {
    let a = auth();
    if data.first().is_some_and(|b| b & 1 == 0) {
        if let Ok(s) = std::str::from_utf8(&data[1..]) {
            let _ = a.verify_user(s);
            let _ = a.verify_runtime(s);
            let _ = mozaiks_auth::redact_token(s);
        }
        return;
    }
    let mut u = Unstructured::new(data.get(1..).unwrap_or_default());
    let (Ok(app), Ok(user), Ok(chat), Ok(wf)) = (
        make::string(&mut u),
        make::string(&mut u),
        make::string(&mut u),
        make::string(&mut u),
    ) else {
        return;
    };
    let Ok((tok, _)) = a.mint_runtime(&app, &user, &chat, &wf) else {
        return;
    };
    let claims = a.verify_runtime(&tok).expect("a minted token verifies");
    assert_eq!(
        (
            &claims.app_id,
            &claims.sub,
            &claims.chat_id,
            &claims.workflow
        ),
        (&app, &user, &chat, &wf)
    );
    let (Ok(at), Ok(c)) = (
        u.choose_index(tok.len()),
        u.choose(b"ABCxyz019-_.=+/ \n".as_slice()),
    ) else {
        return;
    };
    let mut bytes = tok.clone().into_bytes();
    if bytes[at] == *c {
        return;
    }
    bytes[at] = *c;
    if let Ok(changed) = String::from_utf8(bytes) {
        assert!(
            a.verify_runtime(&changed).is_err(),
            "a changed token verified: {changed}"
        );
        assert!(a.verify_user(&changed).is_err());
    }
}
