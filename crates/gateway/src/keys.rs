//! API keys of app back-ends: `POST/GET /api/apps/{app_id}/keys`, `DELETE
//! /api/apps/{app_id}/keys/{key_id}` (superadmin, or the app's admin), and the [`Caller`]
//! extractor of the endpoints a back-end needs.
//!
//! A key acts **for its app**: it may start a session for any user of that app (the body names
//! the user, `user_id`), list a user's sessions, read any session and transcript of the app, the
//! app's workflows and its usage. It is sent as `Authorization: Bearer mzk_…` or `X-Api-Key:
//! mzk_…`. Every other endpoint takes only user tokens, so a key there is refused as a bad token
//! (401), and a key of another app is refused exactly like a user token of another app. Keys are
//! stored hashed ([`mozaiks_control::keys`]).

use std::sync::Arc;

use axum::Json;
use axum::extract::{FromRequestParts, Path, State as St};
use axum::http::StatusCode;
use axum::http::request::Parts;
use mozaiks_auth::UserClaims;
use mozaiks_control::keys::{KeyError, KeyRecord};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::auth::User;
use crate::error::{ApiError, Body};
use crate::metrics as m;

/// Who calls an endpoint that app back-ends may use: a user token or an app's API key.
pub enum Caller {
    User(UserClaims),
    Key(Arc<KeyRecord>),
}

impl Caller {
    /// The caller as claims: a key acts with role `admin` within its app only (it can read any
    /// session of the app), never `superadmin`; its `sub` is `key:{key_id}`.
    pub fn claims(&self) -> UserClaims {
        match self {
            Caller::User(u) => u.clone(),
            Caller::Key(k) => UserClaims {
                sub: format!("key:{}", k.key_id),
                app_id: k.app_id.clone(),
                roles: vec![mozaiks_auth::ROLE_ADMIN.to_string()],
                exp: 0,
                iat: None,
                nbf: None,
                iss: "mozaiks".into(),
                aud: "mozaiks".into(),
            },
        }
    }

    pub fn is_key(&self) -> bool {
        matches!(self, Caller::Key(_))
    }
}

fn key_refused() -> ApiError {
    ApiError::unauthorized("api_key_invalid", "the API key is not valid")
}

impl FromRequestParts<State> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<Caller, ApiError> {
        let header_key = parts
            .headers
            .get("x-api-key")
            .map(|v| v.to_str().map(str::trim).map_err(|_| key_refused()))
            .transpose()?;
        let bearer_key = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
            .filter(|t| t.starts_with(mozaiks_control::keys::PREFIX));
        let Some(key) = header_key.or(bearer_key) else {
            return User::from_request_parts(parts, state)
                .await
                .map(|User(u)| Caller::User(u));
        };
        match state.keys.verify(key).await? {
            Ok(rec) => {
                metrics::counter!(m::API_KEY_AUTH, "outcome" => "accepted").increment(1);
                tracing::debug!(app_id = %rec.app_id, key_id = %rec.key_id, "API key accepted.");
                Ok(Caller::Key(rec))
            }
            Err(why) => {
                metrics::counter!(m::API_KEY_AUTH, "outcome" => why.kind()).increment(1);
                tracing::info!(reason = why.kind(), "API key refused.");
                Err(key_refused())
            }
        }
    }
}

impl From<KeyError> for ApiError {
    fn from(e: KeyError) -> ApiError {
        match e {
            KeyError::Rejected(r) => {
                let status = match r {
                    mozaiks_control::keys::KeyRejection::TooManyKeys => StatusCode::CONFLICT,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                ApiError::new(status, r.code(), r.to_string())
            }
            KeyError::Registry(e) => e.into(),
        }
    }
}

fn key_json(k: &KeyRecord) -> Value {
    json!({
        "key_id": k.key_id,
        "app_id": k.app_id,
        "name": k.name,
        "created_at": k.created_at,
        "created_by": k.created_by,
        "revoked_at": k.revoked_at,
        "revoked": k.is_revoked(),
    })
}

/// The app's admins or a superadmin, on a live app.
async fn key_admin(state: &State, user: &UserClaims, app_id: &str) -> Result<(), ApiError> {
    crate::apps::check_app_id(app_id)?;
    crate::apps::admin_for(user, app_id)?;
    state
        .registry
        .read_through(app_id)
        .await?
        .filter(|a| !a.is_deleted())
        .ok_or_else(|| ApiError::not_found("app_not_found", "no such app"))?;
    Ok(())
}

/// `POST /api/apps/{app_id}/keys` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    pub name: String,
}

pub async fn create(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
    Body(req): Body<CreateKey>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    key_admin(&state, &user, &app_id).await?;
    let new = state.keys.create(&app_id, &req.name, &user.sub).await?;
    metrics::counter!(m::API_KEYS_CREATED, "app_id" => app_id.clone()).increment(1);
    let mut body = key_json(&new.record);
    body["key"] = json!(new.key);
    Ok((StatusCode::CREATED, Json(body)))
}

pub async fn list(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    key_admin(&state, &user, &app_id).await?;
    let keys: Vec<Value> = state
        .keys
        .list(&app_id)
        .iter()
        .map(|k| key_json(k))
        .collect();
    Ok(Json(json!({ "keys": keys })))
}

pub async fn revoke(
    St(state): St<State>,
    User(user): User,
    Path((app_id, key_id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    key_admin(&state, &user, &app_id).await?;
    let valid_id = key_id.len() == 16 && key_id.bytes().all(|b| b.is_ascii_hexdigit());
    let rec = if valid_id {
        state.keys.revoke(&app_id, &key_id, &user.sub).await?
    } else {
        None
    };
    let rec = rec.ok_or_else(|| ApiError::not_found("key_not_found", "no such key"))?;
    Ok(Json(key_json(&rec)))
}
