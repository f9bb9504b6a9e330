//! Configuration, key sources, verification and minting.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mozaiks_events::ids;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::claims::{RuntimeClaims, UserClaims};
use crate::error::Error;
use crate::jwks::Jwks;
use crate::{
    DEFAULT_LEEWAY_SECS, DEFAULT_RUNTIME_TTL_SECS, ISSUER, MAX_LEEWAY_SECS, MAX_RUNTIME_TTL_SECS,
    MAX_TOKEN_LEN, MIN_SECRET_LEN, RUNTIME_AUDIENCE, USER_AUDIENCE,
};

/// Configuration of [`Auth`]. Build it with [`Config::hs256`], then adjust fields if needed.
#[derive(Clone)]
pub struct Config {
    /// The shared HS256 secret (`JWT_SECRET`); at least 32 bytes unless `dev_mode`.
    pub secret: Vec<u8>,
    /// Allows a short secret (local development only).
    pub dev_mode: bool,
    /// Clock-skew leeway for `exp` and `nbf`, in seconds (at most 300).
    pub leeway_secs: u64,
    /// Lifetime of minted runtime tokens, in seconds (1 to 86400).
    pub runtime_ttl_secs: u64,
    /// Algorithms accepted on user tokens (`JWT_ALGORITHMS`); HS256 uses the secret, the
    /// public-key ones (RS256, RS384, RS512, PS256, ES256, ES384) keys from `jwks_url`. Runtime
    /// tokens are always HS256 (we mint them).
    pub user_algorithms: Vec<Algorithm>,
    /// The issuer's JWKS URL (`JWT_JWKS_URL`), e.g. Keycloak's
    /// `https://kc.example.com/realms/acme/protocol/openid-connect/certs`.
    pub jwks_url: Option<String>,
    /// `iss` of user tokens signed with JWKS keys (`JWT_JWKS_ISSUER`; default `mozaiks`).
    pub jwks_issuer: String,
    /// A token with an unknown `kid` refetches the JWKS at most this often.
    pub jwks_min_refresh: std::time::Duration,
}

impl Config {
    /// HS256 with `secret`, leeway 30 s, runtime tokens valid 15 minutes.
    pub fn hs256(secret: impl Into<Vec<u8>>, dev_mode: bool) -> Config {
        Config {
            secret: secret.into(),
            dev_mode,
            leeway_secs: DEFAULT_LEEWAY_SECS,
            runtime_ttl_secs: DEFAULT_RUNTIME_TTL_SECS,
            user_algorithms: vec![Algorithm::HS256],
            jwks_url: None,
            jwks_issuer: ISSUER.to_string(),
            jwks_min_refresh: std::time::Duration::from_secs(30),
        }
    }

    /// Also accepts user tokens signed with `algorithms` by keys from the JWKS at `url`
    /// (`algorithms` replaces the accepted list: include `HS256` to keep accepting secret-signed
    /// user tokens).
    pub fn with_jwks(mut self, url: &str, algorithms: &[Algorithm]) -> Config {
        self.jwks_url = Some(url.to_string());
        self.user_algorithms = algorithms.to_vec();
        self
    }
}

/// Parses `JWT_ALGORITHMS` (`RS256,ES256`); refuses `none`, unknown names and duplicates.
pub fn parse_algorithms(list: &str) -> Result<Vec<Algorithm>, Error> {
    let mut out = Vec::new();
    for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
        let alg = match name {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "RS384" => Algorithm::RS384,
            "RS512" => Algorithm::RS512,
            "PS256" => Algorithm::PS256,
            "ES256" => Algorithm::ES256,
            "ES384" => Algorithm::ES384,
            other => {
                return Err(Error::Config(format!(
                    "JWT_ALGORITHMS: {other:?} is not accepted (HS256, RS256, RS384, RS512, PS256, ES256, ES384)"
                )));
            }
        };
        if out.contains(&alg) {
            return Err(Error::Config(format!("JWT_ALGORITHMS: {name} twice")));
        }
        out.push(alg);
    }
    if out.is_empty() {
        return Err(Error::Config("JWT_ALGORITHMS is empty".into()));
    }
    Ok(out)
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("secret", &"[redacted]")
            .field("dev_mode", &self.dev_mode)
            .field("leeway_secs", &self.leeway_secs)
            .field("runtime_ttl_secs", &self.runtime_ttl_secs)
            .field("user_algorithms", &self.user_algorithms)
            .field("jwks_url", &self.jwks_url)
            .field("jwks_issuer", &self.jwks_issuer)
            .finish()
    }
}

/// Where verification keys come from. The verifier's configuration decides both the accepted
/// algorithms and the key; the token's header (`alg`, `jwk`, `jku`, `x5u`, `x5c`) never does: a
/// JWKS source only looks the token's `kid` up among keys we fetched ourselves from the
/// configured URL.
enum KeySource {
    /// One shared secret, HS256 only.
    Hs256(Arc<DecodingKey>),
    /// Public keys from the issuer's JWKS, by `kid`.
    Jwks(Arc<Jwks>),
}

impl KeySource {
    fn algorithms(&self) -> &[Algorithm] {
        match self {
            KeySource::Hs256(_) => &[Algorithm::HS256],
            KeySource::Jwks(j) => j.algorithms(),
        }
    }

    /// The key to check this token with.
    fn key_for(&self, header: &Header) -> Result<Arc<DecodingKey>, Error> {
        match self {
            KeySource::Hs256(key) => Ok(key.clone()),
            KeySource::Jwks(j) => {
                let kid = header
                    .kid
                    .as_deref()
                    .ok_or_else(|| Error::Malformed("token has no `kid`".into()))?;
                j.key(kid, header.alg).ok_or(Error::UnknownKey)
            }
        }
    }
}

/// Verifies one kind of token: a key source, an exact audience, the fixed issuer.
struct Verifier {
    keys: KeySource,
    audience: &'static str,
    issuer: String,
    validation: Validation,
}

impl Verifier {
    fn new(keys: KeySource, audience: &'static str, leeway_secs: u64) -> Verifier {
        Verifier::with_issuer(keys, audience, ISSUER, leeway_secs)
    }

    fn with_issuer(
        keys: KeySource,
        audience: &'static str,
        issuer: &str,
        leeway_secs: u64,
    ) -> Verifier {
        let algorithms = keys.algorithms();
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms.to_vec();
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.validate_aud = true;
        validation.set_audience(&[audience]);
        validation.set_issuer(&[issuer]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        Verifier {
            keys,
            audience,
            issuer: issuer.to_string(),
            validation,
        }
    }

    /// Checks the header ourselves, verifies signature and registered claims, then
    /// deserializes the claims into `T`.
    fn verify<T: DeserializeOwned>(&self, token: &str) -> Result<T, Error> {
        let header = check_header(token, self.keys.algorithms())?;
        let key = self.keys.key_for(&header)?;
        // `jsonwebtoken` wants every listed algorithm in the key's family: narrow a JWKS
        // verifier's list to the token's (already checked to be allowed) algorithm.
        let narrowed;
        let validation = match &self.keys {
            KeySource::Hs256(_) => &self.validation,
            KeySource::Jwks(_) => {
                let mut v = self.validation.clone();
                v.algorithms = vec![header.alg];
                narrowed = v;
                &narrowed
            }
        };
        let data =
            jsonwebtoken::decode::<Value>(token, &key, validation).map_err(Error::from_verify)?;
        if !data.claims.is_object() {
            return Err(Error::Malformed("payload is not a JSON object".into()));
        }
        serde_json::from_value(data.claims).map_err(|e| Error::InvalidClaims(e.to_string()))
    }

    /// Defence in depth on top of `jsonwebtoken`'s own checks.
    fn check_registered(&self, iss: &str, aud: &str) -> Result<(), Error> {
        if iss != self.issuer {
            return Err(Error::WrongIssuer);
        }
        if aud != self.audience {
            return Err(Error::WrongAudience);
        }
        Ok(())
    }
}

/// Refuses what the verifier must not even try: a missing, oversized or non-JWS token, an
/// algorithm outside `allowed` (including `none`), a `crit` header.
fn check_header(token: &str, allowed: &[Algorithm]) -> Result<Header, Error> {
    if token.trim().is_empty() {
        return Err(Error::Missing);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(Error::Malformed("token is too long".into()));
    }
    let mut segments = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return Err(Error::Malformed(
            "expected three dot-separated segments".into(),
        ));
    };
    if !is_base64url(payload) || !is_base64url(signature) {
        return Err(Error::Malformed(
            "payload or signature is not base64url".into(),
        ));
    }
    // Unpadded base64url (RFC 7515 §2): padding, the standard alphabet and non-canonical
    // trailing bits are refused.
    let raw = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Error::Malformed("header is not base64url".into()))?;
    let fields: serde_json::Map<String, Value> = serde_json::from_slice(&raw)
        .map_err(|_| Error::Malformed("header is not a JSON object".into()))?;
    let alg = fields
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::Malformed("header has no `alg`".into()))?;
    match alg.parse::<Algorithm>() {
        Ok(alg) if allowed.contains(&alg) => {}
        _ => return Err(Error::WrongAlgorithm),
    }
    if fields.contains_key("crit") {
        return Err(Error::Malformed(
            "`crit` header parameters are not supported".into(),
        ));
    }
    jsonwebtoken::decode_header(token).map_err(|e| Error::Malformed(format!("header: {e}")))
}

/// Whether `segment` uses only the unpadded base64url alphabet (checked before verification;
/// the verifier decodes it).
fn is_base64url(segment: &str) -> bool {
    segment
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
}

/// Verifies user and runtime tokens and mints them. Cheap to clone.
#[derive(Clone)]
pub struct Auth {
    inner: Arc<Inner>,
}

struct Inner {
    /// User tokens signed with the secret (`None` when HS256 is not among the user algorithms).
    user: Option<Verifier>,
    /// User tokens signed with the issuer's keys (when a JWKS is configured).
    user_jwks: Option<Verifier>,
    /// Every algorithm accepted on user tokens.
    user_algorithms: Vec<Algorithm>,
    runtime: Verifier,
    signing_key: EncodingKey,
    dev_mode: bool,
    leeway_secs: u64,
    runtime_ttl_secs: u64,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("algorithms", &self.inner.user_algorithms)
            .field("dev_mode", &self.inner.dev_mode)
            .field("leeway_secs", &self.inner.leeway_secs)
            .field("runtime_ttl_secs", &self.inner.runtime_ttl_secs)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Checks the configuration and builds the verifier.
    ///
    /// Errors: [`Error::Config`] for an empty secret or out-of-range leeway/TTL,
    /// [`Error::WeakSecret`] for a secret under 32 bytes without `dev_mode`.
    pub fn new(cfg: Config) -> Result<Auth, Error> {
        if cfg.secret.is_empty() {
            return Err(Error::Config("JWT secret is empty".into()));
        }
        if cfg.secret.len() < MIN_SECRET_LEN && !cfg.dev_mode {
            return Err(Error::WeakSecret);
        }
        if cfg.leeway_secs > MAX_LEEWAY_SECS {
            return Err(Error::Config(format!(
                "leeway of {} s exceeds {MAX_LEEWAY_SECS} s",
                cfg.leeway_secs
            )));
        }
        if cfg.runtime_ttl_secs == 0 || cfg.runtime_ttl_secs > MAX_RUNTIME_TTL_SECS {
            return Err(Error::Config(format!(
                "runtime token TTL must be 1 to {MAX_RUNTIME_TTL_SECS} s, got {}",
                cfg.runtime_ttl_secs
            )));
        }
        // jsonwebtoken 10+ needs a process-wide crypto backend. With only `rust_crypto` enabled
        // it picks that one itself; installing it explicitly also covers builds where feature
        // unification enables a second backend. Failing means one is already set: fine.
        let _ = jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER.install_default();

        let secret = Arc::new(DecodingKey::from_secret(&cfg.secret));
        if cfg.user_algorithms.is_empty() {
            return Err(Error::Config(
                "no algorithm accepted for user tokens".into(),
            ));
        }
        let public: Vec<Algorithm> = cfg
            .user_algorithms
            .iter()
            .copied()
            .filter(|a| *a != Algorithm::HS256)
            .collect();
        let user_jwks = match (&cfg.jwks_url, public.is_empty()) {
            (Some(url), false) => Some(Verifier::with_issuer(
                KeySource::Jwks(Arc::new(Jwks::new(url, public, cfg.jwks_min_refresh)?)),
                USER_AUDIENCE,
                &cfg.jwks_issuer,
                cfg.leeway_secs,
            )),
            (Some(_), true) => {
                return Err(Error::Config(
                    "JWT_JWKS_URL is set but JWT_ALGORITHMS names no public-key algorithm (RS256, ES256, …)".into(),
                ));
            }
            (None, false) => {
                return Err(Error::Config(format!(
                    "JWT_ALGORITHMS names {public:?}, which need keys from JWT_JWKS_URL"
                )));
            }
            (None, true) => None,
        };
        let user = cfg.user_algorithms.contains(&Algorithm::HS256).then(|| {
            Verifier::new(
                KeySource::Hs256(secret.clone()),
                USER_AUDIENCE,
                cfg.leeway_secs,
            )
        });
        let runtime = Verifier::new(KeySource::Hs256(secret), RUNTIME_AUDIENCE, cfg.leeway_secs);
        Ok(Auth {
            inner: Arc::new(Inner {
                user,
                user_jwks,
                user_algorithms: cfg.user_algorithms.clone(),
                runtime,
                signing_key: EncodingKey::from_secret(&cfg.secret),
                dev_mode: cfg.dev_mode,
                leeway_secs: cfg.leeway_secs,
                runtime_ttl_secs: cfg.runtime_ttl_secs,
            }),
        })
    }

    /// Whether dev mode (short secrets allowed) is on.
    pub fn is_dev_mode(&self) -> bool {
        self.inner.dev_mode
    }

    /// Lifetime of minted runtime tokens, in seconds.
    pub fn runtime_ttl_secs(&self) -> u64 {
        self.inner.runtime_ttl_secs
    }

    /// Verifies a user token (`aud = "mozaiks"`) and validates `sub` and `app_id`, with the keys
    /// at hand: a token signed by a JWKS key this process has not fetched yet gives
    /// [`Error::UnknownKey`] (see [`Auth::verify_user_fetching`]).
    pub fn verify_user(&self, token: &str) -> Result<UserClaims, Error> {
        let header = check_header(token, &self.inner.user_algorithms)?;
        let verifier = if header.alg == Algorithm::HS256 {
            self.inner.user.as_ref()
        } else {
            self.inner.user_jwks.as_ref()
        }
        .ok_or(Error::WrongAlgorithm)?;
        let claims: UserClaims = verifier.verify(token)?;
        verifier.check_registered(&claims.iss, &claims.aud)?;
        ids::check_user(&claims.sub)?;
        ids::check_token("app_id", &claims.app_id)?;
        Ok(claims)
    }

    /// Like [`Auth::verify_user`], and when the token names a `kid` not in the cached JWKS,
    /// fetches the set again (key rotation; at most once per `jwks_min_refresh`) and retries once.
    pub async fn verify_user_fetching(&self, token: &str) -> Result<UserClaims, Error> {
        match self.verify_user(token) {
            Err(Error::UnknownKey) => {
                if let Some(KeySource::Jwks(j)) = self.inner.user_jwks.as_ref().map(|v| &v.keys)
                    && j.refresh().await?
                {
                    return self.verify_user(token);
                }
                Err(Error::UnknownKey)
            }
            other => other,
        }
    }

    /// Verifies a runtime token (`aud = "mozaiks-runtime"`) and validates its identifiers.
    pub fn verify_runtime(&self, token: &str) -> Result<RuntimeClaims, Error> {
        let verifier = &self.inner.runtime;
        let claims: RuntimeClaims = verifier.verify(token)?;
        verifier.check_registered(&claims.iss, &claims.aud)?;
        ids::check_user(&claims.sub)?;
        ids::check_token("app_id", &claims.app_id)?;
        ids::check_token("chat_id", &claims.chat_id)?;
        ids::check_token("workflow", &claims.workflow)?;
        if claims.jti.is_empty() || claims.jti.len() > 64 {
            return Err(Error::InvalidClaims(
                "`jti` must be 1 to 64 characters".into(),
            ));
        }
        Ok(claims)
    }

    /// Mints a runtime token for one chat, valid for the configured TTL. Returns the token and
    /// its expiry. Identifiers are validated; an invalid one gives [`Error::Mint`], so callers
    /// should validate request input first.
    pub fn mint_runtime(
        &self,
        app_id: &str,
        user_id: &str,
        chat_id: &str,
        workflow: &str,
    ) -> Result<(String, DateTime<Utc>), Error> {
        mint_input(ids::check_token("app_id", app_id))?;
        mint_input(ids::check_user(user_id))?;
        mint_input(ids::check_token("chat_id", chat_id))?;
        mint_input(ids::check_token("workflow", workflow))?;

        let iat = Utc::now().timestamp();
        let exp = expiry(iat, self.inner.runtime_ttl_secs)?;
        let expires_at = DateTime::from_timestamp(exp, 0)
            .ok_or_else(|| Error::Mint("expiry out of range".into()))?;
        let claims = RuntimeClaims {
            sub: user_id.to_owned(),
            app_id: app_id.to_owned(),
            chat_id: chat_id.to_owned(),
            workflow: workflow.to_owned(),
            exp,
            iat,
            jti: uuid::Uuid::new_v4().to_string(),
            iss: ISSUER.to_owned(),
            aud: RUNTIME_AUDIENCE.to_owned(),
        };
        Ok((self.sign(&claims)?, expires_at))
    }

    /// Mints a user token (for dev tooling such as `mozaiks token`, and tests).
    pub fn mint_user(
        &self,
        user_id: &str,
        app_id: &str,
        roles: &[&str],
        ttl_secs: u64,
    ) -> Result<String, Error> {
        mint_input(ids::check_user(user_id))?;
        mint_input(ids::check_token("app_id", app_id))?;
        if ttl_secs == 0 {
            return Err(Error::Mint("TTL must be at least 1 s".into()));
        }
        let iat = Utc::now().timestamp();
        let claims = UserClaims {
            sub: user_id.to_owned(),
            app_id: app_id.to_owned(),
            roles: roles.iter().map(|r| (*r).to_owned()).collect(),
            exp: expiry(iat, ttl_secs)?,
            iat: Some(iat),
            nbf: None,
            iss: ISSUER.to_owned(),
            aud: USER_AUDIENCE.to_owned(),
        };
        self.sign(&claims)
    }

    fn sign<T: Serialize>(&self, claims: &T) -> Result<String, Error> {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            claims,
            &self.inner.signing_key,
        )
        .map_err(|e| Error::Mint(e.to_string()))
    }
}

fn mint_input(checked: Result<(), mozaiks_events::Error>) -> Result<(), Error> {
    checked.map_err(|e| Error::Mint(e.to_string()))
}

fn expiry(iat: i64, ttl_secs: u64) -> Result<i64, Error> {
    i64::try_from(ttl_secs)
        .ok()
        .and_then(|ttl| iat.checked_add(ttl))
        .ok_or_else(|| Error::Mint("TTL too large".into()))
}
