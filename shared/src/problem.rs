//! RFC 9457 problem details: every non-2xx answer of the API, with the closed set of codes from
//! api.md. Each code knows its HTTP status, its title and whether the caller may retry later.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    InvalidRequest,
    UnknownLanguage,
    InvalidFileName,
    LimitExceedsMax,
    Unauthorized,
    NotFound,
    MethodNotAllowed,
    PayloadTooLarge,
    RateLimited,
    NodeLost,
    NoCapacity,
    LanguageUnavailable,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::InvalidRequest
            | ErrorCode::UnknownLanguage
            | ErrorCode::InvalidFileName
            | ErrorCode::LimitExceedsMax => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::NotFound => 404,
            ErrorCode::MethodNotAllowed => 405,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::RateLimited => 429,
            ErrorCode::Internal => 500,
            ErrorCode::NodeLost => 502,
            ErrorCode::NoCapacity | ErrorCode::LanguageUnavailable => 503,
        }
    }

    pub fn title(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "Invalid request",
            ErrorCode::UnknownLanguage => "Unknown language",
            ErrorCode::InvalidFileName => "Invalid file name",
            ErrorCode::LimitExceedsMax => "Limit exceeds maximum",
            ErrorCode::Unauthorized => "Unauthorized",
            ErrorCode::NotFound => "Not found",
            ErrorCode::MethodNotAllowed => "Method not allowed",
            ErrorCode::PayloadTooLarge => "Payload too large",
            ErrorCode::RateLimited => "Rate limited",
            ErrorCode::NodeLost => "Node lost",
            ErrorCode::NoCapacity => "No capacity",
            ErrorCode::LanguageUnavailable => "Language unavailable",
            ErrorCode::Internal => "Internal error",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::UnknownLanguage => "unknown_language",
            ErrorCode::InvalidFileName => "invalid_file_name",
            ErrorCode::LimitExceedsMax => "limit_exceeds_max",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::NotFound => "not_found",
            ErrorCode::MethodNotAllowed => "method_not_allowed",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::NodeLost => "node_lost",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::LanguageUnavailable => "language_unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// Seconds a client should wait before retrying, for the codes that carry `Retry-After`.
    pub fn default_retry_after(self) -> Option<u64> {
        match self {
            ErrorCode::RateLimited | ErrorCode::NoCapacity => Some(1),
            ErrorCode::LanguageUnavailable => Some(5),
            _ => None,
        }
    }
}

/// An `application/problem+json` body.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Problem {
    #[serde(rename = "type")]
    pub kind: String,
    pub title: String,
    pub status: u16,
    pub code: ErrorCode,
    pub detail: String,
    /// Sent as the `Retry-After` header, not in the body.
    #[serde(skip)]
    pub retry_after_s: Option<u64>,
}

impl Problem {
    pub fn new(code: ErrorCode, detail: impl Into<String>) -> Problem {
        Problem {
            kind: "about:blank".to_string(),
            title: code.title().to_string(),
            status: code.status(),
            code,
            detail: detail.into(),
            retry_after_s: code.default_retry_after(),
        }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Problem {
        self.retry_after_s = Some(seconds);
        self
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.title,
            self.code.as_str(),
            self.detail
        )
    }
}

impl std::error::Error for Problem {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_as_rfc9457_with_code() {
        let p = Problem::new(ErrorCode::UnknownLanguage, "no language 'cobol'");
        let v = serde_json::to_value(&p).unwrap();
        assert_eq!(v["type"], "about:blank");
        assert_eq!(v["status"], 400);
        assert_eq!(v["code"], "unknown_language");
        assert_eq!(v["title"], "Unknown language");
        assert!(v.get("retry_after_s").is_none());
    }

    #[test]
    fn codes_serialize_as_their_names() {
        for code in [
            ErrorCode::InvalidRequest,
            ErrorCode::NoCapacity,
            ErrorCode::LanguageUnavailable,
            ErrorCode::NodeLost,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }
}
