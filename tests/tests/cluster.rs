//! The gateway in front of real node agents, each its own process, on loopback and the real
//! Docker engine: each language on its primary node until the load bound, then spilling; a node
//! killed mid-job; a node joining; jobs waiting for a full node in order; a drain; a gateway restart; the edge's refusals; a session.
//! Every test ends by stopping its cluster and finding none of its containers left.
//!
//! Agents run `--pool-min 1` and only the languages a test needs: the machine has two cores
//! and other tests share its Docker engine. Time bounds are generous; the benchmark measures.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use codefleet_tests::{
    assert_nothing_left, eventually, Answer, Api, Cluster, StatusCode, ADMIN_KEY,
};
use serde_json::{json, Value};

const PY: &str = "python";
const JS: &str = "javascript";

/// A python job that sleeps `seconds`, then prints `done`.
fn sleeper(seconds: f64) -> Value {
    json!({"language": PY, "limits": {"wall_time_ms": 20_000},
        "source": format!("import time\ntime.sleep({seconds})\nprint('done')\n")})
}

fn assert_all_on(nodes: &[String], expected: &str, what: &str) {
    assert!(
        nodes.iter().all(|n| n == expected),
        "{what}: expected every job on {expected}, got {nodes:?}"
    );
}

fn assert_problem(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!((answer.status, answer.code()), (status, code), "{answer:?}");
    assert_eq!(
        answer.headers["content-type"], "application/problem+json",
        "{answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_language_runs_on_its_primary_until_the_load_bound_then_spills() {
    let mut cluster = Cluster::named("spill")
        .agents(3)
        .languages(&[PY, JS])
        .distinct_primaries()
        .agent_arg("--slots", 4)
        .start()
        .await;
    let (py, js) = (cluster.primary(PY), cluster.primary(JS));

    // The gateway's ring is the one computed here.
    let shares = cluster.ring_shares();
    for node in cluster.nodes().await {
        let id = node["id"].as_str().unwrap();
        let share = node["ring_share"].as_f64().unwrap();
        assert!(
            (share - shares[id]).abs() < 1e-9,
            "{id}: {share} vs {shares:?}"
        );
    }

    // One job at a time: each language stays on its own primary.
    assert_all_on(&cluster.run_one_at_a_time(PY, 4).await, &py, "python");
    assert_all_on(&cluster.run_one_at_a_time(JS, 4).await, &js, "javascript");

    // Four at once on three nodes with four slots each: the bound ceil(1.25 * (load + 1) / 3)
    // is 1 for the second job, so it goes to the next node although the primary has free slots;
    // the third comes back to the primary. Slots alone would keep all four there. None fails.
    let burst = (0..4).map(|_| cluster.api.execute(sleeper(1.5)));
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for answer in futures_util::future::join_all(burst).await {
        assert_eq!(answer["run"]["stdout"], "done\n", "{answer}");
        *per_node
            .entry(answer["node"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert!(
        per_node.len() >= 2 && per_node.contains_key(&py),
        "concurrent python jobs spill from {py}: {per_node:?}"
    );

    // Afterwards each language is back on its primary: the spill was load, not a new ring.
    assert_all_on(&cluster.run_one_at_a_time(PY, 3).await, &py, "python after");
    assert_all_on(
        &cluster.run_one_at_a_time(JS, 3).await,
        &js,
        "javascript after",
    );

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_job_fails_that_job_fast_and_later_jobs_route_around_it() {
    let mut cluster = Cluster::named("kill")
        .agents(3)
        .languages(&[PY, JS])
        .distinct_primaries()
        .start()
        .await;
    let (py, js) = (cluster.primary(PY), cluster.primary(JS));
    assert_all_on(&cluster.run_one_at_a_time(PY, 2).await, &py, "python");
    assert_all_on(&cluster.run_one_at_a_time(JS, 2).await, &js, "javascript");

    // A ten-second job in flight on python's primary when its agent is killed.
    let api = cluster.api.clone();
    let in_flight = tokio::spawn(async move { api.post("/v1/execute", &sleeper(10.0)).await });
    cluster.wait_busy(&py).await;
    let killed_at = Instant::now();
    cluster.kill(&py).await;
    let answer = in_flight.await.expect("the client task");
    let answered_after = killed_at.elapsed();
    eprintln!("node_lost {answered_after:?} after the kill");
    assert_problem(&answer, StatusCode::BAD_GATEWAY, "node_lost");
    assert!(
        answer.body["detail"].as_str().unwrap().contains(&py),
        "the problem names the node: {answer:?}"
    );
    assert!(
        answered_after < Duration::from_secs(5),
        "node_lost {answered_after:?} after the kill, for a job that had 10 s to go"
    );

    // Later python jobs go to the next node on python's ring, and succeed (the first may find
    // the dead node's port closed and take a second attempt).
    let next = cluster.primary(PY);
    assert_ne!(next, py);
    assert_all_on(
        &cluster.run_one_at_a_time(PY, 3).await,
        &next,
        "python after the kill",
    );
    // javascript never lived there: its routing is unchanged.
    assert_all_on(
        &cluster.run_one_at_a_time(JS, 3).await,
        &js,
        "javascript after the kill",
    );
    // And the gateway marks the silent node down.
    eventually(
        Duration::from_secs(10),
        "the killed node listed down",
        async || cluster.node_info(&py).await["state"] == "down",
    )
    .await;
    assert_all_on(
        &cluster.run_one_at_a_time(PY, 2).await,
        &next,
        "python, node down",
    );

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_joining_node_is_listed_within_seconds_of_being_ready_and_takes_its_share() {
    let mut cluster = Cluster::named("join")
        .agents(2)
        .languages(&[PY])
        .start()
        .await;
    let before = cluster.primary(PY);
    assert_all_on(
        &cluster.run_one_at_a_time(PY, 2).await,
        &before,
        "python before",
    );

    // A newcomer whose place on the ring makes it python's primary.
    let name = cluster.name_owning(PY);
    let newcomer = cluster.join(&name).await;
    let ready_at = Instant::now();
    eventually(
        Duration::from_secs(5),
        "the newcomer listed ready with python",
        async || cluster.is_serving(&newcomer).await,
    )
    .await;
    eprintln!("listed {:?} after the agent was ready", ready_at.elapsed());
    let share = cluster.node_info(&newcomer).await["ring_share"]
        .as_f64()
        .unwrap();
    let expected = cluster.ring_shares()[&newcomer];
    assert!(
        share > 0.0 && (share - expected).abs() < 1e-9,
        "{share} vs {expected}"
    );
    assert_eq!(cluster.primary(PY), newcomer);
    assert_all_on(
        &cluster.run_one_at_a_time(PY, 3).await,
        &newcomer,
        "python after the join",
    );

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_waiting_for_a_full_node_get_it_in_the_order_they_came() {
    let mut cluster = Cluster::named("fifo")
        .agents(1)
        .languages(&[PY])
        .agent_arg("--slots", 1)
        .gateway_arg("--queue-wait-ms", 60_000)
        .gateway_arg("--queue-length", 16)
        .start()
        .await;
    let node = cluster.primary(PY);
    let api = cluster.api.clone();
    let first = tokio::spawn(async move { api.execute(sleeper(1.5)).await });
    cluster.wait_busy(&node).await;

    // Five jobs come one after another while the only slot is taken; each waits at the gateway.
    // Every slot freed must go to the job that has waited longest, not to whichever asks first.
    let done = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiting = Vec::new();
    for i in 0..5 {
        let (api, done) = (cluster.api.clone(), std::sync::Arc::clone(&done));
        waiting.push(tokio::spawn(async move {
            let answer = api
                .execute(json!({"language": PY, "limits": {"wall_time_ms": 20_000},
                    "source": format!("import time\ntime.sleep(0.2)\nprint({i})\n")}))
                .await;
            assert_eq!(answer["run"]["stdout"], format!("{i}\n"), "{answer}");
            done.lock().unwrap().push(i);
        }));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for job in waiting {
        job.await.expect("a waiting job");
    }
    assert_eq!(
        first.await.expect("the first job")["run"]["stdout"],
        "done\n"
    );
    assert_eq!(
        *done.lock().unwrap(),
        vec![0, 1, 2, 3, 4],
        "the order jobs finished in"
    );

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_node_gets_no_new_jobs_and_none_fail() {
    let mut cluster = Cluster::named("drain")
        .agents(2)
        .languages(&[PY])
        .agent_arg("--slots", 2)
        .start()
        .await;
    let drained = cluster.primary(PY);
    let other = cluster
        .node_ids()
        .into_iter()
        .find(|n| *n != drained)
        .unwrap();

    // A job is running on the node when the drain comes.
    let api = cluster.api.clone();
    let long = tokio::spawn(async move { api.execute(sleeper(2.0)).await });
    cluster.wait_busy(&drained).await;
    let answer = cluster
        .admin
        .post(&format!("/v1/nodes/{drained}/drain"), &json!({}))
        .await;
    assert_eq!(answer.status, StatusCode::ACCEPTED, "{answer:?}");
    assert_eq!(answer.body["state"], "draining", "{answer:?}");

    // Jobs from two clients at once after the drain: all succeed, none on the drained node.
    let clients = (0..2).map(|_| cluster.run_one_at_a_time(PY, 4));
    let nodes: Vec<String> = futures_util::future::join_all(clients).await.concat();
    assert_all_on(&nodes, &other, "python after the drain");

    // The job that was running finishes where it was.
    let long = long.await.expect("the client task");
    assert_eq!(
        (&long["node"], &long["run"]["stdout"]),
        (&json!(drained), &json!("done\n"))
    );
    assert_eq!(cluster.node_info(&drained).await["state"], "draining");
    let unknown = cluster
        .admin
        .post("/v1/nodes/no-such-node/drain", &json!({}))
        .await;
    assert_problem(&unknown, StatusCode::NOT_FOUND, "not_found");

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_gateway_sees_its_agents_again_within_seconds() {
    let mut cluster = Cluster::named("restart")
        .agents(2)
        .languages(&[PY])
        .start()
        .await;
    let primary = cluster.primary(PY);
    assert_all_on(&cluster.run_one_at_a_time(PY, 2).await, &primary, "python");

    cluster.restart_gateway().await;
    let restarted_at = Instant::now();
    // The agents keep reporting to the same address; the new gateway learns them from that.
    cluster.wait_all_serving(Duration::from_secs(5)).await;
    eprintln!(
        "agents listed {:?} after the restart",
        restarted_at.elapsed()
    );
    // Same members, same ring, same choice.
    assert_all_on(
        &cluster.run_one_at_a_time(PY, 2).await,
        &primary,
        "python after the restart",
    );

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_refuses_missing_keys_quotas_and_large_bodies() {
    let mut cluster = Cluster::named("edge")
        .languages(&[PY])
        .gateway_arg("--api-key", "client-key,quota-key,busy-key")
        .gateway_arg("--rate-per-s", 0.5)
        .gateway_arg("--burst", 5)
        .gateway_arg("--max-concurrent-per-key", 1)
        .gateway_arg("--max-body-bytes", 4096)
        .start()
        .await;
    let as_key = |key: &str| cluster.gateway.api(Some(key));
    let job = json!({"language": PY, "source": "print('hello')"});

    // Probes and metrics need no key.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(cluster.api.get(path).await.status, StatusCode::OK, "{path}");
    }

    // A client key, and only a client key, runs jobs.
    assert_problem(
        &cluster.api.post("/v1/execute", &job).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_problem(
        &as_key("wrong-key").post("/v1/execute", &job).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let client = as_key("client-key");
    let answer = client.post("/v1/execute", &job).await;
    assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
    assert_eq!(answer.body["run"]["stdout"], "hello\n");

    // A body above --max-body-bytes never reaches a node.
    let big = json!({"language": PY, "source": format!("# {}\nprint(1)\n", "x".repeat(8192))});
    assert_problem(
        &client.post("/v1/execute", &big).await,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    );

    // Operations need the admin key; a client key is not enough.
    let node = cluster.node_ids().remove(0);
    for api in [&cluster.api, &client] {
        assert_problem(
            &api.get("/v1/nodes").await,
            StatusCode::UNAUTHORIZED,
            "unauthorized",
        );
        let drain = api
            .post(&format!("/v1/nodes/{node}/drain"), &json!({}))
            .await;
        assert_problem(&drain, StatusCode::UNAUTHORIZED, "unauthorized");
        let remove = api.delete(&format!("/v1/nodes/{node}")).await;
        assert_problem(&remove, StatusCode::UNAUTHORIZED, "unauthorized");
    }
    assert_eq!(
        cluster.nodes().await.len(),
        1,
        "the admin key lists the node"
    );
    assert_eq!(
        cluster.node_info(&node).await["state"],
        "ready",
        "nothing drained it"
    );

    // Rate: a burst of 5, then 1 every 2 s; the answer says when to come back.
    let quota = as_key("quota-key");
    let mut answers = Vec::new();
    for _ in 0..10 {
        let answer = quota.get("/v1/languages").await;
        let limited = answer.status == StatusCode::TOO_MANY_REQUESTS;
        answers.push(answer);
        if limited {
            break;
        }
    }
    let limited = answers.pop().unwrap();
    assert_problem(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let retry_after: u64 = limited.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert!(
        (5..=6).contains(&answers.len()) && answers.iter().all(|a| a.status == StatusCode::OK),
        "the burst passes, then the quota bites: {answers:?}"
    );
    assert_eq!(
        client.get("/v1/languages").await.status,
        StatusCode::OK,
        "quotas are per key"
    );

    // Concurrency: one request in flight per key.
    let busy = as_key("busy-key");
    let api = busy.clone();
    let long = tokio::spawn(async move { api.execute(sleeper(3.0)).await });
    cluster.wait_busy(&node).await;
    let second = busy.post("/v1/execute", &job).await;
    assert_problem(&second, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(second.headers.contains_key("retry-after"), "{second:?}");
    assert_eq!(long.await.expect("client task")["run"]["stdout"], "done\n");

    // The cluster token: reports without it are refused, and agents run nothing without it.
    let stranger = Api::new(&cluster.gateway.url());
    let report = json!({"node_id": "intruder", "address": "http://127.0.0.1:1", "slots_total": 1,
        "slots_busy": 0, "queued": 0, "draining": false, "languages": {}, "sessions": 0});
    assert_problem(
        &stranger.post("/v1/internal/reports", &report).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    let mut agent = cluster.agent(&node).api.clone();
    agent.token = Some(ADMIN_KEY.to_string());
    assert_problem(
        &agent.post("/v1/execute", &job).await,
        StatusCode::UNAUTHORIZED,
        "unauthorized",
    );
    assert_eq!(cluster.nodes().await.len(), 1, "no intruder registered");

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_keeps_its_files_on_its_node_until_deleted() {
    let mut cluster = Cluster::named("session")
        .agents(2)
        .languages(&[PY])
        .start()
        .await;
    let api = &cluster.api;

    let created = api
        .post("/v1/sessions", &json!({"language": PY, "ttl_s": 120}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    let node = created.body["node"].as_str().unwrap().to_string();
    assert!(cluster.node_ids().contains(&node), "{created:?}");
    assert!(
        id.starts_with("se_") && id.ends_with(&format!(".{node}")),
        "the id names its node: {id}"
    );

    let path = format!("/v1/sessions/{id}/execute");
    let execute = async |source: &str| api.post(&path, &json!({"source": source})).await;
    let first = execute("open('state.txt', 'w').write('kept')\nprint('written')\n").await;
    assert_eq!(first.status, StatusCode::OK, "{first:?}");
    assert_eq!(
        (&first.body["node"], &first.body["run"]["stdout"]),
        (&json!(node), &json!("written\n"))
    );
    let second = execute("print(open('state.txt').read())\n").await;
    assert_eq!(second.status, StatusCode::OK, "{second:?}");
    assert_eq!(
        (&second.body["node"], &second.body["run"]["stdout"]),
        (&json!(node), &json!("kept\n"))
    );

    let deleted = api.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT, "{deleted:?}");
    assert_problem(
        &execute("print(1)\n").await,
        StatusCode::NOT_FOUND,
        "not_found",
    );
    let unknown = api
        .post(
            "/v1/sessions/se_0.no-such-node/execute",
            &json!({"source": "print(1)"}),
        )
        .await;
    assert_problem(&unknown, StatusCode::NOT_FOUND, "not_found");

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_freezes_mid_job_is_noticed_by_a_probe_long_before_it_misses_its_reports() {
    // Ten missed reports before a silent node is down: without the probe the frozen node's job
    // would wait about ten seconds.
    let mut cluster = Cluster::named("freeze")
        .agents(2)
        .languages(&[PY])
        .gateway_arg("--missed-reports", 10)
        .start()
        .await;
    let py = cluster.primary(PY);
    let api = cluster.api.clone();
    let in_flight = tokio::spawn(async move { api.post("/v1/execute", &sleeper(10.0)).await });
    cluster.wait_busy(&py).await;
    // Frozen, not dead: its sockets stay open, so only silence gives it away.
    let frozen_at = Instant::now();
    cluster.agent(&py).signal("STOP");
    let answer = in_flight.await.expect("the client task");
    let answered_after = frozen_at.elapsed();
    cluster.agent(&py).signal("CONT");
    eprintln!("node_lost {answered_after:?} after the freeze");
    assert_problem(&answer, StatusCode::BAD_GATEWAY, "node_lost");
    // The probe answers within about two seconds; the bound leaves room for a busy machine.
    assert!(
        answered_after < Duration::from_secs(5),
        "node_lost {answered_after:?} after the freeze"
    );
    assert_nothing_left(cluster.stop().await).await;
}
