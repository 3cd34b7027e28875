//! `GET /v1/connect`: a job driven over a WebSocket. The client's first message is the execute
//! body (text, as `POST /v1/execute` takes it); then it may send `stdin`, `eof` and `signal`
//! messages (`shared::stream::ClientMessage`). The server sends the job's events, the same JSON
//! as the NDJSON stream's lines, and closes normally (1000) after the last. The run stage is
//! interactive: its stdin stays open until `eof`. Closing the socket kills the job.
//!
//! Close codes: 1000 after the last event; 1003 a binary message; 1007 a message that is not
//! valid JSON of a known kind; 1008 a request refused by the caller's fault (invalid, unknown
//! language or signal: an `error` event comes first); 1009 a message over
//! `--ws-max-message-bytes`; 1011 the node failed; 1013 the node cannot take the job now (full,
//! draining: an `error` event first; another node may run it); 4000 no message either way for
//! `--ws-idle-s`; 4001 open for longer than `--ws-max-s`; 4002 the client took no event for
//! `--stream-stall-ms` (its job was killed).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Request, State};
use axum::response::Response;

use codefleet_shared::stream::{ClientMessage, JobEvent};
use codefleet_shared::ExecuteRequest;

use crate::agent::{Agent, Streaming};
use crate::error::{AgentError, Fault};
use crate::http::{parse_json, request_id};
use crate::runner::Target;
use crate::sandbox::Control;

pub const CLOSE_NORMAL: u16 = 1000;
pub const CLOSE_UNSUPPORTED: u16 = 1003;
pub const CLOSE_INVALID: u16 = 1007;
pub const CLOSE_POLICY: u16 = 1008;
pub const CLOSE_TOO_BIG: u16 = 1009;
pub const CLOSE_INTERNAL: u16 = 1011;
pub const CLOSE_TRY_LATER: u16 = 1013;
pub const CLOSE_IDLE: u16 = 4000;
pub const CLOSE_TOO_LONG: u16 = 4001;
pub const CLOSE_STALLED: u16 = 4002;

pub async fn connect(
    State(agent): State<Arc<Agent>>,
    ws: WebSocketUpgrade,
    request: Request,
) -> Response {
    let request_id = request_id(&request);
    let max = agent.config().ws_max_message_bytes;
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| async move {
            let span = tracing::info_span!("connect", node = %agent.node());
            let mut conn = Conn::new(&agent, socket);
            tracing::Instrument::instrument(conn.serve(&agent, request_id), span).await;
        })
}

/// Why a connection ends: a close code and its reason.
struct Close(u16, String);

struct Conn {
    socket: WebSocket,
    opened: Instant,
    total: Duration,
    idle: Duration,
    stall: Duration,
}

/// What woke the connection up.
enum Woke {
    Event(Option<JobEvent>),
    Client(Option<Result<Message, axum::Error>>),
    Idle,
}

impl Conn {
    fn new(agent: &Agent, socket: WebSocket) -> Conn {
        let config = agent.config();
        Conn {
            socket,
            opened: Instant::now(),
            total: Duration::from_secs(config.ws_max_s),
            idle: Duration::from_secs(config.ws_idle_s),
            stall: Duration::from_millis(config.stream_stall_ms),
        }
    }

    async fn serve(&mut self, agent: &Arc<Agent>, request_id: Option<String>) {
        let ended = match self.run(agent, request_id).await {
            Ok(()) => Close(CLOSE_NORMAL, "done".into()),
            Err(close) => close,
        };
        if ended.0 != CLOSE_STALLED {
            self.close(ended).await;
        }
    }

    async fn run(&mut self, agent: &Arc<Agent>, request_id: Option<String>) -> Result<(), Close> {
        let received = Instant::now();
        let body = match self.next_client(self.idle).await? {
            Message::Text(text) => text,
            _ => {
                return Err(Close(
                    CLOSE_UNSUPPORTED,
                    "the first message must be the execute body, as text".into(),
                ))
            }
        };
        let prepared = parse_json::<ExecuteRequest>(agent, body.as_bytes())
            .and_then(|req| agent.prepare(&req));
        let mut prepared = match prepared {
            Ok(p) => p,
            Err(problem) => return Err(self.refuse(problem.into()).await),
        };
        prepared.interactive = true;
        let started = agent
            .execute_streamed(prepared, Target::Pool, (received, request_id), None)
            .await;
        let mut streaming = match started {
            Ok(s) => s,
            Err(e) => return Err(self.refuse(e).await),
        };
        self.pump(&mut streaming).await
    }

    /// Passes events to the client and its messages to the job until the last event. A control
    /// the job cannot take yet waits (and the client's next messages with it) while events keep
    /// flowing, so a chatty client and a chatty program never wait on each other.
    async fn pump(&mut self, streaming: &mut Streaming) -> Result<(), Close> {
        let mut pending: Option<Control> = None;
        loop {
            let left = self.total.saturating_sub(self.opened.elapsed());
            if left.is_zero() {
                return Err(Close(
                    CLOSE_TOO_LONG,
                    format!("open for longer than {} s", self.total.as_secs()),
                ));
            }
            let woke = tokio::select! {
                event = streaming.events.recv() => Woke::Event(event),
                permit = streaming.control.reserve(), if pending.is_some() => match permit {
                    Ok(permit) => {
                        permit.send(pending.take().expect("a control is pending"));
                        continue;
                    }
                    // The job is over; its last event is on its way.
                    Err(_) => {
                        pending = None;
                        continue;
                    }
                },
                message = self.socket.recv(), if pending.is_none() => Woke::Client(message),
                () = tokio::time::sleep(self.idle.min(left)) => Woke::Idle,
            };
            match woke {
                Woke::Event(Some(event)) => {
                    let last = event.is_last();
                    self.send(&event).await?;
                    if last {
                        return Ok(());
                    }
                }
                Woke::Event(None) => {
                    return Err(Close(
                        CLOSE_INTERNAL,
                        "the job ended without a result".into(),
                    ))
                }
                Woke::Client(message) => {
                    if let Some(message) = client_message(message)? {
                        pending = Some(control_of(message)?);
                    }
                }
                Woke::Idle if self.opened.elapsed() >= self.total => continue,
                Woke::Idle => {
                    return Err(Close(
                        CLOSE_IDLE,
                        format!("no message for {} s", self.idle.as_secs()),
                    ))
                }
            }
        }
    }

    /// The next client message, within `within`.
    async fn next_client(&mut self, within: Duration) -> Result<Message, Close> {
        loop {
            let message = tokio::time::timeout(within, self.socket.recv())
                .await
                .map_err(|_| {
                    Close(
                        CLOSE_IDLE,
                        format!("no execute body within {} s", within.as_secs()),
                    )
                })?;
            if let Some(message) = client_message(message)? {
                return Ok(message);
            }
        }
    }

    /// Sends an `error` event for a refused job and says how to close.
    async fn refuse(&mut self, error: AgentError) -> Close {
        let code = match (error.fault, error.retry_elsewhere()) {
            (Fault::Caller, _) => CLOSE_POLICY,
            (Fault::Node, true) => CLOSE_TRY_LATER,
            (Fault::Node, false) => CLOSE_INTERNAL,
        };
        let reason = error.code().as_str().to_string();
        let event = JobEvent::Error {
            error: error.problem,
        };
        match self.send(&event).await {
            Ok(()) => Close(code, reason),
            Err(close) => close,
        }
    }

    async fn send(&mut self, event: &JobEvent) -> Result<(), Close> {
        let text = serde_json::to_string(event).expect("events serialize");
        match tokio::time::timeout(self.stall, self.socket.send(Message::Text(text.into()))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(Close(CLOSE_NORMAL, "the client went away".into())),
            Err(_) => Err(Close(
                CLOSE_STALLED,
                format!("no event taken for {} ms", self.stall.as_millis()),
            )),
        }
    }

    async fn close(&mut self, Close(code, reason): Close) {
        let frame = CloseFrame {
            code,
            reason: reason.chars().take(120).collect::<String>().into(),
        };
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            self.socket.send(Message::Close(Some(frame))),
        )
        .await;
    }
}

/// A client's message: `Some` for one to act on, `None` for a ping or pong; an error for a
/// closed socket or a bad frame.
fn client_message(message: Option<Result<Message, axum::Error>>) -> Result<Option<Message>, Close> {
    match message {
        None | Some(Ok(Message::Close(_))) => {
            Err(Close(CLOSE_NORMAL, "closed by the client".into()))
        }
        Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(None),
        Some(Ok(message)) => Ok(Some(message)),
        Some(Err(e)) => {
            // axum hides tungstenite's error type (and its version may differ from the
            // workspace's), so the size error is told by its text: "Space limit exceeded:
            // Message too long: … > …".
            let text = e.to_string();
            if text.contains("too long") || text.contains("Space limit") || text.contains("size") {
                Err(Close(CLOSE_TOO_BIG, "message too big".into()))
            } else {
                Err(Close(CLOSE_INVALID, format!("bad frame: {text}")))
            }
        }
    }
}

/// What a client's message asks of the job.
fn control_of(message: Message) -> Result<Control, Close> {
    let Message::Text(text) = message else {
        return Err(Close(CLOSE_UNSUPPORTED, "messages are text (JSON)".into()));
    };
    let message: ClientMessage = serde_json::from_str(&text)
        .map_err(|e| Close(CLOSE_INVALID, format!("unreadable message: {e}")))?;
    Ok(match message {
        ClientMessage::Stdin { data } => Control::Stdin(data.into_bytes()),
        ClientMessage::Eof {} => Control::CloseStdin,
        ClientMessage::Signal { signal } => Control::Signal(
            signal_number(&signal)
                .ok_or_else(|| Close(CLOSE_POLICY, format!("unknown signal {signal:?}")))?,
        ),
    })
}

/// The number of a signal a client may send, named with or without `SIG`.
pub fn signal_number(name: &str) -> Option<i32> {
    let name = name.trim().to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Some(match name {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name() {
        for (name, want) in [
            ("SIGKILL", Some(9)),
            ("kill", Some(9)),
            ("SIGTERM", Some(15)),
            ("INT", Some(2)),
            ("SIGSTOP", None),
            ("9", None),
        ] {
            assert_eq!(signal_number(name), want, "{name}");
        }
    }

    #[test]
    fn client_messages_become_controls() {
        let table = [
            (
                r#"{"type":"stdin","data":"1\n"}"#,
                Some(Control::Stdin(b"1\n".to_vec())),
            ),
            (r#"{"type":"eof"}"#, Some(Control::CloseStdin)),
            (
                r#"{"type":"signal","signal":"SIGINT"}"#,
                Some(Control::Signal(2)),
            ),
            (r#"{"type":"signal","signal":"SIGSTOP"}"#, None),
            (r#"{"type":"nope"}"#, None),
            ("not json", None),
        ];
        for (text, want) in table {
            let got = control_of(Message::Text(text.into())).ok();
            assert_eq!(got, want, "{text}");
        }
    }
}
