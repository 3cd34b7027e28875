//! `/v1/submissions` at the gateway. `POST` is checked at the edge exactly as `/v1/execute` or
//! `/v1/judge` would check its body, then sent to a node of its language (the one a job would
//! get now; when every one is busy, the language's first, since the node queues it, not the
//! gateway) and passed to the next only when a node certainly did not take it (its submission
//! queue full, say). `GET` and `DELETE` go to the node the token names (`sb_<hex>.<node id>`):
//! a node that is down or no longer in the cluster answers `node_lost`, never 404.
//!
//! [`submit`], [`poll`] and [`withdraw`] are the calls other front ends (the Judge0 layer) build
//! on.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use codefleet_shared::cluster::NodeState;
use codefleet_shared::ids::SubmissionId;
use codefleet_shared::submission::{Submission, SubmissionRequest};

use crate::dispatch::{call_bound, AttemptError, Reply};
use crate::edge::JsonBody;
use crate::error::GatewayError;
use crate::handlers::{check_job, labelled, resolve_language};
use crate::membership::NodeHandle;
use crate::routing::{Decision, NodeId, Want};
use crate::Gateway;

/// The agent's path for submissions.
const PATH: &str = "/v1/submissions";

pub async fn create(State(gw): State<Arc<Gateway>>, body: JsonBody<SubmissionRequest>) -> Response {
    let mut language = None;
    let result = submit(&gw, &body.value, body.raw.clone(), &mut language)
        .await
        .map(|s| (StatusCode::ACCEPTED, Json(s)).into_response());
    labelled(language, result)
}

pub async fn get(
    State(gw): State<Arc<Gateway>>,
    Path(token): Path<String>,
) -> Result<Json<Submission>, GatewayError> {
    poll(&gw, &token).await.map(Json)
}

pub async fn cancel(
    State(gw): State<Arc<Gateway>>,
    Path(token): Path<String>,
) -> Result<Json<Submission>, GatewayError> {
    withdraw(&gw, &token).await.map(Json)
}

/// Checks a submission as the synchronous endpoint would its body and stores it on a node;
/// `raw` is the request's JSON as it came. `label` gets the canonical language.
pub async fn submit(
    gw: &Gateway,
    request: &SubmissionRequest,
    raw: Bytes,
    label: &mut Option<String>,
) -> Result<Submission, GatewayError> {
    let snapshot = gw.snapshot();
    let (language, version, runtime) = match (&request.execute, &request.judge) {
        (Some(execute), None) => {
            check_job(gw, execute)?;
            let version = execute.version.as_deref().filter(|v| !v.is_empty());
            let (info, runtime) =
                resolve_language(&snapshot, execute.language.as_deref(), version)?;
            (info, version, runtime)
        }
        (None, Some(judge)) => {
            let checked = crate::judge::check(gw, &snapshot, judge)?;
            let version = judge.program.version.as_deref().filter(|v| !v.is_empty());
            (checked.language, version, checked.runtime)
        }
        _ => {
            return Err(GatewayError::invalid(
                "a submission holds exactly one of `execute` and `judge`",
            ))
        }
    };
    *label = Some(language.name.clone());
    // A compiled program goes where it was compiled before, as a synchronous one does.
    let program = request
        .execute
        .as_ref()
        .or(request.judge.as_ref().map(|j| &j.program));
    let affinity = program
        .filter(|_| language.compiled)
        .map(|p| crate::routing::program_affinity(&language.name, p));
    let config = gw.config();
    let mut tried: Vec<NodeId> = Vec::new();
    let mut last: Option<(NodeId, AttemptError)> = None;
    loop {
        let want = Want {
            language: &language.name,
            version,
            runtime: Some(runtime),
            exclude: &tried,
            affinity,
        };
        let table = &snapshot.table;
        let decision = match table.choose(&want, config.balance_factor, |node| node.load()) {
            // The node queues it: a busy node is no reason to wait here.
            Decision::Saturated => table.choose(&want, config.balance_factor, |_| 0),
            other => other,
        };
        let node = match decision {
            Decision::Node(entry) => Arc::clone(&entry.load),
            Decision::Saturated | Decision::Unavailable => {
                return Err(match last {
                    Some((node, failure)) => failure.into_error(&node),
                    None => GatewayError::LanguageUnavailable {
                        language: language.name.clone(),
                    },
                })
            }
        };
        let timeout = config.dispatch_margin();
        let sent = gw
            .dispatcher
            .call(&node, Method::POST, PATH, Some(raw.clone()), timeout)
            .await;
        tried.push(node.id.clone());
        match sent {
            Ok(reply) => return submission(reply, StatusCode::ACCEPTED, &node.id),
            Err(failure) if failure.not_started() && tried.len() < config.max_attempts as usize => {
                tracing::info!(node = %node.id, error = %failure, "submission: trying another node");
                last = Some((node.id.clone(), failure));
            }
            Err(failure) => return Err(failure.into_error(&node.id)),
        }
    }
}

/// Where a submission is, from the node its token names.
pub async fn poll(gw: &Gateway, token: &str) -> Result<Submission, GatewayError> {
    bound(gw, Method::GET, token).await
}

/// Cancels a submission on the node its token names; answers it as it is then.
pub async fn withdraw(gw: &Gateway, token: &str) -> Result<Submission, GatewayError> {
    bound(gw, Method::DELETE, token).await
}

async fn bound(gw: &Gateway, method: Method, token: &str) -> Result<Submission, GatewayError> {
    let node = keeper(gw, token)?;
    let path = format!("{PATH}/{token}");
    let timeout = gw.config().dispatch_margin();
    let reply = call_bound(gw, &node, method, &path, None, timeout).await?;
    submission(reply, StatusCode::OK, &node.id)
}

/// The node keeping `token`'s submission.
fn keeper(gw: &Gateway, token: &str) -> Result<Arc<NodeHandle>, GatewayError> {
    let id = SubmissionId::parse(token)
        .map_err(|e| GatewayError::NotFound(format!("no submission {token:?}: {e}")))?;
    let node = id.node.as_str();
    let lost = |reason: &str| GatewayError::NodeLost {
        node: node.to_string(),
        reason: reason.to_string(),
    };
    match gw.node(node) {
        None => Err(lost(
            "the node that keeps the submission is not in the cluster (gone, or removed)",
        )),
        Some((_, NodeState::Down)) => Err(lost("the node that keeps the submission is down")),
        Some((handle, _)) => Ok(handle),
    }
}

fn submission(
    reply: Reply,
    expected: StatusCode,
    node: &NodeId,
) -> Result<Submission, GatewayError> {
    let body = reply.expect(expected, node)?;
    serde_json::from_slice(&body).map_err(|e| GatewayError::BadAnswer {
        node: node.to_string(),
        detail: format!("not a submission: {e}"),
    })
}
