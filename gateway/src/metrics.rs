//! Metrics: every name, label and unit the gateway exports, in one place (Prometheus text at
//! `/metrics`; `codefleet_` prefix, base units, `_total` counters).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use codefleet_shared::api::ImageState;
use codefleet_shared::cluster::{NodeInfo, NodeState};
use codefleet_shared::ErrorCode;
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::Instrument;

use crate::routing::NodeId;

const REQUESTS: &str = "codefleet_requests_total";
const REQUEST_SECONDS: &str = "codefleet_request_duration_seconds";
const ROUTING_SECONDS: &str = "codefleet_routing_duration_seconds";
const NODE_INFLIGHT: &str = "codefleet_node_inflight_jobs";
const RING_MEMBERS: &str = "codefleet_ring_members";
const RETRIES: &str = "codefleet_retries_total";
const REJECTIONS: &str = "codefleet_rejections_total";
const WAIT_QUEUE: &str = "codefleet_wait_queue_depth";
const JOB_SECONDS: &str = "codefleet_job_duration_seconds";
const NODE_STATE: &str = "codefleet_node_state";
const NODE_SLOTS: &str = "codefleet_node_slots";
const NODE_SLOTS_BUSY: &str = "codefleet_node_slots_busy";
const NODE_WARM: &str = "codefleet_node_warm_sandboxes";
const NODE_IMAGE: &str = "codefleet_node_image_state";
const STREAMS: &str = "codefleet_streams_total";
const STREAMS_OPEN: &str = "codefleet_streams_open";
const JUDGE0_SUBMISSIONS: &str = "codefleet_judge0_submissions_total";
const JUDGE0_RESULTS: &str = "codefleet_judge0_results_total";

/// The process-wide recorder, shared with an in-process agent (`--dev`) and with the many
/// gateways tests build in one process.
pub fn handle() -> PrometheusHandle {
    static DESCRIBED: OnceLock<()> = OnceLock::new();
    let handle = codefleet_http_edge::metrics::prometheus().clone();
    DESCRIBED.get_or_init(describe);
    handle
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        REQUESTS,
        "Requests answered, by route, language, status and error code."
    );
    describe_histogram!(
        REQUEST_SECONDS,
        Unit::Seconds,
        "End-to-end request latency, by route."
    );
    describe_histogram!(
        ROUTING_SECONDS,
        Unit::Seconds,
        "Time to pick a node for a job."
    );
    describe_gauge!(
        NODE_INFLIGHT,
        "Jobs this gateway has in flight on each node."
    );
    describe_gauge!(
        RING_MEMBERS,
        "Known nodes by state (ready, draining, down)."
    );
    describe_counter!(
        RETRIES,
        "Jobs sent to another node because one could not start them."
    );
    describe_counter!(
        REJECTIONS,
        "Requests refused at the edge or for capacity, by reason."
    );
    describe_gauge!(
        WAIT_QUEUE,
        "Jobs waiting at the gateway for a node with room."
    );
    describe_histogram!(
        JOB_SECONDS,
        Unit::Seconds,
        "End-to-end latency of requests for a language (execute, sessions), by route and language."
    );
    describe_gauge!(
        NODE_STATE,
        "1 on each node's state (ready, draining, down) as this gateway sees it, 0 on the others."
    );
    describe_counter!(
        STREAMS,
        "Streamed jobs (NDJSON answers, /v1/connect sockets) ended, by kind and outcome (result, error, node_lost, bad_answer, stalled, client_gone, idle, refused)."
    );
    describe_gauge!(
        STREAMS_OPEN,
        "Streamed jobs being relayed now, by kind (ndjson, connect)."
    );
    describe_counter!(
        JUDGE0_SUBMISSIONS,
        "Submissions taken through the Judge0 API, by mode (wait, async)."
    );
    describe_counter!(
        JUDGE0_RESULTS,
        "Judge0 statuses of the Judge0 API's wait=true answers, by status id."
    );
    describe_gauge!(NODE_SLOTS, "Slots each node reported.");
    describe_gauge!(NODE_SLOTS_BUSY, "Busy slots in each node's last report.");
    describe_gauge!(
        NODE_WARM,
        "Warm sandboxes in each node's last report, by language."
    );
    describe_gauge!(
        NODE_IMAGE,
        "1 on the state (preparing, ready, failed) of each node's image of a language, 0 on the others."
    );
}

/// The language a response was for, left in its extensions by handlers for [`track`].
#[derive(Debug, Clone)]
pub struct LanguageLabel(pub String);

/// Middleware: gives every request a span with a `request_id`, then counts and times its answer,
/// labelled by matched route (never the raw path).
pub async fn track(request: Request, next: Next) -> Response {
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);
    let start = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let request_id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("request", request_id, route = %route);
    let response = next.run(request).instrument(span).await;
    let language = response
        .extensions()
        .get::<LanguageLabel>()
        .map_or(String::new(), |l| l.0.clone());
    let code = response
        .extensions()
        .get::<ErrorCode>()
        .map_or("none", |c| c.as_str());
    let status = response.status().as_u16().to_string();
    counter!(REQUESTS, "route" => route.clone(), "language" => language.clone(), "status" => status, "code" => code)
        .increment(1);
    if !language.is_empty() {
        histogram!(JOB_SECONDS, "route" => route.clone(), "language" => language)
            .record(start.elapsed());
    }
    histogram!(REQUEST_SECONDS, "route" => route).record(start.elapsed());
    response
}

pub fn routing_decision(took: Duration) {
    histogram!(ROUTING_SECONDS).record(took);
}

pub fn node_inflight(node: &NodeId, jobs: u32) {
    gauge!(NODE_INFLIGHT, "node" => node.to_string()).set(jobs);
}

pub fn ring_members(counts: [(NodeState, usize); 3]) {
    for (state, count) in counts {
        let state = match state {
            NodeState::Ready => "ready",
            NodeState::Draining => "draining",
            NodeState::Down => "down",
        };
        gauge!(RING_MEMBERS, "state" => state).set(count as f64);
    }
}

/// `reason`: why the first node could not start the job (`refused`, `no_capacity`, ...).
pub fn retry(reason: &'static str) {
    counter!(RETRIES, "reason" => reason).increment(1);
}

/// `reason`: `unauthorized`, `rate_limited`, `concurrency`, `payload_too_large`, `no_capacity`,
/// `language_unavailable`.
/// A submission taken through the Judge0 API: `wait` (run before the answer) or `async`.
pub fn judge0_submission(mode: &'static str) {
    counter!(JUDGE0_SUBMISSIONS, "mode" => mode).increment(1);
}

/// The Judge0 status of a `wait=true` answer.
pub fn judge0_result(status: u8) {
    counter!(JUDGE0_RESULTS, "status" => status.to_string()).increment(1);
}

pub fn rejection(reason: &'static str) {
    counter!(REJECTIONS, "reason" => reason).increment(1);
}

/// Jobs waiting for room while the returned guard lives.
pub fn waiting() -> WaitGuard {
    gauge!(WAIT_QUEUE).increment(1.0);
    WaitGuard
}

pub struct WaitGuard;

impl Drop for WaitGuard {
    fn drop(&mut self) {
        gauge!(WAIT_QUEUE).decrement(1.0);
    }
}

/// What kind of stream a job's answer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Ndjson,
    Connect,
}

impl StreamKind {
    fn as_str(self) -> &'static str {
        match self {
            StreamKind::Ndjson => "ndjson",
            StreamKind::Connect => "connect",
        }
    }
}

/// How a streamed job's relay ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamOutcome {
    /// The agent's `result` reached the client.
    Result,
    /// The agent's own `error` event (or close) reached the client.
    Error,
    /// The node went away first: the client got the gateway's `node_lost`.
    NodeLost,
    /// The node sent what the gateway cannot pass on: the client got an `internal_error`.
    BadAnswer,
    /// The client stopped reading for `--stream-stall-ms`: disconnected.
    Stalled,
    /// The client went away (closed, or disconnected) first.
    ClientGone,
    /// `/v1/connect` passed `--connect-idle-ms` without a message.
    Idle,
    /// `/v1/connect`: the client sent what the gateway refuses (a bad or too large message).
    Refused,
}

impl StreamOutcome {
    fn as_str(self) -> &'static str {
        match self {
            StreamOutcome::Result => "result",
            StreamOutcome::Error => "error",
            StreamOutcome::NodeLost => "node_lost",
            StreamOutcome::BadAnswer => "bad_answer",
            StreamOutcome::Stalled => "stalled",
            StreamOutcome::ClientGone => "client_gone",
            StreamOutcome::Idle => "idle",
            StreamOutcome::Refused => "refused",
        }
    }
}

/// A stream counted open until [`OpenStream::close`] counts its outcome (or it drops).
pub fn stream_opened(kind: StreamKind) -> OpenStream {
    gauge!(STREAMS_OPEN, "kind" => kind.as_str()).increment(1.0);
    OpenStream { kind }
}

pub struct OpenStream {
    kind: StreamKind,
}

impl OpenStream {
    pub fn close(self, outcome: StreamOutcome) {
        counter!(STREAMS, "kind" => self.kind.as_str(), "outcome" => outcome.as_str()).increment(1);
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        gauge!(STREAMS_OPEN, "kind" => self.kind.as_str()).decrement(1.0);
    }
}

/// The fleet as this gateway sees it (`GET /v1/nodes`), exported when `/metrics` is scraped so it
/// is never older than the last report. A node or language that left since the previous call has
/// its gauges set to 0, so sums over nodes stay true after a `DELETE /v1/nodes/{id}`.
pub fn fleet(nodes: &[NodeInfo]) {
    static EXPORTED: Mutex<BTreeMap<String, BTreeSet<String>>> = Mutex::new(BTreeMap::new());
    const STATES: [(NodeState, &str); 3] = [
        (NodeState::Ready, "ready"),
        (NodeState::Draining, "draining"),
        (NodeState::Down, "down"),
    ];
    const IMAGES: [(ImageState, &str); 3] = [
        (ImageState::Preparing, "preparing"),
        (ImageState::Ready, "ready"),
        (ImageState::Failed, "failed"),
    ];
    let one_if = |yes: bool| if yes { 1.0 } else { 0.0 };
    let mut exported = EXPORTED.lock().unwrap_or_else(|e| e.into_inner());
    let mut now: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for node in nodes {
        let id = node.id.clone();
        for (state, name) in STATES {
            gauge!(NODE_STATE, "node" => id.clone(), "state" => name)
                .set(one_if(node.state == state));
        }
        gauge!(NODE_SLOTS, "node" => id.clone()).set(node.slots_total);
        gauge!(NODE_SLOTS_BUSY, "node" => id.clone()).set(node.slots_busy);
        for (language, info) in &node.languages {
            gauge!(NODE_WARM, "node" => id.clone(), "language" => language.clone()).set(info.warm);
            for (image, name) in IMAGES {
                gauge!(NODE_IMAGE, "node" => id.clone(), "language" => language.clone(), "state" => name)
                    .set(one_if(info.image == image));
            }
        }
        now.insert(id, node.languages.keys().cloned().collect());
    }
    for (id, languages) in exported.iter() {
        let kept = now.get(id);
        if kept.is_none() {
            for (_, name) in STATES {
                gauge!(NODE_STATE, "node" => id.clone(), "state" => name).set(0.0);
            }
            gauge!(NODE_SLOTS, "node" => id.clone()).set(0.0);
            gauge!(NODE_SLOTS_BUSY, "node" => id.clone()).set(0.0);
        }
        for language in languages {
            if kept.is_some_and(|k| k.contains(language)) {
                continue;
            }
            gauge!(NODE_WARM, "node" => id.clone(), "language" => language.clone()).set(0.0);
            for (_, name) in IMAGES {
                gauge!(NODE_IMAGE, "node" => id.clone(), "language" => language.clone(), "state" => name)
                    .set(0.0);
            }
        }
    }
    *exported = now;
}
