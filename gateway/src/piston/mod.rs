//! A Piston v2-compatible API under `/api/v2/`, so Piston's clients work against the gateway
//! unchanged: `GET /api/v2/runtimes`, `POST /api/v2/execute`, `GET /api/v2/connect` (Piston's
//! interactive WebSocket) and `/api/v2/packages`.
//!
//! A translation layer only: a Piston request is checked as Piston checks it (its order, its
//! messages, `{message}` bodies with its status codes), translated into the native execute
//! request, and run on the native job path (`dispatch::place`: the same routing, queue, retries,
//! quotas and node-lost handling as `/v1/execute`). The execute asks the agent for the NDJSON
//! stream and builds each stage's `stdout`, `stderr` and `output` from its `output` events, in
//! the order they came, so `output` interleaves the two streams as the supervisor read them.
//! The catalog's versions become semver (`semver`), its names Piston's (`translate`).
//! Auth: Piston's `Authorization` header carries an API key as it is (or as a Bearer token),
//! admitted with the key's quotas like a native request.

mod connect;
pub mod semver;
pub mod translate;
pub mod wire;

use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::BytesMut;
use codefleet_http_edge::BodyError;
use codefleet_shared::stream::{JobEvent, OutputStream};
use codefleet_shared::{ErrorCode, ExecuteResponse, Problem};
use serde_json::Value;

use crate::dispatch::{job_timeout, place, Delivery, Job, Placed, Upstream};
use crate::error::GatewayError;
use crate::handlers::{check_job, resolve_language};
use crate::membership::Snapshot;
use crate::metrics::{self, LanguageLabel};
use crate::Gateway;

pub use connect::connect;
use translate::{PistonRuntime, Streams, Translated};

/// An answer under `/api/v2/` that is not a success: Piston's `{"message": ...}` with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PistonError {
    pub status: StatusCode,
    pub message: String,
    /// The native problem's code, for the metrics (and `Retry-After` when it has one).
    code: Option<ErrorCode>,
    retry_after_s: Option<u64>,
}

impl PistonError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> PistonError {
        PistonError {
            status,
            message: message.into(),
            code: None,
            retry_after_s: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> PistonError {
        PistonError::new(StatusCode::BAD_REQUEST, message)
    }

    /// A native problem in Piston's shape: its status, its detail as the message.
    pub fn of_problem(problem: Problem) -> PistonError {
        PistonError {
            status: StatusCode::from_u16(problem.status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            message: problem.detail,
            code: Some(problem.code),
            retry_after_s: problem.retry_after_s,
        }
    }
}

impl From<GatewayError> for PistonError {
    fn from(error: GatewayError) -> PistonError {
        match error.fault() {
            crate::error::Fault::Caller => tracing::debug!(%error, "piston request refused"),
            _ => tracing::warn!(%error, "piston request failed"),
        }
        PistonError::of_problem(error.problem())
    }
}

impl IntoResponse for PistonError {
    fn into_response(self) -> Response {
        let body = wire::Message {
            message: self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        if let Some(code) = self.code {
            response.extensions_mut().insert(code);
        }
        response
            .extensions_mut()
            .insert(codefleet_http_edge::ForeignError);
        response
    }
}

/// Piston's answer for a path under `/api/v2/` that has no route.
pub fn not_found() -> Response {
    PistonError::new(StatusCode::NOT_FOUND, "Not Found").into_response()
}

/// Middleware for `/api/v2/*`: Piston's `Authorization` header holds the key itself (a
/// `Bearer` scheme is taken too); the key's quotas hold as for `/v1/*`.
pub async fn auth(State(gw): State<Arc<Gateway>>, request: Request, next: Next) -> Response {
    let token = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .map(|v| codefleet_shared::auth::bearer_token(v).unwrap_or(v.trim()));
    match gw.keys.admit_client(token, Instant::now()) {
        Ok(permit) => crate::edge::admitted(permit, request, next).await,
        Err(GatewayError::Unauthorized(_)) => PistonError {
            code: Some(ErrorCode::Unauthorized),
            ..PistonError::new(
                StatusCode::UNAUTHORIZED,
                "a valid API key is required in the Authorization header",
            )
        }
        .into_response(),
        Err(error) => PistonError::from(error).into_response(),
    }
}

/// A JSON body as Piston takes one: `Content-Type: application/json…` (415 with Piston's
/// message otherwise), at most `--max-body-bytes` (413), within `--body-timeout-ms` (408),
/// nested at most `--max-json-depth` deep, parsed as any JSON value (the handler checks it the
/// way Piston does).
pub struct PistonBody(pub Value);

impl FromRequest<Arc<Gateway>> for PistonBody {
    type Rejection = PistonError;

    async fn from_request(request: Request, gw: &Arc<Gateway>) -> Result<Self, PistonError> {
        let json = request
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/json"));
        if !json {
            metrics::rejection("unsupported_media_type");
            return Err(PistonError {
                code: Some(ErrorCode::UnsupportedMediaType),
                ..PistonError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "requests must be of type application/json",
                )
            });
        }
        let limit = gw.config().max_body_bytes;
        let (parts, body) = request.into_parts();
        let raw: Bytes = codefleet_http_edge::read_body(&parts.headers, body, limit)
            .await
            .map_err(|error| match error {
                BodyError::TooLarge { limit } => {
                    metrics::rejection("payload_too_large");
                    PistonError::of_problem(GatewayError::PayloadTooLarge { limit }.problem())
                }
                other => PistonError::of_problem(other.problem()),
            })?;
        let depth = codefleet_shared::validate::json_depth(&raw);
        let max_depth = gw.config().max_json_depth;
        if depth > max_depth {
            return Err(PistonError::bad_request(format!(
                "JSON nested {depth} deep; at most {max_depth} is accepted"
            )));
        }
        serde_json::from_slice(&raw)
            .map(PistonBody)
            .map_err(|e| PistonError::bad_request(format!("malformed JSON body: {e}")))
    }
}

/// The runtimes of `snapshot` as Piston lists them.
fn runtimes_of(snapshot: &Snapshot) -> Vec<PistonRuntime> {
    translate::runtimes(snapshot.catalog.languages())
}

/// `GET /api/v2/runtimes`.
pub async fn runtimes(State(gw): State<Arc<Gateway>>) -> Json<Vec<wire::Runtime>> {
    let runtimes = runtimes_of(&gw.snapshot());
    Json(runtimes.iter().map(PistonRuntime::wire).collect())
}

/// `GET /api/v2/packages`: every runtime's package, installed.
pub async fn packages(State(gw): State<Arc<Gateway>>) -> Json<Vec<wire::Package>> {
    Json(translate::packages(&runtimes_of(&gw.snapshot())))
}

/// `POST /api/v2/packages` and `DELETE /api/v2/packages`: the nodes' catalog decides what is
/// installed, so both are refused, 404 for a package there is not (Piston's answer), else 400.
async fn package_change(gw: &Gateway, body: &Value, what: &str) -> PistonError {
    let field = |name: &str| body.get(name).and_then(Value::as_str).unwrap_or_default();
    let (language, version) = (field("language"), field("version"));
    let runtimes = runtimes_of(&gw.snapshot());
    match translate::find_package(&runtimes, language, version) {
        None => PistonError::new(
            StatusCode::NOT_FOUND,
            format!("Requested package {language}-{version} does not exist"),
        ),
        Some(package) => PistonError::bad_request(format!(
            "packages are managed by the nodes' language catalog: {}-{} cannot be {what} \
             through this API",
            package.language, package.language_version
        )),
    }
}

pub async fn install(State(gw): State<Arc<Gateway>>, PistonBody(body): PistonBody) -> Response {
    package_change(&gw, &body, "installed")
        .await
        .into_response()
}

pub async fn uninstall(State(gw): State<Arc<Gateway>>, PistonBody(body): PistonBody) -> Response {
    package_change(&gw, &body, "uninstalled")
        .await
        .into_response()
}

/// A Piston body checked and translated against the current snapshot, with what placing it
/// needs: the native runtime it resolved to and the job's limits.
pub(crate) struct Prepared {
    pub translated: Translated,
    pub language: String,
    pub runtime_id: String,
    pub timeout: std::time::Duration,
    pub body: Bytes,
}

impl Prepared {
    /// The native job to place, for the agent's `path`.
    pub fn job(&self, path: &'static str, delivery: Delivery) -> Job<'_> {
        Job {
            language: &self.language,
            version: self.translated.native.version.as_deref(),
            runtime: Some(&self.runtime_id),
            path,
            body: self.body.clone(),
            timeout: self.timeout,
            delivery,
            // A stream is not served from the compile cache: no program affinity.
            affinity: None,
        }
    }
}

pub(crate) fn prepare(
    gw: &Gateway,
    body: &Value,
    interactive: bool,
) -> Result<Prepared, PistonError> {
    let snapshot = gw.snapshot();
    if snapshot.catalog.is_empty() {
        metrics::rejection("language_unavailable");
        return Err(PistonError::of_problem(Problem::new(
            ErrorCode::LanguageUnavailable,
            "no node has reported yet",
        )));
    }
    let runtimes = runtimes_of(&snapshot);
    let max = gw.config().max_limits();
    let translated = translate::translate(body, &runtimes, &max, interactive)
        .map_err(PistonError::bad_request)?;
    let native = &translated.native;
    let limits = check_job(gw, native)?;
    let (info, runtime_id) = resolve_language(
        &snapshot,
        native.language.as_deref(),
        native.version.as_deref(),
    )?;
    let body = serde_json::to_vec(native).expect("requests serialize");
    Ok(Prepared {
        language: info.name.clone(),
        runtime_id: runtime_id.to_string(),
        timeout: job_timeout(&limits, gw.config().dispatch_margin()),
        body: Bytes::from(body),
        translated,
    })
}

/// `POST /api/v2/execute`.
pub async fn execute(State(gw): State<Arc<Gateway>>, PistonBody(body): PistonBody) -> Response {
    let mut label = None;
    let result = run_execute(&gw, &body, &mut label).await;
    let mut response = match result {
        Ok(answer) => Json(answer).into_response(),
        Err(error) => error.into_response(),
    };
    if let Some(language) = label {
        response.extensions_mut().insert(LanguageLabel(language));
    }
    response
}

async fn run_execute(
    gw: &Gateway,
    body: &Value,
    label: &mut Option<String>,
) -> Result<wire::Answer, PistonError> {
    let prepared = prepare(gw, body, false)?;
    *label = Some(prepared.language.clone());
    let placed = place(gw, prepared.job("/v1/execute", Delivery::Stream)).await?;
    let (result, mut streams) = collect(placed, gw.config().max_event_bytes()).await?;
    let runtime = &prepared.translated.runtime;
    let mut stage = |result: &codefleet_shared::api::StageResult, name: &str| {
        let position = streams.iter().position(|(stage, _)| stage == name);
        let output = match position {
            Some(i) => streams.swap_remove(i).1,
            None => Streams::of_result(result),
        };
        translate::stage(result, output)
    };
    let compile = result.compile.as_ref().map(|c| stage(c, "compile"));
    // Piston answers a failed compile with the compile stage as `run` too (its "backward
    // compatibility when the run stage is not started"), and its clients read `run` always.
    let run = match (&result.run, &compile) {
        (Some(run), _) => stage(run, "run"),
        (None, Some(compile)) => compile.clone(),
        (None, None) => {
            return Err(PistonError::of_problem(Problem::new(
                ErrorCode::Internal,
                "the node's answer has neither a compile nor a run stage",
            )))
        }
    };
    Ok(wire::Answer {
        language: runtime.language.clone(),
        version: runtime.version.to_string(),
        run,
        compile,
    })
}

/// Reads a streamed job to its end: the `result`, and each stage's output events joined in the
/// order they came (stdout and stderr apart, and together).
async fn collect(
    placed: Placed,
    max_line: usize,
) -> Result<(ExecuteResponse, Vec<(String, Streams)>), PistonError> {
    let Placed {
        reply,
        node,
        inflight,
        ..
    } = placed;
    let lost = |reason: String| {
        PistonError::from(GatewayError::NodeLost {
            node: node.to_string(),
            reason,
        })
    };
    let bad = |detail: String| {
        PistonError::from(GatewayError::BadAnswer {
            node: node.to_string(),
            detail,
        })
    };
    let mut response = match reply.upstream {
        Some(Upstream::Lines(response)) => response,
        _ => {
            reply.expect(StatusCode::OK, &node)?;
            return Err(bad("a 200 without a stream".to_string()));
        }
    };
    let handle = Arc::clone(inflight.node());
    let mut streams: Vec<(String, Streams)> = Vec::new();
    let mut buffer = BytesMut::new();
    let mut scanned = 0;
    loop {
        while let Some(end) = buffer[scanned..].iter().position(|b| *b == b'\n') {
            let line = buffer.split_to(scanned + end + 1);
            scanned = 0;
            let line = &line[..line.len() - 1];
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let event: JobEvent = serde_json::from_slice(line)
                .map_err(|e| bad(format!("an event that is not one: {e}")))?;
            match event {
                JobEvent::Output {
                    stage,
                    stream,
                    data,
                    ..
                } => {
                    let i = match streams.iter().position(|(s, _)| *s == stage) {
                        Some(i) => i,
                        None => {
                            streams.push((stage, Streams::default()));
                            streams.len() - 1
                        }
                    };
                    let s = &mut streams[i].1;
                    match stream {
                        OutputStream::Stdout => s.stdout.push_str(&data),
                        OutputStream::Stderr => s.stderr.push_str(&data),
                    }
                    s.output.push_str(&data);
                }
                JobEvent::Result { result } => return Ok((*result, streams)),
                JobEvent::Error { error } => return Err(PistonError::of_problem(error)),
                _ => {}
            }
        }
        scanned = buffer.len();
        if buffer.len() > max_line {
            return Err(bad(format!("an event over {max_line} bytes")));
        }
        let chunk = tokio::select! {
            chunk = response.chunk() => chunk,
            () = handle.lost() => return Err(lost("the node stopped reporting".to_string())),
        };
        match chunk {
            Ok(Some(bytes)) => buffer.extend_from_slice(&bytes),
            Ok(None) => return Err(lost("the stream ended before its last event".to_string())),
            Err(e) => return Err(lost(format!("the stream broke: {e}"))),
        }
    }
}
