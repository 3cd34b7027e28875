//! Asynchronous submissions: `POST /v1/submissions` takes an execute or judge body and answers
//! `202` with a token at once; `GET /v1/submissions/{token}` tells where it is and, once it is
//! done, carries the answer the synchronous endpoint would have given; `DELETE` cancels.
//!
//! A token names the node that keeps the submission (`sb_<hex>.<node id>`, like a session id),
//! so any gateway can answer a poll without a shared database.

use serde::{Deserialize, Serialize};

use crate::api::{object_only, ExecuteRequest, ExecuteResponse};
use crate::judge::{JudgeRequest, JudgeResponse};
use crate::problem::Problem;

/// `POST /v1/submissions` as it arrives: exactly one of `execute` and `judge`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubmissionRequest {
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option"
    )]
    pub execute: Option<ExecuteRequest>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option"
    )]
    pub judge: Option<JudgeRequest>,
    /// Where the finished submission is delivered (`POST`, signed); see docs/api.md.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub callback_url: Option<String>,
}

/// Where a submission is.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum SubmissionStatus {
    /// Accepted and stored; waiting for a sandbox.
    Queued,
    Running,
    /// Finished: `result` holds the answer (whatever the program did).
    Done,
    /// The node could not run it (`error` says why); the program's own failures are `done`.
    Failed,
    /// Cancelled by `DELETE` before it finished.
    Cancelled,
}

impl SubmissionStatus {
    /// Whether the submission will not change any more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SubmissionStatus::Done | SubmissionStatus::Failed | SubmissionStatus::Cancelled
        )
    }
}

/// The answer of a finished submission: what `POST /v1/execute` or `POST /v1/judge` would have
/// answered.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum SubmissionResult {
    Judge(Box<JudgeResponse>),
    Execute(Box<ExecuteResponse>),
}

/// `202` of `POST /v1/submissions`, `200` of `GET`/`DELETE /v1/submissions/{token}`, and the
/// body a callback delivers.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Submission {
    pub token: String,
    /// `execute` or `judge`.
    pub kind: String,
    pub status: SubmissionStatus,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<u64>,
    /// Present when `status` is `done`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<SubmissionResult>,
    /// Present when `status` is `failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
}
