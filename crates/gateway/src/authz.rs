//! Who calls and what they may do: the callers' extractors and the gateway's authorization rules.
//!
//! `app_id` and `user_id` always come from the verified token (or the API key's record), never
//! from the request alone. Least privilege:
//! - role `superadmin` (the operator) manages every app ([`operator_for`], [`operator_only`]);
//! - role `admin` manages its own app's settings, keys and usage ([`admin_for`]);
//! - anyone else, and any token of another app, is refused before the app is looked up
//!   (`app_mismatch` first), so an answer never says whether another tenant's app exists;
//! - an app's API key acts for its app ([`Caller`]): role `admin` within the app, never
//!   `superadmin`, and only on the endpoints that take a [`Caller`];
//! - the ops endpoints: an app's admin sees its own app, the operator every app ([`ops_scope`]).

use std::sync::Arc;

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use mozaiks_auth::UserClaims;
use mozaiks_control::keys::KeyRecord;
use mozaiks_events::ids;

use crate::State;
use crate::error::ApiError;
use crate::metrics as m;

/// A verified user token from `Authorization: Bearer ...`.
pub struct User(pub UserClaims);

impl FromRequestParts<State> for User {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &State) -> Result<User, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| {
                ApiError::unauthorized(
                    "token_missing",
                    "an Authorization: Bearer token is required",
                )
            })?;
        let value = header.to_str().map_err(|_| {
            ApiError::unauthorized("token_malformed", "the Authorization header is not text")
        })?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("token_malformed", "expected Authorization: Bearer <token>")
            })?;
        // Fetches the issuer's JWKS again when the token names a key not seen yet (rotation).
        let claims = state.auth.verify_user_fetching(token.trim()).await?;
        Ok(User(claims))
    }
}

// How each route authenticates is part of its documentation (`crate::openapi`).
impl aide::OperationInput for User {}
impl aide::OperationInput for Caller {}

/// Who calls an endpoint that app back-ends may use: a user token or an app's API key
/// (`Authorization: Bearer mzk_…` or `X-Api-Key: mzk_…`; see [`crate::keys`]).
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

/// The user a session is started for: the token's `sub`, or for an API key the body's `user_id`.
pub fn acting_user(caller: &Caller, asked: Option<&str>) -> Result<String, ApiError> {
    match (caller, asked) {
        (Caller::Key(_), Some(u)) => {
            ids::check_user(u).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_id",
                    e.to_string(),
                )
            })?;
            Ok(u.to_string())
        }
        (Caller::Key(_), None) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "user_id_required",
            "an API key starts sessions on behalf of a user: name it in user_id",
        )),
        (Caller::User(u), Some(asked)) if asked != u.sub => Err(ApiError::forbidden(
            "user_mismatch",
            "user_id differs from the token's user",
        )),
        (Caller::User(u), _) => Ok(u.sub.clone()),
    }
}

/// An identifier from a path, query or body (`what` names it in the message): 422 `invalid_id`.
pub fn check_id(what: &'static str, value: &str) -> Result<(), ApiError> {
    ids::check_token(what, value).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_id",
            e.to_string(),
        )
    })
}

pub fn check_app_id(app_id: &str) -> Result<(), ApiError> {
    check_id("app_id", app_id)
}

/// Refuses an `app_id` of the request that is not the token's own (user endpoints: sessions).
pub fn token_app(user: &UserClaims, app_id: &str) -> Result<(), ApiError> {
    if app_id == user.app_id {
        Ok(())
    } else {
        Err(ApiError::forbidden(
            "app_mismatch",
            "app_id differs from the token's app",
        ))
    }
}

/// Who may do what to one app.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Role `superadmin`: every app, every field.
    Operator,
    /// Role `admin` of this app: read, and patch its own settings.
    OwnAdmin,
}

/// The caller's access to `app_id`: `app_mismatch` for a token of another app, `admin_required`
/// for a user of the app without role `admin`.
pub fn access(user: &UserClaims, app_id: &str) -> Result<Access, ApiError> {
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

/// Role `superadmin`; `what` names the operation in the refusal.
pub fn operator_only(user: &UserClaims, what: &str) -> Result<(), ApiError> {
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
pub fn admin_for(user: &UserClaims, app_id: &str) -> Result<(), ApiError> {
    access(user, app_id).map(|_| ())
}

/// Role `superadmin` for an operation on `app_id`; a token of another app is refused as
/// `app_mismatch` first, like every app endpoint, so nothing leaks about other tenants' apps.
pub fn operator_for(user: &UserClaims, app_id: &str, what: &str) -> Result<(), ApiError> {
    access(user, app_id)?;
    operator_only(user, what)
}

/// The app an ops endpoint answers for (`None`: every app): role `admin` sees its own app (an
/// `?app_id=` of another app is `app_mismatch`), `superadmin` every app or the one asked for.
pub fn ops_scope(user: &UserClaims, app_id: Option<String>) -> Result<Option<String>, ApiError> {
    if !user.is_admin() {
        return Err(ApiError::forbidden(
            "admin_required",
            "ops endpoints need role admin (of the app) or superadmin",
        ));
    }
    match app_id {
        Some(app) if app == user.app_id || user.is_superadmin() => Ok(Some(app)),
        Some(_) => Err(ApiError::forbidden(
            "app_mismatch",
            "the token is not valid for this app_id",
        )),
        None if user.is_superadmin() => Ok(None),
        None => Ok(Some(user.app_id.clone())),
    }
}
