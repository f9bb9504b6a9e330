//! Errors and their classification.

/// Errors of this crate. Verification failures never carry the token itself.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No token was provided.
    #[error("no token provided")]
    Missing,
    /// The token is not a well-formed compact JWS.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The signature does not match our key.
    #[error("token signature is invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("token has expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token is not valid yet")]
    NotYetValid,
    /// `aud` is not the audience expected here.
    #[error("token was issued for another audience")]
    WrongAudience,
    /// `iss` is not the expected issuer.
    #[error("token was issued by an unexpected issuer")]
    WrongIssuer,
    /// The header's `alg` is not one the verifier accepts.
    #[error("token algorithm is not accepted")]
    WrongAlgorithm,
    /// A claim is missing or invalid.
    #[error("invalid token claims: {0}")]
    InvalidClaims(String),
    /// The HS256 secret is too short (allowed only in dev mode).
    #[error(
        "JWT secret is shorter than {} bytes (allowed only in dev mode)",
        crate::MIN_SECRET_LEN
    )]
    WeakSecret,
    /// The configuration is unusable.
    #[error("auth configuration: {0}")]
    Config(String),
    /// A token could not be minted.
    #[error("could not mint token: {0}")]
    Mint(String),
    /// The token names a `kid` that is not in the issuer's key set (after a refresh).
    #[error("token signing key is unknown")]
    UnknownKey,
    /// The issuer's key set could not be fetched.
    #[error("signing keys unavailable: {0}")]
    KeysUnavailable(String),
}

/// Coarse classification of an [`Error`], e.g. to choose an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// The token was refused (HTTP 401).
    Unauthorized,
    /// The configuration is unusable (fail at startup).
    Config,
    /// Something failed on our side (HTTP 500).
    Internal,
    /// A dependency (the issuer's JWKS) could not be reached (HTTP 503).
    Unavailable,
}

impl Error {
    /// The coarse classification of this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Missing
            | Error::Malformed(_)
            | Error::BadSignature
            | Error::Expired
            | Error::NotYetValid
            | Error::WrongAudience
            | Error::WrongIssuer
            | Error::WrongAlgorithm
            | Error::InvalidClaims(_)
            | Error::UnknownKey => ErrorKind::Unauthorized,
            Error::KeysUnavailable(_) => ErrorKind::Unavailable,
            Error::WeakSecret | Error::Config(_) => ErrorKind::Config,
            Error::Mint(_) => ErrorKind::Internal,
        }
    }

    /// A stable snake_case code, safe to return to clients.
    pub fn code(&self) -> &'static str {
        match self {
            Error::Missing => "token_missing",
            Error::Malformed(_) => "token_malformed",
            Error::BadSignature => "token_bad_signature",
            Error::Expired => "token_expired",
            Error::NotYetValid => "token_not_yet_valid",
            Error::WrongAudience => "token_wrong_audience",
            Error::WrongIssuer => "token_wrong_issuer",
            Error::WrongAlgorithm => "token_wrong_algorithm",
            Error::InvalidClaims(_) => "token_invalid_claims",
            Error::WeakSecret => "auth_weak_secret",
            Error::Config(_) => "auth_config",
            Error::Mint(_) => "token_mint_failed",
            Error::UnknownKey => "token_unknown_key",
            Error::KeysUnavailable(_) => "auth_keys_unavailable",
        }
    }

    /// Maps a `jsonwebtoken` error raised while verifying a token whose header we already
    /// checked (so JSON errors come from the payload's shape).
    pub(crate) fn from_verify(err: jsonwebtoken::errors::Error) -> Error {
        use jsonwebtoken::errors::ErrorKind as K;
        match err.kind() {
            K::InvalidSignature => Error::BadSignature,
            K::ExpiredSignature => Error::Expired,
            K::ImmatureSignature => Error::NotYetValid,
            K::InvalidAudience => Error::WrongAudience,
            K::InvalidIssuer => Error::WrongIssuer,
            K::InvalidAlgorithm
            | K::MissingAlgorithm
            | K::UnsupportedAlgorithm
            | K::InvalidAlgorithmName => Error::WrongAlgorithm,
            K::MissingRequiredClaim(claim) => {
                Error::InvalidClaims(format!("missing claim `{claim}`"))
            }
            K::InvalidClaimFormat(claim) => {
                Error::InvalidClaims(format!("claim `{claim}` has an invalid format"))
            }
            K::InvalidSubject => Error::InvalidClaims("unexpected subject".into()),
            K::InvalidEcdsaKey | K::InvalidEddsaKey | K::InvalidRsaKey(_) | K::InvalidKeyFormat => {
                Error::Config(format!("verification key: {err}"))
            }
            _ => Error::Malformed(err.to_string()),
        }
    }
}

impl From<mozaiks_events::Error> for Error {
    fn from(err: mozaiks_events::Error) -> Error {
        Error::InvalidClaims(err.to_string())
    }
}
