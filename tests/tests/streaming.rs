//! Streamed jobs straight on an agent: `POST /v1/execute` with `Accept: application/x-ndjson`
//! (output arrives while the program runs, compile events before run output, the last line is
//! the buffered answer), the `GET /v1/connect` WebSocket (stdin line by line, signals, a closed
//! socket kills its job), and a client that stops reading (memory stays bounded, its job is
//! killed within the stall time and it is disconnected).

use std::time::{Duration, Instant};

use codefleet_tests::{eventually, free_port, AgentOpts, AgentProcess, Api, StatusCode, TestAgent};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// The events of an NDJSON answer with the moment each line arrived.
struct Lines {
    events: Vec<(Instant, Value)>,
}

impl Lines {
    fn of_type(&self, kind: &str) -> Vec<&Value> {
        self.events
            .iter()
            .filter(|(_, e)| e["type"] == kind)
            .map(|(_, e)| e)
            .collect()
    }

    fn last(&self) -> &Value {
        &self.events.last().expect("at least one event").1
    }

    /// When the run stage's stdout so far first held `text` (output events may split a
    /// program's writes anywhere, or join them).
    fn first_time_stdout_holds(&self, text: &str) -> Instant {
        let mut so_far = String::new();
        for (at, e) in &self.events {
            if e["type"] == "output" && e["stage"] == "run" && e["stream"] == "stdout" {
                so_far.push_str(e["data"].as_str().unwrap());
                if so_far.contains(text) {
                    return *at;
                }
            }
        }
        panic!("the run's stdout never held {text:?}: {so_far:?}")
    }

    /// The stdout the `output` events of `stage` carry, joined.
    fn stdout(&self, stage: &str) -> String {
        self.of_type("output")
            .iter()
            .filter(|e| e["stage"] == stage && e["stream"] == "stdout")
            .map(|e| e["data"].as_str().unwrap())
            .collect()
    }
}

/// Sends an execute asking for the stream; reads every line as it comes.
async fn stream(api: &Api, path: &str, body: &Value) -> (StatusCode, String, Lines) {
    let mut resp = api
        .http
        .post(format!("{}{path}", api.url))
        .header("accept", "application/x-ndjson")
        .json(body)
        .send()
        .await
        .expect("request sent");
    let status = resp.status();
    let media = resp
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let mut events = Vec::new();
    let mut pending = Vec::new();
    while let Some(chunk) = resp.chunk().await.expect("body read") {
        let at = Instant::now();
        pending.extend_from_slice(&chunk);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            let event: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
                panic!(
                    "not a JSON line ({e}): {:?}",
                    String::from_utf8_lossy(&line)
                )
            });
            events.push((at, event));
        }
    }
    assert!(pending.is_empty(), "a partial last line: {pending:?}");
    (status, media, Lines { events })
}

/// The answer without what differs between two runs of the same program.
fn shape(answer: &Value) -> Value {
    let mut a = answer.clone();
    for field in ["id", "timing", "sandbox", "request_id"] {
        a.as_object_mut().unwrap().remove(field);
    }
    for stage in ["compile", "run"] {
        if let Some(s) = a.get_mut(stage).and_then(Value::as_object_mut) {
            for field in ["wall_time_ms", "cpu_time_ms", "memory_bytes"] {
                s.remove(field);
            }
        }
    }
    a
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ndjson_streams_output_while_the_program_runs() {
    let agent = TestAgent::start("stream-ndjson", AgentOpts::languages(&["python", "go"])).await;
    let api = &agent.api;

    let source = "import time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b')\n";
    let body = json!({"language": "python", "source": source});
    let (status, media, lines) = stream(api, "/v1/execute", &body).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(media, "application/x-ndjson");
    let kinds: Vec<&str> = lines
        .events
        .iter()
        .map(|(_, e)| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds.first(), Some(&"accepted"), "{kinds:?}");
    assert_eq!(kinds.last(), Some(&"result"), "{kinds:?}");
    assert_eq!(lines.of_type("result").len(), 1);
    let accepted = lines.of_type("accepted")[0];
    assert_eq!(accepted["node"], agent.node.as_str());
    assert_eq!(accepted["language"]["name"], "python");
    assert_eq!(lines.stdout("run"), "a\nb\n");
    // `a` came as its own event, well before the end.
    let a_at = lines.first_time_stdout_holds("a\n");
    let (result_at, result) = lines.events.last().unwrap();
    let lead = result_at.duration_since(a_at);
    assert!(
        lead >= Duration::from_millis(800),
        "`a` arrived only {lead:?} before the result"
    );
    let result = &result["result"];
    assert_eq!(result["status"], "ok");
    assert_eq!(
        result["run"]["stdout"], "a\nb\n",
        "the result still carries the output"
    );
    let finished = lines.of_type("stage_finished");
    assert_eq!(finished.len(), 1);
    assert_eq!(
        (finished[0]["stage"].clone(), finished[0]["status"].clone()),
        (json!("run"), json!("ok"))
    );
    // The last line is the buffered answer of the same program.
    let buffered = api.execute(body.clone()).await;
    assert_eq!(shape(result), shape(&buffered));
    assert_eq!(
        result.as_object().unwrap().keys().collect::<Vec<_>>(),
        buffered.as_object().unwrap().keys().collect::<Vec<_>>(),
        "the same fields"
    );

    // A compiled language: the compile stage's events, then the run's output.
    let go = "package main\nimport (\"fmt\"; \"time\")\nfunc main() { fmt.Println(\"a\"); time.Sleep(time.Second); fmt.Println(\"b\") }\n";
    let body = json!({"language": "go", "source": go});
    let (status, _, lines) = stream(api, "/v1/execute", &body).await;
    assert_eq!(status, StatusCode::OK);
    let stages: Vec<String> = lines
        .events
        .iter()
        .filter(|(_, e)| e["type"] == "stage_started" || e["type"] == "stage_finished")
        .map(|(_, e)| {
            format!(
                "{} {}",
                e["type"].as_str().unwrap(),
                e["stage"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            "stage_started compile",
            "stage_finished compile",
            "stage_started run",
            "stage_finished run"
        ],
        "{:?}",
        lines.events
    );
    assert_eq!(lines.stdout("run"), "a\nb\n");
    let a_at = lines.first_time_stdout_holds("a\n");
    assert!(lines.events.last().unwrap().0.duration_since(a_at) >= Duration::from_millis(800));
    assert_eq!(lines.last()["result"]["status"], "ok");
    let buffered = api.execute(body).await;
    assert_eq!(shape(&lines.last()["result"]), shape(&buffered));

    // The output limit holds on the stream: it stops at the limit, flagged.
    let body = json!({"language": "python", "source": "print('x' * 100000)", "limits": {"output_bytes": 1000}});
    let (_, _, lines) = stream(api, "/v1/execute", &body).await;
    assert_eq!(lines.stdout("run"), "x".repeat(1000));
    let result = &lines.last()["result"];
    assert_eq!(
        (
            result["status"].clone(),
            result["run"]["stdout_truncated"].clone()
        ),
        (json!("output_limit"), json!(true))
    );

    // Refusals come before any stream, as problem+json.
    let refused = api
        .http
        .post(format!("{}/v1/execute", api.url))
        .header("accept", "application/x-ndjson")
        .json(&json!({"language": "cobol", "source": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::BAD_REQUEST);
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    assert!(
        refused.headers().get("x-codefleet-not-started").is_none(),
        "the caller's fault"
    );

    // A session's execute streams too.
    let created = api
        .post("/v1/sessions", &json!({"language": "python"}))
        .await;
    let id = created.body["id"].as_str().unwrap().to_string();
    let (status, _, lines) = stream(
        api,
        &format!("/v1/sessions/{id}/execute"),
        &json!({"source": "print('in a session')"}),
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(lines.stdout("run"), "in a session\n");
    assert_eq!(lines.last()["result"]["sandbox"], "session");

    // A node's refusal before any sandbox took the job says so: a gateway may go elsewhere.
    assert_eq!(
        api.post("/v1/drain", &json!({})).await.status,
        StatusCode::ACCEPTED
    );
    let refused = api
        .http
        .post(format!("{}/v1/execute", api.url))
        .header("accept", "application/x-ndjson")
        .json(&json!({"language": "python", "source": "print(1)"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(refused.headers()["x-codefleet-not-started"], "true");
    assert_eq!(
        refused.headers()["content-type"],
        "application/problem+json"
    );
    agent.stop().await;
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(api: &Api) -> Ws {
    let url = format!("{}/v1/connect", api.url.replacen("http", "ws", 1));
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("upgraded");
    ws
}

/// The next event from the server (a close frame is an error here).
async fn next_event(ws: &mut Ws) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("an event within 60 s")
            .expect("the socket is open")
            .expect("a good frame");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).expect("JSON event"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// Events until one of `kind` (returned), or the last.
async fn until(ws: &mut Ws, kind: &str) -> Value {
    loop {
        let event = next_event(ws).await;
        if event["type"] == kind || event["type"] == "result" || event["type"] == "error" {
            return event;
        }
    }
}

/// The run's stdout up to the end of its next line (output events may split a line).
async fn line_out(ws: &mut Ws) -> String {
    let mut text = String::new();
    while !text.ends_with('\n') {
        let event = until(ws, "output").await;
        assert_eq!(
            (event["type"].clone(), event["stage"].clone()),
            (json!("output"), json!("run")),
            "{event}"
        );
        text.push_str(event["data"].as_str().unwrap());
    }
    text
}

async fn send(ws: &mut Ws, message: Value) {
    ws.send(Message::Text(message.to_string().into()))
        .await
        .expect("sent");
}

/// The close frame the server ends with.
async fn closed_with(ws: &mut Ws) -> (u16, String) {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), ws.next()).await {
            Ok(Some(Ok(Message::Close(Some(frame))))) => {
                return (u16::from(frame.code), frame.reason.to_string())
            }
            Ok(Some(Ok(Message::Close(None)))) | Ok(None) => return (1005, String::new()),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no close frame: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_drives_a_program_line_by_line_and_kills_on_request() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-max", 2)
        .arg("--ws-idle-s", 3)
        .arg("--ws-max-message-bytes", 64 << 10);
    let agent = TestAgent::start("stream-ws", opts).await;
    let api = &agent.api;

    // Three rounds of a line in, a line out, with one program.
    let echo = "import sys\nfor line in sys.stdin:\n    print('got ' + line.strip(), flush=True)\n";
    let mut ws = connect(api).await;
    send(&mut ws, json!({"language": "python", "source": echo})).await;
    assert_eq!(next_event(&mut ws).await["type"], "accepted");
    for round in 1..=3 {
        send(
            &mut ws,
            json!({"type": "stdin", "data": format!("{round}\n")}),
        )
        .await;
        assert_eq!(
            line_out(&mut ws).await,
            format!("got {round}\n"),
            "round {round}"
        );
    }
    send(&mut ws, json!({"type": "eof"})).await;
    let result = until(&mut ws, "result").await;
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(result["result"]["status"], "ok");
    assert_eq!(result["result"]["run"]["stdout"], "got 1\ngot 2\ngot 3\n");
    assert_eq!(closed_with(&mut ws).await.0, 1000);

    // A second program, killed mid-run with a signal message, still gets its final event.
    let mut ws = connect(api).await;
    let sleeper = "import time\nprint('up', flush=True)\ntime.sleep(25)\nprint('never')\n";
    send(&mut ws, json!({"language": "python", "source": sleeper})).await;
    assert_eq!(line_out(&mut ws).await, "up\n");
    let sent = Instant::now();
    send(&mut ws, json!({"type": "signal", "signal": "SIGKILL"})).await;
    let result = until(&mut ws, "result").await;
    assert!(
        sent.elapsed() < Duration::from_secs(10),
        "the kill took {:?}",
        sent.elapsed()
    );
    let run = &result["result"]["run"];
    assert_eq!(
        (result["result"]["status"].clone(), run["signal"].clone()),
        (json!("runtime_error"), json!("SIGKILL")),
        "{result}"
    );
    assert_eq!(run["stdout"], "up\n");
    assert_eq!(closed_with(&mut ws).await.0, 1000);

    // Bad frames and refused requests close with a code and a reason.
    let mut ws = connect(api).await;
    ws.send(Message::Binary(vec![1, 2, 3].into()))
        .await
        .unwrap();
    assert_eq!(closed_with(&mut ws).await.0, 1003);
    let mut ws = connect(api).await;
    send(&mut ws, json!({"language": "cobol", "source": "x"})).await;
    let refused = next_event(&mut ws).await;
    assert_eq!(refused["error"]["code"], "unknown_language", "{refused}");
    assert_eq!(
        closed_with(&mut ws).await,
        (1008, "unknown_language".into())
    );
    let mut ws = connect(api).await;
    send(&mut ws, json!({"language": "python", "source": echo})).await;
    assert_eq!(next_event(&mut ws).await["type"], "accepted");
    ws.send(Message::Text("{not json".into())).await.unwrap();
    assert_eq!(closed_with(&mut ws).await.0, 1007);
    let mut ws = connect(api).await;
    send(&mut ws, json!({"language": "python", "source": echo})).await;
    assert_eq!(next_event(&mut ws).await["type"], "accepted");
    let big = "x".repeat(100 << 10);
    let _ = ws
        .send(Message::Text(
            json!({"type": "stdin", "data": big}).to_string().into(),
        ))
        .await;
    assert_eq!(closed_with(&mut ws).await.0, 1009);
    // Idle: nothing either way for --ws-idle-s.
    let mut ws = connect(api).await;
    let opened = Instant::now();
    assert_eq!(closed_with(&mut ws).await.0, 4000);
    assert!(
        opened.elapsed() >= Duration::from_secs(2),
        "{:?}",
        opened.elapsed()
    );

    // Closing the socket kills the job: its slot is free at once and its sandbox goes back
    // (reset) instead of running for its whole 25 s.
    let mut ws = connect(api).await;
    send(&mut ws, json!({"language": "python", "source": sleeper})).await;
    assert_eq!(line_out(&mut ws).await, "up\n");
    let busy = api.get("/v1/capacity").await.body["slots_busy"].clone();
    assert_eq!(busy, 1);
    drop(ws);
    let closed = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the job ended with its socket",
        async || api.get("/v1/capacity").await.body["slots_busy"] == 0,
    )
    .await;
    assert!(closed.elapsed() < Duration::from_secs(10));
    // And the sandbox serves the next job (recycled, not lost).
    let answer = api.python("print('next')").await;
    assert_eq!(answer["run"]["stdout"], "next\n");
    agent.stop().await;
}

/// Reads an HTTP/1.1 answer's head off a raw socket with a small receive buffer, so a client
/// that stops reading is felt by the server at once.
async fn stalled_stream(addr: &str, body: &Value) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut stream = socket.connect(addr.parse().unwrap()).await.unwrap();
    let body = body.to_string();
    let request = format!(
        "POST /v1/execute HTTP/1.1\r\nhost: {addr}\r\naccept: application/x-ndjson\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).await.unwrap(),
            1,
            "the head ended early"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    stream
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_its_job_killed() {
    let stall = Duration::from_secs(2);
    let opts = AgentOpts::languages(&["python"])
        .arg("--stream-stall-ms", stall.as_millis())
        .arg("--max-output-bytes", 256 << 20);
    let port = free_port();
    let node = codefleet_tests::node_id("stream-stall");
    codefleet_tests::remove_containers_of(&node);
    let agent = AgentProcess::spawn(&node, port, &opts).await;
    let api = &agent.api;
    // Warm the paths the test uses, then take the baseline.
    let _ = api.python("print(1)").await;
    let (_, _, lines) = stream(
        api,
        "/v1/execute",
        &json!({"language": "python", "source": "print(1)"}),
    )
    .await;
    assert_eq!(lines.last()["type"], "result");
    let rss_before = agent.rss_bytes();

    // A flood, far more than any buffer on the way, that could run for 30 s.
    let flood = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n";
    let body = json!({"language": "python", "source": flood,
        "limits": {"output_bytes": 256 << 20, "wall_time_ms": 30_000, "cpu_time_ms": 30_000}});
    let mut client = stalled_stream(&format!("127.0.0.1:{port}"), &body).await;
    let stopped_reading = Instant::now();
    let mut peak = 0;
    eventually(
        Duration::from_secs(20),
        "the stalled client's job ended",
        async || {
            peak = peak.max(agent.rss_bytes());
            api.get("/v1/capacity").await.body["slots_busy"] == 0
        },
    )
    .await;
    let killed_after = stopped_reading.elapsed();
    assert!(
        killed_after < stall + Duration::from_secs(8),
        "killed {killed_after:?} after the client stopped reading (stall {stall:?})"
    );
    let growth = peak.saturating_sub(rss_before);
    assert!(
        growth < 64 << 20,
        "the agent grew by {} MiB for one stalled client",
        growth >> 20
    );
    // The client was disconnected: what it can still read ends without a result.
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), client.read_to_end(&mut rest)).await;
    assert!(read.is_ok(), "the connection was not closed");
    let text = String::from_utf8_lossy(&rest);
    assert!(
        !text.contains("\"type\":\"result\""),
        "a stalled client got its result"
    );
    // The node goes on serving.
    let answer = api.python("print('after')").await;
    assert_eq!(answer["run"]["stdout"], "after\n");
    println!(
        "stalled client: killed after {killed_after:?}, agent RSS {} MiB -> peak {} MiB, {} KiB read after the stall",
        rss_before >> 20,
        peak >> 20,
        rest.len() >> 10
    );
}
