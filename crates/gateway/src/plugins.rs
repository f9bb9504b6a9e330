//! Plugins over HTTP (see `mozaiks_plugins`):
//!
//! - `POST /api/execute/{plugin}` (a user token or the app's API key): runs the plugin with the
//!   client's JSON object plus `_context` {`app_id`, `user_id`, `roles`, `request_id`, `settings`}
//!   from the verified caller; a client's `_context`, `app_id` or `user_id` is overwritten. An
//!   API key executes as user `key:{key_id}`. Answers the plugin's JSON.
//! - `GET/PUT /api/plugins/{plugin}/settings` (a user token): the caller's settings of a plugin.
//! - `GET /api/apps/{app_id}/plugins` (any caller of the app): the plugins it sees;
//!   `POST` (role `admin` of the app or its API key): uploads one.
//! - `GET/PUT /api/apps/{app_id}/plugins/enabled` (role `admin`): the app's enabled list.
//! - `GET /api/apps/{app_id}/plugins/usage` (role `admin`): executions per plugin, 30 days.
//!
//! Errors: 404 `plugin_not_found`, 403 `plugin_not_allowed`, 422 `invalid_input`,
//! `invalid_plugin`, `invalid_module`, `plugin_trapped` and `plugin_error` (with the plugin's own
//! `plugin_code`), 504 `plugin_timeout`, 413 `too_large`, 429 `plugin_busy` (the app already runs
//! `MAX_INFLIGHT_PER_APP` calls on this replica).

use std::sync::Arc;

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use mozaiks_control::App;
use mozaiks_plugins::{Call, Error as PluginError, Limits, Manifest, Via};
use serde::Deserialize;
use serde_json::{Value, json};
use tracing::Instrument;

use crate::State;
use crate::authz::{self, Caller, User};
use crate::error::{ApiError, Body};

/// Largest upload body (a base64 module of up to 4 MiB and its manifest).
pub const MAX_UPLOAD_BODY: usize = 6 * 1024 * 1024;

/// A plugin error as an HTTP answer.
pub fn api_error(e: PluginError) -> Response {
    let status = match &e {
        PluginError::NotFound(_) => StatusCode::NOT_FOUND,
        PluginError::NotAllowed(_) => StatusCode::FORBIDDEN,
        PluginError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
        PluginError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        PluginError::Busy(_) => StatusCode::TOO_MANY_REQUESTS,
        PluginError::InvalidInput(_)
        | PluginError::InvalidManifest(_)
        | PluginError::InvalidModule(_)
        | PluginError::Trapped(_)
        | PluginError::Plugin { .. } => StatusCode::UNPROCESSABLE_ENTITY,
        PluginError::Unavailable(d) => {
            return ApiError::unavailable_from("the plugin store", d).into_response();
        }
        PluginError::Internal(d) => return ApiError::internal(d.clone()).into_response(),
    };
    let mut body = json!({"error": {"code": e.code(), "message": e.message()}});
    if let PluginError::Plugin { code, message } = &e {
        body["error"]["plugin_code"] = json!(code);
        body["error"]["message"] = json!(message);
    }
    (status, Json(body)).into_response()
}

fn plugins(state: &State) -> Result<&mozaiks_plugins::Plugins, ApiError> {
    state.plugins.as_ref().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "plugins_disabled",
            "plugins are not enabled on this gateway",
        )
    })
}

/// The app (not deleted; 404 `app_not_found`), reading through to the bucket on a miss.
async fn app(state: &State, app_id: &str) -> Result<Arc<App>, ApiError> {
    let app = match state.registry.get(app_id) {
        Some(app) => Some(app),
        None => state
            .registry
            .read_through(app_id)
            .await
            .map_err(|e| ApiError::unavailable_from("the app registry", e))?,
    };
    app.filter(|a| !a.is_deleted())
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))
}

fn request_id(headers: &HeaderMap) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| mozaiks_events::ids::check_client_id("request_id", v).is_ok())
        .map(str::to_string)
        .unwrap_or_else(|| uuid::Uuid::now_v7().to_string())
}

/// `POST /api/execute/{plugin}`.
pub async fn execute(
    St(state): St<State>,
    Path(plugin): Path<String>,
    caller: Caller,
    headers: HeaderMap,
    Body(input): Body<Value>,
) -> Result<Response, ApiError> {
    let p = plugins(&state)?;
    let claims = caller.claims();
    let app = app(&state, &claims.app_id).await?;
    if !app.is_active() {
        return Err(ApiError::forbidden("app_suspended", "the app is suspended"));
    }
    let call = Call {
        app_id: claims.app_id.clone(),
        tier: app.tier.clone(),
        user_id: claims.sub.clone(),
        roles: claims.roles.clone(),
        request_id: request_id(&headers),
        plugin: plugin.clone(),
        input,
        via: Via::Http,
        chat_id: None,
    };
    let request_id = call.request_id.clone();
    let span = tracing::info_span!("plugin", app_id = %claims.app_id, plugin = %plugin, request_id = %request_id);
    match p.execute(call).instrument(span).await {
        Ok(done) => {
            let mut resp = Json(done.output).into_response();
            let h = resp.headers_mut();
            if let Ok(v) = done.version.parse() {
                h.insert("x-plugin-version", v);
            }
            if let Ok(v) = request_id.parse() {
                h.insert("x-request-id", v);
            }
            Ok(resp)
        }
        Err(e) => Ok(api_error(e)),
    }
}

/// `GET /api/plugins/{plugin}/settings`.
pub async fn get_settings(
    St(state): St<State>,
    Path(plugin): Path<String>,
    User(user): User,
) -> Result<Response, ApiError> {
    let p = plugins(&state)?;
    if let Err(e) = p.exists(&user.app_id, &plugin).await {
        return Ok(api_error(e));
    }
    Ok(match p.settings(&user.app_id, &user.sub, &plugin).await {
        Ok(v) => Json(v).into_response(),
        Err(e) => api_error(e),
    })
}

/// `PUT /api/plugins/{plugin}/settings`: replaces the caller's settings (a JSON object).
pub async fn put_settings(
    St(state): St<State>,
    Path(plugin): Path<String>,
    User(user): User,
    Body(value): Body<Value>,
) -> Result<Response, ApiError> {
    let p = plugins(&state)?;
    Ok(
        match p
            .set_settings(&user.app_id, &user.sub, &plugin, value)
            .await
        {
            Ok(v) => Json(v).into_response(),
            Err(e) => api_error(e),
        },
    )
}

/// `GET /api/apps/{app_id}/plugins`: every plugin the app sees and whether it may run it.
pub async fn list(
    St(state): St<State>,
    Path(app_id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    authz::check_app_id(&app_id)?;
    let claims = caller.claims();
    if !claims.is_superadmin() {
        authz::token_app(&claims, &app_id)?;
    }
    let p = plugins(&state)?;
    let app = app(&state, &app_id).await?;
    Ok(match p.list(&app_id, &app.tier).await {
        Ok(list) => Json(json!({"app_id": app_id, "plugins": list})).into_response(),
        Err(e) => api_error(e),
    })
}

/// `POST /api/apps/{app_id}/plugins` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UploadRequest {
    #[schemars(regex(pattern = r"^[a-z0-9_-]{1,64}$"))]
    pub name: String,
    #[schemars(regex(pattern = r"^[A-Za-z0-9._+-]{1,32}$"))]
    pub version: String,
    #[serde(default)]
    #[schemars(length(max = 1024))]
    pub description: String,
    #[serde(default)]
    #[schemars(schema_with = "crate::openapi::plugin_limits")]
    pub limits: Option<Limits>,
    #[serde(default)]
    #[schemars(length(max = 32))]
    pub http_allowlist: Vec<String>,
    /// The module (binary or text), base64, up to 4 MiB.
    #[serde(default)]
    pub module_base64: Option<String>,
    /// The module as WebAssembly text (or module_base64).
    #[serde(default)]
    pub wat: Option<String>,
}

/// `POST /api/apps/{app_id}/plugins`: role `admin` of the app (or its API key) uploads a plugin;
/// every replica runs it from the next call.
pub async fn upload(
    St(state): St<State>,
    Path(app_id): Path<String>,
    caller: Caller,
    Body(req): Body<UploadRequest>,
) -> Result<Response, ApiError> {
    authz::check_app_id(&app_id)?;
    let claims = caller.claims();
    authz::admin_for(&claims, &app_id)?;
    let p = plugins(&state)?;
    let app = app(&state, &app_id).await?;
    let module = match (req.module_base64, req.wat) {
        (Some(b64), None) => base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_module",
                    format!("module_base64 is not base64: {e}"),
                )
            })?,
        (None, Some(wat)) => wat.into_bytes(),
        _ => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_module",
                "give exactly one of module_base64 or wat",
            ));
        }
    };
    let manifest = Manifest {
        name: req.name,
        version: req.version,
        description: req.description,
        module: String::new(),
        limits: req.limits.unwrap_or_default(),
        http_allowlist: req.http_allowlist,
    };
    let span = tracing::info_span!("plugin_upload", app_id = %app_id, plugin = %manifest.name);
    let stored = p
        .store_upload(&app_id, &app.tier, &claims.sub, manifest, module)
        .instrument(span)
        .await;
    Ok(match stored {
        Ok(up) => (
            StatusCode::CREATED,
            Json(json!({
                "app_id": app_id,
                "name": up.manifest.name,
                "version": up.manifest.version,
                "digest": up.digest,
                "size": up.size,
                "uploaded_at": up.uploaded_at,
            })),
        )
            .into_response(),
        Err(e) => api_error(e),
    })
}

/// `GET /api/apps/{app_id}/plugins/enabled`: `{"plugins": [...] | null}` (null: every plugin
/// the tier allows).
pub async fn get_enabled(
    St(state): St<State>,
    Path(app_id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    authz::check_app_id(&app_id)?;
    authz::admin_for(&caller.claims(), &app_id)?;
    let p = plugins(&state)?;
    app(&state, &app_id).await?;
    Ok(match p.enabled(&app_id).await {
        Ok(list) => Json(json!({"app_id": app_id, "plugins": list})).into_response(),
        Err(e) => api_error(e),
    })
}

/// `GET /api/apps/{app_id}/plugins/usage` (role `admin` of the app, its API key, a superadmin):
/// executions per plugin over the last 30 days (`MZ_PLUGINS`' retention).
pub async fn usage(
    St(state): St<State>,
    Path(app_id): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    authz::check_app_id(&app_id)?;
    authz::admin_for(&caller.claims(), &app_id)?;
    let p = plugins(&state)?;
    app(&state, &app_id).await?;
    Ok(match p.usage(&app_id).await {
        Ok(counts) => {
            let total: u64 = counts.values().sum();
            Json(json!({"app_id": app_id, "executions": counts, "total": total, "window_days": 30}))
                .into_response()
        }
        Err(e) => api_error(e),
    })
}

/// `PUT /api/apps/{app_id}/plugins/enabled` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct EnabledRequest {
    /// The plugins that may run (within the tier's); `null` clears the list.
    #[schemars(required, length(max = 256), extend("items" = {"type": "string", "pattern": "^[a-z0-9_-]{1,64}$"}))]
    pub plugins: Option<Vec<String>>,
}

/// `PUT /api/apps/{app_id}/plugins/enabled`.
pub async fn put_enabled(
    St(state): St<State>,
    Path(app_id): Path<String>,
    caller: Caller,
    Body(req): Body<EnabledRequest>,
) -> Result<Response, ApiError> {
    authz::check_app_id(&app_id)?;
    authz::admin_for(&caller.claims(), &app_id)?;
    let p = plugins(&state)?;
    app(&state, &app_id).await?;
    Ok(match p.set_enabled(&app_id, req.plugins.clone()).await {
        Ok(()) => Json(json!({"app_id": app_id, "plugins": req.plugins})).into_response(),
        Err(e) => api_error(e),
    })
}
