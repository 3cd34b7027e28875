//! Output files: a request's `outputs` names or globs files the program writes, and the answer
//! carries them (`files`: name, size, base64 content, truncated), within `limits.output_files`
//! and `limits.output_files_bytes`. Against the real engine: a pandas + matplotlib plot comes
//! back as a PNG; globs, the count cap and the size cap; symlinks, FIFOs, sockets and
//! directories reported, never followed or read; names outside the work dir refused with 400
//! before anything runs; a session's files; and through a gateway, buffered, streamed (NDJSON)
//! and over `/v1/connect`, up to the largest answer the caps allow.

use std::time::Duration;

use base64::Engine as _;
use codefleet_tests::{assert_nothing_left, AgentOpts, Api, Cluster, StatusCode, TestAgent};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

/// The PNG signature: every PNG file starts with these eight bytes.
const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

fn decoded(file: &Value) -> Vec<u8> {
    assert_eq!(file["encoding"], "base64", "{file}");
    base64::engine::general_purpose::STANDARD
        .decode(file["content"].as_str().expect("content"))
        .expect("valid base64")
}

/// `(name, size, content, truncated)` of each returned file.
fn files(answer: &Value) -> Vec<(String, u64, Vec<u8>, bool)> {
    answer["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no `files` in {answer}"))
        .iter()
        .map(|f| {
            (
                f["name"].as_str().unwrap().to_string(),
                f["size"].as_u64().unwrap(),
                decoded(f),
                f["truncated"].as_bool().unwrap(),
            )
        })
        .collect()
}

/// `(name, reason)` of each skipped path.
fn skipped(answer: &Value) -> Vec<(String, String)> {
    answer["files_skipped"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["name"].as_str().unwrap().to_string(),
                        s["reason"].as_str().unwrap().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A Python job asking for `outputs`. It may take the most wall time a job may have: on a
/// busy shared machine a new sandbox's interpreter can be slow to start.
fn python(source: &str, outputs: &[&str]) -> Value {
    json!({"language": "python", "source": source, "outputs": outputs,
        "limits": {"wall_time_ms": 30_000}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_come_back_within_their_caps_and_nothing_is_followed() {
    let agent = TestAgent::start("outputs", AgentOpts::languages(&["python"])).await;
    let api = &agent.api;

    // A CSV from `files`, grouped with pandas, plotted with matplotlib, saved: a real PNG.
    let plot = "import pandas, matplotlib.pyplot as plt\n\
        df = pandas.read_csv('sales.csv')\n\
        df.groupby('region')['amount'].sum().plot(kind='bar')\n\
        plt.savefig('plot.png')\n";
    // Importing the data stack in a new sandbox of a busy machine may take a while: the job
    // gets the most time a job may have.
    let r = api
        .execute(
            json!({"language": "python", "outputs": ["plot.png"], "files": [
            {"name": "main.py", "content": plot},
            {"name": "sales.csv", "content": "region,amount\nnorth,10\nsouth,5\nnorth,7\n"}
        ], "limits": {"wall_time_ms": 30_000, "cpu_time_ms": 30_000}}),
        )
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    let got = files(&r);
    assert_eq!(got.len(), 1, "{r}");
    let (name, size, png, truncated) = &got[0];
    assert_eq!(name, "plot.png");
    assert!(!truncated);
    assert_eq!(*size, png.len() as u64);
    assert!(png.len() > 1000, "{} bytes", png.len());
    assert_eq!(png[..8], PNG_SIGNATURE, "not a PNG: {:?}", &png[..16]);
    assert!(r.get("files_skipped").is_none(), "{r}");

    // Without `outputs` the answer has no `files`.
    let r = api.python("open('plot.png', 'w').write('x')").await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r.get("files").is_none(), "{r}");

    // Globs, in name order: the count cap leaves the rest skipped, the size cap cuts the
    // contents (the file that crosses it is cut, later ones come with their size only).
    let writer = "import os\nos.makedirs('out/deep')\n\
        for i in range(1, 6):\n    open(f'out/{i}.csv', 'w').write(str(i) * 6)\n\
        open('out/notes.txt', 'w').write('n')\n\
        open('out/deep/6.csv', 'w').write('6')\n\
        open('out/.hidden.csv', 'w').write('h')\n\
        open('out/odd name.csv', 'w').write('o')\n";
    let mut job = python(writer, &["out/*.csv", "out/?.csv", "out/notes.txt"]);
    job["limits"]["output_files"] = json!(3);
    job["limits"]["output_files_bytes"] = json!(10);
    let r = api.execute(job).await;
    assert_eq!(r["status"], "ok", "{r}");
    let expect = |name: &str, size, content: &str, truncated| {
        (
            name.to_string(),
            size,
            content.as_bytes().to_vec(),
            truncated,
        )
    };
    assert_eq!(
        files(&r),
        [
            expect("out/1.csv", 6, "111111", false),
            expect("out/2.csv", 6, "2222", true),
            expect("out/3.csv", 6, "", true),
        ]
    );
    let reasons = skipped(&r);
    let names: Vec<&str> = reasons.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["out/4.csv", "out/5.csv", "out/notes.txt"], "{r}");
    assert!(reasons.iter().all(|(_, why)| why == "count_limit"), "{r}");

    // The defaults hold five small files easily; a program that fails still has its files.
    let r = api
        .execute(python(
            "open('partial.txt', 'w').write('so far')\nraise SystemExit(3)",
            &["*.txt"],
        ))
        .await;
    assert_eq!(r["status"], "runtime_error", "{r}");
    assert_eq!(files(&r), [expect("partial.txt", 6, "so far", false)]);

    // Links and special files are reported and never followed: not a byte of /etc/passwd (or
    // of anything a link points at) comes back, and a FIFO does not block the answer.
    let planter = "import os, socket\n\
        open('plain.txt', 'w').write('plain')\n\
        os.symlink('/etc/passwd', 'passwd')\n\
        os.symlink('/etc', 'etc')\n\
        os.symlink('plain.txt', 'alias.txt')\n\
        os.mkfifo('fifo')\n\
        socket.socket(socket.AF_UNIX).bind('sock')\n\
        os.mkdir('dir')\n\
        open('dir/inside.txt', 'w').write('inside')\n";
    let r = api
        .execute(python(
            planter,
            &["*", "etc/passwd", "etc/*", "missing.txt", "dir/*.txt"],
        ))
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    let names: Vec<String> = files(&r).into_iter().map(|f| f.0).collect();
    assert_eq!(names, ["dir/inside.txt", "main.py", "plain.txt"], "{r}");
    let followed = |bytes: &[u8]| bytes.windows(5).any(|w| w == b"root:");
    assert!(
        !followed(r.to_string().as_bytes()),
        "a link was followed: {r}"
    );
    for (name, _, content, _) in files(&r) {
        assert!(!followed(&content), "{name} holds /etc/passwd");
    }
    let want: Vec<(String, String)> = [
        ("alias.txt", "symlink"),
        ("dir", "directory"),
        ("etc", "symlink"),
        ("fifo", "fifo"),
        ("missing.txt", "missing"),
        ("passwd", "symlink"),
        ("sock", "socket"),
    ]
    .iter()
    .map(|(n, w)| (n.to_string(), w.to_string()))
    .collect();
    assert_eq!(skipped(&r), want, "{r}");

    // Names outside the work dir, option-like or otherwise unusable, and caps above the
    // maxima: 400 before anything runs.
    for bad in [
        "../etc/passwd",
        "/etc/passwd",
        "out/../../x",
        "-rf",
        "*/-x",
        "a\u{0}b",
        "",
        "a b",
    ] {
        let a = api.post("/v1/execute", &python("print(1)", &[bad])).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{bad:?}: {a:?}");
        assert_eq!(a.code(), "invalid_file_name", "{bad:?}: {a:?}");
    }
    for (limit, value) in [("output_files", 65), ("output_files_bytes", (8 << 20) + 1)] {
        let mut job = python("print(1)", &["*"]);
        job["limits"] = json!({ limit: value });
        let a = api.post("/v1/execute", &job).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{limit}: {a:?}");
        assert_eq!(a.code(), "limit_exceeds_max", "{limit}: {a:?}");
    }
    let a = api
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "1", "outputs": "*"}),
        )
        .await;
    assert_eq!(a.code(), "invalid_request", "{a:?}");

    // In a session, a refused request changes nothing, and files of earlier executions are
    // there to collect.
    let created = api
        .post("/v1/sessions", &json!({"language": "python", "ttl_s": 60}))
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let session = format!("/v1/sessions/{}", created.body["id"].as_str().unwrap());
    let exec = format!("{session}/execute");
    let marker = json!({"source": "open('marker', 'w').write('ran')", "outputs": [".."]});
    let a = api.post(&exec, &marker).await;
    assert_eq!(a.code(), "invalid_file_name", "{a:?}");
    let a = api
        .post(
            &exec,
            &json!({"source": "open('kept.txt', 'w').write('kept')", "limits": {"wall_time_ms": 30_000}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(a.body["status"], "ok", "{a:?}");
    let a = api
        .post(
            &exec,
            &json!({"source": "pass", "outputs": ["kept.txt", "marker"], "limits": {"wall_time_ms": 30_000}}),
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{a:?}");
    assert_eq!(files(&a.body), [expect("kept.txt", 4, "kept", false)]);
    assert_eq!(
        skipped(&a.body),
        [("marker".to_string(), "missing".to_string())]
    );
    assert_eq!(api.delete(&session).await.status, StatusCode::NO_CONTENT);

    let node = agent.node.clone();
    agent.stop().await;
    assert_nothing_left(vec![node]).await;
}

/// The largest content an answer may carry, made so the test can check every byte.
fn pattern_bytes(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8).collect()
}

const BIG: usize = 8 << 20;

/// `POST /v1/execute` through `api`, retrying a 503 with `Retry-After` for a moment (a language
/// just made ready may still be answered so), expecting 200.
async fn execute_eventually(api: &Api, body: &Value, accept: Option<&str>) -> reqwest::Response {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut req = api.http.post(format!("{}/v1/execute", api.url)).json(body);
        if let Some(accept) = accept {
            req = req.header("accept", accept);
        }
        let response = req.send().await.expect("the gateway answers");
        let unavailable = response.status() == StatusCode::SERVICE_UNAVAILABLE
            && response.headers().contains_key("retry-after");
        if response.status() == StatusCode::OK {
            return response;
        }
        if !unavailable || std::time::Instant::now() > deadline {
            let status = response.status();
            let detail = response.text().await.unwrap_or_default();
            panic!("{body} answered {status}: {detail}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_a_gateway_buffered_streamed_and_over_a_websocket() {
    // The agent keeps reporting while it carries a big answer, but on a busy shared machine a
    // report may come late: this test is about the answer, not about noticing a lost node.
    let mut cluster = Cluster::named("outputs-gw")
        .gateway_arg("--missed-reports", 60)
        .start()
        .await;
    let api = cluster.api.clone();

    // The biggest answer the caps allow: 8 MiB of content, whole, buffered and streamed.
    let write_big = format!(
        "open('big.bin', 'wb').write((bytes(range(251)) * {})[:{BIG}])\n\
         open('small.txt', 'w').write('small')\n",
        BIG / 251 + 1
    );
    let mut job = python(&write_big, &["*.bin", "small.txt"]);
    job["limits"]["output_files_bytes"] = json!(BIG);
    let want = pattern_bytes(BIG);
    let buffered: Value = execute_eventually(&api, &job, None)
        .await
        .json()
        .await
        .unwrap();
    let ndjson = execute_eventually(&api, &job, Some("application/x-ndjson"))
        .await
        .text()
        .await
        .unwrap();
    let last: Value = serde_json::from_str(ndjson.lines().last().expect("a last line")).unwrap();
    assert_eq!(
        last["type"],
        "result",
        "{}",
        &ndjson[..ndjson.len().min(2000)]
    );
    for answer in [&buffered, &last["result"]] {
        assert_eq!(answer["status"], "ok", "{}", answer["run"]);
        let got = files(answer);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, "big.bin");
        assert_eq!(got[0].1, BIG as u64);
        assert!(got[0].2 == want, "big.bin came back changed");
        // The caps are over all files: nothing was left for the second one.
        assert_eq!(
            got[1],
            ("small.txt".to_string(), 5, Vec::new(), true),
            "small.txt"
        );
    }

    // Over /v1/connect: the result event carries the files.
    let url = format!("{}/v1/connect", api.url.replacen("http://", "ws://", 1));
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the gateway upgrades /v1/connect");
    let job = python("open('answer.txt', 'w').write(input())", &["answer.txt"]);
    socket
        .send(tungstenite::Message::text(job.to_string()))
        .await
        .unwrap();
    socket
        .send(tungstenite::Message::text(
            json!({"type": "stdin", "data": "42\n"}).to_string(),
        ))
        .await
        .unwrap();
    let result = loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("an event within 60 s")
            .expect("an event before the end")
            .expect("a readable message");
        let tungstenite::Message::Text(text) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(text.as_str()).unwrap();
        if matches!(event["type"].as_str(), Some("result" | "error")) {
            break event;
        }
    };
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(
        files(&result["result"]),
        [("answer.txt".to_string(), 2, b"42".to_vec(), false)]
    );

    // The gateway refuses a bad name itself, with the same problem.
    let a = api
        .post("/v1/execute", &python("print(1)", &["../x"]))
        .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST, "{a:?}");
    assert_eq!(a.code(), "invalid_file_name", "{a:?}");
    assert!(
        a.body["detail"].as_str().unwrap().contains("\"../x\""),
        "{a:?}"
    );

    assert_nothing_left(cluster.stop().await).await;
}
