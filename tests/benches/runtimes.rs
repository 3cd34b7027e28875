//! The runtimes benchmark (a bench binary, not a test): for every runtime of the built-in
//! catalog, the agent's warm hello beside its in-container floor, measured in the same run, and
//! the same for an `import pandas` job on each Python runtime.
//!
//! For each runtime: (c) the program's own time, compile and run timed with bash's
//! `EPOCHREALTIME` inside an already running container of the same image and limits as a
//! sandbox (via `docker exec`; fleet.rs's (c)); (c') the supervisor's own wall time of the stages
//! of the warm jobs; (d) the warm job over HTTP to the agent (`sandbox: warm` answers only). The
//! program is the runtime's warm-up program from the catalog (each prints `1`). Samples of (c)
//! and (d) are interleaved so that the noise of a shared machine hits both alike.
//!
//! Run it after building the binaries it starts:
//!
//! ```text
//! deploy/build-supervisor.sh && cargo build --release -p codefleet-node-agent --bins
//! cargo bench -p codefleet-tests --bench runtimes            # full run, ~10 minutes
//! RUNTIMES_BENCH_QUICK=1 cargo bench -p codefleet-tests --bench runtimes   # smoke run
//! ```
//!
//! Every container it creates, itself or through its agent, is labelled
//! `codefleet.node=<a node id of this run>` and removed at the end, also on an error or Ctrl-C.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _};
use serde_json::{json, Value};

use codefleet_node_agent::catalog::{Catalog, Language};
use codefleet_shared::cluster::CapacityReport;
use codefleet_shared::version::compare_versions;
use codefleet_tests::{free_port, node_id, AgentOpts, AgentProcess};

mod common;
use common::*;

/// The `import pandas` job (it prints `1`, as every hello here does).
const PANDAS: &str = "import pandas\nprint(1)\n";

/// Samples per row: interpreted runtimes, compiled ones (a compile each), and the most time
/// one runtime's rows may take whatever the counts.
struct Sizes {
    interpreted: usize,
    compiled: usize,
    budget: Duration,
}

impl Sizes {
    fn from_env() -> Sizes {
        if std::env::var_os("RUNTIMES_BENCH_QUICK").is_some() {
            Sizes {
                interpreted: 5,
                compiled: 3,
                budget: Duration::from_secs(20),
            }
        } else {
            Sizes {
                interpreted: 40,
                compiled: 20,
                budget: Duration::from_secs(150),
            }
        }
    }
}

/// A string that lives for the whole run (`Lang` holds `&'static str`s, as fleet.rs's
/// languages are constants).
fn for_the_run(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

/// One runtime as this bench runs it: its `Lang` (image, file, commands, environment), and the
/// request that selects exactly it (its full version).
struct Runtime {
    id: String,
    version: String,
    lang: Lang,
}

impl Runtime {
    fn new(l: &Language, version: &str, source: &'static str) -> anyhow::Result<Runtime> {
        Ok(Runtime {
            id: l.runtime(),
            version: version.to_string(),
            lang: Lang::of(l, for_the_run(&l.name), source)?,
        })
    }

    /// The job, with time limits far above any sample (a loaded machine slows `tsc` and
    /// `import pandas` past the default 5 s); the memory limit, which picks the pool, is the
    /// default one.
    fn request(&self) -> Value {
        json!({
            "language": self.lang.name,
            "version": self.version,
            "source": self.lang.source,
            "limits": {"wall_time_ms": 30_000, "cpu_time_ms": 30_000},
        })
    }

    fn label(&self) -> String {
        format!("{} {}", self.lang.name, self.version)
    }
}

/// The samples of one runtime's rows.
#[derive(Default)]
struct Samples {
    c: Stats,
    c_sup: Stats,
    d: Stats,
    errors: Errors,
    /// (d) answers from a sandbox that was not `warm`.
    off_path: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let node = node_id("bench-runtimes");
    let docker_node = node_id("bench-runtimes-docker");
    let nodes = vec![node.clone(), docker_node.clone()];
    run_bench(
        "runtimes",
        nodes,
        run(Sizes::from_env(), &node, &docker_node),
    )
    .await
}

async fn run(sizes: Sizes, node: &str, docker_node: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let docker = bollard::Docker::connect_with_local_defaults().context("connecting to Docker")?;
    let machine_line = machine(&docker).await;
    eprintln!("{machine_line}");
    let engine = Engine {
        docker,
        node: docker_node.to_string(),
    };
    let catalog = Catalog::load(None).map_err(anyhow::Error::msg)?;

    progress(
        started,
        "starting an agent with every runtime of the catalog",
    );
    let mut opts = AgentOpts::languages(&[]).arg("--pool-max", 2);
    opts.languages = catalog.names().into_iter().map(for_the_run).collect();
    opts.enable_only_these = false;
    let agent = AgentProcess::launch(node, free_port(), &opts);
    agent
        .api
        .wait_ready(&opts.languages, Duration::from_secs(900))
        .await;
    let http = Http::new(&agent.api.url);

    // Every runtime with the version its agent read (the capacity report lists them by id).
    let report: CapacityReport = http
        .client
        .get(format!("{}/v1/capacity", http.url))
        .send()
        .await?
        .json()
        .await?;
    let version_of = |l: &Language| -> anyhow::Result<String> {
        report
            .runtimes
            .iter()
            .find(|r| r.runtime == l.runtime())
            .map(|r| r.capacity.version.clone())
            .ok_or_else(|| anyhow!("{} is not in the agent's capacity report", l.runtime()))
    };
    let mut runtimes = Vec::new();
    let mut pandas = Vec::new();
    for l in &catalog.languages {
        let version = version_of(l)?;
        let source = for_the_run(
            l.warmup
                .as_deref()
                .ok_or_else(|| anyhow!("{} has no warm-up program", l.runtime()))?,
        );
        runtimes.push(Runtime::new(l, &version, source)?);
        if l.name == "python" {
            pandas.push(Runtime::new(l, &version, PANDAS)?);
        }
    }

    // Grouped by language, oldest version first.
    let order = |a: &Runtime, b: &Runtime| {
        (a.lang.name.cmp(b.lang.name)).then(compare_versions(&a.version, &b.version))
    };
    runtimes.sort_by(order);
    pandas.sort_by(order);

    let mut table = Table::default();
    table.section("warm hello per runtime: (d) over HTTP beside the in-container floor (c)");
    for r in &runtimes {
        progress(started, &format!("{} ({})", r.label(), r.id));
        let n = if r.lang.compiled {
            sizes.compiled
        } else {
            sizes.interpreted
        };
        let s = sample(&engine, &http, r, n, sizes.budget).await;
        rows(&mut table, r, &s, "hello");
    }
    table.section("warm `import pandas` job beside the same script's floor");
    for r in &pandas {
        progress(started, &format!("import pandas on {}", r.label()));
        let s = sample(&engine, &http, r, sizes.interpreted, sizes.budget).await;
        rows(&mut table, r, &s, "import pandas");
    }

    drop(agent);
    println!("{machine_line}");
    println!(
        "runtimes bench: {:.0} s; (c) = the program's own time (bash EPOCHREALTIME around compile+run inside a running container of the same image and limits, via docker exec); (c') = the supervisor's wall_time_ms of the (d) jobs' stages; (d) = the warm job over HTTP to the agent (client-side), `sandbox: warm` answers only; samples interleaved with {} ms pauses",
        started.elapsed().as_secs_f64(),
        SETTLE.as_millis()
    );
    print!("{}", table.render());
    Ok(())
}

/// `n` interleaved samples of (c) and (d) for one runtime, after two of each not counted (the
/// exec container's page cache, the agent's recycled sandbox).
async fn sample(engine: &Engine, http: &Http, r: &Runtime, n: usize, budget: Duration) -> Samples {
    let mut s = Samples::default();
    let idle = match bounded("idle container", engine.start_idle(&r.lang)).await {
        Ok(id) => id,
        Err(e) => {
            s.errors.record::<()>("c", Err(e));
            return s;
        }
    };
    let request = r.request();
    for _ in 0..2 {
        let _ = engine.timed(&idle, &r.lang, 1).await;
        let _ = http.hello(&request).await;
    }
    let start = Instant::now();
    for _ in 0..n {
        if start.elapsed() > budget {
            break;
        }
        settle().await;
        let floor = bounded("timed exec", engine.timed(&idle, &r.lang, 1)).await;
        if let Some(times) = s.errors.record("c", floor) {
            for v in times {
                s.c.push(v);
            }
        }
        settle().await;
        if let Some((ms, answer)) = s.errors.record("d", http.hello(&request).await) {
            if answer.sandbox.as_deref() == Some("warm") {
                s.d.push(ms);
                s.c_sup.push(stage_ms(&answer));
            } else {
                s.off_path += 1;
            }
        }
    }
    let _ = engine.remove(&idle).await;
    s
}

fn rows(table: &mut Table, r: &Runtime, s: &Samples, what: &str) {
    let (c, d) = (s.c.p50(), s.d.p50());
    table.push(
        Row::new("c", &format!("{what} floor"), &r.label())
            .stats(&s.c, "ms")
            .note(join_notes(&[r.id.clone(), s.errors.note("c")])),
    );
    let mut notes = vec![
        format!("(c') {} ms", num(s.c_sup.p50())),
        format!("(d) - (c) = {} ms", num(d - c)),
    ];
    if s.off_path > 0 {
        notes.push(format!("{} answers not warm, left out", s.off_path));
    }
    notes.push(s.errors.note("d"));
    table.push(
        Row::new("d", &format!("{what} warm"), &r.label())
            .stats(&s.d, "ms")
            .ratio(format!("{} (c)", times(ratio(d, c))))
            .note(join_notes(&notes)),
    );
}
