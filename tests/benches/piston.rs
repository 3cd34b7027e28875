//! The Piston layer's cost (a bench binary, not a test): one real gateway and one real Python
//! agent, the same hello sent as a native `POST /v1/execute` (buffered, and as the NDJSON stream
//! the Piston layer consumes) and as a Piston `POST /api/v2/execute`, and both native ones
//! straight to the agent's port (what its streaming path costs), interleaved one of each in
//! turn so the shared machine's noise hits every path alike; and the translation alone, in
//! process. Prints one table with the medians and the Piston path's added p50 against the
//! issue's bound (≤ 0.5 ms over the native execute).
//!
//! ```text
//! deploy/build-supervisor.sh && cargo build --release -p codefleet-node-agent --bins
//! cargo bench -p codefleet-tests --bench piston      # PISTON_BENCH_SAMPLES=400 by default
//! ```

use std::hint::black_box;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use codefleet_gateway::piston::translate;
use codefleet_shared::{LanguageInfo, ResolvedLimits};
use codefleet_tests::{containers_of, Cluster};
use serde_json::json;

/// Nearest-rank percentile of `samples` (ms).
fn pct(samples: &[f64], p: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
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
            eprintln!("piston bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

struct Path {
    name: &'static str,
    url: String,
    body: String,
    accept: Option<&'static str>,
    /// The cluster token, for an agent's own port.
    token: Option<String>,
    samples: Vec<f64>,
}

impl Path {
    async fn once(&mut self, http: &reqwest::Client, record: bool) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut request = http
            .post(&self.url)
            .header("content-type", "application/json")
            .body(self.body.clone());
        if let Some(accept) = self.accept {
            request = request.header("accept", accept);
        }
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await?;
        let status = response.status();
        let body = response.bytes().await?;
        let took = started.elapsed().as_secs_f64() * 1e3;
        if !status.is_success() || !String::from_utf8_lossy(&body).contains("hello") {
            bail!(
                "{} answered {status}: {}",
                self.name,
                String::from_utf8_lossy(&body)
            );
        }
        if record {
            self.samples.push(took);
        }
        Ok(())
    }
}

async fn run() -> anyhow::Result<()> {
    let samples: usize = std::env::var("PISTON_BENCH_SAMPLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(400);
    let mut cluster = Cluster::named("piston-bench")
        .languages(&["python"])
        .start()
        .await;
    let url = cluster.gateway.url();
    let http = reqwest::Client::builder()
        .no_proxy()
        .tcp_nodelay(true)
        .timeout(Duration::from_secs(60))
        .build()?;
    let languages: Vec<LanguageInfo> = http
        .get(format!("{url}/v1/languages"))
        .send()
        .await?
        .json()
        .await?;
    let python = languages
        .iter()
        .find(|l| l.name == "python")
        .context("python is listed")?;
    let runtimes = translate::runtimes([python]);
    let semver = runtimes[0].version.to_string();

    // The same job on every path: one file, stdin "\n" (Piston adds the newline), the default
    // limits (Piston fields left out), the same runtime.
    let source = "print('hello')\n";
    let native = json!({"language": "python", "version": python.version,
                        "files": [{"name": "main.py", "content": source}], "stdin": "\n"});
    let piston = json!({"language": "python", "version": semver,
                        "files": [{"name": "main.py", "content": source}]});
    let agent = cluster.agent(&cluster.node_ids()[0]).api.clone();
    let mut paths = [
        Path {
            name: "native /v1/execute (buffered)",
            url: format!("{url}/v1/execute"),
            body: native.to_string(),
            accept: None,
            token: None,
            samples: Vec::new(),
        },
        Path {
            name: "native /v1/execute (NDJSON stream)",
            url: format!("{url}/v1/execute"),
            body: native.to_string(),
            accept: Some("application/x-ndjson"),
            token: None,
            samples: Vec::new(),
        },
        Path {
            name: "piston /api/v2/execute",
            url: format!("{url}/api/v2/execute"),
            body: piston.to_string(),
            accept: None,
            token: None,
            samples: Vec::new(),
        },
        // The agent's own port: what its streaming path costs before the gateway's part.
        Path {
            name: "agent /v1/execute (buffered)",
            url: format!("{}/v1/execute", agent.url),
            body: native.to_string(),
            accept: None,
            token: agent.token.clone(),
            samples: Vec::new(),
        },
        Path {
            name: "agent /v1/execute (NDJSON stream)",
            url: format!("{}/v1/execute", agent.url),
            body: native.to_string(),
            accept: Some("application/x-ndjson"),
            token: agent.token.clone(),
            samples: Vec::new(),
        },
    ];
    let result = async {
        for _ in 0..20 {
            for path in paths.iter_mut() {
                path.once(&http, false).await?;
            }
        }
        for i in 0..samples {
            // Rotate the order so no path always follows the same one.
            for k in 0..paths.len() {
                let path = &mut paths[(i + k) % paths.len()];
                tokio::time::sleep(Duration::from_millis(5)).await;
                path.once(&http, true).await?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    let nodes = cluster.stop().await;
    result?;
    for node in nodes {
        if !containers_of(&node).is_empty() {
            bail!("containers of {node} left behind");
        }
    }

    // The translation alone: a Piston body checked and turned into the native request.
    let max = ResolvedLimits::MAX;
    let rounds = 20_000;
    let started = Instant::now();
    for _ in 0..rounds {
        black_box(translate::translate(black_box(&piston), &runtimes, &max, false).ok());
    }
    let translate_us = started.elapsed().as_secs_f64() * 1e6 / rounds as f64;

    println!();
    println!("Piston layer, python hello, {samples} interleaved samples per path (ms)");
    println!(
        "| {:<36} | {:>7} | {:>7} | {:>7} |",
        "path", "p50", "p90", "p99"
    );
    println!("|{:-<38}|{:->9}|{:->9}|{:->9}|", "", "", "", "");
    for path in &paths {
        println!(
            "| {:<36} | {:>7.2} | {:>7.2} | {:>7.2} |",
            path.name,
            pct(&path.samples, 50.0),
            pct(&path.samples, 90.0),
            pct(&path.samples, 99.0)
        );
    }
    let p50 = |i: usize| pct(&paths[i].samples, 50.0);
    // The same round's samples of two paths, one after the other: their difference cancels
    // most of what the machine was doing at the time.
    let paired = |a: usize, b: usize| {
        let diffs: Vec<f64> = paths[a]
            .samples
            .iter()
            .zip(&paths[b].samples)
            .map(|(x, y)| x - y)
            .collect();
        pct(&diffs, 50.0)
    };
    let added = p50(2) - p50(0);
    println!();
    println!(
        "piston p50 - native buffered p50: {added:+.3} ms (bound: <= 0.5 ms: {})",
        if added <= 0.5 { "met" } else { "NOT met" }
    );
    println!(
        "piston p50 - native stream p50:   {:+.3} ms",
        p50(2) - p50(1)
    );
    println!(
        "agent stream p50 - agent buffered p50: {:+.3} ms",
        p50(4) - p50(3)
    );
    let paired_added = paired(2, 0);
    println!(
        "median of paired differences, piston - native buffered: {paired_added:+.3} ms (bound: <= 0.5 ms: {})",
        if paired_added <= 0.5 { "met" } else { "NOT met" }
    );
    println!(
        "median of paired differences, agent stream - agent buffered: {:+.3} ms",
        paired(4, 3)
    );
    println!("translation alone (in process):   {translate_us:.2} us per request");
    Ok(())
}
