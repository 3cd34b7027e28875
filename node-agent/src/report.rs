//! Capacity reports: every interval the agent posts its `CapacityReport` to each gateway it
//! was given (`POST {gateway}/v1/internal/reports`); the first report registers the node.

use std::sync::Arc;
use std::time::Duration;

use codefleet_shared::cluster::CapacityReport;

use crate::agent::Agent;

/// Posts one report to every gateway, concurrently; failures are logged, never fatal.
pub async fn report_once(agent: &Agent, client: &reqwest::Client) {
    let report = agent.capacity();
    let sends = agent
        .config()
        .gateways
        .iter()
        .map(|gateway| send(agent, client, gateway, &report));
    futures_util::future::join_all(sends).await;
}

async fn send(agent: &Agent, client: &reqwest::Client, gateway: &str, report: &CapacityReport) {
    let url = format!("{}/v1/internal/reports", gateway.trim_end_matches('/'));
    let mut req = client.post(&url).json(report);
    if let Some(token) = &agent.config().cluster_token {
        req = req.bearer_auth(token);
    }
    match req.send().await {
        Ok(resp) if resp.status().is_success() => {}
        Ok(resp) => {
            tracing::warn!(gateway = %url, status = %resp.status(), "gateway refused the capacity report")
        }
        Err(e) => tracing::debug!(gateway = %url, error = %e, "capacity report not delivered"),
    }
}

/// Reports every `report_interval_ms` until aborted: one loop per gateway, so a gateway that is
/// gone (whose name may take seconds to fail to resolve) never delays the reports to the others.
pub async fn report_loop(agent: Arc<Agent>) {
    let interval = Duration::from_millis(agent.config().report_interval_ms.max(50));
    // A report older than an interval is stale: never wait on one longer than that (at least
    // a second, for a gateway that is slow but alive).
    let client = reqwest::Client::builder()
        .timeout(interval.max(Duration::from_secs(1)))
        .build()
        .expect("a plain HTTP client always builds");
    let loops = agent.config().gateways.iter().map(|gateway| {
        let (agent, client, gateway) = (Arc::clone(&agent), client.clone(), gateway.clone());
        async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                send(&agent, &client, &gateway, &agent.capacity()).await;
            }
        }
    });
    futures_util::future::join_all(loops).await;
}
