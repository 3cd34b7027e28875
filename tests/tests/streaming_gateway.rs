//! Streams through a real gateway in front of real agents (each its own process) on the real
//! Docker engine: NDJSON output arriving while the program runs (Python, and a compiled language's
//! compile events first), `/v1/connect` driven line by line and a run killed with a signal
//! message, an agent killed with -9 mid-stream, and a client that stops reading a flood.
//! Every test ends by stopping its cluster and finding none of its containers left.
//!
//! Arrival times are the client's own clock; the bounds are the (≥ 0.8 s between an
//! output and the result of a program that sleeps 1 s between them; `node_lost` within 2 s of a
//! kill -9). Everything else waits generously: the machine is shared.

use std::time::{Duration, Instant};

use codefleet_tests::{assert_nothing_left, eventually, rss_of, Cluster, StatusCode};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite;

const NDJSON: &str = "application/x-ndjson";

/// An event and when the client had it.
struct Arrived {
    at: Instant,
    event: Value,
}

/// `POST /v1/execute` asking for the stream: the answer, once its head is in.
async fn stream(cluster: &Cluster, body: &Value) -> reqwest::Response {
    let response = cluster
        .api
        .http
        .post(format!("{}/v1/execute", cluster.api.url))
        .header("accept", NDJSON)
        .json(body)
        .send()
        .await
        .expect("the gateway answers");
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{:?}",
        response.headers()
    );
    assert_eq!(response.headers()["content-type"], NDJSON);
    response
}

/// Reads whole lines as they come.
struct Events {
    response: reqwest::Response,
    buffer: Vec<u8>,
}

impl Events {
    fn new(response: reqwest::Response) -> Events {
        Events {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event, `None` at the end of the stream.
    async fn next(&mut self) -> Option<Arrived> {
        loop {
            if let Some(end) = self.buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buffer.drain(..=end).collect();
                let event = serde_json::from_slice(&line).unwrap_or_else(|e| {
                    panic!("not a JSON line ({e}): {}", String::from_utf8_lossy(&line))
                });
                return Some(Arrived {
                    at: Instant::now(),
                    event,
                });
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.response.chunk())
                .await
                .expect("an event within 60 s")
                .expect("the stream reads to its end");
            match chunk {
                Some(bytes) => self.buffer.extend_from_slice(&bytes),
                None => {
                    assert!(self.buffer.is_empty(), "a cut line: {:?}", self.buffer);
                    return None;
                }
            }
        }
    }

    async fn all(&mut self) -> Vec<Arrived> {
        let mut events = Vec::new();
        while let Some(event) = self.next().await {
            events.push(event);
        }
        events
    }
}

fn kinds(events: &[Arrived]) -> Vec<String> {
    let kind = |e: &Arrived| match e.event["type"].as_str() {
        Some(t @ ("stage_started" | "stage_finished" | "output")) => {
            format!("{t}:{}", e.event["stage"].as_str().unwrap_or("?"))
        }
        Some(t) => t.to_string(),
        None => panic!("an event without a type: {}", e.event),
    };
    events.iter().map(kind).collect()
}

/// The first output event carrying `text` (a program's write may come in more than one chunk:
/// `print` writes the line and its newline apart), and the result; checks the result is last and
/// says where and how it ran, as a buffered answer would.
fn output_then_result<'e>(
    events: &'e [Arrived],
    text: &str,
    node: &str,
) -> (&'e Arrived, &'e Arrived) {
    let output = events
        .iter()
        .find(|e| {
            e.event["type"] == "output"
                && e.event["data"].as_str().is_some_and(|d| d.contains(text))
        })
        .unwrap_or_else(|| panic!("no output {text:?} in {:?}", kinds(events)));
    let result = events.last().expect("events");
    assert_eq!(result.event["type"], "result", "{:?}", kinds(events));
    let answer = &result.event["result"];
    assert_eq!(answer["status"], "ok", "{answer}");
    assert_eq!(
        (answer["node"].as_str(), answer["attempts"].as_u64()),
        (Some(node), Some(1)),
        "{answer}"
    );
    (output, result)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_output_arrives_while_the_program_runs() {
    let mut cluster = Cluster::named("sgw-py").start().await;
    let node = cluster.node_ids()[0].clone();
    let body = json!({"language": "python",
        "source": "import time\nprint('a', flush=True)\ntime.sleep(1)\nprint('b')\n"});
    let events = Events::new(stream(&cluster, &body).await).all().await;
    assert_eq!(events[0].event["type"], "accepted", "{:?}", kinds(&events));
    assert_eq!(events[0].event["node"], node);
    let (a, result) = output_then_result(&events, "a", &node);
    let gap = result.at - a.at;
    eprintln!("python: `a` arrived {gap:?} before the result");
    assert!(
        gap >= Duration::from_millis(800),
        "`a` came only {gap:?} before the result: {:?}",
        kinds(&events)
    );
    assert_eq!(result.event["result"]["run"]["stdout"], "a\nb\n");
    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compiled_language_streams_its_compile_events_then_the_run() {
    let mut cluster = Cluster::named("sgw-cpp").languages(&["cpp"]).start().await;
    let node = cluster.node_ids()[0].clone();
    let source = "#include <cstdio>\n#include <unistd.h>\nint main() {\n  std::puts(\"a\");\n  \
                  std::fflush(stdout);\n  sleep(1);\n  std::puts(\"b\");\n}\n";
    let body = json!({"language": "cpp", "source": source});
    let events = Events::new(stream(&cluster, &body).await).all().await;
    let seen = kinds(&events);
    let at = |kind: &str| {
        let found = seen.iter().position(|k| k == kind);
        found.unwrap_or_else(|| panic!("no {kind} in {seen:?}"))
    };
    assert!(
        at("stage_started:compile") < at("stage_finished:compile")
            && at("stage_finished:compile") < at("stage_started:run")
            && at("stage_started:run") < at("output:run"),
        "compile, then run: {seen:?}"
    );
    let (a, result) = output_then_result(&events, "a", &node);
    let gap = result.at - a.at;
    eprintln!("cpp: `a` arrived {gap:?} before the result");
    assert!(
        gap >= Duration::from_millis(800),
        "`a` came only {gap:?} before the result"
    );
    assert_eq!(result.event["result"]["compile"]["status"], "ok");
    assert_nothing_left(cluster.stop().await).await;
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn open_socket(cluster: &Cluster, job: Value) -> Socket {
    let url = format!(
        "{}/v1/connect",
        cluster.api.url.replacen("http://", "ws://", 1)
    );
    let (mut socket, response) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the gateway upgrades /v1/connect");
    assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
    send(&mut socket, job).await;
    socket
}

async fn send(socket: &mut Socket, message: Value) {
    let text = tungstenite::Message::text(message.to_string());
    socket.send(text).await.expect("the socket takes a message");
}

/// The next event; `Err` with the close code when the server closed instead.
async fn next_event(socket: &mut Socket) -> Result<Value, u16> {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), socket.next())
            .await
            .expect("a message within 60 s");
        match message {
            Some(Ok(tungstenite::Message::Text(text))) => {
                return Ok(serde_json::from_str(text.as_str()).expect("events are JSON"))
            }
            Some(Ok(tungstenite::Message::Close(frame))) => {
                return Err(frame.map_or(1005, |f| u16::from(f.code)))
            }
            Some(Ok(_)) => continue,
            other => panic!("the socket ended without a close frame: {other:?}"),
        }
    }
}

/// The program's next line of output (its chunks joined up to a newline).
async fn next_line(socket: &mut Socket) -> String {
    let mut line = String::new();
    while !line.ends_with('\n') {
        let event = next_event(socket).await.expect("an event before the close");
        match event["type"].as_str() {
            Some("output") => line.push_str(event["data"].as_str().expect("data")),
            Some("result" | "error") => panic!("the job ended early ({line:?}): {event}"),
            _ => continue,
        }
    }
    line
}

/// Events up to the last one, which is returned; then the close.
async fn last_event(socket: &mut Socket) -> Value {
    loop {
        let event = next_event(socket).await.expect("an event before the close");
        if matches!(event["type"].as_str(), Some("result" | "error")) {
            let close = next_event(socket).await;
            assert!(close.is_err(), "nothing follows the last event: {close:?}");
            return event;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connect_through_the_gateway_drives_a_program_line_by_line_and_kills_another() {
    let mut cluster = Cluster::named("sgw-ws").start().await;
    let node = cluster.node_ids()[0].clone();
    let echo = "for _ in range(3):\n    print(input()[::-1], flush=True)\n";
    let mut socket = open_socket(&cluster, json!({"language": "python", "source": echo})).await;
    for word in ["one", "two", "three"] {
        send(
            &mut socket,
            json!({"type": "stdin", "data": format!("{word}\n")}),
        )
        .await;
        let reversed: String = word.chars().rev().collect();
        assert_eq!(next_line(&mut socket).await, format!("{reversed}\n"));
    }
    let result = last_event(&mut socket).await;
    assert_eq!(result["type"], "result", "{result}");
    assert_eq!(result["result"]["status"], "ok", "{result}");
    assert_eq!(result["result"]["node"], node);
    assert_eq!(result["result"]["run"]["stdout"], "eno\nowt\neerht\n");

    let sleeper = "import time\nprint('started', flush=True)\ntime.sleep(30)\n";
    let job = json!({"language": "python", "source": sleeper,
        "limits": {"wall_time_ms": 30_000}});
    let mut socket = open_socket(&cluster, job).await;
    assert_eq!(next_line(&mut socket).await, "started\n");
    let killed_at = Instant::now();
    send(&mut socket, json!({"type": "signal", "signal": "SIGKILL"})).await;
    let last = last_event(&mut socket).await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(10),
        "the kill took {:?}",
        killed_at.elapsed()
    );
    assert_eq!(last["type"], "result", "{last}");
    assert_eq!(last["result"]["run"]["signal"], "SIGKILL", "{last}");
    assert_nothing_left(cluster.stop().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_mid_stream_ends_the_stream_with_node_lost_within_two_seconds() {
    let mut cluster = Cluster::named("sgw-kill").start().await;
    let node = cluster.node_ids()[0].clone();
    let body = json!({"language": "python", "limits": {"wall_time_ms": 20_000},
        "source": "import time\nprint('a', flush=True)\ntime.sleep(20)\n"});
    let mut events = Events::new(stream(&cluster, &body).await);
    loop {
        let event = events.next().await.expect("events before the kill").event;
        if event["type"] == "output" {
            assert_eq!(
                event["data"].as_str().map(|d| &d[..1]),
                Some("a"),
                "{event}"
            );
            break;
        }
    }
    let killed_at = Instant::now();
    cluster.kill(&node).await;
    let rest = events.all().await;
    let last = rest.last().expect("an event after the kill");
    let took = last.at - killed_at;
    eprintln!("node_lost arrived {took:?} after the kill -9");
    assert_eq!(last.event["type"], "error", "{}", last.event);
    assert_eq!(last.event["error"]["code"], "node_lost", "{}", last.event);
    assert!(
        took <= Duration::from_secs(2),
        "node_lost came {took:?} after the kill"
    );
    assert_nothing_left(cluster.stop().await).await;
}

/// The output the flood may write, per stream: far more than every buffer on the way can hold,
/// so the stream must stall (and not end by itself at the output limit).
const FLOOD_OUTPUT: u64 = 256 << 20;

/// How much a process's resident memory may grow while a client ignores the flood: a few events
/// held, and the output the agent keeps for the result, of what got through before the stall.
const MEMORY_BOUND: u64 = 16 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_flood_is_cut_off_and_its_job_killed() {
    let stall = Duration::from_secs(2);
    // The agent would cut a stalled reader off itself after its own limit: set far beyond the
    // test, so what ends the job here is the gateway dropping its connection.
    let mut cluster = Cluster::named("sgw-slow")
        .gateway_arg("--stream-stall-ms", stall.as_millis())
        .gateway_arg("--max-output-bytes", FLOOD_OUTPUT)
        .agent_arg("--stream-stall-ms", 120_000)
        .agent_arg("--max-output-bytes", FLOOD_OUTPUT)
        .start()
        .await;
    let node = cluster.node_ids()[0].clone();
    let agent_before = cluster.agent(&node).rss_bytes();
    let gateway_before = rss_of(std::process::id());

    // A flood of control characters: each byte is six in JSON.
    let flood =
        "import sys\nchunk = '\\x01' * 65536\nwhile True:\n    sys.stdout.write(chunk)\n    \
                 sys.stderr.write(chunk)\n";
    let body = json!({"language": "python", "source": flood,
        "limits": {"wall_time_ms": 30_000, "cpu_time_ms": 30_000, "output_bytes": FLOOD_OUTPUT}})
    .to_string();
    // A client with a small receive window that reads the answer's head and then nothing.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut client = socket.connect(cluster.gateway.addr).await.unwrap();
    let request = format!(
        "POST /v1/execute HTTP/1.1\r\nhost: gateway\r\ncontent-type: application/json\r\n\
         accept: {NDJSON}\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let sent_at = Instant::now();
    client.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 512];
    let n = client.read(&mut head).await.unwrap();
    let head = String::from_utf8_lossy(&head[..n]).to_string();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");

    // The agent's own count, not its last report: the job holds a slot, then none.
    let agent = cluster.agent(&node).api.clone();
    let busy = async || agent.get("/v1/capacity").await.body["slots_busy"].as_u64();
    assert_eq!(busy().await, Some(1), "the flood's job holds its slot");
    eventually(
        Duration::from_secs(20),
        "the job is killed once the client stalls",
        async || busy().await == Some(0),
    )
    .await;
    let killed_after = sent_at.elapsed();
    eprintln!("the unread flood's job was gone {killed_after:?} after the request");
    assert!(
        killed_after < Duration::from_secs(25),
        "the job ran {killed_after:?}, as if nobody had noticed the client"
    );
    let agent_growth = cluster
        .agent(&node)
        .rss_bytes()
        .saturating_sub(agent_before);
    let gateway_growth = rss_of(std::process::id()).saturating_sub(gateway_before);
    eprintln!("RSS growth: agent {agent_growth} B, gateway (the test process) {gateway_growth} B");
    assert!(
        agent_growth < MEMORY_BOUND,
        "the agent grew {agent_growth} bytes"
    );
    assert!(
        gateway_growth < MEMORY_BOUND,
        "the gateway grew {gateway_growth} bytes"
    );

    // The gateway has closed its end of the connection (what it had sent may still wait in
    // the client's direction: its socket is past ESTABLISHED, never back to it).
    let (gateway_end, client_end) = (cluster.gateway.addr, client.local_addr().unwrap());
    eventually(
        Duration::from_secs(10),
        "the gateway closes the stalled client's connection",
        async || tcp_state(gateway_end, client_end) != Some(ESTABLISHED),
    )
    .await;
    drop(client);
    assert_nothing_left(cluster.stop().await).await;
}

/// `ESTABLISHED` in `/proc/net/tcp`.
const ESTABLISHED: u8 = 0x01;

/// The state of the IPv4 TCP socket bound to `local` and connected to `remote`, as the kernel
/// lists it in `/proc/net/tcp` (`None` once it is gone).
fn tcp_state(local: std::net::SocketAddr, remote: std::net::SocketAddr) -> Option<u8> {
    let hex = |addr: std::net::SocketAddr| match addr {
        std::net::SocketAddr::V4(v4) => {
            let ip = u32::from_le_bytes(v4.ip().octets());
            format!("{ip:08X}:{:04X}", v4.port())
        }
        std::net::SocketAddr::V6(_) => panic!("IPv4 only"),
    };
    let (local, remote) = (hex(local), hex(remote));
    let table = std::fs::read_to_string("/proc/net/tcp").expect("/proc/net/tcp");
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        (fields.get(1) == Some(&local.as_str()) && fields.get(2) == Some(&remote.as_str()))
            .then(|| u8::from_str_radix(fields[3], 16).ok())
            .flatten()
    })
}
