//! The HTTP endpoints: the router and one handler per route. Each handler decodes its request
//! into checked values at the edge (or answers with a problem) and then acts on those.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use codefleet_http_edge::Disconnect;
use codefleet_shared::cluster::{CapacityReport, NodeState};
use codefleet_shared::ids::SessionId;
use codefleet_shared::stream::wants_stream;
use codefleet_shared::validate::{check_args, check_outputs, job_files, resolve_limits};
use codefleet_shared::{
    CreateSession, ErrorCode, ExecuteRequest, ExecuteResponse, LanguageInfo, Limits, Problem,
    ResolvedLimits, SessionInfo,
};
use serde_json::json;

use crate::dispatch::{call_bound, job_timeout, place, stream_bound, Delivery, Job, Placed, Reply};
use crate::edge::{self, Held, JsonBody};
use crate::error::{problem_response, GatewayError};
use crate::judge0 as j0;
use crate::membership::{NodeHandle, Snapshot};
use crate::metrics::{self, LanguageLabel};
use crate::routing::{program_affinity, NodeId};
use crate::stream::{self, StreamLimits};
use crate::submissions as subs;
use crate::{connect, piston, Gateway};

/// The OpenAPI description of docs/api.md, checked in beside the crate.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// The gateway's routes. Tests call it with `tower::ServiceExt::oneshot`.
pub fn router(gw: Arc<Gateway>) -> Router {
    let public = Router::new()
        .route("/v1/execute", post(execute))
        .route("/v1/judge", post(crate::judge::judge))
        .route("/v1/batch", post(crate::batch::batch))
        .route("/v1/connect", get(connect::connect))
        .route("/v1/languages", get(languages))
        .route("/v1/sessions", post(create_session))
        .route("/v1/sessions/{id}/execute", post(session_execute))
        .route("/v1/sessions/{id}", delete(delete_session))
        .route("/v1/submissions", post(subs::create))
        .route("/v1/submissions/{token}", get(subs::get))
        .route("/v1/submissions/{token}", delete(subs::cancel))
        .route_layer(from_fn_with_state(Arc::clone(&gw), edge::client_auth));
    let admin = Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{id}/drain", post(drain_node))
        .route("/v1/nodes/{id}", delete(remove_node))
        .route_layer(from_fn_with_state(Arc::clone(&gw), edge::admin_auth));
    // Judge0 CE's API, translated to the native one (see `judge0`).
    let judge0 = Router::new()
        .route("/submissions", post(j0::create))
        .route(
            "/submissions/batch",
            post(j0::post_batch).get(j0::get_batch),
        )
        .route("/submissions/{token}", get(j0::show))
        .route("/languages", get(j0::languages))
        .route("/languages/{id}", get(j0::language))
        .route("/statuses", get(j0::statuses))
        .route("/about", get(j0::about))
        .route("/config_info", get(j0::config_info))
        .route("/workers", get(j0::workers))
        .route_layer(from_fn_with_state(Arc::clone(&gw), j0::auth));
    // Piston v2's API (`crate::piston`), its own auth: Piston's `Authorization` carries the key.
    let piston = Router::new()
        .route("/api/v2/runtimes", get(piston::runtimes))
        .route("/api/v2/execute", post(piston::execute))
        .route("/api/v2/connect", get(piston::connect))
        .route("/api/v2/packages", get(piston::packages))
        .route("/api/v2/packages", post(piston::install))
        .route("/api/v2/packages", delete(piston::uninstall))
        .route_layer(from_fn_with_state(Arc::clone(&gw), piston::auth));
    let internal = Router::new()
        .route("/v1/internal/reports", post(report))
        .route_layer(from_fn_with_state(Arc::clone(&gw), edge::cluster_auth));
    Router::new()
        .merge(public)
        .merge(admin)
        .merge(internal)
        .merge(judge0)
        .merge(piston)
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(from_fn(metrics::track))
        .with_state(gw)
}

/// Name given to a lone `source` while checking it; the agent names it for the language.
const PLACEHOLDER_FILE_NAME: &str = "main";

/// The input rules an agent would apply, checked here so bad input never leaves the gateway.
/// Returns the limits the job will run with.
pub(crate) fn check_job(
    gw: &Gateway,
    request: &ExecuteRequest,
) -> Result<ResolvedLimits, GatewayError> {
    let files = request.files.as_deref();
    job_files(request.source.as_deref(), files, PLACEHOLDER_FILE_NAME)
        .map_err(GatewayError::Invalid)?;
    check_args(request.args.as_deref().unwrap_or_default()).map_err(GatewayError::Invalid)?;
    if let Some(outputs) = &request.outputs {
        check_outputs(outputs).map_err(GatewayError::Invalid)?;
    }
    check_limits(gw, request.limits.as_ref())
}

fn check_limits(gw: &Gateway, limits: Option<&Limits>) -> Result<ResolvedLimits, GatewayError> {
    let max = gw.config().max_limits();
    resolve_limits(limits, &ResolvedLimits::DEFAULT, &max).map_err(GatewayError::Invalid)
}

/// The runtime a request's language and version prefix name, and its id.
pub(crate) fn resolve_language<'s>(
    snapshot: &'s Snapshot,
    language: Option<&str>,
    version: Option<&str>,
) -> Result<(&'s LanguageInfo, &'s str), GatewayError> {
    let language = language
        .filter(|l| !l.is_empty())
        .ok_or_else(|| GatewayError::invalid("`language` is required"))?;
    if snapshot.catalog.is_empty() {
        // No agent has reported yet: nothing is known, so nothing is unknown either.
        metrics::rejection("language_unavailable");
        return Err(GatewayError::LanguageUnavailable {
            language: language.to_string(),
        });
    }
    snapshot.catalog.resolve_runtime(language, version)
}

/// Tags the answer with the canonical language for the request metrics.
pub(crate) fn labelled(
    language: Option<String>,
    result: Result<Response, GatewayError>,
) -> Response {
    let mut response = result.into_response();
    if let Some(language) = language {
        response.extensions_mut().insert(LanguageLabel(language));
    }
    response
}

/// An agent's execute answer, completed with where and how it ran (`stream::Relay` adds the
/// same to a streamed result).
pub(crate) fn execute_answer(
    reply: Reply,
    node: &NodeId,
    attempts: u32,
    waited: Duration,
) -> Result<ExecuteResponse, GatewayError> {
    let body = reply.expect(StatusCode::OK, node)?;
    let mut answer: ExecuteResponse =
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadAnswer {
            node: node.to_string(),
            detail: format!("not an execute response: {e}"),
        })?;
    let waited = waited.as_millis() as u64;
    answer.node = node.to_string();
    answer.attempts = Some(attempts);
    answer.timing.queued_ms += waited;
    answer.timing.total_ms += waited;
    Ok(answer)
}

/// How an execute request wants its answer, and what a streamed one holds on to.
pub(crate) struct Answering {
    pub stream: bool,
    pub disconnect: Option<Disconnect>,
    pub held: Option<Held>,
}

impl Answering {
    pub(crate) fn of(
        headers: &HeaderMap,
        disconnect: Option<Extension<Disconnect>>,
        held: Option<Extension<Held>>,
    ) -> Answering {
        let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
        Answering {
            stream: wants_stream(accept),
            disconnect: disconnect.map(|Extension(d)| d),
            held: held.map(|Extension(h)| h),
        }
    }

    pub(crate) fn delivery(&self) -> Delivery {
        match self.stream {
            true => Delivery::Stream,
            false => Delivery::Buffered,
        }
    }
}

pub(crate) fn stream_limits(gw: &Gateway) -> StreamLimits {
    StreamLimits {
        stall: gw.config().stream_stall(),
        max_line: gw.config().max_event_bytes(),
    }
}

async fn execute(
    State(gw): State<Arc<Gateway>>,
    headers: HeaderMap,
    disconnect: Option<Extension<Disconnect>>,
    held: Option<Extension<Held>>,
    body: JsonBody<ExecuteRequest>,
) -> Response {
    let mut language = None;
    let answering = Answering::of(&headers, disconnect, held);
    let result = run_execute(&gw, body, answering, &mut language).await;
    labelled(language, result)
}

async fn run_execute(
    gw: &Gateway,
    JsonBody {
        value: request,
        raw,
    }: JsonBody<ExecuteRequest>,
    answering: Answering,
    label: &mut Option<String>,
) -> Result<Response, GatewayError> {
    let placed = place_execute(gw, &request, raw, answering.delivery(), label).await?;
    if answering.stream {
        return stream::respond(
            placed,
            stream::Events::Job,
            stream_limits(gw),
            answering.disconnect,
            answering.held,
        );
    }
    let answer = execute_answer(placed.reply, &placed.node, placed.attempts, placed.waited)?;
    Ok(Json(answer).into_response())
}

/// Checks an execute request (`raw` its body as it came) and places it on a node. A buffered
/// job of a compiled language goes by its program's affinity, to the node that has it compiled.
pub(crate) async fn place_execute(
    gw: &Gateway,
    request: &ExecuteRequest,
    raw: Bytes,
    delivery: Delivery,
    label: &mut Option<String>,
) -> Result<Placed, GatewayError> {
    let snapshot = gw.snapshot();
    let version = request.version.as_deref().filter(|v| !v.is_empty());
    let limits = check_job(gw, request)?;
    let (info, runtime) = resolve_language(&snapshot, request.language.as_deref(), version)?;
    *label = Some(info.name.clone());
    let cached = info.compiled && delivery == Delivery::Buffered;
    let job = Job {
        language: &info.name,
        version,
        runtime: Some(runtime),
        path: "/v1/execute",
        body: raw,
        timeout: job_timeout(&limits, gw.config().dispatch_margin()),
        delivery,
        affinity: cached.then(|| program_affinity(&info.name, request)),
    };
    place(gw, job).await
}

async fn languages(State(gw): State<Arc<Gateway>>) -> Json<Vec<LanguageInfo>> {
    Json(gw.snapshot().catalog.languages().cloned().collect())
}

async fn create_session(State(gw): State<Arc<Gateway>>, body: JsonBody<CreateSession>) -> Response {
    let mut language = None;
    let result = run_create_session(&gw, body, &mut language).await;
    labelled(language, result)
}

async fn run_create_session(
    gw: &Gateway,
    JsonBody {
        value: request,
        raw,
    }: JsonBody<CreateSession>,
    label: &mut Option<String>,
) -> Result<Response, GatewayError> {
    let snapshot = gw.snapshot();
    let version = request.version.as_deref().filter(|v| !v.is_empty());
    let limits = check_limits(gw, request.limits.as_ref())?;
    let (info, runtime) = resolve_language(&snapshot, request.language.as_deref(), version)?;
    *label = Some(info.name.clone());
    let job = Job {
        language: &info.name,
        version,
        runtime: Some(runtime),
        path: "/v1/sessions",
        body: raw,
        timeout: job_timeout(&limits, gw.config().dispatch_margin()),
        delivery: Delivery::Buffered,
        affinity: None,
    };
    let placed = place(gw, job).await?;
    let body = placed.reply.expect(StatusCode::CREATED, &placed.node)?;
    let session: SessionInfo =
        serde_json::from_slice(&body).map_err(|e| GatewayError::BadAnswer {
            node: placed.node.to_string(),
            detail: format!("not a session: {e}"),
        })?;
    Ok((StatusCode::CREATED, Json(session)).into_response())
}

/// Why a session's execute may not name a language: the agent's answer too.
const FIXED_LANGUAGE: &str =
    "a session's language is fixed when it is created; leave out `language` and `version`";

/// The node holding a session: agents make ids `se_<hex>.<node id>` (`SessionId`).
fn session_node(gw: &Gateway, id: &str) -> Result<Arc<NodeHandle>, GatewayError> {
    let unknown = || GatewayError::NotFound(format!("no session {id:?}"));
    let session = SessionId::parse(id).map_err(|_| unknown())?;
    let node = session.node.as_str();
    let (handle, state) = gw.node(node).ok_or_else(unknown)?;
    if state == NodeState::Down {
        return Err(GatewayError::NodeLost {
            node: node.to_string(),
            reason: "the node holding the session is down".to_string(),
        });
    }
    Ok(handle)
}

async fn session_execute(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    disconnect: Option<Extension<Disconnect>>,
    held: Option<Extension<Held>>,
    JsonBody {
        value: request,
        raw,
    }: JsonBody<ExecuteRequest>,
) -> Result<Response, GatewayError> {
    if request.language.is_some() || request.version.is_some() {
        return Err(GatewayError::invalid(FIXED_LANGUAGE));
    }
    let limits = check_job(&gw, &request)?;
    let node = session_node(&gw, &id)?;
    let path = format!("/v1/sessions/{id}/execute");
    let timeout = job_timeout(&limits, gw.config().dispatch_margin());
    let answering = Answering::of(&headers, disconnect, held);
    if answering.stream {
        let placed = stream_bound(&gw, &node, &path, raw, timeout).await?;
        let limits = stream_limits(&gw);
        let events = stream::Events::Job;
        return stream::respond(placed, events, limits, answering.disconnect, answering.held);
    }
    let reply = call_bound(&gw, &node, Method::POST, &path, Some(raw), timeout).await?;
    let answer = execute_answer(reply, &node.id, 1, Duration::ZERO)?;
    Ok(Json(answer).into_response())
}

async fn delete_session(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> Result<StatusCode, GatewayError> {
    let node = session_node(&gw, &id)?;
    let path = format!("/v1/sessions/{id}");
    let timeout = gw.config().dispatch_margin();
    let reply = call_bound(&gw, &node, Method::DELETE, &path, None, timeout).await?;
    reply.expect(StatusCode::NO_CONTENT, &node.id)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_nodes(State(gw): State<Arc<Gateway>>) -> Response {
    Json(gw.nodes()).into_response()
}

async fn drain_node(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> Result<Response, GatewayError> {
    let node = gw.drain(&id)?;
    tracing::info!(node = %node.id, "draining node");
    // Best effort: also ask the agent to drain itself, so other gateways stop sending work.
    let agent = Arc::clone(&gw);
    tokio::spawn(async move {
        let timeout = Duration::from_secs(5);
        let told = agent
            .dispatcher
            .call(&node, Method::POST, "/v1/drain", None, timeout)
            .await;
        match told {
            Ok(reply) if reply.status.is_success() => {}
            Ok(reply) => {
                tracing::info!(node = %node.id, status = %reply.status, "agent did not take the drain")
            }
            Err(error) => {
                tracing::info!(node = %node.id, %error, "could not tell the agent to drain")
            }
        }
    });
    let info = gw.nodes().into_iter().find(|n| n.id == id);
    Ok((StatusCode::ACCEPTED, Json(info)).into_response())
}

async fn remove_node(
    State(gw): State<Arc<Gateway>>,
    Path(id): Path<String>,
) -> Result<StatusCode, GatewayError> {
    gw.remove(&id)?;
    tracing::info!(node = %id, "node removed");
    Ok(StatusCode::NO_CONTENT)
}

async fn report(
    State(gw): State<Arc<Gateway>>,
    JsonBody { value, .. }: JsonBody<CapacityReport>,
) -> Result<Json<serde_json::Value>, GatewayError> {
    gw.report(value, Instant::now())?;
    Ok(Json(json!({})))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(gw): State<Arc<Gateway>>) -> Response {
    match gw.snapshot().ready_nodes {
        // Answered without logging: probes ask every few seconds.
        0 => problem_response(Problem::new(ErrorCode::NoCapacity, "no node is ready yet")),
        n => Json(json!({"status": "ready", "nodes_ready": n})).into_response(),
    }
}

async fn metrics_text(State(gw): State<Arc<Gateway>>) -> Response {
    let content_type = "text/plain; version=0.0.4; charset=utf-8";
    metrics::fleet(&gw.nodes());
    ([(header::CONTENT_TYPE, content_type)], gw.metrics.render()).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    if uri.path().starts_with("/api/v2/") {
        return piston::not_found();
    }
    GatewayError::NotFound(format!("no route {method} {}", uri.path())).into_response()
}

async fn method_not_allowed() -> GatewayError {
    GatewayError::MethodNotAllowed
}
