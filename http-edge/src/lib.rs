//! The HTTP edge that the gateway and the node agent share: the accept loop with a cap on open
//! connections, the header and body read timeouts, the JSON media type of every JSON endpoint,
//! and problem+json for every non-2xx answer, including those the HTTP layer gives on its own.
//!
//! - `body`: the body deadline ([`DeadlineBody`]), [`read_body`] and [`require_json`].
//! - `io`: the connection stream that turns hyper's bare parse-error answers into problems.
//! - `request_id`: every request's id, its tracing span and its `X-Request-Id` answer header.
//! - `metrics`: the process's one Prometheus recorder, which both binaries render at `/metrics`.
//!
//! It lives in a crate of its own because `shared` stays free of async and HTTP, and the gateway
//! must not lean on the agent for its serving.
#![forbid(unsafe_code)]

pub mod body;
pub mod io;
pub mod metrics;
pub mod request_id;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use codefleet_shared::{ErrorCode, Problem};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::ServiceExt as _;

pub use body::{read_body, require_json, BodyError, DeadlineBody};
pub use request_id::RequestId;

use tracing::Instrument as _;

/// How long a client may take and how many may be connected at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EdgeLimits {
    /// Time to send a request's head (also how long an idle keep-alive connection stays).
    pub header_timeout: Duration,
    /// Time to send a request's whole body, from its head's arrival: 408 and the connection
    /// closed after it.
    pub body_timeout: Duration,
    /// Open connections at most; more wait in the listen backlog until one closes.
    pub max_connections: usize,
}

/// A problem as an `application/problem+json` answer, with `Retry-After` when it has one.
pub fn problem_response(problem: &Problem) -> Response {
    let status = StatusCode::from_u16(problem.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(problem).expect("problems always serialize");
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/problem+json"),
    );
    if let Some(seconds) = problem.retry_after_s {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// A request's handle on its own client connection, among the request's extensions: a handler
/// whose answer streams (say, to a client that stopped reading) can close the connection
/// outright, which no error in the body could do while hyper waits for the socket to drain.
#[derive(Debug, Clone)]
pub struct Disconnect(CancellationToken);

impl Disconnect {
    /// Closes the connection now, whatever is still unsent.
    pub fn now(&self) {
        self.0.cancel();
    }
}

/// Serves `app` on `listener` until `shutdown` resolves, then lets open requests finish.
/// Connections beyond `limits.max_connections` are not accepted until one closes; each request
/// body gets `limits.body_timeout`; every non-2xx answer leaves as problem+json. Connections may
/// be upgraded (WebSocket); an upgraded one is the handler's from then on, and shutdown does not
/// wait for it.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: EdgeLimits,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(
        limits.max_connections.clamp(1, Semaphore::MAX_PERMITS),
    ));
    // hyper-util's `GracefulShutdown` does not take upgradeable connections: the same by hand.
    let (stopping, stop) = watch::channel(false);
    let connections = TaskTracker::new();
    let mut shutdown = std::pin::pin!(shutdown);
    // Logged once each time the cap is reached, not for every connection that waits.
    let mut saturated = false;
    loop {
        let permit = match Arc::clone(&permits).try_acquire_owned() {
            Ok(permit) => {
                saturated = false;
                permit
            }
            Err(_) => {
                if !std::mem::replace(&mut saturated, true) {
                    tracing::warn!(
                        max = limits.max_connections,
                        "connection cap reached: new connections wait until one closes"
                    );
                }
                tokio::select! {
                    permit = Arc::clone(&permits).acquire_owned() => {
                        permit.expect("the semaphore is never closed")
                    }
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let app = app.clone();
        let disconnect = Disconnect(CancellationToken::new());
        let handle = disconnect.clone();
        let service = hyper::service::service_fn(move |request| {
            respond(app.clone(), request, limits.body_timeout, handle.clone())
        });
        let connection = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout)
            .serve_connection(TokioIo::new(io::ProblemStream::new(stream)), service)
            .with_upgrades();
        let mut stop = stop.clone();
        connections.spawn(async move {
            let mut connection = std::pin::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = disconnect.0.cancelled() => {
                    tracing::debug!("connection closed by the server");
                    Ok(())
                }
                () = async { drop(stop.wait_for(|stop| *stop).await) } => {
                    connection.as_mut().graceful_shutdown();
                    connection.await
                }
            };
            if let Err(error) = ended {
                tracing::debug!(%error, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stopping.send(true);
    connections.close();
    connections.wait().await;
}

/// One request: its body under the deadline, then the app, then the answer made a problem when
/// it is an error without one, and `Connection: close` when the body ran out of time.
async fn respond(
    app: Router,
    request: Request<hyper::body::Incoming>,
    body_timeout: Duration,
    disconnect: Disconnect,
) -> Result<Response, Infallible> {
    let timed_out = Arc::new(AtomicBool::new(false));
    let mut complete = None;
    let mut request = request.map(|body| {
        let body = DeadlineBody::new(body, body_timeout, Arc::clone(&timed_out));
        complete = Some(body.completion());
        Body::new(body)
    });
    let id = RequestId::of(request.headers());
    request
        .headers_mut()
        .insert(request_id::HEADER, id.header_value());
    request.extensions_mut().insert(id.clone());
    request.extensions_mut().insert(disconnect);
    let span = tracing::info_span!("request", request_id = %id.as_str());
    let serving = app.oneshot(request).instrument(span);
    let response = request_id::scope(id.clone(), serving).await?;
    let mut response = as_problem(response).await;
    response
        .headers_mut()
        .insert(request_id::HEADER, id.header_value());
    let unread = complete.is_some_and(|c| !c.load(Ordering::Relaxed));
    if timed_out.load(Ordering::Relaxed) || unread {
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// At most this much of a bare error answer's text is kept as the problem's detail.
const DETAIL_MAX: usize = 512;

/// Marks an error answer whose body is, on purpose, another API's error shape (the gateway's
/// Judge0-compatible routes answer errors as Judge0 does, its Piston-compatible `/api/v2/` as
/// Piston does, `{"message": ...}`): [`as_problem`] leaves it as it is.
#[derive(Debug, Clone, Copy)]
pub struct ForeignError;

/// A non-2xx answer that is not problem+json (a framework's rejection, a plain-text error)
/// becomes one of the same status, its text as the detail; its other headers stay. An answer
/// marked [`ForeignError`] is left alone.
pub async fn as_problem(response: Response) -> Response {
    let status = response.status();
    let is_problem = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/problem+json"));
    let foreign = response.extensions().get::<ForeignError>().is_some();
    if !(status.is_client_error() || status.is_server_error()) || is_problem || foreign {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let mut detail: String = text.trim().chars().take(DETAIL_MAX).collect();
    if detail.is_empty() {
        detail = status.canonical_reason().unwrap_or("error").to_string();
    }
    let mut problem = Problem::new(ErrorCode::for_status(status.as_u16()), detail);
    problem.status = status.as_u16();
    problem.retry_after_s = None;
    let mut answer = problem_response(&problem);
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.remove(header::TRANSFER_ENCODING);
    for (name, value) in answer.headers() {
        parts.headers.insert(name.clone(), value.clone());
    }
    *answer.headers_mut() = parts.headers;
    answer
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bare_errors_become_problems_and_the_rest_stays() {
        let text = (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::RETRY_AFTER, "5")],
            "draining",
        )
            .into_response();
        let answer = as_problem(text).await;
        assert_eq!(answer.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            answer.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        assert_eq!(answer.headers()[header::RETRY_AFTER], "5");
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (body["code"].as_str(), body["status"].as_u64()),
            (Some("no_capacity"), Some(503))
        );
        assert_eq!(body["detail"], "draining");

        let empty = StatusCode::LENGTH_REQUIRED.into_response();
        let answer = as_problem(empty).await;
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (body["code"].as_str(), body["status"].as_u64()),
            (Some("invalid_request"), Some(411))
        );
        assert_eq!(body["detail"], "Length Required");

        for fine in [
            StatusCode::OK.into_response(),
            problem_response(&Problem::new(ErrorCode::NotFound, "x")),
        ] {
            let before = fine.headers().clone();
            let after = as_problem(fine).await;
            assert_eq!(after.headers(), &before);
        }

        // Another API's error shape, marked as such, is passed as it is.
        let mut foreign =
            (StatusCode::UNPROCESSABLE_ENTITY, r#"{"field":["bad"]}"#).into_response();
        foreign.extensions_mut().insert(ForeignError);
        let answer = as_problem(foreign).await;
        assert_eq!(answer.status(), StatusCode::UNPROCESSABLE_ENTITY);
        assert_ne!(
            answer.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        assert_eq!(&body[..], br#"{"field":["bad"]}"#);
    }
}
