//! Identifiers: what an `app_id`, `chat_id`, `user_id` or workflow name may contain.
//!
//! Identifiers become NATS subject tokens and Mongo keys, so they are restricted to
//! `[A-Za-z0-9_-]`, 1 to 64 characters (users: up to 128, with `@`, `.`, `:` and `|` also
//! allowed, because identity providers use them; user ids never go into subjects).

use crate::Error;

/// Checks an identifier used as a subject token (`app_id`, `chat_id`, workflow name).
pub fn check_token(what: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > 64 {
        return Err(Error::InvalidId {
            what,
            reason: "must be 1 to 64 characters".into(),
        });
    }
    if !value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(Error::InvalidId {
            what,
            reason: "may contain only letters, digits, '_' and '-'".into(),
        });
    }
    Ok(())
}

/// Checks a user id (from a verified token; never placed in a subject).
pub fn check_user(value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > 128 {
        return Err(Error::InvalidId {
            what: "user_id",
            reason: "must be 1 to 128 characters".into(),
        });
    }
    let ok = value
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"_-@.:|".contains(&b));
    if !ok {
        return Err(Error::InvalidId {
            what: "user_id",
            reason: "may contain only letters, digits and '_-@.:|'".into(),
        });
    }
    Ok(())
}

/// A fresh chat id: a UUID v7 in simple (hex) form, so it sorts by creation time.
pub fn new_chat_id() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_restricted() {
        assert!(check_token("app_id", "default").is_ok());
        assert!(check_token("app_id", "a-b_C9").is_ok());
        for bad in ["", "a.b", "a b", "a*", "a>", &"x".repeat(65), "é"] {
            assert!(check_token("app_id", bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn users_allow_identity_provider_shapes() {
        assert!(check_user("auth0|abc").is_ok());
        assert!(check_user("alice@example.com").is_ok());
        assert!(check_user("").is_err());
        assert!(check_user("a b").is_err());
    }

    #[test]
    fn chat_ids_are_valid_tokens() {
        check_token("chat_id", &new_chat_id()).unwrap();
    }
}
