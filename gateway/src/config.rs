//! The gateway's configuration: one struct, from flags or `CODEFLEET_*` environment variables,
//! checked once by [`Config::validate`] before anything starts.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use codefleet_shared::ResolvedLimits;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "codefleet-gateway",
    version,
    about = "codefleet gateway: the public API, spreading jobs over node agents"
)]
pub struct Config {
    /// Address to serve the public API on.
    #[arg(long, env = "CODEFLEET_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Also run a node agent in-process on the local Docker engine.
    #[arg(long, env = "CODEFLEET_DEV")]
    pub dev: bool,

    /// Node id of the `--dev` agent (default: `dev-<host name>-<port of --listen>`, so two
    /// `--dev` gateways on one machine never share one).
    #[arg(long, env = "CODEFLEET_DEV_NODE_ID")]
    pub dev_node_id: Option<String>,

    /// Token that agents present on reports, and that the gateway presents to agents.
    #[arg(long, env = "CODEFLEET_CLUSTER_TOKEN", hide_env_values = true)]
    pub cluster_token: Option<String>,

    /// An API key clients present as `Authorization: Bearer <key>` (repeatable). With no key
    /// configured, `/v1/*` is open.
    #[arg(
        long = "api-key",
        env = "CODEFLEET_API_KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Vec<String>,

    /// A file of API keys, one a line; blank lines and lines starting with `#` are skipped.
    #[arg(long, env = "CODEFLEET_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,

    /// The key for `/v1/nodes*` (also a client key when API keys are set). Without it, those
    /// routes are open only when no API key is set.
    #[arg(long, env = "CODEFLEET_ADMIN_KEY", hide_env_values = true)]
    pub admin_key: Option<String>,

    /// Requests per second each key may make, on average (token bucket refill rate).
    #[arg(long, env = "CODEFLEET_RATE_PER_S", default_value_t = 100.0)]
    pub rate_per_s: f64,

    /// Requests each key may make in a burst (token bucket size).
    #[arg(long, env = "CODEFLEET_BURST", default_value_t = 200)]
    pub burst: u32,

    /// Requests each key may have in flight at once.
    #[arg(long, env = "CODEFLEET_MAX_CONCURRENT_PER_KEY", default_value_t = 32)]
    pub max_concurrent_per_key: u32,

    /// Bounded-load factor `c`: no node gets more than `c` times the average load.
    #[arg(long, env = "CODEFLEET_BALANCE_FACTOR", default_value_t = 1.25)]
    pub balance_factor: f64,

    /// Virtual nodes per node on the hash ring.
    #[arg(long, env = "CODEFLEET_VNODES", default_value_t = 160)]
    pub vnodes: usize,

    /// Milliseconds between an agent's capacity reports.
    #[arg(long, env = "CODEFLEET_REPORT_INTERVAL_MS", default_value_t = 1_000)]
    pub report_interval_ms: u64,

    /// Reports a node may miss before it is marked down.
    #[arg(long, env = "CODEFLEET_MISSED_REPORTS", default_value_t = 3)]
    pub missed_reports: u32,

    /// Largest request body, bytes (413 above).
    #[arg(long, env = "CODEFLEET_MAX_BODY_BYTES", default_value_t = 2 << 20)]
    pub max_body_bytes: usize,

    /// Jobs one `POST /v1/batch` may carry (400 beyond).
    #[arg(long, env = "CODEFLEET_MAX_BATCH", default_value_t = codefleet_shared::batch::DEFAULT_MAX_BATCH)]
    pub max_batch: usize,

    /// Deepest JSON nesting accepted in a request body.
    #[arg(long, env = "CODEFLEET_MAX_JSON_DEPTH", default_value_t = 32)]
    pub max_json_depth: usize,

    /// The longest a job waits for a slot, at the gateway while every node is full and then in
    /// the agent's queue, before 503 no_capacity.
    #[arg(long, env = "CODEFLEET_QUEUE_WAIT_MS", default_value_t = 30_000)]
    pub queue_wait_ms: u64,

    /// Jobs that may wait at the gateway for a node with room; one more is answered 503
    /// no_capacity at once (default: four times the slots of the ready nodes).
    #[arg(long, env = "CODEFLEET_QUEUE_LENGTH")]
    pub queue_length: Option<u32>,

    /// Nodes tried per job, at most (retries happen only when a node cannot have started it).
    #[arg(long, env = "CODEFLEET_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,

    /// Added to a job's own time limits to get the gateway's timeout for the agent's answer.
    #[arg(long, env = "CODEFLEET_DISPATCH_MARGIN_MS", default_value_t = 5_000)]
    pub dispatch_margin_ms: u64,

    /// Milliseconds a streamed answer (NDJSON, or `/v1/connect`) may wait for a client that
    /// stopped reading; then the client is disconnected, and with it the node (which kills the
    /// job).
    #[arg(long, env = "CODEFLEET_STREAM_STALL_MS", default_value_t = 10_000)]
    pub stream_stall_ms: u64,

    /// Milliseconds a `/v1/connect` socket may pass with no message either way before the
    /// gateway closes it (4000); longer than any job's time limits, so the agent's own limits
    /// speak first.
    #[arg(long, env = "CODEFLEET_CONNECT_IDLE_MS", default_value_t = 120_000)]
    pub connect_idle_ms: u64,

    /// Seconds a client has to send its request headers (and an idle connection stays open).
    #[arg(long, env = "CODEFLEET_HEADER_TIMEOUT_S", default_value_t = 10)]
    pub header_timeout_s: u64,

    /// Milliseconds a client has to send a request's whole body once its headers are in; then
    /// 408 request_timeout and the connection is closed.
    #[arg(long, env = "CODEFLEET_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,

    /// Client connections open at once; more wait to be accepted until one closes.
    #[arg(long, env = "CODEFLEET_MAX_CONNECTIONS", default_value_t = 1_024)]
    pub max_connections: usize,

    /// Maxima a request's limits may ask for (400 limit_exceeds_max above).
    #[arg(long, env = "CODEFLEET_MAX_WALL_TIME_MS", default_value_t = ResolvedLimits::MAX.wall_time_ms)]
    pub max_wall_time_ms: u64,
    #[arg(long, env = "CODEFLEET_MAX_CPU_TIME_MS", default_value_t = ResolvedLimits::MAX.cpu_time_ms)]
    pub max_cpu_time_ms: u64,
    #[arg(long, env = "CODEFLEET_MAX_COMPILE_WALL_TIME_MS", default_value_t = ResolvedLimits::MAX.compile_wall_time_ms)]
    pub max_compile_wall_time_ms: u64,
    #[arg(long, env = "CODEFLEET_MAX_MEMORY_BYTES", default_value_t = ResolvedLimits::MAX.memory_bytes)]
    pub max_memory_bytes: u64,
    #[arg(long, env = "CODEFLEET_MAX_PROCESSES", default_value_t = ResolvedLimits::MAX.processes)]
    pub max_processes: u64,
    #[arg(long, env = "CODEFLEET_MAX_OUTPUT_BYTES", default_value_t = ResolvedLimits::MAX.output_bytes)]
    pub max_output_bytes: u64,
    #[arg(long, env = "CODEFLEET_MAX_FILE_SIZE_BYTES", default_value_t = ResolvedLimits::MAX.file_size_bytes)]
    pub max_file_size_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{flag} {why}")]
    Invalid { flag: &'static str, why: String },
    #[error("cannot read the API keys file {path}: {source}")]
    KeysFile {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl Default for Config {
    /// Every default, as if started with no flag (environment variables still apply).
    fn default() -> Config {
        Config::parse_from(["codefleet-gateway"])
    }
}

impl Config {
    /// Checks every value and reads the API keys file into `api_keys`.
    pub fn validate(mut self) -> Result<Config, ConfigError> {
        let bad = |flag, why: &str| {
            Err(ConfigError::Invalid {
                flag,
                why: why.to_string(),
            })
        };
        if let Some(path) = self.api_keys_file.take() {
            let text = std::fs::read_to_string(&path)
                .map_err(|source| ConfigError::KeysFile { path, source })?;
            let keys = text.lines().map(str::trim);
            self.api_keys.extend(
                keys.filter(|k| !k.is_empty() && !k.starts_with('#'))
                    .map(String::from),
            );
        }
        let keys = self.api_keys.iter().chain(&self.admin_key);
        if keys.chain(&self.cluster_token).any(|k| k.trim().is_empty()) {
            return bad("--api-key/--admin-key/--cluster-token", "must not be empty");
        }
        if !(self.balance_factor.is_finite() && self.balance_factor >= 1.0) {
            return bad("--balance-factor", "must be a number of at least 1.0");
        }
        if !(1..=1024).contains(&self.vnodes) {
            return bad("--vnodes", "must be between 1 and 1024");
        }
        if !(self.rate_per_s.is_finite() && self.rate_per_s > 0.0) {
            return bad("--rate-per-s", "must be positive");
        }
        let positive = [
            ("--burst", u64::from(self.burst)),
            (
                "--max-concurrent-per-key",
                self.max_concurrent_per_key.into(),
            ),
            ("--report-interval-ms", self.report_interval_ms),
            ("--missed-reports", self.missed_reports.into()),
            ("--max-body-bytes", self.max_body_bytes as u64),
            ("--max-json-depth", self.max_json_depth as u64),
            ("--max-batch", self.max_batch as u64),
            ("--max-attempts", self.max_attempts.into()),
            ("--header-timeout-s", self.header_timeout_s),
            ("--body-timeout-ms", self.body_timeout_ms),
            ("--max-connections", self.max_connections as u64),
            ("--stream-stall-ms", self.stream_stall_ms),
            ("--connect-idle-ms", self.connect_idle_ms),
        ];
        if let Some((flag, _)) = positive.into_iter().find(|(_, v)| *v == 0) {
            return bad(flag, "must be positive");
        }
        if self.max_limits().wall_time_ms == 0 || self.max_limits().compile_wall_time_ms == 0 {
            return bad("--max-*-ms", "must be positive");
        }
        Ok(self)
    }

    /// The maxima a request's limits are checked against.
    pub fn max_limits(&self) -> ResolvedLimits {
        ResolvedLimits {
            wall_time_ms: self.max_wall_time_ms,
            cpu_time_ms: self.max_cpu_time_ms,
            compile_wall_time_ms: self.max_compile_wall_time_ms,
            memory_bytes: self.max_memory_bytes,
            processes: self.max_processes,
            output_bytes: self.max_output_bytes,
            file_size_bytes: self.max_file_size_bytes,
            // The output files' caps are the built-in ones (no flag).
            output_files: ResolvedLimits::MAX.output_files,
            output_files_bytes: ResolvedLimits::MAX.output_files_bytes,
        }
    }

    /// The limits of the HTTP edge: header and body timeouts, the connection cap.
    pub fn edge_limits(&self) -> codefleet_http_edge::EdgeLimits {
        codefleet_http_edge::EdgeLimits {
            header_timeout: Duration::from_secs(self.header_timeout_s),
            body_timeout: Duration::from_millis(self.body_timeout_ms),
            max_connections: self.max_connections,
        }
    }

    pub fn report_interval(&self) -> Duration {
        Duration::from_millis(self.report_interval_ms)
    }

    pub fn queue_wait(&self) -> Duration {
        Duration::from_millis(self.queue_wait_ms)
    }

    pub fn dispatch_margin(&self) -> Duration {
        Duration::from_millis(self.dispatch_margin_ms)
    }

    pub fn stream_stall(&self) -> Duration {
        Duration::from_millis(self.stream_stall_ms)
    }

    pub fn connect_idle(&self) -> Duration {
        Duration::from_millis(self.connect_idle_ms)
    }

    /// The longest event (NDJSON line, WebSocket message) taken from an agent: a result carries
    /// up to four outputs (compile and run, stdout and stderr) of `--max-output-bytes`, each at
    /// most six times longer as JSON (`\u0000`), the output files in base64 (4/3, with their
    /// names), plus the rest of the object.
    pub fn max_event_bytes(&self) -> usize {
        let output = usize::try_from(self.max_output_bytes).unwrap_or(usize::MAX);
        let files = usize::try_from(self.max_limits().output_files_bytes).unwrap_or(usize::MAX);
        output
            .saturating_mul(4 * 6)
            .saturating_add(files.saturating_mul(2))
            .saturating_add(64 << 10)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let argv = std::iter::once("codefleet-gateway").chain(args.iter().copied());
        Config::try_parse_from(argv).unwrap().validate()
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).unwrap();
        assert_eq!(config.balance_factor, 1.25);
        assert!((100..=200).contains(&config.vnodes));
        assert_eq!(config.max_limits(), ResolvedLimits::MAX);
    }

    #[test]
    fn rejects_bad_values() {
        for args in [
            &["--balance-factor", "0.9"][..],
            &["--vnodes", "0"],
            &["--missed-reports", "0"],
            &["--rate-per-s", "0"],
            &["--api-key", ""],
            &["--body-timeout-ms", "0"],
            &["--max-connections", "0"],
        ] {
            assert!(parse(args).is_err(), "{args:?}");
        }
    }

    #[test]
    fn reads_keys_file() {
        let path = std::env::temp_dir().join(format!("cf-gw-keys-{}", std::process::id()));
        std::fs::write(&path, "# clients\nk1\n\n  k2  \n").unwrap();
        let config = parse(&["--api-key", "k0", "--api-keys-file", path.to_str().unwrap()]);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(config.unwrap().api_keys, ["k0", "k1", "k2"]);
    }
}
