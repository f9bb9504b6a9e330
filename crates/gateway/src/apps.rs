//! App lifecycle: `POST /api/apps`, `GET /api/apps`, `GET/PATCH/DELETE /api/apps/{app_id}`.
//!
//! Authorization ([`crate::authz`]), least privilege:
//! - role `superadmin` (the operator) manages every app: create, read, patch every field, delete;
//! - role `admin` reads its own app (the token's `app_id`) and patches only its own settings:
//!   `name`, `workflows`, `context`. Entitlements (`tier`, `limits`, `runtime_url`, `status`) and
//!   creating or deleting apps are the operator's;
//! - anyone else, and any token of another app, is refused before the app is looked up, so an
//!   answer never says whether another tenant's app exists.
//!
//! Commands go through the app aggregate ([`mozaiks_control::Registry::execute`]): events on
//! `MZ_CTL`, the view in `MZ_APPS`, on every replica within a second. Creating and deleting an
//! app take more steps (a dedicated-database tier's database, the deleted app's chats cancelled):
//! [`mozaiks_admin`] does them.

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::StatusCode;
use mozaiks_control::{AppCommand, AppPatch, AppStatus, Limits};
use schemars::JsonSchema;
use serde::{Deserialize, Deserializer};
use serde_json::{Map, Value, json};
use tracing::info;
use uuid::Uuid;

use crate::State;
use crate::authz::{Access, User, access, check_app_id, operator_only};
use crate::error::{ApiError, Body};

/// `limits` from a body: an object of known fields only.
pub fn parse_limits(v: Value) -> Result<Limits, ApiError> {
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
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateApp {
    /// Chosen by the caller; generated when absent.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,64}$"))]
    pub app_id: Option<String>,
    #[schemars(length(min = 1, max = 100))]
    pub name: String,
    /// A tier of config/tiers.yaml (the shipped ones are listed).
    #[schemars(extend("enum" = ["horizons", "starter", "business", "dedicated", "export"]))]
    pub tier: String,
    /// The allowlist; absent allows every shipped workflow.
    #[serde(default)]
    pub workflows: Option<Vec<String>>,
    /// Overrides of the tier's limits ([`parse_limits`]).
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::LimitsBody>")]
    pub limits: Option<Value>,
    /// ws:// or wss:// base of a dedicated runtime (dedicated and export tiers).
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
    let new = mozaiks_admin::NewApp {
        name: req.name,
        tier: req.tier,
        workflows: req.workflows,
        limits,
        runtime_url: req.runtime_url,
    };
    let app = state
        .admin
        .create_app(&app_id, new, &user.sub, &shipped_workflows(&state))
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

pub async fn get_app(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    access(&user, &app_id)?;
    let app = state.admin.live_app(&app_id).await?;
    Ok(Json(app_json(&state, &app)))
}

fn some<'de, T: Deserialize<'de>, D: Deserializer<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/apps/{app_id}` body; absent fields stay as they are.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PatchApp {
    #[serde(default)]
    #[schemars(length(min = 1, max = 100))]
    pub name: Option<String>,
    /// superadmin only.
    #[serde(default)]
    pub tier: Option<String>,
    /// Replaces the overrides (superadmin only); an absent field falls back to the tier.
    #[serde(default)]
    #[schemars(with = "Option<crate::openapi::LimitsBody>")]
    pub limits: Option<Value>,
    /// The allowlist; `null` allows every shipped workflow; unknown names are refused (422
    /// unknown_workflow).
    #[serde(default, deserialize_with = "some")]
    #[schemars(with = "Option<Vec<String>>")]
    pub workflows: Option<Option<Vec<String>>>,
    /// Replaces the app's context variables (at most 64 KiB).
    #[serde(default)]
    pub context: Option<Map<String, Value>>,
    /// `null` removes the dedicated runtime (superadmin only).
    #[serde(default, deserialize_with = "some")]
    #[schemars(with = "Option<String>")]
    pub runtime_url: Option<Option<String>>,
    /// `active` or `suspended` (superadmin only).
    #[serde(default)]
    #[schemars(with = "Option<String>", extend("enum" = ["active", "suspended"]))]
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

/// `DELETE /api/apps/{app_id}` (superadmin): records `app.deleted` and cancels the app's
/// unfinished chats ([`mozaiks_admin::Admin::delete_app`]); the read models are archived, then
/// removed, by the retention projector within seconds. Idempotent.
pub async fn delete(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    check_app_id(&app_id)?;
    access(&user, &app_id)?;
    operator_only(&user, "deleting an app")?;
    let cancelled = state.admin.delete_app(&app_id, &user.sub).await?;
    info!(app_id = %app_id, cancelled, actor = %user.sub, "App deleted; its read models are archived, then removed, by the retention projector.");
    Ok(Json(json!({
        "app_id": app_id,
        "status": "deleted",
        "runs_cancelled": cancelled,
        "read_models": "archive_pending",
    })))
}
