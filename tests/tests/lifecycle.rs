//! The agent's life: a `kill -9` mid-job leaves orphans that the next start with the same node
//! id removes (and only those); SIGTERM lets the in-flight job finish, then removes everything.

use std::time::{Duration, Instant};

use codefleet_tests::{
    containers_of, eventually, free_port, node_id, AgentOpts, AgentProcess, Api, StatusCode,
};
use serde_json::json;

fn long_job(api: &Api, seconds: u64) -> tokio::task::JoinHandle<codefleet_tests::Answer> {
    let api = api.clone();
    tokio::spawn(async move {
        let body = json!({"language": "python", "limits": {"wall_time_ms": 20_000},
            "source": format!("import time\ntime.sleep({seconds})\nprint('finished')")});
        api.post("/v1/execute", &body).await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_after_kill_9_removes_the_orphans_of_its_node_only() {
    let node = node_id("kill9");
    let bystander = node_id("kill9-bystander");
    let opts = AgentOpts::languages(&["python"]);
    let other = AgentProcess::spawn(&bystander, free_port(), &opts).await;
    // Its one pool sandbox ready, and the image probe's container gone.
    eventually(Duration::from_secs(30), "bystander settled", async || {
        containers_of(&bystander).len() == 1
            && other.api.get("/v1/capacity").await.body["languages"]["python"]["warm"] == 1
    })
    .await;
    let bystanders = containers_of(&bystander);

    let mut agent = AgentProcess::spawn(&node, free_port(), &opts).await;
    let api = agent.api.clone();
    let job = tokio::spawn(async move {
        let body = json!({"language": "python", "source": "import time\ntime.sleep(15)"});
        api.http
            .post(format!("{}/v1/execute", api.url))
            .json(&body)
            .send()
            .await
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    agent.signal("KILL");
    assert!(agent.wait(Duration::from_secs(5)).is_some(), "agent died");
    assert!(
        job.await.unwrap().is_err(),
        "the connection of the job in flight broke"
    );
    let orphans = containers_of(&node);
    assert!(
        !orphans.is_empty(),
        "kill -9 leaves the node's containers behind"
    );

    let port = free_port();
    let restarted = AgentProcess::spawn(&node, port, &opts).await;
    let now = containers_of(&node);
    assert!(
        orphans
            .iter()
            .all(|id| !now.iter().any(|n| n.starts_with(id.as_str()))),
        "orphans {orphans:?} still there: {now:?}"
    );
    let r = restarted.api.python("print('back')").await;
    assert_eq!(r["run"]["stdout"], "back\n");
    // Another node's containers were left alone.
    let still = containers_of(&bystander);
    assert!(
        bystanders.iter().all(|id| still.contains(id)),
        "a bystander lost containers: {bystanders:?} -> {still:?}"
    );
    drop(restarted);
    drop(other);
    drop(agent);
    assert!(containers_of(&node).is_empty() && containers_of(&bystander).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_job_in_flight_then_removes_every_container() {
    let node = node_id("sigterm");
    let mut agent =
        AgentProcess::spawn(&node, free_port(), &AgentOpts::languages(&["python"])).await;
    let job = long_job(&agent.api, 3);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let started = Instant::now();
    agent.signal("TERM");
    // Draining: no new work is accepted while the job finishes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let refused = agent
        .api
        .http
        .post(format!("{}/v1/execute", agent.api.url))
        .json(&json!({"language": "python", "source": "print(1)"}))
        .send()
        .await;
    assert!(
        refused
            .map(|r| r.status() != StatusCode::OK)
            .unwrap_or(true),
        "a draining agent takes no new job"
    );

    let answer = job.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["run"]["stdout"], "finished\n", "{answer:?}");
    let status = agent
        .wait(Duration::from_secs(30))
        .expect("agent exits after the job");
    assert!(status.success(), "clean exit: {status:?}");
    assert!(started.elapsed() < Duration::from_secs(30));
    assert!(
        containers_of(&node).is_empty(),
        "no container left: {:?}",
        containers_of(&node)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_request_leaves_no_container_behind() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 1)
        .arg("--pool-max", 1);
    let agent = codefleet_tests::TestAgent::start("cancel", opts).await;
    // Settled: one container, and it is the pool's ready sandbox the job will take.
    eventually(
        Duration::from_secs(30),
        "one ready pool sandbox",
        async || {
            containers_of(&agent.node).len() == 1
                && agent.api.get("/v1/capacity").await.body["languages"]["python"]["warm"] == 1
        },
    )
    .await;
    let taken = containers_of(&agent.node);

    // A client that sends a long job, then goes away (closes its connection) a second later.
    let body = json!({"language": "python", "source": "import time\ntime.sleep(20)",
        "limits": {"wall_time_ms": 20_000}})
    .to_string();
    let addr = agent.api.url.trim_start_matches("http://").to_string();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /v1/execute HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut conn, request.as_bytes())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    drop(conn);

    eventually(
        Duration::from_secs(10),
        "the cancelled job's sandbox removed",
        async || {
            let now = containers_of(&agent.node);
            taken.iter().all(|id| !now.contains(id))
        },
    )
    .await;
    let r = agent.api.python("print('fine')").await;
    assert_eq!(r["run"]["stdout"], "fine\n");
    agent.stop().await;
}
