//! The Piston v2 API (`/api/v2/`) of a real gateway in front of real agents on the real Docker
//! engine, driven by a Piston client: the `piston_rs` crate from crates.io, with the key in
//! Piston's `Authorization` header. `piston_rs` reads only `stdout`, `stderr`, `output`, `code`
//! and `signal` of a stage (and has no WebSocket); the rest (`status`, `message`, the times, the
//! `runtime` field, `/api/v2/connect`, the error bodies) is read with reqwest and
//! tokio-tungstenite. Each test ends by stopping its cluster and finding none of its containers.

use std::time::Duration;

use codefleet_tests::{assert_nothing_left, Cluster, StatusCode};
use futures_util::{SinkExt, StreamExt};
use piston_rs::{Client, Executor, File};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

const KEY: &str = "piston-client-key";

/// Every language of the built-in catalog: a hello in each family the fixture brings up.
const FAMILIES: &[&str] = &[
    "python",
    "javascript",
    "go",
    "java",
    "cpp",
    "rust",
    "c",
    "typescript",
    "bash",
    "ruby",
    "php",
    "lua",
    "perl",
    "sqlite",
    "csharp",
];

async fn cluster(test: &str, languages: &[&'static str]) -> Cluster {
    Cluster::named(test)
        .languages(languages)
        .gateway_arg("--api-key", KEY)
        .start()
        .await
}

fn piston(cluster: &Cluster) -> Client {
    Client::with_url_and_key(&format!("{}/api/v2", cluster.gateway.url()), KEY)
}

/// A raw request to `/api/v2{path}` with Piston's `Authorization` header.
async fn raw(cluster: &Cluster, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let url = format!("{}/api/v2{path}", cluster.gateway.url());
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = cluster
        .api
        .http
        .request(method, url)
        .header("authorization", KEY);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("the gateway answers");
    let status = response.status().as_u16();
    let text = response.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

fn file(name: &str, content: &str) -> File {
    File::default().set_name(name).set_content(content)
}

/// A hello in `language` (the catalog's name), as a Piston client names it, and its file.
fn hello(language: &str) -> (&'static str, &'static str, &'static str) {
    match language {
        "python" => ("python", "main.py", "print('hello')\n"),
        "javascript" => ("js", "main.js", "console.log('hello')\n"),
        "go" => (
            "go",
            "main.go",
            "package main\nimport \"fmt\"\nfunc main() { fmt.Println(\"hello\") }\n",
        ),
        "java" => (
            "java",
            "Main.java",
            "public class Main { public static void main(String[] a) { System.out.println(\"hello\"); } }\n",
        ),
        "cpp" => (
            "c++",
            "main.cpp",
            "#include <iostream>\nint main() { std::cout << \"hello\" << std::endl; }\n",
        ),
        "rust" => ("rust", "main.rs", "fn main() { println!(\"hello\"); }\n"),
        "c" => (
            "c",
            "main.c",
            "#include <stdio.h>\nint main(void) { puts(\"hello\"); return 0; }\n",
        ),
        "typescript" => ("ts", "main.ts", "const s: string = 'hello';\nconsole.log(s);\n"),
        "bash" => ("bash", "main.sh", "echo hello\n"),
        "ruby" => ("ruby", "main.rb", "puts 'hello'\n"),
        "php" => ("php", "main.php", "<?php echo \"hello\\n\";\n"),
        "lua" => ("lua", "main.lua", "print('hello')\n"),
        "perl" => ("perl", "main.pl", "print \"hello\\n\";\n"),
        "sqlite" => ("sqlite3", "main.sql", "SELECT 'hello';\n"),
        "csharp" => (
            "csharp",
            "main.cs",
            "public class P { public static void Main() { System.Console.WriteLine(\"hello\"); } }\n",
        ),
        other => panic!("no hello for {other}"),
    }
}

fn is_semver(version: &str) -> bool {
    let parts: Vec<&str> = version.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<u64>().is_ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_piston_client_runs_every_family() {
    let mut cluster = cluster("piston-families", FAMILIES).await;
    let client = piston(&cluster);

    // Runtimes: Piston's names and semver versions, one entry per runtime.
    let runtimes = client.fetch_runtimes().await.expect("runtimes");
    for language in FAMILIES {
        let (name, _, _) = hello(language);
        let of: Vec<_> = runtimes
            .iter()
            .filter(|r| r.language == name || r.aliases.iter().any(|a| a == name))
            .collect();
        assert!(!of.is_empty(), "{name} is not listed: {runtimes:?}");
        for r in of {
            assert!(is_semver(&r.version), "{r:?}");
        }
    }
    let listed: Vec<&str> = runtimes.iter().map(|r| r.language.as_str()).collect();
    assert!(
        listed.contains(&"c++") && listed.contains(&"sqlite3"),
        "{listed:?}"
    );
    let (status, raw_runtimes) = raw(&cluster, "GET", "/runtimes", None).await;
    assert_eq!(status, 200);
    let node = raw_runtimes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["language"] == "javascript")
        .expect("javascript");
    assert_eq!(node["runtime"], "node", "{node}");
    let python = raw_runtimes
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["language"] == "python")
        .expect("python");
    assert!(python.get("runtime").is_none(), "{python}");
    let (status, packages) = raw(&cluster, "GET", "/packages", None).await;
    assert_eq!(status, 200);
    assert!(
        packages
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["language"] == "gcc"
                && p["installed"] == true
                && is_semver(p["language_version"].as_str().unwrap())),
        "{packages}"
    );

    // Hello in every family, newest runtime ("*"), through piston_rs.
    for language in FAMILIES {
        let (name, file_name, source) = hello(language);
        // A compile starved by the other tests on two cores may outlast the default 10 s.
        let executor = Executor::new()
            .set_language(name)
            .set_version("*")
            .set_compile_timeout(60_000)
            .add_file(file(file_name, source));
        let answer = client.execute(&executor).await.expect("an answer");
        assert_eq!(answer.status, 200, "{name}: {answer:?}");
        assert_eq!(answer.run.stdout, "hello\n", "{name}: {answer:?}");
        assert_eq!(answer.run.output, "hello\n", "{name}: {answer:?}");
        assert_eq!(answer.run.code, Some(0), "{name}: {answer:?}");
        assert!(is_semver(&answer.version), "{answer:?}");
        if let Some(compile) = &answer.compile {
            assert_eq!(compile.code, Some(0), "{name}: {answer:?}");
        }
    }

    // A version selector picks the newest match; an older runtime by its exact version.
    let py = |version: &str| {
        Executor::new()
            .set_language("python")
            .set_version(version)
            .add_file(file("v.py", "import sys; print(sys.version.split()[0])"))
    };
    let newest = client.execute(&py("3.x")).await.unwrap();
    let oldest = runtimes
        .iter()
        .filter(|r| r.language == "python")
        .map(|r| r.version.clone())
        .min_by_key(|v| {
            v.split('.')
                .map(|p| p.parse::<u64>().unwrap())
                .collect::<Vec<_>>()
        })
        .unwrap();
    let older = client.execute(&py(&oldest)).await.unwrap();
    assert_eq!(older.version, oldest, "{older:?}");
    assert_eq!(older.run.stdout.trim(), oldest, "{older:?}");
    assert!(newest.version >= older.version, "{newest:?} {older:?}");

    // A compile error: the compile stage's result, and Piston's `run` copy of it.
    let broken = Executor::new()
        .set_language("cpp")
        .set_version("*")
        .add_file(file("main.cpp", "int main() { return missing; }\n"));
    let answer = client.execute(&broken).await.expect("an answer");
    assert_eq!(answer.status, 200, "{answer:?}");
    let compile = answer.compile.as_ref().expect("a compile stage");
    assert_ne!(compile.code, Some(0), "{answer:?}");
    assert!(compile.stderr.contains("missing"), "{answer:?}");
    assert_eq!(answer.run.stderr, compile.stderr, "{answer:?}");
    let body = json!({"language": "c++", "version": "*",
                      "files": [{"content": "int main() { return missing; }\n"}]});
    let (status, answer) = raw(&cluster, "POST", "/execute", Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["compile"]["status"], "RE", "{answer}");
    assert_eq!(answer["run"], answer["compile"], "{answer}");

    let nodes = cluster.stop().await;
    assert_nothing_left(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stages_limits_stdin_args_files_and_output_order() {
    let mut cluster = cluster("piston-stages", &["python"]).await;
    let client = piston(&cluster);

    // stdin (Piston ends it with a newline) and args.
    let echo = Executor::new()
        .set_language("python")
        .set_version("3")
        .set_stdin("from stdin")
        .add_args(vec!["a", "b c"])
        .add_file(file(
            "main.py",
            "import sys\ndata = sys.stdin.read()\nprint(repr(data))\nprint(sys.argv[1:])\n",
        ));
    let answer = client.execute(&echo).await.expect("an answer");
    assert_eq!(
        answer.run.stdout, "'from stdin\\n'\n['a', 'b c']\n",
        "{answer:?}"
    );

    // A base64 file beside the entry, and a hex one (the entry is the first utf8 file).
    let files = Executor::new()
        .set_language("py")
        .set_version("*")
        .add_file(File::new("data.bin", "AAEC/w==", "base64"))
        .add_file(file(
            "main.py",
            "print(list(open('data.bin','rb').read()), open('more.bin','rb').read())\n",
        ))
        .add_file(File::new("more.bin", "6869", "hex"));
    let answer = client.execute(&files).await.expect("an answer");
    assert_eq!(answer.run.stdout, "[0, 1, 2, 255] b'hi'\n", "{answer:?}");

    // A timeout: status TO, killed with SIGKILL, no exit code.
    let spin = Executor::new()
        .set_language("python")
        .set_version("*")
        .set_run_timeout(1000)
        .add_file(file(
            "main.py",
            "print('start', flush=True)\nwhile True: pass\n",
        ));
    let answer = client.execute(&spin).await.expect("an answer");
    assert_eq!(answer.run.signal.as_deref(), Some("SIGKILL"), "{answer:?}");
    assert_eq!(answer.run.code, None, "{answer:?}");
    assert_eq!(answer.run.stdout, "start\n", "{answer:?}");
    let body = json!({"language": "python", "version": "*", "run_timeout": 1000,
                      "files": [{"content": "while True: pass\n"}]});
    let (status, answer) = raw(&cluster, "POST", "/execute", Some(body)).await;
    assert_eq!(status, 200, "{answer}");
    let run = &answer["run"];
    assert_eq!(
        (&run["status"], &run["signal"], &run["message"]),
        (
            &json!("TO"),
            &json!("SIGKILL"),
            &json!("Time limit exceeded")
        ),
        "{answer}"
    );
    assert!(run["wall_time"].as_u64().unwrap() >= 1000, "{answer}");
    assert!(run["cpu_time"].as_u64().unwrap() > 0, "{answer}");
    assert!(answer.get("compile").is_none(), "{answer}");

    // A runtime error and a signal, in Piston's terms; a clean run has status null.
    let body = json!({"language": "python", "version": "*",
                      "files": [{"content": "import os, sys\nprint('x')\nsys.exit(3)\n"}]});
    let (_, answer) = raw(&cluster, "POST", "/execute", Some(body)).await;
    let run = &answer["run"];
    assert_eq!(
        (
            &run["status"],
            &run["code"],
            &run["signal"],
            &run["message"]
        ),
        (
            &json!("RE"),
            &json!(3),
            &Value::Null,
            &json!("Exited with error status 3")
        ),
        "{answer}"
    );
    let body = json!({"language": "python", "version": "*",
                      "files": [{"content": "import os, signal\nos.kill(os.getpid(), signal.SIGSEGV)\n"}]});
    let (_, answer) = raw(&cluster, "POST", "/execute", Some(body)).await;
    let run = &answer["run"];
    assert_eq!(
        (&run["status"], &run["code"], &run["signal"]),
        (&json!("SG"), &Value::Null, &json!("SIGSEGV")),
        "{answer}"
    );
    let body = json!({"language": "python", "version": "*", "files": [{"content": "print(1)"}]});
    let (_, answer) = raw(&cluster, "POST", "/execute", Some(body)).await;
    let run = &answer["run"];
    assert_eq!(
        (&run["status"], &run["message"]),
        (&Value::Null, &Value::Null)
    );
    assert!(run["memory"].as_u64().unwrap() > 0, "{answer}");

    // `output` interleaves stdout and stderr in the order they were written. The program writes
    // each line once the previous one has left its pipe (FIONREAD on its own end says so), so
    // the order the supervisor reads is the order of the writes, deterministically.
    let alternate = "\
import fcntl, os, struct, termios, time
def drained(fd):
    while struct.unpack('i', fcntl.ioctl(fd, termios.FIONREAD, b'\\0' * 4))[0]:
        time.sleep(0.0005)
for i in range(25):
    os.write(1, b'out%d\\n' % i); drained(1)
    os.write(2, b'err%d\\n' % i); drained(2)
";
    let answer = client
        .execute(
            &Executor::new()
                .set_language("python")
                .set_version("*")
                .add_file(file("main.py", alternate)),
        )
        .await
        .expect("an answer");
    let want_out: String = (0..25).map(|i| format!("out{i}\n")).collect();
    let want_err: String = (0..25).map(|i| format!("err{i}\n")).collect();
    let want_both: String = (0..25).map(|i| format!("out{i}\nerr{i}\n")).collect();
    assert_eq!(answer.run.stdout, want_out, "{answer:?}");
    assert_eq!(answer.run.stderr, want_err, "{answer:?}");
    assert_eq!(answer.run.output, want_both, "{answer:?}");

    // -1 is the server's maximum: accepted, and the job runs with it.
    let max = Executor::new()
        .set_language("python")
        .set_version("*")
        .set_run_timeout(-1)
        .set_run_memory_limit(-1)
        .set_compile_memory_limit(-1)
        .add_file(file("main.py", "print('max')"));
    let answer = client.execute(&max).await.expect("an answer");
    assert_eq!(answer.run.stdout, "max\n", "{answer:?}");

    let nodes = cluster.stop().await;
    assert_nothing_left(nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_pistons_status_codes_and_messages() {
    let mut cluster = cluster("piston-errors", &["python"]).await;
    let ok = || json!({"language": "python", "version": "*", "files": [{"content": "print(1)"}]});
    let with = |field: &str, value: Value| {
        let mut body = ok();
        body[field] = value;
        body
    };
    // 400: each check of Piston's get_job, in its words.
    let table: Vec<(Value, String)> = vec![
        (json!({}), "language is required as a string".into()),
        (
            with("version", Value::Null),
            "version is required as a string".into(),
        ),
        (
            with("files", json!("x")),
            "files is required as an array".into(),
        ),
        (
            with("files", json!([{"name": "a.py"}])),
            "files[0].content is required as a string".into(),
        ),
        (
            with("language", json!("cobol")),
            "cobol-* runtime is unknown".into(),
        ),
        (
            with("version", json!("2.7.x")),
            "python-2.7.x runtime is unknown".into(),
        ),
        (
            with("files", json!([{"content": "AA==", "encoding": "base64"}])),
            "files must include at least one utf8 encoded file".into(),
        ),
        (
            with("run_timeout", json!("1000")),
            "If specified, run_timeout must be a number".into(),
        ),
        (
            with("run_timeout", json!(30_001)),
            "run_timeout cannot exceed the configured limit of 30000".into(),
        ),
        (
            with("run_memory_limit", json!(-7)),
            "run_memory_limit must be non-negative".into(),
        ),
    ];
    for (body, message) in table {
        let (status, answer) = raw(&cluster, "POST", "/execute", Some(body.clone())).await;
        assert_eq!(
            (status, &answer),
            (400, &json!({ "message": message })),
            "{body}"
        );
    }
    // The native rules hold too, in Piston's shape.
    let (status, answer) = raw(
        &cluster,
        "POST",
        "/execute",
        Some(with("files", json!([{"name": "../x.py", "content": "1"}]))),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["message"].as_str().unwrap().contains("x.py"),
        "{answer}"
    );
    assert_eq!(answer.as_object().unwrap().len(), 1, "{answer}");

    let url = |path: &str| format!("{}/api/v2{path}", cluster.gateway.url());
    let http = &cluster.api.http;
    // 400: not JSON.
    let response = http
        .post(url("/execute"))
        .header("authorization", KEY)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let body: Value = response.json().await.unwrap();
    assert!(body["message"].as_str().unwrap().contains("JSON"), "{body}");
    // 415: not declared JSON, Piston's message.
    let response = http
        .post(url("/execute"))
        .header("authorization", KEY)
        .header("content-type", "text/plain")
        .body(ok().to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(
        body,
        json!({"message": "requests must be of type application/json"})
    );
    // 413: a body above --max-body-bytes.
    let big = with("stdin", json!("x".repeat(3 << 20)));
    let (status, answer) = raw(&cluster, "POST", "/execute", Some(big)).await;
    assert_eq!(status, 413, "{answer}");
    assert!(answer["message"].is_string(), "{answer}");
    // 401: no key, a wrong key; the key as a Bearer token is taken too.
    for key in [None, Some("wrong")] {
        let mut request = http.get(url("/runtimes"));
        if let Some(key) = key {
            request = request.header("authorization", key);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{key:?}");
        let body: Value = response.json().await.unwrap();
        assert!(body["message"].is_string(), "{body}");
    }
    let response = http
        .get(url("/runtimes"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    // 404: no such route, no such package; an installed one cannot be changed here (400).
    let (status, answer) = raw(&cluster, "GET", "/nothing", None).await;
    assert_eq!((status, answer), (404, json!({"message": "Not Found"})));
    for method in ["POST", "DELETE"] {
        let body = json!({"language": "cobol", "version": "1.x"});
        let (status, answer) = raw(&cluster, method, "/packages", Some(body)).await;
        let message = "Requested package cobol-1.x does not exist";
        assert_eq!(
            (status, answer),
            (404, json!({ "message": message })),
            "{method}"
        );
        let body = json!({"language": "python", "version": "3.x"});
        let (status, answer) = raw(&cluster, method, "/packages", Some(body)).await;
        assert_eq!(status, 400, "{method} {answer}");
        assert!(
            answer["message"].as_str().unwrap().contains("catalog"),
            "{answer}"
        );
    }
    // piston_rs reports a refusal with its status and Piston's body.
    let client = piston(&cluster);
    let refused = client
        .execute(
            &Executor::new()
                .set_language("cobol")
                .add_file(file("a", "x")),
        )
        .await
        .expect("an answer");
    assert_eq!(refused.status, 400, "{refused:?}");
    assert!(
        refused.run.stderr.contains("cobol-* runtime is unknown"),
        "{refused:?}"
    );

    let nodes = cluster.stop().await;
    assert_nothing_left(nodes).await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open(cluster: &Cluster) -> Socket {
    use tungstenite::client::IntoClientRequest as _;
    let url = format!(
        "{}/api/v2/connect",
        cluster.gateway.url().replacen("http://", "ws://", 1)
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", KEY.parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request)
        .await
        .expect("the gateway upgrades /api/v2/connect");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket
}

async fn send(socket: &mut Socket, message: Value) {
    let text = tungstenite::Message::text(message.to_string());
    socket.send(text).await.expect("the socket takes a message");
}

/// The next message; `Err` with the close code and reason when the server closed instead.
async fn next(socket: &mut Socket) -> Result<Value, (u16, String)> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a message within 60 s");
        match message {
            Some(Ok(tungstenite::Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).expect("messages are JSON"))
            }
            Some(Ok(tungstenite::Message::Close(frame))) => {
                return Err(frame.map_or((1005, String::new()), |f| {
                    (u16::from(f.code), f.reason.to_string())
                }))
            }
            Some(Ok(_)) => continue,
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    }
}

/// Messages up to the close: what came, and the close code.
async fn until_close(socket: &mut Socket) -> (Vec<Value>, u16) {
    let mut got = Vec::new();
    loop {
        match next(socket).await {
            Ok(message) => got.push(message),
            Err((code, _)) => return (got, code),
        }
    }
}

/// `data` messages up to (and without) the first of another type, joined.
async fn stdout_until(socket: &mut Socket, want: &str) -> String {
    let mut out = String::new();
    while !out.contains(want) {
        let message = next(socket).await.expect("data");
        assert_eq!(message["type"], "data", "{message} after {out:?}");
        assert_eq!(message["stream"], "stdout", "{message}");
        out.push_str(message["data"].as_str().unwrap());
    }
    out
}

fn init(source: &str) -> Value {
    json!({"type": "init", "language": "python", "version": "3.x",
           "files": [{"name": "main.py", "content": source}]})
}

const ECHO: &str = "import sys\nwhile True:\n    line = sys.stdin.readline()\n    print('got', line.strip(), flush=True)\n    if line.strip() == 'bye':\n        break\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_speaks_pistons_protocol() {
    let mut cluster = cluster("piston-connect", &["python"]).await;

    // An interactive program: runtime, stage, data in and out, exit, then 4999.
    let mut socket = open(&cluster).await;
    send(&mut socket, init(ECHO)).await;
    let runtime = next(&mut socket).await.unwrap();
    assert_eq!(runtime["type"], "runtime", "{runtime}");
    assert_eq!(runtime["language"], "python");
    assert!(
        runtime["version"].as_str().unwrap().starts_with("3."),
        "{runtime}"
    );
    assert_eq!(
        next(&mut socket).await.unwrap(),
        json!({"type": "stage", "stage": "run"})
    );
    send(
        &mut socket,
        json!({"type": "data", "stream": "stdin", "data": "hello\n"}),
    )
    .await;
    assert_eq!(stdout_until(&mut socket, "\n").await, "got hello\n");
    send(
        &mut socket,
        json!({"type": "data", "stream": "stdin", "data": "bye\n"}),
    )
    .await;
    assert_eq!(stdout_until(&mut socket, "\n").await, "got bye\n");
    let (rest, code) = until_close(&mut socket).await;
    assert_eq!(
        rest,
        [json!({"type": "exit", "stage": "run", "code": 0, "signal": null})]
    );
    assert_eq!(code, 4999);

    // A signal ends the run: exit with the signal, then 4999.
    let mut socket = open(&cluster).await;
    send(
        &mut socket,
        init("import time\nprint('ready', flush=True)\ntime.sleep(60)\n"),
    )
    .await;
    assert_eq!(next(&mut socket).await.unwrap()["type"], "runtime");
    assert_eq!(next(&mut socket).await.unwrap()["type"], "stage");
    assert_eq!(stdout_until(&mut socket, "\n").await, "ready\n");
    send(&mut socket, json!({"type": "signal", "signal": "SIGKILL"})).await;
    let (rest, code) = until_close(&mut socket).await;
    assert_eq!(
        rest,
        [json!({"type": "exit", "stage": "run", "code": null, "signal": "SIGKILL"})]
    );
    assert_eq!(code, 4999);

    // Protocol errors: Piston's close codes and reasons.
    let mut socket = open(&cluster).await;
    let closed = next(&mut socket).await.unwrap_err();
    assert_eq!(
        closed,
        (4001, "Initialization Timeout".to_string()),
        "no init"
    );

    let mut socket = open(&cluster).await;
    send(
        &mut socket,
        json!({"type": "data", "stream": "stdin", "data": "x"}),
    )
    .await;
    let closed = next(&mut socket).await.unwrap_err();
    assert_eq!(closed, (4003, "Not yet initialized".to_string()));

    let mut socket = open(&cluster).await;
    send(&mut socket, json!({"type": "signal", "signal": "SIGINT"})).await;
    assert_eq!(next(&mut socket).await.unwrap_err().0, 4003);

    for (after_init, code, reason) in [
        (init(ECHO), 4000, "Already Initialized"),
        (
            json!({"type": "data", "stream": "stdout", "data": "x"}),
            4004,
            "Can only write to stdin",
        ),
        (
            json!({"type": "signal", "signal": "SIGNOPE"}),
            4005,
            "Invalid signal",
        ),
    ] {
        let mut socket = open(&cluster).await;
        send(&mut socket, init(ECHO)).await;
        assert_eq!(next(&mut socket).await.unwrap()["type"], "runtime");
        assert_eq!(next(&mut socket).await.unwrap()["type"], "stage");
        send(&mut socket, after_init).await;
        let closed = next(&mut socket).await.unwrap_err();
        assert_eq!(closed, (code, reason.to_string()));
    }

    // A refused init, and a message that is not JSON: an error message, then 4002.
    let mut socket = open(&cluster).await;
    let mut bad = init("print(1)");
    bad["language"] = json!("cobol");
    send(&mut socket, bad).await;
    let (got, code) = until_close(&mut socket).await;
    assert_eq!(
        (got, code),
        (
            vec![json!({"type": "error", "message": "cobol-3.x runtime is unknown"})],
            4002
        )
    );
    let mut socket = open(&cluster).await;
    socket
        .send(tungstenite::Message::text("{not json"))
        .await
        .unwrap();
    let (got, code) = until_close(&mut socket).await;
    assert_eq!(code, 4002);
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(got[0]["type"], "error", "{got:?}");

    // A program that ends without reading its stdin: its exit, then 4999.
    let mut socket = open(&cluster).await;
    send(&mut socket, init("import sys; sys.exit(0)")).await;
    let (got, code) = until_close(&mut socket).await;
    assert_eq!(code, 4999, "{got:?}");
    assert_eq!(
        got.last().unwrap(),
        &json!({"type": "exit", "stage": "run", "code": 0, "signal": null})
    );

    let nodes = cluster.stop().await;
    assert_nothing_left(nodes).await;
}
