//! Entry points for the fuzz targets and property tests (`crates/fuzz`, `fuzz/`): the gateway's
//! parsing and checking of untrusted input, runnable without NATS or MongoDB. Not an API.
//!
//! Bodies go through axum's JSON extractor (`Json::from_bytes`, what [`Body`](crate::error::Body)
//! runs after reading the request) and its rejection mapping, then through every check of the
//! endpoint that needs no server: identifiers, limits, and the app aggregate's
//! [`handle`](mozaiks_control::aggregate::handle), which decides what a create or patch records.

use std::sync::OnceLock;

use axum::Json;
use axum::http::Uri;
use mozaiks_control::aggregate::{self, Known};
use mozaiks_control::{App, AppCommand, AppPatch, AppStatus, AppStorage, Tiers};
use mozaiks_events::{Frame, ids};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// A request body the gateway parses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyKind {
    /// `POST /api/sessions`
    StartSession,
    /// `POST /api/apps`
    CreateApp,
    /// `PATCH /api/apps/{app_id}`
    PatchApp,
    /// `POST /api/apps/{app_id}/keys`
    CreateKey,
    /// `POST /api/notify`
    Notify,
    /// `POST /api/apps/{app_id}/storage`
    MoveStorage,
}

impl BodyKind {
    pub const ALL: [BodyKind; 6] = [
        BodyKind::StartSession,
        BodyKind::CreateApp,
        BodyKind::PatchApp,
        BodyKind::CreateKey,
        BodyKind::Notify,
        BodyKind::MoveStorage,
    ];
}

/// The embedded tiers and a few shipped workflow names, as the checks see them.
fn known() -> Known<'static> {
    static TIERS: OnceLock<Tiers> = OnceLock::new();
    static WORKFLOWS: OnceLock<Vec<String>> = OnceLock::new();
    let tiers = TIERS.get_or_init(|| {
        Tiers::parse(
            "config/tiers.yaml (embedded)",
            mozaiks_control::tiers::EMBEDDED,
        )
        .expect("the embedded tiers parse")
    });
    let workflows = WORKFLOWS.get_or_init(|| vec!["hello".into(), "research".into()]);
    Known {
        tiers,
        workflows: Some(workflows),
    }
}

/// An existing app on a dedicated tier, for patches.
fn existing_app() -> App {
    let now = chrono::DateTime::UNIX_EPOCH;
    App {
        app_id: "acme".into(),
        name: "Acme".into(),
        tier: "dedicated".into(),
        status: AppStatus::Active,
        workflows: None,
        limits: Default::default(),
        context: Default::default(),
        runtime_url: Some("wss://acme.example.com".into()),
        storage: Some(AppStorage {
            db_name: "mzapp_acme".into(),
            mongo_uri: None,
        }),
        created_at: now,
        updated_at: now,
        version: 3,
    }
}

fn parse<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    Json::<T>::from_bytes(bytes)
        .map(|Json(v)| v)
        .map_err(ApiError::from)
}

fn refused(r: aggregate::Rejection) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        r.code(),
        r.to_string(),
    )
}

fn invalid_id(e: mozaiks_events::Error) -> ApiError {
    ApiError::new(
        axum::http::StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_id",
        e.to_string(),
    )
}

/// Parses and checks a body as its endpoint does, up to the first step that needs a server.
/// `Err` carries the refusal's code.
pub fn body(kind: BodyKind, bytes: &[u8]) -> Result<(), &'static str> {
    body_inner(kind, bytes).map_err(|e| e.code)
}

fn body_inner(kind: BodyKind, bytes: &[u8]) -> Result<(), ApiError> {
    match kind {
        BodyKind::StartSession => {
            let req: crate::sessions::StartSession = parse(bytes)?;
            ids::check_token("app_id", &req.app_id).map_err(invalid_id)?;
            ids::check_token("workflow_name", &req.workflow_name).map_err(invalid_id)?;
            if let Some(c) = &req.chat_id {
                ids::check_token("chat_id", c).map_err(invalid_id)?;
            }
            if let Some(u) = &req.user_id {
                ids::check_user(u).map_err(invalid_id)?;
            }
            Ok(())
        }
        BodyKind::CreateApp => {
            let req: crate::apps::CreateApp = parse(bytes)?;
            if let Some(id) = &req.app_id {
                crate::authz::check_app_id(id)?;
            }
            let limits = req
                .limits
                .map(crate::apps::parse_limits)
                .transpose()?
                .unwrap_or_default();
            let cmd = AppCommand::Create {
                name: req.name,
                tier: req.tier,
                workflows: req.workflows,
                limits,
                runtime_url: req.runtime_url,
                storage: None,
            };
            aggregate::handle(None, &cmd, &known()).map_err(refused)?;
            Ok(())
        }
        BodyKind::PatchApp => {
            let req: crate::apps::PatchApp = parse(bytes)?;
            let patch = AppPatch {
                name: req.name,
                tier: req.tier,
                limits: req.limits.map(crate::apps::parse_limits).transpose()?,
                workflows: req.workflows,
                context: req.context,
                runtime_url: req.runtime_url,
                status: req.status,
            };
            let app = existing_app();
            aggregate::handle(Some(&app), &AppCommand::Patch(patch), &known()).map_err(refused)?;
            Ok(())
        }
        BodyKind::CreateKey => {
            let _req: crate::keys::CreateKey = parse(bytes)?;
            Ok(())
        }
        BodyKind::Notify => {
            let req: crate::notify::NotifyRequest = parse(bytes)?;
            // What a socket receives.
            let frame = Frame::ephemeral("notification", req.data);
            serde_json::from_str::<serde_json::Value>(&frame.to_json())
                .map_err(|e| ApiError::internal(e.to_string()))?;
            Ok(())
        }
        BodyKind::MoveStorage => {
            let req: crate::storage::MoveStorage = parse(bytes)?;
            if let Some(db_name) = req.db_name {
                let s = AppStorage {
                    db_name,
                    mongo_uri: req.mongo_uri,
                };
                s.validate()
                    .map_err(|m| ApiError::bad_request("invalid_storage", m))?;
                aggregate::handle(
                    Some(&existing_app()),
                    &AppCommand::SetStorage(Some(s)),
                    &known(),
                )
                .map_err(refused)?;
            }
            Ok(())
        }
    }
}

/// Parses a request's query string as the `GET /api/sessions`, `.../messages` and ops endpoints
/// do. `Err` carries the refusal's code.
pub fn query(path_and_query: &str) -> Result<(), &'static str> {
    use crate::error::ApiError as E;
    let Ok(uri) = path_and_query.parse::<Uri>() else {
        return Err("bad_uri");
    };
    let q = |r| E::from(r).code;
    let a = axum::extract::Query::<crate::sessions::ListQuery>::try_from_uri(&uri).map_err(q);
    let b = axum::extract::Query::<crate::sessions::MessagesQuery>::try_from_uri(&uri).map_err(q);
    let c = axum::extract::Query::<crate::ops::Scope>::try_from_uri(&uri).map_err(q);
    // The log line of every request.
    let _ = mozaiks_auth::redact_token(&uri.to_string());
    a.and(b).and(c).map(|_| ())
}

/// Parses `MZ_PERF` entries as the ops endpoints do and builds each endpoint's body for an
/// operator and for one app. Returns how many entries parsed.
pub fn perf_snapshots(entries: &[&[u8]]) -> usize {
    let snaps: Vec<_> = entries
        .iter()
        .filter_map(|e| crate::ops::parse_snapshot(e).ok())
        .collect();
    for app in [None, Some("acme")] {
        let _ = crate::ops::active_runs_json(&snaps, app);
        let _ = crate::ops::aggregate_json(&snaps, app);
        let _ = crate::ops::chats_json(&snaps, app);
    }
    // The other replicas' presence snapshots share the bucket's shape of trust.
    for e in entries {
        let _ = serde_json::from_slice::<crate::presence::GatewaySnapshot>(e);
    }
    snaps.len()
}
