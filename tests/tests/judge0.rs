//! The Judge0 CE compatible API of a real gateway in front of real agents on the real Docker
//! engine: the official Judge0 Python client from PyPI (`judge0`), installed by the test in a
//! venv of its own and used unchanged through its public functions (tests/judge0_client.py);
//! and the HTTP surface itself, with reqwest: authentication, languages, statuses, the
//! configuration, submissions waited for and polled, field selection, base64, batches and
//! Judge0's error shapes.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use base64::Engine;
use codefleet_tests::{assert_nothing_left, Answer, Api, Cluster, StatusCode, TestGateway};
use serde_json::{json, Value};

/// The API key the gateways of these tests take (`X-Auth-Token` carries it).
const KEY: &str = "judge0-test-key";

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn unb64(value: &Value) -> String {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("base64 text, got {value}"));
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_else(|e| panic!("{text:?} is not base64: {e}"));
    String::from_utf8(bytes).unwrap()
}

/// A venv with the `judge0` package from PyPI, made once for this test.
fn client_venv(dir: &std::path::Path) -> PathBuf {
    let venv = dir.join("venv");
    let made = Command::new("python3")
        .args(["-m", "venv"])
        .arg(&venv)
        .status()
        .expect("python3 runs");
    assert!(made.success(), "python3 -m venv failed: {made}");
    let python = venv.join("bin/python");
    let installed = Command::new(&python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "judge0",
        ])
        .status()
        .expect("pip runs");
    assert!(
        installed.success(),
        "pip install judge0 failed: {installed}"
    );
    python
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_client_runs_submissions_unchanged() {
    let mut cluster = Cluster::named("judge0-client")
        .languages(&["python", "cpp"])
        .gateway_arg("--api-key", KEY)
        .start()
        .await;
    let dir = std::env::temp_dir().join(format!("codefleet-judge0-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let python = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || client_venv(&dir)
    })
    .await
    .unwrap();
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("judge0_client.py");
    let url = cluster.gateway.url();
    let ran = tokio::task::spawn_blocking(move || {
        Command::new(python)
            .arg(script)
            .args([url.as_str(), KEY])
            .env("JUDGE0_SUPPRESS_PREVIEW_WARNING", "1")
            .output()
            .expect("the client script runs")
    })
    .await
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&ran.stdout);
    let stderr = String::from_utf8_lossy(&ran.stderr);
    assert!(
        ran.status.success(),
        "the client failed ({}):\n{stdout}\n{stderr}",
        ran.status
    );
    let seen: Value = serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("no summary ({e}):\n{stdout}\n{stderr}"));
    eprintln!("the Judge0 client saw: {seen}");
    assert_eq!(seen["about_version"], "1.13.1");
    let ids: Vec<u64> = seen["languages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    for id in [71, 52, 54, 105, 113] {
        assert!(ids.contains(&id), "language {id} listed: {ids:?}");
    }
    assert_eq!(seen["python"]["status"], 3);
    assert_eq!(seen["python"]["stdout"], "hello, judge0\n");
    assert_eq!(seen["cpp"]["stdout"], "zipped 2 first\n");
    assert_eq!(seen["compile_error"]["status"], 6);
    assert_eq!(seen["time_limit"]["status"], 5);
    assert_eq!(seen["batch"]["statuses"], json!([3, 3, 4, 3]));
    assert_eq!(seen["mixed"]["statuses"], json!([3, 3]));
    assert_nothing_left(cluster.stop().await).await;
}

/// A client sending `X-Auth-Token`.
fn judge0(cluster: &Cluster) -> Judge0 {
    Judge0 {
        api: cluster.gateway.api(None),
    }
}

struct Judge0 {
    api: Api,
}

impl Judge0 {
    async fn get(&self, path: &str) -> Answer {
        let url = format!("{}{path}", self.api.url);
        codefleet_tests::send(self.api.http.get(url).header("X-Auth-Token", KEY)).await
    }

    async fn post(&self, path: &str, body: &Value) -> Answer {
        let url = format!("{}{path}", self.api.url);
        let request = self
            .api
            .http
            .post(url)
            .header("X-Auth-Token", KEY)
            .json(body);
        codefleet_tests::send(request).await
    }

    async fn post_raw(&self, path: &str, body: &'static str) -> Answer {
        let url = format!("{}{path}", self.api.url);
        let request = self.api.http.post(url).header("X-Auth-Token", KEY);
        let request = request
            .header("content-type", "application/json")
            .body(body);
        codefleet_tests::send(request).await
    }

    /// Polls a token until Judge0 would call it done (status id above 2).
    async fn finished(&self, token: &str, query: &str) -> Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let answer = self.get(&format!("/submissions/{token}?{query}")).await;
            assert_eq!(answer.status, StatusCode::OK, "{answer:?}");
            if answer.body["status"]["id"].as_u64().unwrap() > 2 {
                return answer.body;
            }
            assert!(Instant::now() < deadline, "{token} not done: {answer:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn assert_judge0_error(answer: &Answer, status: StatusCode) {
    assert_eq!(answer.status, status, "{answer:?}");
    assert_eq!(
        answer.headers["content-type"], "application/json",
        "Judge0's shape, not problem+json: {answer:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_surface_speaks_judge0() {
    let mut cluster = Cluster::named("judge0-http")
        .languages(&["python"])
        .gateway_arg("--api-key", KEY)
        .start()
        .await;
    let j = judge0(&cluster);

    // Authentication: X-Auth-Token or Bearer; otherwise Judge0's bare 401.
    let none = cluster.gateway.api(None).get("/languages").await;
    assert_eq!(none.status, StatusCode::UNAUTHORIZED, "{none:?}");
    assert_eq!(none.body, Value::String(String::new()), "no body: {none:?}");
    let http = &cluster.gateway.api(None).http;
    let wrong = http
        .get(format!("{}/about", cluster.gateway.url()))
        .header("X-Auth-Token", "nope");
    assert_eq!(
        codefleet_tests::send(wrong).await.status,
        StatusCode::UNAUTHORIZED
    );
    let bearer = cluster.gateway.api(Some(KEY)).get("/about").await;
    assert_eq!(bearer.status, StatusCode::OK, "{bearer:?}");

    // Languages: both id sets, the real versions, only what the fleet serves.
    let languages = j.get("/languages").await;
    assert_eq!(languages.status, StatusCode::OK);
    let list = languages.body.as_array().unwrap();
    let name_of = |id: u64| {
        list.iter()
            .find(|l| l["id"] == id)
            .map(|l| l["name"].as_str().unwrap().to_string())
    };
    let old = name_of(71).expect("71 listed");
    let new = name_of(113).expect("113 listed");
    assert!(old.starts_with("Python (3.11"), "{old}");
    assert!(new.starts_with("Python (3.13"), "{new}");
    assert_eq!(name_of(54), None, "C++ is not served by this fleet");
    assert!(list.iter().all(|l| l.as_object().unwrap().len() == 2));
    let one = j.get("/languages/92").await;
    assert_eq!(one.body["source_file"], "main.py", "{one:?}");
    assert_eq!(one.body["is_archived"], false);
    assert_judge0_error(&j.get("/languages/54").await, StatusCode::NOT_FOUND);

    let statuses = j.get("/statuses").await.body;
    assert_eq!(statuses.as_array().unwrap().len(), 14);
    assert_eq!(statuses[2], json!({"id": 3, "description": "Accepted"}));
    assert_eq!(
        statuses[11],
        json!({"id": 12, "description": "Runtime Error (Other)"})
    );
    assert_eq!(j.get("/about").await.body["version"], "1.13.1");
    let config = j.get("/config_info").await.body;
    assert_eq!(config["max_submission_batch_size"], 20);
    assert_eq!(config["memory_limit"], 262_144);
    assert_eq!(config["enable_compiler_options"], false);
    let workers = j.get("/workers").await.body;
    assert!(workers[0]["available"].as_u64().unwrap() > 0, "{workers}");

    // wait=true, plain text, default fields.
    let body = json!({"source_code": "print(input()[::-1])", "language_id": 71, "stdin": "abc"});
    let waited = j.post("/submissions?wait=true", &body).await;
    assert_eq!(waited.status, StatusCode::CREATED, "{waited:?}");
    let mut keys: Vec<&str> = waited
        .body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "compile_output",
            "memory",
            "message",
            "status",
            "stderr",
            "stdout",
            "time",
            "token"
        ]
    );
    assert_eq!(waited.body["stdout"], "cba\n");
    assert_eq!(waited.body["status"]["id"], 3);
    let time: f64 = waited.body["time"].as_str().unwrap().parse().unwrap();
    assert!(time >= 0.0);
    assert!(waited.body["memory"].as_u64().unwrap() > 0);

    // base64 both ways, fields chosen, an expected output that is not met, several runs.
    let body = json!({"source_code": b64("print(1)"), "language_id": 113,
        "expected_output": b64("2"), "number_of_runs": 2});
    let wrong = j
        .post(
            "/submissions?wait=true&base64_encoded=true&fields=stdout,status_id,language",
            &body,
        )
        .await;
    assert_eq!(wrong.status, StatusCode::CREATED, "{wrong:?}");
    assert_eq!(wrong.body.as_object().unwrap().len(), 3, "{wrong:?}");
    assert_eq!(unb64(&wrong.body["stdout"]), "1\n");
    assert_eq!(wrong.body["status_id"], 4);
    assert_eq!(wrong.body["language"]["id"], 113);

    // A memory limit is reported as Judge0 clients know a memory kill: Runtime Error (Other),
    // signal 9.
    let hog = json!({"source_code": "x = bytearray(400 * 1024 * 1024)\nprint(len(x))",
        "language_id": 71, "memory_limit": 65536});
    let killed = j
        .post(
            "/submissions?wait=true&fields=status,exit_signal,message",
            &hog,
        )
        .await;
    assert_eq!(killed.status, StatusCode::CREATED, "{killed:?}");
    assert_eq!(killed.body["status"]["id"], 12, "{killed:?}");
    assert_eq!(killed.body["exit_signal"], 9, "{killed:?}");
    assert_eq!(killed.body["message"], "Memory limit exceeded");

    // Judge0's error shapes.
    let missing = j.post("/submissions", &json!({"stdin": "x"})).await;
    assert_judge0_error(&missing, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(missing.body["source_code"], json!(["can't be blank"]));
    assert_eq!(missing.body["language_id"], json!(["can't be blank"]));
    let limits = j
        .post(
            "/submissions",
            &json!({"source_code": "x", "language_id": 54, "cpu_time_limit": 99}),
        )
        .await;
    assert_judge0_error(&limits, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        limits.body["language_id"],
        json!(["language with id 54 doesn't exist"])
    );
    assert!(limits.body["cpu_time_limit"][0]
        .as_str()
        .unwrap()
        .starts_with("must be less than"));
    let fields = j.get("/submissions/whatever?fields=stdout,bogus").await;
    assert_judge0_error(&fields, StatusCode::BAD_REQUEST);
    assert_eq!(fields.body["error"], "invalid fields: [bogus]");
    assert_judge0_error(
        &j.get("/submissions/not-a-token").await,
        StatusCode::NOT_FOUND,
    );

    // Asynchronous: a token, polled with every field; a runtime error's signal.
    let crash =
        "import os, signal\nprint('before', flush=True)\nos.kill(os.getpid(), signal.SIGSEGV)\n";
    let created = j
        .post(
            "/submissions",
            &json!({"source_code": crash, "language_id": 71}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    assert_eq!(
        created.body.as_object().unwrap().len(),
        1,
        "only the token: {created:?}"
    );
    let token = created.body["token"].as_str().unwrap().to_string();
    let all = j.finished(&token, "fields=*").await;
    assert_eq!(all.as_object().unwrap().len(), 35, "{all}");
    assert_eq!(
        all["status"],
        json!({"id": 7, "description": "Runtime Error (SIGSEGV)"})
    );
    assert_eq!(all["exit_signal"], 11);
    assert_eq!(all["stdout"], "before\n");
    assert_eq!(all["token"], token.as_str());
    assert_eq!(all["language_id"], 71);
    assert!(all["created_at"].as_str().unwrap().ends_with('Z'), "{all}");

    // Batches: one bad entry among good ones; read back with an unknown token among them.
    let batch = json!({"submissions": [
        {"source_code": b64("print('a')"), "language_id": 71},
        {"source_code": b64("print('b')"), "language_id": 9999},
        {"source_code": b64("import sys\nprint(sys.argv[1:])"), "language_id": 92,
            "command_line_arguments": "x 'y z'"},
    ]});
    let created = j
        .post("/submissions/batch?base64_encoded=true", &batch)
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let entries = created.body.as_array().unwrap();
    assert_eq!(
        entries[1]["language_id"],
        json!(["language with id 9999 doesn't exist"])
    );
    let (first, third) = (
        entries[0]["token"].as_str().unwrap(),
        entries[2]["token"].as_str().unwrap(),
    );
    j.finished(first, "").await;
    j.finished(third, "").await;
    let read = j
        .get(&format!("/submissions/batch?tokens={first},bogus,{third}&base64_encoded=true&fields=stdout,status"))
        .await;
    assert_eq!(read.status, StatusCode::OK, "{read:?}");
    let read = read.body["submissions"].as_array().unwrap().clone();
    assert_eq!(unb64(&read[0]["stdout"]), "a\n");
    assert_eq!(read[1], Value::Null);
    assert_eq!(unb64(&read[2]["stdout"]), "['x', 'y z']\n");
    let too_many = json!({"submissions": vec![json!({"source_code": "1", "language_id": 71}); 21]});
    assert_judge0_error(
        &j.post("/submissions/batch", &too_many).await,
        StatusCode::BAD_REQUEST,
    );

    // The Judge0 layer's own metrics, beside the requests its routes count.
    let metrics = cluster.gateway.api(None).get("/metrics").await;
    let text = metrics.body.as_str().unwrap_or_default();
    assert!(
        text.contains("codefleet_judge0_submissions_total{mode=\"wait\"}"),
        "{text}"
    );
    assert!(
        text.contains("codefleet_judge0_results_total{status=\"4\"}"),
        "{text}"
    );

    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_any_node_reports_submissions_are_refused_as_a_full_judge0_queue() {
    let mut gateway = TestGateway::start(&["--api-key".to_string(), KEY.to_string()]).await;
    let j = Judge0 {
        api: gateway.api(None),
    };
    let body = json!({"source_code": "print(1)", "language_id": 71});
    let full = j.post("/submissions?wait=true", &body).await;
    assert_judge0_error(&full, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        full.body["error"].as_str().unwrap().contains("python"),
        "{full:?}"
    );
    assert!(full.headers.contains_key("retry-after"), "{full:?}");
    let batch = j
        .post("/submissions/batch", &json!({"submissions": [body]}))
        .await;
    assert_judge0_error(&batch, StatusCode::SERVICE_UNAVAILABLE);
    // The input is still checked first.
    let blank = j.post("/submissions", &json!({"language_id": 71})).await;
    assert_judge0_error(&blank, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(blank.body, json!({"source_code": ["can't be blank"]}));
    assert_eq!(j.get("/languages").await.body, json!([]));
    let malformed = j.post_raw("/submissions", "{").await;
    assert_judge0_error(&malformed, StatusCode::BAD_REQUEST);
    assert!(malformed.body["error"]
        .as_str()
        .unwrap()
        .starts_with("malformed JSON"));
    assert_judge0_error(&j.get("/submissions/batch").await, StatusCode::BAD_REQUEST);
    let empty = j
        .post("/submissions/batch", &json!({"submissions": []}))
        .await;
    assert_eq!(
        empty.body["error"],
        "there should be at least one submission in a batch"
    );
    // The HTTP layer's refusals stay problem+json on these routes too.
    let put = j
        .api
        .http
        .put(format!("{}/submissions", j.api.url))
        .header("X-Auth-Token", KEY);
    let put = codefleet_tests::send(put).await;
    assert_eq!(put.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(put.headers["content-type"], "application/problem+json");
    gateway.stop().await;
}
