//! Process-wide telemetry: the Prometheus recorder (installed once per process and shared by
//! every agent and gateway in it) and the tracing subscriber.

/// The process's Prometheus recorder, installed on first use (it lives in `http-edge`, so a
/// gateway in the same process shares it without depending on the agent).
pub use codefleet_http_edge::metrics::prometheus;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .with_writer(std::io::stderr)
        .try_init();
}
