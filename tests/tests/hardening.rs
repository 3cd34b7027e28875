//! What an outside abuse run found, each closed and kept closed: special files a session leaves
//! in its work dir, zombies during a job, arguments the kernel refuses, file names that read as
//! options, sandboxes that died behind the agent's back, an engine that goes away, two agents
//! with one node id, bursts that must queue, and failures counted by whose they are.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use codefleet_tests::{
    bin_path, containers_of, eventually, free_port, node_id, remove_containers_of, AgentOpts,
    AgentProcess, Answer, Api, BusyCore, Cluster, StatusCode, TestAgent,
};
use serde_json::{json, Value};

fn run(r: &Value) -> &Value {
    &r["run"]
}

fn stdout(r: &Value) -> &str {
    run(r)["stdout"].as_str().unwrap_or_default()
}

fn assert_problem(a: &Answer, status: StatusCode, code: &str) {
    assert_eq!((a.status, a.code()), (status, code), "{a:?}");
    let ct = a.headers.get("content-type").and_then(|v| v.to_str().ok());
    assert_eq!(ct, Some("application/problem+json"), "{a:?}");
}

/// Removes every container of `node` behind its agent's back, as `docker rm -f` would.
fn remove_behind_its_back(node: &str) -> usize {
    let ids = containers_of(node);
    let status = std::process::Command::new("docker")
        .args(["rm", "-f"])
        .args(&ids)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("docker CLI runs");
    assert!(status.success());
    ids.len()
}

/// A sample of the agent's `/metrics`: the value of the first line starting with `series`.
async fn metric(api: &Api, series: &str) -> Option<f64> {
    let text = api.get("/metrics").await.body;
    let text = text.as_str().unwrap_or_default().to_string();
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn warm(api: &Api, language: &str) -> u64 {
    let cap = api.get("/v1/capacity").await.body;
    cap["languages"][language]["warm"].as_u64().unwrap_or(0)
}

/// Item 1: a session's earlier execution leaves a FIFO, a socket, symlinks and directories at
/// the paths the next execution sends files to. The next execution answers at once (on the old
/// code the write of the FIFO waited for a reader until the gateway gave up with 502
/// `node_lost`); links are replaced, never followed; a directory in a file's place is the job's
/// own failure naming the file; the session stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn special_files_left_by_a_session_neither_block_nor_redirect_the_next_execution() {
    let mut cluster = Cluster::named("special-files")
        .agents(1)
        .languages(&["python"])
        .start()
        .await;
    let api = &cluster.api;
    let created = api
        .post("/v1/sessions", &json!({"language": "python", "ttl_s": 120}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let path = format!(
        "/v1/sessions/{}/execute",
        created.body["id"].as_str().unwrap()
    );

    let plant = r#"
import os, socket
os.mkfifo('data.txt')
s = socket.socket(socket.AF_UNIX)
s.bind('sock.txt')
os.symlink('/tmp/outside.txt', 'link.txt')
open('sub', 'w').write('a file where a directory goes')
os.symlink('/tmp', 'lnk')
os.mkdir('dir.txt')
os.remove('main.py')
os.mkfifo('main.py')
print('planted')
"#;
    let r = api.post(&path, &json!({"source": plant})).await;
    assert_eq!(
        (r.status, stdout(&r.body)),
        (StatusCode::OK, "planted\n"),
        "{r:?}"
    );

    let check = r#"
import os
for n in ['data.txt', 'sock.txt', 'link.txt', 'sub/x.txt', 'lnk/y.txt']:
    d = os.path.dirname(n) or '.'
    print(n, os.path.islink(n) or os.path.islink(d), open(n).read())
print(os.path.exists('/tmp/outside.txt'), os.path.exists('/tmp/y.txt'))
"#;
    let file = |name: &str, content: &str| json!({"name": name, "content": content});
    let started = Instant::now();
    let r = api
        .post(
            &path,
            &json!({"files": [file("main.py", check), file("data.txt", "d"), file("sock.txt", "s"),
                file("link.txt", "l"), file("sub/x.txt", "x"), file("lnk/y.txt", "y")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(
        stdout(&r.body),
        "data.txt False d\nsock.txt False s\nlink.txt False l\nsub/x.txt False x\nlnk/y.txt False y\nFalse False\n",
        "{r:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "answered promptly"
    );

    let r = api
        .post(
            &path,
            &json!({"files": [file("main.py", "print(1)"), file("dir.txt", "x")]}),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{r:?}");
    assert_eq!(r.body["status"], "runtime_error", "{r:?}");
    let stderr = run(&r.body)["stderr"].as_str().unwrap_or_default();
    assert!(
        stderr.contains("dir.txt") && stderr.contains("directory"),
        "{r:?}"
    );

    let r = api.post(&path, &json!({"source": "print('usable')"})).await;
    assert_eq!(
        (r.status, stdout(&r.body)),
        (StatusCode::OK, "usable\n"),
        "{r:?}"
    );
    cluster.stop().await;
}

/// Item 2: orphans of the job that exit while it runs are reaped at once by PID 1, so a program
/// that starts short-lived helpers is bounded by its process limit, not its dead helpers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_that_exit_during_a_job_are_reaped_at_once() {
    let agent = TestAgent::start("zombies", AgentOpts::languages(&["python"])).await;
    // Each helper starts a helper of its own and exits at once: the grandchild is orphaned to
    // PID 1 and exits a moment later. Unreaped, those dead orphans fill the process limit.
    let program = r#"
import os, time
def fork():
    for _ in range(400):
        try:
            return os.fork()
        except BlockingIOError:
            time.sleep(0.005)
    return None
done = 0
for i in range(200):
    pid = fork()
    if pid is None:
        print('no process left after', done)
        raise SystemExit(1)
    if pid == 0:
        grandchild = fork()
        if grandchild == 0:
            os._exit(0)
        os._exit(0 if grandchild else 3)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        print('a helper could not start its own after', done)
        raise SystemExit(1)
    done += 1
print('done', done)
"#;
    let r = agent
        .api
        .execute(json!({"language": "python", "source": program,
            "limits": {"processes": 16, "wall_time_ms": 30000, "cpu_time_ms": 30000}}))
        .await;
    assert_eq!(
        (r["status"].as_str(), stdout(&r)),
        (Some("ok"), "done 200\n"),
        "{r}"
    );
    agent.stop().await;
}

/// Items 3 and 4: arguments beyond what the kernel accepts for an exec, and file names that a
/// command would read as options, are the caller's fault: 400 before anything runs, at the
/// gateway and at the agent alike; arguments just inside the documented maxima run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arguments_the_kernel_refuses_and_option_like_file_names_are_rejected_up_front() {
    let mut cluster = Cluster::named("args")
        .agents(1)
        .languages(&["python"])
        .start()
        .await;
    let agent = cluster.agent(&cluster.node_ids()[0]).api.clone();
    let gateway = cluster.api.clone();
    let too_many: Vec<String> = vec!["a".into(); 1025];
    let one_too_long = vec!["a".repeat(64 * 1024 + 1)];
    let too_long_together = vec!["a".repeat(60 * 1024); 3];
    let kernel_refuses = vec!["a".repeat(200 * 1024)];
    let nul = vec!["a\u{0}b".to_string()];
    for api in [&gateway, &agent] {
        for args in [
            &too_many,
            &one_too_long,
            &too_long_together,
            &kernel_refuses,
            &nul,
        ] {
            let body = json!({"language": "python", "source": "print(1)", "args": args});
            let a = api.post("/v1/execute", &body).await;
            assert_problem(&a, StatusCode::BAD_REQUEST, "invalid_request");
        }
        let within: Vec<String> = vec!["b".repeat(100); 1024];
        let r = api
            .execute(json!({"language": "python", "args": within,
                "source": "import sys\nprint(len(sys.argv) - 1, sum(map(len, sys.argv[1:])))"}))
            .await;
        assert_eq!(stdout(&r), "1024 102400\n", "{r}");

        for (language, name) in [
            ("python", "-c.py"),
            ("python", "--help.py"),
            ("java", "-version.java"),
            ("cpp", "--help.cpp"),
            ("rust", "-o.rs"),
            ("go", "-x.go"),
            ("javascript", "--inspect.js"),
        ] {
            let body = json!({"language": language, "files": [{"name": name, "content": "x"}]});
            let a = api.post("/v1/execute", &body).await;
            // The agent serves python only: for other languages it may say so first, but a
            // file name that reads as an option never runs.
            if std::ptr::eq(api, &agent) && language != "python" {
                assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
                continue;
            }
            assert_problem(&a, StatusCode::BAD_REQUEST, "invalid_file_name");
        }
        let body = json!({"language": "python", "files": [
            {"name": "main.py", "content": "print(1)"}, {"name": "lib/-x.py", "content": "x"}]});
        let a = api.post("/v1/execute", &body).await;
        assert_problem(&a, StatusCode::BAD_REQUEST, "invalid_file_name");
    }
    // Nothing was discarded for any of it: the pool's sandboxes are the ones it started with.
    let r = agent.python("print('fine')").await;
    assert!(
        matches!(r["sandbox"].as_str(), Some("warm" | "fresh")),
        "{r}"
    );
    cluster.stop().await;
}

/// Item 5: every container of a node removed behind its agent's back. The next 20 jobs all
/// succeed (a job handed a dead sandbox runs on another; on the old code each dead sandbox
/// failed one job with `internal_error`) and the pool refills by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_removed_behind_the_agents_back_heal_without_failing_a_job() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 3)
        .arg("--pool-max", 4);
    let agent = TestAgent::start("heal", opts).await;
    eventually(Duration::from_secs(60), "pool of 3", async || {
        warm(&agent.api, "python").await >= 3
    })
    .await;
    assert!(remove_behind_its_back(&agent.node) >= 3);
    for i in 0..20 {
        let r = agent.api.python(&format!("print({i})")).await;
        assert_eq!(
            (r["status"].as_str(), stdout(&r)),
            (Some("ok"), &*format!("{i}\n")),
            "job {i}: {r}"
        );
    }
    eventually(Duration::from_secs(60), "pool refilled", async || {
        warm(&agent.api, "python").await >= 3
    })
    .await;
    let dead = metric(&agent.api, "codefleet_sandboxes_dead_total").await;
    assert!(
        dead.is_some_and(|n| n >= 1.0),
        "dead sandboxes counted: {dead:?}"
    );
    agent.stop().await;
}

/// A unix-socket proxy in front of the Docker engine that the test can pause, as an engine
/// that restarts or hangs looks to its clients.
struct EngineProxy {
    path: std::path::PathBuf,
    paused: Arc<AtomicBool>,
    open: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
    task: tokio::task::JoinHandle<()>,
}

impl EngineProxy {
    fn start(name: &str) -> EngineProxy {
        let path = std::env::temp_dir().join(format!("{name}-docker.sock"));
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).expect("bind proxy socket");
        let paused = Arc::new(AtomicBool::new(false));
        let open: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (p, o) = (paused.clone(), open.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if p.load(Ordering::SeqCst) {
                    continue; // dropped: the engine does not answer
                }
                let copy = tokio::spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
                o.lock().unwrap().push(copy.abort_handle());
            }
        });
        EngineProxy {
            path,
            paused,
            open,
            task,
        }
    }

    fn docker_host(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Cuts every open connection and answers no new one.
    fn pause(&self) {
        self.paused.store(true, Ordering::SeqCst);
        for conn in self.open.lock().unwrap().drain(..) {
            conn.abort();
        }
    }

    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
}

impl Drop for EngineProxy {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Item 5: the engine goes away and comes back (here: its socket stops answering while every
/// container of the node is removed, which is what a dockerd restart does to the agent). The
/// agent says it is not ready and refuses new work with a retryable 503 meanwhile, never
/// `internal_error`; it recovers by itself, and the next 20 jobs all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_engine_that_goes_away_makes_the_agent_unready_and_it_recovers_by_itself() {
    let node = node_id("engine-away");
    let proxy = EngineProxy::start(&node);
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 2)
        .env("DOCKER_HOST", proxy.docker_host());
    let agent = AgentProcess::spawn(&node, free_port(), &opts).await;
    let api = agent.api.clone();
    eventually(Duration::from_secs(60), "pool of 2", async || {
        warm(&api, "python").await >= 2
    })
    .await;

    proxy.pause();
    remove_behind_its_back(&node);
    eventually(
        Duration::from_secs(15),
        "not ready while the engine is away",
        async || api.get("/readyz").await.status == StatusCode::SERVICE_UNAVAILABLE,
    )
    .await;
    let cap = api.get("/v1/capacity").await.body;
    assert_eq!(cap["ready"], false, "{cap}");
    let a = api
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "print(1)"}),
        )
        .await;
    assert_problem(&a, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
    assert!(a.headers.contains_key("retry-after"), "{a:?}");

    proxy.resume();
    eventually(Duration::from_secs(30), "ready again", async || {
        api.get("/readyz").await.status == StatusCode::OK
    })
    .await;
    for i in 0..20 {
        let r = api.python(&format!("print({i})")).await;
        assert_eq!(r["status"], "ok", "job {i} after the engine came back: {r}");
    }
    eventually(Duration::from_secs(60), "pool refilled", async || {
        warm(&api, "python").await >= 2
    })
    .await;
    drop(agent);
    remove_containers_of(&node);
}

/// Item 6: a second agent with the same node id on one machine refuses to start (exit 64, a
/// message naming the holder) and leaves the first one's sandboxes alone; once the first is
/// gone (even by `kill -9`), a new one takes the id over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_has_one_live_agent_and_a_dead_ones_id_is_taken_over() {
    let node = node_id("lease");
    let opts = AgentOpts::languages(&["python"]);
    let first = AgentProcess::spawn(&node, free_port(), &opts).await;
    eventually(Duration::from_secs(60), "first agent warm", async || {
        warm(&first.api, "python").await >= 1
    })
    .await;
    let before = containers_of(&node);

    let mut second = AgentProcess::launch(&node, free_port(), &opts);
    let status = second
        .exited(Duration::from_secs(30))
        .await
        .expect("the second agent exits");
    assert_eq!(status.code(), Some(64), "exit status {status:?}");
    let log = std::fs::read_to_string(AgentProcess::log_path(&node)).unwrap_or_default();
    assert!(log.contains("in use by another agent"), "{log}");
    for id in &before {
        assert!(
            containers_of(&node).contains(id),
            "container {id} of the first agent survived"
        );
    }
    let r = first.api.python("print('first still serves')").await;
    assert_eq!(stdout(&r), "first still serves\n", "{r}");
    assert!(
        matches!(r["sandbox"].as_str(), Some("warm" | "fresh")),
        "{r}"
    );

    first.signal("KILL");
    drop(first);
    let third = AgentProcess::spawn(&node, free_port(), &opts).await;
    let r = third.api.python("print('taken over')").await;
    assert_eq!(stdout(&r), "taken over\n", "{r}");
    drop((second, third));
    remove_containers_of(&node);
}

/// A `--dev` gateway run as its own process, serving Python only. Dropping it kills it and
/// removes its agent's containers, even when the test failed half-way.
struct DevGateway {
    child: std::process::Child,
    api: Api,
    port: u16,
    /// The node id given with `--dev-node-id`, if any.
    given: Option<String>,
}

impl DevGateway {
    fn launch(port: u16, node_id: Option<&str>) -> DevGateway {
        let log = std::env::temp_dir().join(format!("t{}-dev-{port}.log", std::process::id()));
        let mut command = std::process::Command::new(bin_path("codefleet-gateway"));
        command.args(["--dev", "--listen", &format!("127.0.0.1:{port}")]);
        if let Some(node) = node_id {
            command.args(["--dev-node-id", node]);
        }
        let child = command
            .env("CODEFLEET_ENABLE", "python")
            .env("CODEFLEET_POOL_MIN", "1")
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("log file"))
            .spawn()
            .expect("gateway starts");
        DevGateway {
            child,
            api: Api::new(&format!("http://127.0.0.1:{port}")),
            port,
            given: node_id.map(str::to_string),
        }
    }

    /// The node id the gateway reports for its agent.
    async fn node(&self) -> String {
        let nodes = self.api.get("/v1/nodes").await.body;
        nodes[0]["id"].as_str().unwrap_or_default().to_string()
    }

    /// Whether `node` is the id a `--dev` on this gateway's port derives: `dev-<host>-<port>`.
    fn derived(&self, node: &str) -> bool {
        node.starts_with("dev-") && node.ends_with(&format!("-{}", self.port))
    }

    /// SIGTERM, then wait for it to drain and remove its containers.
    async fn stop(mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for DevGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if self.given.is_some() {
            return; // a borrowed node id: its owner cleans up
        }
        let out = std::process::Command::new("docker")
            .args(["ps", "-a", "--filter", "label=codefleet.node"])
            .args(["--format", "{{.Label \"codefleet.node\"}}"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for node in out.lines().filter(|n| self.derived(n)) {
            remove_containers_of(node);
        }
    }
}

/// Item 6: two `--dev` gateways on one machine get node ids of their own (derived from the host
/// name and port), so starting the second leaves the first serving from its own sandboxes; a
/// `--dev` whose node id is held answers exit 64.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dev_gateways_on_one_machine_do_not_share_a_node_id() {
    let first = DevGateway::launch(free_port(), None);
    first
        .api
        .wait_ready(&["python"], Duration::from_secs(300))
        .await;
    let first_node = first.node().await;
    assert!(first.derived(&first_node), "{first_node}");
    eventually(Duration::from_secs(60), "first pool warm", async || {
        let nodes = first.api.get("/v1/nodes").await.body;
        nodes[0]["languages"]["python"]["warm"]
            .as_u64()
            .unwrap_or(0)
            >= 1
    })
    .await;
    let before = containers_of(&first_node);

    let second = DevGateway::launch(free_port(), None);
    second
        .api
        .wait_ready(&["python"], Duration::from_secs(300))
        .await;
    let second_node = second.node().await;
    assert!(second.derived(&second_node), "{second_node}");
    assert_ne!(first_node, second_node);
    for id in &before {
        assert!(
            containers_of(&first_node).contains(id),
            "the first one's sandbox {id} survived"
        );
    }
    let r = first.api.python("print('first')").await;
    assert_eq!(
        (r["status"].as_str(), stdout(&r)),
        (Some("ok"), "first\n"),
        "{r}"
    );

    let mut clash = DevGateway::launch(free_port(), Some(&first_node));
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Ok(Some(status)) = clash.child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "a --dev with a held node id exits"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(status.code(), Some(64), "{status:?}");
    drop(clash);
    let r = first.api.python("print('still first')").await;
    assert_eq!(stdout(&r), "still first\n", "{r}");

    first.stop().await;
    second.stop().await;
}

/// Item 7: 20 concurrent jobs of three languages on an agent with its default 8 slots and
/// queue, with another core kept busy: all succeed (on the old code some got 503 after the
/// fixed 2-second wait).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_twenty_mixed_jobs_queues_and_all_succeed_with_a_core_busy() {
    let agent = TestAgent::start(
        "burst",
        AgentOpts::languages(&["python", "javascript", "cpp"]),
    )
    .await;
    let _busy = BusyCore::start();
    // The most time a job may have: what is tested is that they queue, not how fast a machine
    // this loaded runs them.
    let limits =
        json!({"wall_time_ms": 30000, "cpu_time_ms": 30000, "compile_wall_time_ms": 30000});
    let jobs = (0..20).map(|i| {
        let api = agent.api.clone();
        let mut body = match i % 3 {
            0 => json!({"language": "python", "source": format!("import time\ntime.sleep(0.5)\nprint({i})")}),
            1 => json!({"language": "javascript", "source": format!("setTimeout(() => console.log({i}), 500)")}),
            _ => json!({"language": "cpp", "source": format!("#include <cstdio>\nint main(){{ std::printf(\"%d\\n\", {i}); }}")}),
        };
        body["limits"] = limits.clone();
        async move { (i, api.post("/v1/execute", &body).await) }
    });
    for (i, a) in futures_util::future::join_all(jobs).await {
        assert_eq!(a.status, StatusCode::OK, "job {i}: {a:?}");
        assert_eq!(
            (a.body["status"].as_str(), stdout(&a.body)),
            (Some("ok"), &*format!("{i}\n")),
            "job {i}: {a:?}"
        );
    }
    let queued = metric(&agent.api, "codefleet_queue_wait_seconds_count").await;
    assert!(
        queued.is_some_and(|n| n >= 20.0),
        "queue waits recorded: {queued:?}"
    );
    agent.stop().await;
}

/// Sends `n` sleeping Python jobs at once; returns each answer with how long it took.
async fn flood(api: &Api, n: usize) -> Vec<(Answer, Duration)> {
    let jobs = (0..n).map(|_| {
        let api = api.clone();
        async move {
            let sent = Instant::now();
            let body = json!({"language": "python", "source": "import time\ntime.sleep(0.3)\nprint('ran')"});
            let a = api.post("/v1/execute", &body).await;
            (a, sent.elapsed())
        }
    });
    futures_util::future::join_all(jobs).await
}

/// Every answer of a flood is a result or an immediate 503 with `Retry-After`; returns how many
/// ran.
fn results_or_fast_refusals(answers: &[(Answer, Duration)], what: &str) -> usize {
    let mut ran = 0;
    for (a, took) in answers {
        if a.status == StatusCode::OK {
            assert_eq!(
                (a.body["status"].as_str(), stdout(&a.body)),
                (Some("ok"), "ran\n"),
                "{what}: {a:?}"
            );
            ran += 1;
        } else {
            assert_problem(a, StatusCode::SERVICE_UNAVAILABLE, "no_capacity");
            assert!(a.headers.contains_key("retry-after"), "{what}: {a:?}");
            assert!(
                *took < Duration::from_millis(1500),
                "{what}: refused only after {took:?}"
            );
        }
    }
    ran
}

/// Item 7: 200 concurrent jobs against one agent of 8 slots, through a gateway and then
/// directly: each gets its result or an immediate 503 with `Retry-After`, never a hang; a
/// queue's worth run; the agent's memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overload_sheds_at_once_and_what_is_admitted_runs() {
    let mut cluster = Cluster::named("overload")
        .agents(1)
        .languages(&["python"])
        .start()
        .await;
    let node = cluster.node_ids()[0].clone();
    let agent = cluster.agent(&node);
    let direct = agent.api.clone();
    let _ = flood(&direct, 8).await; // warm the pools and the connections
    let rss_before = agent.rss_bytes();

    let through_gateway = flood(&cluster.api, 200).await;
    let ran = results_or_fast_refusals(&through_gateway, "through the gateway");
    assert!(
        (8..200).contains(&ran),
        "{ran} of 200 ran through the gateway"
    );

    let direct_answers = flood(&direct, 200).await;
    let ran = results_or_fast_refusals(&direct_answers, "directly");
    // 8 slots and a queue of 32 behind them.
    assert!((8..=60).contains(&ran), "{ran} of 200 ran at the agent");

    let rss_after = cluster.agent(&node).rss_bytes();
    assert!(
        rss_after < rss_before + (64 << 20),
        "agent memory {rss_before} -> {rss_after} bytes"
    );
    let depth = metric(&direct, "codefleet_queue_depth").await;
    assert_eq!(depth, Some(0.0), "the queue drained");
    cluster.stop().await;
}

/// Item 8: a sandbox killed under a running job is the node's failure: `internal_error`,
/// counted by cause, and the next job runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_killed_under_a_job_is_an_internal_error_counted_by_cause() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 1)
        .arg("--pool-max", 1);
    let agent = TestAgent::start("whose-fault", opts).await;
    eventually(Duration::from_secs(60), "pool of one", async || {
        warm(&agent.api, "python").await == 1
    })
    .await;
    let api = agent.api.clone();
    let job = tokio::spawn(async move { api.python("import time\ntime.sleep(20)").await });
    eventually(Duration::from_secs(10), "job running", async || {
        agent.api.get("/v1/capacity").await.body["slots_busy"] == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in containers_of(&agent.node) {
        let _ = std::process::Command::new("docker")
            .args(["kill", &id])
            .stdout(std::process::Stdio::null())
            .status();
    }
    let r = job.await.expect("job task");
    assert_eq!(r["status"], "internal_error", "{r}");
    let lost = metric(
        &agent.api,
        "codefleet_internal_errors_total{cause=\"supervisor_lost\"}",
    )
    .await;
    assert_eq!(lost, Some(1.0));
    let r = agent.api.python("print('next')").await;
    assert_eq!(stdout(&r), "next\n", "{r}");
    agent.stop().await;
}
