//! HTTP errors in one place: `{"error": {"code": ..., "message": ...}}` with a stable code, and
//! every conversion of another crate's error into one.
//!
//! A server error's body says what failed in general terms (`the event log is unavailable;
//! retry`), never the internal error's text; that text rides on the response, out of the body, to
//! [`log_server_errors`], the router's middleware that logs each 5xx answer once.

use std::fmt::Display;

use axum::Json;
use axum::extract::Request;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An API error: a status, a stable machine-readable code and a sentence for humans.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// What a server error's body does not say (the internal error's text), for the log.
    pub detail: Option<String>,
}

/// A server error's code and internal text, carried by its response to [`log_server_errors`].
#[derive(Clone, Debug)]
struct Failure {
    code: &'static str,
    detail: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            detail: None,
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

    /// 503 `unavailable`: something this request needs does not answer; `detail` (the internal
    /// error) goes to the log, not to the body.
    pub fn unavailable(detail: impl Into<String>) -> ApiError {
        ApiError::unavailable_from("a service this request needs", detail.into())
    }

    /// 503 `unavailable` naming what does not answer (`the event log`), with the internal error
    /// for the log.
    pub fn unavailable_from(what: &str, detail: impl Display) -> ApiError {
        ApiError {
            detail: Some(format!("{what}: {detail}")),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{what} is unavailable; retry"),
            )
        }
    }

    /// 500 `internal`: a bug or corrupt state; `detail` goes to the log, not to the body.
    pub fn internal(detail: impl Into<String>) -> ApiError {
        ApiError {
            detail: Some(detail.into()),
            ..ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error",
            )
        }
    }
}

/// Logs every 5xx answer once, with its code and the internal error its body does not carry
/// (a router middleware, inside the request's span). 503 is a warning (a dependency is down),
/// any other 5xx an error.
pub async fn log_server_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    if status.is_server_error() {
        let failure = resp.extensions().get::<Failure>();
        let code = failure.map_or("", |f| f.code);
        let detail = failure.map_or("", |f| f.detail.as_str());
        if status == StatusCode::SERVICE_UNAVAILABLE {
            tracing::warn!(status = status.as_u16(), code, detail, "Request failed.");
        } else {
            tracing::error!(status = status.as_u16(), code, detail, "Request failed.");
        }
    }
    resp
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
        let body = Json(json!({ "error": { "code": self.code, "message": self.message } }));
        let mut resp = (self.status, body).into_response();
        if self.status.is_server_error() {
            resp.extensions_mut().insert(Failure {
                code: self.code,
                detail: self.detail.unwrap_or(self.message),
            });
        }
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

/// By the bus error's kind: 503 `unavailable` for a failure of the moment (NATS down or slow, a
/// stream being re-created, a concurrent writer), 500 `internal` for one a retry will not cure.
impl From<mozaiks_bus::Error> for ApiError {
    fn from(e: mozaiks_bus::Error) -> ApiError {
        if e.is_retryable() {
            ApiError::unavailable_from("the event log", e)
        } else {
            ApiError::internal(format!("the event log: {e}"))
        }
    }
}

impl From<mozaiks_store::Error> for ApiError {
    fn from(e: mozaiks_store::Error) -> ApiError {
        ApiError::unavailable_from("the read models", e)
    }
}

impl From<mozaiks_auth::Error> for ApiError {
    fn from(e: mozaiks_auth::Error) -> ApiError {
        match e.kind() {
            mozaiks_auth::ErrorKind::Unauthorized => {
                ApiError::unauthorized(e.code(), e.to_string())
            }
            mozaiks_auth::ErrorKind::Unavailable => {
                ApiError::unavailable_from("the token issuer's keys", e)
            }
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
            E::Unavailable(_) | E::Bus(_) => ApiError::unavailable_from("the app registry", e),
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

/// The error envelope's schema in `/openapi.json` (the body [`ApiError`] answers).
#[derive(schemars::JsonSchema)]
#[schemars(rename = "Error")]
#[allow(dead_code)] // a schema only: the body is written by `IntoResponse for ApiError`
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(schemars::JsonSchema)]
#[allow(dead_code)]
struct ErrorDetail {
    /// Stable, machine-readable.
    code: String,
    /// For humans.
    message: String,
}

// The body and query string document themselves from their types (`/openapi.json`); a refusal's
// status is listed by each route's documentation (`crate::openapi`), not inferred.
impl<T: schemars::JsonSchema> aide::OperationInput for Body<T> {
    fn operation_input(ctx: &mut aide::generate::GenContext, op: &mut aide::openapi::Operation) {
        <axum::Json<T> as aide::OperationInput>::operation_input(ctx, op);
    }
}

impl<T: schemars::JsonSchema> aide::OperationInput for Query<T> {
    fn operation_input(ctx: &mut aide::generate::GenContext, op: &mut aide::openapi::Operation) {
        <axum::extract::Query<T> as aide::OperationInput>::operation_input(ctx, op);
    }
}

impl aide::OperationOutput for ApiError {
    type Inner = ErrorBody;
}

#[cfg(test)]
mod tests {
    use axum::body::to_bytes;

    use super::*;

    async fn body_of(resp: Response) -> serde_json::Value {
        serde_json::from_slice(&to_bytes(resp.into_body(), 1 << 16).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn a_server_errors_body_never_carries_the_internal_text() {
        let secret = "nats://10.0.0.7:4222 timed out";
        let timed_out = std::io::Error::new(std::io::ErrorKind::TimedOut, secret);
        let refused = mozaiks_bus::Error::Malformed {
            op: "batch get".into(),
            what: secret.into(),
        };
        for (e, status, code, message) in [
            (
                ApiError::from(mozaiks_bus::Error::nats("flush", timed_out)),
                503,
                "unavailable",
                "the event log is unavailable; retry",
            ),
            (ApiError::from(refused), 500, "internal", "internal error"),
            (
                ApiError::unavailable(secret),
                503,
                "unavailable",
                "a service this request needs is unavailable; retry",
            ),
            (
                ApiError::internal(secret),
                500,
                "internal",
                "internal error",
            ),
        ] {
            let resp = e.into_response();
            assert_eq!(resp.status().as_u16(), status);
            let failure = resp.extensions().get::<Failure>().cloned().unwrap();
            assert_eq!(failure.code, code);
            assert!(failure.detail.contains(secret), "{failure:?}");
            let body = body_of(resp).await;
            assert_eq!(body["error"]["code"], code, "{body}");
            assert_eq!(body["error"]["message"], message, "{body}");
            assert!(!body.to_string().contains("10.0.0.7"), "{body}");
        }
    }

    #[test]
    fn a_bus_errors_status_follows_its_kind() {
        let conflict = mozaiks_bus::Error::Conflict {
            chat_id: "c".into(),
        };
        assert_eq!(
            ApiError::from(conflict).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let missing = mozaiks_bus::Error::nats(
            "request",
            async_nats::RequestError::new(async_nats::RequestErrorKind::NoResponders),
        );
        assert_eq!(
            ApiError::from(missing).status,
            StatusCode::SERVICE_UNAVAILABLE
        );
        let codec = mozaiks_bus::Error::Codec(mozaiks_events::Error::InvalidId {
            what: "event",
            reason: "not a uuid".into(),
        });
        let e = ApiError::from(codec);
        assert_eq!(
            (e.status, e.code),
            (StatusCode::INTERNAL_SERVER_ERROR, "internal")
        );
    }

    #[tokio::test]
    async fn a_client_error_keeps_its_message_and_carries_nothing_to_log() {
        let resp = ApiError::not_found("chat_not_found", "no such chat").into_response();
        assert!(resp.extensions().get::<Failure>().is_none());
        let body = body_of(resp).await;
        assert_eq!(body["error"]["code"], "chat_not_found");
        assert_eq!(body["error"]["message"], "no such chat");
    }
}
