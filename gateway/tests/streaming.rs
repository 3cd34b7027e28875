//! Streams through the gateway, in front of small fake agents speaking the agent's NDJSON and
//! WebSocket protocols (or failing on purpose). The gateway is served for real on 127.0.0.1:0,
//! through the shared HTTP edge, because a stream is about sockets: what arrives when, what a
//! client that stops reading does, what happens when an upstream connection breaks.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::{Body, Bytes};
use axum::extract::ws::{Message as WsMessage, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{routing, Json, Router};
use clap::Parser;
use codefleet_gateway::Config;
use codefleet_shared::cluster::NOT_STARTED_HEADER;
use codefleet_shared::stream::{ClientMessage, JobEvent, OutputStream, NDJSON};
use codefleet_shared::{ErrorCode, ExecuteResponse, Problem};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio_tungstenite::tungstenite;

#[path = "fleet/mod.rs"]
mod fleet;

use fleet::{capacity, ids};

const TOKEN: &str = "cluster-secret";

/// How a fake agent answers.
#[derive(Clone)]
enum Fake {
    /// `accepted`, `output` "a", then waits for `release`, `output` "b", `result`.
    Streams { release: Arc<Notify> },
    /// `accepted`, `output` "a", half a line, then the connection breaks.
    Cuts,
    /// The buffered answer, as an agent from before streaming gives it.
    Buffered,
    /// 503 `no_capacity` with the not-started header.
    NotStarted,
    /// 503 `no_capacity` without it: the job may have started.
    Busy,
    /// 500 after the job started (no header).
    Fails,
    /// `output` lines of 16 KiB for ever; `dropped` is set when the gateway lets go.
    Floods { dropped: Arc<AtomicBool> },
    /// `/v1/connect`: echoes each stdin message as output, a result on eof.
    Echo,
    /// `/v1/connect`: reads the first message, then drops the socket.
    DropsEarly,
    /// `/v1/connect`: `accepted`, then drops the socket.
    DiesMid,
}

#[derive(Clone)]
struct FakeState {
    id: String,
    fake: Fake,
    calls: Arc<AtomicUsize>,
}

struct FakeAgent {
    id: String,
    address: String,
    calls: Arc<AtomicUsize>,
}

async fn fake_agent(id: &str, fake: Fake) -> FakeAgent {
    let calls = Arc::new(AtomicUsize::new(0));
    let state = FakeState {
        id: id.to_string(),
        fake,
        calls: Arc::clone(&calls),
    };
    let app = Router::new()
        .route("/v1/execute", routing::post(fake_execute))
        .route("/v1/sessions/{id}/execute", routing::post(fake_execute))
        .route("/v1/connect", routing::get(fake_connect))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeAgent {
        id: id.to_string(),
        address,
        calls,
    }
}

fn line(event: &JobEvent) -> Result<Bytes, std::io::Error> {
    Ok(Bytes::from(event.to_line()))
}

fn accepted(node: &str) -> JobEvent {
    serde_json::from_value(json!({
        "type": "accepted", "id": "ex_1", "node": node,
        "language": {"name": "python", "version": "3.11.2"}, "queued_ms": 0
    }))
    .unwrap()
}

fn output(data: &str, offset: u64) -> JobEvent {
    JobEvent::Output {
        stage: "run".into(),
        stream: OutputStream::Stdout,
        offset,
        data: data.into(),
    }
}

fn result(node: &str, stdout: &str) -> JobEvent {
    let result: ExecuteResponse = serde_json::from_value(json!({
        "id": "ex_1", "language": {"name": "python", "version": "3.11.2"}, "status": "ok",
        "compile": null,
        "run": {"status": "ok", "exit_code": 0, "signal": null, "stdout": stdout, "stderr": "",
                "stdout_truncated": false, "stderr_truncated": false, "wall_time_ms": 5,
                "cpu_time_ms": 4, "memory_bytes": 1000},
        "node": node, "timing": {"queued_ms": 0, "total_ms": 6}, "request_id": "req_agent"
    }))
    .unwrap();
    JobEvent::Result {
        result: Box::new(result),
    }
}

fn problem(status: StatusCode, problem: Problem, not_started: bool) -> Response {
    let mut response = (status, Json(problem)).into_response();
    if not_started {
        response
            .headers_mut()
            .insert(NOT_STARTED_HEADER, "1".parse().unwrap());
    }
    response
}

/// Sets its flag when dropped: the gateway let go of the fake's body.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn fake_execute(State(agent): State<FakeState>, headers: HeaderMap) -> Response {
    agent.calls.fetch_add(1, Ordering::SeqCst);
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    assert_eq!(accept, Some(NDJSON), "the gateway forwards the Accept");
    let id = agent.id.clone();
    let body = match agent.fake {
        Fake::Streams { release } => Body::from_stream(async_stream(move |tx| async move {
            let _ = tx.send(line(&accepted(&id))).await;
            let _ = tx.send(line(&output("a\n", 0))).await;
            release.notified().await;
            let _ = tx.send(line(&output("b\n", 2))).await;
            let _ = tx.send(line(&result(&id, "a\nb\n"))).await;
        })),
        Fake::Cuts => Body::from_stream(async_stream(move |tx| async move {
            let _ = tx.send(line(&accepted(&id))).await;
            let _ = tx.send(line(&output("a\n", 0))).await;
            let _ = tx
                .send(Ok(Bytes::from_static(b"{\"type\":\"output\",\"sta")))
                .await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            let _ = tx.send(Err(std::io::Error::other("the agent died"))).await;
        })),
        Fake::Floods { dropped } => Body::from_stream(async_stream(move |tx| async move {
            let _flag = DropFlag(dropped);
            let _ = tx.send(line(&accepted(&id))).await;
            let data = "x".repeat(16 * 1024);
            for i in 0.. {
                if tx.send(line(&output(&data, i * 16 * 1024))).await.is_err() {
                    break;
                }
            }
        })),
        Fake::Buffered => {
            let JobEvent::Result { result } = result(&id, "a\n") else {
                unreachable!()
            };
            return Json(result).into_response();
        }
        Fake::NotStarted => {
            let busy = Problem::new(ErrorCode::NoCapacity, "all slots busy");
            return problem(StatusCode::SERVICE_UNAVAILABLE, busy, true);
        }
        Fake::Busy => {
            let busy = Problem::new(ErrorCode::NoCapacity, "all slots busy");
            return problem(StatusCode::SERVICE_UNAVAILABLE, busy, false);
        }
        Fake::Fails => {
            let failed = Problem::new(ErrorCode::Internal, "the sandbox broke mid-job");
            return problem(StatusCode::INTERNAL_SERVER_ERROR, failed, false);
        }
        Fake::Echo | Fake::DropsEarly | Fake::DiesMid => unreachable!("socket fakes"),
    };
    ([(header::CONTENT_TYPE, NDJSON)], body).into_response()
}

/// A body fed by a task through a channel of one item (the task ends when the body drops).
fn async_stream<F, Fut>(
    produce: F,
) -> impl futures_util::Stream<Item = Result<Bytes, std::io::Error>> + Send
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(produce(tx));
    futures_util::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        let end = item.is_err();
        // An error ends the body (hyper aborts the connection); nothing follows it.
        if end {
            rx.close();
        }
        Some((item, rx))
    })
}

async fn fake_connect(State(agent): State<FakeState>, upgrade: WebSocketUpgrade) -> Response {
    agent.calls.fetch_add(1, Ordering::SeqCst);
    upgrade.on_upgrade(move |socket| fake_socket(agent, socket))
}

async fn fake_socket(agent: FakeState, mut socket: WebSocket) {
    let first = match socket.recv().await {
        Some(Ok(WsMessage::Text(text))) => text,
        other => panic!("the gateway sent {other:?} first"),
    };
    let body: Value = serde_json::from_str(first.as_str()).unwrap();
    assert_eq!(
        body["source"], "...",
        "the execute body, as the client sent it"
    );
    let send = |event: JobEvent| WsMessage::Text(serde_json::to_string(&event).unwrap().into());
    match agent.fake {
        Fake::DropsEarly => drop(socket),
        Fake::DiesMid => {
            let _ = socket.send(send(accepted(&agent.id))).await;
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(socket);
        }
        Fake::Echo => {
            let _ = socket.send(send(accepted(&agent.id))).await;
            let (mut offset, mut all) = (0, String::new());
            while let Some(Ok(message)) = socket.recv().await {
                let WsMessage::Text(text) = message else {
                    continue;
                };
                match serde_json::from_str::<ClientMessage>(text.as_str()).unwrap() {
                    ClientMessage::Stdin { data } => {
                        let _ = socket.send(send(output(&data, offset))).await;
                        offset += data.len() as u64;
                        all.push_str(&data);
                    }
                    ClientMessage::Eof {} => {
                        let _ = socket.send(send(result(&agent.id, &all))).await;
                        let _ = socket.send(WsMessage::Close(None)).await;
                        return;
                    }
                    ClientMessage::Signal { .. } => return,
                }
            }
        }
        _ => unreachable!("HTTP fakes"),
    }
}

/// A gateway served on loopback, stopped when dropped.
struct TestGateway {
    url: String,
    _stop: oneshot::Sender<()>,
}

async fn gateway(args: &[&str]) -> TestGateway {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let argv = ["codefleet-gateway", "--cluster-token", TOKEN];
    let config = Config::parse_from(argv.iter().chain(args));
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(codefleet_gateway::serve(config, listener, async {
        let _ = stopped.await;
    }));
    TestGateway { url, _stop: stop }
}

async fn register(gw: &TestGateway, agents: &[&FakeAgent]) {
    let client = reqwest::Client::new();
    for agent in agents {
        let answer = client
            .post(format!("{}/v1/internal/reports", gw.url))
            .bearer_auth(TOKEN)
            .json(&capacity(&agent.id, &agent.address, 4, 0))
            .send()
            .await
            .unwrap();
        assert_eq!(answer.status(), StatusCode::OK);
    }
}

async fn post_stream(gw: &TestGateway) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/execute", gw.url))
        .header(header::ACCEPT, NDJSON)
        .json(&json!({"language": "python", "source": "print('a')"}))
        .send()
        .await
        .unwrap()
}

/// Reads whole lines off a streamed answer.
struct Lines {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Lines {
    fn new(response: reqwest::Response) -> Lines {
        Lines {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next line as JSON; `None` at the end. Panics on a line that is not JSON.
    async fn next(&mut self) -> Option<Value> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                return Some(serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("not a JSON line ({e}): {}", String::from_utf8_lossy(&line))
                }));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(10), self.response.chunk())
                .await
                .expect("a line within 10 s")
                .expect("the stream reads");
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => {
                    assert!(self.buffer.is_empty(), "a cut line: {:?}", self.buffer);
                    return None;
                }
            }
        }
    }

    async fn all(&mut self) -> Vec<Value> {
        let mut lines = Vec::new();
        while let Some(line) = self.next().await {
            lines.push(line);
        }
        lines
    }
}

#[tokio::test]
async fn lines_pass_through_as_they_come_and_the_result_says_where_it_ran() {
    let (first, second) = ids();
    let release = Arc::new(Notify::new());
    let streams = Fake::Streams {
        release: Arc::clone(&release),
    };
    let primary = fake_agent(first, streams).await;
    let other = fake_agent(second, Fake::Echo).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&primary, &other]).await;

    let response = post_stream(&gw).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()[header::CONTENT_TYPE], NDJSON);
    let mut lines = Lines::new(response);
    // Both arrive while the fake holds its last two lines back.
    let accepted = lines.next().await.unwrap();
    assert_eq!(
        (accepted["type"].as_str(), accepted["node"].as_str()),
        (Some("accepted"), Some(first))
    );
    let a = lines.next().await.unwrap();
    assert_eq!(
        (a["type"].as_str(), a["data"].as_str()),
        (Some("output"), Some("a\n"))
    );
    release.notify_one();
    let rest = lines.all().await;
    assert_eq!(rest.len(), 2, "{rest:?}");
    assert_eq!(rest[0]["data"], "b\n");
    let result = &rest[1]["result"];
    assert_eq!(rest[1]["type"], "result");
    assert_eq!(result["run"]["stdout"], "a\nb\n");
    assert_eq!(
        (result["node"].as_str(), result["attempts"].as_u64()),
        (Some(first), Some(1)),
        "the gateway's part, as on a buffered answer"
    );
    assert_eq!(
        result["request_id"], "req_agent",
        "the agent's own fields stay"
    );
    assert_eq!(primary.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_stream_cut_mid_line_ends_with_node_lost_and_no_half_line() {
    let (first, _) = ids();
    let cuts = fake_agent(first, Fake::Cuts).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&cuts]).await;

    let lines = Lines::new(post_stream(&gw).await).all().await;
    let types: Vec<&str> = lines.iter().map(|l| l["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["accepted", "output", "error"], "{lines:?}");
    let error = &lines[2]["error"];
    assert_eq!(
        (error["code"].as_str(), error["status"].as_u64()),
        (Some("node_lost"), Some(502)),
        "{error}"
    );
    assert!(error["detail"].as_str().unwrap().contains(first), "{error}");
}

#[tokio::test]
async fn a_not_started_answer_is_retried_on_the_next_node_before_the_first_byte() {
    let (first, second) = ids();
    let not_started = fake_agent(first, Fake::NotStarted).await;
    let release = Arc::new(Notify::new());
    release.notify_one();
    let streams = fake_agent(second, Fake::Streams { release }).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&not_started, &streams]).await;

    let lines = Lines::new(post_stream(&gw).await).all().await;
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "result", "{lines:?}");
    assert_eq!(
        (
            last["result"]["node"].as_str(),
            last["result"]["attempts"].as_u64()
        ),
        (Some(second), Some(2))
    );
    assert_eq!(lines[0]["node"], second, "only the second node's events");
    assert_eq!(not_started.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_failure_that_may_have_started_the_job_is_not_retried() {
    let (first, second) = ids();
    for fake in [Fake::Fails, Fake::Busy] {
        let failing = fake_agent(first, fake).await;
        let other = fake_agent(second, Fake::Cuts).await;
        let gw = gateway(&[]).await;
        register(&gw, &[&failing, &other]).await;

        let response = post_stream(&gw).await;
        let status = response.status();
        assert_eq!(
            response.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
        let body: Value = response.json().await.unwrap();
        assert!(
            status == StatusCode::INTERNAL_SERVER_ERROR
                || status == StatusCode::SERVICE_UNAVAILABLE,
            "{status} {body}"
        );
        assert_eq!(failing.calls.load(Ordering::SeqCst), 1);
        assert_eq!(other.calls.load(Ordering::SeqCst), 0, "never sent twice");
    }
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_the_agent_let_go() {
    let (first, _) = ids();
    let dropped = Arc::new(AtomicBool::new(false));
    let floods = Fake::Floods {
        dropped: Arc::clone(&dropped),
    };
    let flooding = fake_agent(first, floods).await;
    let gw = gateway(&["--stream-stall-ms", "500"]).await;
    register(&gw, &[&flooding]).await;

    let mut response = post_stream(&gw).await;
    assert_eq!(response.status(), StatusCode::OK);
    let first_chunk = response.chunk().await.unwrap();
    assert!(first_chunk.is_some());
    // Now the client reads nothing: the buffers between fill, and the stall limit runs out.
    let started = Instant::now();
    while !dropped.load(Ordering::SeqCst) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the gateway still holds the agent's stream"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What was in flight may still be read; then the answer breaks off (no clean end).
    let mut read = 0usize;
    let ended = loop {
        match tokio::time::timeout(Duration::from_secs(10), response.chunk()).await {
            Ok(Ok(Some(bytes))) => read += bytes.len(),
            Ok(Ok(None)) => break Ok(()),
            Ok(Err(error)) => break Err(error),
            Err(_) => panic!("the connection is still open after {read} more bytes"),
        }
    };
    assert!(ended.is_err(), "a cut-off stream must not look complete");
    assert!(
        read < 64 << 20,
        "the gateway held {read} bytes for the client"
    );
}

async fn ws_connect(
    gw: &TestGateway,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = format!("{}/v1/connect", gw.url.replacen("http://", "ws://", 1));
    let (socket, response) = tokio_tungstenite::connect_async(url).await.unwrap();
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    socket
}

type ClientSocket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next event, or the close frame's code and reason.
async fn ws_next(socket: &mut ClientSocket) -> Result<Value, (u16, String)> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a message within 10 s");
        match message {
            Some(Ok(tungstenite::Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).unwrap())
            }
            Some(Ok(tungstenite::Message::Close(frame))) => {
                let frame = frame.expect("a close frame with a code");
                return Err((u16::from(frame.code), frame.reason.to_string()));
            }
            Some(Ok(_)) => continue,
            other => panic!("the socket ended without a close: {other:?}"),
        }
    }
}

async fn ws_send(socket: &mut ClientSocket, value: Value) {
    let text = tungstenite::Message::text(value.to_string());
    socket.send(text).await.unwrap();
}

#[tokio::test]
async fn connect_relays_both_ways_and_closes_after_the_result() {
    let (first, second) = ids();
    let echo = fake_agent(first, Fake::Echo).await;
    let other = fake_agent(second, Fake::Echo).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&echo, &other]).await;

    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "py", "source": "..."})).await;
    let accepted = ws_next(&mut socket).await.unwrap();
    assert_eq!(
        (accepted["type"].as_str(), accepted["node"].as_str()),
        (Some("accepted"), Some(first))
    );
    for round in ["1\n", "2\n", "3\n"] {
        ws_send(&mut socket, json!({"type": "stdin", "data": round})).await;
        let out = ws_next(&mut socket).await.unwrap();
        assert_eq!(
            (out["type"].as_str(), out["data"].as_str()),
            (Some("output"), Some(round))
        );
    }
    ws_send(&mut socket, json!({"type": "eof"})).await;
    let result = ws_next(&mut socket).await.unwrap();
    assert_eq!(result["type"], "result");
    assert_eq!(result["result"]["run"]["stdout"], "1\n2\n3\n");
    assert_eq!(
        (
            result["result"]["node"].as_str(),
            result["result"]["attempts"].as_u64()
        ),
        (Some(first), Some(1))
    );
    assert_eq!(ws_next(&mut socket).await.unwrap_err().0, 1000);
}

#[tokio::test]
async fn a_socket_that_fails_before_its_first_event_is_retried_on_the_next_node() {
    let (first, second) = ids();
    let drops = fake_agent(first, Fake::DropsEarly).await;
    let echo = fake_agent(second, Fake::Echo).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&drops, &echo]).await;

    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "python", "source": "..."})).await;
    let accepted = ws_next(&mut socket).await.unwrap();
    assert_eq!(accepted["node"], second, "{accepted}");
    ws_send(&mut socket, json!({"type": "eof"})).await;
    let result = ws_next(&mut socket).await.unwrap();
    assert_eq!(result["result"]["attempts"], 2, "{result}");
    assert_eq!(drops.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_node_lost_mid_run_ends_the_socket_with_node_lost() {
    let (first, second) = ids();
    let dies = fake_agent(first, Fake::DiesMid).await;
    let other = fake_agent(second, Fake::Echo).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&dies, &other]).await;

    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "python", "source": "..."})).await;
    assert_eq!(ws_next(&mut socket).await.unwrap()["type"], "accepted");
    let error = ws_next(&mut socket).await.unwrap();
    assert_eq!(
        (error["type"].as_str(), error["error"]["code"].as_str()),
        (Some("error"), Some("node_lost")),
        "{error}"
    );
    assert_eq!(ws_next(&mut socket).await.unwrap_err().0, 1011);
    assert_eq!(
        other.calls.load(Ordering::SeqCst),
        0,
        "a started job is not sent twice"
    );
}

#[tokio::test]
async fn bad_messages_get_close_codes_with_reasons() {
    let (first, _) = ids();
    let echo = fake_agent(first, Fake::Echo).await;
    let gw = gateway(&["--max-body-bytes", "4096"]).await;
    register(&gw, &[&echo]).await;

    // Not JSON: an invalid_request event, then 1007.
    let mut socket = ws_connect(&gw).await;
    socket
        .send(tungstenite::Message::text("{nope"))
        .await
        .unwrap();
    let error = ws_next(&mut socket).await.unwrap();
    assert_eq!(error["error"]["code"], "invalid_request", "{error}");
    assert_eq!(
        ws_next(&mut socket).await.unwrap_err(),
        (1007, "invalid_request".to_string())
    );

    // A language no node has: the problem, then 1008.
    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "cobol", "source": "..."})).await;
    let error = ws_next(&mut socket).await.unwrap();
    assert_eq!(error["error"]["code"], "unknown_language", "{error}");
    assert_eq!(ws_next(&mut socket).await.unwrap_err().0, 1008);

    // Binary first: 1003.
    let mut socket = ws_connect(&gw).await;
    socket
        .send(tungstenite::Message::binary(vec![1, 2]))
        .await
        .unwrap();
    assert_eq!(ws_next(&mut socket).await.unwrap_err().0, 1003);

    // Too large: 1009.
    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "python", "source": "..."})).await;
    assert_eq!(ws_next(&mut socket).await.unwrap()["type"], "accepted");
    ws_send(
        &mut socket,
        json!({"type": "stdin", "data": "x".repeat(8192)}),
    )
    .await;
    assert_eq!(ws_next(&mut socket).await.unwrap_err().0, 1009);

    // Not a client message: 1007, with what was wrong.
    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "python", "source": "..."})).await;
    assert_eq!(ws_next(&mut socket).await.unwrap()["type"], "accepted");
    ws_send(&mut socket, json!({"type": "stdin"})).await;
    let (code, reason) = ws_next(&mut socket).await.unwrap_err();
    assert_eq!(code, 1007);
    assert!(reason.contains("stdin"), "{reason}");
}

#[tokio::test]
async fn an_agent_that_does_not_stream_gives_a_stream_of_one_result() {
    let (first, _) = ids();
    let buffered = fake_agent(first, Fake::Buffered).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&buffered]).await;

    let response = post_stream(&gw).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], NDJSON);
    let lines = Lines::new(response).all().await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["type"], "result");
    assert_eq!(lines[0]["result"]["run"]["stdout"], "a\n");
    assert_eq!(lines[0]["result"]["attempts"], 1);
}

#[tokio::test]
async fn a_quiet_socket_is_closed_at_the_idle_limit() {
    let (first, _) = ids();
    let echo = fake_agent(first, Fake::Echo).await;
    let gw = gateway(&["--connect-idle-ms", "300"]).await;
    register(&gw, &[&echo]).await;

    let mut socket = ws_connect(&gw).await;
    ws_send(&mut socket, json!({"language": "python", "source": "..."})).await;
    assert_eq!(ws_next(&mut socket).await.unwrap()["type"], "accepted");
    let quiet = Instant::now();
    let (code, reason) = ws_next(&mut socket).await.unwrap_err();
    assert_eq!(code, 4000, "{reason}");
    assert!(
        quiet.elapsed() >= Duration::from_millis(300),
        "{:?}",
        quiet.elapsed()
    );
}

#[tokio::test]
async fn a_sessions_execution_streams_from_its_own_node() {
    let (first, second) = ids();
    let release = Arc::new(Notify::new());
    release.notify_one();
    let holder = fake_agent(first, Fake::Streams { release }).await;
    let other = fake_agent(second, Fake::Cuts).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&holder, &other]).await;

    let response = reqwest::Client::new()
        .post(format!(
            "{}/v1/sessions/se_0123456789abcdef.{first}/execute",
            gw.url
        ))
        .header(header::ACCEPT, NDJSON)
        .json(&json!({"source": "print('a')"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let lines = Lines::new(response).all().await;
    let last = lines.last().unwrap();
    assert_eq!(last["type"], "result", "{lines:?}");
    assert_eq!(last["result"]["node"], first);
    assert_eq!(holder.calls.load(Ordering::SeqCst), 1);
    assert_eq!(other.calls.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn streams_are_counted_by_outcome() {
    let (first, _) = ids();
    let cuts = fake_agent(first, Fake::Cuts).await;
    let gw = gateway(&[]).await;
    register(&gw, &[&cuts]).await;
    let lines = Lines::new(post_stream(&gw).await).all().await;
    assert_eq!(lines.last().unwrap()["error"]["code"], "node_lost");

    let series = r#"codefleet_streams_total{kind="ndjson",outcome="node_lost"}"#;
    let started = Instant::now();
    loop {
        let text = reqwest::get(format!("{}/metrics", gw.url))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        // The pump counts the stream as it ends, just after the last line left.
        let counted = text.lines().any(|l| l.starts_with(series));
        if counted {
            assert!(
                text.contains("codefleet_streams_open"),
                "the gauge is exported too"
            );
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{series} missing:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
