//! The compile cache and what uses it, against the real engine: a program sent again is not
//! compiled again (the agent's compile counters, read from `/metrics`, do not move), what a run
//! does to its copy of the program never reaches the cache, the gateway sends a program back
//! to the node that compiled it, and `POST /v1/batch` runs mixed jobs across a fleet and
//! answers them in order, under the caller's quota.

use codefleet_gateway::routing::program_affinity;
use codefleet_shared::ExecuteRequest;
use codefleet_tests::{assert_nothing_left, AgentOpts, Api, Cluster, StatusCode, TestAgent};
use serde_json::{json, Value};

/// A counter of the agent's `/metrics` (0 when it has not been counted yet).
async fn counter(api: &Api, series: &str) -> f64 {
    let text = api.get("/metrics").await.body;
    let text = text.as_str().expect("metrics text");
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

const COMPILES: &str = "codefleet_compiles_total{language=\"cpp\"}";
const JUDGE_COMPILES: &str = "codefleet_judge_compiles_total{language=\"cpp\"}";
const HITS: &str = "codefleet_compile_cache_hits_total{language=\"cpp\"}";
const MISSES: &str = "codefleet_compile_cache_misses_total{language=\"cpp\"}";

/// Echoes its first word of input doubled; given `tamper`, replaces its own binary in the
/// work dir with a script that prints `tampered` (it may: the work dir is the job's).
const DOUBLER: &str = r##"
#include <cstdio>
#include <cstring>
#include <unistd.h>
#include <sys/stat.h>
int main() {
    char word[64] = {0};
    if (scanf("%63s", word) != 1) return 3;
    if (!strcmp(word, "tamper")) {
        unlink("main");
        FILE *f = fopen("main", "w");
        if (!f) return 4;
        fputs("#!/bin/sh\necho tampered\n", f);
        fclose(f);
        chmod("main", 0755);
        printf("done\n");
        return 0;
    }
    printf("%s%s\n", word, word);
    return 0;
}
"##;

fn test(stdin: &str, expected: &str) -> Value {
    json!({"stdin": stdin, "expected": expected})
}

async fn post_ok(api: &Api, path: &str, body: &Value) -> Value {
    let a = api.post(path, body).await;
    assert_eq!(a.status, StatusCode::OK, "{path} {body} answered {a:?}");
    a.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_program_sent_again_is_not_compiled_again() {
    let agent = TestAgent::start(
        "cache-agent",
        AgentOpts::languages(&["python", "cpp"]).arg("--pool-max", 2),
    )
    .await;
    let api = &agent.api;
    let judge = json!({
        "language": "cpp",
        "source": DOUBLER,
        "tests": [test("ab", "abab"), test("x", "xx"), test("q", "qq")],
    });

    // First: compiled, once, and kept.
    let (compiles, judge_compiles) = (
        counter(api, COMPILES).await,
        counter(api, JUDGE_COMPILES).await,
    );
    let first = post_ok(api, "/v1/judge", &judge).await;
    assert_eq!(first["verdict"], "accepted", "{first}");
    assert_eq!(first["cached"], false, "{first}");
    assert_eq!(first["compile"]["status"], "ok", "{first}");
    assert_eq!(counter(api, COMPILES).await - compiles, 1.0);
    assert_eq!(counter(api, JUDGE_COMPILES).await - judge_compiles, 1.0);
    assert_eq!(counter(api, MISSES).await, 1.0);

    // Again, as a judge and as executes: from the cache, no compile stage run.
    let hits = counter(api, HITS).await;
    let again = post_ok(api, "/v1/judge", &judge).await;
    assert_eq!(again["verdict"], "accepted", "{again}");
    assert_eq!(again["cached"], true, "{again}");
    assert_eq!(
        again["compile"], first["compile"],
        "the compile stage as it ran then"
    );
    let run = |stdin: &str| json!({"language": "cpp", "source": DOUBLER, "stdin": stdin});
    let e = post_ok(api, "/v1/execute", &run("hey")).await;
    assert_eq!(e["cached"], true, "{e}");
    assert_eq!(e["status"], "ok", "{e}");
    assert_eq!(e["run"]["stdout"], "heyhey\n", "{e}");
    assert_eq!(e["compile"]["status"], "ok", "{e}");
    assert_eq!(counter(api, HITS).await - hits, 2.0);
    assert_eq!(
        counter(api, COMPILES).await - compiles,
        1.0,
        "no compile since the first"
    );
    assert_eq!(counter(api, JUDGE_COMPILES).await - judge_compiles, 1.0);

    // A run that replaces its own binary changes its copy only.
    let e = post_ok(api, "/v1/execute", &run("tamper")).await;
    assert_eq!(e["run"]["stdout"], "done\n", "{e}");
    for _ in 0..3 {
        let e = post_ok(api, "/v1/execute", &run("ok")).await;
        assert_eq!(e["cached"], true, "{e}");
        assert_eq!(
            e["run"]["stdout"], "okok\n",
            "the cached program, untouched: {e}"
        );
    }
    let again = post_ok(api, "/v1/judge", &judge).await;
    assert_eq!(again["verdict"], "accepted", "{again}");
    assert_eq!(again["cached"], true, "{again}");

    // A new program: compiled by an execute, then served to a judge from the cache.
    let other = DOUBLER.replace("%s%s\\n", "%s-%s\\n");
    let e = post_ok(
        api,
        "/v1/execute",
        &json!({"language": "cpp", "source": other, "stdin": "a"}),
    )
    .await;
    assert_eq!(e["cached"], false, "{e}");
    assert_eq!(e["run"]["stdout"], "a-a\n", "{e}");
    let r = post_ok(
        api,
        "/v1/judge",
        &json!({"language": "cpp", "source": other, "tests": [test("b", "b-b")]}),
    )
    .await;
    assert_eq!(r["cached"], true, "{r}");
    assert_eq!(r["verdict"], "accepted", "{r}");
    assert_eq!(counter(api, COMPILES).await - compiles, 2.0);

    // What does not compile is not kept; interpreted languages have no `cached`.
    for _ in 0..2 {
        let e = post_ok(
            api,
            "/v1/execute",
            &json!({"language": "cpp", "source": "int main( {"}),
        )
        .await;
        assert_eq!(e["status"], "compile_error", "{e}");
        assert_eq!(e["cached"], false, "{e}");
    }
    assert_eq!(counter(api, COMPILES).await - compiles, 4.0);
    let e = api.python("print(1)").await;
    assert!(e.get("cached").is_none(), "{e}");
    assert!(counter(api, "codefleet_compile_cache_bytes").await > 0.0);
    agent.stop().await;
}

/// `n` variants of a C++ program, each homed (by its affinity on the ring of `nodes`) on a
/// different node; at least one of them not on the language's own primary.
fn programs_homed_apart(cluster: &Cluster, nodes: &[String]) -> Vec<(String, String)> {
    let ring = cluster.ring(nodes);
    let mut found: Vec<(String, String)> = Vec::new();
    for i in 0.. {
        let source = format!("// variant {i}\n{DOUBLER}");
        let request = ExecuteRequest {
            source: Some(source.clone()),
            ..Default::default()
        };
        let home = ring
            .home(program_affinity("cpp", &request))
            .expect("a ring")
            .to_string();
        if !found.iter().any(|(_, h)| *h == home) {
            found.push((source, home));
        }
        if found.len() == nodes.len() {
            return found;
        }
        assert!(i < 10_000, "no variant for every node");
    }
    unreachable!()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_sends_a_program_back_to_the_node_that_compiled_it() {
    let mut cluster = Cluster::named("cache-affinity")
        .agents(3)
        .languages(&["cpp"])
        .start()
        .await;
    let nodes = cluster.node_ids();
    let programs = programs_homed_apart(&cluster, &nodes);
    let primary = cluster.primary("cpp");
    assert!(programs.iter().any(|(_, home)| *home != primary));
    for (source, home) in &programs {
        let run = json!({"language": "cpp", "source": source, "stdin": "hi"});
        let first = cluster.api.execute(run.clone()).await;
        assert_eq!(first["node"], *home, "compiled on its home: {first}");
        assert_eq!(first["cached"], false, "{first}");
        assert_eq!(first["run"]["stdout"], "hihi\n", "{first}");
        let again = cluster.api.execute(run).await;
        assert_eq!(
            again["node"], *home,
            "back to the node that compiled it: {again}"
        );
        assert_eq!(again["cached"], true, "{again}");
        let judged = post_ok(
            &cluster.api,
            "/v1/judge",
            &json!({"language": "cpp", "source": source, "tests": [test("a", "aa")]}),
        )
        .await;
        assert_eq!(judged["node"], *home, "{judged}");
        assert_eq!(judged["cached"], true, "{judged}");
        assert_eq!(judged["verdict"], "accepted", "{judged}");
    }
    for node in &nodes {
        let agent = cluster.agent(node);
        assert_eq!(
            counter(&agent.api, COMPILES).await,
            1.0,
            "{node}: one program, one compile"
        );
        assert_eq!(counter(&agent.api, HITS).await, 2.0, "{node}");
    }
    assert_nothing_left(cluster.stop().await).await;
}

fn python_job(i: usize) -> Value {
    json!({"execute": {"language": "python", "source": "print(int(input()) * 3)", "stdin": format!("{i}\n")}})
}

/// Sends `jobs` as one batch; returns every job's answer, in order.
async fn run_batch(api: &Api, jobs: &[Value]) -> Vec<Value> {
    let answer = post_ok(api, "/v1/batch", &json!({"jobs": jobs})).await;
    let results = answer["results"].as_array().expect("results").clone();
    assert_eq!(results.len(), jobs.len(), "one answer per job: {answer}");
    results
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_thirty_mixed_jobs_is_answered_in_order() {
    let mut cluster = Cluster::named("batch")
        .agents(3)
        .languages(&["python", "cpp"])
        .gateway_arg("--api-key", "batch-key")
        .gateway_arg("--api-key", "quota-key")
        .gateway_arg("--max-batch", 50)
        .gateway_arg("--burst", 45)
        .gateway_arg("--rate-per-s", 0.001)
        .start()
        .await;
    let api = cluster.gateway.api(Some("batch-key"));
    let cpp =
        |stdin: &str| json!({"execute": {"language": "cpp", "source": DOUBLER, "stdin": stdin}});
    let mut jobs: Vec<Value> = (0..30).map(python_job).collect();
    jobs[3] = cpp("one");
    jobs[11] = cpp("two");
    jobs[20] = cpp("three");
    jobs[7] = json!({"execute": {"language": "cobol", "source": "DISPLAY 1"}});
    jobs[8] = json!({"run": {"language": "python"}});
    jobs[15] = json!({"judge": {
        "language": "python",
        "source": "print(int(input()) + 1)",
        "tests": [test("1", "2"), test("2", "4")],
    }});
    jobs[25] = json!({"judge": {"language": "cpp", "source": DOUBLER, "tests": [test("z", "zz")]}});
    jobs[27] = json!({"execute": {"language": "cpp", "source": "int main( {"}});
    let results = run_batch(&api, &jobs).await;
    let mut nodes = std::collections::BTreeSet::new();
    for (i, r) in results.iter().enumerate() {
        let fields = r.as_object().expect("an object").len();
        assert_eq!(fields, 1, "one of execute, judge, error: {r}");
        match i {
            3 => assert_eq!(r["execute"]["run"]["stdout"], "oneone\n", "{r}"),
            11 => assert_eq!(r["execute"]["run"]["stdout"], "twotwo\n", "{r}"),
            20 => assert_eq!(r["execute"]["run"]["stdout"], "threethree\n", "{r}"),
            7 => assert_eq!(r["error"]["code"], "unknown_language", "{r}"),
            8 => assert_eq!(r["error"]["code"], "invalid_request", "{r}"),
            15 => {
                assert_eq!(r["judge"]["verdict"], "wrong_answer", "{r}");
                assert_eq!(r["judge"]["first_failure"], 1, "{r}");
            }
            25 => assert_eq!(r["judge"]["verdict"], "accepted", "{r}"),
            27 => assert_eq!(r["execute"]["status"], "compile_error", "{r}"),
            _ => {
                assert_eq!(r["execute"]["status"], "ok", "{i}: {r}");
                assert_eq!(
                    r["execute"]["run"]["stdout"],
                    format!("{}\n", i * 3),
                    "{i}: {r}"
                );
            }
        }
        for kind in ["execute", "judge"] {
            if let Some(node) = r[kind]["node"].as_str() {
                nodes.insert(node.to_string());
            }
        }
    }
    assert!(nodes.len() > 1, "run across the fleet: {nodes:?}");

    // Refusals of the batch itself.
    let a = api.post("/v1/batch", &json!({"jobs": []})).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    let a = api
        .post(
            "/v1/batch",
            &json!({"jobs": (0..51).map(python_job).collect::<Vec<_>>()}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert_eq!(a.body["code"], "invalid_request", "{a:?}");
    let a = cluster
        .gateway
        .api(None)
        .post("/v1/batch", &json!({"jobs": [python_job(1)]}))
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{a:?}");

    // The key's rate: a fresh key has 45 tokens; the batch takes one, and each of its jobs one
    // as it starts (a job without a source is refused at the edge, after its token): 44 jobs
    // get one, the last 6 are 429.
    let quota = cluster.gateway.api(Some("quota-key"));
    let sourceless = json!({"execute": {"language": "python"}});
    let answer = post_ok(&quota, "/v1/batch", &json!({"jobs": vec![sourceless; 50]})).await;
    let results = answer["results"].as_array().expect("results");
    let codes: Vec<&str> = results
        .iter()
        .map(|r| r["error"]["code"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(codes[..44], ["invalid_request"; 44], "{answer}");
    assert_eq!(codes[44..], ["rate_limited"; 6], "{answer}");
    assert_eq!(results[49]["error"]["status"], 429, "{answer}");
    assert_nothing_left(cluster.stop().await).await;
}
