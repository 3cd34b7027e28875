//! A cluster on loopback: a gateway served in the test process (restartable on its port) and
//! node agents as separate processes reporting to it, for tests that kill, drain, add and
//! restart parts of it. Also the ring every gateway builds, so tests can say where a job goes.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use clap::Parser;
use codefleet_gateway::routing::{NodeEntry, NodeId, RoutingTable};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::{
    eventually, free_port, node_id, remove_containers_of, AgentOpts, AgentProcess, Api, StatusCode,
};

/// The key a [`Cluster`]'s gateway takes for `/v1/nodes*`.
pub const ADMIN_KEY: &str = "test-admin-key";

/// A gateway served in this test process. It keeps its port across [`TestGateway::restart`].
pub struct TestGateway {
    pub addr: SocketAddr,
    pub config: codefleet_gateway::Config,
    running: Option<(oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
}

impl TestGateway {
    /// Serves a gateway on a free loopback port with `args` (flags as on its command line).
    pub async fn start(args: &[String]) -> TestGateway {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let argv = [
            "codefleet-gateway".to_string(),
            "--listen".into(),
            addr.to_string(),
        ]
        .into_iter()
        .chain(args.iter().cloned());
        let config = codefleet_gateway::Config::try_parse_from(argv).expect("valid gateway flags");
        let mut gateway = TestGateway {
            addr,
            config,
            running: None,
        };
        gateway.serve(listener);
        gateway
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(codefleet_gateway::serve(
            self.config.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
        ));
        self.running = Some((stop, task));
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client presenting `key` as its Bearer token (none: no `Authorization` header).
    pub fn api(&self, key: Option<&str>) -> Api {
        let mut api = Api::new(&self.url());
        api.token = key.map(str::to_string);
        api
    }

    /// Stops serving as SIGTERM would: open requests finish, then the port is free.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            let _ = stop.send(());
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the gateway stops within 30 s")
                .expect("gateway task")
                .expect("the gateway stopped cleanly");
        }
    }

    /// Stops it and serves a new one, with no state carried over, on the same port.
    pub async fn restart(&mut self) {
        self.stop().await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match rebind(self.addr) {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    eprintln!("listening on {} again: {error}; retrying", self.addr);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(error) => panic!("cannot listen on {} again: {error}", self.addr),
            }
        };
        self.serve(listener);
    }
}

/// Binds `addr` again right after the previous listener closed (its connections may linger in
/// TIME_WAIT: `SO_REUSEADDR` lets the new listener in, as it would a restarted process).
fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        if let Some((stop, _)) = self.running.take() {
            let _ = stop.send(());
        }
    }
}

/// What a [`Cluster`] starts with; see [`Cluster::named`].
pub struct ClusterSpec {
    test: String,
    names: Vec<String>,
    agent: AgentOpts,
    gateway_args: Vec<String>,
    distinct_primaries: bool,
}

impl ClusterSpec {
    /// `n` agents, named `a`, `b`, `c`, ...
    pub fn agents(mut self, n: usize) -> ClusterSpec {
        self.names = (b'a'..)
            .take(n)
            .map(|c| char::from(c).to_string())
            .collect();
        self
    }

    /// The languages every agent serves (and that the cluster waits for).
    pub fn languages(mut self, languages: &[&'static str]) -> ClusterSpec {
        let args = std::mem::take(&mut self.agent.args);
        self.agent = AgentOpts {
            args,
            ..AgentOpts::languages(languages)
        };
        self
    }

    /// A flag for every agent.
    pub fn agent_arg(mut self, flag: &str, value: impl ToString) -> ClusterSpec {
        self.agent = self.agent.arg(flag, value);
        self
    }

    /// A flag for the gateway.
    /// Sets an environment variable of every agent process (e.g. `RUST_LOG`).
    pub fn agent_env(mut self, name: &str, value: impl ToString) -> ClusterSpec {
        self.agent = self.agent.env(name, value);
        self
    }

    pub fn gateway_arg(mut self, flag: &str, value: impl ToString) -> ClusterSpec {
        self.gateway_args.push(flag.to_string());
        self.gateway_args.push(value.to_string());
        self
    }

    /// Picks the agents' names so that no two of the languages share a primary node. Node ids
    /// carry the test's process id, so the ring differs from run to run; this makes "the other
    /// language is not affected" something a test can always check.
    pub fn distinct_primaries(mut self) -> ClusterSpec {
        self.distinct_primaries = true;
        self
    }

    /// Starts the gateway, then the agents (in parallel), and waits until the gateway lists
    /// every agent ready with every language.
    pub async fn start(self) -> Cluster {
        let token = format!("cluster-token-{}", node_id(&self.test));
        let mut gateway_args = vec![
            "--cluster-token".to_string(),
            token.clone(),
            "--admin-key".to_string(),
            ADMIN_KEY.to_string(),
        ];
        gateway_args.extend(self.gateway_args);
        let gateway = TestGateway::start(&gateway_args).await;
        let agent = self
            .agent
            .arg("--gateway", gateway.url())
            .arg("--cluster-token", &token);
        let mut cluster = Cluster {
            test: self.test,
            api: gateway.api(None),
            admin: gateway.api(Some(ADMIN_KEY)),
            gateway,
            agent,
            members: Vec::new(),
        };
        let names = cluster.pick_names(&self.names, self.distinct_primaries);
        let spawned = names.iter().map(|name| {
            let node = cluster.node_id(name);
            let opts = cluster.agent.clone();
            async move { AgentProcess::spawn(&node, free_port(), &opts).await }
        });
        for process in futures_util::future::join_all(spawned).await {
            cluster.members.push(Member {
                process,
                gone: false,
            });
        }
        let nodes = cluster.node_ids();
        eventually(
            Duration::from_secs(30),
            "the gateway lists every agent ready",
            async || cluster.all_serving(&nodes).await,
        )
        .await;
        cluster
    }
}

struct Member {
    process: AgentProcess,
    /// Killed by the test (out of the ring; its leftovers are ours to remove), or stopped.
    gone: bool,
}

/// A gateway and the agents reporting to it. Every agent's node id comes from [`node_id`], so
/// the test owns its containers; dropping the cluster (say, when a test panics) kills the
/// agents and removes their containers, as each [`AgentProcess`] does.
pub struct Cluster {
    test: String,
    /// A client without an API key (the public routes are open unless keys are configured).
    pub api: Api,
    /// A client with the admin key.
    pub admin: Api,
    pub gateway: TestGateway,
    /// How agents are started, pointed at the gateway and with the cluster token.
    agent: AgentOpts,
    members: Vec<Member>,
}

impl Cluster {
    /// A cluster for the test `test`: its name prefixes every node id.
    pub fn named(test: &str) -> ClusterSpec {
        ClusterSpec {
            test: test.to_string(),
            names: vec!["a".to_string()],
            agent: AgentOpts::languages(&["python"]),
            gateway_args: Vec::new(),
            distinct_primaries: false,
        }
    }

    /// The node id of the agent called `name` in this cluster.
    pub fn node_id(&self, name: &str) -> String {
        node_id(&format!("{}-{name}", self.test))
    }

    /// Every agent's node id, killed ones included.
    pub fn node_ids(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.process.node.clone())
            .collect()
    }

    /// The node ids of the agents still running.
    pub fn live_node_ids(&self) -> Vec<String> {
        let live = self.members.iter().filter(|m| !m.gone);
        live.map(|m| m.process.node.clone()).collect()
    }

    /// The agent with node id `node`.
    pub fn agent(&self, node: &str) -> &AgentProcess {
        &self.member(node).process
    }

    fn member(&self, node: &str) -> &Member {
        let found = self.members.iter().find(|m| m.process.node == node);
        found.unwrap_or_else(|| panic!("no agent {node} in this cluster"))
    }

    /// The languages every agent serves.
    pub fn languages(&self) -> &[&'static str] {
        &self.agent.languages
    }

    /// The ring the gateway builds over `nodes` (ids): the same bytes hashed the same way.
    pub fn ring(&self, nodes: &[String]) -> RoutingTable<()> {
        let entries = nodes.iter().map(|id| NodeEntry {
            id: NodeId::new(id),
            slots_total: 1,
            languages: BTreeMap::new(),
            load: (),
        });
        RoutingTable::new(self.gateway.config.vnodes, entries.collect())
    }

    /// The node that runs `language`'s jobs while none is busy, among `nodes`.
    pub fn primary_among(&self, language: &str, nodes: &[String]) -> String {
        let ring = self.ring(nodes);
        ring.primary(language)
            .expect("a non-empty ring")
            .to_string()
    }

    /// `language`'s primary among the agents still running.
    pub fn primary(&self, language: &str) -> String {
        self.primary_among(language, &self.live_node_ids())
    }

    /// The share of the key space each running agent owns, as `/v1/nodes` should report it.
    pub fn ring_shares(&self) -> HashMap<String, f64> {
        let shares = self.ring(&self.live_node_ids()).shares();
        shares
            .into_iter()
            .map(|(id, share)| (id.to_string(), share))
            .collect()
    }

    /// `names`, or the first variant of them (`a1`, `b1`, ...) under which the cluster's
    /// languages all have different primaries, when `distinct` is asked for.
    fn pick_names(&self, names: &[String], distinct: bool) -> Vec<String> {
        for round in 0..100 {
            let suffix = if round == 0 {
                String::new()
            } else {
                round.to_string()
            };
            let candidate: Vec<String> = names.iter().map(|n| format!("{n}{suffix}")).collect();
            let ids: Vec<String> = candidate.iter().map(|n| self.node_id(n)).collect();
            let mut primaries: Vec<String> = self
                .languages()
                .iter()
                .map(|l| self.primary_among(l, &ids))
                .collect();
            primaries.sort();
            primaries.dedup();
            if !distinct || primaries.len() == self.languages().len() {
                return candidate;
            }
        }
        panic!(
            "no names for {names:?} give {:?} distinct primaries",
            self.languages()
        )
    }

    /// A name for a new agent that, once it joins, is `language`'s primary.
    pub fn name_owning(&self, language: &str) -> String {
        let live = self.live_node_ids();
        (0..1000)
            .map(|i| format!("new{i}"))
            .find(|name| {
                let mut nodes = live.clone();
                nodes.push(self.node_id(name));
                self.primary_among(language, &nodes) == self.node_id(name)
            })
            .expect("some name owns the language")
    }

    /// Starts another agent called `name`, pointed at the gateway; returns its node id once the
    /// agent itself is ready (not waiting for the gateway to list it).
    pub async fn join(&mut self, name: &str) -> String {
        let node = self.node_id(name);
        let process = AgentProcess::spawn(&node, free_port(), &self.agent).await;
        self.members.push(Member {
            process,
            gone: false,
        });
        node
    }

    /// `kill -9` on the agent `node`; returns once the process is gone.
    pub async fn kill(&mut self, node: &str) {
        let member = self
            .members
            .iter_mut()
            .find(|m| m.process.node == node)
            .unwrap_or_else(|| panic!("no agent {node} in this cluster"));
        member.process.signal("KILL");
        member.gone = true;
        let exited = member.process.exited(Duration::from_secs(10)).await;
        assert!(exited.is_some(), "{node} survived kill -9");
    }

    /// SIGTERM to the agent `node`; returns once it has drained and exited (cleanly).
    pub async fn terminate(&mut self, node: &str) {
        let member = self
            .members
            .iter_mut()
            .find(|m| m.process.node == node)
            .unwrap_or_else(|| panic!("no agent {node} in this cluster"));
        member.process.signal("TERM");
        member.gone = true;
        let status = member.process.exited(Duration::from_secs(45)).await;
        let status = status.unwrap_or_else(|| panic!("{node} did not exit on SIGTERM"));
        assert!(status.success(), "{node} exited with {status} on SIGTERM");
    }

    /// Starts the agent `node` again (after [`Cluster::kill`] or [`Cluster::terminate`]): a new process with the same node
    /// id and flags (so the same state dir), on a new port; returns once the agent is ready.
    pub async fn revive(&mut self, node: &str) {
        let at = self.members.iter().position(|m| m.process.node == node);
        let at = at.unwrap_or_else(|| panic!("no agent {node} in this cluster"));
        assert!(self.members[at].gone, "{node} is still running");
        // The old process's cleanup (it removes the node's containers) runs before the new one
        // makes any.
        drop(self.members.remove(at));
        let process = AgentProcess::spawn(node, free_port(), &self.agent).await;
        self.members.push(Member {
            process,
            gone: false,
        });
    }

    /// Restarts the gateway on its port (no state carried over), with fresh clients.
    pub async fn restart_gateway(&mut self) {
        self.gateway.restart().await;
        // The old clients' pooled connections went with the old gateway.
        self.api = self.gateway.api(self.api.token.as_deref());
        self.admin = self.gateway.api(Some(ADMIN_KEY));
    }

    /// `GET /v1/nodes`.
    pub async fn nodes(&self) -> Vec<Value> {
        let answer = self.admin.get("/v1/nodes").await;
        assert_eq!(answer.status, StatusCode::OK, "GET /v1/nodes: {answer:?}");
        answer.body.as_array().cloned().unwrap_or_default()
    }

    /// The gateway's view of `node`, or `Value::Null` when it does not list it.
    pub async fn node_info(&self, node: &str) -> Value {
        let nodes = self.nodes().await;
        nodes
            .into_iter()
            .find(|n| n["id"] == node)
            .unwrap_or(Value::Null)
    }

    /// True when the gateway lists `node` as ready with each of the cluster's languages ready.
    pub async fn is_serving(&self, node: &str) -> bool {
        let info = self.node_info(node).await;
        info["state"] == "ready"
            && self
                .languages()
                .iter()
                .all(|l| info["languages"][l]["image"] == "ready")
    }

    /// The versions `node` itself serves of the cluster's languages, as (name, version); `None`
    /// while one of their runtimes is not served yet (image or version still coming).
    async fn served_by(&self, node: &str) -> Option<Vec<(String, String)>> {
        let own = self.agent(node).api.get("/v1/languages").await.body;
        let languages = self.languages();
        let mut served = Vec::new();
        for r in own.as_array()? {
            if !languages.iter().any(|l| r["name"] == *l) {
                continue;
            }
            let version = r["version"].as_str().filter(|v| !v.is_empty())?;
            if r["image"] != "ready" {
                return None;
            }
            served.push((r["name"].as_str()?.to_string(), version.to_string()));
        }
        Some(served)
    }

    /// Every node serves every runtime of the cluster's languages, and the gateway knows it:
    /// it lists each of those runtimes (by version) ready on every node. An agent serves a
    /// runtime up to one report before the gateway hears of it, and until then the gateway
    /// would resolve a request without `version` to an older runtime.
    async fn all_serving(&self, nodes: &[String]) -> bool {
        let mut wanted = Vec::new();
        for node in nodes {
            if !self.is_serving(node).await {
                return false;
            }
            match self.served_by(node).await {
                Some(served) => wanted.extend(served),
                None => return false,
            }
        }
        let listed = self.admin.get("/v1/languages").await.body;
        let Some(listed) = listed.as_array() else {
            return false;
        };
        wanted.iter().all(|(name, version)| {
            listed.iter().any(|r| {
                r["name"] == *name
                    && r["version"] == *version
                    && r["nodes_ready"].as_u64() >= Some(nodes.len() as u64)
            })
        })
    }

    /// Waits until the gateway lists every running agent as ready again.
    pub async fn wait_all_serving(&self, within: Duration) {
        let nodes = self.live_node_ids();
        eventually(within, "the gateway lists every agent ready", async || {
            self.all_serving(&nodes).await
        })
        .await;
    }

    /// Waits until `node`'s report shows a job running on it.
    pub async fn wait_busy(&self, node: &str) {
        eventually(
            Duration::from_secs(15),
            &format!("{node} reports a busy slot"),
            async || self.node_info(node).await["slots_busy"].as_u64() > Some(0),
        )
        .await;
    }

    /// Runs `n` trivial jobs in `language`, one after the other; returns the node of each.
    pub async fn run_one_at_a_time(&self, language: &str, n: usize) -> Vec<String> {
        let mut nodes = Vec::new();
        for _ in 0..n {
            nodes.push(run_trivial(&self.api, language).await);
        }
        nodes
    }

    /// Stops the cluster the way an operator would: SIGTERM to every running agent (each
    /// drains and removes its containers before it exits), then the gateway. Agents the test
    /// killed cannot clean up after themselves: their leftovers are removed here. Returns every
    /// node id, for the test to check that nothing of them is left before the fixtures' own
    /// cleanup runs (on drop).
    pub async fn stop(&mut self) -> Vec<String> {
        let (gone, running): (Vec<&mut Member>, Vec<&mut Member>) =
            self.members.iter_mut().partition(|m| m.gone);
        // A container a killed agent was creating as it died can appear after its death: its
        // leftovers are removed until the engine has had a few seconds to finish such a create.
        if !gone.is_empty() {
            let settled = Instant::now() + Duration::from_secs(3);
            loop {
                for member in &gone {
                    remove_containers_of(&member.process.node);
                }
                if Instant::now() >= settled {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        for member in &running {
            member.process.signal("TERM");
        }
        for member in running {
            let node = member.process.node.clone();
            let status = member.process.exited(Duration::from_secs(45)).await;
            let status = status.unwrap_or_else(|| panic!("{node} did not exit on SIGTERM"));
            assert!(status.success(), "{node} exited with {status} on SIGTERM");
            member.gone = true;
        }
        self.gateway.stop().await;
        self.node_ids()
    }
}

/// Runs a job that prints a line in `language` (python or javascript) and returns the node
/// that ran it.
pub async fn run_trivial(api: &Api, language: &str) -> String {
    let source = match language {
        "python" => "print('hello')",
        "javascript" => "console.log('hello')",
        other => panic!("no trivial job in {other}"),
    };
    let answer = api
        .execute(json!({"language": language, "source": source}))
        .await;
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(answer["run"]["stdout"], "hello\n", "{answer}");
    answer["node"]
        .as_str()
        .expect("the node that ran it")
        .to_string()
}
