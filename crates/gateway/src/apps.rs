//! App lifecycle: `POST /api/apps`, `GET /api/apps`, `GET/PATCH/DELETE /api/apps/{app_id}`.
//!
//! Authorization, least privilege:
//! - role `superadmin` (the operator) manages every app: create, read, patch every field, delete;
//! - role `admin` reads its own app (the token's `app_id`) and patches only its own settings:
//!   `name`, `workflows`, `context`. Entitlements (`tier`, `limits`, `runtime_url`, `status`) and
//!   creating or deleting apps are the operator's;
//! - anyone else, and any token of another app, is refused before the app is looked up, so an
//!   answer never says whether another tenant's app exists.
//!
//! Commands go through the app aggregate ([`mozaiks_control::Registry::execute`]): events on
//! `MZ_CTL`, the view in `MZ_APPS`, on every replica within a second.

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mongodb::bson::{Document, doc};
use mozaiks_auth::UserClaims;
use mozaiks_control::{AppCommand, AppPatch, AppStatus, Limits, Rejection};
use mozaiks_events::{Command, CommandEnvelope, ids};
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};
use tracing::{info, warn};
use uuid::Uuid;

use crate::State;
use crate::auth::User;
use crate::error::{ApiError, Body};

impl From<mozaiks_control::Error> for ApiError {
    fn from(e: mozaiks_control::Error) -> ApiError {
        use mozaiks_control::Error as E;
        let unprocessable = StatusCode::UNPROCESSABLE_ENTITY;
        match e {
            E::Rejected(r) => {
                let status = match r {
                    Rejection::AppExists => StatusCode::CONFLICT,
                    Rejection::AppNotFound => StatusCode::NOT_FOUND,
                    _ => unprocessable,
                };
                ApiError::new(status, r.code(), r.to_string())
            }
            E::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "concurrent_update", e.to_string())
            }
            E::Unavailable(_) => ApiError::unavailable(e.to_string()),
            E::Corrupt { .. } | E::Tiers { .. } => ApiError::internal(e.to_string()),
        }
    }
}

/// Refusals of the session broker: an [`ApiError`], or a rate limit with its `Retry-After`.
#[derive(Debug)]
pub enum BrokerError {
    Api(ApiError),
    RateLimited {
        retry_after_secs: u64,
    },
    /// The app's runs in progress across every worker reached `max_concurrent_runs`.
    TooManyRuns {
        limit: u32,
    },
}

impl From<ApiError> for BrokerError {
    fn from(e: ApiError) -> BrokerError {
        BrokerError::Api(e)
    }
}

impl From<mozaiks_bus::Error> for BrokerError {
    fn from(e: mozaiks_bus::Error) -> BrokerError {
        BrokerError::Api(e.into())
    }
}

impl From<mozaiks_auth::Error> for BrokerError {
    fn from(e: mozaiks_auth::Error) -> BrokerError {
        BrokerError::Api(e.into())
    }
}

impl IntoResponse for BrokerError {
    fn into_response(self) -> Response {
        match self {
            BrokerError::Api(e) => e.into_response(),
            BrokerError::RateLimited { retry_after_secs } => {
                let mut resp = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "rate_limited",
                    format!(
                        "the app's requests_per_minute limit is reached; retry in {retry_after_secs} s"
                    ),
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
                resp
            }
            BrokerError::TooManyRuns { limit } => {
                let mut resp = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "too_many_runs",
                    format!(
                        "the app has {limit} runs in progress across the fleet, its max_concurrent_runs; retry when one ends"
                    ),
                )
                .into_response();
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from(2u64));
                resp
            }
        }
    }
}

/// Who may do what to one app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Access {
    /// Role `superadmin`: every app, every field.
    Operator,
    /// Role `admin` of this app: read, and patch its own settings.
    OwnAdmin,
}

fn access(user: &UserClaims, app_id: &str) -> Result<Access, ApiError> {
    if user.is_superadmin() {
        Ok(Access::Operator)
    } else if user.app_id != app_id {
        Err(ApiError::forbidden(
            "app_mismatch",
            "the token is not valid for this app_id",
        ))
    } else if user.is_admin() {
        Ok(Access::OwnAdmin)
    } else {
        Err(ApiError::forbidden(
            "admin_required",
            "this endpoint needs the admin role",
        ))
    }
}

fn operator_only(user: &UserClaims, what: &str) -> Result<(), ApiError> {
    if user.is_superadmin() {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "superadmin_required",
            format!("{what} needs the superadmin role"),
        ))
    }
}

/// Role `superadmin`, or `admin` of `app_id` (a token of another app: `app_mismatch`).
pub(crate) fn admin_for(user: &UserClaims, app_id: &str) -> Result<(), ApiError> {
    access(user, app_id).map(|_| ())
}

/// Role `superadmin` for an operation on `app_id`; a token of another app is refused as
/// `app_mismatch` first, like every app endpoint, so nothing leaks about other tenants' apps.
pub(crate) fn operator_for(user: &UserClaims, app_id: &str, what: &str) -> Result<(), ApiError> {
    access(user, app_id)?;
    operator_only(user, what)
}

pub(crate) fn check_app_id(app_id: &str) -> Result<(), ApiError> {
    ids::check_token("app_id", app_id).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
            e.to_string(),
        )
    })
}

/// `limits` from a body: an object of known fields only.
pub(crate) fn parse_limits(v: Value) -> Result<Limits, ApiError> {
    let bad = |msg: String| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_limits", msg);
    let obj = v
        .as_object()
        .ok_or_else(|| bad("limits must be an object".into()))?;
    if let Some(k) = obj.keys().find(|k| !Limits::FIELDS.contains(&k.as_str())) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unknown_limit",
            format!("unknown limit {k:?}; known: {}", Limits::FIELDS.join(", ")),
        ));
    }
    serde_json::from_value(v).map_err(|e| bad(e.to_string()))
}

fn shipped_workflows(state: &State) -> Vec<String> {
    state.catalog.iter().map(|p| p.name.clone()).collect()
}

/// An app as the API shows it: the view, its effective limits and its placement.
pub fn app_json(state: &State, app: &mozaiks_control::App) -> Value {
    let tiers = state.registry.tiers();
    let tier = tiers.tier_of(app);
    json!({
        "app_id": app.app_id,
        "name": app.name,
        "tier": app.tier,
        "status": app.status,
        "workflows": app.workflows,
        "limits": app.limits,
        "effective_limits": tiers.effective_limits(app),
        "context": app.context,
        "runtime_url": app.runtime_url,
        "runtime": tier.runtime,
        "database": tier.database,
        "storage": app.storage,
        "created_at": app.created_at,
        "updated_at": app.updated_at,
        "version": app.version,
    })
}

/// `POST /api/apps` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// Chosen by the caller, or generated.
    #[serde(default)]
    pub app_id: Option<String>,
    pub name: String,
    pub tier: String,
    /// The allowlist; absent allows every shipped workflow.
    #[serde(default)]
    pub workflows: Option<Vec<String>>,
    #[serde(default)]
    pub limits: Option<Value>,
    #[serde(default)]
    pub runtime_url: Option<String>,
}

pub async fn create(
    St(state): St<State>,
    User(user): User,
    Body(req): Body<CreateApp>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    operator_only(&user, "creating an app")?;
    let app_id = req
        .app_id
        .unwrap_or_else(|| format!("app-{}", Uuid::now_v7().simple()));
    check_app_id(&app_id)?;
    let limits = req
        .limits
        .map(parse_limits)
        .transpose()?
        .unwrap_or_default();
    // A tier with a dedicated database gets its own from the start (resolve_storage).
    let storage = state
        .registry
        .tiers()
        .get(&req.tier)
        .filter(|t| t.database == mozaiks_control::tiers::DatabasePlacement::Dedicated)
        .map(|_| mozaiks_control::AppStorage {
            db_name: crate::storage::default_db_name(state.store.shared().name(), &app_id),
            mongo_uri: None,
        });
    let cmd = AppCommand::Create {
        name: req.name,
        tier: req.tier,
        workflows: req.workflows,
        limits,
        runtime_url: req.runtime_url,
        storage,
    };
    let shipped = shipped_workflows(&state);
    let app = state
        .registry
        .execute(&app_id, &cmd, &user.sub, Some(&shipped))
        .await?;
    info!(app_id = %app_id, tier = %app.tier, storage = ?app.storage, actor = %user.sub, "App created.");
    Ok((StatusCode::CREATED, Json(app_json(&state, &app))))
}

/// `GET /api/apps`: every app for the operator, the caller's own app for an admin.
pub async fn list(St(state): St<State>, User(user): User) -> Result<Json<Value>, ApiError> {
    let mut apps: Vec<_> = if user.is_superadmin() {
        state.registry.all()
    } else {
        access(&user, &user.app_id)?;
        state.registry.get(&user.app_id).into_iter().collect()
    };
    apps.retain(|a| !a.is_deleted());
    apps.sort_by(|a, b| a.app_id.cmp(&b.app_id));
    let list: Vec<Value> = apps.iter().map(|a| app_json(&state, a)).collect();
    Ok(Json(json!({ "apps": list })))
}

async fn live_app(
    state: &State,
    app_id: &str,
) -> Result<std::sync::Arc<mozaiks_control::App>, ApiError> {
    state
        .registry
        .read_through(app_id)
        .await?
        .filter(|a| !a.is_deleted())
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))
}

pub async fn get_app(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    access(&user, &app_id)?;
    let app = live_app(&state, &app_id).await?;
    Ok(Json(app_json(&state, &app)))
}

fn some<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/apps/{app_id}` body; absent fields stay as they are.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PatchApp {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub tier: Option<String>,
    /// Replaces the app's overrides; an absent field falls back to the tier.
    #[serde(default)]
    pub limits: Option<Value>,
    /// The allowlist; `null` allows every shipped workflow.
    #[serde(default, deserialize_with = "some")]
    pub workflows: Option<Option<Vec<String>>>,
    /// Replaces the app's context variables.
    #[serde(default)]
    pub context: Option<Map<String, Value>>,
    /// `null` removes the dedicated runtime.
    #[serde(default, deserialize_with = "some")]
    pub runtime_url: Option<Option<String>>,
    /// `active` or `suspended`.
    #[serde(default)]
    pub status: Option<AppStatus>,
}

pub async fn patch(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
    Body(req): Body<PatchApp>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    let who = access(&user, &app_id)?;
    if who != Access::Operator {
        for (field, set) in [
            ("tier", req.tier.is_some()),
            ("limits", req.limits.is_some()),
            ("runtime_url", req.runtime_url.is_some()),
            ("status", req.status.is_some()),
        ] {
            if set {
                operator_only(&user, &format!("changing {field}"))?;
            }
        }
    }
    let patch = AppPatch {
        name: req.name,
        tier: req.tier,
        limits: req.limits.map(parse_limits).transpose()?,
        workflows: req.workflows,
        context: req.context,
        runtime_url: req.runtime_url,
        status: req.status,
    };
    let shipped = shipped_workflows(&state);
    let app = state
        .registry
        .execute(
            &app_id,
            &AppCommand::Patch(patch),
            &user.sub,
            Some(&shipped),
        )
        .await?;
    info!(app_id = %app_id, version = app.version, actor = %user.sub, "App patched.");
    Ok(Json(app_json(&state, &app)))
}

/// `DELETE /api/apps/{app_id}` (superadmin): records `app.deleted` — every replica then refuses
/// the app's sessions and the projector skips its events — and cancels its unfinished chats. The
/// read models are archived, then removed, by the projector replica that holds the `retention`
/// lease (`mozaiks_projector::retention`), within seconds. Idempotent: deleting a deleted app
/// cancels its unfinished chats again.
pub async fn delete(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    access(&user, &app_id)?;
    operator_only(&user, "deleting an app")?;
    let existing = state
        .registry
        .read_through(&app_id)
        .await?
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
    if !existing.is_deleted() {
        state
            .registry
            .execute(&app_id, &AppCommand::Delete, &user.sub, None)
            .await?;
    }
    let cancelled = cancel_runs(&state, &app_id).await?;
    info!(app_id = %app_id, cancelled, actor = %user.sub, "App deleted; its read models are archived, then removed, by the retention projector.");
    Ok(Json(json!({
        "app_id": app_id,
        "status": "deleted",
        "runs_cancelled": cancelled,
        "read_models": "archive_pending",
    })))
}

/// Sends `cancel` to each of the app's unfinished chats.
async fn cancel_runs(state: &State, app_id: &str) -> Result<u64, ApiError> {
    let db = state.store.resolve_storage(app_id).await?;
    let sessions = db.collection::<Document>(mozaiks_store::SESSIONS);
    let mongo = |e: mongodb::error::Error| ApiError::unavailable(format!("read models: {e}"));
    let mut open = sessions
        .find(
            doc! { "app_id": app_id, "status": { "$in": ["active", "running", "waiting_input"] } },
        )
        .projection(doc! { "chat_id": 1, "user_id": 1, "workflow_name": 1 })
        .await
        .map_err(mongo)?;
    let mut cancelled = 0;
    while open.advance().await.map_err(mongo)? {
        let d = open.deserialize_current().map_err(mongo)?;
        let (Ok(chat_id), Ok(user_id), Ok(workflow)) = (
            d.get_str("chat_id"),
            d.get_str("user_id"),
            d.get_str("workflow_name"),
        ) else {
            continue;
        };
        let cmd = CommandEnvelope::new(
            app_id,
            chat_id,
            user_id,
            workflow,
            Command::Cancel {
                reason: "app deleted".into(),
            },
        );
        match state
            .bus
            .send_command(&cmd, Some(&format!("app-deleted:{app_id}:{chat_id}")))
            .await
        {
            Ok(()) => cancelled += 1,
            Err(e) => {
                warn!(app_id, chat_id, error = %e, "Could not cancel a chat of a deleted app.")
            }
        }
    }
    Ok(cancelled)
}
