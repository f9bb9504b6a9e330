//! Redaction of tokens in URLs before logging.

/// Query parameters whose values are redacted (compared ASCII case-insensitively, after
/// decoding the name).
const SECRET_PARAMS: [&str; 2] = ["token", "access_token"];

/// Removes the value of a `token` (or `access_token`) query parameter from a URL or query
/// string, for logging: `"a=1&token=xyz&b=2"` becomes `"a=1&token=REDACTED&b=2"`.
///
/// A parameter's name is compared the way the server reads it: `application/x-www-form-urlencoded`
/// decoded (percent-escapes and `+`, by the same `form_urlencoded` parser behind axum's `Query`),
/// so `%74oken=…` or `t%6Fken=…`, which the WebSocket route accepts as `token`, are redacted too.
/// Names are compared ASCII case-insensitively, which redacts a little more than the server
/// accepts (`TOKEN`), never less.
///
/// Accepts a bare query string or anything with a `?` (path, path and query, full URL); the part
/// after the first `?` and the fragment after a `#` (where OAuth-style clients put
/// `access_token`) are rewritten, everything else is kept. Every occurrence is redacted.
pub fn redact_token(uri_or_query: &str) -> String {
    let (prefix, rest) = match uri_or_query.find('?') {
        Some(i) => uri_or_query.split_at(i + 1),
        None => ("", uri_or_query),
    };
    let (query, fragment) = match rest.find('#') {
        Some(i) => (&rest[..i], Some(&rest[i + 1..])),
        None => (rest, None),
    };

    let mut out = String::with_capacity(uri_or_query.len());
    out.push_str(prefix);
    redact_pairs(query, &mut out);
    if let Some(fragment) = fragment {
        out.push('#');
        redact_pairs(fragment, &mut out);
    }
    out
}

/// Appends `pairs` (`k=v&k=v`) to `out`, with the values of secret parameters replaced.
fn redact_pairs(pairs: &str, out: &mut String) {
    for (i, pair) in pairs.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if is_secret(key) => {
                out.push_str(key);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
}

/// Whether a raw (still encoded) parameter name decodes to a secret parameter's name.
fn is_secret(raw_name: &str) -> bool {
    // `raw_name` holds no `&` or `=`, so it parses as exactly one name with an empty value.
    form_urlencoded::parse(raw_name.as_bytes())
        .next()
        .is_some_and(|(name, _)| SECRET_PARAMS.iter().any(|p| name.eq_ignore_ascii_case(p)))
}

#[cfg(test)]
mod tests {
    use super::redact_token;

    #[test]
    fn percent_encoded_names_are_redacted_like_the_server_reads_them() {
        for (uri, want) in [
            ("/ws?%74oken=SECRET", "/ws?%74oken=REDACTED"),
            ("/ws?t%6Fken=SECRET&after=0", "/ws?t%6Fken=REDACTED&after=0"),
            ("/ws?t%6fken=SECRET", "/ws?t%6fken=REDACTED"),
            ("/ws?%74%6F%6B%65%6E=SECRET", "/ws?%74%6F%6B%65%6E=REDACTED"),
            ("/ws?access%5Ftoken=SECRET", "/ws?access%5Ftoken=REDACTED"),
            ("/ws?TOKEN=SECRET", "/ws?TOKEN=REDACTED"),
            ("/ws?%54OKEN=SECRET", "/ws?%54OKEN=REDACTED"),
            (
                "/ws?token=A&%74oken=B&after=3",
                "/ws?token=REDACTED&%74oken=REDACTED&after=3",
            ),
            ("/ws?a=1&t%6Fken=x=y", "/ws?a=1&t%6Fken=REDACTED"),
            // Fragments never reach a server, but a logged URL may carry one.
            (
                "https://h/cb?x=1#access_token=SECRET&state=s",
                "https://h/cb?x=1#access_token=REDACTED&state=s",
            ),
            (
                "https://h/cb#%74oken=SECRET",
                "https://h/cb#%74oken=REDACTED",
            ),
            ("token=SECRET#frag", "token=REDACTED#frag"),
        ] {
            assert_eq!(redact_token(uri), want, "{uri}");
        }
    }

    #[test]
    fn names_that_do_not_decode_to_token_are_kept() {
        for uri in [
            "/ws?to+ken=x",
            "/ws?token%00=x",
            "/ws?%2574oken=x",
            "/ws?tokens=x",
            "/ws?%74oke=x",
            "/ws?t%6=x",
            "/ws?%FF=x",
        ] {
            assert_eq!(redact_token(uri), uri);
        }
    }

    /// Whatever axum's `Query` (the WebSocket route's extractor) reads as `token` is redacted.
    #[test]
    fn every_token_the_server_would_read_is_gone_from_the_redacted_uri() {
        let names = [
            "token",
            "%74oken",
            "t%6Fken",
            "to%6Ben",
            "tok%65n",
            "toke%6E",
            "%74%6f%6b%65%6e",
            "%74%6F%6B%65%6E",
            "access_token",
            "access%5ftoken",
        ];
        for (i, name) in names.iter().enumerate() {
            for uri in [
                format!("/ws/w/a/c/u?{name}=SECRET{i}"),
                format!("/ws/w/a/c/u?after=0&{name}=SECRET{i}&epoch=e"),
                format!("/ws/w/a/c/u?{name}=SECRET{i}&{name}=SECRET{i}"),
            ] {
                let parsed: axum::http::Uri = uri.parse().unwrap();
                let axum::extract::Query(pairs) =
                    axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parsed).unwrap();
                let secret = format!("SECRET{i}");
                assert!(
                    pairs
                        .iter()
                        .any(|(k, v)| (k == "token" || k == "access_token") && *v == secret),
                    "the server reads {uri} as {pairs:?}"
                );
                let redacted = redact_token(&parsed.to_string());
                assert!(!redacted.contains(&secret), "{uri} -> {redacted}");
            }
        }
    }
}
