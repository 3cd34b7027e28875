//! The process's one Prometheus recorder, shared by every gateway and agent in the process (a
//! `--dev` gateway runs an agent beside it; tests start many of both). It lives here, the crate
//! both depend on, so the gateway does not need the agent for its metrics.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// The process's Prometheus recorder, installed on first use.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        // From routing decisions (microseconds) to image builds (minutes).
        let seconds = [
            0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
            0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
        ];
        PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".to_string()), &seconds)
            .expect("bucket list is not empty")
            .install_recorder()
            .expect("no other metrics recorder is installed in this process")
    })
}
