//! `GET /v1/connect` through the gateway: a client's WebSocket relayed to an agent's.
//!
//! The client's first message is the execute body; the gateway checks it as it checks
//! `POST /v1/execute`, places the job the same way (routing, the bounded wait for a node with
//! room), opens the chosen agent's `/v1/connect`, sends the body, and waits for the agent's first
//! event. A node whose socket fails before that did not start the job: the next one is tried.
//! From then on messages are relayed both ways (the client's checked as `ClientMessage`s, the
//! agent's events rewritten like the NDJSON stream's, see `stream::Relay`) until the last event,
//! then the socket is closed. A node lost mid-run ends the client's socket with an `error` event,
//! `node_lost`. Messages are at most `--max-body-bytes`; a socket quiet both ways for
//! `--connect-idle-ms`, or a client that does not take a message for `--stream-stall-ms`, is
//! closed, and with it the agent's socket, which kills the job.
//!
//! Close codes: 1000 after the last event of a job that ran (its `result`, or the agent's own
//! `error`); 1003 a binary message; 1007 a message that is not what it must be (the first: an
//! execute body; later ones: `stdin`, `eof` or `signal`); 1008 a job refused for the request's
//! own reason (after an `error` event with the problem); 1009 a message too large; 1011 the node
//! was lost, or answered what cannot be passed on (after an `error` event); 1013 no node could
//! take the job (after an `error` event, e.g. `no_capacity`); 4000 idle (no message either way
//! for `--connect-idle-ms`, or no first message within `--body-timeout-ms`); 4002 the client took
//! no message for `--stream-stall-ms` (sent if it still can be). The same codes as the agent's; a
//! close the agent chose itself (say, its 4001 for a socket open too long) is passed on as it
//! came.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use bytes::Bytes;
use codefleet_shared::api::object_only::Object;
use codefleet_shared::stream::{ClientMessage, JobEvent};
use codefleet_shared::{ExecuteRequest, Problem};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;
use tracing::Instrument as _;

use crate::dispatch::{job_timeout, place, Delivery, Job, Placed, Upstream};
use crate::edge::Held;
use crate::error::GatewayError;
use crate::handlers::{check_job, resolve_language};
use crate::metrics::{self, StreamKind, StreamOutcome};
use crate::stream::{bad_answer, node_lost, Passed, Relay};
use crate::Gateway;

/// The agent path of the job's socket.
const AGENT_PATH: &str = "/v1/connect";

/// Close codes beyond RFC 6455's (in `close_code`), the agent's too.
const IDLE: u16 = 4000;
const STALLED: u16 = 4002;

/// `GET /v1/connect`: authenticated and counted like any client request (the key's quota is held
/// until the socket closes); the upgrade limits every message to `--max-body-bytes`.
pub async fn connect(
    State(gw): State<Arc<Gateway>>,
    held: Option<Extension<Held>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let limit = gw.config().max_body_bytes;
    upgraded(upgrade, limit, move |socket| {
        session(gw, socket, held.map(|Extension(h)| h))
    })
}

/// Upgrades to a WebSocket whose messages and frames are at most `limit` bytes, and runs
/// `session` on it in the request's span and under its request id.
pub(crate) fn upgraded<F, S>(upgrade: WebSocketUpgrade, limit: usize, session: F) -> Response
where
    F: FnOnce(WebSocket) -> S + Send + 'static,
    S: std::future::Future<Output = ()> + Send + 'static,
{
    let request_id = codefleet_http_edge::request_id::current();
    let span = tracing::Span::current();
    upgrade
        .max_message_size(limit)
        .max_frame_size(limit)
        .on_upgrade(move |socket| {
            let session = session(socket).instrument(span);
            async move {
                match request_id {
                    Some(id) => codefleet_http_edge::request_id::scope(id, session).await,
                    None => session.await,
                }
            }
        })
}

/// How the gateway ends a client's socket: an event first (a problem), then a close.
struct Ending {
    event: Option<Box<JobEvent>>,
    code: u16,
    reason: String,
}

impl Ending {
    fn close(code: u16, reason: impl Into<String>) -> Ending {
        Ending {
            event: None,
            code,
            reason: reason.into(),
        }
    }

    /// A job that ends with `error` before or instead of running.
    fn refused(error: &GatewayError) -> Ending {
        let problem = error.problem();
        let code = match problem.status {
            503 => close_code::AGAIN,
            400..=499 => close_code::POLICY,
            _ => close_code::ERROR,
        };
        Ending::problem(problem, code)
    }

    fn problem(problem: Problem, code: u16) -> Ending {
        Ending {
            reason: problem.code.as_str().to_string(),
            event: Some(Box::new(JobEvent::Error { error: problem })),
            code,
        }
    }

    /// Sends it; a client that does not take it within `stall` is dropped all the same.
    async fn send(self, client: &mut WebSocket, stall: Duration) {
        let sending = async {
            if let Some(event) = self.event {
                let text = serde_json::to_string(&event).expect("events serialize");
                client.send(Message::Text(text.into())).await?;
            }
            let frame = CloseFrame {
                code: self.code,
                reason: close_reason(&self.reason).into(),
            };
            client.send(Message::Close(Some(frame))).await
        };
        let _ = tokio::time::timeout(stall, sending).await;
    }
}

/// A close frame's reason is at most 123 bytes.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_string()
}

async fn session(gw: Arc<Gateway>, mut client: WebSocket, held: Option<Held>) {
    let open = metrics::stream_opened(StreamKind::Connect);
    let stall = gw.config().stream_stall();
    let outcome = match start(&gw, &mut client).await {
        Ok((placed, total)) => relay(&gw, &mut client, placed, total).await,
        Err((ending, outcome)) => {
            ending.send(&mut client, stall).await;
            outcome
        }
    };
    tracing::debug!(?outcome, "connect socket closed");
    open.close(outcome);
    drop(held);
}

/// Reads and checks the first message, and places the job.
async fn start(
    gw: &Gateway,
    client: &mut WebSocket,
) -> Result<(Placed, Duration), (Ending, StreamOutcome)> {
    let config = gw.config();
    let first = tokio::time::timeout(config.edge_limits().body_timeout, client.recv()).await;
    let refused = |ending| Err((ending, StreamOutcome::Refused));
    let text = match first {
        Err(_) => {
            let reason = "no execute request within the body timeout";
            return refused(Ending::close(IDLE, reason));
        }
        Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {
            return Err((
                Ending::close(close_code::NORMAL, ""),
                StreamOutcome::ClientGone,
            ))
        }
        Ok(Some(Ok(Message::Text(text)))) => text,
        Ok(Some(Ok(_))) => {
            let reason = "the first message must be the execute request, as JSON text";
            return refused(Ending::close(close_code::UNSUPPORTED, reason));
        }
    };
    let depth = codefleet_shared::validate::json_depth(text.as_bytes());
    if depth > config.max_json_depth {
        let detail = format!(
            "JSON nested {depth} deep; at most {} is accepted",
            config.max_json_depth
        );
        let problem = GatewayError::invalid(detail).problem();
        return refused(Ending::problem(problem, close_code::INVALID));
    }
    let request: ExecuteRequest = match serde_json::from_str::<Object<ExecuteRequest>>(&text) {
        Ok(Object(request)) => request,
        Err(e) => {
            let detail = format!("the first message is not an execute request: {e}");
            let problem = GatewayError::invalid(detail).problem();
            return refused(Ending::problem(problem, close_code::INVALID));
        }
    };
    let snapshot = gw.snapshot();
    let version = request.version.as_deref().filter(|v| !v.is_empty());
    let checked = check_job(gw, &request).and_then(|limits| {
        let info = resolve_language(&snapshot, request.language.as_deref(), version)?;
        Ok((limits, info))
    });
    let (limits, (info, runtime)) = match checked {
        Ok(checked) => checked,
        Err(error) => return refused(Ending::refused(&error)),
    };
    let timeout = job_timeout(&limits, config.dispatch_margin());
    let job = Job {
        language: &info.name,
        version,
        runtime: Some(runtime),
        path: AGENT_PATH,
        body: Bytes::from(text.as_str().to_string()),
        timeout,
        delivery: Delivery::Connect,
        affinity: None,
    };
    let placed = match place(gw, job).await {
        Ok(placed) => placed,
        Err(error) => return Err((Ending::refused(&error), StreamOutcome::Error)),
    };
    if !matches!(placed.reply.upstream, Some(Upstream::Socket { .. })) {
        // The agent refused the upgrade itself, in a way that says nothing of starting.
        let Placed { reply, node, .. } = placed;
        let error = match reply.expect(axum::http::StatusCode::SWITCHING_PROTOCOLS, &node) {
            Err(error) => error,
            Ok(_) => GatewayError::BadAnswer {
                node: node.to_string(),
                detail: "a WebSocket without a socket".to_string(),
            },
        };
        return Err((Ending::refused(&error), StreamOutcome::Error));
    }
    Ok((placed, timeout + config.queue_wait()))
}

/// What one step of the relay did.
enum Step {
    Go,
    End(StreamOutcome),
}

/// Relays the job's socket both ways until its last event, a close, a limit or a lost node.
async fn relay(
    gw: &Gateway,
    client: &mut WebSocket,
    placed: Placed,
    total: Duration,
) -> StreamOutcome {
    let config = gw.config();
    let (stall, idle) = (config.stream_stall(), config.connect_idle());
    let relay = Relay::of(&placed);
    let Placed {
        reply, inflight, ..
    } = placed;
    let node = Arc::clone(inflight.node());
    let Some(Upstream::Socket { socket, first }) = reply.upstream else {
        unreachable!("start() checked the upstream is a socket");
    };
    let mut agent = *socket;
    let deadline = Instant::now() + total;
    let mut quiet_until = Instant::now() + idle;
    let mut step = from_agent(&relay, client, Some(Ok(first)), stall).await;
    while let Step::Go = step {
        step = tokio::select! {
            message = client.recv() => {
                quiet_until = Instant::now() + idle;
                from_client(&relay, client, &mut agent, message, stall).await
            }
            message = agent.next() => {
                quiet_until = Instant::now() + idle;
                from_agent(&relay, client, message, stall).await
            }
            () = tokio::time::sleep_until(quiet_until) => {
                let reason = format!("no message either way for {} ms", idle.as_millis());
                Ending::close(IDLE, reason).send(client, stall).await;
                Step::End(StreamOutcome::Idle)
            }
            () = tokio::time::sleep_until(deadline) => {
                let reason = "no last event within the job's time limits";
                end_lost(&relay, client, reason, stall).await
            }
            () = node.lost() => end_lost(&relay, client, "the node stopped reporting", stall).await,
        };
    }
    // The agent kills the job when its socket closes.
    let _ = tokio::time::timeout(Duration::from_millis(500), agent.close(None)).await;
    drop(inflight);
    match step {
        Step::End(outcome) => outcome,
        Step::Go => unreachable!("the loop ends on End"),
    }
}

async fn end_lost(relay: &Relay, client: &mut WebSocket, reason: &str, stall: Duration) -> Step {
    tracing::warn!(node = %relay.node, %reason, "node lost mid-socket");
    let JobEvent::Error { error } = node_lost(&relay.node, reason) else {
        unreachable!("node_lost is an error event");
    };
    Ending::problem(error, close_code::ERROR)
        .send(client, stall)
        .await;
    Step::End(StreamOutcome::NodeLost)
}

/// One message (or the end) from the agent, passed to the client.
async fn from_agent(
    relay: &Relay,
    client: &mut WebSocket,
    message: Option<Result<tungstenite::Message, tungstenite::Error>>,
    stall: Duration,
) -> Step {
    use tungstenite::Message as Agent;
    let text = match message {
        Some(Ok(Agent::Text(text))) => text,
        Some(Ok(Agent::Ping(_) | Agent::Pong(_) | Agent::Frame(_))) => return Step::Go,
        Some(Ok(Agent::Binary(_))) => {
            let JobEvent::Error { error } = bad_answer(&relay.node, "a binary message".into())
            else {
                unreachable!("bad_answer is an error event");
            };
            Ending::problem(error, close_code::ERROR)
                .send(client, stall)
                .await;
            return Step::End(StreamOutcome::BadAnswer);
        }
        Some(Ok(Agent::Close(Some(frame))))
            if !matches!(u16::from(frame.code), 1001 | 1006 | 1011) =>
        {
            // The agent's own close (say, a limit of its own): the client gets it as it came.
            let code = u16::from(frame.code);
            Ending::close(code, frame.reason.as_str())
                .send(client, stall)
                .await;
            return Step::End(StreamOutcome::Error);
        }
        Some(Ok(Agent::Close(_))) => {
            return end_lost(relay, client, "the node closed the socket mid-job", stall).await
        }
        Some(Err(error)) => {
            let reason = format!("the node's socket failed: {error}");
            return end_lost(relay, client, &reason, stall).await;
        }
        None => return end_lost(relay, client, "the node's socket ended mid-job", stall).await,
    };
    let (text, last) = match relay.pass(text.as_str()) {
        Ok((Passed::AsIs, last)) => (text.as_str().to_string(), last),
        Ok((Passed::Rewritten(event), last)) => (event, last),
        Err(detail) => {
            let JobEvent::Error { error } = bad_answer(&relay.node, detail) else {
                unreachable!("bad_answer is an error event");
            };
            Ending::problem(error, close_code::ERROR)
                .send(client, stall)
                .await;
            return Step::End(StreamOutcome::BadAnswer);
        }
    };
    let is_result = text.starts_with(r#"{"type":"result""#);
    match tokio::time::timeout(stall, client.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Step::End(StreamOutcome::ClientGone),
        Err(_) => {
            tracing::info!("client stopped reading the socket: dropped");
            let reason = "the client took no message for the stall limit";
            Ending::close(STALLED, reason)
                .send(client, Duration::from_millis(100))
                .await;
            return Step::End(StreamOutcome::Stalled);
        }
    }
    if !last {
        return Step::Go;
    }
    Ending::close(close_code::NORMAL, "")
        .send(client, stall)
        .await;
    Step::End(match is_result {
        true => StreamOutcome::Result,
        false => StreamOutcome::Error,
    })
}

/// One message (or the end) from the client, checked and passed to the agent.
async fn from_client(
    relay: &Relay,
    client: &mut WebSocket,
    agent: &mut crate::dispatch::AgentSocket,
    message: Option<Result<Message, axum::Error>>,
    stall: Duration,
) -> Step {
    let text = match message {
        Some(Ok(Message::Text(text))) => text,
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => return Step::Go,
        Some(Ok(Message::Binary(_))) => {
            let reason = "messages are JSON text";
            Ending::close(close_code::UNSUPPORTED, reason)
                .send(client, stall)
                .await;
            return Step::End(StreamOutcome::Refused);
        }
        Some(Ok(Message::Close(_))) | None => return Step::End(StreamOutcome::ClientGone),
        Some(Err(error)) => {
            let inner = error.into_inner();
            let too_large = matches!(
                inner.downcast_ref::<tungstenite::Error>(),
                Some(tungstenite::Error::Capacity(_))
            );
            if too_large {
                let reason = "a message over --max-body-bytes";
                Ending::close(close_code::SIZE, reason)
                    .send(client, stall)
                    .await;
                return Step::End(StreamOutcome::Refused);
            }
            return Step::End(StreamOutcome::ClientGone);
        }
    };
    if let Err(e) = serde_json::from_str::<ClientMessage>(text.as_str()) {
        let reason = format!("not a stdin, eof or signal message: {e}");
        Ending::close(close_code::INVALID, reason)
            .send(client, stall)
            .await;
        return Step::End(StreamOutcome::Refused);
    }
    let sent = agent.send(tungstenite::Message::text(text.as_str().to_string()));
    match tokio::time::timeout(stall, sent).await {
        Ok(Ok(())) => Step::Go,
        // The agent's side broke: what it still sent, or its end, comes on the next read.
        Ok(Err(_)) => Step::Go,
        Err(_) => {
            end_lost(
                relay,
                client,
                "the node took no message for the stall limit",
                stall,
            )
            .await
        }
    }
}
