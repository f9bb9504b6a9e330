//! A gateway in this process, on real servers from the test kit (nats-server and the Mongo-wire
//! server, each test its own), called through its router with `Router::oneshot`: no process, no
//! port, no HTTP client. The process-spawning tests (`tests/e2e`) keep what needs processes:
//! workers, projectors, replicas, restarts, sockets.

#![allow(dead_code)] // each test file uses its own part of the kit

use std::path::Path;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request};
use mozaiks_auth::{Auth, Config};
use mozaiks_gateway::{Gateway, Options, Parts};
use mozaiks_testkit::TestServers;
use serde_json::Value;
use tower::ServiceExt;

pub const SECRET: &str = "in-process-test-secret-that-is-long-enough-0123456789";

/// One gateway, its servers and the app `default` (tier starter, every shipped workflow).
pub struct Gw {
    pub router: Router,
    pub gateway: Gateway,
    _servers: TestServers,
}

/// An answer: status, headers, the JSON body (`Null` when it is not JSON).
pub struct Answer {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Value,
}

impl Answer {
    pub fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }

    /// `(status, body)`.
    pub fn pair(self) -> (u16, Value) {
        (self.status, self.body)
    }
}

impl Gw {
    /// Without plugins (their endpoints answer 503 `plugins_disabled`).
    pub async fn start() -> Gw {
        Gw::start_with(false).await
    }

    /// With the repository's plugins (`plugins/`) when `plugins`.
    pub async fn start_with(plugins: bool) -> Gw {
        let servers = TestServers::start().await.expect("test servers");
        let bus = mozaiks_bus::Bus::connect(&servers.nats_url, &servers.namespace, "gateway-test")
            .await
            .expect("NATS");
        bus.apply(&mozaiks_bus::definitions::Definitions::embedded().unwrap())
            .await
            .expect("stream definitions");
        let registry =
            mozaiks_control::Registry::open_with(&bus, mozaiks_control::Tiers::load(None).unwrap())
                .await
                .expect("registry");
        registry
            .ensure_app("default", "Default app", "starter")
            .await
            .expect("the default app");
        let store = mozaiks_store::Store::connect(&servers.mongo_uri, &servers.mongo_db)
            .await
            .expect("Mongo")
            .with_resolver(mozaiks_admin::storage::resolver(&registry));
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let catalog = mozaiks_packs::Catalog::load_dir(&root.join("workflows")).unwrap();
        let plugins = match plugins {
            true => Some(
                mozaiks_plugins::Plugins::open(&bus, &root.join("plugins"))
                    .await
                    .expect("plugins"),
            ),
            false => None,
        };
        let gateway = Gateway::new(
            Parts {
                bus,
                store,
                auth: auth(),
                registry,
                catalog,
                prometheus: None,
                instance: mozaiks_bus::fleet::InstanceId::new("gateway-test"),
                plugins,
            },
            Options::default(),
        )
        .await
        .expect("gateway");
        Gw {
            router: gateway.router(),
            gateway,
            _servers: servers,
        }
    }

    /// Any request: `bearer` as `Authorization: Bearer`, a JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let body = body.map(|b| ("application/json", b.to_string()));
        self.raw(method, path, bearer, body).await
    }

    /// Any request with a body as given: `(content type, bytes)`.
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        bearer: Option<&str>,
        body: Option<(&str, String)>,
    ) -> Answer {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = bearer {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some((content_type, b)) => req
                .header("content-type", content_type)
                .body(Body::from(b))
                .unwrap(),
            None => req.body(Body::empty()).unwrap(),
        };
        self.send(req).await
    }

    /// A request as built.
    pub async fn send(&self, req: Request<Body>) -> Answer {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
            .await
            .unwrap();
        Answer {
            status,
            headers,
            body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        }
    }

    pub async fn get(&self, path: &str, bearer: &str) -> Answer {
        self.call("GET", path, Some(bearer), None).await
    }

    pub async fn post_session(&self, bearer: &str, body: Value) -> Answer {
        self.call("POST", "/api/sessions", Some(bearer), Some(body))
            .await
    }
}

pub fn auth() -> Auth {
    auth_with(SECRET)
}

pub fn auth_with(secret: &str) -> Auth {
    Auth::new(Config::hs256(secret, false)).unwrap()
}

/// The error code of an answer's body (`""` when none).
pub fn code(v: &Value) -> &str {
    v["error"]["code"].as_str().unwrap_or("")
}

/// The operator: a superadmin.
pub fn root() -> String {
    token("root", "default", &["superadmin"])
}

/// A user token of `app` for an hour.
pub fn token(sub: &str, app: &str, roles: &[&str]) -> String {
    auth().mint_user(sub, app, roles, 3600).unwrap()
}

/// Signs claims with HS256 (to craft expired tokens).
pub fn jwt(claims: &Value, secret: &str) -> String {
    let _ = auth_with(secret); // installs the crypto provider
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}
