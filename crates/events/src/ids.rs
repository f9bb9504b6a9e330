//! Identifiers: what an `app_id`, `chat_id`, `user_id` or workflow name may contain.
//!
//! Identifiers become NATS subject tokens and Mongo keys, so they are restricted to
//! `[A-Za-z0-9_-]`, 1 to 64 characters (users: up to 128, with `@`, `.`, `:` and `|` also
//! allowed, because identity providers use them; user ids never go into subjects).
//!
//! Ids a client chooses (`client_msg_id`, `request_id`) are freer, because they never become
//! subject tokens, but they do reach NATS headers (`Nats-Msg-Id`) and logs: 1 to
//! [`MAX_CLIENT_ID`] bytes, no control characters (a CR or LF would end a header line).

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

/// Longest id a client may choose (`client_msg_id`, `request_id`), in bytes.
pub const MAX_CLIENT_ID: usize = 128;

/// Checks an id chosen by a client (`client_msg_id`, `request_id`): 1 to [`MAX_CLIENT_ID`]
/// bytes and no control characters (C0, DEL, C1: CR, LF, NUL, ESC, ...).
pub fn check_client_id(what: &'static str, value: &str) -> Result<(), Error> {
    if value.is_empty() || value.len() > MAX_CLIENT_ID {
        return Err(Error::InvalidId {
            what,
            reason: format!("must be 1 to {MAX_CLIENT_ID} bytes"),
        });
    }
    if value.chars().any(char::is_control) {
        return Err(Error::InvalidId {
            what,
            reason: "must not contain control characters (CR, LF, NUL, ...)".into(),
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
    fn client_ids_refuse_control_characters_and_bad_lengths() {
        for good in [
            "m1",
            "a b",
            "msg-é-✓",
            "auth0|x:y@z",
            &"x".repeat(MAX_CLIENT_ID),
        ] {
            assert!(
                check_client_id("client_msg_id", good).is_ok(),
                "{good:?} refused"
            );
        }
        for bad in [
            "",
            "a\nb",
            "a\rb",
            "\r\n",
            "a\0b",
            "tab\there",
            "esc\u{1b}[31m",
            "del\u{7f}",
            "c1\u{85}next-line",
            &"x".repeat(MAX_CLIENT_ID + 1),
            &"é".repeat(MAX_CLIENT_ID / 2 + 1),
        ] {
            let e = check_client_id("client_msg_id", bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    Error::InvalidId {
                        what: "client_msg_id",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn chat_ids_are_valid_tokens() {
        check_token("chat_id", &new_chat_id()).unwrap();
    }
}
