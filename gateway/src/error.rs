//! The gateway's errors, and the one place they become HTTP answers (problem+json, docs/api.md).

use std::time::Duration;

use axum::response::{IntoResponse, Response};
use codefleet_shared::{ErrorCode, Problem};

/// Whose fault an error is: decides how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The client sent something we refuse; nothing is wrong here.
    Caller,
    /// The cluster cannot serve it right now (capacity, a node failed).
    Cluster,
    /// A bug or a misconfiguration.
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The request broke an input rule (shape, file names, limits).
    #[error("{0}")]
    Invalid(Problem),
    #[error("{what}")]
    UnknownLanguage {
        what: String,
        available: Vec<String>,
    },
    #[error("no node has {language} ready")]
    LanguageUnavailable { language: String },
    #[error("{detail}")]
    NoCapacity { detail: String },
    #[error("node {node} was lost while running the job: {reason}")]
    NodeLost { node: String, reason: String },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{reason}")]
    RateLimited {
        reason: &'static str,
        retry_after: Duration,
    },
    #[error("the request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("{0}")]
    NotFound(String),
    #[error("method not allowed on this route")]
    MethodNotAllowed,
    /// A node's own problem answer, passed on as it is (e.g. 404 for a session it does not have).
    #[error("node {node} answered: {problem}")]
    Agent { node: String, problem: Problem },
    /// A node's answer that the gateway cannot use.
    #[error("node {node} gave an unusable answer: {detail}")]
    BadAnswer { node: String, detail: String },
}

impl GatewayError {
    pub fn invalid(detail: impl Into<String>) -> GatewayError {
        GatewayError::Invalid(Problem::new(ErrorCode::InvalidRequest, detail))
    }

    pub fn fault(&self) -> Fault {
        match self {
            GatewayError::Invalid(_)
            | GatewayError::UnknownLanguage { .. }
            | GatewayError::Unauthorized(_)
            | GatewayError::RateLimited { .. }
            | GatewayError::PayloadTooLarge { .. }
            | GatewayError::NotFound(_)
            | GatewayError::MethodNotAllowed => Fault::Caller,
            GatewayError::LanguageUnavailable { .. }
            | GatewayError::NoCapacity { .. }
            | GatewayError::NodeLost { .. } => Fault::Cluster,
            GatewayError::Agent { problem, .. } if problem.status < 500 => Fault::Caller,
            GatewayError::Agent { problem, .. } if problem.status == 503 => Fault::Cluster,
            GatewayError::Agent { .. } | GatewayError::BadAnswer { .. } => Fault::Internal,
        }
    }

    /// The answer for this error: the only mapping from errors to problems.
    pub fn problem(&self) -> Problem {
        let detail = self.to_string();
        match self {
            GatewayError::Invalid(problem) | GatewayError::Agent { problem, .. } => problem.clone(),
            GatewayError::UnknownLanguage { what, available } => {
                let available = if available.is_empty() {
                    "none yet".to_string()
                } else {
                    available.join(", ")
                };
                let detail = format!("{what}; available: {available}");
                Problem::new(ErrorCode::UnknownLanguage, detail)
            }
            GatewayError::LanguageUnavailable { .. } => {
                Problem::new(ErrorCode::LanguageUnavailable, detail)
            }
            GatewayError::NoCapacity { .. } => Problem::new(ErrorCode::NoCapacity, detail),
            GatewayError::NodeLost { .. } => Problem::new(ErrorCode::NodeLost, detail),
            GatewayError::Unauthorized(_) => Problem::new(ErrorCode::Unauthorized, detail),
            GatewayError::RateLimited { retry_after, .. } => {
                Problem::new(ErrorCode::RateLimited, detail)
                    .with_retry_after(whole_seconds(*retry_after))
            }
            GatewayError::PayloadTooLarge { .. } => {
                Problem::new(ErrorCode::PayloadTooLarge, detail)
            }
            GatewayError::NotFound(_) => Problem::new(ErrorCode::NotFound, detail),
            GatewayError::MethodNotAllowed => Problem::new(ErrorCode::MethodNotAllowed, detail),
            GatewayError::BadAnswer { .. } => Problem::new(ErrorCode::Internal, detail),
        }
    }
}

/// `Retry-After` is whole seconds; round up, and never say 0.
fn whole_seconds(wait: Duration) -> u64 {
    (wait.as_millis().div_ceil(1_000) as u64).max(1)
}

impl IntoResponse for GatewayError {
    fn into_response(self) -> Response {
        // Refusals and shed load are counted in metrics; a lost node or a fault of ours is news.
        match (self.fault(), &self) {
            (Fault::Internal, _) | (_, GatewayError::NodeLost { .. }) => {
                tracing::warn!(error = %self, "request failed");
            }
            _ => tracing::debug!(error = %self, "request refused"),
        }
        problem_response(self.problem())
    }
}

/// A problem as an `application/problem+json` answer, with `Retry-After` when it has one (the
/// shared edge's mapping, so both binaries answer alike). The code rides along in the response
/// extensions for the metrics layer.
pub fn problem_response(problem: Problem) -> Response {
    let mut response = codefleet_http_edge::problem_response(&problem);
    response.extensions_mut().insert(problem.code);
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header;

    #[test]
    fn every_error_maps_to_its_code_and_status() {
        let table: Vec<(GatewayError, ErrorCode, u16, Option<u64>)> = vec![
            (
                GatewayError::invalid("x"),
                ErrorCode::InvalidRequest,
                400,
                None,
            ),
            (
                GatewayError::UnknownLanguage {
                    what: "no language \"cobol\"".into(),
                    available: vec!["go".into(), "python".into()],
                },
                ErrorCode::UnknownLanguage,
                400,
                None,
            ),
            (
                GatewayError::LanguageUnavailable {
                    language: "go".into(),
                },
                ErrorCode::LanguageUnavailable,
                503,
                Some(5),
            ),
            (
                GatewayError::NoCapacity {
                    detail: "busy".into(),
                },
                ErrorCode::NoCapacity,
                503,
                Some(1),
            ),
            (
                GatewayError::NodeLost {
                    node: "a".into(),
                    reason: "reset".into(),
                },
                ErrorCode::NodeLost,
                502,
                None,
            ),
            (
                GatewayError::Unauthorized("no key"),
                ErrorCode::Unauthorized,
                401,
                None,
            ),
            (
                GatewayError::RateLimited {
                    reason: "rate",
                    retry_after: Duration::from_millis(2_100),
                },
                ErrorCode::RateLimited,
                429,
                Some(3),
            ),
            (
                GatewayError::PayloadTooLarge { limit: 10 },
                ErrorCode::PayloadTooLarge,
                413,
                None,
            ),
            (
                GatewayError::NotFound("x".into()),
                ErrorCode::NotFound,
                404,
                None,
            ),
            (
                GatewayError::MethodNotAllowed,
                ErrorCode::MethodNotAllowed,
                405,
                None,
            ),
            (
                GatewayError::Agent {
                    node: "a".into(),
                    problem: Problem::new(ErrorCode::NotFound, "no session"),
                },
                ErrorCode::NotFound,
                404,
                None,
            ),
            (
                GatewayError::BadAnswer {
                    node: "a".into(),
                    detail: "not JSON".into(),
                },
                ErrorCode::Internal,
                500,
                None,
            ),
        ];
        for (error, code, status, retry_after) in table {
            let problem = error.problem();
            assert_eq!(
                (problem.code, problem.status, problem.retry_after_s),
                (code, status, retry_after),
                "{error:?}"
            );
            let response = error.into_response();
            assert_eq!(response.status().as_u16(), status);
            assert_eq!(
                response.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
            let header = response.headers().get(header::RETRY_AFTER);
            assert_eq!(
                header.map(|h| h.to_str().unwrap().parse().unwrap()),
                retry_after
            );
        }
    }

    #[test]
    fn unknown_language_lists_the_available_ones() {
        let error = GatewayError::UnknownLanguage {
            what: "no language \"cobol\"".into(),
            available: vec!["go".into(), "python".into()],
        };
        assert_eq!(
            error.problem().detail,
            "no language \"cobol\"; available: go, python"
        );
    }

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        for (ms, s) in [(0, 1), (1, 1), (1_000, 1), (1_001, 2), (2_500, 3)] {
            assert_eq!(whole_seconds(Duration::from_millis(ms)), s, "{ms} ms");
        }
    }
}
