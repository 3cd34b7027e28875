//! The compose cluster of `deploy/compose/` (two gateways and three agents in containers of the
//! images `deploy/compose/build-images.sh` builds, the agents owning the host's Docker engine
//! through its socket) under the faults of a real fleet: a job through each gateway and a
//! gateway killed under a client that knows both; an agent killed mid-job; an agent cut off the
//! network and reconnected; a rolling restart of every agent under steady load; an agent whose
//! sandboxes are removed behind its back. Each measured figure is printed.
//!
//! Each test brings up a compose project of its own (its name, node ids, ports and subnet carry
//! this process's id) and takes it down when it ends, even when it panics: no container,
//! network or volume of the project is left, nor any sandbox of its agents. The tests run one at
//! a time: the machine has two cores, and the timing bounds are the figures.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use codefleet_gateway::routing::{NodeEntry, NodeId, RoutingTable};
use codefleet_tests::{containers_of, eventually, free_port, remove_containers_of};
use serde_json::{json, Value};

const LANG: &str = "python";
/// The agents' compose services, in the order of [`Fleet::nodes`].
const AGENTS: [&str; 3] = ["agent1", "agent2", "agent3"];
/// Where compose.yaml mounts the agents' run dir (a host path).
const RUN_DIR: &str = "/var/lib/codefleet/run";

/// The tests share the machine's two cores and its Docker engine: one at a time.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn workspace() -> PathBuf {
    let tests = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    tests.parent().expect("the workspace").to_path_buf()
}

/// `docker compose` when the Docker CLI has the plugin, else `docker-compose`.
fn compose_cli() -> &'static [&'static str] {
    static CLI: OnceLock<Vec<&'static str>> = OnceLock::new();
    CLI.get_or_init(|| {
        let works = |argv: &[&str]| {
            Command::new(argv[0])
                .args(&argv[1..])
                .arg("version")
                .output()
                .is_ok_and(|o| o.status.success())
        };
        let cli = [vec!["docker", "compose"], vec!["docker-compose"]]
            .into_iter()
            .find(|argv| works(argv))
            .expect("neither `docker compose` nor `docker-compose` runs");
        eprintln!("compose CLI: {}", cli.join(" "));
        cli
    })
}

/// Builds the images once per test process, from the release binaries that
/// `deploy/compose/build-images.sh` (run by deploy/test.sh) built: Docker's cache makes this a
/// check when they have not changed. Cargo cannot build them from inside `cargo test`.
fn images() {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new(workspace().join("deploy/compose/build-images.sh"))
            .arg("--no-cargo")
            .output()
            .expect("build-images.sh runs");
        eprint!("{}", String::from_utf8_lossy(&out.stdout));
        assert!(
            out.status.success(),
            "building the images failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `argv` without blocking the runtime; panics when it fails.
async fn run(argv: &[&str], env: &[(String, String)]) -> String {
    let out = tokio::process::Command::new(argv[0])
        .args(&argv[1..])
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .output()
        .await
        .expect("the command starts");
    assert!(out.status.success(), "{argv:?} failed: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn run_sync(argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .stdin(Stdio::null())
        .output()
        .expect("the command starts");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn lines(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_string).collect()
}

/// Takes down what an earlier run of these tests left behind when it was killed before its
/// guards ran (a project of a process that no longer exists).
fn sweep_leftovers() {
    let label = "{{.Label \"com.docker.compose.project\"}}";
    let listed = run_sync(&["docker", "ps", "-a", "--format", label]);
    let mut projects: Vec<&str> = listed
        .lines()
        .filter(|p| {
            let pid = p.strip_prefix("cftest").map(|rest| {
                rest.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            });
            pid.is_some_and(|pid| {
                !pid.is_empty() && !std::path::Path::new(&format!("/proc/{pid}")).exists()
            })
        })
        .collect();
    projects.sort();
    projects.dedup();
    for project in projects {
        eprintln!("removing {project}, left by an earlier run");
        let file = workspace().join("deploy/compose/compose.yaml");
        let mut argv = compose_cli().to_vec();
        argv.extend(["-p", project, "-f", file.to_str().unwrap()]);
        argv.extend(["down", "-v", "--remove-orphans", "-t", "5"]);
        run_sync(&argv);
        for n in 1..=AGENTS.len() {
            let node = format!("{project}-agent{n}");
            remove_containers_of(&node);
            remove_run_files(&node);
        }
    }
}

/// The agent's socket directories and lock in the host run dir (an agent that was killed
/// leaves them).
fn remove_run_files(node: &str) {
    let _ = std::fs::remove_dir_all(format!("{RUN_DIR}/{node}"));
    let _ = std::fs::remove_file(format!("{RUN_DIR}/{node}.lock"));
}

/// A /24 of 10.213.0.0/16 that no Docker network and no route of this host overlaps.
fn free_subnet() -> String {
    let nets = run_sync(&["docker", "network", "ls", "-q"]);
    let mut used = String::new();
    for net in lines(&nets) {
        let format = "{{range .IPAM.Config}}{{.Subnet}} {{end}}";
        used.push_str(&run_sync(&[
            "docker", "network", "inspect", "-f", format, &net,
        ]));
        used.push(' ');
    }
    // The host's own routes too (a VPN's, say), when iproute2 is there to list them.
    let routes = Command::new("ip").args(["-4", "route"]).output();
    used.push_str(&routes.map(|o| text(&o)).unwrap_or_default());
    let cidrs: Vec<(u32, u32)> = used
        .split_whitespace()
        .filter_map(|word| {
            let (addr, bits) = word.split_once('/')?;
            let addr: Ipv4Addr = addr.parse().ok()?;
            let bits: u32 = bits.parse().ok()?;
            let mask = if bits == 0 {
                0
            } else {
                u32::MAX << (32 - bits)
            };
            Some((u32::from(addr) & mask, mask))
        })
        .collect();
    let start = std::process::id() % 200;
    (0..200)
        .map(|i| 16 + (start + i) % 200)
        .find(|third| {
            let net = u32::from(Ipv4Addr::new(10, 213, *third as u8, 0));
            let mask = u32::MAX << 8;
            cidrs
                .iter()
                .all(|(base, m)| (net & m) != *base && (base & mask) != net)
        })
        .map(|third| format!("10.213.{third}"))
        .expect("a free /24 in 10.213.0.0/16")
}

/// The node `LANG`'s jobs go to while none is busy: the ring every gateway builds.
fn primary(nodes: &[String]) -> String {
    let entries = nodes.iter().map(|id| NodeEntry {
        id: NodeId::new(id),
        slots_total: 1,
        languages: BTreeMap::new(),
        load: (),
    });
    let ring: RoutingTable<()> = RoutingTable::new(160, entries.collect());
    ring.primary(LANG).expect("a non-empty ring").to_string()
}

/// An HTTP client for the gateways that never panics on a transport error (a gateway may be
/// dead on purpose).
fn http(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .no_proxy()
        .build()
        .expect("client")
}

/// What one execute request got.
#[derive(Debug, Clone)]
struct Outcome {
    /// HTTP status, or 0 when no answer came (the connection failed or broke).
    status: u16,
    body: Value,
    /// The transport error, when there was no answer.
    error: String,
    took: Duration,
    /// Index of the gateway that answered.
    gateway: usize,
    /// Gateways tried before one answered.
    failed_over: usize,
}

impl Outcome {
    fn ok(&self) -> bool {
        self.status == 200 && self.body["status"] == "ok" && self.body["run"]["stdout"] == "hi\n"
    }
    fn node(&self) -> &str {
        self.body["node"].as_str().unwrap_or("")
    }
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// `POST /v1/execute` on `gateway` (index into `urls`); with `failover`, a request that gets no
/// answer (connection refused, reset or closed) is sent to the next gateway, as a client that
/// knows several gateway addresses does.
async fn execute(
    client: &reqwest::Client,
    urls: &[String],
    gateway: usize,
    failover: bool,
    body: &Value,
) -> Outcome {
    let started = Instant::now();
    let tries = if failover { urls.len() } else { 1 };
    let mut error = String::new();
    for attempt in 0..tries {
        let index = (gateway + attempt) % urls.len();
        let sent = client
            .post(format!("{}/v1/execute", urls[index]))
            .json(body)
            .send()
            .await;
        let answer = match sent {
            Ok(resp) => {
                let status = resp.status().as_u16();
                match resp.bytes().await {
                    Ok(bytes) => Ok((
                        status,
                        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                    )),
                    Err(e) => Err(e),
                }
            }
            Err(e) => Err(e),
        };
        match answer {
            Ok((status, body)) => {
                return Outcome {
                    status,
                    body,
                    error: String::new(),
                    took: started.elapsed(),
                    gateway: index,
                    failed_over: attempt,
                }
            }
            Err(e) => error = format!("{e:?}"),
        }
    }
    Outcome {
        status: 0,
        body: Value::Null,
        error,
        took: started.elapsed(),
        gateway,
        failed_over: tries - 1,
    }
}

fn hello() -> Value {
    json!({"language": LANG, "source": "print('hi')"})
}

/// A python job that sleeps `seconds`, then prints `hi`.
fn sleeper(seconds: f64) -> Value {
    json!({"language": LANG, "limits": {"wall_time_ms": 20_000},
        "source": format!("import time\ntime.sleep({seconds})\nprint('hi')\n")})
}

/// A compose project of deploy/compose/compose.yaml, taken down on drop.
struct Fleet {
    project: String,
    env: Vec<(String, String)>,
    /// The agents' node ids, in the order of [`AGENTS`].
    nodes: Vec<String>,
    /// The gateways' URLs on the host's loopback.
    urls: Vec<String>,
    /// The private network's name and its first three octets.
    network: String,
    subnet: String,
    http: reqwest::Client,
    taken_down: bool,
}

impl Fleet {
    /// Brings the project up and waits until both gateways list every agent ready with a warm
    /// python sandbox.
    async fn up(test: &str) -> Fleet {
        images();
        sweep_leftovers();
        let project = format!("cftest{}{test}", std::process::id());
        let ports = loop {
            let (a, b) = (free_port(), free_port());
            if a != b {
                break [a, b];
            }
        };
        let subnet = free_subnet();
        let env = vec![
            ("CODEFLEET_NODE_PREFIX".to_string(), project.clone()),
            ("CODEFLEET_GATEWAY1_PORT".to_string(), ports[0].to_string()),
            ("CODEFLEET_GATEWAY2_PORT".to_string(), ports[1].to_string()),
            ("CODEFLEET_SUBNET".to_string(), subnet.clone()),
            ("CODEFLEET_ENABLE".to_string(), LANG.to_string()),
            (
                "CODEFLEET_CLUSTER_TOKEN".to_string(),
                format!("token-{project}"),
            ),
        ];
        let fleet = Fleet {
            nodes: (1..=AGENTS.len())
                .map(|n| format!("{project}-agent{n}"))
                .collect(),
            urls: ports
                .iter()
                .map(|p| format!("http://127.0.0.1:{p}"))
                .collect(),
            network: format!("{project}_fleet"),
            subnet,
            env,
            project,
            http: http(Duration::from_secs(30)),
            taken_down: false,
        };
        let started = Instant::now();
        fleet.compose(&["up", "-d"]).await;
        let nodes = fleet.nodes.clone();
        fleet.wait_serving(&nodes, Duration::from_secs(90)).await;
        eprintln!(
            "{}: two gateways and three agents serving in {:?} (subnet {}.0/24)",
            fleet.project,
            started.elapsed(),
            fleet.subnet
        );
        fleet
    }

    fn compose_argv(&self) -> Vec<String> {
        let file = workspace().join("deploy/compose/compose.yaml");
        let mut argv: Vec<String> = compose_cli().iter().map(|s| s.to_string()).collect();
        argv.extend(["-p".into(), self.project.clone(), "-f".into()]);
        argv.push(file.display().to_string());
        argv
    }

    async fn compose(&self, args: &[&str]) -> String {
        let mut argv = self.compose_argv();
        argv.extend(args.iter().map(|s| s.to_string()));
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        run(&argv, &self.env).await
    }

    /// The container of compose service `service`.
    fn container(&self, service: &str) -> String {
        let ids = run_sync(&[
            "docker",
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let ids = lines(&ids);
        assert_eq!(ids.len(), 1, "one container of {service}: {ids:?}");
        ids[0].clone()
    }

    /// The compose service of the agent with node id `node`.
    fn service_of(&self, node: &str) -> &'static str {
        let i = self
            .nodes
            .iter()
            .position(|n| n == node)
            .expect("a node of ours");
        AGENTS[i]
    }

    /// `GET /v1/nodes` of gateway `gateway`, or `None` when it does not answer.
    async fn nodes_of(&self, gateway: usize) -> Option<Vec<Value>> {
        let resp = self
            .http
            .get(format!("{}/v1/nodes", self.urls[gateway]))
            .timeout(Duration::from_secs(2))
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.json::<Value>().await.ok()?.as_array().cloned()
    }

    /// Gateway `gateway`'s view of `node` (`Null` when it does not list it or does not answer).
    async fn node_info(&self, gateway: usize, node: &str) -> Value {
        let nodes = self.nodes_of(gateway).await.unwrap_or_default();
        nodes
            .into_iter()
            .find(|n| n["id"] == node)
            .unwrap_or(Value::Null)
    }

    /// Whether gateway `gateway` lists `node` as ready with python ready.
    async fn is_serving(&self, gateway: usize, node: &str) -> bool {
        let info = self.node_info(gateway, node).await;
        info["state"] == "ready" && info["languages"][LANG]["image"] == "ready"
    }

    /// Waits until both gateways list every one of `nodes` ready, python ready and warm.
    async fn wait_serving(&self, nodes: &[String], within: Duration) {
        eventually(
            within,
            "both gateways list every agent ready and warm",
            async || {
                for gateway in 0..self.urls.len() {
                    for node in nodes {
                        let info = self.node_info(gateway, node).await;
                        let warm = info["languages"][LANG]["warm"].as_u64().unwrap_or(0);
                        if info["state"] != "ready" || warm == 0 {
                            return false;
                        }
                    }
                }
                true
            },
        )
        .await;
    }

    /// Polls until both gateways list `node` in `state`; returns how long each took from
    /// `since`, or panics after `within`.
    async fn until_state(
        &self,
        node: &str,
        state: &str,
        since: Instant,
        within: Duration,
    ) -> Vec<Duration> {
        let mut took = vec![None; self.urls.len()];
        while took.iter().any(Option::is_none) {
            for (gateway, slot) in took.iter_mut().enumerate() {
                if slot.is_none() {
                    let ok = if state == "ready" {
                        self.is_serving(gateway, node).await
                    } else {
                        self.node_info(gateway, node).await["state"] == state
                    };
                    if ok {
                        *slot = Some(since.elapsed());
                    }
                }
            }
            assert!(
                since.elapsed() < within,
                "{node} not {state} on both gateways within {within:?}: {took:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        took.into_iter().map(Option::unwrap).collect()
    }

    /// A job on gateway `gateway`, expected to succeed; returns the node that ran it.
    async fn job(&self, gateway: usize) -> String {
        let outcome = execute(&self.http, &self.urls, gateway, false, &hello()).await;
        assert!(
            outcome.ok(),
            "a job through gateway {}: {outcome:?}",
            gateway + 1
        );
        outcome.node().to_string()
    }

    /// `n` jobs one after the other through gateway `gateway`; the node of each. One gateway:
    /// a gateway counts the other's jobs from the nodes' reports, so a sequential stream
    /// alternating gateways may find its primary busy with the previous job and spill.
    async fn jobs_through(&self, gateway: usize, n: usize) -> Vec<String> {
        // Jobs of the other gateway still in the nodes' last reports would count as load.
        eventually(
            Duration::from_secs(10),
            "the nodes report idle",
            async || {
                let nodes = self.nodes_of(gateway).await.unwrap_or_default();
                nodes.iter().all(|n| n["slots_busy"] == 0)
            },
        )
        .await;
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(self.job(gateway).await);
        }
        nodes
    }

    /// `n` jobs one after the other, alternating gateways; the node of each.
    async fn jobs(&self, n: usize) -> Vec<String> {
        let mut nodes = Vec::new();
        for i in 0..n {
            nodes.push(self.job(i % self.urls.len()).await);
        }
        nodes
    }

    fn exit_code(&self, container: &str) -> String {
        run_sync(&["docker", "inspect", "-f", "{{.State.ExitCode}}", container])
    }

    /// Takes the project down (the agents drain and remove their sandboxes on SIGTERM), then
    /// checks that nothing of it is left.
    async fn down(mut self) {
        self.compose(&["down", "-v", "--remove-orphans", "-t", "45"])
            .await;
        self.taken_down = true;
        let project = format!("label=com.docker.compose.project={}", self.project);
        for kind in [["ps", "-aq"], ["network", "ls"], ["volume", "ls"]] {
            let mut argv = vec!["docker"];
            argv.extend(kind);
            if kind[0] != "ps" {
                argv.push("-q");
            }
            argv.extend(["--filter", &project]);
            let left = run(&argv, &[]).await;
            assert!(
                left.is_empty(),
                "{} left by {}: {left}",
                kind[0],
                self.project
            );
        }
        for node in &self.nodes {
            eventually(
                Duration::from_secs(10),
                &format!("no sandbox of {node} left"),
                async || containers_of(node).is_empty(),
            )
            .await;
            remove_run_files(node);
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if self.taken_down {
            return;
        }
        let mut argv = self.compose_argv();
        argv.extend(["down", "-v", "--remove-orphans", "-t", "45"].map(String::from));
        let _ = Command::new(&argv[0])
            .args(&argv[1..])
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        // Agents killed by the test could not remove their sandboxes.
        for node in &self.nodes {
            remove_containers_of(node);
            remove_run_files(node);
        }
    }
}

/// An open-loop load: `rate` jobs a second, each started on time whatever the others do.
struct Load {
    results: Arc<Mutex<Vec<(Duration, Outcome)>>>,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    started: Instant,
}

impl Load {
    /// Round-robin over the gateways (`failover`: a job with no answer goes to the next one).
    fn start(fleet: &Fleet, rate: u32, failover: bool) -> Load {
        let results = Arc::new(Mutex::new(Vec::new()));
        let (stop, mut stopped) = tokio::sync::watch::channel(false);
        let (client, urls) = (fleet.http.clone(), fleet.urls.clone());
        let sink = results.clone();
        let started = Instant::now();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1) / rate);
            let mut jobs = Vec::new();
            // Bounded: five minutes' worth at most, should a test forget to stop it.
            for i in 0..rate as usize * 300 {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stopped.changed() => break,
                }
                let (client, urls, sink) = (client.clone(), urls.clone(), sink.clone());
                // With failover every job starts at gateway 1, as a client's first choice.
                let first = if failover { 0 } else { i % urls.len() };
                jobs.push(tokio::spawn(async move {
                    let at = started.elapsed();
                    let outcome = execute(&client, &urls, first, failover, &hello()).await;
                    sink.lock().unwrap().push((at, outcome));
                }));
            }
            for job in jobs {
                let _ = job.await;
            }
        });
        Load {
            results,
            stop,
            task,
            started,
        }
    }

    /// Stops starting jobs, waits for those in flight, returns every outcome by start time.
    async fn finish(self) -> Vec<(Duration, Outcome)> {
        let _ = self.stop.send(true);
        self.task.await.expect("the load task");
        let mut results = std::mem::take(&mut *self.results.lock().unwrap());
        results.sort_by_key(|(at, _)| *at);
        results
    }
}

/// Prints a summary of a load's outcomes and returns the failed ones.
fn summarize(what: &str, results: &[(Duration, Outcome)]) -> Vec<(Duration, Outcome)> {
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_gateway: BTreeMap<usize, usize> = BTreeMap::new();
    let mut took: Vec<Duration> = Vec::new();
    let mut failed_over = 0;
    for (_, o) in results {
        *per_node.entry(o.node().to_string()).or_default() += 1;
        *per_gateway.entry(o.gateway + 1).or_default() += 1;
        failed_over += usize::from(o.failed_over > 0);
        took.push(o.took);
    }
    took.sort();
    let q = |p: f64| took.get(((took.len() as f64 * p) as usize).min(took.len().saturating_sub(1)));
    let failed: Vec<(Duration, Outcome)> =
        results.iter().filter(|(_, o)| !o.ok()).cloned().collect();
    eprintln!(
        "{what}: {} requests, {} failed, {failed_over} failed over; per node {per_node:?}, per gateway {per_gateway:?}; p50 {:?}, p99 {:?}, max {:?}",
        results.len(),
        failed.len(),
        q(0.5).copied().unwrap_or_default(),
        q(0.99).copied().unwrap_or_default(),
        took.last().copied().unwrap_or_default(),
    );
    for (at, o) in failed.iter().take(10) {
        eprintln!(
            "  failed at {at:?}: status {} code {:?} after {:?} on gateway {}: {} {}",
            o.status,
            o.code(),
            o.took,
            o.gateway + 1,
            o.body,
            o.error
        );
    }
    failed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_gateways_serve_and_a_client_with_both_addresses_survives_one_killed() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::up("gw").await;

    // A job through each gateway; both build the same ring from the same reports.
    let ran = [fleet.job(0).await, fleet.job(1).await];
    eprintln!("a job through each gateway ran on {ran:?}");
    let shares = async |gateway| {
        let nodes = fleet.nodes_of(gateway).await.expect("the gateway answers");
        let mut shares: Vec<(String, String)> = nodes
            .iter()
            .map(|n| (n["id"].to_string(), format!("{:.9}", n["ring_share"])))
            .collect();
        shares.sort();
        shares
    };
    let (one, two) = (shares(0).await, shares(1).await);
    assert_eq!(one.len(), 3, "{one:?}");
    assert_eq!(one, two, "both gateways build the same ring");

    // 10 jobs a second from a client that tries gateway 1 first and gateway 2 when 1 does not
    // answer; gateway 1 is killed two seconds in. Gateway 2 meanwhile keeps every node ready:
    // the agents' reports to it go on while those to the dead one time out.
    let watch_nodes = async || {
        let mut not_ready = Vec::new();
        let until = Instant::now() + Duration::from_secs(7);
        while Instant::now() < until {
            for node in fleet.nodes_of(1).await.unwrap_or_default() {
                if node["state"] != "ready" {
                    not_ready.push(format!("{} {}", node["id"], node["state"]));
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        not_ready
    };
    let load = Load::start(&fleet, 10, true);
    let gateway1 = fleet.container("gateway1");
    let killing = async {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let at = load.started.elapsed();
        run(&["docker", "kill", &gateway1], &[]).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        at
    };
    let (killed_at, not_ready) = tokio::join!(killing, watch_nodes());
    let results = load.finish().await;
    let failed = summarize("failover load", &results);
    assert!(
        failed.is_empty(),
        "every job answered through one gateway or the other"
    );
    assert!(results.len() >= 55, "the load ran: {} jobs", results.len());
    let after: Vec<&Outcome> = results
        .iter()
        .filter(|(at, _)| *at > killed_at + Duration::from_millis(200))
        .map(|(_, o)| o)
        .collect();
    assert!(
        !after.is_empty() && after.iter().all(|o| o.gateway == 1 && o.failed_over == 1),
        "after the kill gateway 2 answers everything"
    );
    let first_after = results
        .iter()
        .find(|(at, _)| *at > killed_at)
        .map(|(_, o)| o.took);
    eprintln!("gateway 1 killed at {killed_at:?}; first job after it answered in {first_after:?}");
    assert!(
        not_ready.is_empty(),
        "gateway 2 saw nodes not ready: {not_ready:?}"
    );

    // Gateway 1 comes back and serves again, with every node ready.
    let started = Instant::now();
    run(&["docker", "start", &gateway1], &[]).await;
    for node in &fleet.nodes {
        eventually(
            Duration::from_secs(15),
            "gateway 1 lists the nodes again",
            async || fleet.is_serving(0, node).await,
        )
        .await;
    }
    eprintln!("gateway 1 restarted and serving in {:?}", started.elapsed());
    fleet.job(0).await;
    fleet.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_job_fails_its_jobs_within_2s_is_routed_around_and_rejoins() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::up("kill").await;
    let victim = primary(&fleet.nodes);
    for gateway in 0..2 {
        let nodes = fleet.jobs_through(gateway, 3).await;
        assert!(
            nodes.iter().all(|n| *n == victim),
            "idle jobs on the primary {victim}: {nodes:?}"
        );
    }

    // A ten-second job through each gateway at once: both gateways pick the primary.
    let in_flight: Vec<_> = (0..2)
        .map(|gateway| {
            let (client, urls) = (fleet.http.clone(), fleet.urls.clone());
            tokio::spawn(async move {
                let outcome = execute(&client, &urls, gateway, false, &sleeper(10.0)).await;
                (outcome, Instant::now())
            })
        })
        .collect();
    eventually(
        Duration::from_secs(10),
        "the victim reports a busy slot",
        async || fleet.node_info(0, &victim).await["slots_busy"].as_u64() > Some(0),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sandboxes = containers_of(&victim);
    let container = fleet.container(fleet.service_of(&victim));
    let killed = Instant::now();
    run(&["docker", "kill", &container], &[]).await;
    let mut lost = 0;
    for job in in_flight {
        let (outcome, answered_at) = job.await.expect("the job's task");
        if outcome.status == 502 {
            let answered = answered_at.duration_since(killed);
            eprintln!(
                "node_lost answered {answered:?} after the kill: {}",
                outcome.body
            );
            assert_eq!(outcome.code(), "node_lost", "{outcome:?}");
            assert!(
                outcome.body["detail"]
                    .as_str()
                    .unwrap_or("")
                    .contains(&victim),
                "{outcome:?}"
            );
            assert!(
                answered < Duration::from_secs(2),
                "node_lost within 2 s of the kill: {answered:?}"
            );
            lost += 1;
        } else {
            assert!(outcome.ok() && outcome.node() != victim, "{outcome:?}");
        }
    }
    let all_answered = killed.elapsed();
    eprintln!("{lost} in-flight job(s) lost; every in-flight job answered {all_answered:?} after the kill");
    assert!(lost >= 1, "the primary's in-flight jobs are lost");

    // Later jobs go elsewhere (both gateways), and both gateways mark it down.
    let nodes = fleet.jobs(6).await;
    assert!(
        nodes.iter().all(|n| *n != victim),
        "later jobs route around {victim}: {nodes:?}"
    );
    let down = fleet
        .until_state(&victim, "down", killed, Duration::from_secs(10))
        .await;
    eprintln!("killed {victim} marked down by the gateways after {down:?}");

    // Restarted, it reaps its orphans and rejoins both gateways; jobs come back to it.
    let started = Instant::now();
    run(&["docker", "start", &container], &[]).await;
    let rejoined = fleet
        .until_state(&victim, "ready", started, Duration::from_secs(30))
        .await;
    eprintln!("{victim} restarted: ready again on the gateways after {rejoined:?}");
    eventually(
        Duration::from_secs(15),
        "the killed agent's sandboxes are reaped",
        async || {
            let now = containers_of(&victim);
            sandboxes.iter().all(|old| !now.contains(old))
        },
    )
    .await;
    for gateway in 0..2 {
        let nodes = fleet.jobs_through(gateway, 3).await;
        assert!(
            nodes.iter().all(|n| *n == victim),
            "jobs back on {victim}: {nodes:?}"
        );
    }
    fleet.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_cut_off_is_down_within_3s_and_ready_within_3s_of_reconnecting() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::up("cut").await;
    let victim = primary(&fleet.nodes);
    let service = fleet.service_of(&victim);
    let container = fleet.container(service);
    let format = format!(
        "{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}",
        fleet.network
    );
    let ip = run(&["docker", "inspect", "-f", &format, &container], &[]).await;
    assert!(ip.starts_with(&fleet.subnet), "{service} at {ip}");

    let cut = Instant::now();
    run(
        &[
            "docker",
            "network",
            "disconnect",
            &fleet.network,
            &container,
        ],
        &[],
    )
    .await;
    let down = fleet
        .until_state(&victim, "down", cut, Duration::from_secs(10))
        .await;
    eprintln!("{victim} cut off: marked down by the two gateways after {down:?}");
    assert!(
        down.iter().all(|d| *d < Duration::from_secs(3)),
        "down within 3 s of the cut: {down:?}"
    );
    let nodes = fleet.jobs(6).await;
    assert!(
        nodes.iter().all(|n| *n != victim),
        "served elsewhere meanwhile: {nodes:?}"
    );

    let reconnected = Instant::now();
    run(
        &[
            "docker",
            "network",
            "connect",
            "--ip",
            &ip,
            "--alias",
            service,
            &fleet.network,
            &container,
        ],
        &[],
    )
    .await;
    let ready = fleet
        .until_state(&victim, "ready", reconnected, Duration::from_secs(10))
        .await;
    eprintln!("{victim} reconnected: ready again on the two gateways after {ready:?}");
    assert!(
        ready.iter().all(|d| *d < Duration::from_secs(3)),
        "ready within 3 s of reconnecting: {ready:?}"
    );
    // Its jobs come back to it, through both gateways.
    for gateway in 0..2 {
        let nodes = fleet.jobs_through(gateway, 3).await;
        assert!(
            nodes.iter().all(|n| *n == victim),
            "jobs back on {victim}: {nodes:?}"
        );
    }
    fleet.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_every_agent_under_steady_load_fails_no_request() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::up("roll").await;
    let rate = 20;
    let load = Load::start(&fleet, rate, false);
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (service, node) in AGENTS.iter().zip(&fleet.nodes) {
        let container = fleet.container(service);
        let stopping = Instant::now();
        run(&["docker", "stop", "-t", "45", &container], &[]).await;
        let stopped = stopping.elapsed();
        assert_eq!(
            fleet.exit_code(&container),
            "0",
            "{service} drained and exited cleanly"
        );
        let started = Instant::now();
        run(&["docker", "start", &container], &[]).await;
        let ready = fleet
            .until_state(node, "ready", started, Duration::from_secs(30))
            .await;
        eprintln!("{service} ({node}): SIGTERM to exit {stopped:?}; started, ready on the gateways after {ready:?}");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let elapsed = load.started.elapsed();
    let results = load.finish().await;
    let failed = summarize("rolling restart", &results);
    let expected = (elapsed.as_secs_f64() * f64::from(rate) * 0.9) as usize;
    assert!(
        results.len() >= expected,
        "{} jobs in {elapsed:?}",
        results.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed",
        failed.len(),
        results.len()
    );
    fleet.down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_whose_sandboxes_are_removed_behind_its_back_heals() {
    let _one = ONE_AT_A_TIME.lock().await;
    let fleet = Fleet::up("heal").await;
    let victim = primary(&fleet.nodes);
    assert_eq!(
        fleet.jobs_through(0, 1).await,
        std::slice::from_ref(&victim)
    );
    let removed = containers_of(&victim);
    assert!(!removed.is_empty(), "{victim} keeps warm sandboxes");
    let mut argv = vec!["docker", "rm", "-f"];
    argv.extend(removed.iter().map(String::as_str));
    run(&argv, &[]).await;
    eprintln!(
        "removed {} sandbox(es) of {victim} behind its back",
        removed.len()
    );

    // Every job still succeeds, on the victim (still the primary and ready).
    let started = Instant::now();
    let nodes = fleet.jobs_through(0, 6).await;
    eprintln!(
        "jobs after the removal ran on {nodes:?} in {:?}",
        started.elapsed()
    );
    assert!(nodes.iter().all(|n| *n == victim), "{nodes:?}");

    // Its pool is refilled with new containers and reported warm to both gateways.
    eventually(
        Duration::from_secs(30),
        "the victim's pool refilled",
        async || {
            let now = containers_of(&victim);
            let fresh = now.iter().any(|id| !removed.contains(id));
            let warm = async |gateway| {
                fleet.node_info(gateway, &victim).await["languages"][LANG]["warm"].as_u64()
                    > Some(0)
            };
            fresh && warm(0).await && warm(1).await
        },
    )
    .await;
    eprintln!("{victim} healed: warm again after {:?}", started.elapsed());
    assert_eq!(
        fleet.jobs_through(1, 1).await,
        std::slice::from_ref(&victim)
    );
    fleet.down().await;
}
