//! Capacity reports: every interval the agent posts its `CapacityReport` to each gateway it
//! was given (`POST {gateway}/v1/internal/reports`); the first report registers the node.

use std::sync::Arc;
use std::time::Duration;

use crate::agent::Agent;

/// Posts one report to every gateway, concurrently; failures are logged, never fatal.
pub async fn report_once(agent: &Agent, client: &reqwest::Client) {
    let report = agent.capacity();
    let sends = agent.config.gateways.iter().map(|gateway| {
        let url = format!("{}/v1/internal/reports", gateway.trim_end_matches('/'));
        let mut req = client.post(&url).json(&report);
        if let Some(token) = &agent.config.cluster_token {
            req = req.bearer_auth(token);
        }
        async move {
            match req.send().await {
                Ok(resp) if resp.status().is_success() => {}
                Ok(resp) => tracing::warn!(gateway = %url, status = %resp.status(), "gateway refused the capacity report"),
                Err(e) => tracing::debug!(gateway = %url, error = %e, "capacity report not delivered"),
            }
        }
    });
    futures_util::future::join_all(sends).await;
}

/// Reports every `report_interval_ms` until aborted.
pub async fn report_loop(agent: Arc<Agent>) {
    if agent.config.gateways.is_empty() {
        return;
    }
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .expect("a plain HTTP client always builds");
    let mut tick = tokio::time::interval(Duration::from_millis(
        agent.config.report_interval_ms.max(50),
    ));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        report_once(&agent, &client).await;
    }
}
