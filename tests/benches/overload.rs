//! Overload at the fleet's edge (a bench binary, not a test): the compose cluster of
//! `deploy/compose/` (two gateways, three agents in containers) is offered three times what it
//! can run, and the bench prints what admitted jobs and refused ones got, and the memory of every
//! gateway and agent process over the run.
//!
//! 1. Capacity: twice as many clients as the fleet has slots, each sending the job back to back
//!    through the two gateways in turn, for `OVERLOAD_CAPACITY_S` seconds: the jobs per second the
//!    fleet completes when no slot is ever idle (with only as many clients as slots, a slot idles
//!    while its client's answer travels back and the next job comes in).
//! 2. Overload: an open-loop load of `OVERLOAD_FACTOR` (3) times that rate for `OVERLOAD_S`
//!    seconds, round-robin over the gateways; each request starts on time whatever the others
//!    do. Admitted jobs (200) and refusals (429, 503) are counted and timed apart, and every
//!    refusal is checked for `Retry-After`.
//! 3. Memory: the resident size of every gateway and agent process (read from /proc of the
//!    host, the containers' processes being the host's), sampled every 500 ms from the capacity
//!    phase to five seconds after the overload.
//!
//! The job is Python sleeping `OVERLOAD_JOB_MS` (200 ms): the capacity is the slots', not the
//! two cores', so the figures say how the edge sheds load rather than how fast Python starts.
//! The per-key quotas are lifted (this is the fleet's capacity, not a client's quota).
//!
//! ```text
//! deploy/compose/build-images.sh                       # images of the release binaries
//! cargo bench -p codefleet-tests --bench overload      # about a minute and a half
//! ```
//!
//! Every loop is bounded in time. The compose project (`cfbench<pid>`) is taken down at the end,
//! also on an error or a panic, with the agents' sandboxes.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use serde_json::{json, Value};

use codefleet_tests::{free_port, remove_containers_of, rss_of};

const SERVICES: [&str; 5] = ["gateway1", "gateway2", "agent1", "agent2", "agent3"];
const SLOTS_PER_AGENT: usize = 4;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn workspace() -> PathBuf {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    tests.parent().expect("the workspace").to_path_buf()
}

fn output(argv: &[&str], env: &[(String, String)]) -> anyhow::Result<String> {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {argv:?}"))?;
    if !out.status.success() {
        bail!(
            "{argv:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// `docker compose` when the Docker CLI has the plugin, else `docker-compose`.
fn compose_cli() -> Vec<&'static str> {
    let plugin = Command::new("docker")
        .args(["compose", "version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if plugin {
        vec!["docker", "compose"]
    } else {
        vec!["docker-compose"]
    }
}

/// The compose project, taken down on drop.
struct Project {
    name: String,
    env: Vec<(String, String)>,
    urls: Vec<String>,
    nodes: Vec<String>,
}

impl Project {
    fn argv(&self, args: &[&str]) -> Vec<String> {
        let file = workspace().join("deploy/compose/compose.yaml");
        let mut argv: Vec<String> = compose_cli().into_iter().map(String::from).collect();
        argv.extend(["-p".into(), self.name.clone(), "-f".into()]);
        argv.push(file.display().to_string());
        argv.extend(args.iter().map(|a| a.to_string()));
        argv
    }

    fn compose(&self, args: &[&str]) -> anyhow::Result<String> {
        let argv = self.argv(args);
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        output(&argv, &self.env)
    }

    /// The host pid of compose service `service`'s process.
    fn pid(&self, service: &str) -> anyhow::Result<u32> {
        let id = output(
            &[
                "docker",
                "ps",
                "-q",
                "--filter",
                &format!("label=com.docker.compose.project={}", self.name),
                "--filter",
                &format!("label=com.docker.compose.service={service}"),
            ],
            &[],
        )?;
        let pid = output(&["docker", "inspect", "-f", "{{.State.Pid}}", &id], &[])?;
        pid.parse()
            .with_context(|| format!("pid of {service}: {pid:?}"))
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        eprintln!("taking {} down", self.name);
        let _ = self.compose(&["down", "-v", "--remove-orphans", "-t", "45"]);
        for node in &self.nodes {
            remove_containers_of(node);
            let _ = std::fs::remove_dir_all(format!("/var/lib/codefleet/run/{node}"));
            let _ = std::fs::remove_file(format!("/var/lib/codefleet/run/{node}.lock"));
        }
    }
}

/// What one request got.
#[derive(Debug, Clone)]
struct Sample {
    status: u16,
    code: String,
    retry_after: bool,
    took: Duration,
    /// An admitted job's wait, at the gateway and in the agent's queue (`timing.queued_ms`).
    queued: Duration,
    /// Nodes the gateway tried.
    attempts: u64,
    /// A refusal's `detail`.
    detail: String,
}

fn job(ms: u64) -> Value {
    json!({"language": "python",
        "source": format!("import time\ntime.sleep({})\nprint('hi')\n", ms as f64 / 1000.0)})
}

async fn send(client: &reqwest::Client, url: &str, body: &Value) -> Sample {
    let started = Instant::now();
    match client
        .post(format!("{url}/v1/execute"))
        .json(body)
        .send()
        .await
    {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let retry_after = resp.headers().contains_key("retry-after");
            let body: Value = resp.json().await.unwrap_or(Value::Null);
            let ok = status != 200 || body["run"]["stdout"] == "hi\n";
            Sample {
                status: if ok { status } else { 299 },
                code: body["code"].as_str().unwrap_or("").to_string(),
                retry_after,
                took: started.elapsed(),
                queued: Duration::from_millis(body["timing"]["queued_ms"].as_u64().unwrap_or(0)),
                attempts: body["attempts"].as_u64().unwrap_or(0),
                detail: body["detail"].as_str().unwrap_or("").to_string(),
            }
        }
        Err(e) => Sample {
            status: 0,
            code: format!("{e}"),
            retry_after: false,
            took: started.elapsed(),
            queued: Duration::ZERO,
            attempts: 0,
            detail: String::new(),
        },
    }
}

/// Quantile `p` of sorted `v`.
fn q(v: &[Duration], p: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

/// Resident sizes of every service's process over time: (seconds since start, phase, bytes).
type Rss = Arc<Mutex<BTreeMap<&'static str, Vec<(f64, &'static str, u64)>>>>;

async fn wait_serving(client: &reqwest::Client, project: &Project) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let mut all = true;
        for url in &project.urls {
            let nodes: Value = match client.get(format!("{url}/v1/nodes")).send().await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            let ready = nodes.as_array().map_or(0, |a| {
                a.iter()
                    .filter(|n| {
                        n["state"] == "ready"
                            && n["languages"]["python"]["warm"].as_u64().unwrap_or(0)
                                >= SLOTS_PER_AGENT as u64
                    })
                    .count()
            });
            all &= ready == project.nodes.len();
        }
        if all {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the fleet was not ready and warm within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    match runtime.block_on(run()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("overload bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let factor: f64 = env_or("OVERLOAD_FACTOR", 3.0);
    let overload_s: u64 = env_or("OVERLOAD_S", 20);
    let capacity_s: u64 = env_or("OVERLOAD_CAPACITY_S", 10);
    let job_ms: u64 = env_or("OVERLOAD_JOB_MS", 200);
    // The gateways' --queue-length (default: four times the ready slots).
    let queue_length = std::env::var("OVERLOAD_QUEUE_LENGTH").ok();
    // The gateways' --queue-wait-ms (default 2000), which also bounds the agents' queue.
    let queue_wait = std::env::var("OVERLOAD_QUEUE_WAIT_MS").ok();

    let built = output(
        &[
            workspace()
                .join("deploy/compose/build-images.sh")
                .to_str()
                .unwrap(),
            "--no-cargo",
        ],
        &[],
    )?;
    eprintln!("{built}");

    let name = format!("cfbench{}", std::process::id());
    let ports = [free_port(), free_port()];
    let third = 16 + std::process::id() % 200;
    let env = vec![
        ("CODEFLEET_NODE_PREFIX".to_string(), name.clone()),
        ("CODEFLEET_GATEWAY1_PORT".to_string(), ports[0].to_string()),
        ("CODEFLEET_GATEWAY2_PORT".to_string(), ports[1].to_string()),
        ("CODEFLEET_SUBNET".to_string(), format!("10.214.{third}")),
        ("CODEFLEET_ENABLE".to_string(), "python".to_string()),
        ("CODEFLEET_SLOTS".to_string(), SLOTS_PER_AGENT.to_string()),
        (
            "CODEFLEET_POOL_MIN".to_string(),
            SLOTS_PER_AGENT.to_string(),
        ),
        (
            "CODEFLEET_POOL_MAX".to_string(),
            (2 * SLOTS_PER_AGENT).to_string(),
        ),
        ("CODEFLEET_RATE_PER_S".to_string(), "100000".to_string()),
        ("CODEFLEET_BURST".to_string(), "100000".to_string()),
        (
            "CODEFLEET_MAX_CONCURRENT_PER_KEY".to_string(),
            "100000".to_string(),
        ),
        (
            "CODEFLEET_CLUSTER_TOKEN".to_string(),
            format!("token-{name}"),
        ),
    ];
    let mut env = env;
    if let Some(length) = &queue_length {
        env.push(("CODEFLEET_QUEUE_LENGTH".to_string(), length.clone()));
    }
    if let Some(wait) = &queue_wait {
        env.push(("CODEFLEET_QUEUE_WAIT_MS".to_string(), wait.clone()));
    }
    let project = Project {
        nodes: (1..=3).map(|n| format!("{name}-agent{n}")).collect(),
        urls: ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect(),
        name,
        env,
    };
    eprintln!("bringing {} up", project.name);
    project.compose(&["up", "-d"])?;
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .pool_max_idle_per_host(1024)
        .build()?;
    wait_serving(&client, &project).await?;
    let slots = SLOTS_PER_AGENT * project.nodes.len();
    let body = job(job_ms);

    // Memory of every process, sampled in the background.
    let pids: Vec<(&'static str, u32)> = SERVICES
        .iter()
        .map(|s| project.pid(s).map(|p| (*s, p)))
        .collect::<anyhow::Result<_>>()?;
    let rss: Rss = Arc::default();
    let phase = Arc::new(Mutex::new("warm-up"));
    let t0 = Instant::now();
    let sampler = {
        let (rss, phase) = (rss.clone(), phase.clone());
        tokio::spawn(async move {
            loop {
                let now = *phase.lock().unwrap();
                for (service, pid) in &pids {
                    let sample = (t0.elapsed().as_secs_f64(), now, rss_of(*pid));
                    rss.lock().unwrap().entry(service).or_default().push(sample);
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };

    // Warm-up: each gateway's connections and each agent's pool.
    eprintln!("warm-up");
    let warm = (0..2 * slots).map(|i| send(&client, &project.urls[i % 2], &body));
    futures_util::future::join_all(warm).await;

    // 1. Capacity: exactly as many clients as slots, back to back.
    *phase.lock().unwrap() = "capacity";
    let clients = 2 * slots;
    eprintln!("capacity: {clients} closed-loop clients for {capacity_s} s");
    let until = Instant::now() + Duration::from_secs(capacity_s);
    let workers = (0..clients).map(|w| {
        let (client, urls, body) = (client.clone(), project.urls.clone(), body.clone());
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut i = w;
            while Instant::now() < until {
                samples.push(send(&client, &urls[i % urls.len()], &body).await);
                i += 1;
            }
            samples
        })
    });
    let started = Instant::now();
    let mut closed: Vec<Sample> = Vec::new();
    for worker in futures_util::future::join_all(workers).await {
        closed.extend(worker?);
    }
    let capacity_elapsed = started.elapsed();
    let completed = closed.iter().filter(|s| s.status == 200).count();
    let capacity = completed as f64 / capacity_elapsed.as_secs_f64();
    let mut closed_took: Vec<Duration> = closed
        .iter()
        .filter(|s| s.status == 200)
        .map(|s| s.took)
        .collect();
    closed_took.sort();
    eprintln!("capacity: {capacity:.1} jobs/s");

    // 2. Overload: factor × capacity, open loop.
    *phase.lock().unwrap() = "overload";
    let rate = capacity * factor;
    let total = (rate * overload_s as f64) as usize;
    eprintln!("overload: {rate:.0} jobs/s ({factor}x) for {overload_s} s, {total} requests");
    let samples: Arc<Mutex<Vec<(f64, Sample)>>> = Arc::default();
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(total);
    for i in 0..total {
        let due = started + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(due.into()).await;
        let (client, url, body, samples) = (
            client.clone(),
            project.urls[i % 2].clone(),
            body.clone(),
            samples.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let at = started.elapsed().as_secs_f64();
            let sample = send(&client, &url, &body).await;
            samples.lock().unwrap().push((at, sample));
        }));
    }
    let offered_for = started.elapsed();
    for task in tasks {
        task.await?;
    }
    *phase.lock().unwrap() = "after";
    tokio::time::sleep(Duration::from_secs(5)).await;
    sampler.abort();

    // The table.
    let samples = std::mem::take(&mut *samples.lock().unwrap());
    let mut admitted: Vec<Duration> = Vec::new();
    let mut admitted_queued: Vec<Duration> = Vec::new();
    let mut retried = 0;
    let mut refused: Vec<Duration> = Vec::new();
    let mut refused_by: BTreeMap<String, usize> = BTreeMap::new();
    let mut without_retry_after = 0;
    // Refusals after a wait, by where the job waited in vain: an agent's queue names its slots.
    let mut slow_where: BTreeMap<&str, usize> = BTreeMap::new();
    let mut other: BTreeMap<String, usize> = BTreeMap::new();
    for (_, s) in &samples {
        match s.status {
            200 => {
                admitted.push(s.took);
                admitted_queued.push(s.queued);
                retried += usize::from(s.attempts > 1);
            }
            429 | 503 => {
                refused.push(s.took);
                *refused_by
                    .entry(format!("{} {}", s.status, s.code))
                    .or_default() += 1;
                without_retry_after += usize::from(!s.retry_after);
                if s.took > Duration::from_millis(10) {
                    // The gateway says "waited N ms" when a job's wait ran out, and how many
                    // wait already when it refused a newcomer at once (then only the way back
                    // was slow: a loaded machine).
                    let place = if s.detail.contains("slots of node") {
                        "in an agent's queue"
                    } else if s.detail.contains("waited") {
                        "the gateway's wait ran out"
                    } else {
                        "refused at once by the gateway, answer slow to arrive"
                    };
                    *slow_where.entry(place).or_default() += 1;
                }
            }
            _ => *other.entry(format!("{} {}", s.status, s.code)).or_default() += 1,
        }
    }
    admitted.sort();
    admitted_queued.sort();
    refused.sort();
    let (fast, slow): (Vec<Duration>, Vec<Duration>) = refused
        .iter()
        .partition(|d| **d <= Duration::from_millis(10));
    let admitted_rate = admitted.len() as f64 / offered_for.as_secs_f64();

    let queue = queue_length.map_or("default (4 x ready slots)".to_string(), |l| l.to_string());
    let queue = format!(
        "{queue}, queue wait {} ms",
        queue_wait.as_deref().unwrap_or("2000")
    );
    println!("## Overload at the fleet's edge ({slots} slots, Python sleeping {job_ms} ms, gateway queue length {queue})");
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| capacity ({clients} closed-loop clients, {capacity_s} s) | {capacity:.1} jobs/s; latency p50 {} ms, p99 {} ms |",
        ms(q(&closed_took, 0.5)),
        ms(q(&closed_took, 0.99))
    );
    println!(
        "| offered ({factor}x, open loop, {overload_s} s) | {rate:.1} jobs/s, {} requests |",
        samples.len()
    );
    println!(
        "| admitted (200) | {} ({admitted_rate:.1}/s); latency p50 {} ms, p99 {} ms, max {} ms |",
        admitted.len(),
        ms(q(&admitted, 0.5)),
        ms(q(&admitted, 0.99)),
        ms(admitted.last().copied().unwrap_or_default())
    );
    println!(
        "| admitted: waited (gateway and agent queues) | p50 {} ms, p99 {} ms; {retried} tried a second node |",
        ms(q(&admitted_queued, 0.5)),
        ms(q(&admitted_queued, 0.99)),
    );
    println!(
        "| refused (429/503) | {} {refused_by:?}; latency p50 {} ms, p99 {} ms, max {} ms |",
        refused.len(),
        ms(q(&refused, 0.5)),
        ms(q(&refused, 0.99)),
        ms(refused.last().copied().unwrap_or_default())
    );
    println!(
        "| refused within 10 ms | {} of {}; p50 {} ms, p99 {} ms |",
        fast.len(),
        refused.len(),
        ms(q(&fast, 0.5)),
        ms(q(&fast, 0.99))
    );
    println!(
        "| refused after waiting | {} of {} {slow_where:?}; p50 {} ms, max {} ms |",
        slow.len(),
        refused.len(),
        ms(q(&slow, 0.5)),
        ms(slow.last().copied().unwrap_or_default())
    );
    println!(
        "| refusals without Retry-After | {without_retry_after} of {} |",
        refused.len()
    );
    println!(
        "| other answers (errors) | {} {other:?} |",
        other.values().sum::<usize>()
    );

    println!();
    println!("| process | RSS MiB: after warm-up | end of capacity | overload min / max | end of overload | 5 s after |");
    println!("|---|---|---|---|---|---|");
    let mib = |b: u64| format!("{:.1}", b as f64 / (1024.0 * 1024.0));
    for (service, series) in rss.lock().unwrap().iter() {
        let last_of = |phase: &str| {
            series
                .iter()
                .filter(|(_, p, _)| *p == phase)
                .map(|(_, _, b)| *b)
                .next_back()
                .unwrap_or(0)
        };
        let first_of = |phase: &str| {
            series
                .iter()
                .find(|(_, p, _)| *p == phase)
                .map_or(0, |(_, _, b)| *b)
        };
        let during: Vec<u64> = series
            .iter()
            .filter(|(_, p, _)| *p == "overload")
            .map(|(_, _, b)| *b)
            .collect();
        println!(
            "| {service} | {} | {} | {} / {} | {} | {} |",
            mib(first_of("capacity")),
            mib(last_of("capacity")),
            mib(during.iter().copied().min().unwrap_or(0)),
            mib(during.iter().copied().max().unwrap_or(0)),
            mib(last_of("overload")),
            mib(last_of("after")),
        );
    }
    drop(project);
    Ok(())
}
