//! Claims of user tokens and runtime tokens.

use serde::{Deserialize, Serialize};

use crate::{ROLE_ADMIN, ROLE_SUPERADMIN};

/// Claims of a user token (`aud = "mozaiks"`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UserClaims {
    /// The user id.
    pub sub: String,
    /// The app the user acts in.
    pub app_id: String,
    /// Roles, e.g. `admin`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issuer, always `"mozaiks"` once verified.
    pub iss: String,
    /// Audience; a JSON string or a one-element array in the token.
    #[serde(deserialize_with = "single_audience")]
    pub aud: String,
}

impl UserClaims {
    /// The user id (`sub`).
    pub fn user_id(&self) -> &str {
        &self.sub
    }

    /// Whether the user may manage apps (role `admin` or `superadmin`).
    pub fn is_admin(&self) -> bool {
        self.has_role(ROLE_ADMIN) || self.is_superadmin()
    }

    /// Whether the user has role `superadmin`.
    pub fn is_superadmin(&self) -> bool {
        self.has_role(ROLE_SUPERADMIN)
    }

    /// Whether the user has exactly this role.
    pub fn has_role(&self, role: &str) -> bool {
        self.roles.iter().any(|r| r == role)
    }
}

/// Claims of a runtime token (`aud = "mozaiks-runtime"`), scoped to one chat.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RuntimeClaims {
    /// The user id.
    pub sub: String,
    /// The app of the chat.
    pub app_id: String,
    /// The chat this token opens.
    pub chat_id: String,
    /// The workflow of the chat.
    pub workflow: String,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Issued at, seconds since the epoch.
    pub iat: i64,
    /// Unique token id.
    pub jti: String,
    /// Issuer, always `"mozaiks"` once verified.
    pub iss: String,
    /// Audience, always `"mozaiks-runtime"` once verified.
    #[serde(deserialize_with = "single_audience")]
    pub aud: String,
}

impl RuntimeClaims {
    /// The user id (`sub`).
    pub fn user_id(&self) -> &str {
        &self.sub
    }
}

/// Accepts `"aud"` as a string or as an array holding exactly one string. Several audiences are
/// refused: a token meant for both user and runtime use would defeat audience separation.
fn single_audience<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Audience {
        One(String),
        Many(Vec<String>),
    }
    match Audience::deserialize(d)? {
        Audience::One(aud) => Ok(aud),
        Audience::Many(mut auds) if auds.len() == 1 => Ok(auds.remove(0)),
        Audience::Many(_) => Err(serde::de::Error::custom(
            "`aud` must hold exactly one audience",
        )),
    }
}
