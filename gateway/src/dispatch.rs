//! Dispatch: sending a job to a node over one pooled HTTP client, racing the answer against the
//! node being lost, waiting a bounded time when every node is full, and trying the next node only
//! when the previous one cannot have started the job.

use std::error::Error as _;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{header, Method, StatusCode};
use codefleet_shared::cluster::QUEUE_WAIT_HEADER;
use codefleet_shared::{ErrorCode, Problem, ResolvedLimits};
use tokio::time::Instant;

use crate::error::GatewayError;
use crate::line::Place;
use crate::membership::NodeHandle;
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
}

/// An agent's answer, whatever its status.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub body: Bytes,
    retry_after: Option<u64>,
}

impl Reply {
    /// The answer's problem body, with its `Retry-After`, if it is one.
    fn problem(&self) -> Option<Problem> {
        let mut problem: Problem = serde_json::from_slice(&self.body).ok()?;
        problem.retry_after_s = self.retry_after.or(problem.code.default_retry_after());
        Some(problem)
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
    /// The agent answered 503 `no_capacity` or `language_unavailable`: it did not start the job.
    #[error("{}", .0.detail)]
    Busy(Problem),
    /// The request was sent and then the connection failed, or membership lost the node.
    #[error("{0}")]
    Lost(String),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
}

impl AttemptError {
    /// True when the node cannot have started the job, so another node may run it.
    pub fn not_started(&self) -> bool {
        matches!(self, AttemptError::Refused(_) | AttemptError::Busy(_))
    }

    fn reason(&self) -> &'static str {
        match self {
            AttemptError::Refused(_) => "refused",
            AttemptError::Busy(p) if p.code == ErrorCode::LanguageUnavailable => {
                "language_unavailable"
            }
            AttemptError::Busy(_) => "no_capacity",
            AttemptError::Lost(_) => "lost",
            AttemptError::TimedOut(_) => "timeout",
        }
    }

    /// The answer for a job that ends with this error on `node`.
    fn into_error(self, node: &NodeId) -> GatewayError {
        let node = node.to_string();
        match self {
            AttemptError::Refused(reason) => GatewayError::NoCapacity {
                detail: format!("no node could take the job; the last, {node}, {reason}"),
            },
            AttemptError::Busy(problem) => GatewayError::Agent { node, problem },
            lost @ (AttemptError::Lost(_) | AttemptError::TimedOut(_)) => GatewayError::NodeLost {
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
        })
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
        let wait = queue_wait.as_millis().to_string();
        let header = (QUEUE_WAIT_HEADER, wait.as_str());
        self.send(node, Method::POST, path, Some(body), timeout, Some(header))
            .await
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
        self.send(node, method, path, body, timeout, None).await
    }

    async fn send(
        &self,
        node: &NodeHandle,
        method: Method,
        path: &str,
        body: Option<Bytes>,
        timeout: Duration,
        header: Option<(&'static str, &str)>,
    ) -> Result<Reply, AttemptError> {
        if node.is_lost() {
            return Err(AttemptError::Refused("the node is down".to_string()));
        }
        let mut request = self
            .client
            .request(method, format!("{}{path}", node.address))
            .timeout(timeout);
        if let Some((name, value)) = header {
            request = request.header(name, value);
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
            let body = response.bytes().await.map_err(|e| classify(e, timeout))?;
            Ok(Reply {
                status,
                body,
                retry_after,
            })
        };
        let reply = tokio::select! {
            reply = exchange => reply?,
            () = node.lost() => {
                return Err(AttemptError::Lost("the node stopped reporting".to_string()));
            }
        };
        if reply.status == StatusCode::SERVICE_UNAVAILABLE {
            if let Some(problem) = reply.problem() {
                if matches!(
                    problem.code,
                    ErrorCode::NoCapacity | ErrorCode::LanguageUnavailable
                ) {
                    return Err(AttemptError::Busy(problem));
                }
            }
        }
        Ok(reply)
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
    /// Agent path, e.g. `/v1/execute`.
    pub path: &'static str,
    pub body: Bytes,
    pub timeout: Duration,
}

/// Where and how a job ran.
pub struct Placed {
    pub reply: Reply,
    pub node: NodeId,
    pub attempts: u32,
    /// Time spent waiting at the gateway for a node with room.
    pub waited: Duration,
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
    let line_key = format!("{}\0{}", job.language, job.version.unwrap_or(""));
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
            let want = Want {
                language: job.language,
                version: job.version,
                exclude: &tried,
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
        let result = gw
            .dispatcher
            .call_queued(
                &node,
                job.path,
                job.body.clone(),
                job.timeout + queue_left,
                queue_left,
            )
            .await;
        drop(inflight);
        tried.push(node.id.clone());
        let failure = match result {
            Ok(reply) => {
                return Ok(Placed {
                    reply,
                    node: node.id.clone(),
                    attempts: tried.len() as u32,
                    waited,
                })
            }
            Err(failure) => failure,
        };
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
    result.map_err(|failure| match failure {
        AttemptError::Busy(problem) => GatewayError::Agent {
            node: node.id.to_string(),
            problem,
        },
        // The session lives on this node only: a node that cannot be reached has lost it.
        lost => GatewayError::NodeLost {
            node: node.id.to_string(),
            reason: lost.to_string(),
        },
    })
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
            (AttemptError::Busy(busy), true, ErrorCode::NoCapacity),
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
