//! Sessions on an agent: a dedicated sandbox whose files persist between executions until
//! DELETE or the idle TTL; capped per node.

use std::time::Duration;

use codefleet_tests::{containers_of, eventually, AgentOpts, StatusCode, TestAgent};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_persist_in_a_session_until_it_is_deleted_or_expires() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--max-sessions", 2)
        .arg("--pool-min", 0);
    let agent = TestAgent::start("sessions", opts).await;
    let api = &agent.api;

    let created = api
        .post("/v1/sessions", &json!({"language": "py", "ttl_s": 60}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["id"].as_str().unwrap().to_string();
    assert!(
        id.starts_with("se_") && id.ends_with(&format!(".{}", agent.node)),
        "{id}"
    );
    assert_eq!(created.body["language"]["name"], "python");
    assert!(created.body["expires_at"].as_str().unwrap().ends_with('Z'));

    let exec = |source: &str| json!({"source": source});
    let r = api.post(&format!("/v1/sessions/{id}/execute"), &exec("import subprocess\nopen('notes.txt', 'w').write('kept')\nsubprocess.Popen(['sleep', '100'])\nprint('wrote')")).await;
    assert_eq!(
        (r.status, r.body["run"]["stdout"].clone()),
        (StatusCode::OK, json!("wrote\n")),
        "{r:?}"
    );
    assert_eq!(r.body["sandbox"], "session");
    let r = api.post(&format!("/v1/sessions/{id}/execute"), &exec("import os\nprint(open('notes.txt').read(), [p for p in os.listdir('/proc') if p.isdigit() and p not in ('1', str(os.getpid()))])")).await;
    assert_eq!(
        r.body["run"]["stdout"], "kept []\n",
        "files stay, processes do not: {r:?}"
    );
    // Language is fixed by the session.
    let r = api
        .post(
            &format!("/v1/sessions/{id}/execute"),
            &json!({"language": "python", "source": "1"}),
        )
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (400, "invalid_request"));

    // The cap: a second session fits, a third does not.
    let second = api
        .post("/v1/sessions", &json!({"language": "python", "ttl_s": 2}))
        .await;
    assert_eq!(second.status, StatusCode::CREATED);
    let third = api
        .post("/v1/sessions", &json!({"language": "python"}))
        .await;
    assert_eq!(
        (third.status.as_u16(), third.code()),
        (503, "no_capacity"),
        "{third:?}"
    );
    let too_long = api
        .post(
            "/v1/sessions",
            &json!({"language": "python", "ttl_s": 10_000_000}),
        )
        .await;
    assert_eq!(too_long.status.as_u16(), 400);

    // The short one expires on its own; its container goes with it.
    let second_id = second.body["id"].as_str().unwrap().to_string();
    // (Watched through the capacity report: an execution would count as activity.)
    eventually(Duration::from_secs(15), "session expired", async || {
        api.get("/v1/capacity").await.body["sessions"] == 1
    })
    .await;
    let r = api
        .post(
            &format!("/v1/sessions/{second_id}/execute"),
            &exec("print(1)"),
        )
        .await;
    assert_eq!(r.status, StatusCode::NOT_FOUND);

    let deleted = api.delete(&format!("/v1/sessions/{id}")).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let r = api
        .post(&format!("/v1/sessions/{id}/execute"), &exec("print(1)"))
        .await;
    assert_eq!((r.status.as_u16(), r.code()), (404, "not_found"));
    assert_eq!(
        api.delete(&format!("/v1/sessions/{id}")).await.status,
        StatusCode::NOT_FOUND
    );
    eventually(
        Duration::from_secs(10),
        "session containers removed",
        async || containers_of(&agent.node).is_empty(),
    )
    .await;
    agent.stop().await;
}

/// A client that goes away in the middle of a session's execution leaves the session usable.
/// The abandoned job's answer (megabytes: more than the channel's socket buffer holds) is
/// collected before the next command is sent, so neither side waits on the other; files from
/// before are still there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_execution_leaves_its_session_usable() {
    let opts = AgentOpts::languages(&["python"]).arg("--pool-min", 0);
    let agent = TestAgent::start("session-abandoned", opts).await;
    let api = &agent.api;
    let created = api
        .post("/v1/sessions", &json!({"language": "python"}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let path = format!(
        "/v1/sessions/{}/execute",
        created.body["id"].as_str().unwrap()
    );
    let r = api
        .post(
            &path,
            &json!({"source": "open('kept.txt', 'w').write('yes')"}),
        )
        .await;
    assert_eq!(r.body["status"], "ok", "{r:?}");

    let big = "import sys, time\ntime.sleep(1.5)\nsys.stdout.write('x' * (1 << 20))\nsys.stderr.write('y' * (1 << 20))\n";
    let gave_up = reqwest::Client::new()
        .post(format!("{}{path}", api.url))
        .json(&json!({"source": big, "limits": {"output_bytes": 1 << 20}}))
        .timeout(Duration::from_millis(300))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client gave up: {gave_up:?}");

    // A source of 1.5 MB: more than the socket buffer too, so sending it while the supervisor
    // still writes the abandoned answer would leave both waiting.
    let source = format!(
        "# {}\nprint(open('kept.txt').read())\n",
        "z".repeat(1_500_000)
    );
    let r = api.post(&path, &json!({"source": source})).await;
    assert_eq!(r.status, StatusCode::OK, "{:?}", r.body["status"]);
    assert_eq!(
        r.body["run"]["stdout"], "yes\n",
        "{:?}",
        r.body["run"]["stderr"]
    );
    assert_eq!(r.body["sandbox"], "session");
    agent.stop().await;
}
