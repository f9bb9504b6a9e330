//! Authentication extractors. `app_id` and `user_id` always come from the verified token.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use mozaiks_auth::UserClaims;

use crate::State;
use crate::error::ApiError;

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

impl User {
    /// Refuses unless the token belongs to `app_id`.
    pub fn require_app(&self, app_id: &str) -> Result<(), ApiError> {
        if self.0.app_id == app_id || self.0.is_superadmin() {
            Ok(())
        } else {
            Err(ApiError::forbidden(
                "app_mismatch",
                "the token is not valid for this app_id",
            ))
        }
    }
}
