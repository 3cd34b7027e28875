//! The agent's job path, pools and sessions on the fake engine (`engine::fake`): a whole agent
//! (`codefleet_node_agent::run`: startup, image preparation, the refiller, session expiry,
//! shutdown) with in-process containers whose fake supervisors speak the real sandbox protocol
//! over the real channel (a unix socket in the run dir, or the attach stream). Requests go
//! through the agent's router. Programs are fake scripts (see `engine::fake`), so outcomes are
//! whatever a test writes: ok, exit codes, timeouts, crashes before or after the job was
//! accepted, memory kills, failed resets. The real-Docker suites in `tests/` remain the proof
//! that the features work; these run in a few seconds.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, Method, Request, StatusCode};
use clap::Parser;
use serde_json::{json, Value};
use tower::ServiceExt;

use codefleet_node_agent::catalog::Catalog;
use codefleet_node_agent::engine::fake::FakeEngine;
use codefleet_node_agent::engine::Engine;
use codefleet_node_agent::sandbox::Reaper;
use codefleet_node_agent::{http, Agent, Config};

/// Two fake languages: one interpreted, one compiled (a compile stage, then `./main`).
const CATALOG: &str = r#"
[[language]]
name = "fakepy"
image = "fakepy"
file_name = "main.fp"
version = ["fakepy", "--version"]
run = ["fakepy", "{entry}"]
warmup = "print warm\n"

[[language]]
name = "fakec"
image = "fakec"
file_name = "main.fc"
version = ["fakec", "--version"]
compile = ["fakec", "-o", "main", "{entry}"]
run = ["./main"]
"#;

/// An agent on a fake engine, served in this process until `stop`.
struct Node {
    agent: Arc<Agent>,
    fake: Arc<FakeEngine>,
    stop: tokio::sync::oneshot::Sender<()>,
    served: tokio::task::JoinHandle<anyhow::Result<()>>,
    dir: PathBuf,
}

impl Node {
    /// Starts an agent named `name` with `flags` and waits until its languages are ready.
    async fn start(name: &str, flags: &[&str]) -> Node {
        let dir =
            std::env::temp_dir().join(format!("codefleet-fake-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        for image in ["fakepy", "fakec"] {
            std::fs::create_dir_all(dir.join("images").join(image)).unwrap();
            std::fs::write(
                dir.join("images").join(image).join("Dockerfile"),
                "FROM scratch\n",
            )
            .unwrap();
        }
        std::fs::write(dir.join("languages.toml"), CATALOG).unwrap();
        let path = |p: &str| dir.join(p).display().to_string();
        let (languages, images, run) = (path("languages.toml"), path("images"), path("run"));
        let mut args = vec![
            "codefleet-agent",
            "--node-id",
            name,
            "--languages",
            &languages,
        ];
        args.extend(["--images-dir", &images, "--run-dir", &run]);
        args.extend(flags);
        let config = Config::parse_from(args);
        let catalog = Catalog::load(config.languages.as_deref())
            .and_then(|c| c.restrict(&config.enable))
            .unwrap();
        let languages = catalog.languages.len();
        let fake = FakeEngine::new();
        let engine: Arc<dyn Engine> = fake.clone();
        let (reaper, _) = Reaper::start(engine.clone());
        let agent = Arc::new(Agent::new(
            config,
            catalog,
            engine,
            reaper,
            "/fake/supervisor".into(),
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(codefleet_node_agent::run(
            agent.clone(),
            listener,
            async move {
                let _ = stopped.await;
            },
        ));
        let node = Node {
            agent,
            fake,
            stop,
            served,
            dir,
        };
        eventually("every language ready", || {
            let report = node.agent.capacity();
            report.ready
                && report.languages.len() == languages
                && report.languages.values().all(|l| l.version == "1.0.0")
        })
        .await;
        node
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> (StatusCode, Value) {
        let mut request = Request::builder().method(method).uri(path);
        let body = match body {
            Some(v) => {
                request = request.header(header::CONTENT_TYPE, "application/json");
                Body::from(v.to_string())
            }
            None => Body::empty(),
        };
        let router = http::router(self.agent.clone());
        let answer = router.oneshot(request.body(body).unwrap()).await.unwrap();
        let status = answer.status();
        let bytes = axum::body::to_bytes(answer.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Runs `source` in `language` (with `extra` fields) and returns the 200 answer.
    async fn execute(&self, language: &str, source: &str, extra: Value) -> Value {
        let mut body = json!({ "language": language, "source": source });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().cloned().unwrap_or_default());
        let (status, answer) = self.call(Method::POST, "/v1/execute", Some(body)).await;
        assert_eq!(status, StatusCode::OK, "{answer}");
        answer
    }

    fn warm(&self, language: &str) -> u32 {
        self.agent.capacity().languages[language].warm
    }

    /// Containers of `kind` that exist and run.
    fn running(&self, kind: &str) -> Vec<String> {
        let present = self.fake.present().into_iter();
        present
            .filter(|c| c.kind == kind && c.running)
            .map(|c| c.id)
            .collect()
    }

    /// The container that read the job answered as `answer`.
    fn container_of(&self, answer: &Value) -> String {
        let id = answer["id"].as_str().unwrap();
        let jobs = self.fake.jobs();
        let delivery = jobs.iter().rev().find(|d| d.job == id && d.accepted);
        delivery
            .expect("a supervisor accepted the job")
            .container
            .clone()
    }

    /// Shuts the agent down (as SIGTERM does) and waits for it.
    async fn stop(self) -> Arc<FakeEngine> {
        let _ = self.stop.send(());
        self.served.await.unwrap().unwrap();
        let _ = std::fs::remove_dir_all(&self.dir);
        self.fake
    }
}

/// Waits for `cond`, generously: the machine is shared.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(Instant::now() < deadline, "{what}: not within 20 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn run_stdout(answer: &Value) -> &str {
    answer["run"]["stdout"].as_str().unwrap_or_default()
}

/// The pool fills to its minimum with warmed-up sandboxes (the probe's container is gone), and
/// a sandbox a job used up is removed and replaced.
#[tokio::test]
async fn the_pool_fills_to_its_minimum_and_refills_after_a_take() {
    let node = Node::start("fake-fill", &["--pool-min", "2", "--recycle-after", "1"]).await;
    eventually("two warm fakepy sandboxes", || {
        node.warm("fakepy") == 2 && node.running("pool").len() == 4
    })
    .await;
    let probes = node
        .fake
        .created()
        .into_iter()
        .filter(|c| c.spec.kind == "probe");
    let probes: Vec<String> = probes.map(|c| c.id).collect();
    assert_eq!(probes.len(), 2, "one version probe per language");
    assert!(probes.iter().all(|p| node.fake.removed().contains(p)));
    let warmups = node.fake.jobs().len();
    assert!(
        warmups >= 4,
        "every pool sandbox ran its warm-up: {warmups}"
    );
    assert_eq!(node.fake.builds().len(), 2, "each image built once");

    let answer = node.execute("fakepy", "print hi", json!({})).await;
    assert_eq!(
        (answer["status"].as_str(), run_stdout(&answer)),
        (Some("ok"), "hi\n")
    );
    assert_eq!(answer["sandbox"], "fresh", "{answer}");
    let used = node.container_of(&answer);
    eventually("the used sandbox removed and replaced", || {
        node.fake.removed().contains(&used) && node.warm("fakepy") == 2
    })
    .await;
    assert!(!node.running("pool").contains(&used));
    node.stop().await;
}

/// A pooled sandbox killed behind the agent's back is swept out of the pool, removed and
/// replaced; jobs keep running.
#[tokio::test]
async fn a_dead_pooled_sandbox_is_swept_and_replaced() {
    let node = Node::start("fake-sweep", &["--pool-min", "2", "--enable", "fakepy"]).await;
    eventually("a full pool", || node.running("pool").len() == 2).await;
    let victim = node.running("pool")[0].clone();
    node.fake.kill(&victim);
    eventually("the dead one removed, the pool full again", || {
        node.fake.removed().contains(&victim) && node.running("pool").len() == 2
    })
    .await;
    let answer = node.execute("fakepy", "print after", json!({})).await;
    assert_eq!(run_stdout(&answer), "after\n");
    node.stop().await;
}

/// Shutting down removes every container the node made: pools, sessions, probes.
#[tokio::test]
async fn shutdown_removes_every_container() {
    let node = Node::start("fake-shutdown", &["--pool-min", "2"]).await;
    eventually("full pools", || node.running("pool").len() == 4).await;
    let (status, _) = node
        .call(
            Method::POST,
            "/v1/sessions",
            Some(json!({"language": "fakepy"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    let fake = node.stop().await;
    assert_eq!(fake.present(), [], "no container left");
    let created: Vec<String> = fake.created().into_iter().map(|c| c.id).collect();
    let mut removed = fake.removed();
    removed.sort();
    assert_eq!(removed, created, "each removed once");
}

/// What a job's program does decides its answer; what the sandbox does decides whether the
/// node failed it (`internal_error`) or the job's memory did (`memory_limit`).
#[tokio::test]
async fn job_outcomes_follow_the_program_and_the_sandbox() {
    let node = Node::start("fake-outcomes", &["--pool-min", "1"]).await;
    let table: [(&str, &str, Value, &str); 8] = [
        ("fakepy", "print hi", json!({}), "ok"),
        ("fakepy", "print a\nexit 3", json!({}), "runtime_error"),
        (
            "fakepy",
            "sleep 60000",
            json!({"limits": {"wall_time_ms": 100}}),
            "timeout",
        ),
        (
            "fakepy",
            "print 0123456789abcdef",
            json!({"limits": {"output_bytes": 8}}),
            "output_limit",
        ),
        (
            "fakepy",
            "fail the work dir is gone",
            json!({}),
            "internal_error",
        ),
        ("fakepy", "crash", json!({}), "internal_error"),
        ("fakepy", "oom", json!({}), "memory_limit"),
        (
            "fakec",
            "compile-error main.fc:1: boom",
            json!({}),
            "compile_error",
        ),
    ];
    for (language, source, extra, want) in table {
        let answer = node.execute(language, source, extra).await;
        assert_eq!(answer["status"], want, "{source:?}: {answer}");
    }
    let exit = node.execute("fakepy", "print a\nexit 3", json!({})).await;
    assert_eq!(
        (exit["run"]["exit_code"].as_i64(), run_stdout(&exit)),
        (Some(3), "a\n")
    );
    let cut = node
        .execute(
            "fakepy",
            "print 0123456789",
            json!({"limits": {"output_bytes": 4}}),
        )
        .await;
    assert_eq!(
        (run_stdout(&cut), cut["run"]["stdout_truncated"].as_bool()),
        ("0123", Some(true))
    );
    let failed = node
        .execute("fakepy", "fail the work dir is gone", json!({}))
        .await;
    let stderr = failed["run"]["stderr"].as_str().unwrap();
    assert!(stderr.contains("the work dir is gone"), "{failed}");
    let lost = node.execute("fakepy", "crash", json!({})).await;
    assert!(
        lost["run"]["stderr"]
            .as_str()
            .unwrap()
            .contains("supervisor went away"),
        "{lost}"
    );
    let compiled = node.execute("fakec", "compile-error boom", json!({})).await;
    assert_eq!(
        (compiled["compile"]["stderr"].as_str(), &compiled["run"]),
        (Some("boom\n"), &Value::Null)
    );
    let built = node.execute("fakec", "print c", json!({})).await;
    assert_eq!(
        (built["compile"]["status"].as_str(), run_stdout(&built)),
        (Some("ok"), "c\n")
    );
    node.stop().await;
}

/// A sandbox that dies before it accepted the job did not start it: the job runs on another
/// sandbox and succeeds. One that dies after accepting did start it: no second run.
#[tokio::test]
async fn a_job_is_retried_only_when_it_did_not_start() {
    let node = Node::start("fake-retry", &["--pool-min", "2", "--enable", "fakepy"]).await;
    eventually("a full pool", || node.warm("fakepy") == 2).await;
    let before = node.fake.jobs().len();
    node.fake.die_before_accept(1);
    let answer = node.execute("fakepy", "print once", json!({})).await;
    assert_eq!(
        (answer["status"].as_str(), run_stdout(&answer)),
        (Some("ok"), "once\n")
    );
    // The first delivery after the fault was armed died unaccepted; the answer came from
    // another sandbox (a retry is a new job id), and nothing else died.
    let since = node.fake.jobs().split_off(before);
    let lost: Vec<_> = since.iter().filter(|d| !d.accepted).collect();
    assert_eq!((lost.len(), lost[0]), (1, &since[0]), "{since:?}");
    let dead = since[0].container.clone();
    assert_ne!(node.container_of(&answer), dead);
    eventually("the dead sandbox removed", || {
        node.fake.removed().contains(&dead)
    })
    .await;

    let answer = node
        .execute("fakepy", "print started\ncrash", json!({}))
        .await;
    assert_eq!(answer["status"], "internal_error", "{answer}");
    let id = answer["id"].as_str().unwrap();
    let deliveries = node.fake.jobs().into_iter().filter(|d| d.job == id).count();
    assert_eq!(deliveries, 1, "an accepted job is not run twice");

    // Sandboxes that keep dying before accepting: a few more tries, then the node's failure.
    node.fake.die_before_accept(100);
    let answer = node.execute("fakepy", "print never", json!({})).await;
    assert_eq!(answer["status"], "internal_error", "{answer}");
    let stderr = answer["run"]["stderr"].as_str().unwrap();
    assert!(stderr.contains("dead before the job started"), "{answer}");
    node.fake.die_before_accept(0);
    node.stop().await;
}

/// A container the engine refuses to create fails that job (the node's fault, the engine still
/// there); an engine that is away makes the node refuse work with 503 until it is back.
#[tokio::test]
async fn engine_failures_on_a_cold_start() {
    let node = Node::start("fake-engine-away", &["--pool-min", "0"]).await;
    node.fake.fail_creates(1);
    let refused = node.execute("fakepy", "print hi", json!({})).await;
    assert_eq!(refused["status"], "internal_error", "{refused}");
    assert!(
        refused["run"]["stderr"]
            .as_str()
            .unwrap()
            .contains("refused (500)"),
        "{refused}"
    );
    let cold = node.execute("fakepy", "print hi", json!({})).await;
    assert_eq!(
        (cold["status"].as_str(), cold["sandbox"].as_str()),
        (Some("ok"), Some("cold"))
    );

    node.fake.set_reachable(false);
    let (status, problem) = node
        .call(
            Method::POST,
            "/v1/execute",
            Some(json!({"language": "fakepy", "source": "print hi", "isolation": "fresh"})),
        )
        .await;
    assert_eq!(
        (status, problem["code"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("no_capacity")),
        "{problem}"
    );
    assert!(problem["detail"]
        .as_str()
        .unwrap()
        .contains("cannot reach its Docker engine"));
    let (status, _) = node.call(Method::GET, "/readyz", None).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    node.fake.set_reachable(true);
    let mut ready = false;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready && Instant::now() < deadline {
        ready = node.call(Method::GET, "/readyz", None).await.0 == StatusCode::OK;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ready, "ready again once the engine answers");
    node.stop().await;
}

/// A used sandbox is reset and reused (its files gone); one whose reset fails is discarded.
#[tokio::test]
async fn used_sandboxes_are_reset_and_reused_or_discarded() {
    let node = Node::start("fake-reset", &["--pool-min", "1", "--enable", "fakepy"]).await;
    let first = node
        .execute("fakepy", "write f kept\ncat f", json!({}))
        .await;
    assert_eq!(run_stdout(&first), "kept\n");
    // The reset runs after the answer; a job arriving during it would take a fresh sandbox
    // after a short wait, so wait for it here.
    let key = node.agent.sandboxes().key(
        node.agent.registry().catalog().find("fakepy").unwrap(),
        node.agent.config().default_limits().memory_bytes,
    );
    eventually("the used sandbox reset", || {
        node.agent.sandboxes().resetting(&key) == 0
    })
    .await;
    let reused = node.execute("fakepy", "cat f", json!({})).await;
    assert_eq!(reused["sandbox"], "warm", "{reused}");
    assert_eq!(node.container_of(&first), node.container_of(&reused));
    assert_eq!(
        reused["status"], "runtime_error",
        "the reset removed f: {reused}"
    );

    let tainted = node.execute("fakepy", "taint\nprint a", json!({})).await;
    assert_eq!(tainted["status"], "ok");
    let container = node.container_of(&tainted);
    eventually("the sandbox whose reset failed removed", || {
        node.fake.removed().contains(&container)
    })
    .await;
    let next = node.execute("fakepy", "print b", json!({})).await;
    assert_ne!(node.container_of(&next), container);
    node.stop().await;
}

/// The attach stream serves as the channel as well, and a supervisor slow to say hello is
/// waited for.
#[tokio::test]
async fn a_slow_start_over_the_attach_stream() {
    let node = Node::start("fake-attach", &["--pool-min", "0", "--channel", "attach"]).await;
    node.fake.set_start_delay(Duration::from_millis(300));
    let answer = node.execute("fakepy", "print slow", json!({})).await;
    assert_eq!(
        (run_stdout(&answer), answer["sandbox"].as_str()),
        ("slow\n", Some("cold"))
    );
    assert!(node.fake.created().iter().all(|c| c.spec.channel.is_none()));
    node.stop().await;
}

/// A session keeps one container between executions (its files stay) until it is deleted, and
/// one whose sandbox dies is gone.
#[tokio::test]
async fn a_session_keeps_its_sandbox_until_deleted() {
    let node = Node::start("fake-session", &["--pool-min", "0", "--enable", "fakepy"]).await;
    let (status, session) = node
        .call(
            Method::POST,
            "/v1/sessions",
            Some(json!({"language": "fakepy"})),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{session}");
    let path = format!("/v1/sessions/{}/execute", session["id"].as_str().unwrap());
    let run = |source: &str| json!({"source": source});
    let (_, first) = node
        .call(Method::POST, &path, Some(run("write notes hello")))
        .await;
    let (_, second) = node.call(Method::POST, &path, Some(run("cat notes"))).await;
    assert_eq!(run_stdout(&second), "hello\n", "{second}");
    let container = node.container_of(&first);
    assert_eq!(node.container_of(&second), container);
    assert_eq!(node.running("session"), std::slice::from_ref(&container));

    let (status, _) = node
        .call(Method::DELETE, &path.replace("/execute", ""), None)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    eventually("the session's container removed", || {
        node.fake.removed().contains(&container)
    })
    .await;
    let (status, _) = node
        .call(Method::POST, &path, Some(run("print gone")))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let (_, session) = node
        .call(
            Method::POST,
            "/v1/sessions",
            Some(json!({"language": "fakepy"})),
        )
        .await;
    let path = format!("/v1/sessions/{}/execute", session["id"].as_str().unwrap());
    let (_, lost) = node.call(Method::POST, &path, Some(run("crash"))).await;
    assert_eq!(lost["status"], "internal_error", "{lost}");
    let (status, _) = node
        .call(Method::POST, &path, Some(run("print again")))
        .await;
    assert_eq!(
        status,
        StatusCode::NOT_FOUND,
        "the session went with its sandbox"
    );
    node.stop().await;
}

/// A session idle past its TTL is removed with its container.
#[tokio::test]
async fn an_idle_session_expires_with_its_container() {
    let node = Node::start("fake-expiry", &["--pool-min", "0", "--enable", "fakepy"]).await;
    let (_, session) = node
        .call(
            Method::POST,
            "/v1/sessions",
            Some(json!({"language": "fakepy", "ttl_s": 1})),
        )
        .await;
    let container = node.running("session")[0].clone();
    eventually("the expired session's container removed", || {
        node.fake.removed().contains(&container)
    })
    .await;
    let path = format!("/v1/sessions/{}/execute", session["id"].as_str().unwrap());
    let (status, _) = node
        .call(Method::POST, &path, Some(json!({"source": "print x"})))
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    node.stop().await;
}
