//! Judge0 CE's API (1.13.1) on the gateway, for clients written against Judge0: its routes at
//! the root (`/submissions`, `/languages`, `/statuses`, `/about`, `/config_info`, `/workers`),
//! its field names, units, status ids, error shapes and `X-Auth-Token`. Nothing here runs a job
//! itself: each submission is translated (`submission`) into a native execute or judge request
//! and sent the way the native endpoints send theirs (checked the same way, placed through the
//! same queue and retries), `wait=true` through the synchronous `/v1/execute` or `/v1/judge`,
//! otherwise as a native asynchronous submission (`POST /v1/submissions` on a node, polled with
//! `GET /v1/submissions/{token}` on the node the token names). The native API is untouched.
//!
//! The routes are in `handlers::router`, beside the native ones.
//!
//! - `languages`: Judge0's language ids, mapped to the fleet's runtimes.
//! - `submission`: the translation both ways, pure.
//! - `zip`: the reader for `additional_files`.

mod languages;
mod submission;
mod zip;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use codefleet_http_edge::ForeignError;
use codefleet_shared::api::{ExecuteResponse, ResolvedLimits};
use codefleet_shared::cluster::NodeState;
use codefleet_shared::judge::JudgeResponse;
use codefleet_shared::submission::SubmissionRequest;
use codefleet_shared::ErrorCode;
use futures_util::future::join_all;
use serde_json::{json, Map, Value};

use crate::dispatch::{job_timeout, place, Delivery, Job};
use crate::error::GatewayError;
use crate::handlers::{check_job, resolve_language};
use crate::metrics::{self, LanguageLabel};
use crate::Gateway;
use languages::Resolved;
use submission::{Checked, Facts, Native, Record, TokenFacts};

/// The version `/about` reports. The official Python client looks its language aliases up by
/// it, and knows only Judge0's own version strings.
pub const JUDGE0_VERSION: &str = "1.13.1";

/// A Judge0-shaped answer (`{"error": ...}` or field errors for an error status).
fn answer(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    if !status.is_success() {
        response.extensions_mut().insert(ForeignError);
    }
    response
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    answer(status, json!({"error": message.into()}))
}

/// Judge0's 401: no body.
fn unauthorized() -> Response {
    let mut response = StatusCode::UNAUTHORIZED.into_response();
    response.extensions_mut().insert(ForeignError);
    response
}

/// A native error in Judge0's shapes: 422 with field errors for what the request got wrong,
/// 401 without a body, `{"error": ...}` with the native status otherwise (503 when the fleet
/// is full, with `Retry-After`).
fn failure(failed: GatewayError) -> Response {
    let problem = failed.problem();
    let field = match problem.code {
        ErrorCode::Unauthorized => return unauthorized(),
        ErrorCode::UnknownLanguage => Some("language_id"),
        ErrorCode::InvalidFileName => Some("additional_files"),
        ErrorCode::InvalidRequest | ErrorCode::LimitExceedsMax if problem.status == 400 => {
            Some("base")
        }
        _ => None,
    };
    if let Some(field) = field {
        let status = StatusCode::UNPROCESSABLE_ENTITY;
        return answer(status, json!({field: [problem.detail]}));
    }
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = error(status, problem.detail);
    if let Some(seconds) = problem.retry_after_s {
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// Judge0's authentication mapped onto the API keys: the key in `X-Auth-Token` (Judge0's
/// header) or as `Authorization: Bearer`, counted against the key's quotas like any request.
pub(crate) async fn auth(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let headers = request.headers();
    let token = headers
        .get("x-auth-token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .or_else(|| crate::edge::bearer(headers));
    match gw.keys.admit_client(token, Instant::now()) {
        Ok(permit) => {
            let response = next.run(request).await;
            drop(permit);
            response
        }
        Err(failed) => failure(failed),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The query parameters Judge0 reads.
struct Params {
    base64: bool,
    wait: bool,
    fields: Vec<&'static str>,
}

impl Params {
    /// As Judge0 1.13.1 reads them: `base64_encoded` and `wait` only when `true`; an unknown
    /// field is its 400.
    fn of(query: &HashMap<String, String>) -> Result<Params, Box<Response>> {
        let fields = submission::parse_fields(query.get("fields").map(String::as_str))
            .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, e)))?;
        Ok(Params {
            base64: query.get("base64_encoded").is_some_and(|v| v == "true"),
            wait: query.get("wait").is_some_and(|v| v == "true"),
            fields,
        })
    }
}

/// The most bytes an archive's files may hold together: what a native request can carry.
fn max_extract(gw: &Gateway) -> usize {
    gw.config().max_body_bytes / 2
}

/// A JSON object body, within the gateway's body limits.
async fn read_object(gw: &Gateway, request: Request) -> Result<Map<String, Value>, Box<Response>> {
    let (parts, body) = request.into_parts();
    let limit = gw.config().max_body_bytes;
    let raw = codefleet_http_edge::read_body(&parts.headers, body, limit)
        .await
        // A body too large or too slow is the HTTP layer's refusal: problem+json, as on every
        // route.
        .map_err(|e| {
            Box::new(match e {
                codefleet_http_edge::BodyError::TooLarge { limit } => {
                    GatewayError::PayloadTooLarge { limit }.into_response()
                }
                other => codefleet_http_edge::problem_response(&other.problem()),
            })
        })?;
    let depth = codefleet_shared::validate::json_depth(&raw);
    if depth > gw.config().max_json_depth {
        let detail = format!("JSON nested {depth} deep");
        return Err(Box::new(error(StatusCode::BAD_REQUEST, detail)));
    }
    match serde_json::from_slice(&raw) {
        Ok(Value::Object(body)) => Ok(body),
        Ok(_) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "the body must be a JSON object",
        ))),
        Err(e) => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!("malformed JSON: {e}"),
        ))),
    }
}

/// Checks a submission body and finds the runtime its language id runs on.
fn prepare(
    gw: &Gateway,
    body: &Map<String, Value>,
    base64: bool,
) -> Result<(Checked, Resolved), Box<Response>> {
    let max = gw.config().max_limits();
    let snapshot = gw.snapshot();
    // A language of Judge0's that no node of this fleet serves does not exist here; before any
    // node has reported, nothing is known, so nothing is unknown either (503, as natively).
    let served = |entry: &languages::Judge0Language| {
        snapshot.catalog.is_empty()
            || snapshot
                .catalog
                .languages()
                .any(|l| l.name == entry.language)
    };
    let unknown = |id: u32| format!("language with id {id} doesn't exist");
    let checked =
        submission::check(body, base64, &max, max_extract(gw)).map_err(|mut errors| {
            let entry = body.get("language_id").and_then(Value::as_u64);
            let entry = entry.and_then(|id| languages::by_id(u32::try_from(id).ok()?));
            if let Some(entry) = entry.filter(|e| !served(e)) {
                errors.insert("language_id".to_string(), vec![unknown(entry.id)]);
            }
            answer(StatusCode::UNPROCESSABLE_ENTITY, json!(errors))
        })?;
    let entry = checked.language;
    let Some(runtime) = languages::resolve(&snapshot, &entry) else {
        if served(&entry) {
            return Err(Box::new(failure(GatewayError::LanguageUnavailable {
                language: entry.language.to_string(),
            })));
        }
        let errors = json!({"language_id": [unknown(entry.id)]});
        return Err(Box::new(answer(StatusCode::UNPROCESSABLE_ENTITY, errors)));
    };
    Ok((checked, runtime))
}

/// Where a native request goes and how long its answer may take, checked as the native
/// endpoint checks it.
struct Placement {
    language: String,
    version: Option<String>,
    runtime: String,
    timeout: Duration,
}

fn placement(gw: &Gateway, native: &Native) -> Result<Placement, GatewayError> {
    let margin = gw.config().dispatch_margin();
    let snapshot = gw.snapshot();
    let (program, language, runtime, timeout) = match native {
        Native::Execute(request) => {
            let limits = check_job(gw, request)?;
            let version = request.version.as_deref();
            let (info, runtime) =
                resolve_language(&snapshot, request.language.as_deref(), version)?;
            (request, info, runtime, job_timeout(&limits, margin))
        }
        Native::Judge(request) => {
            let checked = crate::judge::check(gw, &snapshot, request)?;
            let timeout = checked.budget + margin;
            (&request.program, checked.language, checked.runtime, timeout)
        }
    };
    Ok(Placement {
        language: language.name.clone(),
        version: program.version.clone(),
        runtime: runtime.to_string(),
        timeout,
    })
}

/// Places `body` on a node for `path` and returns the answer's body when it is `expected`.
async fn send(
    gw: &Gateway,
    placement: &Placement,
    path: &'static str,
    body: Bytes,
    timeout: Duration,
    expected: StatusCode,
) -> Result<Bytes, GatewayError> {
    let job = Job {
        language: &placement.language,
        version: placement.version.as_deref(),
        runtime: Some(&placement.runtime),
        path,
        body,
        timeout,
        delivery: Delivery::Buffered,
        affinity: None,
    };
    let placed = place(gw, job).await?;
    placed.reply.expect(expected, &placed.node)
}

/// A node's answer that does not parse as what `path` answers.
fn unreadable(path: &str, e: serde_json::Error) -> GatewayError {
    GatewayError::BadAnswer {
        node: "?".to_string(),
        detail: format!("not an answer of {path}: {e}"),
    }
}

/// `wait=true`: the native synchronous endpoint, its answer made an outcome.
async fn run_now(
    gw: &Gateway,
    checked: &Checked,
    native: &Native,
) -> Result<submission::Outcome, GatewayError> {
    let placement = placement(gw, native)?;
    match native {
        Native::Execute(request) => {
            let answer: ExecuteResponse = ask(gw, &placement, "/v1/execute", request).await?;
            Ok(submission::from_execute(&answer, checked.redirect))
        }
        Native::Judge(request) => {
            let answer: JudgeResponse = ask(gw, &placement, "/v1/judge", request).await?;
            let expected = checked.expected_output.is_some();
            Ok(submission::from_judge(&answer, expected, checked.redirect))
        }
    }
}

/// A synchronous native endpoint's `200` answer to `request`.
async fn ask<T: serde::de::DeserializeOwned>(
    gw: &Gateway,
    placement: &Placement,
    path: &'static str,
    request: &impl serde::Serialize,
) -> Result<T, GatewayError> {
    let body = serde_json::to_vec(request).expect("requests serialize");
    let timeout = placement.timeout;
    let answer = send(gw, placement, path, body.into(), timeout, StatusCode::OK).await?;
    serde_json::from_slice(&answer).map_err(|e| unreadable(path, e))
}

/// `wait=false`: a native asynchronous submission (`POST /v1/submissions`); its Judge0 token.
async fn submit(gw: &Gateway, checked: &Checked, native: &Native) -> Result<String, GatewayError> {
    let request = match native.clone() {
        Native::Execute(execute) => SubmissionRequest {
            execute: Some(execute),
            ..SubmissionRequest::default()
        },
        Native::Judge(judge) => SubmissionRequest {
            judge: Some(judge),
            ..SubmissionRequest::default()
        },
    };
    let body = serde_json::to_vec(&request).expect("requests serialize");
    let stored = crate::submissions::submit(gw, &request, body.into(), &mut None).await?;
    let facts = TokenFacts {
        language_id: checked.language.id,
        expected: checked.expected_output.is_some(),
        redirect: checked.redirect,
    };
    metrics::judge0_submission("async");
    Ok(submission::token(&stored.token, facts))
}

pub(crate) async fn create(
    State(gw): State<Arc<Gateway>>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let created_at = now_ms();
    let params = match Params::of(&query) {
        Ok(params) => params,
        Err(response) => return *response,
    };
    let prepared = match read_object(&gw, request).await {
        Ok(body) => prepare(&gw, &body, params.base64),
        Err(response) => return *response,
    };
    let (checked, runtime) = match prepared {
        Ok(prepared) => prepared,
        Err(response) => return *response,
    };
    let native = Native::of(&checked, &runtime);
    let mut response = if !params.wait {
        match submit(&gw, &checked, &native).await {
            Ok(token) => answer(StatusCode::CREATED, json!({"token": token})),
            Err(failed) => failure(failed),
        }
    } else {
        waited(&gw, &checked, &runtime, &native, &params, created_at).await
    };
    let language = runtime.entry.language.to_string();
    response.extensions_mut().insert(LanguageLabel(language));
    response
}

/// `wait=true`: the submission run now, answered with the fields asked for.
async fn waited(
    gw: &Gateway,
    checked: &Checked,
    runtime: &Resolved,
    native: &Native,
    params: &Params,
    created_at: u64,
) -> Response {
    match run_now(gw, checked, native).await {
        Ok(outcome) => {
            metrics::judge0_submission("wait");
            metrics::judge0_result(outcome.status);
            let record = submission::record(Facts {
                token: None,
                language: Some(runtime),
                language_id: runtime.entry.id,
                echo: Some(&checked.echo),
                status: outcome.status,
                outcome: Some(outcome),
                created_at_ms: Some(created_at),
                finished_at_ms: Some(now_ms()),
            });
            let body = record.select(&params.fields, params.base64);
            answer(StatusCode::CREATED, body)
        }
        Err(failed) => failure(failed),
    }
}

/// A submission by its Judge0 token: `None` when there is no such submission.
async fn fetch(gw: &Gateway, token: &str) -> Result<Option<Record>, GatewayError> {
    let Some((native, facts)) = submission::parse_token(token) else {
        return Ok(None);
    };
    let snapshot = gw.snapshot();
    let runtime =
        languages::by_id(facts.language_id).and_then(|e| languages::resolve(&snapshot, e));
    let echo = Map::from_iter([(
        "redirect_stderr_to_stdout".to_string(),
        Value::Bool(facts.redirect),
    )]);
    let facts_of = |status, outcome, created_at_ms, finished_at_ms| Facts {
        token: Some(token.to_string()),
        language: runtime.as_ref(),
        language_id: facts.language_id,
        echo: Some(&echo),
        status,
        outcome,
        created_at_ms,
        finished_at_ms,
    };
    let stored = match crate::submissions::poll(gw, native).await {
        Ok(stored) => stored,
        // The node that kept it is gone: Judge0 has no such state, its clients know an
        // internal error as final.
        Err(GatewayError::NodeLost { reason, .. }) => {
            let message = format!("node_lost: {reason}");
            let outcome = submission::Outcome::failed(submission::INTERNAL_ERROR, message);
            let status = submission::INTERNAL_ERROR;
            return Ok(Some(submission::record(facts_of(
                status,
                Some(outcome),
                None,
                None,
            ))));
        }
        Err(GatewayError::NotFound(_)) => return Ok(None),
        Err(GatewayError::Agent { problem, .. }) if problem.code == ErrorCode::NotFound => {
            return Ok(None)
        }
        Err(failed) => return Err(failed),
    };
    let (status, outcome) = submission::stored(&stored, facts);
    Ok(Some(submission::record(facts_of(
        status,
        outcome,
        Some(stored.created_at_ms),
        stored.finished_at_ms,
    ))))
}

pub(crate) async fn show(
    State(gw): State<Arc<Gateway>>,
    Path(token): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let params = match Params::of(&query) {
        Ok(params) => params,
        Err(response) => return *response,
    };
    match fetch(&gw, &token).await {
        Ok(Some(record)) => answer(StatusCode::OK, record.select(&params.fields, params.base64)),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no submission {token:?}")),
        Err(failed) => failure(failed),
    }
}

/// Judge0's batch-size rule, for both batch routes.
fn batch_size(n: usize) -> Result<(), Box<Response>> {
    match n {
        0 => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "there should be at least one submission in a batch",
        ))),
        n if n > submission::MAX_BATCH => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            format!(
                "number of submissions in a batch should be less than or equal to {}",
                submission::MAX_BATCH
            ),
        ))),
        _ => Ok(()),
    }
}

pub(crate) async fn get_batch(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let params = match Params::of(&query) {
        Ok(params) => params,
        Err(response) => return *response,
    };
    let tokens = headers
        .get("tokens")
        .and_then(|v| v.to_str().ok())
        .or(query.get("tokens").map(String::as_str))
        .unwrap_or_default();
    let tokens: Vec<&str> = tokens.trim().split(',').filter(|t| !t.is_empty()).collect();
    if let Err(response) = batch_size(tokens.len()) {
        return *response;
    }
    let found = join_all(tokens.iter().map(|t| fetch(&gw, t))).await;
    let mut submissions = Vec::with_capacity(found.len());
    for result in found {
        match result {
            Ok(record) => {
                let selected = record.map(|r| r.select(&params.fields, params.base64));
                submissions.push(selected.unwrap_or(Value::Null));
            }
            Err(failed) => return failure(failed),
        }
    }
    answer(StatusCode::OK, json!({"submissions": submissions}))
}

pub(crate) async fn post_batch(
    State(gw): State<Arc<Gateway>>,
    Query(query): Query<HashMap<String, String>>,
    request: Request,
) -> Response {
    let base64 = query.get("base64_encoded").is_some_and(|v| v == "true");
    let body = match read_object(&gw, request).await {
        Ok(body) => body,
        Err(response) => return *response,
    };
    let Some(Value::Array(entries)) = body.get("submissions") else {
        return error(
            StatusCode::BAD_REQUEST,
            "there should be at least one submission in a batch",
        );
    };
    if let Err(response) = batch_size(entries.len()) {
        return *response;
    }
    let one = |entry: &Value| {
        let gw = &gw;
        let entry = entry.as_object().cloned().unwrap_or_default();
        async move {
            let (checked, runtime) = prepare(gw, &entry, base64).map_err(|r| *r)?;
            let native = Native::of(&checked, &runtime);
            submit(gw, &checked, &native).await.map_err(failure)
        }
    };
    let results = join_all(entries.iter().map(one)).await;
    let mut answers = Vec::with_capacity(results.len());
    let mut created = false;
    for result in results {
        match result {
            Ok(token) => {
                created = true;
                answers.push(json!({"token": token}));
            }
            // A full fleet refuses the whole batch, as Judge0's full queue does.
            Err(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                return response
            }
            Err(response) => answers.push(entry_errors(response).await),
        }
    }
    let status = match created {
        true => StatusCode::CREATED,
        false => StatusCode::UNPROCESSABLE_ENTITY,
    };
    answer(status, Value::Array(answers))
}

/// The body of one entry's refusal, for its place in a batch answer.
async fn entry_errors(response: Response) -> Value {
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    serde_json::from_slice(&body).unwrap_or(Value::Null)
}

pub(crate) async fn languages(State(gw): State<Arc<Gateway>>) -> Response {
    answer(StatusCode::OK, languages::list(&gw.snapshot()))
}

pub(crate) async fn language(State(gw): State<Arc<Gateway>>, Path(id): Path<String>) -> Response {
    let snapshot = gw.snapshot();
    let found = id
        .parse()
        .ok()
        .and_then(languages::by_id)
        .and_then(|entry| languages::resolve(&snapshot, entry));
    match found {
        Some(runtime) => answer(StatusCode::OK, languages::show(&runtime)),
        None => error(StatusCode::NOT_FOUND, format!("no language with id {id:?}")),
    }
}

pub(crate) async fn statuses() -> Response {
    let all: Vec<Value> = (1..=14).map(submission::status_json).collect();
    answer(StatusCode::OK, Value::Array(all))
}

pub(crate) async fn about() -> Response {
    answer(
        StatusCode::OK,
        json!({
            "version": JUDGE0_VERSION,
            "homepage": "https://github.com/codefleet",
            "source_code": "codefleet's gateway, Judge0 CE compatible API",
            "maintainer": "codefleet",
        }),
    )
}

/// The slots of the ready nodes: all of them, and those busy.
fn fleet_slots(gw: &Gateway) -> (u32, u32) {
    gw.nodes()
        .iter()
        .filter(|n| n.state == NodeState::Ready)
        .fold((0, 0), |(total, busy), n| {
            (total + n.slots_total, busy + n.slots_busy)
        })
}

pub(crate) async fn config_info(State(gw): State<Arc<Gateway>>) -> Response {
    let config = gw.config();
    let (default, max) = (ResolvedLimits::DEFAULT, config.max_limits());
    let seconds = |ms: u64| ms as f64 / 1000.0;
    let queue = config
        .queue_length
        .unwrap_or_else(|| 4 * fleet_slots(&gw).0);
    answer(
        StatusCode::OK,
        json!({
            "maintenance_mode": false,
            "enable_wait_result": true,
            "enable_compiler_options": false,
            "allowed_languages_for_compile_options": [],
            "enable_command_line_arguments": true,
            "enable_submission_delete": false,
            "enable_callbacks": false,
            "callbacks_max_tries": 0,
            "callbacks_timeout": 0.0,
            "enable_additional_files": true,
            "max_queue_size": queue,
            "cpu_time_limit": seconds(default.cpu_time_ms),
            "max_cpu_time_limit": seconds(max.cpu_time_ms),
            "cpu_extra_time": 0.0,
            "max_cpu_extra_time": submission::MAX_CPU_EXTRA_TIME_S,
            "wall_time_limit": seconds(default.wall_time_ms),
            "max_wall_time_limit": seconds(max.wall_time_ms),
            "memory_limit": default.memory_bytes / 1024,
            "max_memory_limit": max.memory_bytes / 1024,
            "stack_limit": submission::DEFAULT_STACK_KB,
            "max_stack_limit": submission::MAX_STACK_KB,
            "max_processes_and_or_threads": default.processes,
            "max_max_processes_and_or_threads": max.processes,
            "enable_per_process_and_thread_time_limit": false,
            "allow_enable_per_process_and_thread_time_limit": false,
            "enable_per_process_and_thread_memory_limit": false,
            "allow_enable_per_process_and_thread_memory_limit": false,
            "max_file_size": default.file_size_bytes / 1024,
            "max_max_file_size": max.file_size_bytes / 1024,
            "number_of_runs": 1,
            "max_number_of_runs": submission::MAX_NUMBER_OF_RUNS,
            "redirect_stderr_to_stdout": false,
            "max_extract_size": max_extract(&gw) / 1024,
            "enable_batched_submissions": true,
            "max_submission_batch_size": submission::MAX_BATCH,
            "submission_cache_duration": 0.0,
            "use_docs_as_homepage": false,
            "allow_enable_network": false,
            "enable_network": false,
        }),
    )
}

/// Judge0's one queue, as the fleet: its jobs waiting at this gateway, and the ready nodes'
/// slots as workers.
pub(crate) async fn workers(State(gw): State<Arc<Gateway>>) -> Response {
    let (total, busy) = fleet_slots(&gw);
    let waiting = gw.waiting.load(std::sync::atomic::Ordering::Relaxed);
    answer(
        StatusCode::OK,
        json!([{
            "queue": JUDGE0_VERSION,
            "size": waiting,
            "available": total,
            "idle": total.saturating_sub(busy),
            "working": busy,
            "paused": 0,
            "failed": 0,
        }]),
    )
}
