//! Judge mode (`POST /v1/judge`) against the real engine: verdicts earned by real programs, a
//! compiled program compiled once, every checker, stop on first failure, nothing of one test
//! seen by the next, the refusals, the NDJSON stream, and the same through a gateway.

use std::time::Instant;

use codefleet_tests::{AgentOpts, Api, Cluster, StatusCode, TestAgent};
use serde_json::{json, Value};

async fn agent(name: &str) -> TestAgent {
    TestAgent::start(
        name,
        AgentOpts::languages(&["python", "cpp"])
            .arg("--pool-min", 1)
            .arg("--pool-max", 2)
            // Room for the tests' 16 MiB of input and expected output in one body.
            .arg("--max-body-bytes", 32 << 20),
    )
    .await
}

async fn judge(api: &Api, body: Value) -> Value {
    let a = api.post("/v1/judge", &body).await;
    assert_eq!(a.status, StatusCode::OK, "judge {body} answered {a:?}");
    a.body
}

fn verdicts(r: &Value) -> Vec<String> {
    r["tests"]
        .as_array()
        .unwrap_or_else(|| panic!("no tests in {r}"))
        .iter()
        .map(|t| t["verdict"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// Held by every test that compiles C++: the agents of this file share the process's one
/// metrics recorder, so the compile count one test reads is its own only while no other
/// test compiles C++.
static CPP: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The agent's count of judge compiles of C++ programs.
async fn compiles(api: &Api) -> f64 {
    let text = api.get("/metrics").await.body;
    let text = text.as_str().expect("metrics text");
    text.lines()
        .find(|l| l.starts_with("codefleet_judge_compiles_total{language=\"cpp\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0.0)
}

fn test(stdin: &str, expected: &str) -> Value {
    json!({"stdin": stdin, "expected": expected})
}

/// Python: one test per verdict, each earned by what the program does with its input.
const PY_VERDICTS: &str = r#"
import os, signal, sys
what = sys.stdin.readline().strip()
if what == "ok":
    print(42)
elif what == "wrong":
    print(41)
elif what == "slow":
    while True:
        pass
elif what == "crash":
    os.kill(os.getpid(), signal.SIGSEGV)
elif what == "memory":
    block = []
    while True:
        block.append(bytearray(16 << 20))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_verdict_is_earned_and_the_first_failure_named() {
    let agent = agent("judge-verdicts").await;
    let api = &agent.api;
    let r = judge(
        api,
        json!({
            "language": "python",
            "source": PY_VERDICTS,
            "limits": {"wall_time_ms": 2000, "cpu_time_ms": 1000, "memory_bytes": 134217728},
            "tests": [
                test("ok\n", "42\n"),
                test("wrong\n", "42\n"),
                test("slow\n", "42\n"),
                test("crash\n", "42\n"),
                test("memory\n", "42\n"),
            ],
        }),
    )
    .await;
    assert_eq!(
        verdicts(&r),
        [
            "accepted",
            "wrong_answer",
            "time_limit",
            "runtime_error",
            "memory_limit"
        ],
        "{r}"
    );
    assert_eq!(r["verdict"], "wrong_answer", "{r}");
    assert_eq!(r["first_failure"], 1, "{r}");
    assert_eq!(r["checker"], "lines");
    assert_eq!(r["tests"][3]["run"]["signal"], "SIGSEGV", "{r}");
    assert_eq!(r["tests"][0]["run"]["stdout"], "42\n", "{r}");
    assert!(r["tests"][0]["run"]["wall_time_ms"].is_u64(), "{r}");
    assert!(r["compile"].is_null(), "python has no compile stage: {r}");

    // stop_on_first_failure: everything after the first failure is skipped, not run.
    let r = judge(
        api,
        json!({
            "language": "python",
            "source": PY_VERDICTS,
            "stop_on_first_failure": true,
            "tests": [test("ok\n", "42\n"), test("wrong\n", "42\n"), test("slow\n", "42\n"), test("ok\n", "42\n")],
        }),
    )
    .await;
    assert_eq!(
        verdicts(&r),
        ["accepted", "wrong_answer", "skipped", "skipped"],
        "{r}"
    );
    assert!(
        r["tests"][2]["run"].is_null(),
        "a skipped test did not run: {r}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cpp_program_compiles_once_and_earns_each_verdict() {
    let _cpp = CPP.lock().await;
    let agent = agent("judge-cpp").await;
    let api = &agent.api;
    let source = r#"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
int main() {
    char what[32] = {0};
    if (scanf("%31s", what) != 1) return 3;
    if (!strcmp(what, "ok")) { printf("42\n"); return 0; }
    if (!strcmp(what, "wrong")) { printf("41\n"); return 0; }
    if (!strcmp(what, "slow")) { volatile unsigned long x = 0; for (;;) x++; }
    if (!strcmp(what, "crash")) { volatile int *p = nullptr; *p = 1; }
    if (!strcmp(what, "memory")) {
        std::vector<char*> keep;
        for (;;) { char *b = (char*)malloc(16 << 20); memset(b, 1, 16 << 20); keep.push_back(b); }
    }
    return 2;
}
"#;
    let r = judge(
        api,
        json!({
            "language": "cpp",
            "source": source,
            "limits": {"wall_time_ms": 2000, "cpu_time_ms": 1000, "memory_bytes": 134217728},
            "tests": [
                test("ok", "42"),
                test("wrong", "42"),
                test("slow", "42"),
                test("crash", "42"),
                test("memory", "42"),
            ],
        }),
    )
    .await;
    assert_eq!(
        verdicts(&r),
        [
            "accepted",
            "wrong_answer",
            "time_limit",
            "runtime_error",
            "memory_limit"
        ],
        "{r}"
    );
    assert_eq!(r["compile"]["status"], "ok", "one compile stage: {r}");
    assert_eq!(r["tests"][3]["run"]["signal"], "SIGSEGV", "{r}");

    // Twenty hellos: one compile, twenty runs, against twenty separate executes.
    let hello = "#include <cstdio>\nint main(){printf(\"hello\\n\");}\n";
    let compiles_before = compiles(api).await;
    let started = Instant::now();
    let r = judge(
        api,
        json!({"language": "cpp", "source": hello, "tests": vec![test("", "hello\n"); 20]}),
    )
    .await;
    let judged = started.elapsed();
    assert_eq!(r["verdict"], "accepted", "{r}");
    assert_eq!(verdicts(&r).len(), 20);
    assert_eq!(
        compiles(api).await - compiles_before,
        1.0,
        "20 tests, one compile (the agent's count)"
    );
    let started = Instant::now();
    for _ in 0..20 {
        let e = api
            .execute(json!({"language": "cpp", "source": hello}))
            .await;
        assert_eq!(e["run"]["stdout"], "hello\n", "{e}");
    }
    let separate = started.elapsed();
    println!(
        "20 C++ hellos: judged in {:.0} ms (one compile), 20 executes in {:.0} ms",
        judged.as_secs_f64() * 1e3,
        separate.as_secs_f64() * 1e3
    );

    // A compile error: no test runs, every test is skipped.
    let r = judge(
        api,
        json!({"language": "cpp", "source": "int main( {", "tests": [test("", ""), test("", "")]}),
    )
    .await;
    assert_eq!(r["verdict"], "compile_error", "{r}");
    // The compile stage as `/v1/execute` reports it: the compiler's own exit.
    assert_eq!(r["compile"]["status"], "runtime_error", "{r}");
    assert!(r["first_failure"].is_null(), "{r}");
    assert_eq!(verdicts(&r), ["skipped", "skipped"], "{r}");
    agent.stop().await;
}

/// A file written and a process left behind by one test are gone for the next; the program's
/// own files cannot be changed or removed by a test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_one_test_is_seen_by_the_next() {
    let agent = agent("judge-isolation").await;
    let source = r##"
import os, subprocess, sys
first = sys.stdin.readline().strip() == "first"
seen = []
for path in ["/work/left.txt", "/tmp/left.txt", "/dev/shm/left.txt", "/work/sub/left.txt"]:
    if os.path.exists(path):
        seen.append(path)
others = [p for p in os.listdir("/proc") if p.isdigit() and int(p) not in (1, os.getpid())]
if first:
    os.makedirs("/work/sub", exist_ok=True)
    for path in ["/work/left.txt", "/tmp/left.txt", "/dev/shm/left.txt", "/work/sub/left.txt"]:
        open(path, "w").write("x")
    subprocess.Popen(["sleep", "1000"], start_new_session=True)
    # The program's own file cannot be changed or removed.
    for attempt in [lambda: open("/work/main.py", "a").write("#"), lambda: os.remove("/work/main.py")]:
        try:
            attempt()
            print("changed the program")
        except OSError:
            pass
    print("wrote")
else:
    print("seen", seen, "others", len(others))
"##;
    let r = judge(
        &agent.api,
        json!({
            "language": "python",
            "source": source,
            "checker": {"type": "exact"},
            "tests": [test("first\n", "wrote\n"), test("second\n", "seen [] others 0\n"), test("second\n", "seen [] others 0\n")],
        }),
    )
    .await;
    assert_eq!(verdicts(&r), ["accepted", "accepted", "accepted"], "{r}");
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_checker_judges_by_its_rule() {
    let _cpp = CPP.lock().await;
    let agent = agent("judge-checkers").await;
    let api = &agent.api;
    let echo = "import sys\nsys.stdout.write(sys.stdin.read())";
    let with = |checker: Value, cases: Vec<(&str, &str)>| {
        json!({
            "language": "python",
            "source": echo,
            "checker": checker,
            "tests": cases.into_iter().map(|(out, want)| test(out, want)).collect::<Vec<_>>(),
        })
    };
    // (output, expected) pairs, the same for exact and lines: exact tells trailing space.
    let cases = vec![
        ("1 2\n", "1 2\n"),
        ("1 2  \n\n", "1 2\n"),
        (" 1 2\n", "1 2\n"),
    ];
    let r = judge(api, with(json!({"type": "exact"}), cases.clone())).await;
    assert_eq!(
        verdicts(&r),
        ["accepted", "wrong_answer", "wrong_answer"],
        "{r}"
    );
    let r = judge(api, with(json!({"type": "lines"}), cases.clone())).await;
    assert_eq!(
        verdicts(&r),
        ["accepted", "accepted", "wrong_answer"],
        "{r}"
    );
    let r = judge(api, with(json!({"type": "tokens"}), cases)).await;
    assert_eq!(verdicts(&r), ["accepted", "accepted", "accepted"], "{r}");
    let r = judge(
        api,
        with(
            json!({"type": "float", "abs_tol": 0.001, "rel_tol": 0}),
            vec![("0.3334 x\n", "0.3333 x"), ("0.335 x", "0.3333 x")],
        ),
    )
    .await;
    assert_eq!(verdicts(&r), ["accepted", "wrong_answer"], "{r}");
    assert_eq!(r["checker"], "float");

    // A checker program (in C++, judging a Python program): the sum of the input's numbers is
    // the answer, whatever the expected file says; what it prints is the message.
    let checker = r#"
#include <fstream>
#include <cstdio>
int main(int argc, char **argv) {
    std::ifstream in(argv[1]), out(argv[3]);
    long a, b, got;
    in >> a >> b;
    if (!(out >> got)) { printf("no number\n"); return 1; }
    if (got == a + b) { printf("sum ok\n"); return 0; }
    printf("want %ld got %ld\n", a + b, got);
    return 1;
}
"#;
    let sum = "a, b = map(int, input().split())\nprint(a + b if a >= 0 else a - b)";
    let r = judge(
        api,
        json!({
            "language": "python",
            "source": sum,
            "checker": {"type": "program", "language": "cpp", "source": checker},
            "tests": [test("1 2\n", "ignored"), test("-1 5\n", ""), test("7 8\n", "")],
        }),
    )
    .await;
    assert_eq!(
        verdicts(&r),
        ["accepted", "wrong_answer", "accepted"],
        "{r}"
    );
    assert_eq!(r["tests"][0]["message"], "sum ok", "{r}");
    assert_eq!(r["tests"][1]["message"], "want 4 got -6", "{r}");
    assert_eq!(r["checker"], "program");

    // A checker that fails (exit 2, or does not compile) is the test's internal_error; a
    // test that did not complete never reaches the checker.
    let failing = "import sys\nprint('broken', file=sys.stderr)\nsys.exit(2)";
    let r = judge(
        api,
        json!({
            "language": "python",
            "source": "import sys\nx = input()\nif x == 'crash': sys.exit(3)\nprint(x)",
            "checker": {"type": "program", "language": "python", "source": failing},
            "tests": [test("1\n", "1\n"), test("crash\n", "")],
        }),
    )
    .await;
    assert_eq!(verdicts(&r), ["internal_error", "runtime_error"], "{r}");
    let why = r["tests"][0]["message"].as_str().unwrap_or("");
    assert!(
        why.contains("exited with 2") && why.contains("broken"),
        "{r}"
    );
    let r = judge(
        api,
        json!({
            "language": "python",
            "source": "print(1)",
            "checker": {"type": "program", "language": "cpp", "source": "int main( {"},
            "tests": [test("", "1")],
        }),
    )
    .await;
    assert_eq!(verdicts(&r), ["internal_error"], "{r}");
    assert!(
        r["tests"][0]["message"]
            .as_str()
            .unwrap_or("")
            .contains("did not compile"),
        "{r}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_judge_requests_are_refused_before_anything_runs() {
    let agent = agent("judge-refusals").await;
    let api = &agent.api;
    let base = || json!({"language": "python", "source": "print(1)", "tests": [test("", "1")]});
    let mut too_many = base();
    too_many["tests"] = json!(vec![test("", ""); 257]);
    let mut too_big = base();
    too_big["tests"] = json!([test(&"x".repeat(9 << 20), &"y".repeat(8 << 20))]);
    let mut stdin = base();
    stdin["stdin"] = json!("1");
    let mut checker = base();
    checker["checker"] = json!({"type": "regex"});
    let mut tolerance = base();
    tolerance["checker"] = json!({"type": "float", "abs_tol": -1});
    let mut test_memory = base();
    test_memory["tests"][0]["limits"] = json!({"memory_bytes": 1 << 26});
    let mut test_over_max = base();
    test_over_max["tests"][0]["limits"] = json!({"wall_time_ms": 1u64 << 40});
    let mut checker_language = base();
    checker_language["checker"] = json!({"type": "program", "language": "cobol", "source": "x"});
    let mut checker_file = base();
    checker_file["checker"] = json!({"type": "program", "language": "python",
        "files": [{"name": "main.py", "content": "1"}, {"name": "output.txt", "content": "1"}]});
    let mut no_tests = base();
    no_tests.as_object_mut().unwrap().remove("tests");
    let cases = [
        ("too many tests", too_many, "invalid_request"),
        ("too much input", too_big, "invalid_request"),
        ("stdin at top level", stdin, "invalid_request"),
        ("unknown checker", checker, "invalid_request"),
        ("negative tolerance", tolerance, "invalid_request"),
        ("a test's memory", test_memory, "invalid_request"),
        (
            "a test's limit over the maximum",
            test_over_max,
            "limit_exceeds_max",
        ),
        ("checker language", checker_language, "unknown_language"),
        ("checker file name", checker_file, "invalid_request"),
        ("no tests", no_tests, "invalid_request"),
    ];
    for (what, body, code) in cases {
        let a = api.post("/v1/judge", &body).await;
        assert_eq!(a.status.as_u16() / 100, 4, "{what}: {a:?}");
        assert_eq!(a.code(), code, "{what}: {a:?}");
        assert_eq!(
            a.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{what}"
        );
    }
    agent.stop().await;
}

/// A judge asking for its events (`Accept: application/x-ndjson`): the lines, parsed.
async fn judge_events(api: &Api, body: &Value) -> Vec<Value> {
    let resp = api
        .http
        .post(format!("{}/v1/judge", api.url))
        .header("accept", "application/x-ndjson")
        .json(body)
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(
        resp.headers()["content-type"].to_str().unwrap(),
        "application/x-ndjson"
    );
    let text = resp.text().await.expect("body");
    text.lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect()
}

/// `Accept: application/x-ndjson`: accepted, compile, one test event per test, then result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_judge_streams_one_event_per_test() {
    let _cpp = CPP.lock().await;
    let agent = agent("judge-stream").await;
    let api = &agent.api;
    let body = json!({
        "language": "cpp",
        "source": "#include <cstdio>\nint main(){int x; scanf(\"%d\",&x); printf(\"%d\\n\", x*2);}",
        "tests": [test("1", "2"), test("2", "5"), test("3", "6")],
    });
    let events = judge_events(api, &body).await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["accepted", "compile", "test", "test", "test", "result"],
        "{events:?}"
    );
    assert_eq!(events[1]["result"]["status"], "ok");
    let tests: Vec<(u64, &str)> = events[2..5]
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["result"]["verdict"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        tests,
        [(0, "accepted"), (1, "wrong_answer"), (2, "accepted")]
    );
    let result = &events[5]["result"];
    assert_eq!(result["verdict"], "wrong_answer");
    assert_eq!(result["first_failure"], 1);
    assert_eq!(result["id"], events[0]["id"]);
    agent.stop().await;
}

/// Through a gateway: routed by the program's language, the answer passed through with the
/// node and attempts; refusals at the gateway's edge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_routes_a_judge_and_passes_its_answer_through() {
    let cluster = Cluster::named("judge-gw")
        .languages(&["python"])
        .start()
        .await;
    let api = &cluster.api;
    let r = judge(
        api,
        json!({
            "language": "python",
            "source": "print(int(input()) + 1)",
            "tests": [test("1", "2"), test("5", "7")],
        }),
    )
    .await;
    assert_eq!(verdicts(&r), ["accepted", "wrong_answer"], "{r}");
    assert_eq!(r["node"], cluster.node_ids()[0], "{r}");
    assert_eq!(r["attempts"], 1, "{r}");

    // Streamed through the gateway: the agent's events, one per test, the result completed
    // with the gateway's part.
    let events = judge_events(
        api,
        &json!({
            "language": "python",
            "source": "print(int(input()) + 1)",
            "tests": [test("1", "2"), test("5", "7")],
        }),
    )
    .await;
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["accepted", "test", "test", "result"], "{events:?}");
    let result = &events[3]["result"];
    assert_eq!(verdicts(result), ["accepted", "wrong_answer"], "{result}");
    assert_eq!(result["node"], cluster.node_ids()[0], "{result}");
    assert_eq!(result["attempts"], 1, "{result}");
    let a = api
        .post(
            "/v1/judge",
            &json!({"language": "python", "source": "print(1)", "stdin": "x", "tests": [test("", "")]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    let a = api
        .post(
            "/v1/judge",
            &json!({"language": "python", "source": "print(1)", "tests": vec![test("", ""); 300]}),
        )
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
}
