//! The fleet benchmark (a bench binary, not a test): in one run on this machine it measures the
//! paths of issue 3 and issue 4 and prints one table with the ratios and the issues' targets.
//!
//! Issue 3, for Python, JavaScript and C++ hellos (and Rust for the compiled-language target):
//! (a) a `docker run` per job through the Engine API, (b) a `docker exec` into a running
//! container, (c) the program's own time inside a running container, (d) the agent's warm
//! recycled path over HTTP, (d~) the same as an NDJSON stream (time to the first output event),
//! (e) `fresh` with a ready pool, (f) cold with an empty pool; then
//! throughput at concurrency 2, 8 and 32 for (a), (b) and (d), the same program back to back on
//! both cores, timeout kill precision, and the agent's and supervisors' memory.
//!
//! Issue 4: the gateway's added latency (same jobs through the gateway and straight to the agent,
//! interleaved), the routing decision at 1,000 nodes, and proxied requests per second against a
//! trivial stub agent with the load generator in this process.
//!
//! Run it after building the binaries it starts:
//!
//! ```text
//! deploy/build-supervisor.sh && cargo build --release --workspace --bins
//! cargo bench -p codefleet-tests --bench fleet            # full run, < 10 minutes
//! FLEET_BENCH_QUICK=1 cargo bench -p codefleet-tests --bench fleet   # smoke run, ~1-2 minutes
//! ```
//!
//! The containers and agents are set up like the agent's sandboxes (same image, limits and
//! hardening) so the paths differ only in how a job reaches the program. Samples of the
//! sequential paths are interleaved (one of each path in turn) so that the noise of a shared
//! machine hits every path alike. Every container the bench creates, itself or through its agents,
//! is labelled `codefleet.node=<a node id of this run>` and removed at the end, also on an error
//! or Ctrl-C.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::hint::black_box;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use bollard::container::LogOutput;
use bollard::query_parameters::{ListContainersOptionsBuilder, LogsOptionsBuilder};
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use codefleet_gateway::routing::{Decision, NodeEntry, NodeId, RoutingTable, Want};
use codefleet_node_agent::catalog::Catalog;
use codefleet_node_agent::engine::LABEL_NODE;
use codefleet_shared::cluster::{CapacityReport, LanguageCapacity};
use codefleet_shared::{ExecuteResponse, ImageState, LanguageRef, StageResult, Status, Timing};
use codefleet_tests::{bin_path, free_port, node_id, AgentOpts, AgentProcess};

mod common;
use common::*;

/// Ready never-used sandboxes the `fresh` agent keeps per language.
const FRESH_POOL: u32 = 2;
/// Containers `docker exec` throughput spreads over (the agent's default `--pool-max`).
const EXEC_CONTAINERS: usize = 8;
/// The timeout-precision job's wall-time limit.
const KILL_AFTER_MS: u64 = 200;
/// Nodes in the routing benchmark.
const ROUTING_NODES: usize = 1_000;
const HELLO_PY: &str = r#"{"language":"python","source":"print(1)\n"}"#;

// ---------------------------------------------------------------------------------------------
// Sizes: how many samples and how long, full or quick.

#[derive(Clone, Copy)]
struct Sizes {
    quick: bool,
    /// Measured time of one throughput run (jobs still in flight then are waited for).
    tput: Duration,
    /// Unmeasured run at the same concurrency before a warm-path throughput run.
    tput_warmup: Duration,
    /// Programs per container in the back-to-back reference.
    loop_n: usize,
    timeouts: usize,
    gateway_pairs: usize,
    stub_pairs: usize,
    stub_load: Duration,
    routing: Duration,
    mem_pool: u32,
}

impl Sizes {
    fn from_env() -> Sizes {
        let quick = std::env::var("FLEET_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0");
        if quick {
            Sizes {
                quick,
                tput: Duration::from_millis(1_000),
                tput_warmup: Duration::from_millis(500),
                loop_n: 30,
                timeouts: 5,
                gateway_pairs: 20,
                stub_pairs: 200,
                stub_load: Duration::from_secs(1),
                routing: Duration::from_millis(300),
                mem_pool: 20,
            }
        } else {
            Sizes {
                quick,
                tput: Duration::from_secs(5),
                tput_warmup: Duration::from_secs(2),
                loop_n: 200,
                timeouts: 30,
                gateway_pairs: 150,
                stub_pairs: 2_000,
                stub_load: Duration::from_secs(5),
                routing: Duration::from_secs(2),
                mem_pool: 20,
            }
        }
    }
}

/// Sequential samples for one language: `fast` for (b), (c), (d); `slow` for (a), (e), (f); the
/// whole language stops at `budget` whatever the counts.
#[derive(Clone, Copy)]
struct LangPlan {
    fast: usize,
    slow: usize,
    budget: Duration,
    /// Whether (a), (b), (e) and (f) are measured (Rust only gets (c) and (d)).
    all_paths: bool,
}

fn plan(name: &str, quick: bool) -> LangPlan {
    let (fast, slow, budget_s, all_paths) = match (name, quick) {
        ("python", false) => (60, 30, 110, true),
        ("javascript", false) => (40, 20, 100, true),
        ("cpp", false) => (25, 12, 150, true),
        ("rust", false) => (15, 0, 40, false),
        ("python", true) => (8, 3, 10, true),
        ("javascript", true) => (5, 2, 10, true),
        ("cpp", true) => (3, 2, 12, true),
        (_, _) => (2, 0, 6, false),
    };
    LangPlan {
        fast,
        slow,
        budget: Duration::from_secs(budget_s),
        all_paths,
    }
}

// ---------------------------------------------------------------------------------------------
// Languages: the four this bench runs, and how its paths run them.

const SOURCES: [(&str, &str); 4] = [
    ("python", "print(1)\n"),
    ("javascript", "console.log(1)\n"),
    (
        "cpp",
        "#include <iostream>\nint main() { std::cout << 1 << std::endl; }\n",
    ),
    ("rust", "fn main() { println!(\"1\"); }\n"),
];

impl Lang {
    fn from_catalog(
        catalog: &Catalog,
        name: &'static str,
        source: &'static str,
    ) -> anyhow::Result<Lang> {
        let l = catalog
            .find(name)
            .ok_or_else(|| anyhow!("{name} is not in the catalog"))?;
        Lang::of(l, name, source)
    }

    /// One job: write the file into a fresh directory, compile and run, clean up.
    fn job_script(&self) -> String {
        format!(
            "set -e; d=$(mktemp -d /work/job.XXXXXX); cd \"$d\"; printf '%s' \"$SRC\" > {file}; {cmds}; cd /; rm -rf \"$d\"",
            file = self.file,
            cmds = self.cmds
        )
    }

    /// `n` runs back to back in one shell loop, timed as a whole (microseconds).
    fn loop_script(&self, n: usize) -> String {
        format!(
            "set -e; d=$(mktemp -d /work/l.XXXXXX); cd \"$d\"; printf '%s' \"$SRC\" > {file}; \
             s=${{EPOCHREALTIME/./}}; for i in $(seq {n}); do {{ {cmds}; }} >/dev/null; done; e=${{EPOCHREALTIME/./}}; echo $((e-s)); \
             cd /; rm -rf \"$d\"",
            file = self.file,
            cmds = self.cmds
        )
    }

    fn hello_fresh(&self) -> Value {
        json!({"language": self.name, "source": self.source, "isolation": "fresh"})
    }
}

// ---------------------------------------------------------------------------------------------
// The Docker Engine API directly (paths (a), (b), (c)), with the sandboxes' limits.

impl Engine {
    /// (a): create, start, wait, read the logs, remove. Returns the total and the five steps (ms).
    async fn run_once(&self, lang: &Lang) -> anyhow::Result<(f64, [f64; 5])> {
        let t0 = Instant::now();
        let cmd = vec!["bash".into(), "-c".into(), lang.job_script()];
        let id = self
            .docker
            .create_container(None, self.body(lang, cmd, true))
            .await
            .context("create")?
            .id;
        let t1 = Instant::now();
        let ran = async {
            self.docker
                .start_container(&id, None)
                .await
                .context("start")?;
            let t2 = Instant::now();
            let mut wait = self.docker.wait_container(&id, None);
            while let Some(w) = wait.next().await {
                w.context("wait (non-zero exit?)")?;
            }
            let t3 = Instant::now();
            let opts = LogsOptionsBuilder::default()
                .stdout(true)
                .stderr(true)
                .build();
            let mut logs = self.docker.logs(&id, Some(opts));
            let (mut out, mut err) = (String::new(), String::new());
            while let Some(chunk) = logs.next().await {
                match chunk.context("logs")? {
                    LogOutput::StdOut { message } => {
                        out.push_str(&String::from_utf8_lossy(&message))
                    }
                    LogOutput::StdErr { message } => {
                        err.push_str(&String::from_utf8_lossy(&message))
                    }
                    _ => {}
                }
            }
            anyhow::Ok((t2, t3, Instant::now(), out, err))
        }
        .await;
        let removed = self.remove(&id).await;
        let t5 = Instant::now();
        let (t2, t3, t4, out, err) = ran?;
        removed?;
        check_output(&out, &err)?;
        let d = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64() * 1e3;
        Ok((
            d(t0, t5),
            [d(t0, t1), d(t1, t2), d(t2, t3), d(t3, t4), d(t4, t5)],
        ))
    }

    /// (b): one job by `docker exec`.
    async fn exec_job(&self, container: &str, lang: &Lang) -> anyhow::Result<()> {
        let out = self.exec(container, lang.job_script(), &lang.env).await?;
        check_output(&out, "")
    }

    /// Containers (any state) labelled with `node`.
    async fn count(&self, node: &str) -> anyhow::Result<usize> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={node}")])]);
        let opts = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        Ok(self.docker.list_containers(Some(opts)).await?.len())
    }

    /// Waits until at most `at_most` containers of `node` exist (removals finished).
    async fn wait_count(&self, node: &str, at_most: usize, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while self.count(node).await? > at_most {
            if Instant::now() > deadline {
                bail!("containers of {node} still above {at_most} after {within:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Host pids of the running containers of `node` (their PID 1).
    async fn pids(&self, node: &str) -> anyhow::Result<Vec<u32>> {
        let filters = HashMap::from([("label".to_string(), vec![format!("{LABEL_NODE}={node}")])]);
        let opts = ListContainersOptionsBuilder::default()
            .filters(&filters)
            .build();
        let mut pids = Vec::new();
        for c in self.docker.list_containers(Some(opts)).await? {
            let Some(id) = c.id else { continue };
            let inspected = self.docker.inspect_container(&id, None).await?;
            if let Some(pid) = inspected.state.and_then(|s| s.pid).filter(|&p| p > 0) {
                pids.push(pid as u32);
            }
        }
        Ok(pids)
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: agents and gateways.

impl Http {
    /// The same job as an NDJSON stream (`Accept: application/x-ndjson`): client-side
    /// milliseconds to the first `output` event and to the last line (a `result` that is `ok`
    /// and carries the `warm` sandbox, else an error).
    async fn stream(&self, body: &Value) -> anyhow::Result<(f64, f64)> {
        let t = Instant::now();
        let mut resp = self
            .client
            .post(format!("{}/v1/execute", self.url))
            .header("accept", "application/x-ndjson")
            .json(body)
            .send()
            .await?;
        if resp.status() != reqwest::StatusCode::OK {
            bail!(
                "{}: {}",
                resp.status(),
                resp.text().await.unwrap_or_default()
            );
        }
        let (mut buf, mut first) = (Vec::new(), None);
        while let Some(chunk) = resp.chunk().await? {
            buf.extend_from_slice(&chunk);
            while let Some(end) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=end).collect();
                let event: Value = serde_json::from_slice(&line)?;
                match event["type"].as_str() {
                    Some("output") if first.is_none() => first = Some(ms_since(t)),
                    Some("result") => {
                        let r = &event["result"];
                        if r["status"] != "ok" || r["sandbox"] != "warm" {
                            bail!("not an ok warm result: {r}");
                        }
                        let first = first.ok_or_else(|| anyhow!("no output event"))?;
                        return Ok((first, ms_since(t)));
                    }
                    Some("error") => bail!("error event: {event}"),
                    _ => {}
                }
            }
        }
        bail!("the stream ended without a result")
    }

    /// Ready sandboxes of `language` in the agent's capacity report.
    async fn warm(&self, language: &str) -> anyhow::Result<u32> {
        let report: CapacityReport = self
            .client
            .get(format!("{}/v1/capacity", self.url))
            .send()
            .await?
            .json()
            .await?;
        Ok(report.languages.get(language).map_or(0, |l| l.warm))
    }

    async fn wait_warm(
        &self,
        language: &str,
        at_least: u32,
        within: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let warm = self.warm(language).await?;
            if warm >= at_least {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{language}: {warm} warm sandboxes after {within:?}, wanted {at_least}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `/v1/languages` shows `language` on at least one ready node (a gateway).
    async fn wait_routable(&self, language: &str, within: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        loop {
            let langs: Value = match self
                .client
                .get(format!("{}/v1/languages", self.url))
                .send()
                .await
            {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let ready = langs.as_array().is_some_and(|a| {
                a.iter()
                    .any(|l| l["name"] == language && l["nodes_ready"].as_u64() > Some(0))
            });
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{}: {language} not routable after {within:?}", self.url);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The gateway binary as its own process, as deployed; killed when this drops.
struct GatewayProcess {
    url: String,
    child: std::process::Child,
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `target/release/codefleet-gateway` on a free port and waits for its `/healthz`.
async fn spawn_gateway() -> anyhow::Result<GatewayProcess> {
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(std::env::temp_dir().join("codefleet-bench-gateway.log"))?;
    let child = std::process::Command::new(bin_path("codefleet-gateway"))
        .args(["--listen", &listen])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting the gateway process")?;
    let mut gw = GatewayProcess {
        url: format!("http://{listen}"),
        child,
    };
    let client = http_client();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = gw.child.try_wait()? {
            bail!(
                "the gateway process exited ({status}); see {}",
                std::env::temp_dir()
                    .join("codefleet-bench-gateway.log")
                    .display()
            );
        }
        let up = client.get(format!("{}/healthz", gw.url)).send().await;
        if up.is_ok_and(|r| r.status().is_success()) {
            return Ok(gw);
        }
        if Instant::now() > deadline {
            bail!("the gateway process did not answer /healthz within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A gateway served in this process until the returned sender fires or drops.
async fn start_gateway() -> anyhow::Result<(String, oneshot::Sender<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let config = codefleet_gateway::Config {
        listen: addr,
        ..Default::default()
    };
    let (tx, rx) = oneshot::channel::<()>();
    tokio::spawn(codefleet_gateway::serve(config, listener, async {
        let _ = rx.await;
    }));
    Ok((format!("http://{addr}"), tx))
}

/// The stub agent's one answer: a canned, successful Python hello.
fn canned_answer() -> ExecuteResponse {
    ExecuteResponse {
        id: "ex_0000000000000000".into(),
        language: LanguageRef {
            name: "python".into(),
            version: "3.11.2".into(),
        },
        status: Status::Ok,
        compile: None,
        run: Some(StageResult {
            status: Status::Ok,
            exit_code: Some(0),
            signal: None,
            stdout: "1\n".into(),
            stderr: String::new(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_ms: 12,
            cpu_time_ms: 9,
            memory_bytes: 8 << 20,
        }),
        node: "bench-stub".into(),
        cached: None,
        timing: Timing {
            queued_ms: 0,
            total_ms: 0,
        },
        sandbox: Some("warm".into()),
        attempts: None,
        request_id: None,
        files: None,
        files_skipped: Vec::new(),
    }
}

/// A trivial "agent": answers `POST /v1/execute` with the canned answer at once.
async fn start_stub() -> anyhow::Result<(String, tokio::task::JoinHandle<()>)> {
    use axum::serve::ListenerExt as _;
    let canned = axum::body::Bytes::from(serde_json::to_vec(&canned_answer())?);
    let app = axum::Router::new().route(
        "/v1/execute",
        axum::routing::post(move |_body: axum::body::Bytes| {
            let canned = canned.clone();
            async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    canned,
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    let listener = listener.tap_io(|tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((url, task))
}

/// Reports the stub to a gateway every 500 ms, as an agent would, until aborted.
fn report_stub(gateway: String, stub: String) -> tokio::task::JoinHandle<()> {
    let report = CapacityReport {
        node_id: "bench-stub".into(),
        address: stub,
        slots_total: 1_000_000,
        slots_busy: 0,
        queued: 0,
        ready: true,
        draining: false,
        languages: BTreeMap::from([(
            "python".to_string(),
            LanguageCapacity {
                image: ImageState::Ready,
                warm: 8,
                version: "3.11.2".into(),
                aliases: vec!["py".into()],
                compiled: false,
                file_name: "main.py".into(),
                error: None,
            },
        )]),
        sessions: 0,
        runtimes: vec![],
        image_bytes: None,
    };
    tokio::spawn(async move {
        let client = http_client();
        loop {
            let _ = client
                .post(format!("{gateway}/v1/internal/reports"))
                .json(&report)
                .send()
                .await;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Throughput: `concurrency` workers take jobs until the time or the count runs out; jobs in
// flight at the deadline finish and count; the rate is completed jobs over the whole time.

struct Tput {
    per_s: f64,
    ok: usize,
    failed: usize,
    elapsed: Duration,
    first_error: Option<String>,
}

impl Tput {
    fn note(&self) -> String {
        let mut note = format!("{} ok in {:.1} s", self.ok, self.elapsed.as_secs_f64());
        if self.failed > 0 {
            let first: String = self
                .first_error
                .as_deref()
                .unwrap_or("")
                .chars()
                .take(100)
                .collect();
            note.push_str(&format!(", {} failed (first: {first})", self.failed));
        }
        note
    }
}

async fn throughput<F, Fut>(concurrency: usize, budget: Duration, max_jobs: usize, job: F) -> Tput
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let job = Arc::new(job);
    let issued = Arc::new(AtomicUsize::new(0));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let first_error: Arc<Mutex<Option<String>>> = Arc::default();
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (job, issued, ok, failed, first_error) = (
                Arc::clone(&job),
                Arc::clone(&issued),
                Arc::clone(&ok),
                Arc::clone(&failed),
                Arc::clone(&first_error),
            );
            tokio::spawn(async move {
                loop {
                    let k = issued.fetch_add(1, Ordering::Relaxed);
                    if k >= max_jobs || start.elapsed() >= budget {
                        break;
                    }
                    match tokio::time::timeout(JOB_TIMEOUT, job(k)).await {
                        Ok(Ok(())) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(Err(e)) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error
                                .lock()
                                .expect("lock")
                                .get_or_insert_with(|| format!("{e:#}"));
                        }
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            first_error
                                .lock()
                                .expect("lock")
                                .get_or_insert_with(|| "timed out".into());
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let elapsed = start.elapsed();
    let ok = ok.load(Ordering::Relaxed);
    let first_error = first_error.lock().expect("lock").take();
    Tput {
        per_s: ok as f64 / elapsed.as_secs_f64(),
        ok,
        failed: failed.load(Ordering::Relaxed),
        elapsed,
        first_error,
    }
}

// ---------------------------------------------------------------------------------------------
// Machine and process facts.

/// A `kB` field of `/proc/<pid>/status`, in MiB.
fn status_mib(pid: u32, field: &str) -> Option<f64> {
    read(&format!("/proc/{pid}/status")).lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let kb: f64 = rest.trim().trim_end_matches("kB").trim().parse().ok()?;
        Some(kb / 1024.0)
    })
}

// ---------------------------------------------------------------------------------------------
// The run.

struct Nodes {
    main: String,
    fresh: String,
    cold: String,
    mem: String,
    docker: String,
}

impl Nodes {
    fn new() -> Nodes {
        Nodes {
            main: node_id("bench"),
            fresh: node_id("bench-fresh"),
            cold: node_id("bench-cold"),
            mem: node_id("bench-mem"),
            docker: node_id("bench-docker"),
        }
    }

    fn all(&self) -> Vec<String> {
        vec![
            self.main.clone(),
            self.fresh.clone(),
            self.cold.clone(),
            self.mem.clone(),
            self.docker.clone(),
        ]
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let sizes = Sizes::from_env();
    let nodes = Nodes::new();
    run_bench("fleet", nodes.all(), run(sizes, &nodes)).await
}

/// Per language results of the sequential phase.
#[derive(Default)]
struct Seq {
    a: Stats,
    a_steps: [Stats; 5],
    b: Stats,
    c: Stats,
    /// (c) for the first run in a container just started.
    c0: Stats,
    c_sup: Stats,
    d: Stats,
    d_agent: Stats,
    /// (d) as an NDJSON stream: time to the first output event, and to the result.
    ds_first: Stats,
    ds_total: Stats,
    e: Stats,
    f: Stats,
    errors: Errors,
    /// Answers whose `sandbox` was not the path's (`warm`, `fresh`, `cold`), per path.
    off_path: BTreeMap<&'static str, usize>,
}

struct Env {
    engine: Engine,
    main: Http,
    fresh: Http,
    cold: Http,
    /// Node ids of the fresh-pool and empty-pool agents (to watch their containers).
    fresh_node: String,
    /// Containers the fresh-pool agent holds when its pools are full.
    fresh_full: usize,
    cold_node: String,
    /// One idle container per language for (b) and (c).
    idle: HashMap<&'static str, String>,
}

async fn run(sizes: Sizes, nodes: &Nodes) -> anyhow::Result<()> {
    let started = Instant::now();
    let docker = bollard::Docker::connect_with_local_defaults().context("connecting to Docker")?;
    let machine_line = machine(&docker).await;
    eprintln!("{machine_line}");
    eprintln!(
        "fleet bench: {} run; progress below, the table at the end",
        if sizes.quick {
            "quick (FLEET_BENCH_QUICK)"
        } else {
            "full"
        }
    );
    let engine = Engine {
        docker: docker.clone(),
        node: nodes.docker.clone(),
    };
    let catalog = Catalog::load(None).map_err(anyhow::Error::msg)?;
    let langs: Vec<Arc<Lang>> = SOURCES
        .iter()
        .map(|(name, src)| Lang::from_catalog(&catalog, name, src).map(Arc::new))
        .collect::<anyhow::Result<_>>()?;
    let python = Arc::clone(&langs[0]);
    assert_eq!(python.name, "python", "SOURCES starts with python");
    let mut table = Table::default();

    // The gateway first, so the main agent reports to it from its first report on. A separate
    // release process, like the agent: its threads are not the bench client's.
    let gateway_process = spawn_gateway().await?;
    let gw_url = gateway_process.url.clone();

    // The main agent (the warm path): a separate release process, like a deployment.
    progress(
        started,
        "starting the main agent (python, javascript, cpp, rust; --pool-min 2)",
    );
    let main_opts = AgentOpts::languages(&["python", "javascript", "cpp", "rust"])
        .arg("--pool-min", 2)
        .arg("--gateway", &gw_url);
    let main_agent = AgentProcess::spawn(&nodes.main, free_port(), &main_opts).await;
    let main = Http::new(&main_agent.api.url);
    for l in &langs {
        main.wait_warm(l.name, 2, Duration::from_secs(120)).await?;
    }
    for l in &langs {
        if engine.docker.inspect_image(&l.tag).await.is_err() {
            bail!("image {} is missing although the agent prepared it", l.tag);
        }
    }

    progress(started, "starting the fresh-pool and empty-pool agents");
    let direct = ["python", "javascript", "cpp"];
    let fresh_opts = AgentOpts::languages(&direct)
        .arg("--pool-min", FRESH_POOL)
        .arg("--recycle-after", 1);
    let fresh_agent = AgentProcess::spawn(&nodes.fresh, free_port(), &fresh_opts).await;
    let cold_opts = AgentOpts::languages(&direct)
        .arg("--pool-min", 0)
        .arg("--pool-max", 0);
    let cold_agent = AgentProcess::spawn(&nodes.cold, free_port(), &cold_opts).await;

    let mut idle = HashMap::new();
    for l in &langs {
        idle.insert(l.name, engine.start_idle(l).await?);
    }
    let env = Env {
        engine: engine.clone(),
        main: main.clone(),
        fresh: Http::new(&fresh_agent.api.url),
        cold: Http::new(&cold_agent.api.url),
        fresh_full: direct.len() * FRESH_POOL as usize,
        fresh_node: nodes.fresh.clone(),
        cold_node: nodes.cold.clone(),
        idle,
    };

    // ---- A1: sequential latency, interleaved per sample.
    let mut seqs: Vec<(Arc<Lang>, Seq)> = Vec::new();
    for l in &langs {
        progress(started, &format!("sequential paths for {}", l.name));
        let s = sequential(&env, l, plan(l.name, sizes.quick)).await;
        seqs.push((Arc::clone(l), s));
    }
    drop(fresh_agent);
    drop(cold_agent);

    table.section("A1. Issue 3: sequential latency per job (client side; p99 = max when n < 100)");
    for (l, s) in &seqs {
        latency_rows(&mut table, l, s);
    }

    // ---- A2: throughput (Python hello).
    let mut exec_pool = vec![env.idle["python"].clone()];
    while exec_pool.len() < EXEC_CONTAINERS {
        exec_pool.push(engine.start_idle(&python).await?);
    }
    let exec_pool = Arc::new(exec_pool);
    table.section(
        "A2. Issue 3: throughput, Python hello (workers loop until the time or count runs out)",
    );
    let mut d_at_8 = f64::NAN;
    for c in [2usize, 8, 32] {
        progress(started, &format!("throughput at concurrency {c}"));
        let (e, py) = (engine.clone(), Arc::clone(&python));
        let a = throughput(c, sizes.tput, 400, move |_| {
            let (e, py) = (e.clone(), Arc::clone(&py));
            async move { e.run_once(&py).await.map(|_| ()) }
        })
        .await;
        let (e, py, pool) = (engine.clone(), Arc::clone(&python), Arc::clone(&exec_pool));
        let b = throughput(c, sizes.tput, 5_000, move |k| {
            let (e, py, pool) = (e.clone(), Arc::clone(&py), Arc::clone(&pool));
            async move { e.exec_job(&pool[k % pool.len()], &py).await }
        })
        .await;
        let warm_job = {
            let (m, body) = (main.clone(), python.hello());
            move |_| {
                let (m, body) = (m.clone(), body.clone());
                async move { m.hello(&body).await.map(|_| ()) }
            }
        };
        let _ = throughput(c, sizes.tput_warmup, 100_000, warm_job.clone()).await;
        let d = throughput(c, sizes.tput, 100_000, warm_job).await;
        for (id, path, t) in [
            ("(a)", "docker run per job (Engine API)", &a),
            ("(b)", "docker exec, spread over 8 running containers", &b),
            ("(d)", "agent warm recycled path (HTTP)", &d),
        ] {
            let r = match id {
                "(a)" => "1.00x (a)".to_string(),
                "(b)" => format!("{} (a)", times(ratio(t.per_s, a.per_s))),
                _ => format!(
                    "{} (a), {} (b)",
                    times(ratio(t.per_s, a.per_s)),
                    times(ratio(t.per_s, b.per_s))
                ),
            };
            table.push(
                Row::new(id, &format!("{path}, concurrency {c}"), "python")
                    .value(t.ok, t.per_s, "jobs/s")
                    .ratio(r)
                    .note(t.note()),
            );
        }
        if c == 8 {
            d_at_8 = d.per_s;
        }
    }

    // The same program back to back in two running containers, one loop each: both cores.
    progress(started, "back-to-back reference on both cores");
    let loop_rate = {
        let script = python.loop_script(sizes.loop_n);
        let runs = exec_pool.iter().take(2).map(|id| {
            let (e, script, env) = (engine.clone(), script.clone(), python.env.clone());
            let id = id.clone();
            async move { bounded("loop", e.exec(&id, script, &env)).await }
        });
        let outs = futures_util::future::join_all(runs).await;
        let mut rate = 0.0;
        let mut failed = None;
        for out in outs {
            match out.and_then(|o| o.trim().parse::<f64>().map_err(|e| anyhow!("{e}: {o:?}"))) {
                Ok(us) => rate += sizes.loop_n as f64 / (us / 1e6),
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            table.push(
                Row::new("ref", "python3 back to back, 2 containers", "python")
                    .note(format!("failed: {e:#}")),
            );
            f64::NAN
        } else {
            rate
        }
    };
    table.push(
        Row::new(
            "ref",
            "python3 main.py back to back: 2 running containers x 1 shell loop (both cores)",
            "python",
        )
        .value(2 * sizes.loop_n, loop_rate, "progs/s")
        .note(
            "sum of the two loops' rates; bash loop timed with EPOCHREALTIME, output to /dev/null",
        ),
    );
    table.push(
        Row::new(
            "(d)/ref",
            "warm throughput at concurrency 8 / back-to-back on both cores",
            "python",
        )
        .value(1, 100.0 * ratio(d_at_8, loop_rate), "%"),
    );

    // ---- A3: timeout precision, memory.
    table.section("A3. Issue 3: timeout kill precision and memory");
    progress(started, "timeout kill precision");
    // The supervisor's wall clock stops when it decides to kill (and is whole milliseconds), so
    // `run.wall_time_ms - limit` shows how late that decision came; the agent's and the client's
    // times past the limit also hold the kill, the reap and the answer.
    let (mut overshoot, mut agent_past, mut client_past) =
        (Stats::default(), Stats::default(), Stats::default());
    let mut timeout_errors = Errors::default();
    let sleeper = json!({
        "language": "python",
        "source": "import time\ntime.sleep(5)\n",
        "limits": {"wall_time_ms": KILL_AFTER_MS},
    });
    for _ in 0..sizes.timeouts {
        let r = bounded("timeout job", main.execute(&sleeper))
            .await
            .and_then(|(ms, r)| {
                let run = r.run.as_ref().ok_or_else(|| anyhow!("no run stage"))?;
                if r.status != Status::Timeout {
                    bail!("status {:?}, not timeout", r.status);
                }
                Ok((run.wall_time_ms, r.timing.total_ms, ms))
            });
        if let Some((wall, total, ms)) = timeout_errors.record("timeout", r) {
            let limit = KILL_AFTER_MS as f64;
            overshoot.push(wall as f64 - limit);
            agent_past.push(total as f64 - limit);
            client_past.push(ms - limit);
        }
    }
    let sleep_job = format!("`time.sleep(5)`, wall_time_ms {KILL_AFTER_MS}");
    table.push(
        Row::new(
            "kill",
            &format!("{sleep_job}: run.wall_time_ms - limit"),
            "python",
        )
        .stats(&overshoot, "ms")
        .note(join_notes(&[
            "warm path, sequential; the supervisor's clock stops at its kill decision, in whole ms"
                .into(),
            timeout_errors.note("timeout"),
        ])),
    );
    table.push(
        Row::new(
            "kill",
            &format!("{sleep_job}: agent timing.total_ms - limit"),
            "python",
        )
        .stats(&agent_past, "ms")
        .note("deadline to the agent's answer: job setup before the spawn, kill, reap, reply"),
    );
    table.push(
        Row::new(
            "kill",
            &format!("{sleep_job}: client latency - limit"),
            "python",
        )
        .stats(&client_past, "ms"),
    );

    let main_pid = main_agent.child.id();
    table.push(
        Row::new(
            "rss",
            "main agent after the runs above (4 languages; separate process)",
            "",
        )
        .value(1, status_mib(main_pid, "VmRSS").unwrap_or(f64::NAN), "MiB")
        .note(format!(
            "peak VmHWM {} MiB; warm sandboxes now {}",
            num(status_mib(main_pid, "VmHWM").unwrap_or(f64::NAN)),
            main_warm(&main).await
        )),
    );

    progress(
        started,
        &format!("memory with {} warm containers", sizes.mem_pool),
    );
    let mem = memory(&engine, &nodes.mem, sizes.mem_pool).await;
    let (agent_rss, sup_rss) = match mem {
        Ok((agent_rss, agent_hwm, sup)) => {
            table.push(
                Row::new(
                    "rss",
                    &format!(
                        "agent with {} warm python sandboxes (idle, separate process)",
                        sizes.mem_pool
                    ),
                    "python",
                )
                .value(1, agent_rss, "MiB")
                .note(format!(
                    "VmRSS of the codefleet-agent process; peak VmHWM {} MiB",
                    num(agent_hwm)
                )),
            );
            table.push(
                Row::new("rss", "supervisor (PID 1) per sandbox, idle", "python")
                    .stats(&sup, "MiB")
                    .ratio(format!("max {} MiB", num(sup.pct(100.0))))
                    .note("VmRSS of each container's PID 1 (docker inspect .State.Pid)"),
            );
            (agent_rss, sup.pct(100.0))
        }
        Err(e) => {
            table.push(
                Row::new("rss", "agent and supervisors with warm sandboxes", "python")
                    .note(format!("failed: {e:#}")),
            );
            (f64::NAN, f64::NAN)
        }
    };

    // ---- B: gateway.
    table.section("B. Issue 4: gateway");
    progress(started, "gateway overhead with the real agent");
    let gw = Http::new(&gw_url);
    gw.wait_routable("python", Duration::from_secs(30)).await?;
    let (direct_s, via_s, paired, gw_errors) =
        overhead_pairs(&main, &gw, &python.hello(), sizes.gateway_pairs, SETTLE).await;
    let added_real = (via_s.p50() - direct_s.p50(), via_s.p99() - direct_s.p99());
    table.push(
        Row::new(
            "gw",
            "python hello straight to the agent (paired with the next row)",
            "python",
        )
        .stats(&direct_s, "ms"),
    );
    table.push(
        Row::new(
            "gw",
            "python hello through the gateway (separate release process)",
            "python",
        )
        .stats(&via_s, "ms")
        .ratio(format!(
            "added p50 {} / p99 {} ms",
            num(added_real.0),
            num(added_real.1)
        ))
        .note(join_notes(&[
            format!("median of paired differences {} ms", num(paired.p50())),
            gw_errors.note("direct"),
            gw_errors.note("gateway"),
        ])),
    );

    progress(started, "gateway against a trivial stub agent");
    let stub = stub_phase(&sizes).await;
    let (added_stub, proxied) = match stub {
        Ok(s) => {
            let added = (s.via.p50() - s.direct.p50(), s.via.p99() - s.direct.p99());
            table.push(
                Row::new(
                    "stub",
                    "stub agent straight (canned answer, interleaved with the next row)",
                    "",
                )
                .stats(&s.direct, "ms"),
            );
            table.push(
                Row::new("stub", "stub agent through the gateway", "")
                    .stats(&s.via, "ms")
                    .ratio(format!(
                        "added p50 {} / p99 {} ms",
                        num(added.0),
                        num(added.1)
                    ))
                    .note(format!(
                        "median of paired differences {} ms",
                        num(s.paired.p50())
                    )),
            );
            table.push(
                Row::new(
                    "rps",
                    "stub agent straight, concurrency 64 (load generator's own ceiling)",
                    "",
                )
                .value(s.direct_load.ok, s.direct_load.per_s, "req/s")
                .note(s.direct_load.note()),
            );
            table.push(
                Row::new(
                    "rps",
                    "proxied through the gateway, concurrency 64, generator in-process",
                    "",
                )
                .value(s.via_load.ok, s.via_load.per_s, "req/s")
                .ratio(format!(
                    "{} of straight",
                    times(ratio(s.via_load.per_s, s.direct_load.per_s))
                ))
                .note(s.via_load.note()),
            );
            (added, s.via_load.per_s)
        }
        Err(e) => {
            table.push(
                Row::new("stub", "gateway against a stub agent", "").note(format!("failed: {e:#}")),
            );
            ((f64::NAN, f64::NAN), f64::NAN)
        }
    };

    progress(started, "routing decision at 1,000 nodes");
    let budget = sizes.routing;
    let routing = tokio::task::spawn_blocking(move || routing_bench(budget)).await?;
    table.push(
        Row::new(
            "route",
            &format!("choose() at {ROUTING_NODES} nodes x 160 vnodes, 6 languages, all idle"),
            "",
        )
        .stats(&routing.idle_ns, "ns")
        .note("median over batches of 1,000 decisions"),
    );
    table.push(
        Row::new(
            "route",
            &format!("choose() at {ROUTING_NODES} nodes, random loads 0-7 of 8 slots"),
            "",
        )
        .stats(&routing.loaded_ns, "ns")
        .note(format!("{} decisions timed", routing.decisions)),
    );
    table.push(
        Row::new(
            "route",
            &format!("RoutingTable::new with {ROUTING_NODES} nodes (cold build)"),
            "",
        )
        .value(1, routing.build_ms, "ms"),
    );
    table.push(
        Row::new(
            "route",
            &format!("RoutingTable::update: one node joins {ROUTING_NODES}"),
            "",
        )
        .value(1, routing.join_ms, "ms")
        .note("what a membership change costs the gateway at this size"),
    );

    // ---- Targets.
    table.section("Targets (issue 3 and issue 4)");
    targets(
        &mut table, &seqs, d_at_8, loop_rate, agent_rss, sup_rss, added_real, added_stub, &routing,
        proxied,
    );

    drop(main_agent);
    drop(gateway_process);
    println!();
    println!("{machine_line}");
    println!(
        "run: {} in {:.0} s; load average at end {}; sequential samples interleaved per path, {} ms pause before each",
        if sizes.quick {
            "quick (FLEET_BENCH_QUICK=1)"
        } else {
            "full"
        },
        started.elapsed().as_secs_f64(),
        load_average(),
        SETTLE.as_millis()
    );
    println!(
        "(c) = the program's own time: bash EPOCHREALTIME around compile+run inside an already running container (same image and limits as a sandbox, via docker exec); (c') = the supervisor's wall_time_ms of the (d) jobs"
    );
    println!();
    print!("{}", table.render());
    Ok(())
}

/// One language's sequential samples. Each round takes one sample of every path, each on a
/// quiet engine: (e) when the fresh pool is full again and the last used sandbox is gone, (f)
/// when the previous cold sandbox is gone; then (a), (b), (c), (d).
async fn sequential(env: &Env, lang: &Lang, plan: LangPlan) -> Seq {
    let mut s = Seq::default();
    let idle = env.idle[lang.name].clone();
    // Warm-up, not counted: the exec container's page cache, the agent's recycled sandboxes.
    for _ in 0..2 {
        let _ = env.engine.exec_job(&idle, lang).await;
        let _ = env.main.hello(&lang.hello()).await;
    }
    let start = Instant::now();
    for i in 0..plan.fast {
        if start.elapsed() > plan.budget {
            break;
        }
        if plan.all_paths && i < plan.slow {
            let ready = async {
                env.fresh
                    .wait_warm(lang.name, FRESH_POOL, Duration::from_secs(60))
                    .await?;
                env.engine
                    .wait_count(&env.fresh_node, env.fresh_full, Duration::from_secs(30))
                    .await
            };
            let sample = match ready.await {
                Ok(()) => {
                    settle().await;
                    env.fresh.hello(&lang.hello_fresh()).await
                }
                Err(e) => Err(e),
            };
            if let Some((ms, r)) = s.errors.record("e", sample) {
                if r.sandbox.as_deref() == Some("fresh") {
                    s.e.push(ms);
                } else {
                    *s.off_path.entry("e").or_default() += 1;
                }
            }
            let quiet = env
                .engine
                .wait_count(&env.cold_node, 0, Duration::from_secs(30))
                .await;
            let sample = match quiet {
                Ok(()) => {
                    settle().await;
                    env.cold.hello(&lang.hello()).await
                }
                Err(e) => Err(e),
            };
            if let Some((ms, r)) = s.errors.record("f", sample) {
                if r.sandbox.as_deref() == Some("cold") {
                    s.f.push(ms);
                } else {
                    *s.off_path.entry("f").or_default() += 1;
                }
            }
            let first_run = async {
                let id = env.engine.start_idle(lang).await?;
                settle().await;
                let times = env.engine.timed(&id, lang, 1).await;
                env.engine.remove(&id).await?;
                times
            };
            if let Some(times) = s.errors.record("c0", bounded("first run", first_run).await) {
                for v in times {
                    s.c0.push(v);
                }
            }
            settle().await;
            if let Some((ms, steps)) = s
                .errors
                .record("a", bounded("docker run", env.engine.run_once(lang)).await)
            {
                s.a.push(ms);
                for (stat, v) in s.a_steps.iter_mut().zip(steps) {
                    stat.push(v);
                }
            }
        }
        if plan.all_paths {
            settle().await;
            let t = Instant::now();
            if s.errors
                .record(
                    "b",
                    bounded("docker exec", env.engine.exec_job(&idle, lang)).await,
                )
                .is_some()
            {
                s.b.push(ms_since(t));
            }
        }
        settle().await;
        if let Some(times) = s.errors.record(
            "c",
            bounded("timed exec", env.engine.timed(&idle, lang, 1)).await,
        ) {
            for v in times {
                s.c.push(v);
            }
        }
        settle().await;
        if let Some((ms, r)) = s.errors.record("d", env.main.hello(&lang.hello()).await) {
            if r.sandbox.as_deref() == Some("warm") {
                s.d.push(ms);
                s.c_sup.push(stage_ms(&r));
                s.d_agent.push(r.timing.total_ms as f64);
            } else {
                *s.off_path.entry("d").or_default() += 1;
            }
        }
        settle().await;
        if let Some((first, total)) = s.errors.record(
            "ds",
            bounded("stream", env.main.stream(&lang.hello())).await,
        ) {
            s.ds_first.push(first);
            s.ds_total.push(total);
        }
    }
    s
}

fn latency_rows(table: &mut Table, lang: &Lang, s: &Seq) {
    let (a, c) = (s.a.p50(), s.c.p50());
    let vs = |p50: f64| {
        let mut parts = Vec::new();
        if a.is_finite() {
            parts.push(format!("{} (a)", times(ratio(p50, a))));
        }
        parts.push(format!("{} (c)", times(ratio(p50, c))));
        parts.join(", ")
    };
    let off = |path: &str, label: &str| match s.off_path.get(path) {
        Some(n) => format!("{n} answers were not `{label}` (left out)"),
        None => String::new(),
    };
    let name = lang.name;
    let what = if lang.compiled { "compile+run" } else { "run" };
    if s.a.n() > 0 || s.errors.0.contains_key("a") {
        let steps = ["create", "start", "wait", "logs", "rm"]
            .iter()
            .zip(&s.a_steps)
            .map(|(n, st)| format!("{n} {}", num(st.p50())))
            .collect::<Vec<_>>()
            .join(", ");
        table.push(
            Row::new(
                "(a)",
                "docker run per job via Engine API (create/start/wait/logs/rm)",
                name,
            )
            .stats(&s.a, "ms")
            .ratio(vs(s.a.p50()))
            .note(join_notes(&[
                format!("p50 steps: {steps}"),
                s.errors.note("a"),
            ])),
        );
    }
    if s.b.n() > 0 || s.errors.0.contains_key("b") {
        table.push(
            Row::new(
                "(b)",
                "docker exec into a running container via Engine API",
                name,
            )
            .stats(&s.b, "ms")
            .ratio(vs(s.b.p50()))
            .note(s.errors.note("b")),
        );
    }
    table.push(
        Row::new(
            "(c)",
            &format!("program's own {what} in a running container (bash-timed)"),
            name,
        )
        .stats(&s.c, "ms")
        .ratio(vs(c))
        .note(s.errors.note("c")),
    );
    if s.c0.n() > 0 || s.errors.0.contains_key("c0") {
        table.push(
            Row::new(
                "(c0)",
                &format!("{what} as the first program in a just-started container (bash-timed)"),
                name,
            )
            .stats(&s.c0, "ms")
            .ratio(vs(s.c0.p50()))
            .note(join_notes(&[
                "what a never-used sandbox pays on its first job".into(),
                s.errors.note("c0"),
            ])),
        );
    }
    table.push(
        Row::new(
            "(c')",
            &format!("supervisor-reported {what} wall_time_ms of the (d) jobs"),
            name,
        )
        .stats(&s.c_sup, "ms")
        .ratio(vs(s.c_sup.p50())),
    );
    table.push(
        Row::new("(d)", "agent warm recycled path over HTTP", name)
            .stats(&s.d, "ms")
            .ratio(vs(s.d.p50()))
            .note(join_notes(&[
                format!(
                    "agent's own timing.total_ms p50 {} p99 {}",
                    num(s.d_agent.p50()),
                    num(s.d_agent.p99())
                ),
                off("d", "warm"),
                s.errors.note("d"),
            ])),
    );
    if s.ds_first.n() > 0 || s.errors.0.contains_key("ds") {
        let target = s.d.p50() + 2.0;
        table.push(
            Row::new(
                "(d~)",
                "the (d) job as an NDJSON stream: first output event",
                name,
            )
            .stats(&s.ds_first, "ms")
            .ratio(format!(
                "{} vs (d) p50 + 2 = {} ms: {}",
                num(s.ds_first.p50()),
                num(target),
                if s.ds_first.p50() <= target {
                    "met"
                } else {
                    "not met"
                }
            ))
            .note(join_notes(&[
                format!(
                    "whole stream to its result p50 {} p99 {}",
                    num(s.ds_total.p50()),
                    num(s.ds_total.p99())
                ),
                s.errors.note("ds"),
            ])),
        );
    }
    if s.e.n() > 0 || s.errors.0.contains_key("e") {
        table.push(
            Row::new("(e)", "isolation fresh, ready pool (HTTP)", name)
                .stats(&s.e, "ms")
                .ratio(vs(s.e.p50()))
                .note(join_notes(&[
                    "agent with --recycle-after 1 so its pool holds only never-used sandboxes; waits for the refill before each job".into(),
                    off("e", "fresh"),
                    s.errors.note("e"),
                ])),
        );
    }
    if s.f.n() > 0 || s.errors.0.contains_key("f") {
        table.push(
            Row::new("(f)", "cold, empty pool (HTTP)", name)
                .stats(&s.f, "ms")
                .ratio(vs(s.f.p50()))
                .note(join_notes(&[
                    "--pool-min 0 --pool-max 0; waits until the previous sandbox is removed".into(),
                    off("f", "cold"),
                    s.errors.note("f"),
                ])),
        );
    }
}

/// Starts an agent keeping `pool` warm Python sandboxes, and reads its RSS and its sandboxes'
/// PID 1 RSS: (agent VmRSS, agent VmHWM, supervisors' VmRSS), MiB.
async fn memory(engine: &Engine, node: &str, pool: u32) -> anyhow::Result<(f64, f64, Stats)> {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", pool)
        .arg("--pool-max", pool);
    let agent = AgentProcess::spawn(node, free_port(), &opts).await;
    let api = Http::new(&agent.api.url);
    api.wait_warm("python", pool, Duration::from_secs(180))
        .await?;
    // Let the pool settle (version probe removed, no start under way).
    engine
        .wait_count(node, pool as usize, Duration::from_secs(30))
        .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let pid = agent.child.id();
    let rss = status_mib(pid, "VmRSS").ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))?;
    let hwm = status_mib(pid, "VmHWM").unwrap_or(f64::NAN);
    let mut sup = Stats::default();
    for p in engine.pids(node).await? {
        if let Some(v) = status_mib(p, "VmRSS") {
            sup.push(v);
        }
    }
    if sup.n() == 0 {
        bail!("no supervisor pid readable");
    }
    drop(agent);
    Ok((rss, hwm, sup))
}

/// `pairs` rounds of the same job straight and through the gateway, alternating which goes
/// first: (straight ms, gateway ms, paired differences, errors).
/// `pause` before each request: `SETTLE` when a request runs a Docker-backed job, none for the
/// stub (nothing is left to settle, and 4,000 pauses would idle the machine into its slower
/// wake-ups).
async fn overhead_pairs(
    direct: &Http,
    gateway: &Http,
    body: &Value,
    pairs: usize,
    pause: Duration,
) -> (Stats, Stats, Stats, Errors) {
    let (mut d, mut g, mut diff) = (Stats::default(), Stats::default(), Stats::default());
    let mut errors = Errors::default();
    for _ in 0..3 {
        let _ = direct.hello(body).await;
        let _ = gateway.hello(body).await;
    }
    for i in 0..pairs {
        let (first, second, first_is_direct) = if i % 2 == 0 {
            (direct, gateway, true)
        } else {
            (gateway, direct, false)
        };
        tokio::time::sleep(pause).await;
        let x = first.hello(body).await.map(|(ms, _)| ms);
        tokio::time::sleep(pause).await;
        let y = second.hello(body).await.map(|(ms, _)| ms);
        let (dr, gr) = if first_is_direct { (x, y) } else { (y, x) };
        let dr = errors.record("direct", dr);
        let gr = errors.record("gateway", gr);
        if let Some(v) = dr {
            d.push(v);
        }
        if let Some(v) = gr {
            g.push(v);
        }
        if let (Some(a), Some(b)) = (dr, gr) {
            diff.push(b - a);
        }
    }
    (d, g, diff, errors)
}

struct StubResults {
    direct: Stats,
    via: Stats,
    paired: Stats,
    direct_load: Tput,
    via_load: Tput,
}

/// A second in-process gateway in front of the stub agent: sequential added latency, then
/// requests per second at concurrency 64, straight and through the gateway.
async fn stub_phase(sizes: &Sizes) -> anyhow::Result<StubResults> {
    let (stub_url, stub_task) = start_stub().await?;
    let (gw_url, gw_stop) = start_gateway().await?;
    let reporter = report_stub(gw_url.clone(), stub_url.clone());
    let direct = Http::new(&stub_url);
    let gateway = Http::new(&gw_url);
    let result = async {
        gateway
            .wait_routable("python", Duration::from_secs(10))
            .await?;
        let body: Value = serde_json::from_str(HELLO_PY)?;
        let (d, v, paired, errors) =
            overhead_pairs(&direct, &gateway, &body, sizes.stub_pairs, Duration::ZERO).await;
        if let Some((_, (n, first))) = errors.0.iter().next() {
            bail!("{n} stub requests failed, first: {first}");
        }
        let load = |url: String| {
            let client = http_client();
            move |_| {
                let (client, url) = (client.clone(), url.clone());
                async move {
                    let resp = client
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(HELLO_PY)
                        .send()
                        .await?;
                    let status = resp.status();
                    let _ = resp.bytes().await?;
                    if status != reqwest::StatusCode::OK {
                        bail!("{status}");
                    }
                    Ok(())
                }
            }
        };
        let direct_load = throughput(
            64,
            sizes.stub_load,
            usize::MAX,
            load(format!("{stub_url}/v1/execute")),
        )
        .await;
        let via_load = throughput(
            64,
            sizes.stub_load,
            usize::MAX,
            load(format!("{gw_url}/v1/execute")),
        )
        .await;
        Ok(StubResults {
            direct: d,
            via: v,
            paired,
            direct_load,
            via_load,
        })
    }
    .await;
    reporter.abort();
    let _ = gw_stop.send(());
    stub_task.abort();
    result
}

struct Routing {
    build_ms: f64,
    join_ms: f64,
    idle_ns: Stats,
    loaded_ns: Stats,
    decisions: u64,
}

/// The gateway's routing module on its own: a table of 1,000 nodes with the gateway's default
/// vnodes, then `choose` in batches, idle and with random loads.
fn routing_bench(budget: Duration) -> Routing {
    const LANGS: [&str; 6] = ["cpp", "go", "java", "javascript", "python", "rust"];
    const BATCH: usize = 1_000;
    let config = codefleet_gateway::Config::default();
    let entry = |i: usize| NodeEntry {
        id: NodeId::new(&format!("node-{i:04}")),
        slots_total: 8,
        languages: LANGS
            .iter()
            .map(|l| (l.to_string(), vec![(String::new(), "1.0".to_string())]))
            .collect(),
        load: i,
    };
    let entries: Vec<NodeEntry<usize>> = (0..ROUTING_NODES).map(entry).collect();
    let t = Instant::now();
    let table = RoutingTable::new(config.vnodes, entries.clone());
    let build_ms = ms_since(t);
    let mut grown = entries;
    grown.push(entry(ROUTING_NODES));
    let t = Instant::now();
    let bigger = table.update(grown);
    let join_ms = ms_since(t);
    drop(bigger);

    // splitmix64, fixed seed: the same loads every run.
    let mut state = 0x5eed_u64;
    let mut next = move || {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    };
    let random: Vec<u32> = (0..ROUTING_NODES).map(|_| (next() % 8) as u32).collect();
    let idle = vec![0u32; ROUTING_NODES];
    let mut decisions = 0u64;
    let mut timed = |loads: &[u32]| {
        let mut stats = Stats::default();
        let deadline = Instant::now() + budget / 2;
        while Instant::now() < deadline && stats.n() < 10_000 {
            let t = Instant::now();
            for k in 0..BATCH {
                let want = Want {
                    language: LANGS[k % LANGS.len()],
                    version: None,
                    runtime: None,
                    exclude: &[],
                    affinity: None,
                };
                match table.choose(black_box(&want), config.balance_factor, |&i| loads[i]) {
                    Decision::Node(e) => {
                        black_box(&e.id);
                    }
                    Decision::Saturated | Decision::Unavailable => {
                        black_box(0);
                    }
                }
            }
            stats.push(t.elapsed().as_nanos() as f64 / BATCH as f64);
            decisions += BATCH as u64;
        }
        stats
    };
    let idle_ns = timed(&idle);
    let loaded_ns = timed(&random);
    Routing {
        build_ms,
        join_ms,
        idle_ns,
        loaded_ns,
        decisions,
    }
}

#[allow(clippy::too_many_arguments)]
fn targets(
    table: &mut Table,
    seqs: &[(Arc<Lang>, Seq)],
    d_at_8: f64,
    loop_rate: f64,
    agent_rss: f64,
    sup_rss: f64,
    gw_added: (f64, f64),
    stub_added: (f64, f64),
    routing: &Routing,
    proxied: f64,
) {
    let check = |ok: bool, v: f64, w: f64| (v.is_finite() && w.is_finite()).then_some(ok);
    let find = |name: &str| seqs.iter().find(|(l, _)| l.name == name).map(|(_, s)| s);
    if let Some(py) = find("python") {
        let (d, c, b) = (py.d.p50(), py.c.p50(), py.b.p50());
        table.target(
            "warm hello p50 <= (c) + 5 ms",
            "python",
            format!(
                "(d) {} ms vs (c) {} + 5 = {} ms; with (c') {} + 5 = {} ms",
                num(d),
                num(c),
                num(c + 5.0),
                num(py.c_sup.p50()),
                num(py.c_sup.p50() + 5.0)
            ),
            check(d <= c + 5.0, d, c),
        );
        table.target(
            "warm hello p50 <= 0.25 x (b)",
            "python",
            format!(
                "(d) {} ms vs 0.25 x {} = {} ms",
                num(d),
                num(b),
                num(0.25 * b)
            ),
            check(d <= 0.25 * b, d, b),
        );
        table.target(
            "warm hello p99 <= 3 x p50",
            "python",
            format!(
                "p99 {} ms vs 3 x {} = {} ms (n {})",
                num(py.d.p99()),
                num(d),
                num(3.0 * d),
                py.d.n()
            ),
            check(py.d.p99() <= 3.0 * d, py.d.p99(), d),
        );
    }
    table.target(
        "warm throughput (c=8) >= 50% of back-to-back on both cores",
        "python",
        format!(
            "{} jobs/s vs 50% of {} = {} progs/s ({}%)",
            num(d_at_8),
            num(loop_rate),
            num(0.5 * loop_rate),
            num(100.0 * ratio(d_at_8, loop_rate))
        ),
        check(d_at_8 >= 0.5 * loop_rate, d_at_8, loop_rate),
    );
    for name in ["python", "javascript", "cpp"] {
        if let Some(s) = find(name) {
            let (e, d, a) = (s.e.p50(), s.d.p50(), s.a.p50());
            table.target(
                "fresh (ready pool) p50 <= 2 x warm and < (a)",
                name,
                format!(
                    "(e) {} ms vs 2 x {} = {} ms and (a) {} ms",
                    num(e),
                    num(d),
                    num(2.0 * d),
                    num(a)
                ),
                check(e <= 2.0 * d && e < a, e, d.min(a)),
            );
            let f = s.f.p50();
            table.target(
                "cold (empty pool) no slower than a docker run",
                name,
                format!("(f) {} ms vs (a) {} ms", num(f), num(a)),
                check(f <= a, f, a),
            );
        }
    }
    for name in ["cpp", "rust"] {
        if let Some(s) = find(name) {
            let (d, c) = (s.d.p50(), s.c.p50());
            table.target(
                "compile+run warm within 1.3 x the compiler's own time in a running container",
                name,
                format!(
                    "(d) {} ms vs 1.3 x (c) {} = {} ms ({}x)",
                    num(d),
                    num(c),
                    num(1.3 * c),
                    num(ratio(d, c))
                ),
                check(d <= 1.3 * c, d, c),
            );
        }
    }
    table.target(
        "agent RSS <= 50 MB with 20 warm containers",
        "",
        format!("{} MiB", num(agent_rss)),
        check(agent_rss * 1.048_576 <= 50.0, agent_rss, 0.0),
    );
    table.target(
        "supervisor RSS <= 2 MB per sandbox",
        "",
        format!("max {} MiB", num(sup_rss)),
        check(sup_rss * 1.048_576 <= 2.0, sup_rss, 0.0),
    );
    table.target(
        "gateway adds p50 <= 0.5 ms, p99 <= 2 ms (real agent)",
        "python",
        format!(
            "added p50 {} ms, p99 {} ms",
            num(gw_added.0),
            num(gw_added.1)
        ),
        check(
            gw_added.0 <= 0.5 && gw_added.1 <= 2.0,
            gw_added.0,
            gw_added.1,
        ),
    );
    table.target(
        "gateway adds p50 <= 0.5 ms, p99 <= 2 ms (stub agent)",
        "",
        format!(
            "added p50 {} ms, p99 {} ms",
            num(stub_added.0),
            num(stub_added.1)
        ),
        check(
            stub_added.0 <= 0.5 && stub_added.1 <= 2.0,
            stub_added.0,
            stub_added.1,
        ),
    );
    let route = routing.loaded_ns.p50();
    table.target(
        "routing decision at 1,000 nodes <= 5 us",
        "",
        format!("{} ns (idle {} ns)", num(route), num(routing.idle_ns.p50())),
        check(
            route <= 5_000.0 && routing.idle_ns.p50() <= 5_000.0,
            route,
            0.0,
        ),
    );
    table.target(
        "proxied requests/s, 2 cores, generator included (aim >= 10,000)",
        "",
        format!("{} req/s", num(proxied)),
        check(proxied >= 10_000.0, proxied, 0.0),
    );
}

/// The main agent's ready sandboxes per language, as its capacity report says.
async fn main_warm(main: &Http) -> String {
    let report: anyhow::Result<CapacityReport> = async {
        Ok(main
            .client
            .get(format!("{}/v1/capacity", main.url))
            .send()
            .await?
            .json()
            .await?)
    }
    .await;
    match report {
        Ok(r) => r
            .languages
            .iter()
            .map(|(name, l)| format!("{name} {}", l.warm))
            .collect::<Vec<_>>()
            .join(", "),
        Err(e) => format!("unknown ({e:#})"),
    }
}
