//! Monitoring, for real: Debian's Prometheus scrapes a real cluster (a gateway and an agent with
//! python on the real Docker engine) with the alert rules of `deploy/prometheus/` loaded, and its
//! HTTP API answers what an operator asks: request rates, latency quantiles, pool sizes, node
//! and image states, the rules healthy and silent. Then every query of the Grafana dashboard
//! (`deploy/grafana/codefleet.json`) is run against it and must parse and return data.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use codefleet_tests::{free_port, Api, Cluster, StatusCode};
use serde_json::{json, Value};

const PROMETHEUS: &str = "/usr/bin/prometheus";

/// Queries the dashboard's variables stand for, and the window `$__rate_interval` becomes.
const SUBSTITUTIONS: [(&str, &str); 5] = [
    ("$__rate_interval", "1m"),
    ("$__interval", "1m"),
    ("$__range", "5m"),
    ("$node", ".*"),
    ("$language", ".*"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_the_fleet_and_every_dashboard_query_has_data() {
    // One slot, so concurrent jobs wait at the gateway (the wait-queue series) and queue.
    let mut cluster = Cluster::named("prom")
        .languages(&["python"])
        .agent_arg("--slots", 1)
        .start()
        .await;
    let node = cluster.node_ids().remove(0);
    let agent_url = cluster.agent(&node).api.url.clone();
    let prometheus = Prometheus::start(&cluster.gateway.url(), &agent_url, &node).await;
    let prom = &prometheus.api;

    // Both targets scraped before any job, so the jobs below show up as increases.
    prometheus
        .wait_for(
            "both targets up",
            r#"sum(up{job=~"codefleet-gateway|codefleet-agent"})"#,
            |v| v == 2.0,
        )
        .await;

    // Jobs in two rounds a scrape apart, a client error, and concurrent jobs that must wait.
    for _ in 0..3 {
        sleep_job(&cluster.api, 0.05).await;
    }
    prometheus
        .wait_for(
            "the first jobs scraped from the gateway",
            r#"sum(codefleet_requests_total{job="codefleet-gateway",route="/v1/execute",status="200"})"#,
            |v| v >= 3.0,
        )
        .await;
    let unknown = cluster
        .api
        .post(
            "/v1/execute",
            &json!({"language": "cobol", "source": "DISPLAY 'x'"}),
        )
        .await;
    assert_eq!(unknown.status, StatusCode::BAD_REQUEST, "{unknown:?}");
    wait_at_gateway(&cluster).await;
    queue_at_agent(&cluster.agent(&node).api).await;
    for _ in 0..3 {
        sleep_job(&cluster.api, 0.3).await;
    }

    // Request rates, at the gateway and on the node.
    prometheus
        .wait_for(
            "a rate of execute requests at the gateway",
            r#"sum(rate(codefleet_requests_total{route="/v1/execute",status="200"}[1m]))"#,
            |v| v > 0.0,
        )
        .await;
    prometheus
        .wait_for(
            "a rate of jobs run on the node",
            &format!(r#"sum(rate(codefleet_executions_total{{node="{node}",status="ok"}}[1m]))"#),
            |v| v > 0.0,
        )
        .await;
    prometheus
        .wait_for(
            "the unknown language counted by code",
            r#"sum(codefleet_requests_total{status="400",code="unknown_language"})"#,
            |v| v >= 1.0,
        )
        .await;

    // Latency quantiles: finite, ordered, and at least the 0.3 s the slow jobs slept.
    let quantile = |q: f64, metric: &str| {
        format!(
            r#"histogram_quantile({q}, sum by (le) (rate({metric}_bucket{{language="python"}}[1m])))"#
        )
    };
    for metric in [
        "codefleet_job_duration_seconds",
        "codefleet_execution_duration_seconds",
    ] {
        prometheus
            .wait_for(
                &format!("{metric}'s p99 above the slow jobs' sleep"),
                &quantile(0.99, metric),
                |v| v.is_finite() && v >= 0.25,
            )
            .await;
        let p50 = prometheus.value(&quantile(0.5, metric)).await;
        let p99 = prometheus.value(&quantile(0.99, metric)).await;
        assert!(
            p50.is_some_and(|p50| p50 > 0.0 && p99.is_some_and(|p99| p50 <= p99 && p99 < 30.0)),
            "{metric}: p50 {p50:?}, p99 {p99:?}"
        );
    }

    // Pool sizes, from the agent and as the gateway sees them.
    prometheus
        .wait_for(
            "a warm python sandbox on the agent",
            &format!(r#"codefleet_warm_sandboxes{{node="{node}",language="python"}}"#),
            |v| v >= 1.0,
        )
        .await;
    prometheus
        .wait_for(
            "a warm python sandbox in the gateway's view",
            &format!(r#"codefleet_node_warm_sandboxes{{node="{node}",language="python"}}"#),
            |v| v >= 1.0,
        )
        .await;

    // Node states: one node known, and it is ready.
    let one = |v: f64| v == 1.0;
    let zero = |v: f64| v == 0.0;
    prometheus
        .wait_for(
            "one ready node",
            r#"codefleet_ring_members{state="ready"}"#,
            one,
        )
        .await;
    for state in ["draining", "down"] {
        let query = format!(r#"codefleet_ring_members{{state="{state}"}}"#);
        prometheus
            .wait_for(&format!("no {state} node"), &query, zero)
            .await;
    }
    let ready = format!(r#"codefleet_node_state{{node="{node}",state="ready"}}"#);
    prometheus.wait_for("our node ready", &ready, one).await;
    let slots = format!(r#"codefleet_node_slots{{node="{node}"}}"#);
    prometheus.wait_for("its one slot", &slots, one).await;

    // Image states: python ready on the node (and prepared once on the agent, without failure).
    let image =
        format!(r#"codefleet_node_image_state{{node="{node}",language="python",state="ready"}}"#);
    prometheus
        .wait_for("python's image ready", &image, one)
        .await;
    let failed = format!(r#"sum(codefleet_node_image_state{{node="{node}",state="failed"}})"#);
    prometheus.wait_for("no failed image", &failed, zero).await;
    let prepared =
        format!(r#"codefleet_image_prepare_seconds_count{{node="{node}",language="python"}}"#);
    prometheus
        .wait_for("python's image prepared", &prepared, |v| v >= 1.0)
        .await;

    // The alert rules: all loaded, evaluated without error, none firing on a healthy fleet.
    prometheus.check_rules().await;

    // Every query of the dashboard parses and has data; so do its variables.
    let dashboard = workspace_file("deploy/grafana/codefleet.json");
    let dashboard: Value = serde_json::from_str(&read(&dashboard)).expect("dashboard is JSON");
    let mut exprs = Vec::new();
    collect_exprs(&dashboard["panels"], &mut exprs);
    let panels = count_panels(&dashboard["panels"]);
    assert!(
        exprs.len() >= panels && panels >= 10,
        "{panels} panels, {} queries",
        exprs.len()
    );
    for (title, expr) in &exprs {
        let query = substitute(expr);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = prometheus.query(&query).await;
            assert_eq!(
                answer["status"], "success",
                "panel {title:?}: {query} does not parse: {answer}"
            );
            let result = answer["data"]["result"].as_array();
            if result.is_some_and(|r| !r.is_empty()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "panel {title:?}: {query} returns no data: {answer}"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        let Some(definition) = variable["definition"].as_str() else {
            continue;
        };
        let (metric, label) = label_values(definition);
        let path = format!("/api/v1/label/{label}/values?match[]={}", encode(metric));
        let values = prom.get(&path).await;
        let values = values.body["data"].as_array().cloned().unwrap_or_default();
        let wanted = if label == "node" {
            node.as_str()
        } else {
            "python"
        };
        assert!(
            values.iter().any(|v| v == wanted),
            "variable {definition}: {values:?} lacks {wanted}"
        );
    }
    eprintln!(
        "checked {} dashboard queries in {panels} panels against Prometheus",
        exprs.len()
    );

    drop(prometheus);
    cluster.stop().await;
}

/// Runs a python job that sleeps `seconds`.
async fn sleep_job(api: &Api, seconds: f64) {
    let answer = api
        .execute(json!({"language": "python", "source": format!("import time; time.sleep({seconds}); print('ok')")}))
        .await;
    assert_eq!(answer["status"], "ok", "{answer}");
}

/// Sends jobs four at a time to the one-slot node until one of them has waited at the gateway
/// for room (its wait-queue gauge then exists).
async fn wait_at_gateway(cluster: &Cluster) {
    let metrics = Api::new(&cluster.gateway.url());
    for _ in 0..10 {
        let jobs = (0..4).map(|_| sleep_job(&cluster.api, 0.3));
        futures_util::future::join_all(jobs).await;
        if has_series(&metrics, "codefleet_wait_queue_depth").await {
            return;
        }
    }
    panic!("no job waited at the gateway for the one-slot node in 10 rounds of 4");
}

/// Sends jobs three at a time straight to the one-slot agent until one of them has queued there
/// for its slot (its queue-depth gauge then exists).
async fn queue_at_agent(agent: &Api) {
    for _ in 0..10 {
        let jobs = (0..3).map(|_| sleep_job(agent, 0.3));
        futures_util::future::join_all(jobs).await;
        if has_series(agent, "codefleet_queue_depth").await {
            return;
        }
    }
    panic!("no job queued on the one-slot agent in 10 rounds of 3");
}

/// True when `/metrics` of `api` has a sample of `metric`.
async fn has_series(api: &Api, metric: &str) -> bool {
    let text = api.get("/metrics").await.body;
    let text = text.as_str().unwrap_or_default();
    text.lines().any(|l| {
        l.strip_prefix(metric)
            .is_some_and(|rest| rest.starts_with([' ', '{']))
    })
}

/// A Prometheus server of our own, on a free loopback port, scraping the cluster every second
/// with deploy/prometheus/alerts.yml loaded. Killed, and its folder removed, when dropped.
struct Prometheus {
    api: Api,
    child: Child,
    dir: PathBuf,
}

impl Prometheus {
    async fn start(gateway: &str, agent: &str, node: &str) -> Prometheus {
        assert!(
            Path::new(PROMETHEUS).is_file(),
            "{PROMETHEUS} is missing: run .ci/run, or `apt-get install prometheus` (Debian's package)"
        );
        let dir = std::env::temp_dir().join(format!("codefleet-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("prometheus folder");
        let rules = workspace_file("deploy/prometheus/alerts.yml");
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {rules}\n\
             scrape_configs:\n\
             \x20 - job_name: codefleet-gateway\n    static_configs:\n      - targets: ['{gateway}']\n\
             \x20 - job_name: codefleet-agent\n    static_configs:\n      - targets: ['{agent}']\n        labels:\n          node: {node}\n",
            rules = rules.display(),
            gateway = host_port(gateway),
            agent = host_port(agent),
        );
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config).expect("prometheus.yml");
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).expect("log file");
        let child = Command::new(PROMETHEUS)
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus starts");
        let mut prometheus = Prometheus {
            api: Api::new(&format!("http://127.0.0.1:{port}")),
            child,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = prometheus.child.try_wait() {
                panic!("prometheus exited with {status}: {}", prometheus.log());
            }
            let ready = prometheus
                .api
                .http
                .get(format!("{}/-/ready", prometheus.api.url))
                .send()
                .await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return prometheus;
            }
            assert!(
                Instant::now() < deadline,
                "prometheus not ready within 60 s: {}",
                prometheus.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("prometheus.log")).unwrap_or_default()
    }

    /// `GET /api/v1/query` (an instant query, now); the whole answer.
    async fn query(&self, query: &str) -> Value {
        let answer = self
            .api
            .get(&format!("/api/v1/query?query={}", encode(query)))
            .await;
        assert!(
            answer.status == StatusCode::OK || answer.status == StatusCode::BAD_REQUEST,
            "{query}: {answer:?}"
        );
        answer.body
    }

    /// The value of a query that must yield one sample, or None when it yields none.
    async fn value(&self, query: &str) -> Option<f64> {
        let answer = self.query(query).await;
        assert_eq!(answer["status"], "success", "{query}: {answer}");
        let result = answer["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(result.len() <= 1, "{query}: more than one sample: {answer}");
        let sample = result.first()?;
        let text = sample["value"][1].as_str().expect("sample value");
        Some(text.parse().expect("a number"))
    }

    /// Polls `query` (one sample) until `ok` holds of its value, for at most 60 s.
    async fn wait_for(&self, what: &str, query: &str, ok: impl Fn(f64) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let value = self.value(query).await;
            if value.is_some_and(&ok) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{query}` is {value:?} after 60 s"
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Every alert of alerts.yml is loaded and evaluated with health "ok"; none fires.
    async fn check_rules(&self) {
        let alerts = read(&workspace_file("deploy/prometheus/alerts.yml"));
        let expected = alerts
            .lines()
            .filter(|l| l.trim_start().starts_with("- alert:"))
            .count();
        assert!(expected > 0, "no alert in alerts.yml");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self.api.get("/api/v1/rules").await;
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
            let rules: Vec<Value> = answer.body["data"]["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
                .collect();
            let healthy = rules.iter().filter(|r| r["health"] == "ok").count();
            let broken: Vec<&Value> = rules.iter().filter(|r| r["health"] == "err").collect();
            assert!(broken.is_empty(), "rules failing to evaluate: {broken:?}");
            let firing: Vec<&Value> = rules.iter().filter(|r| r["state"] == "firing").collect();
            assert!(
                firing.is_empty(),
                "alerts firing on a healthy fleet: {firing:?}"
            );
            if rules.len() == expected && healthy == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{healthy} of {expected} rules evaluated ok ({} loaded): {}",
                rules.len(),
                answer.body
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn workspace_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `http://127.0.0.1:7001` → `127.0.0.1:7001`.
fn host_port(url: &str) -> &str {
    url.trim_start_matches("http://").trim_end_matches('/')
}

/// Every (panel title, query) of `panels`, rows' nested panels included.
fn collect_exprs(panels: &Value, out: &mut Vec<(String, String)>) {
    for panel in panels.as_array().into_iter().flatten() {
        let title = panel["title"].as_str().unwrap_or_default();
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str();
            let expr = expr.unwrap_or_else(|| panic!("panel {title:?}: a target without expr"));
            out.push((title.to_string(), expr.to_string()));
        }
        collect_exprs(&panel["panels"], out);
    }
}

/// Panels that show data (not rows), nested ones included.
fn count_panels(panels: &Value) -> usize {
    panels
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| usize::from(p["type"] != "row") + count_panels(&p["panels"]))
        .sum()
}

/// A dashboard query with Grafana's variables replaced by what they mean with "All" chosen.
fn substitute(expr: &str) -> String {
    let mut query = expr.to_string();
    for (variable, value) in SUBSTITUTIONS {
        query = query.replace(variable, value);
    }
    assert!(!query.contains('$'), "an unknown variable in {expr}");
    query
}

/// `label_values(metric, label)` → (metric, label).
fn label_values(definition: &str) -> (&str, &str) {
    let inner = definition
        .strip_prefix("label_values(")
        .and_then(|d| d.strip_suffix(')'))
        .unwrap_or_else(|| panic!("variable {definition:?} is not label_values(metric, label)"));
    let (metric, label) = inner.split_once(',').expect("label_values(metric, label)");
    (metric.trim(), label.trim())
}

/// Percent-encodes a query parameter's value.
fn encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
