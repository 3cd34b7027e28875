//! `POST /v1/batch`: up to `--max-batch` execute and judge requests in one body, run
//! concurrently across the fleet, each placed, queued, retried and limited exactly as its own
//! endpoint would (a compiled program by its affinity, so a batch that repeats a program hits
//! the node that has it compiled). The answer lists one entry per job in the request's order:
//! the job's answer, or the problem its endpoint would have answered, so one bad job fails
//! alone.
//!
//! Under the caller's quota: each job takes a token from the key's rate bucket when it starts
//! (none left: that job is 429 `rate_limited`) and counts in the key's in-flight requests while
//! it runs; at most the key's in-flight quota less one (the batch request itself) run at once.
//! Without API keys there are no quotas, and every job of the batch may run at once.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::{Extension, Json};
use codefleet_shared::batch::{BatchAnswer, BatchJob, BatchRequest, BatchResponse};
use futures_util::future::join_all;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::dispatch::Delivery;
use crate::edge::{Held, JsonBody};
use crate::error::GatewayError;
use crate::handlers::{execute_answer, place_execute};
use crate::judge::judge_answer;
use crate::Gateway;

pub async fn batch(
    State(gw): State<Arc<Gateway>>,
    held: Option<Extension<Held>>,
    JsonBody { value, .. }: JsonBody<BatchRequest>,
) -> Result<Json<BatchResponse>, GatewayError> {
    let jobs = value
        .jobs
        .filter(|jobs| !jobs.is_empty())
        .ok_or_else(|| GatewayError::invalid("`jobs` is required: a list of 1 or more jobs"))?;
    let max = gw.config().max_batch;
    if jobs.len() > max {
        return Err(GatewayError::invalid(format!(
            "{} jobs in the batch; at most {max} are accepted",
            jobs.len()
        )));
    }
    let quota = held.map(|Extension(held)| Arc::clone(held.quota()));
    let width = quota.as_ref().map_or(jobs.len(), |q| q.batch_width());
    let turns = Semaphore::new(width);
    let answers = jobs.into_iter().map(|job| {
        let (gw, quota, turns) = (&gw, &quota, &turns);
        async move {
            let _turn = turns
                .acquire()
                .await
                .expect("the semaphore is never closed");
            let _permit = match quota {
                Some(quota) => match quota.admit_batch_job(Instant::now()) {
                    Ok(permit) => Some(permit),
                    Err(error) => return failed(error),
                },
                None => None,
            };
            run_one(gw, job).await.unwrap_or_else(failed)
        }
    });
    let results = join_all(answers).await;
    Ok(Json(BatchResponse { results }))
}

/// Runs one job of a batch as its own endpoint would.
async fn run_one(gw: &Gateway, job: Value) -> Result<BatchAnswer, GatewayError> {
    let mut label = None;
    let invalid = |e: serde_json::Error| GatewayError::invalid(format!("a batch job: {e}"));
    let (kind, body) = match &job {
        Value::Object(fields) if fields.len() == 1 => {
            let (kind, body) = fields.iter().next().expect("one field");
            (kind.clone(), body.clone())
        }
        _ => {
            return Err(GatewayError::invalid(
                "a batch job is an object with exactly one of `execute` and `judge`",
            ))
        }
    };
    let typed: BatchJob = serde_json::from_value(job).map_err(invalid)?;
    let raw = Bytes::from(serde_json::to_vec(&body).map_err(invalid)?);
    match (kind.as_str(), typed) {
        (
            "execute",
            BatchJob {
                execute: Some(request),
                ..
            },
        ) => {
            let placed = place_execute(gw, &request, raw, Delivery::Buffered, &mut label).await?;
            let answer =
                execute_answer(placed.reply, &placed.node, placed.attempts, placed.waited)?;
            Ok(BatchAnswer {
                execute: Some(Box::new(answer)),
                ..BatchAnswer::default()
            })
        }
        (
            "judge",
            BatchJob {
                judge: Some(request),
                ..
            },
        ) => {
            let answer = judge_answer(gw, &request, raw, &mut label).await?;
            Ok(BatchAnswer {
                judge: Some(Box::new(answer)),
                ..BatchAnswer::default()
            })
        }
        _ => Err(GatewayError::invalid(
            "a batch job is an object with exactly one of `execute` and `judge`",
        )),
    }
}

fn failed(error: GatewayError) -> BatchAnswer {
    BatchAnswer {
        error: Some(error.problem()),
        ..BatchAnswer::default()
    }
}
