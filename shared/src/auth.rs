//! Bearer tokens, the same way in the gateway and the agents: reading `Authorization: Bearer
//! <token>` (scheme case-insensitive, RFC 7235) and comparing secrets in time that depends
//! only on their lengths.

use subtle::ConstantTimeEq;

/// The token of an `Authorization` header value, when it is a non-empty bearer token.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Whether two secrets are equal, in time that depends only on their lengths (`subtle`'s
/// constant-time comparison).
pub fn secrets_equal(a: &str, b: &str) -> bool {
    a.as_bytes().ct_eq(b.as_bytes()).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_parsing() {
        for (value, token) in [
            ("Bearer abc", Some("abc")),
            ("bearer  abc ", Some("abc")),
            ("Basic abc", None),
            ("Bearer ", None),
            ("abc", None),
        ] {
            assert_eq!(bearer_token(value), token, "{value:?}");
        }
    }

    #[test]
    fn secrets_compare_whole() {
        assert!(secrets_equal("token", "token"));
        assert!(!secrets_equal("token", "tokem"));
        assert!(!secrets_equal("token", "token2"));
        assert!(!secrets_equal("", "x"));
    }
}
