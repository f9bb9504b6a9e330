//! API keys of app back-ends: `POST/GET /api/apps/{app_id}/keys`, `DELETE
//! /api/apps/{app_id}/keys/{key_id}` (superadmin, or the app's admin). The endpoints a back-end
//! needs take the [`Caller`](crate::authz::Caller) extractor.
//!
//! A key acts **for its app**: it may start a session for any user of that app (the body names
//! the user, `user_id`), list a user's sessions, read any session and transcript of the app, the
//! app's workflows and its usage. It is sent as `Authorization: Bearer mzk_…` or `X-Api-Key:
//! mzk_…`. Every other endpoint takes only user tokens, so a key there is refused as a bad token
//! (401), and a key of another app is refused exactly like a user token of another app. Keys are
//! stored hashed ([`mozaiks_control::keys`]).

use axum::Json;
use axum::extract::{Path, State as St};
use axum::http::StatusCode;
use mozaiks_auth::UserClaims;
use mozaiks_control::keys::KeyRecord;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::State;
use crate::authz::{User, admin_for, check_app_id};
use crate::error::{ApiError, Body};
use crate::metrics as m;

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
    check_app_id(app_id)?;
    admin_for(user, app_id)?;
    state.admin.live_app(app_id).await?;
    Ok(())
}

/// `POST /api/apps/{app_id}/keys` body.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateKey {
    /// What the key is for, e.g. "billing backend".
    #[schemars(length(min = 1, max = 100))]
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
