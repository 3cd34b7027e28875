//! codefleet's gateway: the public API of `docs/api.md`, spreading jobs over node agents with
//! bounded-load consistent hashing on the language.
//!
//! - `config`: flags and `CODEFLEET_*` variables.
//! - `edge`: API keys, quotas, the cluster token, JSON bodies (media type, size, depth, time).
//! - `handlers`: one function per endpoint; parse at the edge, then act.
//! - `membership`: agents' reports, ready/draining/down, and the snapshot requests read.
//! - `routing`: the pure routing decision (no I/O, no clock).
//! - `dispatch`: the pooled client to agents, waiting for room, retries, `node_lost`.
//! - `stream`: NDJSON answers passed through line by line, `node_lost` at a cut, the stall limit.
//! - `connect`: `GET /v1/connect`, a client's WebSocket relayed to an agent's.
//! - `judge0`: Judge0 CE's API (`/submissions`, `/languages`, ...), translated to the native one.
//! - `submissions`: `/v1/submissions`, stored on a node, polled and cancelled by token.
//! - `piston`: a Piston v2-compatible API under `/api/v2/`, translated onto the native job path.
//! - `error`: every failure and its problem+json answer.
//! - `metrics`: what `/metrics` exports.
#![forbid(unsafe_code)]

mod batch;
pub mod config;
mod connect;
pub mod dispatch;
pub mod edge;
pub mod error;
mod handlers;
mod judge;
mod judge0;
mod line;
pub mod membership;
pub mod metrics;
pub mod piston;
pub mod routing;
pub mod stream;
pub mod submissions;

use std::future::Future;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use codefleet_shared::cluster::{CapacityReport, NodeInfo, NodeState};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::Notify;

pub use config::Config;
pub use error::GatewayError;
pub use handlers::router;

use dispatch::Dispatcher;
use edge::Keys;
use membership::{Membership, NodeHandle, Snapshot};

/// The gateway's shared state: one per process, behind an `Arc`, handed to every handler.
pub struct Gateway {
    config: Config,
    keys: Keys,
    membership: Mutex<Membership>,
    /// The current snapshot; rebuilt under the membership lock and swapped whole.
    snapshot: RwLock<Arc<Snapshot>>,
    dispatcher: Dispatcher,
    /// Notified whenever a node may have room again, for jobs waiting for one.
    freed: Arc<Notify>,
    /// Jobs waiting here for a node with room (bounded by `--queue-length`).
    waiting: std::sync::atomic::AtomicU32,
    /// How fast waiting jobs get a node, for the expected wait of one that would join them.
    departures: dispatch::Departures,
    /// The order in which waiting jobs get nodes.
    line: line::WaitLine,
    metrics: PrometheusHandle,
}

impl Gateway {
    /// Checks `config` and builds the state. Starts no task: [`serve`] does.
    pub fn new(config: Config) -> anyhow::Result<Arc<Gateway>> {
        let config = config.validate()?;
        let freed = Arc::new(Notify::new());
        Ok(Arc::new(Gateway {
            keys: Keys::new(&config, Instant::now()),
            membership: Mutex::new(Membership::new(
                config.report_interval(),
                config.missed_reports,
            )),
            snapshot: RwLock::new(Arc::new(Snapshot::empty(config.vnodes))),
            dispatcher: Dispatcher::new(&config)?,
            line: line::WaitLine::new(Arc::clone(&freed)),
            freed,
            waiting: std::sync::atomic::AtomicU32::new(0),
            departures: dispatch::Departures::default(),
            metrics: metrics::handle(),
            config,
        }))
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The snapshot requests route on.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        Arc::clone(&self.snapshot.read().expect("snapshot lock"))
    }

    /// Takes an agent's capacity report, received at `now`.
    pub fn report(&self, report: CapacityReport, now: Instant) -> Result<(), GatewayError> {
        let mut membership = self.membership();
        if membership.report(report, now)? {
            self.publish(&membership);
        }
        // Its busy count may have dropped: waiting jobs look again.
        self.freed.notify_waiters();
        Ok(())
    }

    /// Marks down the nodes that missed too many reports by `now`.
    pub fn sweep(&self, now: Instant) {
        let mut membership = self.membership();
        if membership.sweep(now) {
            self.publish(&membership);
        }
    }

    /// Probes `/healthz` of every node that is late with a report while jobs of ours run on
    /// it; one that does not answer within `PROBE_TIMEOUT` is marked down at once, so its
    /// in-flight clients get `node_lost` within about two seconds of a silent death.
    fn probe_overdue(self: &Arc<Self>, client: &reqwest::Client, now: Instant) {
        let late_after = self.config.report_interval() + self.config.report_interval() / 4;
        let overdue = self.membership().overdue(now, late_after);
        for node in overdue {
            if node.probing.swap(true, std::sync::atomic::Ordering::SeqCst) {
                continue;
            }
            let gw = Arc::clone(self);
            let probe = client
                .get(format!("{}/healthz", node.address))
                .timeout(PROBE_TIMEOUT)
                .send();
            tokio::spawn(async move {
                let alive = matches!(probe.await, Ok(r) if r.status().is_success());
                if !alive {
                    let mut membership = gw.membership();
                    if membership.mark_lost(node.id.as_str(), now) {
                        gw.publish(&membership);
                    }
                }
                node.probing
                    .store(false, std::sync::atomic::Ordering::SeqCst);
            });
        }
    }

    /// Stops routing new work to `id`. Returns the node, to tell its agent.
    pub fn drain(&self, id: &str) -> Result<Arc<NodeHandle>, GatewayError> {
        let mut membership = self.membership();
        let node = membership.drain(id).ok_or_else(|| no_node(id))?;
        self.publish(&membership);
        Ok(node)
    }

    /// Forgets `id` (it registers again if it reports again).
    pub fn remove(&self, id: &str) -> Result<(), GatewayError> {
        let mut membership = self.membership();
        if !membership.remove(id) {
            return Err(no_node(id));
        }
        self.publish(&membership);
        Ok(())
    }

    /// `GET /v1/nodes`.
    pub fn nodes(&self) -> Vec<NodeInfo> {
        let shares = self.snapshot().table.shares();
        self.membership().node_infos(&shares)
    }

    /// A node by id, for requests bound to it.
    pub fn node(&self, id: &str) -> Option<(Arc<NodeHandle>, NodeState)> {
        self.membership().node(id)
    }

    fn mark_unreachable(&self, node: &NodeHandle) {
        let mut membership = self.membership();
        if membership.mark_unreachable(node) {
            tracing::warn!(node = %node.id, "node refused a connection; skipped until it reports");
            self.publish(&membership);
        }
    }

    fn membership(&self) -> std::sync::MutexGuard<'_, Membership> {
        self.membership.lock().expect("membership lock")
    }

    /// Rebuilds the snapshot from `membership` (whose lock the caller holds) and swaps it in.
    fn publish(&self, membership: &Membership) {
        let next = Arc::new(membership.snapshot(&self.snapshot()));
        *self.snapshot.write().expect("snapshot lock") = next;
        metrics::ring_members(
            [NodeState::Ready, NodeState::Draining, NodeState::Down]
                .map(|state| (state, membership.count(state))),
        );
        self.freed.notify_waiters();
    }
}

fn no_node(id: &str) -> GatewayError {
    GatewayError::NotFound(format!("no node {id:?}"))
}

/// Serves the gateway on `listener` until `shutdown` resolves, then lets open requests finish.
/// Also runs the housekeeping: marking silent nodes down, and metrics upkeep. The HTTP edge
/// (connection cap, header and body timeouts, problems for what hyper rejects) is
/// `codefleet_http_edge::serve`, shared with the agent.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let gw = Gateway::new(config)?;
    let app = router(Arc::clone(&gw));
    let housekeeping = tokio::spawn(housekeeping(Arc::clone(&gw)));
    tracing::info!(address = %listener.local_addr()?, "gateway listening");
    let stopping = async {
        shutdown.await;
        tracing::info!("shutting down: waiting for open requests");
    };
    codefleet_http_edge::serve(listener, app, gw.config.edge_limits(), stopping).await;
    housekeeping.abort();
    Ok(())
}

/// How long a late node has to answer a liveness probe.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);

async fn housekeeping(gw: Arc<Gateway>) {
    let tick = (gw.config.report_interval() / 4).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_upkeep = Instant::now();
    let probes = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("a plain HTTP client always builds");
    loop {
        ticker.tick().await;
        gw.sweep(Instant::now());
        gw.probe_overdue(&probes, Instant::now());
        if last_upkeep.elapsed() >= Duration::from_secs(5) {
            gw.metrics.run_upkeep();
            last_upkeep = Instant::now();
        }
    }
}
