//! Redaction of tokens in URLs before logging.

/// Query parameters whose values are redacted (compared ASCII case-insensitively).
const SECRET_PARAMS: [&str; 2] = ["token", "access_token"];

/// Removes the value of a `token` (or `access_token`) query parameter from a URL or query
/// string, for logging: `"a=1&token=xyz&b=2"` becomes `"a=1&token=REDACTED&b=2"`.
///
/// Accepts a bare query string or anything with a `?` (path, path and query, full URL); only the
/// part after the first `?` and before any `#` is rewritten. Every occurrence is redacted.
pub fn redact_token(uri_or_query: &str) -> String {
    let (prefix, rest) = match uri_or_query.find('?') {
        Some(i) => uri_or_query.split_at(i + 1),
        None => ("", uri_or_query),
    };
    let (query, fragment) = match rest.find('#') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };

    let mut out = String::with_capacity(uri_or_query.len());
    out.push_str(prefix);
    for (i, pair) in query.split('&').enumerate() {
        if i > 0 {
            out.push('&');
        }
        match pair.split_once('=') {
            Some((key, _)) if SECRET_PARAMS.iter().any(|p| key.eq_ignore_ascii_case(p)) => {
                out.push_str(key);
                out.push_str("=REDACTED");
            }
            _ => out.push_str(pair),
        }
    }
    out.push_str(fragment);
    out
}
