//! The agent's configuration: one struct, from flags or `CODEFLEET_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::Parser;
use codefleet_shared::ResolvedLimits;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "codefleet-agent",
    version,
    about = "codefleet node agent: runs untrusted code in hardened Docker sandboxes"
)]
pub struct Config {
    /// Address to serve the agent API on.
    #[arg(long, env = "CODEFLEET_LISTEN", default_value = "127.0.0.1:7001")]
    pub listen: SocketAddr,

    /// This node's id; labels every container it creates. Letters, digits, `_` and `-`.
    #[arg(long, env = "CODEFLEET_NODE_ID", default_value = "agent-1", value_parser = parse_node_id)]
    pub node_id: String,

    /// A gateway to register with and report capacity to (repeatable).
    #[arg(long = "gateway", env = "CODEFLEET_GATEWAY", value_delimiter = ',')]
    pub gateways: Vec<String>,

    /// Base URL at which gateways reach this agent (default: http://<listen>).
    #[arg(long, env = "CODEFLEET_ADVERTISE")]
    pub advertise: Option<String>,

    /// A language catalog (TOML) to use instead of the built-in deploy/languages.toml.
    #[arg(long, env = "CODEFLEET_LANGUAGES")]
    pub languages: Option<PathBuf>,

    /// Serve only these languages (comma separated names or aliases; default: all in the
    /// catalog). A name enables every runtime of its language, an alias the runtimes that list
    /// it (`java17`: only Java 17).
    #[arg(long, env = "CODEFLEET_ENABLE", value_delimiter = ',')]
    pub enable: Vec<String>,

    /// When set, `/v1/*` needs `Authorization: Bearer <token>`.
    #[arg(long, env = "CODEFLEET_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// Path of the statically linked supervisor binary mounted into every sandbox.
    #[arg(long, env = "CODEFLEET_SUPERVISOR")]
    pub supervisor: Option<PathBuf>,

    /// Folder of language image recipes (default: the recipes built into the binary).
    #[arg(long, env = "CODEFLEET_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,

    /// A registry (`host:port`) to pull images from: a runtime's `pull` image, else
    /// `codefleet-<image>:<hash>` before building it from its recipe.
    #[arg(long, env = "CODEFLEET_REGISTRY")]
    pub registry: Option<String>,

    /// The image cache this agent's images belong to (a label on each): housekeeping removes
    /// only images of its own cache. Agents of different catalogs on one engine need different
    /// caches.
    #[arg(long, env = "CODEFLEET_IMAGE_CACHE", default_value = "default")]
    pub image_cache: String,

    /// Seconds an image of this agent's cache stays after it was first seen stale (its runtime
    /// left the catalog, or its recipe changed) before it is removed.
    #[arg(long, env = "CODEFLEET_IMAGE_GRACE_S", default_value_t = 3_600)]
    pub image_grace_s: u64,

    /// Seconds between image housekeeping passes (disk use measured, stale images removed);
    /// 0 turns housekeeping off.
    #[arg(long, env = "CODEFLEET_IMAGE_HOUSEKEEPING_S", default_value_t = 60)]
    pub image_housekeeping_s: u64,

    /// Images prepared (found, pulled or built) at once.
    #[arg(long, env = "CODEFLEET_PREPARE_PARALLEL", default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..))]
    pub prepare_parallel: u64,

    /// How the agent talks to each sandbox's supervisor: `socket` (a unix socket in a
    /// root-only directory below `--run-dir`, mounted into the sandbox) or `attach` (the
    /// container's attach stream through dockerd).
    #[arg(long, env = "CODEFLEET_CHANNEL_KIND", value_enum, default_value_t = ChannelKind::Socket)]
    pub channel: ChannelKind,

    /// Host directory for the sandboxes' sockets (`<run-dir>/<node id>/...`).
    #[arg(long, env = "CODEFLEET_RUN_DIR", default_value_os_t = std::env::temp_dir().join("codefleet-run"))]
    pub run_dir: PathBuf,

    /// Jobs run at once on this node.
    #[arg(long, env = "CODEFLEET_SLOTS", default_value_t = 8)]
    pub slots: u32,

    /// The longest a job waits in the queue for a slot (a gateway may ask for less, with the
    /// `x-codefleet-queue-wait-ms` header) before 503 no_capacity.
    #[arg(long, env = "CODEFLEET_QUEUE_WAIT_MS", default_value_t = 30_000)]
    pub queue_wait_ms: u64,

    /// Jobs that may wait for a slot at once; one more is answered 503 no_capacity at once
    /// (default: four times `--slots`).
    #[arg(long, env = "CODEFLEET_QUEUE_LENGTH")]
    pub queue_length: Option<u32>,

    /// Warm sandboxes kept ready per language at least (default limits tier).
    #[arg(long, env = "CODEFLEET_POOL_MIN", default_value_t = 2)]
    pub pool_min: u32,

    /// Warm sandboxes kept per language at most.
    #[arg(long, env = "CODEFLEET_POOL_MAX", default_value_t = 8)]
    pub pool_max: u32,

    /// A sandbox is replaced after this many jobs.
    #[arg(long, env = "CODEFLEET_RECYCLE_AFTER", default_value_t = 100)]
    pub recycle_after: u32,

    /// The compile cache's size: compiled programs (the work dir after a compile stage that
    /// succeeded) kept in the agent's memory, least recently used dropped first; a program
    /// larger than an eighth of it is not kept. 0 turns the cache off.
    #[arg(long, env = "CODEFLEET_COMPILE_CACHE_BYTES", default_value_t = 256 << 20)]
    pub compile_cache_bytes: u64,

    /// Sessions held at once on this node.
    #[arg(long, env = "CODEFLEET_MAX_SESSIONS", default_value_t = 16)]
    pub max_sessions: u32,

    /// Default and maximum idle time of a session, seconds.
    #[arg(long, env = "CODEFLEET_SESSION_TTL_S", default_value_t = 600)]
    pub session_ttl_s: u64,
    #[arg(long, env = "CODEFLEET_SESSION_MAX_TTL_S", default_value_t = 3_600)]
    pub session_max_ttl_s: u64,

    /// CPUs each sandbox may use (CFS quota).
    #[arg(long, env = "CODEFLEET_SANDBOX_CPUS", default_value_t = 1.0)]
    pub sandbox_cpus: f64,

    /// Size of each sandbox's work dir and /tmp (tmpfs), bytes.
    #[arg(long, env = "CODEFLEET_SCRATCH_BYTES", default_value_t = 64 << 20)]
    pub scratch_bytes: u64,

    /// Largest request body, bytes.
    #[arg(long, env = "CODEFLEET_MAX_BODY_BYTES", default_value_t = 2 << 20)]
    pub max_body_bytes: usize,

    /// Deepest JSON nesting accepted in a request body.
    #[arg(long, env = "CODEFLEET_MAX_JSON_DEPTH", default_value_t = 32)]
    pub max_json_depth: usize,

    /// Seconds a client has to send its request headers (and an idle connection stays open).
    #[arg(long, env = "CODEFLEET_HEADER_TIMEOUT_S", default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..))]
    pub header_timeout_s: u64,

    /// Milliseconds a client has to send a request's whole body once its headers are in; then
    /// 408 request_timeout and the connection is closed.
    #[arg(long, env = "CODEFLEET_BODY_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub body_timeout_ms: u64,

    /// Connections open at once (gateways' pooled ones included); more wait to be accepted
    /// until one closes.
    #[arg(long, env = "CODEFLEET_MAX_CONNECTIONS", default_value_t = 1_024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// Milliseconds a streamed job's client (NDJSON or WebSocket) may take no event while
    /// events wait for it; then it is disconnected and its job killed.
    #[arg(long, env = "CODEFLEET_STREAM_STALL_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stream_stall_ms: u64,

    /// Seconds a `/v1/connect` WebSocket may stay open in all (the job's own limits still
    /// apply).
    #[arg(long, env = "CODEFLEET_WS_MAX_S", default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_max_s: u64,

    /// Seconds a `/v1/connect` WebSocket may go without a client message (the first, the
    /// execute body, included) while its job runs or before it starts.
    #[arg(long, env = "CODEFLEET_WS_IDLE_S", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..))]
    pub ws_idle_s: u64,

    /// Largest WebSocket message a client may send, bytes (the execute body included).
    #[arg(long, env = "CODEFLEET_WS_MAX_MESSAGE_BYTES", default_value_t = 2 << 20)]
    pub ws_max_message_bytes: usize,

    /// Seconds that in-flight jobs get to finish on SIGTERM.
    #[arg(long, env = "CODEFLEET_GRACE_S", default_value_t = 30)]
    pub grace_s: u64,

    /// Milliseconds between capacity reports to gateways.
    #[arg(long, env = "CODEFLEET_REPORT_INTERVAL_MS", default_value_t = 1_000)]
    pub report_interval_ms: u64,

    /// Default limits (`--default-wall-time-ms` etc.) and maxima (`--max-wall-time-ms` etc.).
    #[arg(long, env = "CODEFLEET_DEFAULT_WALL_TIME_MS", default_value_t = ResolvedLimits::DEFAULT.wall_time_ms)]
    pub default_wall_time_ms: u64,
    #[arg(long, env = "CODEFLEET_DEFAULT_CPU_TIME_MS", default_value_t = ResolvedLimits::DEFAULT.cpu_time_ms)]
    pub default_cpu_time_ms: u64,
    #[arg(long, env = "CODEFLEET_DEFAULT_MEMORY_BYTES", default_value_t = ResolvedLimits::DEFAULT.memory_bytes)]
    pub default_memory_bytes: u64,
    #[arg(long, env = "CODEFLEET_MAX_WALL_TIME_MS", default_value_t = ResolvedLimits::MAX.wall_time_ms)]
    pub max_wall_time_ms: u64,
    #[arg(long, env = "CODEFLEET_MAX_CPU_TIME_MS", default_value_t = ResolvedLimits::MAX.cpu_time_ms)]
    pub max_cpu_time_ms: u64,
    #[arg(long, env = "CODEFLEET_MAX_MEMORY_BYTES", default_value_t = ResolvedLimits::MAX.memory_bytes)]
    pub max_memory_bytes: u64,
    #[arg(long, env = "CODEFLEET_MAX_OUTPUT_BYTES", default_value_t = ResolvedLimits::MAX.output_bytes)]
    pub max_output_bytes: u64,
    #[arg(long, env = "CODEFLEET_MAX_PROCESSES", default_value_t = ResolvedLimits::MAX.processes)]
    pub max_processes: u64,

    /// The longest a Docker ping may take (readiness follows it), milliseconds.
    #[arg(long, env = "CODEFLEET_DOCKER_PING_TIMEOUT_MS", default_value_t = 3_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub docker_ping_timeout_ms: u64,

    /// The longest an inspect, list, attach or tag call to Docker may take, milliseconds.
    #[arg(long, env = "CODEFLEET_DOCKER_TIMEOUT_MS", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub docker_timeout_ms: u64,

    /// The longest creating, starting or removing a container may take, milliseconds.
    #[arg(long, env = "CODEFLEET_DOCKER_CONTAINER_TIMEOUT_MS", default_value_t = 30_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub docker_container_timeout_ms: u64,

    /// The longest building or pulling one image may take, seconds.
    #[arg(long, env = "CODEFLEET_DOCKER_BUILD_TIMEOUT_S", default_value_t = 1_800, value_parser = clap::value_parser!(u64).range(1..))]
    pub docker_build_timeout_s: u64,

    /// Folder of the submissions store (`<state dir>/<node id>.redb`, made on the first
    /// submission); default `<run-dir>/state`. An agent restarted with the same node id and
    /// folder runs the submissions it had accepted and not finished.
    #[arg(long, env = "CODEFLEET_STATE_DIR")]
    pub state_dir: Option<PathBuf>,

    /// Submissions accepted and waiting to run at most; one more is answered 503 no_capacity.
    #[arg(long, env = "CODEFLEET_SUBMISSION_QUEUE_LENGTH", default_value_t = 1_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub submission_queue_length: u32,

    /// Submissions that hold (or wait for) a slot at once; the other slots stay for synchronous
    /// jobs (default: half of `--slots`, at least one).
    #[arg(long, env = "CODEFLEET_SUBMISSION_CONCURRENCY")]
    pub submission_concurrency: Option<u32>,

    /// Seconds a finished submission is kept after it finished; then its token answers 404.
    #[arg(long, env = "CODEFLEET_SUBMISSION_TTL_S", default_value_t = 86_400, value_parser = clap::value_parser!(u64).range(1..))]
    pub submission_ttl_s: u64,

    /// Finished submissions kept at most; beyond it the oldest expire first.
    #[arg(long, env = "CODEFLEET_SUBMISSION_MAX_STORED", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub submission_max_stored: u64,

    /// The key that signs callbacks (`X-Codefleet-Signature: sha256=<HMAC-SHA256 of the
    /// body, hex>`). Without it, a submission with a `callback_url` is refused (400).
    #[arg(long, env = "CODEFLEET_CALLBACK_SECRET", hide_env_values = true)]
    pub callback_secret: Option<String>,

    /// Addresses callbacks may go to although they are loopback, private, link-local,
    /// unique-local, multicast or metadata ones: CIDRs (`127.0.0.1/32`, `fd00::/8`), addresses
    /// or host names (comma separated).
    #[arg(
        long = "callback-allow",
        env = "CODEFLEET_CALLBACK_ALLOW",
        value_delimiter = ','
    )]
    pub callback_allow: Vec<String>,

    /// Attempts to deliver one callback (each a POST that must answer 2xx) before giving up.
    #[arg(long, env = "CODEFLEET_CALLBACK_ATTEMPTS", default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub callback_attempts: u32,

    /// Milliseconds before the second attempt; each later one waits twice as long (at most a
    /// minute).
    #[arg(long, env = "CODEFLEET_CALLBACK_BACKOFF_MS", default_value_t = 1_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub callback_backoff_ms: u64,

    /// Milliseconds one callback attempt may take (connect, send, answer).
    #[arg(long, env = "CODEFLEET_CALLBACK_TIMEOUT_MS", default_value_t = 5_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub callback_timeout_ms: u64,

    /// Prepare (find or build) the language images, print their state, and exit.
    #[arg(long)]
    pub prepare_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ChannelKind {
    Socket,
    Attach,
}

/// The rule is `shared`'s, the same one gateways apply to reports and session ids.
fn parse_node_id(s: &str) -> Result<String, codefleet_shared::ids::IdError> {
    codefleet_shared::ids::NodeId::parse(s).map(|id| id.as_str().to_string())
}

impl Config {
    /// A configuration with every default, listening on `listen`, for embedding and tests.
    pub fn for_node(node_id: &str, listen: SocketAddr) -> Config {
        let mut config = Config::parse_from(["codefleet-agent"]);
        config.node_id = node_id.to_string();
        config.listen = listen;
        config
    }

    /// How many jobs may wait for a slot at once.
    pub fn queue_length(&self) -> u32 {
        self.queue_length.unwrap_or(self.slots.saturating_mul(4))
    }

    /// Where this node's submissions are stored.
    pub fn submissions_path(&self) -> PathBuf {
        let dir = self
            .state_dir
            .clone()
            .unwrap_or_else(|| self.run_dir.join("state"));
        dir.join(format!("{}.redb", self.node_id))
    }

    /// How many submissions hold or wait for a slot at once.
    pub fn submission_concurrency(&self) -> u32 {
        self.submission_concurrency
            .unwrap_or(self.slots / 2)
            .clamp(1, self.slots.max(1))
    }

    /// The limits of the HTTP edge: header and body timeouts, the connection cap.
    pub fn edge_limits(&self) -> codefleet_http_edge::EdgeLimits {
        codefleet_http_edge::EdgeLimits {
            header_timeout: std::time::Duration::from_secs(self.header_timeout_s),
            body_timeout: std::time::Duration::from_millis(self.body_timeout_ms),
            max_connections: usize::try_from(self.max_connections).unwrap_or(usize::MAX),
        }
    }

    /// How long each kind of Docker call may take.
    pub fn engine_timeouts(&self) -> crate::engine::Timeouts {
        use std::time::Duration;
        crate::engine::Timeouts {
            ping: Duration::from_millis(self.docker_ping_timeout_ms),
            call: Duration::from_millis(self.docker_timeout_ms),
            container: Duration::from_millis(self.docker_container_timeout_ms),
            build: Duration::from_secs(self.docker_build_timeout_s),
        }
    }

    /// This node's directory of sandbox sockets, when sockets are used.
    pub fn channel_root(&self) -> Option<PathBuf> {
        (self.channel == ChannelKind::Socket).then(|| self.run_dir.join(&self.node_id))
    }

    pub fn default_limits(&self) -> ResolvedLimits {
        ResolvedLimits {
            wall_time_ms: self.default_wall_time_ms,
            cpu_time_ms: self.default_cpu_time_ms,
            memory_bytes: self.default_memory_bytes,
            ..ResolvedLimits::DEFAULT
        }
    }

    pub fn max_limits(&self) -> ResolvedLimits {
        ResolvedLimits {
            wall_time_ms: self.max_wall_time_ms,
            cpu_time_ms: self.max_cpu_time_ms,
            memory_bytes: self.max_memory_bytes,
            output_bytes: self.max_output_bytes,
            processes: self.max_processes,
            ..ResolvedLimits::MAX
        }
    }

    /// The supervisor binary: the flag, else beside this executable, else the workspace's
    /// static build.
    pub fn supervisor_path(&self) -> Option<PathBuf> {
        if let Some(p) = &self.supervisor {
            return Some(p.clone());
        }
        let beside = std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("codefleet-supervisor-static")));
        let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../target/x86_64-unknown-linux-gnu/release/codefleet-supervisor");
        [beside, Some(workspace)]
            .into_iter()
            .flatten()
            .find(|p| p.is_file())
            .and_then(|p| p.canonicalize().ok())
    }
}
