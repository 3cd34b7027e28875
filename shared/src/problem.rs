//! RFC 9457 problem details: every non-2xx answer of the API, with the closed set of codes from
//! docs/api.md. Each code knows its HTTP status, its title and whether the caller may retry later.

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
    RequestTimeout,
    PayloadTooLarge,
    UriTooLong,
    UnsupportedMediaType,
    RateLimited,
    HeadersTooLarge,
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
            ErrorCode::RequestTimeout => 408,
            ErrorCode::PayloadTooLarge => 413,
            ErrorCode::UriTooLong => 414,
            ErrorCode::UnsupportedMediaType => 415,
            ErrorCode::RateLimited => 429,
            ErrorCode::HeadersTooLarge => 431,
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
            ErrorCode::RequestTimeout => "Request timeout",
            ErrorCode::PayloadTooLarge => "Payload too large",
            ErrorCode::UriTooLong => "URI too long",
            ErrorCode::UnsupportedMediaType => "Unsupported media type",
            ErrorCode::RateLimited => "Rate limited",
            ErrorCode::HeadersTooLarge => "Request header fields too large",
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
            ErrorCode::RequestTimeout => "request_timeout",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::UriTooLong => "uri_too_long",
            ErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::HeadersTooLarge => "headers_too_large",
            ErrorCode::NodeLost => "node_lost",
            ErrorCode::NoCapacity => "no_capacity",
            ErrorCode::LanguageUnavailable => "language_unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The code that answers a bare HTTP `status` (one a framework or the HTTP layer chose, not
    /// a handler): the one code of that status, `invalid_request` for other 4xx, `internal` for
    /// other 5xx.
    pub fn for_status(status: u16) -> ErrorCode {
        match status {
            401 => ErrorCode::Unauthorized,
            404 => ErrorCode::NotFound,
            405 => ErrorCode::MethodNotAllowed,
            408 => ErrorCode::RequestTimeout,
            413 => ErrorCode::PayloadTooLarge,
            414 => ErrorCode::UriTooLong,
            415 => ErrorCode::UnsupportedMediaType,
            429 => ErrorCode::RateLimited,
            431 => ErrorCode::HeadersTooLarge,
            502 => ErrorCode::NodeLost,
            503 => ErrorCode::NoCapacity,
            400..=499 => ErrorCode::InvalidRequest,
            _ => ErrorCode::Internal,
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
            ErrorCode::RequestTimeout,
            ErrorCode::UnsupportedMediaType,
            ErrorCode::UriTooLong,
            ErrorCode::HeadersTooLarge,
        ] {
            assert_eq!(serde_json::to_value(code).unwrap(), code.as_str());
        }
    }

    #[test]
    fn a_bare_status_maps_to_a_code_of_that_status() {
        for status in [
            400, 401, 404, 405, 408, 411, 413, 414, 415, 429, 431, 500, 502, 503,
        ] {
            let code = ErrorCode::for_status(status);
            let expected = match status {
                411 => 400,
                other => other,
            };
            assert_eq!(code.status(), expected, "{status} -> {code:?}");
        }
    }
}
