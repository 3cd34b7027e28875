//! What the benches share: statistics and the table they print, the catalog's runtimes as the
//! benches run them (image, file, command lines, environment), containers set up like the
//! agent's sandboxes for `docker exec` and the in-container floor, the agent's HTTP API, the
//! machine line. Each bench uses part of it.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bollard::container::LogOutput;
use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, ResourcesUlimits};
use bollard::query_parameters::RemoveContainerOptionsBuilder;
use futures_util::StreamExt;
use serde_json::{json, Value};

use codefleet_node_agent::agent::SANDBOX_OVERHEAD_BYTES;
use codefleet_node_agent::catalog::Language;
use codefleet_node_agent::engine::{LABEL_KIND, LABEL_LANGUAGE, LABEL_NODE};
use codefleet_node_agent::images::Recipe;
use codefleet_shared::{ExecuteResponse, ResolvedLimits, Status};
use codefleet_tests::remove_containers_of;

/// The user the bench's own containers run programs as (the images' `runner`).
pub const JOB_USER: &str = "10001:10001";
/// No single job, request or Docker call of the bench may take longer than this.
pub const JOB_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause before every sequential sample, whatever its path: the previous sample's aftermath
/// (dockerd and the shim finishing an exec or a removal, a sandbox's reset) must not fall into
/// the next one's time.
pub const SETTLE: Duration = Duration::from_millis(30);

// ---------------------------------------------------------------------------------------------
// Statistics and the table.

/// Samples of one quantity, summarised by nearest-rank percentiles (with fewer than 100 samples
/// p99 is the maximum).
#[derive(Default, Clone)]
pub struct Stats(pub Vec<f64>);

impl Stats {
    pub fn push(&mut self, v: f64) {
        self.0.push(v);
    }

    pub fn n(&self) -> usize {
        self.0.len()
    }

    pub fn pct(&self, p: f64) -> f64 {
        if self.0.is_empty() {
            return f64::NAN;
        }
        let mut sorted = self.0.clone();
        sorted.sort_by(f64::total_cmp);
        let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
        sorted[rank.min(sorted.len()) - 1]
    }

    pub fn p50(&self) -> f64 {
        self.pct(50.0)
    }

    pub fn p99(&self) -> f64 {
        self.pct(99.0)
    }
}

/// A number for the table: `-` when unknown, fewer decimals as it grows.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        "-".to_string()
    } else if v.abs() >= 1_000.0 {
        format!("{v:.0}")
    } else if v.abs() >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        f64::NAN
    }
}

pub fn times(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.2}x")
    } else {
        "-".to_string()
    }
}

#[derive(Default, Clone)]
pub struct Row {
    pub id: String,
    pub path: String,
    pub lang: String,
    pub n: String,
    pub p50: String,
    pub p99: String,
    pub unit: String,
    pub ratio: String,
    pub note: String,
}

impl Row {
    pub fn new(id: &str, path: &str, lang: &str) -> Row {
        Row {
            id: id.to_string(),
            path: path.to_string(),
            lang: lang.to_string(),
            ..Row::default()
        }
    }

    pub fn stats(mut self, s: &Stats, unit: &str) -> Row {
        self.n = s.n().to_string();
        self.p50 = num(s.p50());
        self.p99 = num(s.p99());
        self.unit = unit.to_string();
        self
    }

    pub fn value(mut self, n: usize, v: f64, unit: &str) -> Row {
        self.n = n.to_string();
        self.p50 = num(v);
        self.unit = unit.to_string();
        self
    }

    pub fn ratio(mut self, r: String) -> Row {
        self.ratio = r;
        self
    }

    pub fn note(mut self, note: impl Into<String>) -> Row {
        self.note = note.into();
        self
    }
}

#[derive(Default)]
pub struct Table {
    pub rows: Vec<Row>,
}

impl Table {
    pub fn section(&mut self, title: &str) {
        self.rows.push(Row::new("==", title, ""));
    }

    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    pub fn target(&mut self, what: &str, lang: &str, measured: String, met: Option<bool>) {
        let verdict = match met {
            Some(true) => "met",
            Some(false) => "NOT MET",
            None => "n/a",
        };
        self.push(
            Row::new("T", what, lang)
                .ratio(verdict.into())
                .note(measured),
        );
    }

    pub fn render(&self) -> String {
        let header = Row {
            id: "#".into(),
            path: "path".into(),
            lang: "lang".into(),
            n: "n".into(),
            p50: "p50/value".into(),
            p99: "p99".into(),
            unit: "unit".into(),
            ratio: "ratio".into(),
            note: "note".into(),
        };
        let cells = |r: &Row| {
            [
                r.id.clone(),
                r.path.clone(),
                r.lang.clone(),
                r.n.clone(),
                r.p50.clone(),
                r.p99.clone(),
                r.unit.clone(),
                r.ratio.clone(),
                r.note.clone(),
            ]
        };
        let mut widths = [0usize; 9];
        for row in std::iter::once(&header).chain(self.rows.iter().filter(|r| r.id != "==")) {
            for (w, c) in widths.iter_mut().zip(cells(row)) {
                *w = (*w).max(c.chars().count());
            }
        }
        let line = |r: &Row| {
            let mut out = String::new();
            for (i, (c, w)) in cells(r).iter().zip(widths).enumerate() {
                let right = (3..=5).contains(&i);
                let pad = w.saturating_sub(c.chars().count());
                if right {
                    out.push_str(&" ".repeat(pad));
                    out.push_str(c);
                } else {
                    out.push_str(c);
                    if i < 8 {
                        out.push_str(&" ".repeat(pad));
                    }
                }
                if i < 8 {
                    out.push_str("  ");
                }
            }
            out.trim_end().to_string()
        };
        let total: usize = widths.iter().sum::<usize>() + 16;
        let mut out = String::new();
        out.push_str(&line(&header));
        out.push('\n');
        out.push_str(&"-".repeat(total.min(200)));
        out.push('\n');
        for r in &self.rows {
            if r.id == "==" {
                out.push_str(&format!("== {} ==\n", r.path));
            } else {
                out.push_str(&line(r));
                out.push('\n');
            }
        }
        out
    }
}

/// Failures per path: how many, and the first message.
#[derive(Default)]
pub struct Errors(pub BTreeMap<String, (usize, String)>);

impl Errors {
    pub fn record<T>(&mut self, path: &str, result: anyhow::Result<T>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(e) => {
                let entry = self
                    .0
                    .entry(path.to_string())
                    .or_insert((0, format!("{e:#}")));
                entry.0 += 1;
                None
            }
        }
    }

    pub fn note(&self, path: &str) -> String {
        match self.0.get(path) {
            Some((n, first)) => {
                let first: String = first.chars().take(120).collect();
                format!("{n} failed (first: {first})")
            }
            None => String::new(),
        }
    }
}

pub fn join_notes(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("; ")
}

pub async fn bounded<T>(
    what: &str,
    fut: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(JOB_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => bail!("{what}: no answer within {JOB_TIMEOUT:?}"),
    }
}

pub fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

// ---------------------------------------------------------------------------------------------
// Languages: the catalog's image, file name, command lines and environment.

pub struct Lang {
    pub name: &'static str,
    pub tag: String,
    pub file: String,
    /// `compile && run`, shell-quoted from the catalog's argv.
    pub cmds: String,
    /// `SRC` (the program) and the catalog's environment.
    pub env: Vec<String>,
    pub source: &'static str,
    pub compiled: bool,
}

pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl Lang {
    /// Runtime `l` of the catalog, running `source` (which must print `1`), named `name` in
    /// requests.
    pub fn of(l: &Language, name: &'static str, source: &'static str) -> anyhow::Result<Lang> {
        let tag = Recipe::of(l, None)
            .map_err(anyhow::Error::msg)?
            .tag(&l.image);
        let (compile, run) = l.commands(&l.file_name, &[]);
        let cmds = compile
            .iter()
            .chain([&run])
            .map(|argv| argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "))
            .collect::<Vec<_>>()
            .join(" && ");
        let mut env = vec![format!("SRC={source}"), "HOME=/work".to_string()];
        env.extend(l.env.iter().map(|(k, v)| format!("{k}={v}")));
        Ok(Lang {
            name,
            tag,
            file: l.file_name.clone(),
            cmds,
            env,
            source,
            compiled: l.compiled(),
        })
    }

    /// `n` runs, each timed inside the container with bash's `EPOCHREALTIME` (no fork for the
    /// clock), one line of microseconds per run. Output goes to /dev/null.
    pub fn timed_script(&self, n: usize) -> String {
        format!(
            "set -e; d=$(mktemp -d /work/t.XXXXXX); cd \"$d\"; printf '%s' \"$SRC\" > {file}; \
             for i in $(seq {n}); do s=${{EPOCHREALTIME/./}}; {{ {cmds}; }} >/dev/null; e=${{EPOCHREALTIME/./}}; echo $((e-s)); done; \
             cd /; rm -rf \"$d\"",
            file = self.file,
            cmds = self.cmds
        )
    }

    pub fn hello(&self) -> Value {
        json!({"language": self.name, "source": self.source})
    }
}

pub fn check_output(stdout: &str, stderr: &str) -> anyhow::Result<()> {
    if stdout.trim() != "1" {
        bail!("printed {:?} (stderr {:?})", stdout.trim(), stderr.trim());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The Docker Engine API directly, with the sandboxes' limits.

#[derive(Clone)]
pub struct Engine {
    pub docker: bollard::Docker,
    /// Label of every container this bench creates directly.
    pub node: String,
}

impl Engine {
    /// A container like the agent's sandboxes (network none, no capabilities, read-only root,
    /// tmpfs scratch, the default memory limit plus the sandbox overhead, one CPU on a 10 ms
    /// period, pids and nofile limits), running `cmd` as the image's unprivileged user.
    pub fn body(&self, lang: &Lang, cmd: Vec<String>, keep_logs: bool) -> ContainerCreateBody {
        let scratch = format!("rw,nosuid,nodev,exec,size={},mode=1777", 64u64 << 20);
        let memory = (ResolvedLimits::DEFAULT.memory_bytes + SANDBOX_OVERHEAD_BYTES) as i64;
        let host = HostConfig {
            privileged: Some(false),
            network_mode: Some("none".into()),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            readonly_rootfs: Some(true),
            tmpfs: Some(HashMap::from([
                ("/work".to_string(), scratch.clone()),
                ("/tmp".to_string(), scratch),
            ])),
            memory: Some(memory),
            memory_swap: Some(memory),
            cpu_period: Some(10_000),
            cpu_quota: Some(10_000),
            pids_limit: Some(ResolvedLimits::MAX.processes as i64 + 16),
            ulimits: Some(vec![ResourcesUlimits {
                name: Some("nofile".into()),
                soft: Some(256),
                hard: Some(256),
            }]),
            ipc_mode: Some("private".into()),
            log_config: (!keep_logs).then(|| HostConfigLogConfig {
                typ: Some("none".into()),
                config: None,
            }),
            ..Default::default()
        };
        ContainerCreateBody {
            image: Some(lang.tag.clone()),
            cmd: Some(cmd),
            user: Some(JOB_USER.into()),
            env: Some(lang.env.clone()),
            labels: Some(HashMap::from([
                (LABEL_NODE.to_string(), self.node.clone()),
                (LABEL_LANGUAGE.to_string(), lang.name.to_string()),
                (LABEL_KIND.to_string(), "bench".to_string()),
            ])),
            network_disabled: Some(true),
            host_config: Some(host),
            ..Default::default()
        }
    }

    /// A long-lived container (`sleep infinity`) for `docker exec`.
    pub async fn start_idle(&self, lang: &Lang) -> anyhow::Result<String> {
        let cmd = vec!["sleep".into(), "infinity".into()];
        let id = self
            .docker
            .create_container(None, self.body(lang, cmd, false))
            .await?
            .id;
        self.docker.start_container(&id, None).await?;
        Ok(id)
    }

    /// (b) and in-container timing: create_exec, start_exec (attached), inspect_exec. Returns
    /// stdout; a non-zero exit is an error.
    pub async fn exec(
        &self,
        container: &str,
        script: String,
        env: &[String],
    ) -> anyhow::Result<String> {
        let created = self
            .docker
            .create_exec(
                container,
                CreateExecOptions::<String> {
                    cmd: Some(vec!["bash".into(), "-c".into(), script]),
                    env: Some(env.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    user: Some(JOB_USER.into()),
                    ..Default::default()
                },
            )
            .await
            .context("create_exec")?;
        let (mut out, mut err) = (String::new(), String::new());
        match self
            .docker
            .start_exec(&created.id, None)
            .await
            .context("start_exec")?
        {
            StartExecResults::Attached { mut output, .. } => {
                while let Some(chunk) = output.next().await {
                    match chunk.context("exec output")? {
                        LogOutput::StdOut { message } => {
                            out.push_str(&String::from_utf8_lossy(&message))
                        }
                        LogOutput::StdErr { message } => {
                            err.push_str(&String::from_utf8_lossy(&message))
                        }
                        _ => {}
                    }
                }
            }
            StartExecResults::Detached => bail!("exec started detached"),
        }
        let mut code = None;
        for _ in 0..100 {
            let inspected = self
                .docker
                .inspect_exec(&created.id)
                .await
                .context("inspect_exec")?;
            if inspected.running != Some(true) {
                code = inspected.exit_code;
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        if code != Some(0) {
            bail!("exec exited {code:?}: {}", err.trim());
        }
        Ok(out)
    }

    /// (c): `n` compile+run, timed inside the container; milliseconds each.
    pub async fn timed(&self, container: &str, lang: &Lang, n: usize) -> anyhow::Result<Vec<f64>> {
        let out = self
            .exec(container, lang.timed_script(n), &lang.env)
            .await?;
        let times: Vec<f64> = out
            .split_whitespace()
            .map(|us| us.parse::<f64>().map(|v| v / 1e3))
            .collect::<Result<_, _>>()
            .with_context(|| format!("unreadable timings {out:?}"))?;
        if times.len() != n {
            bail!("expected {n} timings, got {out:?}");
        }
        Ok(times)
    }

    pub async fn remove(&self, id: &str) -> anyhow::Result<()> {
        let opts = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(true)
            .build();
        self.docker
            .remove_container(id, Some(opts))
            .await
            .context("remove")
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP: agents and gateways.

pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .pool_max_idle_per_host(256)
        .timeout(JOB_TIMEOUT)
        .build()
        .expect("a plain HTTP client always builds")
}

#[derive(Clone)]
pub struct Http {
    pub url: String,
    pub client: reqwest::Client,
}

impl Http {
    pub fn new(url: &str) -> Http {
        Http {
            url: url.to_string(),
            client: http_client(),
        }
    }

    /// `POST /v1/execute`: client-side milliseconds and the answer (200 only).
    pub async fn execute(&self, body: &Value) -> anyhow::Result<(f64, ExecuteResponse)> {
        let t = Instant::now();
        let resp = self
            .client
            .post(format!("{}/v1/execute", self.url))
            .json(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        let ms = ms_since(t);
        if status != reqwest::StatusCode::OK {
            bail!("{status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok((ms, serde_json::from_slice(&bytes)?))
    }

    /// A hello job that must print `1`; returns the latency and the answer.
    pub async fn hello(&self, body: &Value) -> anyhow::Result<(f64, ExecuteResponse)> {
        let (ms, r) = bounded("execute", self.execute(body)).await?;
        if r.status != Status::Ok {
            bail!("status {:?}: {:?}", r.status, r.run.map(|s| s.stderr));
        }
        let stdout = r.run.as_ref().map_or("", |s| s.stdout.as_str());
        check_output(stdout, "")?;
        Ok((ms, r))
    }
}

pub fn stage_ms(r: &ExecuteResponse) -> f64 {
    [&r.compile, &r.run]
        .iter()
        .filter_map(|s| s.as_ref())
        .map(|s| s.wall_time_ms as f64)
        .sum()
}

pub fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn load_average() -> String {
    read("/proc/loadavg")
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

pub async fn machine(docker: &bollard::Docker) -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = read("/proc/cpuinfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("model name")
                .map(|m| m.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    let mem_gib = read("/proc/meminfo")
        .lines()
        .find_map(|l| {
            l.strip_prefix("MemTotal:")?
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<f64>()
                .ok()
        })
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0);
    let kernel = read("/proc/sys/kernel/osrelease").trim().to_string();
    let version = docker
        .version()
        .await
        .ok()
        .and_then(|v| v.version)
        .unwrap_or_else(|| "unknown".into());
    let cgroup = docker
        .info()
        .await
        .ok()
        .and_then(|i| i.cgroup_version)
        .and_then(|v| serde_json::to_value(v).ok())
        .and_then(|v| v.as_str().map(|s| format!("v{s}")))
        .unwrap_or_else(|| "?".to_string());
    format!(
        "machine: nproc {cpus} ({model}), memory {mem_gib:.1} GiB, kernel {kernel}, Docker server {version} (cgroup {cgroup}), load average at start {}",
        load_average()
    )
}

/// Runs a bench to its end or Ctrl-C, then removes every container of `nodes`; a failure is
/// printed as `<name> bench: <error>` and exits 1.
pub async fn run_bench(
    name: &str,
    nodes: Vec<String>,
    bench: impl Future<Output = anyhow::Result<()>>,
) -> std::process::ExitCode {
    let cleanup = Cleanup(nodes);
    let outcome = tokio::select! {
        r = bench => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };
    drop(cleanup);
    match outcome {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name} bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Node ids of this run; every container of theirs is removed when this drops.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for node in &self.0 {
            remove_containers_of(node);
        }
    }
}

pub async fn settle() {
    tokio::time::sleep(SETTLE).await;
}

pub fn progress(started: Instant, what: &str) {
    eprintln!("[{:>5.1}s] {what}", started.elapsed().as_secs_f64());
}
