//! The HTTP edge of both binaries, over real sockets: what hyper itself refuses (a request that
//! is not HTTP, a bad Content-Length, a URI or header section too large) is problem+json; a body
//! that stops half-way gets 408 and its connection closed; connections past the cap wait until
//! one closes; JSON endpoints take only `application/json` (415 otherwise); 405 is a problem.

use std::time::Duration;

use codefleet_tests::{parse_raw, raw_exchange, AgentOpts, RawAnswer, TestAgent, TestGateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WITHIN: Duration = Duration::from_secs(20);

fn assert_problem(answer: &RawAnswer, status: u16, code: &str, what: &str) {
    assert_eq!(answer.status, status, "{what}: {answer:?}");
    assert_eq!(
        answer.header("content-type"),
        Some("application/problem+json"),
        "{what}: {answer:?}"
    );
    assert_eq!(answer.code(), code, "{what}: {answer:?}");
    assert_eq!(answer.body["status"], status, "{what}: {answer:?}");
    let detail = answer.body["detail"].as_str().unwrap_or_default();
    assert!(!detail.is_empty(), "{what}: a detail says why: {answer:?}");
}

/// What hyper answers on its own, and 405, as problems that close the connection.
async fn protocol_rejections_are_problems(addr: &str) {
    let many_headers: String = (0..150).map(|i| format!("x-h{i}: v\r\n")).collect();
    let long_uri = format!("GET /{} HTTP/1.1\r\nhost: x\r\n\r\n", "a".repeat(70_000));
    let cases: Vec<(&str, String, u16, &str)> = vec![
        ("not HTTP", "GARBAGE\r\n\r\n".into(), 400, "invalid_request"),
        (
            "bad request line",
            "GET  HTTP/1.1 x\r\nhost: x\r\n\r\n".into(),
            400,
            "invalid_request",
        ),
        (
            "bad Content-Length",
            "POST /v1/execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: abc\r\n\r\n{}"
                .into(),
            400,
            "invalid_request",
        ),
        (
            "two Content-Lengths",
            "POST /v1/execute HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}"
                .into(),
            400,
            "invalid_request",
        ),
        ("URI too long", long_uri, 414, "uri_too_long"),
        (
            "too many header fields",
            format!("GET /healthz HTTP/1.1\r\nhost: x\r\n{many_headers}\r\n"),
            431,
            "headers_too_large",
        ),
    ];
    for (what, request, status, code) in cases {
        let answer = raw_exchange(addr, request.as_bytes(), WITHIN).await;
        assert_problem(&answer, status, code, what);
        assert_eq!(answer.header("connection"), Some("close"), "{what}");
        let length: usize = answer.header("content-length").unwrap().parse().unwrap();
        assert_eq!(
            length,
            serde_json::to_vec(&answer.body).unwrap().len(),
            "{what}"
        );
    }

    // A good request, then garbage on the same connection: the first answer is untouched.
    let pipelined = b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\nGARBAGE\r\n\r\n";
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(pipelined).await.unwrap();
    let mut bytes = Vec::new();
    tokio::time::timeout(WITHIN, stream.read_to_end(&mut bytes))
        .await
        .expect("answered and closed")
        .unwrap();
    let text = String::from_utf8_lossy(&bytes);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
    let second = text.find("HTTP/1.1 400").expect("the garbage is answered");
    assert_problem(
        &parse_raw(&text[second..]),
        400,
        "invalid_request",
        "pipelined",
    );

    let wrong_method = raw_exchange(
        addr,
        b"GET /v1/execute HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        WITHIN,
    )
    .await;
    assert_problem(&wrong_method, 405, "method_not_allowed", "GET /v1/execute");
    assert!(
        wrong_method
            .header("allow")
            .is_some_and(|a| a.contains("POST")),
        "{wrong_method:?}"
    );
}

/// A body that stops half-way: 408 `request_timeout` once `--body-timeout-ms` has passed, and
/// the connection closed (the read to the end returns).
async fn a_stalled_body_times_out(addr: &str, path: &str) {
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{{\"language\": \"py"
    );
    let answer = raw_exchange(addr, request.as_bytes(), WITHIN).await;
    assert_problem(&answer, 408, "request_timeout", path);
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
}

/// A request refused before its body was read (too large by its Content-Length, not JSON) is
/// answered with `Connection: close`: the server drops the connection after the answer, and a
/// client must not send its next request on it (with keep-alive it could, and lose the race).
async fn an_answer_before_the_body_closes_the_connection(addr: &str, path: &str) {
    for (content_type, length, status) in [
        ("application/json", 500_000_000u64, 413),
        ("text/plain", 20, 415),
    ] {
        let request = format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: {content_type}\r\ncontent-length: {length}\r\n\r\n"
        );
        let answer = raw_exchange(addr, request.as_bytes(), WITHIN).await;
        assert_eq!(answer.status, status, "{path}: {answer:?}");
        assert_eq!(
            answer.header("connection"),
            Some("close"),
            "{path}: {answer:?}"
        );
    }
}

/// Every JSON endpoint answers 415 to a body that is not declared JSON, before reading it.
async fn json_endpoints_take_only_json(base: &str, paths: &[&str], token: Option<&str>) {
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = r#"{"language": "python", "source": "print(1)"}"#;
    for path in paths {
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
        ] {
            let mut request = http.post(format!("{base}{path}")).body(body);
            if let Some(value) = content_type {
                request = request.header("content-type", value);
            }
            if let Some(token) = token {
                request = request.bearer_auth(token);
            }
            let answer = codefleet_tests::send(request).await;
            assert_eq!(
                (answer.status.as_u16(), answer.code()),
                (415, "unsupported_media_type"),
                "{path} with {content_type:?}: {answer:?}"
            );
            assert_eq!(answer.headers["content-type"], "application/problem+json");
        }
        let mut request = http
            .post(format!("{base}{path}"))
            .header("content-type", "application/json; charset=utf-8")
            .body("[1");
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        let answer = codefleet_tests::send(request).await;
        assert_ne!(
            answer.status.as_u16(),
            415,
            "{path}: JSON with a charset is JSON"
        );
    }
}

/// With a cap of two, two connections stuck in their bodies leave a third unanswered until one
/// of them goes; then it is served.
async fn connections_past_the_cap_wait(addr: &str) {
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut holder = TcpStream::connect(addr).await.unwrap();
        let head = "POST /v1/execute HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
        holder.write_all(head.as_bytes()).await.unwrap();
        holders.push(holder);
    }
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_secs(1), third.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "a third connection was served past a cap of two: {early:?}"
    );
    drop(holders.remove(0));
    let mut rest = Vec::new();
    tokio::time::timeout(WITHIN, third.read_to_end(&mut rest))
        .await
        .expect("served once a connection closed")
        .unwrap();
    // The early read timed out before taking a byte: all of the answer is here.
    let text = String::from_utf8_lossy(&rest);
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
}

const GATEWAY_JSON_PATHS: [&str; 4] = [
    "/v1/execute",
    "/v1/sessions",
    "/v1/sessions/se_00.n1/execute",
    "/v1/internal/reports",
];
const AGENT_JSON_PATHS: [&str; 3] = [
    "/v1/execute",
    "/v1/sessions",
    "/v1/sessions/se_00.n1/execute",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_edge() {
    let gateway = TestGateway::start(&["--body-timeout-ms".into(), "300".into()]).await;
    let addr = gateway.addr.to_string();
    protocol_rejections_are_problems(&addr).await;
    a_stalled_body_times_out(&addr, "/v1/execute").await;
    a_stalled_body_times_out(&addr, "/v1/internal/reports").await;
    an_answer_before_the_body_closes_the_connection(&addr, "/v1/execute").await;
    json_endpoints_take_only_json(&gateway.url(), &GATEWAY_JSON_PATHS, None).await;
    // Still serving after all of that.
    let health = raw_exchange(
        &addr,
        b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        WITHIN,
    )
    .await;
    assert_eq!(health.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_connection_cap() {
    let args = ["--max-connections", "2", "--body-timeout-ms", "60000"].map(String::from);
    let gateway = TestGateway::start(&args).await;
    connections_past_the_cap_wait(&gateway.addr.to_string()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_edge_and_connection_cap() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 0)
        .arg("--body-timeout-ms", 300);
    let agent = TestAgent::start("edge", opts).await;
    let addr = agent.api.url.trim_start_matches("http://").to_string();
    protocol_rejections_are_problems(&addr).await;
    a_stalled_body_times_out(&addr, "/v1/execute").await;
    a_stalled_body_times_out(&addr, "/v1/sessions").await;
    an_answer_before_the_body_closes_the_connection(&addr, "/v1/execute").await;
    json_endpoints_take_only_json(&agent.api.url, &AGENT_JSON_PATHS, None).await;
    agent.stop().await;

    // The cap, on an agent of its own: the fixture's pooled connection is closed as idle after
    // the short header timeout, so only the test's connections count once that has passed.
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 0)
        .arg("--max-connections", 2)
        .arg("--header-timeout-s", 2)
        .arg("--body-timeout-ms", 60_000);
    let agent = TestAgent::start("edge-cap", opts).await;
    let addr = agent.api.url.trim_start_matches("http://").to_string();
    connections_past_the_cap_wait(&addr).await;
    agent.stop().await;
}
