//! Dispatch: sending a job to a node over one pooled HTTP client (or, for `/v1/connect`, a
//! WebSocket of its own), racing the answer against the node being lost, waiting a bounded time
//! when every node is full, and trying the next node only when the previous one certainly did not
//! start the job: the connection failed before the job was sent, or the agent said so
//! ([`NOT_STARTED_HEADER`] on its error answer; a socket that ended before its first event).

use std::error::Error as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, HeaderValue, Method, StatusCode};
use codefleet_shared::cluster::{NOT_STARTED_HEADER, QUEUE_WAIT_HEADER};
use codefleet_shared::stream::{JobEvent, NDJSON};
use codefleet_shared::{ErrorCode, Problem, ResolvedLimits};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::time::Instant;
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest as _, protocol::frame};

use crate::error::GatewayError;
use crate::line::Place;
use crate::membership::{InflightGuard, NodeHandle};
use crate::metrics;
use crate::routing::{Decision, NodeId, Want};
use crate::{Config, Gateway};

/// How long an idle pooled connection to an agent is kept.
const POOL_IDLE: Duration = Duration::from_secs(20);

/// How long to wait for a TCP connection to an agent; failing to connect is always safe to retry.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// The gateway's one HTTP client to agents (pooled keep-alive connections, no TLS, no proxy).
pub struct Dispatcher {
    client: reqwest::Client,
    cluster_token: Option<String>,
    budget: RetryBudget,
    /// The largest event an agent's `/v1/connect` socket may send (its result carries the
    /// output, like the buffered answer).
    max_event_bytes: usize,
}

/// A WebSocket to an agent's `/v1/connect`.
pub type AgentSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// An agent's answer, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    /// The whole body; empty when the answer is still to be read from `upstream`.
    pub body: Bytes,
    retry_after: Option<u64>,
    pub upstream: Option<Upstream>,
}

/// A job's answer that is still coming: what [`Delivery::Stream`] and [`Delivery::Connect`] get.
#[derive(Debug)]
pub enum Upstream {
    /// A 200 answer whose NDJSON body is unread.
    Lines(reqwest::Response),
    /// The agent's socket, and the first message it sent (an event, or its close).
    Socket {
        socket: Box<AgentSocket>,
        first: tungstenite::Message,
    },
}

impl Reply {
    /// The answer's problem body, with its `Retry-After`, if it is one.
    fn problem(&self) -> Option<Problem> {
        let mut problem: Problem = serde_json::from_slice(&self.body).ok()?;
        problem.retry_after_s = self.retry_after.or(problem.code.default_retry_after());
        Some(problem)
    }

    /// The answer's problem, or one made from its status.
    fn problem_or_status(&self) -> Problem {
        self.problem().unwrap_or_else(|| {
            let code = ErrorCode::for_status(self.status.as_u16());
            Problem::new(
                code,
                format!("status {} without a problem body", self.status),
            )
        })
    }

    /// The body when the status is `expected`; otherwise the agent's problem, passed on.
    pub fn expect(self, expected: StatusCode, node: &NodeId) -> Result<Bytes, GatewayError> {
        if self.status == expected {
            return Ok(self.body);
        }
        let node = node.to_string();
        match self.problem() {
            Some(problem) if problem.code == ErrorCode::Unauthorized => {
                Err(GatewayError::BadAnswer {
                    node,
                    detail: "it rejected this gateway's cluster token".to_string(),
                })
            }
            Some(problem) => Err(GatewayError::Agent { node, problem }),
            None => Err(GatewayError::BadAnswer {
                node,
                detail: format!("status {} without a problem body", self.status),
            }),
        }
    }
}

/// Why one attempt on one node failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptError {
    /// No connection could be made: the request never left.
    #[error("could not connect: {0}")]
    Refused(String),
    /// The agent's error answer (a 5xx) carried [`NOT_STARTED_HEADER`], or its socket sent an
    /// `error` event before `accepted`: no sandbox took the job (say, `no_capacity`).
    #[error("{}", .0.detail)]
    NotStarted(Problem),
    /// The agent's socket ended before its first event: the job was never accepted.
    #[error("{0}")]
    Dropped(String),
    /// The request was sent and then the connection failed, or membership lost the node.
    #[error("{0}")]
    Lost(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl AttemptError {
    /// True when the node certainly did not start the job, so another node may run it.
    pub fn not_started(&self) -> bool {
        matches!(
            self,
            AttemptError::Refused(_) | AttemptError::NotStarted(_) | AttemptError::Dropped(_)
        )
    }

    /// The `reason` label of the retries metric.
    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Refused(_) => "refused",
            AttemptError::NotStarted(problem) => problem.code.as_str(),
            AttemptError::Dropped(_) => "dropped",
            AttemptError::Lost(_) => "lost",
            AttemptError::TimedOut(_) => "timeout",
        }
    }

    /// The answer for a job that ends with this error on `node`.
    pub(crate) fn into_error(self, node: &NodeId) -> GatewayError {
        let node = node.to_string();
        match self {
            AttemptError::Refused(reason) => GatewayError::NoCapacity {
                detail: format!("no node could take the job; the last, {node}, {reason}"),
            },
            AttemptError::NotStarted(problem) => GatewayError::Agent { node, problem },
            lost @ (AttemptError::Dropped(_)
            | AttemptError::Lost(_)
            | AttemptError::TimedOut(_)) => GatewayError::NodeLost {
                node,
                reason: lost.to_string(),
            },
        }
    }
}

impl Dispatcher {
    pub fn new(config: &Config) -> Result<Dispatcher, reqwest::Error> {
        let client = reqwest::Client::builder()
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            // Shorter than the agents' keep-alive (their `--header-timeout-s`, 30 s by default):
            // the gateway lets an idle connection go before the agent closes it, so a job is
            // never sent on a connection the agent is dropping at that moment.
            .pool_idle_timeout(POOL_IDLE)
            .build()?;
        Ok(Dispatcher {
            client,
            cluster_token: config.cluster_token.clone(),
            budget: RetryBudget::new(),
            max_event_bytes: config.max_event_bytes(),
        })
    }

    /// One attempt of `job` on `node`, which may wait up to `queue_wait` in the agent's queue.
    pub async fn attempt(
        &self,
        node: &NodeHandle,
        job: &Job<'_>,
        queue_wait: Duration,
    ) -> Result<Reply, AttemptError> {
        let timeout = job.timeout + queue_wait;
        match job.delivery {
            Delivery::Buffered | Delivery::Stream => {
                let call = Call {
                    method: Method::POST,
                    path: job.path,
                    body: Some(job.body.clone()),
                    timeout,
                    queue_wait: Some(queue_wait),
                    stream: job.delivery == Delivery::Stream,
                };
                self.send(node, call).await
            }
            Delivery::Connect => self.connect(node, job, timeout, queue_wait).await,
        }
    }

    /// A job's POST to one node, which may wait up to `queue_wait` in the agent's queue.
    pub async fn call_queued(
        &self,
        node: &NodeHandle,
        path: &str,
        body: Bytes,
        timeout: Duration,
        queue_wait: Duration,
    ) -> Result<Reply, AttemptError> {
        let call = Call {
            method: Method::POST,
            path,
            body: Some(body),
            timeout,
            queue_wait: Some(queue_wait),
            stream: false,
        };
        self.send(node, call).await
    }

    /// One call to one node. Ends as soon as the answer is in, the connection fails, `timeout`
    /// passes, or membership declares the node lost, whichever comes first.
    pub async fn call(
        &self,
        node: &NodeHandle,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
    ) -> Result<Reply, AttemptError> {
        let call = Call {
            method,
            path,
            body,
            timeout,
            queue_wait: None,
            stream: false,
        };
        self.send(node, call).await
    }

    async fn send(&self, node: &NodeHandle, call: Call<'_>) -> Result<Reply, AttemptError> {
        if node.is_lost() {
            return Err(AttemptError::Refused("the node is down".to_string()));
        }
        let Call {
            method,
            path,
            body,
            timeout,
            queue_wait,
            stream,
        } = call;
        let mut request = self
            .client
            .request(method, format!("{}{path}", node.address))
            .timeout(timeout);
        if let Some(wait) = queue_wait {
            request = request.header(QUEUE_WAIT_HEADER, wait.as_millis().to_string());
        }
        if stream {
            request = request.header(header::ACCEPT, NDJSON);
        }
        // The agent logs the job under the client's request id too.
        if let Some(id) = codefleet_http_edge::request_id::current() {
            request = request.header(codefleet_http_edge::request_id::HEADER, id.as_str());
        }
        if let Some(token) = &self.cluster_token {
            request = request.bearer_auth(token);
        }
        if let Some(body) = body {
            request = request
                .header(header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        let exchange = async {
            let response = request.send().await.map_err(|e| classify(e, timeout))?;
            let status = response.status();
            let retry_after = response
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()?.parse().ok());
            let not_started = response.headers().contains_key(NOT_STARTED_HEADER);
            if stream && status == StatusCode::OK {
                let reply = Reply {
                    status,
                    body: Bytes::new(),
                    retry_after,
                    upstream: Some(Upstream::Lines(response)),
                };
                return Ok((reply, false));
            }
            let body = response.bytes().await.map_err(|e| classify(e, timeout))?;
            let reply = Reply {
                status,
                body,
                retry_after,
                upstream: None,
            };
            Ok((reply, not_started))
        };
        let (reply, not_started) = tokio::select! {
            reply = exchange => reply?,
            () = node.lost() => {
                return Err(AttemptError::Lost("the node stopped reporting".to_string()));
            }
        };
        // A 4xx is the request's own fault: another node would say the same.
        if not_started && reply.status.is_server_error() {
            return Err(AttemptError::NotStarted(reply.problem_or_status()));
        }
        Ok(reply)
    }

    /// Opens `node`'s `/v1/connect`, sends the job's body as the first message and reads the
    /// agent's first message: the job has started once that is an event other than an `error`
    /// of the node's (5xx); anything that ends before it is [`AttemptError::Dropped`].
    async fn connect(
        &self,
        node: &NodeHandle,
        job: &Job<'_>,
        timeout: Duration,
        queue_wait: Duration,
    ) -> Result<Reply, AttemptError> {
        if node.is_lost() {
            return Err(AttemptError::Refused("the node is down".to_string()));
        }
        let url = format!("{}{}", ws_base(&node.address), job.path);
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| AttemptError::Refused(format!("bad node address {url:?}: {e}")))?;
        let headers = request.headers_mut();
        let wait = queue_wait.as_millis().to_string();
        headers.insert(
            QUEUE_WAIT_HEADER,
            HeaderValue::from_str(&wait).expect("digits"),
        );
        if let Some(id) = codefleet_http_edge::request_id::current() {
            headers.insert(codefleet_http_edge::request_id::HEADER, id.header_value());
        }
        if let Some(token) = &self.cluster_token {
            let bearer = HeaderValue::from_str(&format!("Bearer {token}"))
                .map_err(|_| AttemptError::Refused("the cluster token is not a header".into()))?;
            headers.insert(header::AUTHORIZATION, bearer);
        }
        let config = tungstenite::protocol::WebSocketConfig::default()
            .max_message_size(Some(self.max_event_bytes))
            .max_frame_size(Some(self.max_event_bytes));
        let handshake = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
        let opened = match tokio::time::timeout(CONNECT_TIMEOUT * 2, handshake).await {
            Err(_) => return Err(AttemptError::Refused("no handshake in time".to_string())),
            Ok(Err(error)) => return handshake_failed(error),
            Ok(Ok((socket, _))) => socket,
        };
        let first = async {
            let mut socket = opened;
            let body = String::from_utf8_lossy(&job.body).into_owned();
            if let Err(error) = socket.send(tungstenite::Message::text(body)).await {
                return Err(AttemptError::Dropped(format!(
                    "could not send the job: {error}"
                )));
            }
            loop {
                let message = match socket.next().await {
                    Some(Ok(message)) => message,
                    Some(Err(error)) => {
                        return Err(AttemptError::Dropped(format!(
                            "the socket failed before the first event: {error}"
                        )))
                    }
                    None => {
                        return Err(AttemptError::Dropped(
                            "the socket ended before the first event".to_string(),
                        ))
                    }
                };
                match first_message(&message) {
                    First::Skip => continue,
                    First::Failed(failure) => return Err(failure),
                    First::Started => return Ok((socket, message)),
                }
            }
        };
        let (socket, first) = tokio::select! {
            first = tokio::time::timeout(timeout, first) => {
                first.map_err(|_| AttemptError::TimedOut(timeout))??
            }
            () = node.lost() => {
                return Err(AttemptError::Lost("the node stopped reporting".to_string()));
            }
        };
        Ok(Reply {
            status: StatusCode::SWITCHING_PROTOCOLS,
            body: Bytes::new(),
            retry_after: None,
            upstream: Some(Upstream::Socket {
                socket: Box::new(socket),
                first,
            }),
        })
    }
}

/// One HTTP call to an agent.
struct Call<'a> {
    method: Method,
    path: &'a str,
    body: Option<Bytes>,
    timeout: Duration,
    /// Sent as [`QUEUE_WAIT_HEADER`]: the job may wait this long in the agent's queue.
    queue_wait: Option<Duration>,
    /// Asks for the NDJSON stream; a 200's body is then left unread.
    stream: bool,
}

/// `ws://` for an agent's `http://` base URL.
fn ws_base(address: &str) -> String {
    match address.strip_prefix("http://") {
        Some(rest) => format!("ws://{rest}"),
        None => address.replacen("https://", "wss://", 1),
    }
}

/// A `/v1/connect` handshake that failed. Nothing was sent yet, so the job did not start; an
/// HTTP answer other than 101 is the agent's own (passed on unless it says it did not start).
fn handshake_failed(error: tungstenite::Error) -> Result<Reply, AttemptError> {
    match error {
        tungstenite::Error::Http(response) => {
            let not_started = response.headers().contains_key(NOT_STARTED_HEADER);
            let reply = Reply {
                status: response.status(),
                retry_after: response
                    .headers()
                    .get(header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()?.parse().ok()),
                body: Bytes::from(response.into_body().unwrap_or_default()),
                upstream: None,
            };
            if not_started && reply.status.is_server_error() {
                return Err(AttemptError::NotStarted(reply.problem_or_status()));
            }
            Ok(reply)
        }
        tungstenite::Error::Io(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(AttemptError::Refused(error.to_string()))
        }
        other => Err(AttemptError::Dropped(format!(
            "no WebSocket handshake: {other}"
        ))),
    }
}

/// What the agent's first message on `/v1/connect` says about the job.
enum First {
    /// A ping or pong: read on.
    Skip,
    Failed(AttemptError),
    /// An event (the job was accepted, or refused for a reason of the request's own), or a close
    /// of the agent's own choosing (a bad first message): the client gets it.
    Started,
}

fn first_message(message: &tungstenite::Message) -> First {
    use tungstenite::Message;
    match message {
        Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => First::Skip,
        Message::Text(text) => match serde_json::from_str::<JobEvent>(text) {
            Ok(JobEvent::Error { error }) if error.status >= 500 => {
                First::Failed(AttemptError::NotStarted(error))
            }
            _ => First::Started,
        },
        Message::Binary(_) => First::Started,
        Message::Close(frame) => {
            use frame::coding::CloseCode;
            let code = frame.as_ref().map(|f| f.code);
            match code {
                None | Some(CloseCode::Away | CloseCode::Error | CloseCode::Again) => {
                    let said = frame
                        .as_ref()
                        .map_or(String::new(), |f| format!(": {}", f.reason));
                    First::Failed(AttemptError::Dropped(format!(
                        "the agent closed the socket before the first event{said}"
                    )))
                }
                Some(_) => First::Started,
            }
        }
    }
}

/// Sorts a client error by whether the request can have reached the agent.
fn classify(error: reqwest::Error, timeout: Duration) -> AttemptError {
    if error.is_timeout() && !error.is_connect() {
        return AttemptError::TimedOut(timeout);
    }
    let mut detail = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        detail = format!("{detail}: {cause}");
        source = cause.source();
    }
    if error.is_connect() {
        AttemptError::Refused(detail)
    } else {
        AttemptError::Lost(detail)
    }
}

/// One job waiting at the gateway for a node with room; counted until dropped.
struct Waiting<'a> {
    count: &'a AtomicU32,
}

impl<'a> Waiting<'a> {
    /// Joins the wait, unless [`admit`] says no.
    fn join(
        count: &'a AtomicU32,
        length: u32,
        mean_gap: Option<Duration>,
        left: Duration,
    ) -> Option<Waiting<'a>> {
        count
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                admit(n, length, mean_gap, left).then_some(n + 1)
            })
            .ok()?;
        Some(Waiting { count })
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a job may join the `waiting` jobs: fewer than `length` wait, and, while jobs are
/// seen leaving the wait every `mean_gap` on average, its turn would come within three quarters
/// of the `left` of its own wait (the rest is for the mean's noise and the agent's own queue).
/// Otherwise it is refused at once rather than after waiting in vain: under a sustained
/// overload a queue bounded by length alone keeps jobs that time out at its back.
pub fn admit(waiting: u32, length: u32, mean_gap: Option<Duration>, left: Duration) -> bool {
    if waiting >= length {
        return false;
    }
    match mean_gap {
        Some(gap) => gap.saturating_mul(waiting + 1) <= left * 3 / 4,
        None => true,
    }
}

/// How fast jobs leave the gateway's wait for a node while it is backlogged: the mean time
/// between two departures over the last [`Departures::WINDOW`] gaps, counting a gap only when
/// the earlier departure left other jobs waiting, so that a gap measures how fast the fleet
/// serves the wait, not how seldom jobs had to wait. A mean over many gaps, not a running
/// average weighted to the last few: departures come in bursts (a freed slot, then the next in
/// line finding another), and a newcomer is weighed against the mean just after a burst as
/// often as at any other time. Forgotten once no job has left for a while.
#[derive(Default)]
pub struct Departures {
    last: std::sync::Mutex<Gaps>,
}

#[derive(Default)]
struct Gaps {
    /// The last departure and whether it left jobs waiting.
    last: Option<(std::time::Instant, bool)>,
    gaps: std::collections::VecDeque<Duration>,
    sum: Duration,
}

impl Departures {
    pub const WINDOW: usize = 32;

    /// A job left the wait at `now`, leaving `still_waiting` jobs behind it.
    pub fn record(&self, now: std::time::Instant, still_waiting: u32) {
        let mut d = self.last.lock().expect("departures lock");
        if let Some((at, true)) = d.last {
            let gap = now.saturating_duration_since(at);
            d.gaps.push_back(gap);
            d.sum += gap;
            if d.gaps.len() > Self::WINDOW {
                let old = d.gaps.pop_front().expect("a gap");
                d.sum -= old;
            }
        }
        d.last = Some((now, still_waiting > 0));
    }

    /// The mean gap, unless the last departure is older than `stale_after` (the wait is not
    /// moving, or nothing waited lately: nothing is known).
    pub fn mean_gap(&self, now: std::time::Instant, stale_after: Duration) -> Option<Duration> {
        let d = self.last.lock().expect("departures lock");
        match d.last {
            Some((at, _)) if now.saturating_duration_since(at) <= stale_after => {
                let n = u32::try_from(d.gaps.len()).ok().filter(|n| *n > 0)?;
                Some(d.sum / n)
            }
            _ => None,
        }
    }
}

/// Retries allowed across all jobs: one for every five jobs, plus a reserve of ten, so that a
/// cluster of failing nodes cannot multiply the load on the rest. Counted in fifths of a retry.
pub struct RetryBudget {
    fifths: AtomicU32,
}

impl RetryBudget {
    const RESERVE: u32 = 10 * 5;
    const CAP: u32 = 100 * 5;

    pub fn new() -> RetryBudget {
        RetryBudget {
            fifths: AtomicU32::new(Self::RESERVE),
        }
    }

    /// Every job adds a fifth of a retry.
    pub fn deposit(&self) {
        let _ = self
            .fifths
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| {
                Some((f + 1).min(Self::CAP))
            });
    }

    /// Takes one retry, if the budget has one.
    pub fn withdraw(&self) -> bool {
        self.fifths
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |f| f.checked_sub(5))
            .is_ok()
    }
}

impl Default for RetryBudget {
    fn default() -> RetryBudget {
        RetryBudget::new()
    }
}

/// The gateway's timeout for a job's answer: its compile and run time limits plus a margin.
pub fn job_timeout(limits: &ResolvedLimits, margin: Duration) -> Duration {
    Duration::from_millis(limits.compile_wall_time_ms + limits.wall_time_ms) + margin
}

/// A job to place on some node that has its language ready.
pub struct Job<'a> {
    pub language: &'a str,
    pub version: Option<&'a str>,
    /// The runtime id the request resolved to (see [`Want::runtime`]).
    pub runtime: Option<&'a str>,
    /// Agent path, e.g. `/v1/execute`.
    pub path: &'static str,
    /// The request's body (on `/v1/connect`, the first message).
    pub body: Bytes,
    pub timeout: Duration,
    pub delivery: Delivery,
    /// A compiled program's affinity ([`crate::routing::program_affinity`]): routed to the node
    /// that holds it compiled while that node has room.
    pub affinity: Option<u64>,
}

/// How a job's answer comes back from its node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// The whole answer at once.
    Buffered,
    /// `Accept: application/x-ndjson`: a 200's events, read as they come ([`Upstream::Lines`]).
    Stream,
    /// `/v1/connect`: the agent's WebSocket ([`Upstream::Socket`]).
    Connect,
}

/// Where and how a job ran.
pub struct Placed {
    pub reply: Reply,
    pub node: NodeId,
    pub attempts: u32,
    /// Time spent waiting at the gateway for a node with room.
    pub waited: Duration,
    /// The job counted in flight on its node until this drops (a stream holds it to its end).
    pub inflight: InflightGuard,
}

/// Places `job`: routes it, waits up to `--queue-wait-ms` while every candidate is full, sends
/// it, and moves on to the next candidate only when a node could not have started it.
pub async fn place(gw: &Gateway, job: Job<'_>) -> Result<Placed, GatewayError> {
    let config = gw.config();
    let deadline = Instant::now() + config.queue_wait();
    let mut waited = Duration::ZERO;
    let mut tried: Vec<NodeId> = Vec::new();
    let mut last_failure: Option<(NodeId, AttemptError)> = None;
    // Jobs that want the same runtimes share a line (one that asks for a version the full nodes
    // have must not hold up one that any node with room could take).
    let line_key = format!(
        "{}\0{}\0{}",
        job.language,
        job.version.unwrap_or(""),
        job.runtime.unwrap_or("")
    );
    // While this job waits for a node with room: its count in the wait and its place in line.
    let mut spot: Option<(Waiting<'_>, Place<'_>)> = None;
    gw.dispatcher.budget.deposit();
    loop {
        // Registered before routing looks at the loads, so a slot freed meanwhile is not missed.
        let freed = gw.freed.notified();
        let mut freed = std::pin::pin!(freed);
        freed.as_mut().enable();

        let snapshot = gw.snapshot();
        // Jobs of a language get nodes in the order they came: while some of them wait, a job
        // behind them does not look for a node (the one first in line does).
        let my_turn = match &spot {
            Some((_, place)) => place.is_first(),
            None => gw.line.is_empty(&line_key),
        };
        let decision = my_turn.then(|| {
            let started = std::time::Instant::now();
            // The runtime as the snapshot routed on resolves it: the request was resolved
            // against an older one, and a runtime that became ready since (a newer version of
            // the language) changes which one a node runs for `version`.
            let runtime = job.runtime.map(|asked| {
                snapshot
                    .catalog
                    .resolve_runtime(job.language, job.version)
                    .map_or(asked, |(_, id)| id)
            });
            let want = Want {
                language: job.language,
                version: job.version,
                runtime,
                exclude: &tried,
                affinity: job.affinity,
            };
            let decision = snapshot
                .table
                .choose(&want, config.balance_factor, |node| node.load());
            metrics::routing_decision(started.elapsed());
            decision
        });
        let node = match decision {
            Some(Decision::Node(entry)) => {
                if let Some(left) = spot.take() {
                    drop(left);
                    let still_waiting = gw.waiting.load(Ordering::SeqCst);
                    gw.departures
                        .record(std::time::Instant::now(), still_waiting);
                }
                Arc::clone(&entry.load)
            }
            Some(Decision::Unavailable) => {
                return Err(match last_failure {
                    Some((node, failure)) => failure.into_error(&node),
                    None => {
                        metrics::rejection("language_unavailable");
                        GatewayError::LanguageUnavailable {
                            language: job.language.to_string(),
                        }
                    }
                });
            }
            Some(Decision::Saturated) | None => {
                let now = Instant::now();
                if now >= deadline {
                    metrics::rejection("no_capacity");
                    return Err(GatewayError::NoCapacity {
                        detail: format!(
                            "every node running {} is busy; waited {} ms",
                            job.language,
                            waited.as_millis()
                        ),
                    });
                }
                if spot.is_none() {
                    // A burst queues; beyond the queue's length, or when the wait already
                    // queued would outlast what is left of this job's, the job is refused at
                    // once. A job already waiting keeps its place.
                    let length = config
                        .queue_length
                        .unwrap_or(snapshot.ready_slots.saturating_mul(4))
                        .max(1);
                    let left = deadline.saturating_duration_since(now);
                    let gap = gw.departures.mean_gap(now.into_std(), config.queue_wait());
                    let Some(waiting) = Waiting::join(&gw.waiting, length, gap, left) else {
                        metrics::rejection("no_capacity");
                        return Err(GatewayError::NoCapacity {
                            detail: format!(
                                "every node running {} is busy, and {} jobs wait already",
                                job.language,
                                gw.waiting.load(Ordering::SeqCst)
                            ),
                        });
                    };
                    spot = Some((waiting, gw.line.join(&line_key)));
                }
                let _waiting = metrics::waiting();
                tokio::select! {
                    () = freed => {}
                    () = tokio::time::sleep_until(deadline) => {}
                }
                waited += now.elapsed();
                continue;
            }
        };

        let inflight = node.begin(Arc::clone(&gw.freed));
        // What is left of the job's wait may be spent in the agent's own queue.
        let queue_left = deadline.saturating_duration_since(Instant::now());
        let result = gw.dispatcher.attempt(&node, &job, queue_left).await;
        tried.push(node.id.clone());
        let failure = match result {
            Ok(reply) => {
                return Ok(Placed {
                    reply,
                    node: node.id.clone(),
                    attempts: tried.len() as u32,
                    waited,
                    inflight,
                })
            }
            Err(failure) => failure,
        };
        drop(inflight);
        if matches!(failure, AttemptError::Refused(_)) {
            gw.mark_unreachable(&node);
        }
        let may_retry = failure.not_started()
            && tried.len() < config.max_attempts as usize
            && gw.dispatcher.budget.withdraw();
        if !may_retry {
            return Err(failure.into_error(&node.id));
        }
        tracing::info!(node = %node.id, language = job.language, error = %failure, "trying another node");
        metrics::retry(failure.reason());
        last_failure = Some((node.id.clone(), failure));
    }
}

/// Sends a request bound to one node (a session's): counted in flight, never sent elsewhere.
pub async fn call_bound(
    gw: &Gateway,
    node: &Arc<NodeHandle>,
    method: Method,
    path: &str,
    body: Option<Bytes>,
    timeout: Duration,
) -> Result<Reply, GatewayError> {
    let _inflight = node.begin(Arc::clone(&gw.freed));
    let result = match (method, body) {
        // A session's execution may wait in the agent's queue like any job.
        (Method::POST, Some(body)) => {
            let wait = gw.config().queue_wait();
            let timeout = timeout + wait;
            gw.dispatcher
                .call_queued(node, path, body, timeout, wait)
                .await
        }
        (method, body) => gw.dispatcher.call(node, method, path, body, timeout).await,
    };
    result.map_err(|failure| bound_failure(node, failure))
}

/// A session's execution asking for the NDJSON stream: like [`call_bound`], with the job
/// counted in flight until the returned stream ends.
pub async fn stream_bound(
    gw: &Gateway,
    node: &Arc<NodeHandle>,
    path: &str,
    body: Bytes,
    timeout: Duration,
) -> Result<Placed, GatewayError> {
    let inflight = node.begin(Arc::clone(&gw.freed));
    let wait = gw.config().queue_wait();
    let call = Call {
        method: Method::POST,
        path,
        body: Some(body),
        timeout: timeout + wait,
        queue_wait: Some(wait),
        stream: true,
    };
    let reply = gw.dispatcher.send(node, call).await;
    Ok(Placed {
        reply: reply.map_err(|failure| bound_failure(node, failure))?,
        node: node.id.clone(),
        attempts: 1,
        waited: Duration::ZERO,
        inflight,
    })
}

fn bound_failure(node: &NodeHandle, failure: AttemptError) -> GatewayError {
    match failure {
        AttemptError::NotStarted(problem) => GatewayError::Agent {
            node: node.id.to_string(),
            problem,
        },
        // The session lives on this node only: a node that cannot be reached has lost it.
        lost => GatewayError::NodeLost {
            node: node.id.to_string(),
            reason: lost.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unstarted_attempts_are_retried() {
        let busy = Problem::new(ErrorCode::NoCapacity, "full");
        let table = [
            (
                AttemptError::Refused("refused".into()),
                true,
                ErrorCode::NoCapacity,
            ),
            (AttemptError::NotStarted(busy), true, ErrorCode::NoCapacity),
            (
                AttemptError::Dropped("closed before accepted".into()),
                true,
                ErrorCode::NodeLost,
            ),
            (
                AttemptError::Lost("reset".into()),
                false,
                ErrorCode::NodeLost,
            ),
            (
                AttemptError::TimedOut(Duration::from_secs(1)),
                false,
                ErrorCode::NodeLost,
            ),
        ];
        for (failure, retry, code) in table {
            assert_eq!(failure.not_started(), retry, "{failure:?}");
            assert_eq!(failure.into_error(&NodeId::new("a")).problem().code, code);
        }
    }

    #[test]
    fn a_job_joins_the_wait_only_when_its_turn_fits() {
        let ms = Duration::from_millis;
        // (waiting, length, mean gap, left) -> admitted
        let table = [
            ((0, 4, None, ms(1)), true), // nothing known: the length decides
            ((3, 4, None, ms(1)), true),
            ((4, 4, None, ms(30_000)), false),          // full
            ((6, 40, Some(ms(100)), ms(1_000)), true),  // its turn in 0.7 s, 1 s left
            ((7, 40, Some(ms(100)), ms(1_000)), false), // 0.8 s needed: more than 3/4
            ((9, 40, Some(ms(100)), ms(1_000)), false),
            ((0, 40, Some(ms(100)), ms(50)), false),
            ((39, 40, Some(ms(1)), ms(1_000)), true),
        ];
        for ((waiting, length, gap, left), want) in table {
            assert_eq!(
                admit(waiting, length, gap, left),
                want,
                "{:?}",
                (waiting, length, gap, left)
            );
        }
    }

    #[test]
    fn departures_give_the_mean_gap_of_a_backlogged_wait_that_goes_stale() {
        let d = Departures::default();
        let t0 = std::time::Instant::now();
        let (ms, s) = (Duration::from_millis, Duration::from_secs);
        assert_eq!(d.mean_gap(t0, s(2)), None);
        d.record(t0, 3);
        assert_eq!(d.mean_gap(t0, s(2)), None, "one departure is no rate");
        d.record(t0 + ms(100), 2);
        assert_eq!(d.mean_gap(t0 + ms(100), s(2)), Some(ms(100)));
        d.record(t0 + ms(700), 0); // it left nobody waiting
        assert_eq!(d.mean_gap(t0 + ms(700), s(2)), Some(ms(350)));
        // The next gap started with nobody waiting: it says how seldom jobs wait, not how
        // fast they are served, and does not count.
        d.record(t0 + ms(1_900), 1);
        assert_eq!(d.mean_gap(t0 + ms(1_900), s(2)), Some(ms(350)));
        d.record(t0 + ms(2_000), 1);
        assert_eq!(d.mean_gap(t0 + ms(2_000), s(2)), Some(ms(800) / 3));
        assert_eq!(d.mean_gap(t0 + s(5), s(2)), None, "stale");
        // Only the last WINDOW gaps count.
        let mut at = t0 + ms(2_000);
        for _ in 0..Departures::WINDOW {
            at += ms(10);
            d.record(at, 1);
        }
        assert_eq!(d.mean_gap(at, s(2)), Some(ms(10)));
    }

    #[test]
    fn retry_budget_is_a_fifth_of_jobs_plus_a_reserve() {
        let budget = RetryBudget::new();
        for _ in 0..10 {
            assert!(budget.withdraw());
        }
        assert!(!budget.withdraw());
        for _ in 0..4 {
            budget.deposit();
        }
        assert!(!budget.withdraw());
        budget.deposit();
        assert!(budget.withdraw());
        for _ in 0..10_000 {
            budget.deposit();
        }
        let banked = (0..1_000).take_while(|_| budget.withdraw()).count();
        assert_eq!(banked, 100);
    }

    #[test]
    fn timeout_is_limits_plus_margin() {
        let timeout = job_timeout(&ResolvedLimits::DEFAULT, Duration::from_secs(5));
        assert_eq!(timeout, Duration::from_secs(20));
    }

    #[test]
    fn agent_problems_pass_through_with_retry_after() {
        let node = NodeId::new("a");
        let reply = |status: u16, body: &str, retry_after| Reply {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from(body.to_string()),
            retry_after,
            upstream: None,
        };
        let missing =
            serde_json::to_string(&Problem::new(ErrorCode::NotFound, "no session")).unwrap();
        let err = reply(404, &missing, None)
            .expect(StatusCode::OK, &node)
            .unwrap_err();
        assert_eq!(err.problem().code, ErrorCode::NotFound);
        let busy = serde_json::to_string(&Problem::new(ErrorCode::NoCapacity, "full")).unwrap();
        let err = reply(503, &busy, Some(7))
            .expect(StatusCode::OK, &node)
            .unwrap_err();
        assert_eq!(err.problem().retry_after_s, Some(7));
        let err = reply(503, &busy, None)
            .expect(StatusCode::OK, &node)
            .unwrap_err();
        assert_eq!(err.problem().retry_after_s, Some(1));
        let err = reply(500, "oops", None)
            .expect(StatusCode::OK, &node)
            .unwrap_err();
        assert_eq!(err.problem().code, ErrorCode::Internal);
        let denied =
            serde_json::to_string(&Problem::new(ErrorCode::Unauthorized, "token")).unwrap();
        let err = reply(401, &denied, None)
            .expect(StatusCode::OK, &node)
            .unwrap_err();
        assert_eq!(
            err.problem().code,
            ErrorCode::Internal,
            "a token mismatch is ours"
        );
        assert!(reply(200, "{}", None).expect(StatusCode::OK, &node).is_ok());
    }
}
