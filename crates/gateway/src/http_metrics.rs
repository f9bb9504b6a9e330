//! `mozaiks_http_requests_total{method, route, status}`: every HTTP answer of a gateway, counted
//! by a middleware on the router. The labels are bounded: the method (the standard ones, else
//! `other`), the route *template* that matched (`/api/sessions/{chat_id}`, never the concrete
//! path; `unmatched` for paths no route takes) and the status class (`2xx` … `5xx`).

use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::metrics::HTTP_REQUESTS;

/// Counts the answer to `req`.
pub async fn count(req: Request, next: Next) -> Response {
    let method = method_label(req.method());
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let resp = next.run(req).await;
    let status = status_class(resp.status().as_u16());
    metrics::counter!(HTTP_REQUESTS, "method" => method, "route" => route, "status" => status)
        .increment(1);
    resp
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::Router;
    use axum::body::Body;
    use axum::routing::get;
    use metrics_exporter_prometheus::PrometheusBuilder;
    use tower::ServiceExt;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(method_label(&Method::from_bytes(b"BREW").unwrap()), "other");
        assert_eq!(method_label(&Method::PATCH), "PATCH");
        assert_eq!(
            [101, 204, 308, 404, 503, 999].map(status_class),
            ["1xx", "2xx", "3xx", "4xx", "5xx", "5xx"]
        );
    }

    #[tokio::test]
    async fn the_route_template_is_the_label_never_the_path() {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        let app = Router::new()
            .route("/api/sessions/{chat_id}", get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(count));
        let _guard = metrics::set_default_local_recorder(&recorder);
        for path in ["/api/sessions/c-1", "/api/sessions/c-2", "/no/such/path"] {
            let req = Request::builder().uri(path).body(Body::empty()).unwrap();
            app.clone().oneshot(req).await.unwrap();
        }
        let text = handle.render();
        assert!(
            text.contains(
                r#"mozaiks_http_requests_total{method="GET",route="/api/sessions/{chat_id}",status="2xx"} 2"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"mozaiks_http_requests_total{method="GET",route="unmatched",status="4xx"} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("c-1"), "{text}");
    }
}
