//! Fixtures for the integration tests: real agents (in-process or as separate processes) and
//! real gateways on loopback, against the real Docker engine. Each fixture owns a node id of its
//! own and removes every container labelled with it when it goes, even when a test panics.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::oneshot;

pub use reqwest::StatusCode;

mod cluster;
pub use cluster::{run_trivial, Cluster, ClusterSpec, TestGateway, ADMIN_KEY};

/// A node id unique to this test process and `name`.
pub fn node_id(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

/// Containers labelled with `node`, running or not.
pub fn containers_of(node: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=codefleet.node={node}"),
        ])
        .output()
        .expect("docker CLI runs");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// Removes every container labelled with `node` (blocking; for use in `Drop`), and the node's
/// socket directory, which an agent killed with -9 leaves behind.
pub fn remove_containers_of(node: &str) {
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join("codefleet-run").join(node));
    let ids = containers_of(node);
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .args(["rm", "-f"])
            .args(&ids)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// The workspace's target directory holding the test's sibling binaries.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe
        .parent()
        .and_then(|p| p.parent())
        .expect("target/<profile>/deps/..");
    let path = dir.join(name);
    assert!(path.is_file(), "{} is missing: run `cargo build --workspace --bins` first (the README's test command does)", path.display());
    path
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client")
}

/// An HTTP answer, decoded.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Answer {
    /// The problem code of an error answer.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

pub async fn send(req: reqwest::RequestBuilder) -> Answer {
    let resp = req.send().await.expect("request sent");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.expect("body read");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    Answer {
        status,
        headers,
        body,
    }
}

/// Talks to a base URL (an agent's or a gateway's).
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: Option<String>,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(url: &str) -> Api {
        Api {
            url: url.to_string(),
            token: None,
            http: client(),
        }
    }

    fn auth(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    pub async fn get(&self, path: &str) -> Answer {
        send(self.auth(self.http.get(format!("{}{path}", self.url)))).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Answer {
        send(self.auth(self.http.post(format!("{}{path}", self.url)).json(body))).await
    }

    pub async fn post_raw(&self, path: &str, body: impl Into<reqwest::Body>) -> Answer {
        let req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/json")
            .body(body);
        send(self.auth(req)).await
    }

    pub async fn delete(&self, path: &str) -> Answer {
        send(self.auth(self.http.delete(format!("{}{path}", self.url)))).await
    }

    /// `POST /v1/execute`, expecting `200`.
    pub async fn execute(&self, body: Value) -> Value {
        let a = self.post("/v1/execute", &body).await;
        assert_eq!(a.status, StatusCode::OK, "execute {body} answered {a:?}");
        a.body
    }

    /// Runs Python `source` and returns the answer.
    pub async fn python(&self, source: &str) -> Value {
        self.execute(json!({"language": "python", "source": source}))
            .await
    }

    /// Waits until `/readyz` answers 200 and every listed language is ready: every runtime of
    /// it the answer lists (so a request without `version` gets the newest).
    pub async fn wait_ready(&self, languages: &[&str], within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ready = self
                .http
                .get(format!("{}/readyz", self.url))
                .send()
                .await
                .map(|r| r.status().is_success())
                .unwrap_or(false);
            if ready {
                let langs = self.get("/v1/languages").await.body;
                let ready = |e: &Value| {
                    (e["image"] == "ready" || e["nodes_ready"].as_u64() > Some(0))
                        && e["version"] != ""
                };
                let ok = languages.iter().all(|l| {
                    langs.as_array().is_some_and(|a| {
                        let mut of = a.iter().filter(|e| e["name"] == *l).peekable();
                        of.peek().is_some() && of.all(ready)
                    })
                });
                if ok {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready within {within:?}",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Options for an agent started by a test.
#[derive(Clone)]
pub struct AgentOpts {
    /// Languages the test waits for (and, by default, the only ones enabled).
    pub languages: Vec<&'static str>,
    /// Pass `--enable` with `languages` (otherwise the whole catalog is served).
    pub enable_only_these: bool,
    pub args: Vec<String>,
    /// Environment of an agent run as its own process (e.g. `DOCKER_HOST`).
    pub env: Vec<(String, String)>,
}

impl AgentOpts {
    pub fn languages(languages: &[&'static str]) -> AgentOpts {
        AgentOpts {
            languages: languages.to_vec(),
            enable_only_these: true,
            args: vec!["--pool-min".into(), "1".into()],
            env: Vec::new(),
        }
    }

    /// Sets an environment variable of the agent process.
    pub fn env(mut self, name: &str, value: impl ToString) -> AgentOpts {
        self.env.push((name.to_string(), value.to_string()));
        self
    }

    /// Sets `flag` to `value`, replacing an earlier value of the same flag.
    pub fn arg(mut self, flag: &str, value: impl ToString) -> AgentOpts {
        match self.args.iter().position(|a| a == flag) {
            Some(i) => self.args[i + 1] = value.to_string(),
            None => {
                self.args.push(flag.to_string());
                self.args.push(value.to_string());
            }
        }
        self
    }

    /// The value given to `flag`, if any.
    pub fn value(&self, flag: &str) -> Option<&str> {
        let i = self.args.iter().position(|a| a == flag)?;
        self.args.get(i + 1).map(String::as_str)
    }

    fn argv(&self, node: &str, listen: &str) -> Vec<String> {
        let mut argv = vec![
            "codefleet-agent".to_string(),
            "--listen".into(),
            listen.into(),
            "--node-id".into(),
            node.into(),
        ];
        if self.enable_only_these {
            argv.push("--enable".into());
            argv.push(self.languages.join(","));
        }
        argv.extend(self.args.iter().cloned());
        argv
    }
}

/// An agent served in this test process.
pub struct TestAgent {
    pub api: Api,
    pub node: String,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestAgent {
    pub async fn start(name: &str, opts: AgentOpts) -> TestAgent {
        use clap_free::parse;
        let node = node_id(name);
        remove_containers_of(&node);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let config = parse(&opts.argv(&node, &addr.to_string()));
        let token = config.cluster_token.clone();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(codefleet_node_agent::serve(config, listener, async {
            let _ = rx.await;
        }));
        let mut api = Api::new(&format!("http://{addr}"));
        api.token = token;
        api.wait_ready(&opts.languages, Duration::from_secs(600))
            .await;
        TestAgent {
            api,
            node,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// Shuts the agent down as SIGTERM would and waits until it has cleaned up.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await
                .expect("agent task")
                .expect("agent stopped cleanly");
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        // A container the engine was still creating when the agent went may appear a moment
        // later: look again for a few seconds.
        remove_containers_of(&self.node);
        for _ in 0..8 {
            std::thread::sleep(Duration::from_millis(250));
            if containers_of(&self.node).is_empty() {
                continue;
            }
            remove_containers_of(&self.node);
        }
    }
}

mod clap_free {
    //! Builds an agent `Config` from argv the way the binary does.
    use clap::Parser;
    pub fn parse(argv: &[String]) -> codefleet_node_agent::Config {
        codefleet_node_agent::Config::try_parse_from(argv).expect("valid agent flags")
    }
}

/// An agent running as its own process (to be killed with -9 or sent SIGTERM).
pub struct AgentProcess {
    pub api: Api,
    pub node: String,
    pub child: Child,
}

impl AgentProcess {
    pub async fn spawn(node: &str, port: u16, opts: &AgentOpts) -> AgentProcess {
        let agent = AgentProcess::launch(node, port, opts);
        agent
            .api
            .wait_ready(&opts.languages, Duration::from_secs(600))
            .await;
        agent
    }

    /// Starts the process without waiting for it to be ready; its log goes to
    /// [`AgentProcess::log_path`].
    pub fn launch(node: &str, port: u16, opts: &AgentOpts) -> AgentProcess {
        let listen = format!("127.0.0.1:{port}");
        let argv = opts.argv(node, &listen);
        let log = std::fs::File::create(Self::log_path(node)).expect("log file");
        let child = Command::new(bin_path("codefleet-agent"))
            .args(&argv[1..])
            .env("RUST_LOG", "info")
            .envs(opts.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("agent process starts");
        let mut api = Api::new(&format!("http://{listen}"));
        api.token = opts.value("--cluster-token").map(str::to_string);
        AgentProcess {
            api,
            node: node.to_string(),
            child,
        }
    }

    /// Where the process started for `node` writes its log.
    pub fn log_path(node: &str) -> PathBuf {
        std::env::temp_dir().join(format!("{node}.log"))
    }

    /// The resident memory of the process, bytes.
    pub fn rss_bytes(&self) -> u64 {
        rss_of(self.child.id())
    }

    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `within`; returns its exit status.
    pub fn wait(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Like [`AgentProcess::wait`], without blocking the runtime's thread (for tests that serve
    /// a gateway in the same runtime).
    pub async fn exited(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_containers_of(&self.node);
    }
}

/// A free loopback port.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

/// Waits until `cond` holds, polling, at most `within`.
pub async fn eventually(within: Duration, what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits (a few seconds) until no container of any of `nodes` is left: stopped agents remove
/// their own, a killed one's are removed by the cluster fixture.
pub async fn assert_nothing_left(nodes: Vec<String>) {
    for node in nodes {
        eventually(
            Duration::from_secs(5),
            &format!("no container of {node} left"),
            async || containers_of(&node).is_empty(),
        )
        .await;
    }
}

/// Resident memory of process `pid`, bytes (from `/proc/<pid>/status`).
pub fn rss_of(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kib| kib * 1024)
}

/// Keeps one core busy while it lives, as another tenant of the machine would.
pub struct BusyCore {
    child: Child,
}

impl BusyCore {
    pub fn start() -> BusyCore {
        let child = Command::new("sh")
            .args(["-c", "while :; do :; done"])
            .stdout(Stdio::null())
            .spawn()
            .expect("sh runs");
        BusyCore { child }
    }
}

impl Drop for BusyCore {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP/1.1 answer read off a raw socket, up to the server closing the connection.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: u16,
    /// The status line and header fields, as sent.
    pub head: String,
    pub body: Value,
}

impl RawAnswer {
    /// The value of header field `name` (case-insensitive), if sent.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (field, value) = line.split_once(':')?;
            field.eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }

    /// The problem code of an error answer.
    pub fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

/// Writes `request` to `addr` (`host:port`) as raw bytes and reads the answer until the server
/// closes the connection, which it must do within `within`.
pub async fn raw_exchange(addr: &str, request: &[u8], within: Duration) -> RawAnswer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // The server may answer and close before it has read everything (a head it refuses).
    let _ = stream.write_all(request).await;
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(within, stream.read_to_end(&mut bytes)).await;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    assert!(
        read.is_ok(),
        "{addr} did not answer and close within {within:?}; it sent {text:?}"
    );
    parse_raw(&text)
}

/// Splits an HTTP/1.1 answer into its status, head and JSON body.
pub fn parse_raw(text: &str) -> RawAnswer {
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {text:?}"));
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    RawAnswer {
        status,
        head: head.to_string(),
        body,
    }
}
