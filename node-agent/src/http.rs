//! The agent's HTTP API: decode and validate at the edge, call the agent, answer JSON,
//! an NDJSON stream (`Accept: application/x-ndjson`) or problem+json; errors become answers in
//! one place (`ApiError`). Routes: docs/api.md's execute, connect (WebSocket, in `connect`),
//! languages, sessions and submissions (`submissions::http`), plus `/v1/capacity`, `/v1/drain`, `/healthz`, `/readyz` and
//! `/metrics`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use tracing::Instrument;

use codefleet_shared::api::object_only::Object;
use codefleet_shared::auth;
use codefleet_shared::cluster::{NOT_STARTED_HEADER, QUEUE_WAIT_HEADER};
use codefleet_shared::judge::{JudgeEvent, JudgeRequest};
use codefleet_shared::stream::{wants_stream, NDJSON};
use codefleet_shared::validate::json_depth;
use codefleet_shared::{CreateSession, ErrorCode, ExecuteRequest, Problem};

use crate::agent::{Agent, Streaming};
use crate::error::AgentError;
use crate::job::Prepared;
use crate::runner::{Target, Ticket};
use crate::submissions::http as subs;

/// An error as an HTTP answer: the one place the agent's errors become problem+json. A node's
/// error for a job that certainly did not start says so (`x-codefleet-not-started: true`), so
/// a gateway may send the job to another node.
pub struct ApiError(pub AgentError);

impl From<Problem> for ApiError {
    fn from(p: Problem) -> ApiError {
        ApiError(p.into())
    }
}

impl From<AgentError> for ApiError {
    fn from(e: AgentError) -> ApiError {
        ApiError(e)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = problem_response(&self.0.problem);
        if self.0.retry_elsewhere() {
            response
                .headers_mut()
                .insert(NOT_STARTED_HEADER, header::HeaderValue::from_static("true"));
        }
        response
    }
}

/// A problem as an `application/problem+json` answer (the shared edge's mapping).
pub fn problem_response(p: &Problem) -> Response {
    codefleet_http_edge::problem_response(p)
}

pub fn router(agent: Arc<Agent>) -> Router {
    let v1 = Router::new()
        .route("/v1/execute", post(execute))
        .route("/v1/judge", post(judge))
        .route("/v1/connect", get(crate::connect::connect))
        .route("/v1/languages", get(languages))
        .route("/v1/capacity", get(capacity))
        .route("/v1/drain", post(drain))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}/execute", post(session_execute))
        .route("/v1/sessions/{id}", delete(delete_session))
        .route("/v1/submissions", post(subs::create))
        .route("/v1/submissions/{token}", get(subs::get))
        .route("/v1/submissions/{token}", delete(subs::cancel))
        .route_layer(middleware::from_fn_with_state(agent.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError::from(Problem::new(ErrorCode::NotFound, "no such route")) })
        .method_not_allowed_fallback(|| async {
            ApiError::from(Problem::new(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route",
            ))
        })
        .with_state(agent)
}

async fn authorize(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    if let Some(token) = &agent.config().cluster_token {
        if !bearer_matches(req.headers(), token) {
            return ApiError::from(Problem::new(
                ErrorCode::Unauthorized,
                "missing or wrong cluster token",
            ))
            .into_response();
        }
    }
    next.run(req).await
}

/// Whether the request carries `Authorization: Bearer <expected>`.
pub fn bearer_matches(headers: &HeaderMap, expected: &str) -> bool {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(auth::bearer_token)
        .is_some_and(|got| auth::secrets_equal(got, expected))
}

/// Reads a JSON body: declared `application/json` (415), within the size (413), time (408,
/// the shared edge's body deadline) and depth limits.
pub(crate) async fn read_json<T: DeserializeOwned>(
    agent: &Agent,
    request: Request,
) -> Result<T, Problem> {
    codefleet_http_edge::require_json(request.headers())?;
    let (parts, body) = request.into_parts();
    let bytes = codefleet_http_edge::read_body(&parts.headers, body, agent.config().max_body_bytes)
        .await
        .map_err(|e| e.problem())?;
    parse_json(agent, &bytes)
}

/// A JSON object within the depth limit (a request body, a WebSocket's first message).
pub fn parse_json<T: DeserializeOwned>(agent: &Agent, bytes: &[u8]) -> Result<T, Problem> {
    let depth = json_depth(bytes);
    let max = agent.config().max_json_depth;
    if depth > max {
        return Err(Problem::new(
            ErrorCode::InvalidRequest,
            format!("JSON nested {depth} deep; at most {max} is accepted"),
        ));
    }
    let Object(value) = serde_json::from_slice(bytes)
        .map_err(|e| Problem::new(ErrorCode::InvalidRequest, format!("invalid JSON body: {e}")))?;
    Ok(value)
}

/// What an execute request asks beside its body: its arrival, id, queue wait, and whether it
/// wants the NDJSON stream.
struct Asked {
    received: Instant,
    request_id: Option<String>,
    wait: Option<Duration>,
    stream: bool,
    disconnect: Option<codefleet_http_edge::Disconnect>,
}

impl Asked {
    fn of(request: &Request) -> Asked {
        let accept = request
            .headers()
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok());
        Asked {
            received: Instant::now(),
            request_id: request_id(request),
            wait: queue_wait(request.headers()),
            stream: wants_stream(accept),
            disconnect: request
                .extensions()
                .get::<codefleet_http_edge::Disconnect>()
                .cloned(),
        }
    }
}

async fn execute(State(agent): State<Arc<Agent>>, request: Request) -> Result<Response, ApiError> {
    let asked = Asked::of(&request);
    let req: ExecuteRequest = read_json(&agent, request).await?;
    let prepared = agent.prepare(&req)?;
    let span =
        tracing::info_span!("execute", node = %agent.node(), language = %prepared.language.name);
    run(&agent, prepared, Target::Pool, asked)
        .instrument(span)
        .await
}

/// `POST /v1/judge`: validated completely, then one slot; the buffered answer, or the NDJSON
/// stream of `JudgeEvent`s (`200` once the judge holds a slot).
async fn judge(State(agent): State<Arc<Agent>>, request: Request) -> Result<Response, ApiError> {
    let asked = Asked::of(&request);
    let req: JudgeRequest = read_json(&agent, request).await?;
    let prepared = agent.prepare_judge(&req)?;
    let span = tracing::info_span!("judge", node = %agent.node(), language = %prepared.program.language.name);
    let slot = agent.admit(asked.wait).instrument(span.clone()).await?;
    let ticket = Ticket::new(asked.received, asked.request_id);
    if !asked.stream {
        let answer = agent
            .judge(slot, &prepared, &ticket, None)
            .instrument(span)
            .await?;
        return Ok(Json(answer).into_response());
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<JudgeEvent>(STREAMED_TESTS);
    let stall = Duration::from_millis(agent.config().stream_stall_ms);
    tokio::spawn(
        async move {
            let last = match agent.judge(slot, &prepared, &ticket, Some(&tx)).await {
                Ok(answer) => JudgeEvent::Result {
                    result: Box::new(answer),
                },
                Err(e) => JudgeEvent::Error { error: e.problem },
            };
            let _ = tokio::time::timeout(stall, tx.send(last)).await;
        }
        .instrument(span),
    );
    let lines = futures_util::stream::unfold(rx, |mut rx| async move {
        let event = rx.recv().await?;
        Some((Ok::<_, Infallible>(bytes::Bytes::from(event.to_line())), rx))
    });
    Ok((
        [(header::CONTENT_TYPE, NDJSON)],
        axum::body::Body::from_stream(lines),
    )
        .into_response())
}

/// Events of a streamed judge waiting for its client at most.
const STREAMED_TESTS: usize = 16;

/// Runs a validated job and answers: the buffered JSON answer, or the NDJSON stream (`200` as
/// soon as the job holds a slot; refusals before that are problem+json as ever).
async fn run(
    agent: &Arc<Agent>,
    prepared: Prepared,
    target: Target,
    asked: Asked,
) -> Result<Response, ApiError> {
    let arrival = (asked.received, asked.request_id);
    if !asked.stream {
        let response = agent.execute(prepared, target, arrival, asked.wait).await?;
        return Ok(Json(response).into_response());
    }
    let streaming = agent
        .execute_streamed(prepared, target, arrival, asked.wait)
        .await?;
    Ok(ndjson(streaming, asked.disconnect))
}

/// Up to this many bytes of waiting events are joined into one chunk of an NDJSON answer.
const COALESCE_BYTES: usize = 64 * 1024;

/// The NDJSON answer of a streamed job: one event per line, as the runner gives them. When the
/// client stalled (its job was killed), its connection is closed: hyper alone would wait on a
/// socket that never drains.
fn ndjson(streaming: Streaming, disconnect: Option<codefleet_http_edge::Disconnect>) -> Response {
    let Streaming { events, task, .. } = streaming;
    tokio::spawn(async move {
        if task.await.unwrap_or(true) {
            if let Some(disconnect) = disconnect {
                disconnect.now();
            }
        }
    });
    // Events already waiting go out in one chunk with the first (a short job's last few come
    // together): one write and one wake-up of the reader instead of one per line.
    let lines = futures_util::stream::unfold(events, |mut events| async move {
        let mut chunk = events.recv().await?.to_line();
        while chunk.len() < COALESCE_BYTES {
            match events.try_recv() {
                Ok(event) => chunk.extend_from_slice(&event.to_line()),
                Err(_) => break,
            }
        }
        Some((Ok::<_, Infallible>(bytes::Bytes::from(chunk)), events))
    });
    (
        [(header::CONTENT_TYPE, NDJSON)],
        axum::body::Body::from_stream(lines),
    )
        .into_response()
}

/// The id the edge gave the request (`None` when the router is called without the edge).
pub fn request_id(request: &Request) -> Option<String> {
    let id = request
        .extensions()
        .get::<codefleet_http_edge::RequestId>()?;
    Some(id.as_str().to_string())
}

/// How long the caller lets the job queue for a slot (a gateway says what is left of its own
/// wait); `None` for the agent's own maximum.
fn queue_wait(headers: &HeaderMap) -> Option<std::time::Duration> {
    let ms = headers
        .get(QUEUE_WAIT_HEADER)?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    Some(std::time::Duration::from_millis(ms))
}

async fn languages(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.languages()).into_response()
}

async fn capacity(State(agent): State<Arc<Agent>>) -> Response {
    Json(agent.capacity()).into_response()
}

async fn drain(State(agent): State<Arc<Agent>>) -> Response {
    agent.lifecycle().drain();
    tracing::info!(node = %agent.node(), "draining: no new work");
    StatusCode::ACCEPTED.into_response()
}

async fn create_session(
    State(agent): State<Arc<Agent>>,
    request: Request,
) -> Result<Response, ApiError> {
    let req: CreateSession = read_json(&agent, request).await?;
    let info = agent.create_session(req).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn session_execute(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
    request: Request,
) -> Result<Response, ApiError> {
    let asked = Asked::of(&request);
    let req: ExecuteRequest = read_json(&agent, request).await?;
    if req.language.is_some() || req.version.is_some() {
        return Err(Problem::new(
            ErrorCode::InvalidRequest,
            "a session's language is fixed when it is created; leave out `language` and `version`",
        )
        .into());
    }
    let (prepared, target) = agent.prepare_in_session(&id, &req)?;
    let span = tracing::info_span!("session_execute", node = %agent.node(), session = %id);
    run(&agent, prepared, target, asked).instrument(span).await
}

async fn delete_session(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    agent.sessions().close(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    if agent.is_ready() {
        "ready".into_response()
    } else {
        let why = if !agent.lifecycle().docker_ok() {
            "docker is unreachable"
        } else if agent.lifecycle().draining() {
            "draining"
        } else {
            "starting"
        };
        ApiError::from(Problem::new(ErrorCode::NoCapacity, why)).into_response()
    }
}

async fn metrics_text() -> Response {
    let text = crate::telemetry::prometheus().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
