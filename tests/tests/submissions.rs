//! Async submissions (`/v1/submissions`) through a gateway, against the real engine: 20 submitted,
//! the agent holding them killed with -9 before they finish and started again with the same node
//! id and store, every token ending with its result, results surviving another restart, a poll of
//! a node that is gone; a running one finishing within a SIGTERM's grace; a queued one cancelled
//! (it never runs) and a running one killed; a full line refused; the same refusals as the
//! synchronous endpoints, with nothing stored; a signed callback checked here, retried after a
//! failure; callbacks to loopback refused unless allowlisted; expiry.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode as AxumStatus, Uri};
use codefleet_tests::{assert_nothing_left, eventually, Answer, Api, Cluster, StatusCode};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

/// A folder for one test's stores, removed when the test ends.
struct StateDir(PathBuf);

impl StateDir {
    fn new(test: &str) -> StateDir {
        let dir =
            std::env::temp_dir().join(format!("codefleet-subs-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        StateDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn submit(api: &Api, body: Value) -> String {
    let a = api.post("/v1/submissions", &body).await;
    assert_eq!(a.status, StatusCode::ACCEPTED, "submitting {body}: {a:?}");
    assert_eq!(a.body["status"], "queued", "{a:?}");
    a.body["token"].as_str().expect("a token").to_string()
}

async fn poll(api: &Api, token: &str) -> Answer {
    api.get(&format!("/v1/submissions/{token}")).await
}

/// Polls `token` until it is final (a node restarting meanwhile answers `node_lost`: polled on).
async fn wait_final(api: &Api, token: &str) -> Value {
    let mut last = None;
    eventually(
        Duration::from_secs(180),
        &format!("{token} finished"),
        async || {
            let a = poll(api, token).await;
            let done = a.status == StatusCode::OK
                && ["done", "failed", "cancelled"]
                    .contains(&a.body["status"].as_str().unwrap_or(""));
            assert!(
                a.status == StatusCode::OK || a.code() == "node_lost",
                "polling {token}: {a:?}"
            );
            last = Some(a.body);
            done
        },
    )
    .await;
    last.expect("polled")
}

fn python(source: &str) -> Value {
    json!({"execute": {"language": "python", "source": source}})
}

/// A metric's value in the agent's `/metrics` text (the sum over label sets that contain
/// `labels`).
async fn metric(api: &Api, name: &str, labels: &str) -> f64 {
    let text = api.get("/metrics").await.body;
    let text = text.as_str().expect("metrics text").to_string();
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submissions_survive_a_kill_and_restarts() {
    let dir = StateDir::new("restart");
    let mut cluster = Cluster::named("subs-restart")
        .languages(&["python"])
        .agent_arg("--state-dir", dir.path().display())
        .agent_arg("--slots", 2)
        .agent_arg("--submission-concurrency", 2)
        .start()
        .await;
    let node = cluster.node_ids()[0].clone();
    let mut tokens = Vec::new();
    for i in 0..20 {
        let token = submit(
            &cluster.api,
            python(&format!("import time\ntime.sleep(1)\nprint({i})")),
        )
        .await;
        assert!(
            token.starts_with("sb_") && token.ends_with(&format!(".{node}")),
            "{token}"
        );
        tokens.push(token);
    }

    // Some finish, then the agent is killed with the others queued or running.
    let mut before: Vec<Value> = Vec::new();
    eventually(
        Duration::from_secs(120),
        "two submissions done",
        async || {
            before.clear();
            for token in &tokens {
                before.push(poll(&cluster.api, token).await.body);
            }
            before.iter().filter(|s| s["status"] == "done").count() >= 2
        },
    )
    .await;
    cluster.kill(&node).await;
    let done_before: Vec<&Value> = before.iter().filter(|s| s["status"] == "done").collect();
    assert!(
        done_before.len() < 20,
        "all finished before the kill: {before:?}"
    );
    let unfinished = 20 - done_before.len();
    eprintln!("killed {node} with {unfinished} of 20 submissions unfinished");

    // While it is gone, a poll says so (not 404).
    let a = poll(&cluster.api, &tokens[19]).await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY, "{a:?}");
    assert_eq!(a.code(), "node_lost", "{a:?}");

    // Started again with the same node id and store: every token ends with its result.
    cluster.revive(&node).await;
    let mut results = Vec::new();
    for (i, token) in tokens.iter().enumerate() {
        let s = wait_final(&cluster.api, token).await;
        assert_eq!(s["status"], "done", "{s}");
        assert_eq!(s["kind"], "execute", "{s}");
        assert_eq!(s["result"]["status"], "ok", "{s}");
        assert_eq!(s["result"]["run"]["stdout"], format!("{i}\n"), "{s}");
        results.push(s);
    }
    for finished in &done_before {
        let now = results.iter().find(|s| s["token"] == finished["token"]);
        assert_eq!(
            now,
            Some(*finished),
            "a result from before the kill changed"
        );
    }

    // Results survive another restart.
    cluster.kill(&node).await;
    cluster.revive(&node).await;
    cluster.wait_all_serving(Duration::from_secs(60)).await;
    for (token, result) in tokens.iter().zip(&results) {
        let a = poll(&cluster.api, token).await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
        assert_eq!(&a.body, result, "{token} after a restart");
    }
    let agent = cluster.agent(&node).api.clone();
    assert_eq!(
        metric(&agent, "codefleet_submissions_stored", "").await,
        20.0
    );
    assert_eq!(
        metric(&agent, "codefleet_submissions_queued", "").await,
        0.0
    );

    let nodes = cluster.stop().await;
    assert_nothing_left(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancels_refusals_and_unknown_tokens() {
    let dir = StateDir::new("cancel");
    let mut cluster = Cluster::named("subs-cancel")
        .languages(&["python"])
        .agent_arg("--state-dir", dir.path().display())
        .agent_arg("--slots", 2)
        .agent_arg("--submission-concurrency", 1)
        .agent_arg("--submission-queue-length", 1)
        .agent_arg("--callback-secret", "cancel-test-secret")
        .start()
        .await;
    let node = cluster.node_ids()[0].clone();
    let api = cluster.api.clone();

    // Bad input gets the synchronous endpoint's answer, and nothing is stored.
    let bad_jobs = [
        json!({"language": "cobol", "source": "x"}),
        json!({"language": "python"}),
        json!({"language": "python", "source": "x", "limits": {"wall_time_ms": 10_000_000}}),
        json!({"language": "python", "files": [{"name": "../x.py", "content": ""}]}),
    ];
    for job in bad_jobs {
        let sync = api.post("/v1/execute", &job).await;
        let submitted = api.post("/v1/submissions", &json!({"execute": job})).await;
        assert_eq!(sync.status, StatusCode::BAD_REQUEST, "{sync:?}");
        assert_eq!(
            (
                submitted.status,
                submitted.code(),
                &submitted.body["detail"]
            ),
            (sync.status, sync.code(), &sync.body["detail"]),
            "{job}"
        );
    }
    let bad_judge = json!({"language": "python", "source": "print(1)", "tests": []});
    let sync = api.post("/v1/judge", &bad_judge).await;
    let submitted = api
        .post("/v1/submissions", &json!({"judge": bad_judge}))
        .await;
    assert_eq!(sync.status, StatusCode::BAD_REQUEST, "{sync:?}");
    assert_eq!(
        (
            submitted.status,
            submitted.code(),
            &submitted.body["detail"]
        ),
        (sync.status, sync.code(), &sync.body["detail"])
    );
    let execute = json!({"language": "python", "source": "print(1)"});
    let judge = json!({"language": "python", "source": "print(1)",
        "tests": [{"stdin": "", "expected": "1\n"}]});
    for body in [
        json!({}),
        json!({"execute": execute, "judge": judge}),
        json!({"execute": execute, "wait": true}),
        json!({"execute": execute, "callback_url": "http://127.0.0.1:9/hook"}),
        json!({"execute": execute, "callback_url": "not a url"}),
    ] {
        let a = api.post("/v1/submissions", &body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {a:?}");
        assert_eq!(a.code(), "invalid_request", "{body}: {a:?}");
    }
    let store = dir.path().join(format!("{node}.redb"));
    assert!(!store.exists(), "a refused submission made the store");

    // A judge runs too.
    let judged = submit(&api, json!({"judge": judge})).await;
    let s = wait_final(&api, &judged).await;
    assert_eq!(
        (&s["status"], &s["kind"]),
        (&json!("done"), &json!("judge")),
        "{s}"
    );
    assert_eq!(s["result"]["verdict"], "accepted", "{s}");

    // One running (it sleeps), one queued behind it (one submission runs at a time here).
    let long = json!({"execute": {"language": "python", "source": "import time\ntime.sleep(25)",
        "limits": {"wall_time_ms": 30_000, "cpu_time_ms": 30_000}}});
    let running = submit(&api, long).await;
    eventually(Duration::from_secs(60), "the long one runs", async || {
        poll(&api, &running).await.body["status"] == "running"
    })
    .await;
    let queued = submit(&api, python("print('never')")).await;
    assert_eq!(poll(&api, &queued).await.body["status"], "queued");
    // The node's line is full (one here): refused at once, to be sent again later.
    let full = api.post("/v1/submissions", &python("print(3)")).await;
    assert_eq!(full.status, StatusCode::SERVICE_UNAVAILABLE, "{full:?}");
    assert_eq!(full.code(), "no_capacity", "{full:?}");
    assert!(full.headers.contains_key("retry-after"), "{full:?}");
    // Synchronous jobs still have the other slot.
    let sync = api
        .execute(json!({"language": "python", "source": "print('sync')"}))
        .await;
    assert_eq!(sync["run"]["stdout"], "sync\n", "{sync}");

    let a = api.delete(&format!("/v1/submissions/{queued}")).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["status"], "cancelled", "{a:?}");
    assert!(a.body.get("started_at_ms").is_none(), "{a:?}");

    let a = api.delete(&format!("/v1/submissions/{running}")).await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["status"], "cancelled", "{a:?}");
    assert!(a.body["started_at_ms"].is_u64(), "{a:?}");
    // Killed: its slot is free long before its 25 s sleep would have ended, and the line moves on.
    let agent = cluster.agent(&node).api.clone();
    eventually(
        Duration::from_secs(10),
        "the killed job's slot freed",
        async || agent.get("/v1/capacity").await.body["slots_busy"] == 0,
    )
    .await;
    let after = submit(&api, python("print('after')")).await;
    let s = wait_final(&api, &after).await;
    assert_eq!(s["result"]["run"]["stdout"], "after\n", "{s}");
    for token in [&queued, &running] {
        let s = poll(&api, token).await.body;
        assert_eq!(s["status"], "cancelled", "{s}");
        assert!(s.get("result").is_none(), "{s}");
    }
    assert!(poll(&api, &queued)
        .await
        .body
        .get("started_at_ms")
        .is_none());
    // Cancelling a finished one changes nothing.
    let a = api.delete(&format!("/v1/submissions/{after}")).await;
    assert_eq!(
        (a.status, &a.body["status"]),
        (StatusCode::OK, &json!("done"))
    );

    // Tokens: unknown on a live node → 404; not a token → 404; a node not in the cluster →
    // node_lost.
    let unknown = format!("sb_{}.{node}", "0".repeat(32));
    for path in [
        format!("/v1/submissions/{unknown}"),
        "/v1/submissions/not-a-token".to_string(),
    ] {
        let a = api.get(&path).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}: {a:?}");
        assert_eq!(a.code(), "not_found", "{a:?}");
        let a = api.delete(&path).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "DELETE {path}: {a:?}");
    }
    let a = poll(&api, "sb_00ff.no-such-node").await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_GATEWAY, "node_lost"),
        "{a:?}"
    );

    // SIGTERM lets a running submission finish (within the grace): after the restart it is done
    // from that one run, not run again.
    let three = python("import time\ntime.sleep(3)\nprint('finished')");
    let draining = submit(&api, three).await;
    eventually(Duration::from_secs(60), "the sleeper runs", async || {
        poll(&api, &draining).await.body["status"] == "running"
    })
    .await;
    let started = poll(&api, &draining).await.body["started_at_ms"].clone();
    cluster.terminate(&node).await;
    cluster.revive(&node).await;
    let s = wait_final(&api, &draining).await;
    assert_eq!(s["result"]["run"]["stdout"], "finished\n", "{s}");
    assert_eq!(
        s["started_at_ms"], started,
        "run again after a graceful stop: {s}"
    );

    let nodes = cluster.stop().await;
    assert_nothing_left(nodes).await;
}

/// What the test's callback receiver got: path, headers, body.
type Received = Arc<Mutex<Vec<(String, HeaderMap, Bytes)>>>;

/// Answers 500 to the first call on `/flaky`, 200 to everything else.
async fn receive(
    State(got): State<Received>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> AxumStatus {
    let mut got = got.lock().unwrap();
    let first_flaky = uri.path() == "/flaky" && !got.iter().any(|(p, ..)| p == "/flaky");
    got.push((uri.path().to_string(), headers, body));
    if first_flaky {
        AxumStatus::INTERNAL_SERVER_ERROR
    } else {
        AxumStatus::OK
    }
}

const SECRET: &str = "callback-test-secret";

fn signature_valid(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(hex) = headers
        .get("x-codefleet-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
    else {
        return false;
    };
    let Some(bytes) = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
        .collect::<Option<Vec<u8>>>()
    else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(body);
    mac.verify_slice(&bytes).is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_are_signed_retried_and_guarded() {
    let got: Received = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let app = axum::Router::new()
        .fallback(axum::routing::post(receive))
        .with_state(got.clone());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let dir = StateDir::new("callbacks");
    let mut cluster = Cluster::named("subs-callback")
        .languages(&["python"])
        .agent_arg("--state-dir", dir.path().display())
        .agent_arg("--callback-secret", SECRET)
        .agent_arg("--callback-allow", "127.0.0.1/32")
        .agent_arg("--callback-backoff-ms", 100)
        .agent_arg("--submission-ttl-s", 3)
        .start()
        .await;
    let node = cluster.node_ids()[0].clone();
    let api = cluster.api.clone();
    let agent = cluster.agent(&node).api.clone();

    // Allowlisted: 127.0.0.1 gets the signed result.
    let mut body = python("print('called back')");
    body["callback_url"] = json!(format!("http://127.0.0.1:{port}/hook?from=test"));
    let token = submit(&api, body).await;
    let mut flaky = python("print('again')");
    flaky["callback_url"] = json!(format!("http://127.0.0.1:{port}/flaky"));
    let flaky_token = submit(&api, flaky).await;
    eventually(
        Duration::from_secs(60),
        "both callbacks delivered",
        async || {
            let got = got.lock().unwrap();
            got.iter().filter(|(p, ..)| p == "/hook").count() == 1
                && got.iter().filter(|(p, ..)| p == "/flaky").count() == 2
        },
    )
    .await;
    let calls = got.lock().unwrap().clone();
    for (path, headers, bytes) in &calls {
        assert!(
            signature_valid(headers, bytes),
            "{path}: a bad signature {headers:?}"
        );
        assert_eq!(headers["content-type"], "application/json");
        let delivered: Value = serde_json::from_slice(bytes).expect("the submission's JSON");
        let (want_token, stdout) = match path.as_str() {
            "/hook" => (&token, "called back\n"),
            _ => (&flaky_token, "again\n"),
        };
        assert_eq!(delivered["token"], **want_token, "{delivered}");
        assert_eq!(headers["x-codefleet-submission"], want_token.as_str());
        assert_eq!(delivered["status"], "done", "{delivered}");
        assert_eq!(delivered["result"]["run"]["stdout"], stdout, "{delivered}");
    }
    // The signature covers the body: one byte changed, and it does not verify.
    let (_, headers, bytes) = &calls[0];
    let mut tampered = bytes.to_vec();
    tampered[0] ^= 1;
    assert!(!signature_valid(headers, &tampered));
    assert_eq!(
        metric(&agent, "codefleet_callback_deliveries_total", "").await,
        2.0
    );
    assert_eq!(
        metric(
            &agent,
            "codefleet_callback_failures_total",
            "reason=\"status\""
        )
        .await,
        1.0
    );

    // Not allowlisted: refused when the submission comes, nothing delivered.
    for (url, why) in [
        (format!("http://127.0.0.2:{port}/hook"), "loopback"),
        (format!("http://[::1]:{port}/hook"), "loopback"),
        (
            "http://169.254.169.254/latest/meta-data".to_string(),
            "metadata",
        ),
        ("http://[fd00:ec2::254]/".to_string(), "metadata"),
        ("http://10.1.2.3/".to_string(), "private"),
    ] {
        let mut body = python("print(1)");
        body["callback_url"] = json!(url);
        let a = api.post("/v1/submissions", &body).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{url}: {a:?}");
        let detail = a.body["detail"].as_str().unwrap_or("");
        assert!(
            detail.contains(why) && detail.contains("--callback-allow"),
            "{url}: {detail}"
        );
    }

    // Finished results expire (3 s here), and the token then says so.
    eventually(Duration::from_secs(30), "the result expired", async || {
        poll(&api, &token).await.status == StatusCode::NOT_FOUND
    })
    .await;
    let a = poll(&api, &token).await;
    assert_eq!(a.code(), "not_found");
    let detail = a.body["detail"].as_str().unwrap_or("");
    assert!(
        detail.contains("expired") && detail.contains("--submission-ttl-s"),
        "{detail}"
    );

    let nodes = cluster.stop().await;
    server.abort();
    assert_nothing_left(nodes).await;
}
