//! The judge benchmark (a bench binary, not a test): a 20-test C++ problem judged by one agent
//! against the real engine, beside its baselines measured in the same run, samples interleaved
//! so a shared machine's noise hits every path alike:
//!
//! - **judge**: `POST /v1/judge` of a program the node has not seen (one compile, 20 runs);
//! - **compile + 20 warm runs**: the same work as separate requests at their floor: one execute
//!   of a new program (its compile and a run) plus 19 executes of it from the compile cache (a
//!   warm run each, nothing compiled); the issue's target is judge ≤ 1.5 × this;
//! - **20 executes, each compiling**: the same program run as 20 separate executions the way a
//!   judge without compile-once does it (each a new program to the node, so each compiles);
//! - **judge, resubmitted**: the judge of a program the node compiled before (`cached: true`).
//!
//! ```text
//! deploy/build-supervisor.sh
//! cargo bench -p codefleet-tests --bench judge              # 5 rounds
//! JUDGE_BENCH_ROUNDS=2 cargo bench -p codefleet-tests --bench judge
//! ```
//!
//! The agent runs in this process under a node id of this run; its containers are removed when
//! it stops (and by the fixture's drop on an error).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context as _};
use serde_json::{json, Value};

use codefleet_tests::{AgentOpts, Api, TestAgent};

const TESTS: usize = 20;
/// Reads a number and prints twice it; `{variant}` makes each round's program new to the node.
const PROGRAM: &str = "// round {variant}\n#include <cstdio>\nint main() { long n; if (scanf(\"%ld\", &n) != 1) return 1; printf(\"%ld\\n\", 2 * n); }\n";

fn program(variant: &str) -> String {
    PROGRAM.replace("{variant}", variant)
}

fn tests() -> Vec<Value> {
    (0..TESTS)
        .map(|i| json!({"stdin": format!("{i}\n"), "expected": format!("{}\n", 2 * i)}))
        .collect()
}

async fn post(api: &Api, path: &str, body: &Value) -> anyhow::Result<(Duration, Value)> {
    let started = Instant::now();
    let answer = api.post(path, body).await;
    let took = started.elapsed();
    ensure!(answer.status.is_success(), "{path}: {answer:?}");
    Ok((took, answer.body))
}

async fn judge(api: &Api, source: &str, cached: bool) -> anyhow::Result<Duration> {
    let body = json!({"language": "cpp", "source": source, "tests": tests()});
    let (took, r) = post(api, "/v1/judge", &body).await?;
    ensure!(r["verdict"] == "accepted", "judge: {r}");
    ensure!(r["cached"] == cached, "judge cached {cached}: {r}");
    Ok(took)
}

async fn execute(api: &Api, source: &str, i: usize, cached: bool) -> anyhow::Result<Duration> {
    let body = json!({"language": "cpp", "source": source, "stdin": format!("{i}\n")});
    let (took, r) = post(api, "/v1/execute", &body).await?;
    ensure!(r["run"]["stdout"] == format!("{}\n", 2 * i), "execute: {r}");
    ensure!(r["cached"] == cached, "execute cached {cached}: {r}");
    Ok(took)
}

#[derive(Default)]
struct Samples {
    judge: Vec<f64>,
    baseline: Vec<f64>,
    separate: Vec<f64>,
    resubmitted: Vec<f64>,
    compile_stage: Vec<f64>,
    warm_run: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn round(api: &Api, tag: &str, samples: &mut Samples) -> anyhow::Result<()> {
    // The judge, on a program new to the node.
    let judged = program(&format!("{tag}-judge"));
    samples.judge.push(ms(judge(api, &judged, false).await?));
    // Its resubmission: the compile comes from the cache.
    samples
        .resubmitted
        .push(ms(judge(api, &judged, true).await?));

    // One compile and 20 warm runs, as separate requests.
    let baseline = program(&format!("{tag}-baseline"));
    let started = Instant::now();
    let first = execute(api, &baseline, 0, false).await?;
    let mut runs = Vec::new();
    for i in 1..TESTS {
        runs.push(ms(execute(api, &baseline, i, true).await?));
    }
    samples.baseline.push(ms(started.elapsed()));
    samples.warm_run.push(median(&runs));
    samples.compile_stage.push(ms(first) - median(&runs));

    // The same program as 20 executions that each compile it.
    let started = Instant::now();
    for i in 0..TESTS {
        let each = program(&format!("{tag}-separate-{i}"));
        execute(api, &each, i, false).await?;
    }
    samples.separate.push(ms(started.elapsed()));
    Ok(())
}

async fn run() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("JUDGE_BENCH_ROUNDS")
        .ok()
        .map(|r| r.parse().context("JUDGE_BENCH_ROUNDS"))
        .transpose()?
        .unwrap_or(5);
    if rounds == 0 {
        bail!("JUDGE_BENCH_ROUNDS must be at least 1");
    }
    let agent = TestAgent::start(
        "bench-judge",
        AgentOpts::languages(&["cpp"]).arg("--pool-max", 2),
    )
    .await;
    let api = agent.api.clone();
    let run_tag = format!("{}-{}", std::process::id(), rand_tag());
    // One unmeasured round: the toolchain's first use in each sandbox.
    let mut warmup = Samples::default();
    round(&api, &format!("{run_tag}-warmup"), &mut warmup).await?;
    let mut samples = Samples::default();
    for r in 0..rounds {
        round(&api, &format!("{run_tag}-{r}"), &mut samples).await?;
    }
    agent.stop().await;

    let judge_ms = median(&samples.judge);
    let baseline_ms = median(&samples.baseline);
    let separate_ms = median(&samples.separate);
    let resubmitted_ms = median(&samples.resubmitted);
    let per_s = |ms: f64| TESTS as f64 / (ms / 1e3);
    println!("judge bench: a {TESTS}-test C++ problem, medians of {rounds} rounds (one agent, real engine)");
    println!();
    println!("| path | median ms | test cases/s |");
    println!("|---|---:|---:|");
    println!(
        "| judge (one compile, {TESTS} runs in one sandbox) | {judge_ms:.0} | {:.1} |",
        per_s(judge_ms)
    );
    println!(
        "| one compile + {TESTS} warm runs (1 execute compiling + {} from the compile cache) | {baseline_ms:.0} | {:.1} |",
        TESTS - 1,
        per_s(baseline_ms)
    );
    println!(
        "| {TESTS} separate executes, each compiling | {separate_ms:.0} | {:.1} |",
        per_s(separate_ms)
    );
    println!(
        "| judge resubmitted (compile from the cache) | {resubmitted_ms:.0} | {:.1} |",
        per_s(resubmitted_ms)
    );
    println!();
    println!(
        "one execute's compile ≈ {:.0} ms, one warm run ≈ {:.1} ms (medians)",
        median(&samples.compile_stage),
        median(&samples.warm_run)
    );
    let ratio = judge_ms / baseline_ms;
    println!(
        "judge / (one compile + {TESTS} warm runs) = {ratio:.2} (target ≤ 1.5: {})",
        if ratio <= 1.5 { "met" } else { "NOT met" }
    );
    println!(
        "judge vs {TESTS} separate executes: {:.1}× the test cases per second",
        separate_ms / judge_ms
    );
    Ok(())
}

/// A few random hex digits, so no two runs share a program (an agent's cache is its own anyway).
fn rand_tag() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{nanos:08x}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("judge bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}
