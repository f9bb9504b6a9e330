//! Where an app's read models live, and moving them: `GET/POST /api/apps/{app_id}/storage`
//! (superadmin). The move itself — copy, catch up, switch, settle, one at a time per app under a
//! fleet-wide lease — is [`mozaiks_admin::moves`]; the resolver behind `resolve_storage` is
//! [`mozaiks_admin::storage`].

use axum::Json;
use axum::extract::{Path, State as St};
use serde::Deserialize;

use crate::State;
use crate::authz::{User, check_app_id, operator_for};
use crate::error::{ApiError, Body};

/// `POST /api/apps/{app_id}/storage` body: the target database; `db_name: null` (or the shared
/// database's name without a `mongo_uri`) moves the app back to the shared database.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MoveStorage {
    /// The target database; null or absent (or the shared database's name) moves the app back
    /// to the shared database.
    #[serde(default)]
    #[schemars(regex(pattern = r"^[A-Za-z0-9_-]{1,63}$"))]
    pub db_name: Option<String>,
    /// Another MongoDB deployment (mongodb:// or mongodb+srv://, no credentials: authenticate by
    /// certificate options or network policy).
    #[serde(default)]
    pub mongo_uri: Option<String>,
}

/// A control-plane answer whose type has no schema (`mozaiks_admin` derives none): any JSON in
/// `/openapi.json`.
type Documented<T> = aide::UseApi<Json<T>, Json<serde_json::Value>>;

/// `GET /api/apps/{app_id}/storage`: where the app's read models live and the move in progress
/// on any replica, if any.
pub async fn get_storage(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
) -> Result<Documented<mozaiks_admin::StorageView>, ApiError> {
    check_app_id(&app_id)?;
    operator_for(&user, &app_id, "reading an app's storage")?;
    Ok(Json(state.admin.storage_of(&app_id).await?).into())
}

/// `POST /api/apps/{app_id}/storage`: moves the app's read models (409 `move_in_progress` while
/// another move of the app runs anywhere; 503 `move_interrupted` if the move lost its lease).
pub async fn move_storage(
    St(state): St<State>,
    User(user): User,
    Path(app_id): Path<String>,
    Body(req): Body<MoveStorage>,
) -> Result<Documented<mozaiks_admin::MoveReport>, ApiError> {
    check_app_id(&app_id)?;
    operator_for(&user, &app_id, "moving an app's storage")?;
    let report = state
        .admin
        .move_storage(&app_id, req.db_name, req.mongo_uri, &user.sub)
        .await?;
    Ok(Json(report).into())
}
