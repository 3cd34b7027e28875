//! Batches: `POST /v1/batch` carries several execute and judge requests at once, run
//! concurrently across the fleet; the answer has one entry per job, in the request's order,
//! each the job's own answer or its own problem.

use serde::{Deserialize, Serialize};

use crate::api::{object_only, ExecuteRequest, ExecuteResponse};
use crate::judge::{JudgeRequest, JudgeResponse};
use crate::problem::Problem;

/// The most jobs a batch carries unless the operator says otherwise (`--max-batch`).
pub const DEFAULT_MAX_BATCH: usize = 64;

/// `POST /v1/batch` as it arrives. Each job is read on its own (`BatchJob`): one that is not
/// a valid job gets its own problem in the answer, and the others still run.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jobs: Option<Vec<serde_json::Value>>,
}

/// One job of a batch: exactly one of `execute` and `judge`, each the body its endpoint takes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BatchJob {
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
}

/// `200` of `POST /v1/batch`: one entry per job, in order.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchResponse {
    pub results: Vec<BatchAnswer>,
}

/// A job's answer: exactly one of `execute` (what `POST /v1/execute` would have answered),
/// `judge` (what `POST /v1/judge` would have answered) and `error` (the problem its endpoint
/// would have answered instead).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct BatchAnswer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub execute: Option<Box<ExecuteResponse>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<Box<JudgeResponse>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<Problem>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_job_is_one_of_execute_or_judge() {
        let job: BatchJob =
            serde_json::from_value(serde_json::json!({"execute": {"language": "python"}})).unwrap();
        assert!(job.execute.is_some() && job.judge.is_none());
        for bad in [
            serde_json::json!({"execute": [1]}),
            serde_json::json!({"run": {}}),
            serde_json::json!({"execute": {}, "stdin": ""}),
        ] {
            assert!(
                serde_json::from_value::<BatchJob>(bad.clone()).is_err(),
                "{bad}"
            );
        }
    }
}
