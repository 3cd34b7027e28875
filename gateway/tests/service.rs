//! Service tests: the gateway's router called with `oneshot`, in front of small fake agents that
//! listen on 127.0.0.1:0 and answer the agent API the way a real one would (or fail on purpose).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Request, StatusCode};
use axum::routing;
use axum::{Json, Router};
use clap::Parser;
use codefleet_gateway::{router, Config, Gateway};
use codefleet_shared::cluster::{CapacityReport, NOT_STARTED_HEADER};
use codefleet_shared::{ErrorCode, Problem};
use serde_json::{json, Value};
use tokio::io::AsyncReadExt;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tower::ServiceExt;

#[path = "fleet/mod.rs"]
mod fleet;

use fleet::{capacity, ids};

const TOKEN: &str = "cluster-secret";

/// How a fake agent answers `POST /v1/execute`.
#[derive(Clone, Copy, PartialEq)]
enum Behavior {
    Ok,
    /// 503 `no_capacity`: the job was not started.
    Busy,
    /// 500 without a problem body, after the job was sent.
    Broken,
    /// Never answers (until the test ends).
    Hang,
}

#[derive(Default)]
struct Seen {
    executes: AtomicUsize,
    drains: AtomicUsize,
    arrived: Notify,
    tokens: Mutex<Vec<Option<String>>>,
}

struct FakeAgent {
    id: String,
    address: String,
    seen: Arc<Seen>,
}

#[derive(Clone)]
struct AgentState {
    id: String,
    behavior: Behavior,
    seen: Arc<Seen>,
}

async fn fake_agent(id: &str, behavior: Behavior) -> FakeAgent {
    let seen = Arc::new(Seen::default());
    let state = AgentState {
        id: id.to_string(),
        behavior,
        seen: Arc::clone(&seen),
    };
    let app = Router::new()
        .route("/v1/execute", routing::post(agent_execute))
        .route("/v1/sessions", routing::post(agent_create_session))
        .route("/v1/sessions/{id}/execute", routing::post(agent_execute))
        .route("/v1/sessions/{id}", routing::delete(agent_delete_session))
        .route("/v1/drain", routing::post(agent_drain))
        .with_state(state);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    FakeAgent {
        id: id.to_string(),
        address,
        seen,
    }
}

/// An agent that reads the request and then closes the connection, as a process killed with
/// `-9` mid-job does.
async fn dying_agent(id: &str) -> FakeAgent {
    let seen = Arc::new(Seen::default());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let counter = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf).await;
            counter.executes.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    FakeAgent {
        id: id.to_string(),
        address,
        seen,
    }
}

/// An address where nothing listens: connections are refused.
async fn closed_address() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    format!("http://{}", listener.local_addr().unwrap())
}

async fn agent_execute(
    State(agent): State<AgentState>,
    headers: HeaderMap,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let token = headers
        .get(header::AUTHORIZATION)
        .map(|v| v.to_str().unwrap().to_string());
    agent.seen.tokens.lock().unwrap().push(token);
    agent.seen.executes.fetch_add(1, Ordering::SeqCst);
    agent.seen.arrived.notify_one();
    match agent.behavior {
        Behavior::Ok => Json(json!({
            "id": "ex_1", "language": {"name": "python", "version": "3.11.2"}, "status": "ok",
            "compile": null,
            "run": {"status": "ok", "exit_code": 0, "signal": null, "stdout": "hi\n", "stderr": "",
                    "stdout_truncated": false, "stderr_truncated": false, "wall_time_ms": 5,
                    "cpu_time_ms": 4, "memory_bytes": 1000},
            "node": agent.id, "timing": {"queued_ms": 0, "total_ms": 6}
        }))
        .into_response(),
        Behavior::Busy => {
            let problem = Problem::new(ErrorCode::NoCapacity, "all slots busy");
            let mut response = (StatusCode::SERVICE_UNAVAILABLE, Json(problem)).into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, "1".parse().unwrap());
            response
                .headers_mut()
                .insert(NOT_STARTED_HEADER, "1".parse().unwrap());
            response
        }
        Behavior::Broken => (StatusCode::INTERNAL_SERVER_ERROR, "oops").into_response(),
        Behavior::Hang => std::future::pending().await,
    }
}

async fn agent_create_session(State(agent): State<AgentState>) -> (StatusCode, Json<Value>) {
    let body = json!({
        "id": format!("se_0123456789abcdef.{}", agent.id),
        "language": {"name": "python", "version": "3.11.2"},
        "node": agent.id, "expires_at": "2030-01-01T00:00:00Z"
    });
    (StatusCode::CREATED, Json(body))
}

async fn agent_delete_session(Path(id): Path<String>) -> axum::response::Response {
    use axum::response::IntoResponse;
    if id.starts_with("se_0123456789abcdef.") {
        StatusCode::NO_CONTENT.into_response()
    } else {
        let problem = Problem::new(ErrorCode::NotFound, format!("no session {id}"));
        (StatusCode::NOT_FOUND, Json(problem)).into_response()
    }
}

async fn agent_drain(State(agent): State<AgentState>) -> StatusCode {
    agent.seen.drains.fetch_add(1, Ordering::SeqCst);
    StatusCode::ACCEPTED
}

fn gateway(args: &[&str]) -> (Arc<Gateway>, Router) {
    let argv = ["codefleet-gateway", "--cluster-token", TOKEN];
    let config = Config::parse_from(argv.iter().chain(args));
    let gw = Gateway::new(config).unwrap();
    let app = router(Arc::clone(&gw));
    (gw, app)
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or("")
    }
}

async fn send(
    app: &Router,
    method: &str,
    path: &str,
    key: Option<&str>,
    body: Option<Vec<u8>>,
) -> Answer {
    let mut request = Request::builder().method(method).uri(path);
    if let Some(key) = key {
        request = request.header(header::AUTHORIZATION, format!("Bearer {key}"));
    }
    let request = request
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.map_or_else(Body::empty, Body::from))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let headers = response.headers().clone();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !status.is_success() {
        assert_eq!(
            headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{body}"
        );
    }
    Answer {
        status,
        headers,
        body,
    }
}

async fn post(app: &Router, path: &str, key: Option<&str>, body: Value) -> Answer {
    send(app, "POST", path, key, Some(body.to_string().into_bytes())).await
}

async fn report(app: &Router, capacity: CapacityReport) {
    let body = serde_json::to_value(capacity).unwrap();
    let answer = post(app, "/v1/internal/reports", Some(TOKEN), body).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

async fn register(app: &Router, agents: &[&FakeAgent]) {
    for agent in agents {
        report(app, capacity(&agent.id, &agent.address, 4, 0)).await;
    }
}

fn python_job() -> Value {
    json!({"language": "py", "source": "print('hi')"})
}

#[tokio::test]
async fn execute_goes_to_the_primary_and_says_so() {
    let (first, second) = ids();
    let (primary, other) = (
        fake_agent(first, Behavior::Ok).await,
        fake_agent(second, Behavior::Ok).await,
    );
    let (gw, app) = gateway(&[]);
    register(&app, &[&primary, &other]).await;
    for _ in 0..5 {
        let answer = post(&app, "/v1/execute", None, python_job()).await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.body["node"], first);
        assert_eq!(answer.body["attempts"], 1);
        assert_eq!(answer.body["run"]["stdout"], "hi\n");
    }
    assert_eq!(primary.seen.executes.load(Ordering::SeqCst), 5);
    assert_eq!(other.seen.executes.load(Ordering::SeqCst), 0);
    let tokens = primary.seen.tokens.lock().unwrap().clone();
    assert!(tokens
        .iter()
        .all(|t| t.as_deref() == Some(&format!("Bearer {TOKEN}")[..])));
    assert_eq!(gw.snapshot().ready_nodes, 2);
}

#[tokio::test]
async fn a_busy_node_is_retried_on_the_next() {
    let (first, second) = ids();
    let busy = fake_agent(first, Behavior::Busy).await;
    let ok = fake_agent(second, Behavior::Ok).await;
    let (_gw, app) = gateway(&[]);
    register(&app, &[&busy, &ok]).await;
    let answer = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        (
            answer.body["node"].as_str(),
            answer.body["attempts"].as_u64()
        ),
        (Some(second), Some(2))
    );
    assert_eq!(busy.seen.executes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_refusing_node_is_retried_and_skipped_until_it_reports() {
    let (first, second) = ids();
    let ok = fake_agent(second, Behavior::Ok).await;
    let (_gw, app) = gateway(&[]);
    report(&app, capacity(first, &closed_address().await, 4, 0)).await;
    register(&app, &[&ok]).await;
    let answer = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    assert_eq!(
        (
            answer.body["node"].as_str(),
            answer.body["attempts"].as_u64()
        ),
        (Some(second), Some(2))
    );
    let again = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(
        again.body["attempts"], 1,
        "the refusing node is skipped now"
    );
    let nodes = send(&app, "GET", "/v1/nodes", None, None).await.body;
    let refused = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["id"] == first)
        .unwrap();
    assert_eq!(refused["state"], "down");
}

#[tokio::test]
async fn a_failure_after_sending_is_not_retried() {
    let (first, second) = ids();
    let broken = fake_agent(first, Behavior::Broken).await;
    let ok = fake_agent(second, Behavior::Ok).await;
    let (_gw, app) = gateway(&[]);
    register(&app, &[&broken, &ok]).await;
    let answer = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(answer.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(answer.code(), "internal");
    assert_eq!(ok.seen.executes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_node_dying_mid_job_is_node_lost_at_once() {
    let (first, second) = ids();
    let dying = dying_agent(first).await;
    let ok = fake_agent(second, Behavior::Ok).await;
    let (_gw, app) = gateway(&[]);
    register(&app, &[&dying, &ok]).await;
    // Limits that would let the gateway wait 90 s: the answer must come from the closed socket.
    let job = json!({"language": "python", "source": "x",
                     "limits": {"wall_time_ms": 30000, "compile_wall_time_ms": 60000}});
    let started = Instant::now();
    let answer = post(&app, "/v1/execute", None, job).await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert_eq!(answer.code(), "node_lost");
    assert!(answer.body["detail"].as_str().unwrap().contains(first));
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(dying.seen.executes.load(Ordering::SeqCst), 1);
    assert_eq!(ok.seen.executes.load(Ordering::SeqCst), 0, "not retried");
}

#[tokio::test]
async fn a_node_that_stops_reporting_mid_job_is_node_lost() {
    let (first, _) = ids();
    let hanging = fake_agent(first, Behavior::Hang).await;
    let (gw, app) = gateway(&[]);
    register(&app, &[&hanging]).await;
    let arrived = hanging.seen.arrived.notified();
    let call = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "/v1/execute", None, python_job()).await }
    });
    arrived.await;
    gw.sweep(Instant::now() + Duration::from_secs(10));
    // Fails rather than hangs if the call does not notice (the job's own timeout is 20 s).
    let answer = tokio::time::timeout(Duration::from_secs(15), call)
        .await
        .expect("the call ended when the node was marked down")
        .unwrap();
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY, "{}", answer.body);
    assert_eq!(answer.code(), "node_lost");
}

#[tokio::test]
async fn down_after_missed_reports_and_back_when_reporting() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let (gw, app) = gateway(&["--report-interval-ms", "1000", "--missed-reports", "3"]);
    register(&app, &[&agent]).await;
    assert_eq!(
        send(&app, "GET", "/readyz", None, None).await.status,
        StatusCode::OK
    );
    gw.sweep(Instant::now() + Duration::from_millis(2_000));
    assert_eq!(
        gw.snapshot().ready_nodes,
        1,
        "two reports missed is not three"
    );
    gw.sweep(Instant::now() + Duration::from_millis(3_500));
    let nodes = send(&app, "GET", "/v1/nodes", None, None).await.body;
    assert_eq!(nodes[0]["state"], "down");
    assert_eq!(nodes[0]["ring_share"], 0.0);
    let answer = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.code(), "language_unavailable");
    assert!(answer.headers.contains_key(header::RETRY_AFTER));
    let ready = send(&app, "GET", "/readyz", None, None).await;
    assert_eq!(ready.status, StatusCode::SERVICE_UNAVAILABLE);
    register(&app, &[&agent]).await;
    let answer = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

#[tokio::test]
async fn drain_stops_new_work_and_tells_the_agent() {
    let (first, second) = ids();
    let (primary, other) = (
        fake_agent(first, Behavior::Ok).await,
        fake_agent(second, Behavior::Ok).await,
    );
    let (_gw, app) = gateway(&["--admin-key", "adm", "--api-key", "k"]);
    register(&app, &[&primary, &other]).await;
    let path = format!("/v1/nodes/{first}/drain");
    assert_eq!(
        post(&app, &path, Some("k"), json!({})).await.status,
        StatusCode::UNAUTHORIZED
    );
    let drained = post(&app, &path, Some("adm"), json!({})).await;
    assert_eq!(drained.status, StatusCode::ACCEPTED);
    assert_eq!(drained.body["state"], "draining");
    let answer = post(&app, "/v1/execute", Some("k"), python_job()).await;
    assert_eq!(answer.body["node"], second);
    // Still draining after its next report, even though the agent says it is not.
    register(&app, &[&primary]).await;
    let answer = post(&app, "/v1/execute", Some("k"), python_job()).await;
    assert_eq!(answer.body["node"], second);
    assert_eq!(primary.seen.executes.load(Ordering::SeqCst), 0);
    // The agent was told too (in the background).
    let deadline = Instant::now() + Duration::from_secs(10);
    while primary.seen.drains.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(primary.seen.drains.load(Ordering::SeqCst), 1);

    let remove = format!("/v1/nodes/{first}");
    assert_eq!(
        send(&app, "DELETE", &remove, Some("adm"), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    let gone = send(&app, "DELETE", &remove, Some("adm"), None).await;
    assert_eq!(
        (gone.status, gone.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let nodes = send(&app, "GET", "/v1/nodes", Some("adm"), None).await.body;
    assert_eq!(nodes.as_array().unwrap().len(), 1);
    assert!((nodes[0]["ring_share"].as_f64().unwrap() - 1.0).abs() < 1e-9);
}

#[tokio::test]
async fn saturated_nodes_mean_a_bounded_wait_then_no_capacity() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let (_gw, app) = gateway(&["--queue-wait-ms", "50"]);
    // One slot, busy with another gateway's job.
    report(&app, capacity("a", &agent.address, 1, 1)).await;
    let answer = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(
        answer.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        answer.body
    );
    assert_eq!(answer.code(), "no_capacity");
    assert_eq!(answer.headers[header::RETRY_AFTER], "1");
    assert_eq!(agent.seen.executes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_waiting_job_runs_when_a_slot_frees() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let (_gw, app) = gateway(&["--queue-wait-ms", "60000"]);
    report(&app, capacity("a", &agent.address, 1, 1)).await;
    let call = tokio::spawn({
        let app = app.clone();
        async move { post(&app, "/v1/execute", None, python_job()).await }
    });
    // Reports until the waiting job has run: each one wakes the waiters.
    for _ in 0..1_000 {
        if call.is_finished() {
            break;
        }
        report(&app, capacity("a", &agent.address, 1, 0)).await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let answer = call.await.unwrap();
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
}

#[tokio::test]
async fn input_is_checked_before_any_node_sees_it() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let (_gw, app) = gateway(&["--max-wall-time-ms", "1000"]);
    register(&app, &[&agent]).await;
    let cases = [
        (json!({"source": "x"}), "invalid_request"),
        (json!({"language": "python"}), "invalid_request"),
        (
            json!({"language": "python", "source": "x", "files": [{"name": "a", "content": ""}]}),
            "invalid_request",
        ),
        (
            json!({"language": "python", "files": [{"name": "../etc/passwd", "content": ""}]}),
            "invalid_file_name",
        ),
        (
            json!({"language": "python", "source": "x", "limits": {"wall_time_ms": 1001}}),
            "limit_exceeds_max",
        ),
        (
            json!({"language": "python", "source": 5}),
            "invalid_request",
        ),
        (
            json!({"language": "cobol", "source": "x"}),
            "unknown_language",
        ),
        (
            json!({"language": "python", "version": "2", "source": "x"}),
            "unknown_language",
        ),
        // Versions match on dot boundaries: "3.1" is no version of the agents' 3.11.2.
        (
            json!({"language": "python", "version": "3.1", "source": "x"}),
            "unknown_language",
        ),
    ];
    for (body, code) in cases {
        let answer = post(&app, "/v1/execute", None, body.clone()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::BAD_REQUEST, code),
            "{body}"
        );
    }
    let answer = post(
        &app,
        "/v1/execute",
        None,
        json!({"language": "cobol", "source": "x"}),
    )
    .await;
    let detail = answer.body["detail"].as_str().unwrap();
    assert!(detail.ends_with("available: go, python"), "{detail}");
    let not_json = send(&app, "POST", "/v1/execute", None, Some(b"{".to_vec())).await;
    assert_eq!(not_json.code(), "invalid_request");
    let deep = format!("{}{}", "[".repeat(100), "]".repeat(100));
    let deep = send(&app, "POST", "/v1/execute", None, Some(deep.into_bytes())).await;
    assert_eq!(deep.code(), "invalid_request");
    // A known language whose image is not ready anywhere.
    let answer = post(
        &app,
        "/v1/execute",
        None,
        json!({"language": "go", "source": "x"}),
    )
    .await;
    assert_eq!(
        (answer.status, answer.code()),
        (StatusCode::SERVICE_UNAVAILABLE, "language_unavailable")
    );
    assert_eq!(answer.headers[header::RETRY_AFTER], "5");
    assert_eq!(agent.seen.executes.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn keys_quotas_and_body_limits() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let (_gw, app) = gateway(&[
        "--api-key",
        "k1",
        "--api-key",
        "k2",
        "--admin-key",
        "adm",
        "--rate-per-s",
        "0.001",
        "--burst",
        "2",
        "--max-body-bytes",
        "1000",
    ]);
    register(&app, &[&agent]).await;
    let unauthorized = [None, Some("wrong"), Some(TOKEN)];
    for key in unauthorized {
        let answer = post(&app, "/v1/execute", key, python_job()).await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::UNAUTHORIZED, "unauthorized"),
            "{key:?}"
        );
    }
    let admin_only = send(&app, "GET", "/v1/nodes", Some("k1"), None).await;
    assert_eq!(admin_only.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        send(&app, "GET", "/v1/nodes", Some("adm"), None)
            .await
            .status,
        StatusCode::OK
    );
    let bad_report = serde_json::to_value(capacity("a", &agent.address, 4, 0)).unwrap();
    let bad_report = post(&app, "/v1/internal/reports", Some("k1"), bad_report).await;
    assert_eq!(bad_report.status, StatusCode::UNAUTHORIZED);

    let big = json!({"language": "python", "source": "x".repeat(2_000)});
    let too_large = post(&app, "/v1/execute", Some("k2"), big).await;
    assert_eq!(
        (too_large.status, too_large.code()),
        (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large")
    );

    assert_eq!(
        post(&app, "/v1/execute", Some("k1"), python_job())
            .await
            .status,
        StatusCode::OK
    );
    assert_eq!(
        post(&app, "/v1/execute", Some("k1"), python_job())
            .await
            .status,
        StatusCode::OK
    );
    let limited = post(&app, "/v1/execute", Some("k1"), python_job()).await;
    assert_eq!(
        (limited.status, limited.code()),
        (StatusCode::TOO_MANY_REQUESTS, "rate_limited")
    );
    let retry_after: u64 = limited.headers[header::RETRY_AFTER]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after >= 1);
    // Another key has its own bucket (one token went on the 413 above).
    assert_eq!(
        post(&app, "/v1/execute", Some("k2"), python_job())
            .await
            .status,
        StatusCode::OK
    );
    // Open routes need no key.
    for path in ["/healthz", "/readyz", "/metrics", "/openapi.json"] {
        assert_eq!(
            send(&app, "GET", path, None, None).await.status,
            StatusCode::OK,
            "{path}"
        );
    }
}

#[tokio::test]
async fn sessions_stick_to_their_node() {
    let (first, second) = ids();
    let (a, b) = (
        fake_agent(first, Behavior::Ok).await,
        fake_agent(second, Behavior::Ok).await,
    );
    let (gw, app) = gateway(&[]);
    register(&app, &[&a, &b]).await;
    let created = post(
        &app,
        "/v1/sessions",
        None,
        json!({"language": "python", "ttl_s": 60}),
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.body);
    let id = created.body["id"].as_str().unwrap().to_string();
    assert!(id.ends_with(&format!(".{first}")), "{id}");
    // Send the session's jobs while the primary is drained: they still go to the session's node.
    gw.drain(first).unwrap();
    for _ in 0..3 {
        let answer = post(
            &app,
            &format!("/v1/sessions/{id}/execute"),
            None,
            json!({"source": "x"}),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
        assert_eq!(answer.body["node"], first);
    }
    assert_eq!(a.seen.executes.load(Ordering::SeqCst), 3);
    assert_eq!(b.seen.executes.load(Ordering::SeqCst), 0);
    let deleted = send(&app, "DELETE", &format!("/v1/sessions/{id}"), None, None).await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    for unknown in ["se_00.nowhere", "nodot", "se_00.a/b", "xx_00.a"] {
        let answer = post(
            &app,
            &format!("/v1/sessions/{unknown}/execute"),
            None,
            json!({"source": "x"}),
        )
        .await;
        assert_eq!(
            (answer.status, answer.code()),
            (StatusCode::NOT_FOUND, "not_found"),
            "{unknown}"
        );
    }
    let unknown_on_node = send(
        &app,
        "DELETE",
        &format!("/v1/sessions/se_ff.{first}"),
        None,
        None,
    )
    .await;
    assert_eq!(unknown_on_node.status, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn languages_are_merged_over_nodes() {
    let (a, b) = (
        fake_agent("a", Behavior::Ok).await,
        fake_agent("b", Behavior::Ok).await,
    );
    let (_gw, app) = gateway(&[]);
    register(&app, &[&a, &b]).await;
    let languages = send(&app, "GET", "/v1/languages", None, None).await.body;
    assert_eq!(languages[0]["name"], "go");
    assert_eq!(languages[0]["nodes_ready"], 0);
    assert_eq!(languages[1]["name"], "python");
    assert_eq!(languages[1]["nodes_ready"], 2);
    assert_eq!(languages[1]["version"], "3.11.2");
    assert_eq!(languages[1]["aliases"], json!(["py"]));
}

#[tokio::test]
async fn unknown_routes_and_methods_are_problems() {
    let (_gw, app) = gateway(&[]);
    let missing = send(&app, "GET", "/v2/nothing", None, None).await;
    assert_eq!(
        (missing.status, missing.code()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let wrong = send(&app, "GET", "/v1/execute", None, None).await;
    assert_eq!(wrong.status, StatusCode::METHOD_NOT_ALLOWED);
    let nothing_yet = post(&app, "/v1/execute", None, python_job()).await;
    assert_eq!(nothing_yet.code(), "language_unavailable");
}

#[tokio::test]
async fn openapi_is_the_checked_in_file() {
    let (_gw, app) = gateway(&[]);
    let request = Request::get("/openapi.json").body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let served = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let file = std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(served, file);
    let spec: Value = serde_json::from_slice(&served).unwrap();
    assert!(spec["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/execute",
        "/v1/languages",
        "/v1/sessions",
        "/v1/sessions/{id}/execute",
        "/v1/sessions/{id}",
        "/v1/nodes",
        "/v1/nodes/{id}/drain",
        "/v1/nodes/{id}",
        "/healthz",
        "/readyz",
        "/metrics",
        "/openapi.json",
    ] {
        assert!(spec["paths"].get(path).is_some(), "{path} missing");
    }
}

#[tokio::test]
async fn metrics_count_requests() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let (_gw, app) = gateway(&[]);
    register(&app, &[&agent]).await;
    post(&app, "/v1/execute", None, python_job()).await;
    let request = Request::get("/metrics").body(Body::empty()).unwrap();
    let response = app.oneshot(request).await.unwrap();
    let text = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let text = String::from_utf8(text.to_vec()).unwrap();
    for needle in [
        "codefleet_requests_total{route=\"/v1/execute\",language=\"python\",status=\"200\",code=\"none\"}",
        "codefleet_request_duration_seconds_bucket",
        "codefleet_routing_duration_seconds_bucket",
        "codefleet_ring_members{state=\"ready\"}",
        "codefleet_node_inflight_jobs{node=\"a\"}",
    ] {
        assert!(text.contains(needle), "{needle} not in\n{text}");
    }
}

#[tokio::test]
async fn serve_runs_and_stops() {
    let agent = fake_agent("a", Behavior::Ok).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let config = Config::parse_from(["codefleet-gateway"]);
    let server = tokio::spawn(codefleet_gateway::serve(config, listener, async {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let report = client
        .post(format!("{address}/v1/internal/reports"))
        .json(&capacity("a", &agent.address, 4, 0))
        .send()
        .await
        .unwrap();
    assert_eq!(report.status(), StatusCode::OK);
    let answer = client
        .post(format!("{address}/v1/execute"))
        .json(&python_job())
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), StatusCode::OK);
    stop.send(()).unwrap();
    drop(client);
    server.await.unwrap().unwrap();
}
