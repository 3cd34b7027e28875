//! The agent's HTTP API: decode and validate at the edge, call the agent, answer JSON or
//! problem+json. Routes: docs/api.md's execute, languages and sessions, plus `/v1/capacity`,
//! `/v1/drain`, `/healthz`, `/readyz` and `/metrics`.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

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
use codefleet_shared::cluster::QUEUE_WAIT_HEADER;
use codefleet_shared::validate::json_depth;
use codefleet_shared::{CreateSession, ErrorCode, ExecuteRequest, Problem};

use crate::agent::Agent;

/// A problem as an HTTP answer.
pub struct ApiError(pub Problem);

impl From<Problem> for ApiError {
    fn from(p: Problem) -> ApiError {
        ApiError(p)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        problem_response(&self.0)
    }
}

/// A problem as an `application/problem+json` answer (the shared edge's mapping).
pub fn problem_response(p: &Problem) -> Response {
    codefleet_http_edge::problem_response(p)
}

pub fn router(agent: Arc<Agent>) -> Router {
    let v1 = Router::new()
        .route("/v1/execute", post(execute))
        .route("/v1/languages", get(languages))
        .route("/v1/capacity", get(capacity))
        .route("/v1/drain", post(drain))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}/execute", post(session_execute))
        .route("/v1/sessions/{id}", delete(delete_session))
        .route_layer(middleware::from_fn_with_state(agent.clone(), authorize));
    Router::new()
        .merge(v1)
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .fallback(|| async { ApiError(Problem::new(ErrorCode::NotFound, "no such route")) })
        .method_not_allowed_fallback(|| async {
            ApiError(Problem::new(
                ErrorCode::MethodNotAllowed,
                "method not allowed on this route",
            ))
        })
        .with_state(agent)
}

async fn authorize(State(agent): State<Arc<Agent>>, req: Request, next: Next) -> Response {
    if let Some(token) = &agent.config.cluster_token {
        if !bearer_matches(req.headers(), token) {
            return ApiError(Problem::new(
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
async fn read_json<T: DeserializeOwned>(agent: &Agent, request: Request) -> Result<T, Problem> {
    codefleet_http_edge::require_json(request.headers())?;
    let (parts, body) = request.into_parts();
    let bytes = codefleet_http_edge::read_body(&parts.headers, body, agent.config.max_body_bytes)
        .await
        .map_err(|e| e.problem())?;
    let depth = json_depth(&bytes);
    if depth > agent.config.max_json_depth {
        return Err(Problem::new(
            ErrorCode::InvalidRequest,
            format!(
                "JSON nested {depth} deep; at most {} is accepted",
                agent.config.max_json_depth
            ),
        ));
    }
    let Object(value) = serde_json::from_slice(&bytes)
        .map_err(|e| Problem::new(ErrorCode::InvalidRequest, format!("invalid JSON body: {e}")))?;
    Ok(value)
}

async fn execute(State(agent): State<Arc<Agent>>, request: Request) -> Result<Response, ApiError> {
    let received = Instant::now();
    let wait = queue_wait(request.headers());
    let request_id = request_id(&request);
    let req: ExecuteRequest = read_json(&agent, request).await?;
    let prepared = agent.prepare(&req, None)?;
    let span =
        tracing::info_span!("execute", node = %agent.node(), language = %prepared.language.name);
    let mut response = agent
        .execute(prepared, received, wait)
        .instrument(span)
        .await?;
    response.request_id = request_id;
    Ok(Json(response).into_response())
}

/// The id the edge gave the request (`None` when the router is called without the edge).
fn request_id(request: &Request) -> Option<String> {
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
    agent.draining.store(true, Ordering::SeqCst);
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
    let received = Instant::now();
    let wait = queue_wait(request.headers());
    let request_id = request_id(&request);
    let req: ExecuteRequest = read_json(&agent, request).await?;
    if req.language.is_some() || req.version.is_some() {
        return Err(Problem::new(
            ErrorCode::InvalidRequest,
            "a session's language is fixed when it is created; leave out `language` and `version`",
        )
        .into());
    }
    let span = tracing::info_span!("session_execute", node = %agent.node(), session = %id);
    let mut response = agent
        .session_execute(&id, req, received, wait)
        .instrument(span)
        .await?;
    response.request_id = request_id;
    Ok(Json(response).into_response())
}

async fn delete_session(
    State(agent): State<Arc<Agent>>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    agent.delete_session(&id).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn readyz(State(agent): State<Arc<Agent>>) -> Response {
    if agent.is_ready() {
        "ready".into_response()
    } else {
        let why = if !agent.docker_ok.load(Ordering::SeqCst) {
            "docker is unreachable"
        } else if agent.draining.load(Ordering::SeqCst) {
            "draining"
        } else {
            "starting"
        };
        ApiError(Problem::new(ErrorCode::NoCapacity, why)).into_response()
    }
}

async fn metrics_text() -> Response {
    let text = crate::telemetry::prometheus().render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}
