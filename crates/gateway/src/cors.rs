//! CORS: which browser origins may call the HTTP API (the WebSocket checks `Origin` itself, in
//! [`crate::ws`]).
//!
//! **Who decides.** An origin is allowed for a request when it is in the fleet-wide list
//! (`MOZAIKS_CORS_ORIGINS`, [`crate::Options::cors_origins`]) or in the `allowed_origins` of the
//! request's app. The app is the one the path names (`/api/apps/{app_id}/…`,
//! `/api/usage/{app_id}`, `/api/agui/{app_id}/…`), else the one the request's token names (the
//! `app_id` claim of `Authorization: Bearer` or `?token=`). The claim is read without checking the
//! signature or the expiry: it only picks whose origins apply, the handler still verifies the
//! token, and a forged or expired token gets nothing but its 401, which the page must be able to
//! read to refresh its token. An app with no `allowed_origins` gets no cross-origin access (same
//! origin only) unless the fleet-wide list has the origin; API keys name no app here, because
//! keys belong on back-ends, never in browsers.
//!
//! **Preflights** (`OPTIONS` with `Access-Control-Request-Method`) carry no token. One on a path
//! that names an app is decided by that app; one on another path (`POST /api/sessions`) is
//! allowed when the fleet-wide list or *some* app lists the origin: it only lets the browser send
//! the request, whose answer is readable only if the token's app allows the origin. An allowed
//! preflight gets 204 with `Access-Control-Allow-Origin` echoing the origin, the methods and
//! headers the API takes and `Access-Control-Max-Age: 600`; a refused one gets 403
//! `origin_not_allowed` in the error envelope and no CORS headers.
//!
//! **Answers.** `Access-Control-Allow-Origin` is the request's origin, only when allowed, never
//! `*`; no `Access-Control-Allow-Credentials` (the API takes tokens in headers or the query, never
//! cookies); every answer has `Vary: Origin` (and the preflight headers), so a cache never hands
//! one origin's answer to another. The decision is [`tower_http::cors`]'s `CorsLayer` with a
//! predicate; this module only works out the app and answers refused preflights.

use axum::extract::{Request, State as St};
use axum::http::header::{self, HeaderName, HeaderValue};
use axum::http::{Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use tower::ServiceExt as _;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tracing::debug;

use crate::State;
use crate::error::ApiError;
use crate::metrics as m;

/// How long a browser may cache a preflight's answer, in seconds.
pub const MAX_AGE_SECS: u64 = 600;

/// Marks a request whose origin is allowed (set by [`guard`], read by the layer's predicate).
#[derive(Clone, Copy, Debug)]
struct Allowed;

/// The middleware: decides the request's origin, refuses a preflight from a refused origin, and
/// hands everything else to the CORS layer. Plain `OPTIONS` (no CORS headers) goes on to the
/// router, which answers 405.
pub async fn guard(St(state): St<State>, mut req: Request, next: Next) -> Response {
    let Some(origin) = req.headers().get(header::ORIGIN).cloned() else {
        return through_layer(req, next).await;
    };
    let preflight = req.method() == Method::OPTIONS
        && req
            .headers()
            .contains_key(header::ACCESS_CONTROL_REQUEST_METHOD);
    if req.method() == Method::OPTIONS && !preflight {
        return next.run(req).await;
    }
    let origin_text = origin.to_str().unwrap_or_default();
    let app = app_of(&req);
    let allowed = is_allowed(&state, origin_text, app.as_deref(), preflight);
    debug!(origin = origin_text, app_id = ?app, preflight, allowed, "CORS decision.");
    if !allowed {
        let kind = if preflight { "preflight" } else { "request" };
        metrics::counter!(m::CORS_REFUSED, "kind" => kind).increment(1);
        if preflight {
            let mut resp = ApiError::new(
                StatusCode::FORBIDDEN,
                "origin_not_allowed",
                format!("the origin {origin_text} may not call this API; list it in the app's allowed_origins"),
            )
            .into_response();
            resp.headers_mut()
                .insert(header::VARY, HeaderValue::from_static(VARY));
            return resp;
        }
    } else {
        req.extensions_mut().insert(Allowed);
    }
    let mut resp = through_layer(req, next).await;
    if preflight && resp.status() == StatusCode::OK {
        *resp.status_mut() = StatusCode::NO_CONTENT;
    }
    resp
}

const VARY: &str = "origin, access-control-request-method, access-control-request-headers";

/// The CORS layer: echoes the origin when [`guard`] allowed it.
fn layer() -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::predicate(|_, parts| {
            parts.extensions.get::<Allowed>().is_some()
        }))
        .allow_methods([
            Method::GET,
            Method::POST,
            Method::PATCH,
            Method::DELETE,
            Method::OPTIONS,
        ])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            HeaderName::from_static("last-event-id"),
            HeaderName::from_static("x-api-key"),
        ])
        .expose_headers([header::RETRY_AFTER, header::WWW_AUTHENTICATE])
        .max_age(std::time::Duration::from_secs(MAX_AGE_SECS))
}

/// The rest of the stack behind the CORS layer.
async fn through_layer(req: Request, next: Next) -> Response {
    match tower::Layer::layer(&layer(), next).oneshot(req).await {
        Ok(resp) => resp,
        Err(never) => match never {},
    }
}

/// Whether `origin` may call for `app` (none: the path and the token name no app).
fn is_allowed(state: &State, origin: &str, app: Option<&str>, preflight: bool) -> bool {
    if state.opts.cors_origins.iter().any(|o| o == origin) {
        return true;
    }
    let listed = |a: &mozaiks_control::App| {
        a.limits
            .allowed_origins
            .as_ref()
            .is_some_and(|list| list.iter().any(|o| o == origin))
    };
    match app {
        Some(app) => state.registry.get(app).is_some_and(|a| listed(&a)),
        None if preflight => state.registry.all().iter().any(|a| listed(a)),
        None => false,
    }
}

/// The app a request belongs to: named by its path, else by its token's `app_id` claim.
fn app_of(req: &Request) -> Option<String> {
    let path = req.uri().path();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let from_path = match segments.as_slice() {
        ["api", "apps", app, ..] | ["api", "usage", app, ..] | ["api", "agui", app, ..] => {
            Some(*app)
        }
        _ => None,
    };
    if let Some(app) = from_path.filter(|a| !a.is_empty()) {
        return Some(app.to_string());
    }
    let bearer = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .filter(|t| !t.is_empty())
    });
    bearer.or(query).and_then(claimed_app)
}

/// The `app_id` claim of a JWT, unverified (see the module's documentation for why that is safe).
fn claimed_app(token: &str) -> Option<String> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    #[derive(serde::Deserialize)]
    struct Claims {
        app_id: String,
    }
    serde_json::from_slice::<Claims>(&bytes)
        .ok()
        .map(|c| c.app_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(uri: &str, auth: Option<&str>) -> Request {
        let mut b = axum::http::Request::builder().uri(uri);
        if let Some(a) = auth {
            b = b.header(header::AUTHORIZATION, a);
        }
        b.body(axum::body::Body::empty()).unwrap()
    }

    fn jwt(claims: &str) -> String {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        format!(
            "{}.{}.sig",
            enc(r#"{"alg":"HS256","typ":"JWT"}"#),
            enc(claims)
        )
    }

    #[test]
    fn the_path_names_the_app_before_the_token() {
        let token = jwt(r#"{"sub":"u","app_id":"beta"}"#);
        let bearer = format!("Bearer {token}");
        let cases = [
            ("/api/apps/acme/keys", Some(bearer.as_str()), Some("acme")),
            ("/api/apps/acme", None, Some("acme")),
            ("/api/usage/acme", Some(bearer.as_str()), Some("acme")),
            ("/api/agui/acme/c1", None, Some("acme")),
            ("/api/sessions", Some(bearer.as_str()), Some("beta")),
            ("/api/sessions", None, None),
            ("/api/apps", Some(bearer.as_str()), Some("beta")),
            ("/api/sessions", Some("Bearer mzk_abc"), None),
            ("/api/sessions", Some("Bearer not-a-jwt"), None),
        ];
        for (uri, auth, want) in cases {
            assert_eq!(app_of(&req(uri, auth)).as_deref(), want, "{uri} {auth:?}");
        }
        let q = format!("/api/sessions/c1/messages?after=0&token={token}");
        assert_eq!(app_of(&req(&q, None)).as_deref(), Some("beta"));
    }

    #[test]
    fn a_token_without_an_app_claim_names_none() {
        assert_eq!(claimed_app(&jwt(r#"{"sub":"u"}"#)), None);
        assert_eq!(claimed_app(&jwt(r#"{"app_id":7}"#)), None);
        assert_eq!(claimed_app("a.%%%.c"), None);
    }
}
