//! Streamed answers through the gateway: `POST /v1/execute` (and a session's execute) asked for
//! as `application/x-ndjson`. The agent's 200 is passed on as it comes, a whole line at a time
//! (each at most `Config::max_event_bytes`), never buffered whole: a pump task reads the agent's
//! body into a channel of a few lines that the client's body drains, so a slow client slows the
//! agent down (hyper's bodies are pulled). A client that takes nothing for `--stream-stall-ms`
//! while lines wait is disconnected, and the agent's connection dropped with it, which kills the
//! job. When the agent's stream ends before its `result` or `error` line (the node died, its
//! connection broke, it stopped reporting), the gateway ends the client's stream with an `error`
//! event of its own, `node_lost`: never a silent cut, and never in the middle of a line.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use codefleet_http_edge::Disconnect;
use codefleet_shared::judge::JudgeEvent;
use codefleet_shared::stream::{JobEvent, NDJSON};
use codefleet_shared::Timing;
use tokio::sync::mpsc;
use tokio_util::codec::{Decoder as _, LinesCodec, LinesCodecError};
use tracing::Instrument as _;

use crate::dispatch::{Placed, Upstream};
use crate::edge::Held;
use crate::error::GatewayError;
use crate::membership::NodeHandle;
use crate::metrics::{self, StreamKind, StreamOutcome};
use crate::routing::NodeId;

/// Lines waiting between the agent and a client: the most a slow client makes the gateway hold
/// (besides hyper's own write buffer).
const CHANNEL_LINES: usize = 8;

/// What the gateway adds to a job's events on their way through: the same as it adds to the
/// buffered answer (`node`, `attempts`, and its own wait in `queued_ms` and `total_ms`).
#[derive(Debug, Clone)]
pub struct Relay {
    pub node: NodeId,
    pub attempts: u32,
    pub waited_ms: u64,
    pub events: Events,
}

/// Which events a stream carries: a job's (`codefleet_shared::stream::JobEvent`) or a judge's
/// (`codefleet_shared::judge::JudgeEvent`). Both end with `result` or `error`; their `result`s
/// differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Events {
    Job,
    Judge,
}

impl Relay {
    pub fn of(placed: &Placed) -> Relay {
        Relay {
            node: placed.node.clone(),
            attempts: placed.attempts,
            waited_ms: placed.waited.as_millis() as u64,
            events: Events::Job,
        }
    }

    /// One event from the agent as the client gets it, and whether it is the last. Events of
    /// types the gateway does not rewrite pass as they came (a newer agent's too), but each must
    /// be a JSON object with a `type`.
    pub fn pass(&self, text: &str) -> Result<(Passed, bool), String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("an event that is not JSON: {e}"))?;
        let kind = value.get("type").and_then(|t| t.as_str());
        let kind = kind.ok_or_else(|| "an event without a `type`".to_string())?;
        let kind = kind.to_string();
        let kind = kind.as_str();
        let malformed = |e: serde_json::Error| format!("a malformed `{kind}` event: {e}");
        let rewritten = match (kind, self.events) {
            ("result" | "error" | "accepted", Events::Job) => {
                let mut event: JobEvent = serde_json::from_value(value).map_err(malformed)?;
                self.rewrite(&mut event)
                    .then(|| serde_json::to_string(&event).expect("events serialize"))
            }
            ("result" | "error" | "accepted", Events::Judge) => {
                let mut event: JudgeEvent = serde_json::from_value(value).map_err(malformed)?;
                self.rewrite_judge(&mut event)
                    .then(|| serde_json::to_string(&event).expect("events serialize"))
            }
            _ => None,
        };
        let last = matches!(kind, "result" | "error");
        Ok(match rewritten {
            Some(event) => (Passed::Rewritten(event), last),
            None => (Passed::AsIs, last),
        })
    }

    /// Adds the gateway's part to `event`; false when there is nothing to add.
    fn rewrite(&self, event: &mut JobEvent) -> bool {
        match event {
            JobEvent::Accepted { queued_ms, .. } => self.waited(queued_ms),
            JobEvent::Result { result } => {
                self.complete(&mut result.node, &mut result.attempts, &mut result.timing)
            }
            _ => false,
        }
    }

    /// [`Relay::rewrite`] for a judge's events.
    fn rewrite_judge(&self, event: &mut JudgeEvent) -> bool {
        match event {
            JudgeEvent::Accepted { queued_ms, .. } => self.waited(queued_ms),
            JudgeEvent::Result { result } => {
                self.complete(&mut result.node, &mut result.attempts, &mut result.timing)
            }
            _ => false,
        }
    }

    /// Adds the gateway's wait to an `accepted` event's `queued_ms`, if it waited.
    fn waited(&self, queued_ms: &mut u64) -> bool {
        *queued_ms += self.waited_ms;
        self.waited_ms > 0
    }

    /// Sets a result's node and attempts and adds the gateway's wait to its timing.
    fn complete(&self, node: &mut String, attempts: &mut Option<u32>, timing: &mut Timing) -> bool {
        *node = self.node.to_string();
        *attempts = Some(self.attempts);
        timing.queued_ms += self.waited_ms;
        timing.total_ms += self.waited_ms;
        true
    }
}

/// An event after [`Relay::pass`]: as it came, or the rewritten event's JSON (one line, no
/// newline).
#[derive(Debug)]
pub enum Passed {
    AsIs,
    Rewritten(String),
}

/// The `error` event that ends a stream whose node went away.
pub fn node_lost(node: &NodeId, reason: &str) -> JobEvent {
    let lost = GatewayError::NodeLost {
        node: node.to_string(),
        reason: reason.to_string(),
    };
    JobEvent::Error {
        error: lost.problem(),
    }
}

/// The `error` event that ends a stream whose node sent something the gateway cannot pass on.
pub fn bad_answer(node: &NodeId, detail: String) -> JobEvent {
    let bad = GatewayError::BadAnswer {
        node: node.to_string(),
        detail,
    };
    JobEvent::Error {
        error: bad.problem(),
    }
}

/// What a streamed answer needs besides the placed job.
pub struct StreamLimits {
    pub stall: Duration,
    pub max_line: usize,
}

/// The client's answer for a job placed with [`crate::dispatch::Delivery::Stream`]: the agent's
/// refusal as it was (problem+json), or a 200 streaming its events.
pub fn respond(
    placed: Placed,
    events: Events,
    limits: StreamLimits,
    disconnect: Option<Disconnect>,
    held: Option<Held>,
) -> Result<Response, GatewayError> {
    let relay = Relay {
        events,
        ..Relay::of(&placed)
    };
    let Placed {
        reply,
        node,
        inflight,
        ..
    } = placed;
    let response = match reply.upstream {
        Some(Upstream::Lines(response)) => response,
        _ => {
            reply.expect(StatusCode::OK, &node)?;
            return Err(GatewayError::BadAnswer {
                node: node.to_string(),
                detail: "a 200 without a stream".to_string(),
            });
        }
    };
    let (lines, rx) = mpsc::channel(CHANNEL_LINES);
    let finished = Arc::new(AtomicBool::new(false));
    let pump = Pump {
        response,
        node: Arc::clone(inflight.node()),
        relay,
        lines,
        limits,
        finished: Arc::clone(&finished),
    };
    let open = metrics::stream_opened(StreamKind::Ndjson);
    tokio::spawn(
        async move {
            let outcome = pump.run().await;
            if outcome == StreamOutcome::Stalled {
                tracing::info!("client stopped reading the stream: disconnected");
                if let Some(disconnect) = disconnect {
                    disconnect.now();
                }
            }
            open.close(outcome);
            // Held to the stream's end: the job's slot on its node and the key's quota.
            drop((inflight, held));
        }
        .in_current_span(),
    );
    let mut answer = Body::from_stream(client_body(rx, finished)).into_response();
    answer
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(answer)
}

/// The client's body: the channel's lines, then the end, or an error (which makes hyper abort
/// the answer) when the pump stopped before the last event.
fn client_body(
    rx: mpsc::Receiver<Bytes>,
    finished: Arc<AtomicBool>,
) -> impl futures_util::Stream<Item = Result<Bytes, io::Error>> {
    futures_util::stream::unfold(Some(rx), move |rx| {
        let finished = Arc::clone(&finished);
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(line) => Some((Ok(line), Some(rx))),
                None if finished.load(Ordering::SeqCst) => None,
                None => Some((Err(io::Error::other("the stream was cut off")), None)),
            }
        }
    })
}

/// Moves one job's lines from the agent to the client.
struct Pump {
    response: reqwest::Response,
    node: Arc<NodeHandle>,
    relay: Relay,
    lines: mpsc::Sender<Bytes>,
    limits: StreamLimits,
    finished: Arc<AtomicBool>,
}

impl Pump {
    async fn run(self) -> StreamOutcome {
        let ndjson = self
            .response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with(NDJSON));
        match ndjson {
            true => self.lines().await,
            false => self.whole().await,
        }
    }

    /// An agent that does not stream (one older than streaming) answers the buffered way: its
    /// answer becomes the stream's one `result` event.
    async fn whole(mut self) -> StreamOutcome {
        let mut body = BytesMut::new();
        loop {
            let chunk = tokio::select! {
                chunk = self.response.chunk() => chunk.map_err(|e| lost_reason(&e)),
                () = self.node.lost() => Err("the node stopped reporting".to_string()),
            };
            match chunk {
                Ok(Some(bytes)) if body.len() + bytes.len() <= self.limits.max_line => {
                    body.extend_from_slice(&bytes)
                }
                Ok(Some(_)) => {
                    let detail = format!("an answer over {} bytes", self.limits.max_line);
                    let bad = bad_answer(&self.relay.node, detail);
                    return self.finish(bad.to_line(), StreamOutcome::BadAnswer).await;
                }
                Ok(None) => break,
                Err(reason) => {
                    let lost = node_lost(&self.relay.node, &reason);
                    return self.finish(lost.to_line(), StreamOutcome::NodeLost).await;
                }
            }
        }
        let mut event = match serde_json::from_slice(&body) {
            Ok(result) => JobEvent::Result {
                result: Box::new(result),
            },
            Err(e) => {
                let bad = bad_answer(&self.relay.node, format!("not an execute response: {e}"));
                return self.finish(bad.to_line(), StreamOutcome::BadAnswer).await;
            }
        };
        self.relay.rewrite(&mut event);
        self.finish(event.to_line(), StreamOutcome::Result).await
    }

    async fn lines(mut self) -> StreamOutcome {
        let mut codec = LinesCodec::new_with_max_length(self.limits.max_line);
        let mut buffer = BytesMut::new();
        loop {
            let chunk = tokio::select! {
                chunk = self.response.chunk() => chunk.map_err(|e| lost_reason(&e)),
                () = self.node.lost() => Err("the node stopped reporting".to_string()),
            };
            let ended = match chunk {
                Ok(Some(bytes)) => {
                    buffer.extend_from_slice(&bytes);
                    None
                }
                Ok(None) => Some("the node's stream ended before its last event".to_string()),
                Err(reason) => Some(reason),
            };
            if let Some(reason) = ended {
                // A line cut off by the end is dropped whole: the client never sees half a line.
                let lost = node_lost(&self.relay.node, &reason);
                tracing::warn!(node = %self.relay.node, %reason, "node lost mid-stream");
                return self.finish(lost.to_line(), StreamOutcome::NodeLost).await;
            }
            loop {
                let line = match codec.decode(&mut buffer) {
                    Ok(Some(line)) => line,
                    Ok(None) => break,
                    Err(LinesCodecError::MaxLineLengthExceeded) => {
                        let detail = format!("an event over {} bytes", self.limits.max_line);
                        let bad = bad_answer(&self.relay.node, detail);
                        return self.finish(bad.to_line(), StreamOutcome::BadAnswer).await;
                    }
                    Err(LinesCodecError::Io(e)) => {
                        let bad = bad_answer(&self.relay.node, e.to_string());
                        return self.finish(bad.to_line(), StreamOutcome::BadAnswer).await;
                    }
                };
                if line.trim().is_empty() {
                    continue;
                }
                let (bytes, last) = match self.relay.pass(&line) {
                    Ok((Passed::AsIs, last)) => {
                        let mut bytes = line.into_bytes();
                        bytes.push(b'\n');
                        (bytes, last)
                    }
                    Ok((Passed::Rewritten(event), last)) => {
                        let mut bytes = event.into_bytes();
                        bytes.push(b'\n');
                        (bytes, last)
                    }
                    Err(detail) => {
                        let bad = bad_answer(&self.relay.node, detail);
                        return self.finish(bad.to_line(), StreamOutcome::BadAnswer).await;
                    }
                };
                if last {
                    let outcome = match bytes.starts_with(br#"{"type":"result""#) {
                        true => StreamOutcome::Result,
                        false => StreamOutcome::Error,
                    };
                    return self.finish(bytes, outcome).await;
                }
                if let Err(outcome) = self.send(bytes).await {
                    return outcome;
                }
            }
        }
    }

    /// Sends the last line; the stream then ends cleanly.
    async fn finish(self, line: Vec<u8>, outcome: StreamOutcome) -> StreamOutcome {
        if let Err(failed) = self.send(line).await {
            return failed;
        }
        self.finished.store(true, Ordering::SeqCst);
        outcome
    }

    async fn send(&self, line: Vec<u8>) -> Result<(), StreamOutcome> {
        match self
            .lines
            .send_timeout(Bytes::from(line), self.limits.stall)
            .await
        {
            Ok(()) => Ok(()),
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => Err(StreamOutcome::Stalled),
            Err(mpsc::error::SendTimeoutError::Closed(_)) => Err(StreamOutcome::ClientGone),
        }
    }
}

/// A broken agent body, said in a few words.
fn lost_reason(error: &reqwest::Error) -> String {
    use std::error::Error as _;
    if error.is_timeout() {
        return "no end of the stream within the job's time limits".to_string();
    }
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        detail = format!("{detail}: {cause}");
        source = cause.source();
    }
    detail
}
