//! Every row of api.md's error table that applies to an agent: a problem+json answer with the
//! right status and code, and nothing run. (This binary holds one test only: it counts the
//! process's executions.)

use codefleet_tests::{AgentOpts, Api, StatusCode, TestAgent};
use serde_json::{json, Value};

async fn executions(api: &Api) -> u64 {
    let text = api
        .http
        .get(format!("{}/metrics", api.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with("codefleet_executions_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_problem_and_runs_nothing() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--cluster-token", "abuse-secret")
        .arg("--max-body-bytes", 65536);
    let agent = TestAgent::start("errors", opts).await;
    let api = &agent.api;
    let before = executions(api).await;
    let ok = |v: Value| v;
    let table: Vec<(&str, Value, u16, &str)> = vec![
        (
            "no language",
            ok(json!({"source": "print(1)"})),
            400,
            "invalid_request",
        ),
        (
            "wrong type",
            ok(json!({"language": "python", "source": 5})),
            400,
            "invalid_request",
        ),
        (
            "both",
            ok(
                json!({"language": "python", "source": "1", "files": [{"name": "a.py", "content": "1"}]}),
            ),
            400,
            "invalid_request",
        ),
        (
            "neither",
            ok(json!({"language": "python"})),
            400,
            "invalid_request",
        ),
        (
            "unknown language",
            ok(json!({"language": "cobol", "source": "x"})),
            400,
            "unknown_language",
        ),
        (
            "unknown version",
            ok(json!({"language": "python", "version": "2.7", "source": "x"})),
            400,
            "unknown_language",
        ),
        (
            "dotdot",
            ok(json!({"language": "python", "files": [{"name": "../evil.py", "content": "x"}]})),
            400,
            "invalid_file_name",
        ),
        (
            "absolute",
            ok(json!({"language": "python", "files": [{"name": "/etc/passwd", "content": "x"}]})),
            400,
            "invalid_file_name",
        ),
        (
            "nul",
            ok(json!({"language": "python", "files": [{"name": "a\u{0}b.py", "content": "x"}]})),
            400,
            "invalid_file_name",
        ),
        (
            "empty name",
            ok(json!({"language": "python", "files": [{"name": "", "content": "x"}]})),
            400,
            "invalid_file_name",
        ),
        (
            "bad base64",
            ok(
                json!({"language": "python", "files": [{"name": "a", "content": "@@", "encoding": "base64"}]}),
            ),
            400,
            "invalid_request",
        ),
        (
            "limit above max",
            ok(
                json!({"language": "python", "source": "x", "limits": {"wall_time_ms": 10_000_000}}),
            ),
            400,
            "limit_exceeds_max",
        ),
        (
            "zero limit",
            ok(json!({"language": "python", "source": "x", "limits": {"memory_bytes": 0}})),
            400,
            "invalid_request",
        ),
        (
            "bad isolation",
            ok(json!({"language": "python", "source": "x", "isolation": "shared"})),
            400,
            "invalid_request",
        ),
    ];
    for (what, body, status, code) in table {
        let a = api.post("/v1/execute", &body).await;
        assert_eq!(a.status.as_u16(), status, "{what}: {a:?}");
        assert_eq!(a.code(), code, "{what}: {a:?}");
        assert_eq!(
            a.headers["content-type"], "application/problem+json",
            "{what}"
        );
        assert_eq!(a.body["status"], status, "{what}");
        assert!(
            !a.body["detail"].as_str().unwrap_or_default().is_empty(),
            "{what}: a detail says why"
        );
    }
    // A version is a prefix on dot boundaries: for python 3.11.2, "3.1" names no version (the
    // agent once matched it as a string prefix), while "3" does (run at the end).
    let version = python_version(api).await;
    let off_boundary = off_boundary_prefix(&version)
        .unwrap_or_else(|| panic!("python {version} has no component of two digits or more"));
    let a = api
        .post(
            "/v1/execute",
            &json!({"language": "python", "version": off_boundary, "source": "print(1)"}),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (400, "unknown_language"),
        "version {off_boundary:?} of python {version}: {a:?}"
    );
    let max = api
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "x", "limits": {"memory_bytes": 1u64 << 40}}),
        )
        .await;
    assert!(
        max.body["detail"]
            .as_str()
            .unwrap()
            .contains(&(1u64 << 30).to_string()),
        "the detail names the maximum: {max:?}"
    );

    // Malformed JSON, a body over the limit, a JSON bomb.
    let a = api.post_raw("/v1/execute", "{not json").await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "invalid_request"));
    let a = api
        .post_raw(
            "/v1/execute",
            format!(
                "{{\"language\":\"python\",\"source\":\"{}\"}}",
                "x".repeat(70_000)
            ),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (413, "payload_too_large"));
    let a = api.post_raw("/v1/execute", "[".repeat(5000)).await;
    assert_eq!((a.status.as_u16(), a.code()), (400, "invalid_request"));

    // A body not declared JSON (a browser's simple request) is 415, and runs nothing.
    let job = r#"{"language": "python", "source": "print(1)"}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
    ] {
        let mut req = api.http.post(format!("{}/v1/execute", api.url)).body(job);
        if let Some(value) = content_type {
            req = req.header("content-type", value);
        }
        let a = codefleet_tests::send(req.bearer_auth("abuse-secret")).await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (415, "unsupported_media_type"),
            "{content_type:?}: {a:?}"
        );
        assert_eq!(a.headers["content-type"], "application/problem+json");
    }
    // Limits given as an array are not an object.
    let a = api
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "x", "limits": [1000]}),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (400, "invalid_request"),
        "{a:?}"
    );

    // Unknown route and session.
    let a = api.get("/v1/nope").await;
    assert_eq!((a.status.as_u16(), a.code()), (404, "not_found"));
    let a = api
        .post(
            "/v1/sessions/se_0000000000000000.nowhere/execute",
            &json!({"source": "1"}),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (404, "not_found"));

    // The cluster token: missing or wrong → 401; health and metrics need none.
    let mut anon = api.clone();
    anon.token = None;
    let a = anon
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "print(1)"}),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (401, "unauthorized"));
    anon.token = Some("wrong".into());
    assert_eq!(
        anon.get("/v1/languages").await.status,
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(anon.get("/healthz").await.status, StatusCode::OK);
    assert_eq!(anon.get("/readyz").await.status, StatusCode::OK);

    assert_eq!(
        executions(api).await,
        before,
        "no rejected request ran anything"
    );
    let r = api.python("print('valid still runs')").await;
    assert_eq!(r["run"]["stdout"], "valid still runs\n");
    assert_eq!(executions(api).await, before + 1);
    let major = version.split('.').next().unwrap_or_default();
    let r = api
        .execute(json!({"language": "python", "version": major, "source": "print('major')"}))
        .await;
    assert_eq!(
        r["run"]["stdout"], "major\n",
        "version {major:?} of {version}"
    );
    agent.stop().await;
}

/// The version of python the agent runs, from its `/v1/languages`.
async fn python_version(api: &Api) -> String {
    let languages = api.get("/v1/languages").await;
    let python = languages
        .body
        .as_array()
        .and_then(|all| all.iter().find(|l| l["name"] == "python"))
        .unwrap_or_else(|| panic!("no python in {languages:?}"));
    python["version"].as_str().unwrap_or_default().to_string()
}

/// A prefix of `version` that ends inside a component (`3.11.2` → `3.1`).
fn off_boundary_prefix(version: &str) -> Option<&str> {
    let mut start = 0;
    for component in version.split('.') {
        if component.len() >= 2 {
            return Some(&version[..start + 1]);
        }
        start += component.len() + 1;
    }
    None
}
