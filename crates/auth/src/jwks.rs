//! Public keys from an issuer's JWKS URL (Keycloak: `…/realms/{realm}/protocol/openid-connect/certs`).
//!
//! The set is fetched by us from the configured URL (never from a URL named in a token), cached by
//! `kid`, and fetched again when a token names a `kid` the cache lacks (key rotation), at most once
//! per [`Jwks::min_refresh`] so that tokens with made-up `kid`s cannot make us hammer the issuer.
//! A refresh replaces the whole set: keys the issuer dropped stop verifying. Only keys whose type
//! fits one of the configured algorithms are kept, and a key that names its `alg` is used for that
//! algorithm only.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey};

use crate::error::Error;

/// Largest JWKS document accepted, in bytes.
const MAX_JWKS_BYTES: usize = 256 * 1024;

/// One cached key: the key, and the one algorithm it is restricted to (if the JWK said so).
struct Cached {
    key: Arc<DecodingKey>,
    alg: Option<Algorithm>,
    family: Family,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    Rsa,
    Ec,
}

fn family_of(alg: Algorithm) -> Option<Family> {
    match alg {
        Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 => Some(Family::Rsa),
        Algorithm::PS256 | Algorithm::PS384 | Algorithm::PS512 => Some(Family::Rsa),
        Algorithm::ES256 | Algorithm::ES384 => Some(Family::Ec),
        _ => None,
    }
}

/// A JWKS key source.
pub(crate) struct Jwks {
    url: String,
    algorithms: Vec<Algorithm>,
    min_refresh: Duration,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, Cached>>,
    /// When the set was last fetched (successfully or not); serializes fetches.
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
}

impl Jwks {
    pub(crate) fn new(
        url: &str,
        algorithms: Vec<Algorithm>,
        min_refresh: Duration,
    ) -> Result<Jwks, Error> {
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(Error::Config(format!(
                "JWT_JWKS_URL must be an http(s) URL, got {url:?}"
            )));
        }
        if let Some(a) = algorithms.iter().find(|a| family_of(**a).is_none()) {
            return Err(Error::Config(format!(
                "{a:?} is not a public-key algorithm; a JWKS serves RS* and ES* keys"
            )));
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| Error::Config(format!("JWKS client: {e}")))?;
        Ok(Jwks {
            url: url.to_string(),
            algorithms,
            min_refresh,
            http,
            keys: RwLock::default(),
            last_fetch: tokio::sync::Mutex::new(None),
        })
    }

    pub(crate) fn algorithms(&self) -> &[Algorithm] {
        &self.algorithms
    }

    /// The cached key `kid` for `alg`, if there is one that fits.
    pub(crate) fn key(&self, kid: &str, alg: Algorithm) -> Option<Arc<DecodingKey>> {
        let keys = self.keys.read().unwrap_or_else(PoisonError::into_inner);
        let c = keys.get(kid)?;
        let fits = family_of(alg) == Some(c.family) && c.alg.is_none_or(|a| a == alg);
        fits.then(|| c.key.clone())
    }

    /// Fetches the set again unless it was fetched less than `min_refresh` ago. Returns whether
    /// it fetched.
    pub(crate) async fn refresh(&self) -> Result<bool, Error> {
        let mut last = self.last_fetch.lock().await;
        if last.is_some_and(|t| t.elapsed() < self.min_refresh) {
            return Ok(false);
        }
        *last = Some(Instant::now());
        let set = self.fetch().await?;
        let mut fresh = HashMap::new();
        for jwk in &set.keys {
            let Some(kid) = jwk.common.key_id.clone() else {
                continue;
            };
            let family = match &jwk.algorithm {
                AlgorithmParameters::RSA(_) => Family::Rsa,
                AlgorithmParameters::EllipticCurve(_) => Family::Ec,
                _ => continue,
            };
            let alg = jwk
                .common
                .key_algorithm
                .and_then(|a| a.to_string().parse::<Algorithm>().ok());
            let usable = match alg {
                Some(a) => self.algorithms.contains(&a),
                None => self
                    .algorithms
                    .iter()
                    .any(|a| family_of(*a) == Some(family)),
            };
            if !usable {
                continue;
            }
            let Ok(key) = DecodingKey::from_jwk(jwk) else {
                continue;
            };
            fresh.insert(
                kid,
                Cached {
                    key: Arc::new(key),
                    alg,
                    family,
                },
            );
        }
        tracing::info!(url = %self.url, keys = fresh.len(), "JWKS fetched.");
        *self.keys.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(true)
    }

    async fn fetch(&self) -> Result<JwkSet, Error> {
        let unavailable = |e: String| Error::KeysUnavailable(format!("{}: {e}", self.url));
        let resp = self
            .http
            .get(&self.url)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("HTTP {}", resp.status())));
        }
        let body = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        if body.len() > MAX_JWKS_BYTES {
            return Err(unavailable("document too large".into()));
        }
        serde_json::from_slice(&body).map_err(|e| unavailable(format!("not a JWKS: {e}")))
    }
}
