//! `POST /v1/judge` at the gateway: checked at the edge as an execute is (the program's files,
//! arguments, limits and language; the tests, each test's limits and the checker as the agent
//! checks them), routed by the program's language through the same quotas, queue and retries
//! (only a node that cannot have started it is passed over; a compiled program by its
//! affinity, to the node that has it compiled), with a timeout that covers one
//! compile and every test's run (and the checker's). The agent's answer passes through with the
//! node, the attempts and the gateway's wait added; with `Accept: application/x-ndjson` its
//! events do, line by line (`stream`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use codefleet_http_edge::Disconnect;
use codefleet_shared::judge::{
    check_judge, judge_budget, test_limits, Checker, JudgeRequest, JudgeResponse,
};
use codefleet_shared::LanguageInfo;

use crate::dispatch::{place, Delivery, Job, Placed};
use crate::edge::{Held, JsonBody};
use crate::error::GatewayError;
use crate::handlers::{check_job, labelled, resolve_language, stream_limits, Answering};
use crate::membership::Snapshot;
use crate::routing::program_affinity;
use crate::stream;
use crate::Gateway;

pub async fn judge(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    disconnect: Option<Extension<Disconnect>>,
    held: Option<Extension<Held>>,
    body: JsonBody<JudgeRequest>,
) -> Response {
    let mut language = None;
    let answering = Answering::of(&headers, disconnect, held);
    let result = run_judge(&gw, body, answering, &mut language).await;
    labelled(language, result)
}

/// A judge request that passed the edge's checks: the runtime its program runs in, and the time
/// one compile and every test's run (and the checker's) may take.
pub(crate) struct Checked<'s> {
    pub language: &'s LanguageInfo,
    pub runtime: &'s str,
    pub budget: Duration,
}

/// The checks of `POST /v1/judge` (a submission's judge gets the same).
pub(crate) fn check<'s>(
    gw: &Gateway,
    snapshot: &'s Snapshot,
    request: &JudgeRequest,
) -> Result<Checked<'s>, GatewayError> {
    check_judge(request).map_err(GatewayError::Invalid)?;
    let program = &request.program;
    let limits = check_job(gw, program)?;
    let max = gw.config().max_limits();
    let tests = request
        .tests
        .iter()
        .flatten()
        .enumerate()
        .map(|(i, t)| test_limits(i, &limits, t.limits.as_ref(), &max))
        .collect::<Result<Vec<_>, _>>()
        .map_err(GatewayError::Invalid)?;
    let checker = match &request.checker {
        Some(Checker::Program { program }) => {
            let checker_limits = check_job(gw, program)?;
            let version = program.version.as_deref().filter(|v| !v.is_empty());
            resolve_language(snapshot, program.language.as_deref(), version)?;
            Some(checker_limits)
        }
        _ => None,
    };
    let version = program.version.as_deref().filter(|v| !v.is_empty());
    let (language, runtime) = resolve_language(snapshot, program.language.as_deref(), version)?;
    Ok(Checked {
        language,
        runtime,
        budget: judge_budget(&limits, &tests, checker.as_ref()),
    })
}

async fn run_judge(
    gw: &Gateway,
    JsonBody {
        value: request,
        raw,
    }: JsonBody<JudgeRequest>,
    answering: Answering,
    label: &mut Option<String>,
) -> Result<Response, GatewayError> {
    if answering.stream {
        // The agent's events as they come: `accepted`, `compile`, one `test` each, `result`.
        let placed = place_judge(gw, &request, raw, Delivery::Stream, label).await?;
        return stream::respond(
            placed,
            stream::Events::Judge,
            stream_limits(gw),
            answering.disconnect,
            answering.held,
        );
    }
    let answer = judge_answer(gw, &request, raw, label).await?;
    Ok(Json(answer).into_response())
}

/// Checks a judge request (`raw` its body as it came), places it on a node (the one that has
/// the program compiled, while it has room) and returns the node's answer.
pub(crate) async fn judge_answer(
    gw: &Gateway,
    request: &JudgeRequest,
    raw: Bytes,
    label: &mut Option<String>,
) -> Result<JudgeResponse, GatewayError> {
    let placed = place_judge(gw, request, raw, Delivery::Buffered, label).await?;
    let body = placed.reply.expect(StatusCode::OK, &placed.node)?;
    let mut answer: JudgeResponse =
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadAnswer {
            node: placed.node.to_string(),
            detail: format!("not a judge response: {e}"),
        })?;
    let waited = placed.waited.as_millis() as u64;
    answer.node = placed.node.to_string();
    answer.attempts = Some(placed.attempts);
    answer.timing.queued_ms += waited;
    answer.timing.total_ms += waited;
    Ok(answer)
}

/// Checks a judge request and places it on a node, for its answer in `delivery`.
async fn place_judge(
    gw: &Gateway,
    request: &JudgeRequest,
    raw: Bytes,
    delivery: Delivery,
    label: &mut Option<String>,
) -> Result<Placed, GatewayError> {
    let snapshot = gw.snapshot();
    let Checked {
        language: info,
        runtime,
        budget,
    } = check(gw, &snapshot, request)?;
    let program = &request.program;
    let version = program.version.as_deref().filter(|v| !v.is_empty());
    *label = Some(info.name.clone());
    let job = Job {
        language: &info.name,
        version,
        runtime: Some(runtime),
        path: "/v1/judge",
        body: raw,
        timeout: budget + gw.config().dispatch_margin(),
        delivery,
        affinity: info.compiled.then(|| program_affinity(&info.name, program)),
    };
    place(gw, job).await
}
