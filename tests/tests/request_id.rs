//! Request ids end to end: a client's `X-Request-Id` (or one the gateway makes) comes back in
//! the answer's header and body, reaches the agent with the job, and is on the agent's log line
//! for that job beside the job's own id.

use std::time::Duration;

use codefleet_tests::{eventually, AgentProcess, Cluster, StatusCode};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_travels_from_the_client_through_the_gateway_to_the_agents_log() {
    let mut cluster = Cluster::named("request-id")
        .agents(1)
        .languages(&["python"])
        .agent_env("RUST_LOG", "info,codefleet_node_agent=debug")
        .start()
        .await;
    let node = cluster.node_ids()[0].clone();
    let body = json!({"language": "python", "source": "print('traced')"});

    let sent = cluster
        .api
        .http
        .post(format!("{}/v1/execute", cluster.api.url))
        .header("x-request-id", "client-trace.42")
        .json(&body);
    let a = codefleet_tests::send(sent).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.headers["x-request-id"], "client-trace.42");
    assert_eq!(a.body["request_id"], "client-trace.42", "{a:?}");
    let job = a.body["id"].as_str().unwrap().to_string();
    let log = AgentProcess::log_path(&node);
    eventually(
        Duration::from_secs(10),
        "the agent logged the job",
        async || {
            let text = strip_colours(&std::fs::read_to_string(&log).unwrap_or_default());
            text.lines()
                .any(|l| l.contains("request_id=client-trace.42") && l.contains(&job))
        },
    )
    .await;

    // No id, or one that is not acceptable: the gateway makes one, and the agent uses it.
    for header in [None, Some("has spaces in it")] {
        let mut sent = cluster
            .api
            .http
            .post(format!("{}/v1/execute", cluster.api.url))
            .json(&body);
        if let Some(value) = header {
            sent = sent.header("x-request-id", value);
        }
        let a = codefleet_tests::send(sent).await;
        let id = a.headers["x-request-id"].to_str().unwrap().to_string();
        assert!(id.starts_with("req_") && id.len() == 20, "{id}");
        assert_eq!(a.body["request_id"], id.as_str(), "{a:?}");
    }

    // Problems carry it too.
    let a = cluster
        .api
        .post("/v1/execute", &json!({"language": "cobol", "source": "x"}))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert!(a.headers.contains_key("x-request-id"), "{a:?}");
    cluster.stop().await;
}

/// The log without its terminal colour codes.
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
