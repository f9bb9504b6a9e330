//! HTTP errors in one place: `{"error": {"code": ..., "message": ...}}` with a stable code.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An API error: a status, a stable machine-readable code and a sentence for humans.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn unauthorized(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    }

    pub fn forbidden(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::FORBIDDEN, code, message)
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, code, message)
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    pub fn unavailable(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// The answer to a known path with a method it does not take: 405 with the error envelope
/// (axum adds the `Allow` header).
pub async fn method_not_allowed(method: axum::http::Method) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("this endpoint does not take {method}"),
    )
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::error!(code = self.code, message = %self.message, "Request failed.");
        }
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        let mut resp = (self.status, body).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        resp
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> ApiError {
        let status = r.status();
        let code = match r {
            JsonRejection::MissingJsonContentType(_) => "unsupported_media_type",
            JsonRejection::JsonSyntaxError(_) => "bad_json",
            JsonRejection::JsonDataError(_) => "invalid_body",
            _ => "bad_request",
        };
        ApiError::new(status, code, r.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> ApiError {
        ApiError::bad_request("invalid_query", r.body_text())
    }
}

impl From<mozaiks_bus::Error> for ApiError {
    fn from(e: mozaiks_bus::Error) -> ApiError {
        ApiError::unavailable(format!("event log: {e}"))
    }
}

impl From<mozaiks_store::Error> for ApiError {
    fn from(e: mozaiks_store::Error) -> ApiError {
        ApiError::unavailable(format!("read models: {e}"))
    }
}

impl From<mozaiks_auth::Error> for ApiError {
    fn from(e: mozaiks_auth::Error) -> ApiError {
        match e.kind() {
            mozaiks_auth::ErrorKind::Unauthorized => {
                ApiError::unauthorized(e.code(), e.to_string())
            }
            mozaiks_auth::ErrorKind::Unavailable => ApiError::unavailable(e.to_string()),
            _ => ApiError::internal(e.to_string()),
        }
    }
}

impl From<mozaiks_control::Error> for ApiError {
    fn from(e: mozaiks_control::Error) -> ApiError {
        use mozaiks_control::{Error as E, Rejection};
        match e {
            E::Rejected(r) => {
                let status = match r {
                    Rejection::AppExists => StatusCode::CONFLICT,
                    Rejection::AppNotFound => StatusCode::NOT_FOUND,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
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

impl From<mozaiks_control::keys::KeyError> for ApiError {
    fn from(e: mozaiks_control::keys::KeyError) -> ApiError {
        use mozaiks_control::keys::{KeyError, KeyRejection};
        match e {
            KeyError::Rejected(r) => {
                let status = match r {
                    KeyRejection::TooManyKeys => StatusCode::CONFLICT,
                    _ => StatusCode::UNPROCESSABLE_ENTITY,
                };
                ApiError::new(status, r.code(), r.to_string())
            }
            KeyError::Registry(e) => e.into(),
        }
    }
}

impl From<mozaiks_admin::Error> for ApiError {
    fn from(e: mozaiks_admin::Error) -> ApiError {
        use mozaiks_admin::Error as E;
        match e {
            E::Control(e) => e.into(),
            E::Bus(e) => e.into(),
            E::Store(e) => e.into(),
            E::AppNotFound => ApiError::not_found("app_not_found", e.to_string()),
            E::InvalidStorage(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_storage",
                e.to_string(),
            ),
            E::MoveInProgress => {
                ApiError::new(StatusCode::CONFLICT, "move_in_progress", e.to_string())
            }
            E::MoveInterrupted => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "move_interrupted",
                e.to_string(),
            ),
        }
    }
}

/// A JSON body whose rejections use [`ApiError`].
#[derive(axum::extract::FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

/// A query string whose rejections use [`ApiError`].
#[derive(axum::extract::FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);
