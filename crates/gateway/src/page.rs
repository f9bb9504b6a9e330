//! `GET /chat`: the chat page, built from `clients/page` (React, `@mozaiks/chatui-react`) into
//! `assets/chat/` by `npm run build` in `clients/`, and embedded in the binary, so every gateway
//! replica serves it without files on disk or anything fetched from elsewhere at run time.
//!
//! The page reads the user's token from its fragment (`/chat#token=<user JWT>`, never sent to a
//! server), lists the app's workflows (`GET /api/workflows`), starts or resumes a chat through the
//! broker and streams it over the WebSocket. A test fails when the embedded build is older than
//! the sources in `clients/` (`assets/chat/build-info.json` records their hash).

use axum::Router;
use axum::extract::Path;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::error::ApiError;

const INDEX: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/chat/index.html"
));
const SCRIPT: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/chat/assets/chat.js"
));
const STYLE: &[u8] = include_bytes!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/chat/assets/chat.css"
));
const BUILD_INFO: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/assets/chat/build-info.json"
));

/// The page's files: name under `/chat/assets/`, content type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("chat.js", "text/javascript; charset=utf-8", SCRIPT),
    ("chat.css", "text/css; charset=utf-8", STYLE),
];

/// Scripts, styles and API calls from this origin only; the WebSocket may be another host (an
/// app's own runtime); no framing, no plugins.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                   connect-src 'self' ws: wss:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// The routes of the page; merged into the gateway's router.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/chat", get(index))
        .route("/chat/", get(index))
        .route("/chat/assets/{file}", get(asset))
}

/// The embedded build's source hash: the ETag of every file of the page.
fn etag() -> String {
    let hash = serde_json::from_str::<serde_json::Value>(BUILD_INFO)
        .ok()
        .and_then(|v| {
            v["sources_sha256"]
                .as_str()
                .map(|s| s[..16.min(s.len())].to_string())
        })
        .unwrap_or_default();
    format!("\"chat-{hash}\"")
}

fn serve(headers: &HeaderMap, content_type: &'static str, body: &'static [u8]) -> Response {
    let tag = etag();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == tag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, content_type)], body).into_response()
    };
    let h = resp.headers_mut();
    // The file names are fixed: browsers revalidate (cheap, 304) so a new binary's page is used.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(&tag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    resp
}

pub async fn index(headers: HeaderMap) -> Response {
    serve(&headers, "text/html; charset=utf-8", INDEX)
}

pub async fn asset(Path(file): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => serve(&headers, content_type, body),
        None => ApiError::not_found("not_found", "no such file of the chat page").into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use std::path::{Path as FsPath, PathBuf};

    /// What `clients/scripts/embed.mjs` hashes (keep the two lists equal).
    const SOURCES: &[&str] = &[
        "package-lock.json",
        "tsconfig.base.json",
        "client/package.json",
        "client/tsconfig.json",
        "client/src",
        "chatui-react/package.json",
        "chatui-react/tsconfig.json",
        "chatui-react/src",
        "page/package.json",
        "page/tsconfig.json",
        "page/index.html",
        "page/vite.config.ts",
        "page/src",
    ];

    fn walk(root: &FsPath, rel: &str, out: &mut Vec<String>) {
        let abs = root.join(rel);
        if abs.is_dir() {
            for entry in std::fs::read_dir(&abs).unwrap() {
                let name = entry.unwrap().file_name().into_string().unwrap();
                walk(root, &format!("{rel}/{name}"), out);
            }
        } else if !(rel.ends_with(".test.ts")
            || rel.ends_with(".test.tsx")
            || rel.starts_with("client/src/generated/"))
        {
            out.push(rel.to_string());
        }
    }

    fn sources_hash(clients: &FsPath) -> String {
        let mut files = Vec::new();
        for s in SOURCES {
            walk(clients, s, &mut files);
        }
        files.sort();
        let mut h = Sha256::new();
        for f in &files {
            h.update(f.as_bytes());
            h.update([0]);
            h.update(std::fs::read(clients.join(f)).unwrap());
            h.update([0]);
        }
        h.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn embedded_page_is_built_from_the_current_sources() {
        let clients: PathBuf = [env!("CARGO_MANIFEST_DIR"), "..", "..", "clients"]
            .iter()
            .collect();
        let info: serde_json::Value = serde_json::from_str(BUILD_INFO).unwrap();
        let recorded = info["sources_sha256"].as_str().unwrap();
        assert_eq!(
            recorded,
            sources_hash(&clients),
            "crates/gateway/assets/chat is stale: the sources in clients/ changed since it was built; \
             run `npm ci && npm run build` in clients/ and commit crates/gateway/assets/chat"
        );
    }

    #[tokio::test]
    async fn serves_the_page_and_its_assets_with_types_and_a_strict_policy() {
        let page = index(HeaderMap::new()).await;
        assert_eq!(page.status(), StatusCode::OK);
        assert_eq!(
            page.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        assert!(
            page.headers()[header::CONTENT_SECURITY_POLICY]
                .to_str()
                .unwrap()
                .contains("script-src 'self'")
        );
        let html = std::str::from_utf8(INDEX).unwrap();
        // Every file the page loads is one this module serves, from this origin.
        for (name, _, _) in ASSETS {
            assert!(
                html.contains(&format!("/chat/assets/{name}")),
                "{name} not in index.html"
            );
        }
        assert!(!html.contains("http://") && !html.contains("https://"));

        let js = asset(Path("chat.js".into()), HeaderMap::new()).await;
        assert_eq!(js.status(), StatusCode::OK);
        assert_eq!(
            js.headers()[header::CONTENT_TYPE],
            "text/javascript; charset=utf-8"
        );
        let tag = js.headers()[header::ETAG].clone();
        let mut again = HeaderMap::new();
        again.insert(header::IF_NONE_MATCH, tag);
        let cached = asset(Path("chat.js".into()), again).await;
        assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);

        let missing = asset(Path("../Cargo.toml".into()), HeaderMap::new()).await;
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    }
}
