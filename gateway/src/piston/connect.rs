//! `GET /api/v2/connect`: Piston's interactive WebSocket, run on the native `/v1/connect` job
//! path. The client's `init` (an execute body) is checked and translated as `POST
//! /api/v2/execute`'s is and placed like any native socket job (`dispatch::place` with
//! `Delivery::Connect`); its `data` (stdin) and `signal` messages become the native `stdin` and
//! `signal` messages, and the agent's events become Piston's `runtime`, `stage`, `data` and
//! `exit` messages. The socket closes with Piston's codes: 4999 once the job ended, 4000 a
//! second `init`, 4001 no `init` within a second, 4002 after an `error` message (a refused
//! `init`, a message that is not JSON, a node lost), 4003 `data` or `signal` before `init`,
//! 4004 `data` for another stream than stdin, 4005 a signal that is not one of
//! [`translate::SIGNALS`]. Closing the socket kills the job, as natively.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::response::Response;
use axum::Extension;
use codefleet_shared::api::StageResult;
use codefleet_shared::stream::{JobEvent, OutputStream};
use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{json, Value};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite;

use super::translate::{self, PistonRuntime};
use super::wire::{close, ServerMessage};
use super::{prepare, PistonError};
use crate::dispatch::{place, AgentSocket, Delivery, Placed, Upstream};
use crate::edge::Held;
use crate::metrics::{self, StreamKind, StreamOutcome};
use crate::Gateway;

/// How long Piston waits for `init` after the socket opens.
const INIT_WITHIN: Duration = Duration::from_secs(1);

pub async fn connect(
    State(gw): State<Arc<Gateway>>,
    held: Option<Extension<Held>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let limit = gw.config().max_body_bytes;
    crate::connect::upgraded(upgrade, limit, move |socket| {
        session(gw, socket, held.map(|Extension(h)| h))
    })
}

/// How a socket ends: maybe a last message, then a close (none when the client is gone).
struct Ending {
    message: Option<ServerMessage>,
    close: Option<(u16, &'static str)>,
    outcome: StreamOutcome,
}

impl Ending {
    fn close(code: u16, reason: &'static str, outcome: StreamOutcome) -> Ending {
        Ending {
            message: None,
            close: Some((code, reason)),
            outcome,
        }
    }

    /// Piston's way to end on an error: an `error` message, then 4002.
    fn error(message: impl Into<String>, outcome: StreamOutcome) -> Ending {
        Ending {
            message: Some(ServerMessage::Error {
                message: message.into(),
            }),
            close: Some((close::NOTIFIED_ERROR, "Notified Error")),
            outcome,
        }
    }

    fn gone(outcome: StreamOutcome) -> Ending {
        Ending {
            message: None,
            close: None,
            outcome,
        }
    }

    async fn send(self, client: &mut WebSocket, stall: Duration) -> StreamOutcome {
        let sending = async {
            if let Some(message) = self.message {
                client.send(Message::Text(message.text().into())).await?;
            }
            if let Some((code, reason)) = self.close {
                let frame = CloseFrame {
                    code,
                    reason: reason.into(),
                };
                client.send(Message::Close(Some(frame))).await?;
            }
            Ok::<(), axum::Error>(())
        };
        let _ = tokio::time::timeout(stall, sending).await;
        self.outcome
    }
}

async fn session(gw: Arc<Gateway>, mut client: WebSocket, held: Option<Held>) {
    let open = metrics::stream_opened(StreamKind::Connect);
    let stall = gw.config().stream_stall();
    let ending = run(&gw, &mut client).await;
    let outcome = ending.send(&mut client, stall).await;
    tracing::debug!(?outcome, "piston socket closed");
    open.close(outcome);
    drop(held);
}

/// A client message as JSON, or the error Piston answers for one that is not.
fn parse(message: &Message) -> Option<Result<Value, Ending>> {
    let bytes: &[u8] = match message {
        Message::Text(text) => text.as_bytes(),
        Message::Binary(bytes) => bytes,
        _ => return None,
    };
    Some(
        serde_json::from_slice(bytes)
            .map_err(|e| Ending::error(e.to_string(), StreamOutcome::Refused)),
    )
}

fn kind(message: &Value) -> &str {
    message.get("type").and_then(Value::as_str).unwrap_or("")
}

async fn run(gw: &Gateway, client: &mut WebSocket) -> Ending {
    let init_by = Instant::now() + INIT_WITHIN;
    let init = loop {
        let message = match tokio::time::timeout_at(init_by, client.recv()).await {
            Err(_) => {
                let reason = "Initialization Timeout";
                return Ending::close(close::INIT_TIMEOUT, reason, StreamOutcome::Idle);
            }
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => {
                return Ending::gone(StreamOutcome::ClientGone)
            }
            Ok(Some(Ok(message))) => message,
        };
        let value = match parse(&message) {
            None => continue,
            Some(Err(ending)) => return ending,
            Some(Ok(value)) => value,
        };
        match kind(&value) {
            "init" => break value,
            "data" | "signal" => {
                let reason = "Not yet initialized";
                return Ending::close(close::NOT_INITIALIZED, reason, StreamOutcome::Refused);
            }
            _ => continue,
        }
    };
    let prepared = match prepare(gw, &init, true) {
        Ok(prepared) => prepared,
        Err(PistonError { message, .. }) => return Ending::error(message, StreamOutcome::Refused),
    };
    let placed = match place(gw, prepared.job("/v1/connect", Delivery::Connect)).await {
        Ok(placed) => placed,
        Err(error) => {
            let PistonError { message, .. } = PistonError::from(error);
            return Ending::error(message, StreamOutcome::Error);
        }
    };
    let total = prepared.timeout + gw.config().queue_wait();
    relay(gw, client, placed, &prepared.translated.runtime, total).await
}

/// What one step of the relay did.
enum Step {
    Go,
    End(Ending),
}

async fn relay(
    gw: &Gateway,
    client: &mut WebSocket,
    placed: Placed,
    runtime: &PistonRuntime,
    total: Duration,
) -> Ending {
    let stall = gw.config().stream_stall();
    let Placed {
        reply, inflight, ..
    } = placed;
    let node = Arc::clone(inflight.node());
    let (mut agent, first) = match reply.upstream {
        Some(Upstream::Socket { socket, first }) => (*socket, first),
        _ => {
            let error = match reply.expect(axum::http::StatusCode::SWITCHING_PROTOCOLS, &node.id) {
                Err(error) => PistonError::from(error).message,
                Ok(_) => "the node answered without a socket".to_string(),
            };
            return Ending::error(error, StreamOutcome::Error);
        }
    };
    let deadline = Instant::now() + total;
    let mut step = from_agent(client, Some(Ok(first)), runtime, stall).await;
    while let Step::Go = step {
        step = tokio::select! {
            message = client.recv() => from_client(&mut agent, message, stall).await,
            message = agent.next() => from_agent(client, message, runtime, stall).await,
            () = tokio::time::sleep_until(deadline) => Step::End(Ending::error(
                "the job did not end within its time limits",
                StreamOutcome::NodeLost,
            )),
            () = node.lost() => Step::End(Ending::error(
                format!("node {} was lost while running the job", node.id),
                StreamOutcome::NodeLost,
            )),
        };
    }
    // The agent kills the job when its socket closes.
    let _ = tokio::time::timeout(Duration::from_millis(500), agent.close(None)).await;
    drop(inflight);
    match step {
        Step::End(ending) => ending,
        Step::Go => unreachable!("the loop ends on End"),
    }
}

/// Sends one message to the client; a client that does not take it within `stall` is dropped.
async fn send(client: &mut WebSocket, message: ServerMessage, stall: Duration) -> Step {
    let text = message.text();
    match tokio::time::timeout(stall, client.send(Message::Text(text.into()))).await {
        Ok(Ok(())) => Step::Go,
        Ok(Err(_)) => Step::End(Ending::gone(StreamOutcome::ClientGone)),
        Err(_) => Step::End(Ending::gone(StreamOutcome::Stalled)),
    }
}

/// A stage's end as Piston's `exit` says it: the code, or the signal.
fn exit(event: JobEvent) -> Option<ServerMessage> {
    let JobEvent::StageFinished {
        stage,
        status,
        exit_code,
        signal,
        stdout_truncated,
        stderr_truncated,
        wall_time_ms,
        cpu_time_ms,
        memory_bytes,
    } = event
    else {
        return None;
    };
    let result = StageResult {
        status,
        exit_code,
        signal,
        stdout: String::new(),
        stderr: String::new(),
        stdout_truncated,
        stderr_truncated,
        wall_time_ms,
        cpu_time_ms,
        memory_bytes,
    };
    let piston = translate::stage(&result, translate::Streams::default());
    Some(ServerMessage::Exit {
        stage,
        code: piston.code,
        signal: piston.signal,
    })
}

/// One message (or the end) from the agent, as Piston's message.
async fn from_agent(
    client: &mut WebSocket,
    message: Option<Result<tungstenite::Message, tungstenite::Error>>,
    runtime: &PistonRuntime,
    stall: Duration,
) -> Step {
    use tungstenite::Message as Agent;
    let text = match message {
        Some(Ok(Agent::Text(text))) => text,
        Some(Ok(Agent::Ping(_) | Agent::Pong(_) | Agent::Frame(_))) => return Step::Go,
        Some(Ok(Agent::Close(frame))) => {
            let said = frame.map_or(String::new(), |f| format!(": {}", f.reason));
            let message = format!("the node closed the job's socket{said}");
            return Step::End(Ending::error(message, StreamOutcome::NodeLost));
        }
        Some(Ok(Agent::Binary(_))) | Some(Err(_)) | None => {
            let message = "the node's socket broke mid-job";
            return Step::End(Ending::error(message, StreamOutcome::NodeLost));
        }
    };
    let event: JobEvent = match serde_json::from_str(text.as_str()) {
        Ok(event) => event,
        // A newer agent's event of a kind Piston has no message for.
        Err(_) => return Step::Go,
    };
    let message = match event {
        JobEvent::Accepted { .. } => ServerMessage::Runtime {
            language: runtime.language.clone(),
            version: runtime.version.to_string(),
        },
        JobEvent::StageStarted { stage } => ServerMessage::Stage { stage },
        JobEvent::Output { stream, data, .. } => ServerMessage::Data {
            stream: match stream {
                OutputStream::Stdout => "stdout".to_string(),
                OutputStream::Stderr => "stderr".to_string(),
            },
            data,
        },
        finished @ JobEvent::StageFinished { .. } => exit(finished).expect("a stage_finished"),
        JobEvent::Result { .. } => {
            let done = "Job Completed";
            return Step::End(Ending::close(
                close::JOB_COMPLETED,
                done,
                StreamOutcome::Result,
            ));
        }
        JobEvent::Error { error } => {
            return Step::End(Ending::error(error.detail, StreamOutcome::Error))
        }
    };
    send(client, message, stall).await
}

/// One message (or the end) from the client, as the native message to the agent.
async fn from_client(
    agent: &mut AgentSocket,
    message: Option<Result<Message, axum::Error>>,
    stall: Duration,
) -> Step {
    let message = match message {
        Some(Ok(Message::Close(_))) | Some(Err(_)) | None => {
            return Step::End(Ending::gone(StreamOutcome::ClientGone))
        }
        Some(Ok(message)) => message,
    };
    let value = match parse(&message) {
        None => return Step::Go,
        Some(Err(ending)) => return Step::End(ending),
        Some(Ok(value)) => value,
    };
    let native = match kind(&value) {
        "init" => {
            let reason = "Already Initialized";
            let ending = Ending::close(close::ALREADY_INITIALIZED, reason, StreamOutcome::Refused);
            return Step::End(ending);
        }
        "data" => {
            if value.get("stream").and_then(Value::as_str) != Some("stdin") {
                let reason = "Can only write to stdin";
                let ending = Ending::close(close::STDIN_ONLY, reason, StreamOutcome::Refused);
                return Step::End(ending);
            }
            let Some(data) = value.get("data").and_then(Value::as_str) else {
                let ending = Ending::error("data must be a string", StreamOutcome::Refused);
                return Step::End(ending);
            };
            json!({"type": "stdin", "data": data})
        }
        "signal" => {
            let signal = value.get("signal").and_then(Value::as_str);
            match signal.filter(|s| translate::SIGNALS.contains(s)) {
                Some(signal) => json!({"type": "signal", "signal": signal}),
                None => {
                    let reason = "Invalid signal";
                    let ending =
                        Ending::close(close::INVALID_SIGNAL, reason, StreamOutcome::Refused);
                    return Step::End(ending);
                }
            }
        }
        // Piston ignores a message of another type.
        _ => return Step::Go,
    };
    let sent = agent.send(tungstenite::Message::text(native.to_string()));
    match tokio::time::timeout(stall, sent).await {
        // A broken agent socket shows on the next read.
        Ok(_) => Step::Go,
        Err(_) => Step::End(Ending::error(
            "the node took no message for the stall limit",
            StreamOutcome::NodeLost,
        )),
    }
}
