//! Capacity reports: a gateway that takes a report and never answers (or is gone) does not
//! delay an agent's reports to its other gateways, so those never mark a healthy node down.

use std::time::{Duration, Instant};

use codefleet_tests::{free_port, node_id, AgentOpts, AgentProcess, TestGateway};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_never_answers_does_not_slow_reports_to_the_others() {
    // Accepts connections and reads nothing back: every report to it waits for its timeout.
    let stuck = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stuck_url = format!("http://{}", stuck.local_addr().unwrap());
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((conn, _)) = stuck.accept().await {
            open.push(conn);
        }
    });
    // Down after five missed reports of 200 ms: a report round held up for a second or more by
    // the stuck gateway (the old client waited 2 s on it) would mark the node down here.
    let token = "reports-token";
    let args = [
        "--cluster-token",
        token,
        "--admin-key",
        "reports-admin",
        "--report-interval-ms",
        "200",
        "--missed-reports",
        "5",
    ]
    .map(String::from);
    let live = TestGateway::start(&args).await;
    let node = node_id("reports");
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 0)
        .arg("--cluster-token", token)
        .arg("--report-interval-ms", 200)
        .arg("--gateway", format!("{stuck_url},{}", live.url()));
    let agent = AgentProcess::spawn(&node, free_port(), &opts).await;
    let admin = live.api(Some("reports-admin"));
    let state = async || {
        let nodes = admin.get("/v1/nodes").await.body;
        nodes
            .as_array()
            .and_then(|a| a.iter().find(|n| n["id"] == node.as_str()))
            .map(|n| n["state"].as_str().unwrap_or_default().to_string())
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while state().await.as_deref() != Some("ready") {
        assert!(
            Instant::now() < deadline,
            "the node joined the live gateway"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let watch_until = Instant::now() + Duration::from_secs(6);
    while Instant::now() < watch_until {
        assert_eq!(
            state().await.as_deref(),
            Some("ready"),
            "stayed ready at the live gateway"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    held.abort();
    drop(agent);
}
