//! Token verification and minting: user JWTs, runtime tokens, the verifier's fixed algorithms.
//!
//! Two kinds of token, told apart by their audience:
//!
//! - **User tokens** ([`Auth::verify_user`]): HS256 with `JWT_SECRET`, `iss = "mozaiks"`,
//!   `aud = "mozaiks"`, claims `sub` (user id), `app_id`, `roles`, `exp`, optional `nbf`/`iat`.
//!   Role `admin` (or `superadmin`) may manage apps.
//! - **Runtime tokens** ([`Auth::mint_runtime`], [`Auth::verify_runtime`]): minted by the session
//!   broker, `aud = "mozaiks-runtime"`, scoped to one `{app_id, sub, chat_id}` plus `workflow`,
//!   short-lived (15 minutes by default), with `iat` and a unique `jti`.
//!
//! Rules (RFC 8725, OWASP JWT cheat sheet):
//!
//! - The verifier fixes the accepted algorithms (HS256 by default; `JWT_ALGORITHMS` may add or
//!   replace them with RS256/ES256/… for user tokens) and never trusts the token's `alg` header
//!   beyond picking among those: `none`, other HMAC sizes and unconfigured algorithms are refused.
//!   The secret verifies only HS256, JWKS keys only their own family, so a public key can never be
//!   used as an HMAC secret. Keys come only from our configuration: the secret, or the JWKS we
//!   fetch ourselves from `JWT_JWKS_URL`, where the token's `kid` selects a key (cached, refetched
//!   on an unknown `kid` at most every 30 s); `jwk`, `jku`, `x5u` and `x5c` are ignored and `crit`
//!   headers refused.
//! - An HS256 secret shorter than 32 bytes is refused at construction unless `dev_mode` is set.
//! - `exp` is required, `nbf` is checked when present, both with a small leeway (30 s default).
//! - `iss` and `aud` must match exactly (an `aud` array must hold exactly one value), so a user
//!   token is never accepted where a runtime token is expected, and vice versa.
//! - `sub`, `app_id`, `chat_id` and `workflow` must be valid identifiers
//!   ([`mozaiks_events::ids`]).
//!
//! Every verification failure has [`ErrorKind::Unauthorized`] and a stable [`Error::code`].
//! Use [`redact_token`] before logging a URL that may carry `?token=`.

mod auth;
mod claims;
mod error;
mod jwks;
mod redact;
#[cfg(test)]
mod tests;

pub use auth::{Auth, Config, parse_algorithms};
pub use claims::{RuntimeClaims, UserClaims};
pub use error::{Error, ErrorKind};
pub use jsonwebtoken::Algorithm;
pub use redact::redact_token;

/// The issuer of every Mozaiks token.
pub const ISSUER: &str = "mozaiks";
/// The audience of user tokens.
pub const USER_AUDIENCE: &str = "mozaiks";
/// The audience of runtime tokens minted by the session broker.
pub const RUNTIME_AUDIENCE: &str = "mozaiks-runtime";
/// The role that may manage apps.
pub const ROLE_ADMIN: &str = "admin";
/// The role above `admin`.
pub const ROLE_SUPERADMIN: &str = "superadmin";
/// The shortest HS256 secret accepted outside dev mode, in bytes.
pub const MIN_SECRET_LEN: usize = 32;
/// Default clock-skew leeway for `exp` and `nbf`, in seconds.
pub const DEFAULT_LEEWAY_SECS: u64 = 30;
/// Largest accepted leeway, in seconds.
pub const MAX_LEEWAY_SECS: u64 = 300;
/// Default lifetime of runtime tokens, in seconds.
pub const DEFAULT_RUNTIME_TTL_SECS: u64 = 15 * 60;
/// Longest accepted lifetime of runtime tokens, in seconds.
pub const MAX_RUNTIME_TTL_SECS: u64 = 24 * 60 * 60;
/// Longer token strings are refused as malformed before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
