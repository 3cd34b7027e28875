//! The served spec against the server, both ways: a schema fuzzer (schemathesis, installed from
//! PyPI into a virtual environment of the test's own) runs against a real gateway with a real
//! python agent behind it, with a fixed seed and a bounded number of cases, and must find
//! nothing; and the rules the fuzzer cannot judge (a valid request that the server refuses) are
//! checked one by one against what the spec says.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use codefleet_tests::{Cluster, StatusCode};
use serde_json::{json, Value};

/// The fuzzer, pinned: its checks and its generation change between releases.
const SCHEMATHESIS: &str = "schemathesis==4.32.5";

/// The checks run: servers errors, and answers (status, content type, headers, body) against
/// the spec, schema-violating requests refused, 405 for methods a path lacks (with `Allow`).
/// Not `positive_data_acceptance`: a request valid by the schema may still name a language the
/// fleet lacks; those rules are checked below instead. Not `ignored_auth`: `/v1/*` is open
/// without API keys, as the spec says.
const CHECKS: &str = "not_a_server_error,status_code_conformance,content_type_conformance,\
response_headers_conformance,response_schema_conformance,negative_data_rejection,\
unsupported_method,allow_header_conformance,missing_required_header,use_after_free,\
ensure_resource_availability";

/// A virtual environment with schemathesis in `dir`; panics (the test fails) when it cannot be
/// made.
fn schemathesis(dir: &Path) -> PathBuf {
    let venv = dir.join("venv");
    let run = |program: &Path, args: &[&str]| {
        let out = Command::new(program)
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", program.display()));
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}\n{}",
            program.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        Path::new("python3"),
        &["-m", "venv", venv.to_str().expect("utf-8 path")],
    );
    let pip = venv.join("bin/pip");
    run(
        &pip,
        &[
            "install",
            "--quiet",
            "--disable-pip-version-check",
            SCHEMATHESIS,
        ],
    );
    venv.join("bin/schemathesis")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_served_spec_and_the_server_agree() {
    let dir = std::env::temp_dir().join(format!("codefleet-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let tool = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || schemathesis(&dir)
    });
    // The fuzzer creates sessions and leaves them to expire (up to an hour): room for all of them,
    // so a full node's 503 is not taken for a server error.
    let mut cluster = Cluster::named("fuzz")
        .agent_arg("--max-sessions", 64)
        .start()
        .await;
    let tool = tool.await.expect("venv task");
    let url = cluster.gateway.url();
    let spec: Value = cluster.api.get("/openapi.json").await.body;

    spec_says_what_the_server_does(&cluster, &spec).await;

    let mut fuzz = tokio::process::Command::new(&tool);
    fuzz.current_dir(&dir)
        .arg("run")
        .arg(format!("{url}/openapi.json"))
        .args(["--url", &url, "--checks", CHECKS])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args([
            "--max-examples",
            "60",
            "--seed",
            "20261201",
            "--workers",
            "1",
        ])
        .args(["--generation-database", "none", "--no-color"])
        .args(["--request-timeout", "60"])
        .kill_on_drop(true);
    let run = tokio::time::timeout(Duration::from_secs(600), fuzz.output())
        .await
        .expect("schemathesis finishes within 10 minutes")
        .expect("schemathesis runs");
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    eprintln!("{}", String::from_utf8_lossy(&run.stderr));
    assert!(
        run.status.success(),
        "schemathesis found failures ({}):\n{report}",
        run.status
    );
    assert!(report.contains("generated"), "no test case ran:\n{report}");

    // The fuzzer went through the real agent, and left the cluster serving.
    let ran = cluster
        .api
        .execute(json!({"language": "python", "source": "print(6 * 7)"}))
        .await;
    assert_eq!(ran["run"]["stdout"], "42\n", "{ran}");
    let nodes = cluster.stop().await;
    for node in nodes {
        assert!(codefleet_tests::containers_of(&node).is_empty(), "{node}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The value at a JSON pointer of the spec, which must be there.
fn at<'a>(spec: &'a Value, pointer: &str) -> &'a Value {
    spec.pointer(pointer)
        .unwrap_or_else(|| panic!("the spec has no {pointer}"))
}

/// The rules a schema fuzzer cannot hold the server to: where a request valid by the schema is
/// refused, or one the schema forbids is taken.
async fn spec_says_what_the_server_does(cluster: &Cluster, spec: &Value) {
    let schemas = "/components/schemas";
    let api = &cluster.api;
    let agent = &cluster.agent(&cluster.node_ids()[0]).api;

    // /v1/execute: `language` is required, exactly one of source/files, file names by pattern.
    let execute = at(spec, &format!("{schemas}/ExecuteRequest"));
    assert_eq!(execute["required"], json!(["language"]));
    assert_eq!(
        execute["oneOf"].as_array().map(Vec::len),
        Some(2),
        "{execute}"
    );
    let name = at(spec, &format!("{schemas}/FileSpec/properties/name"));
    assert!(name["pattern"].as_str().is_some(), "{name}");
    assert_eq!(name["maxLength"], 255);

    // Whole-number floats are integers in JSON Schema, and to the server.
    for target in [api, agent] {
        let a = target
            .post(
                "/v1/execute",
                &json!({"language": "python", "source": "print(1)",
                        "limits": {"wall_time_ms": 1000.0, "memory_bytes": 134217728.0}}),
            )
            .await;
        assert_eq!(a.status, StatusCode::OK, "{} {a:?}", target.url);
    }

    // ttl_s: the spec's bounds are the server's.
    let ttl = at(spec, &format!("{schemas}/CreateSession/properties/ttl_s"));
    let (min, max) = (ttl["minimum"].as_u64(), ttl["maximum"].as_u64());
    assert_eq!((min, max), (Some(1), Some(3600)), "{ttl}");
    for (ttl_s, code) in [
        (json!(0), "invalid_request"),
        (json!(3601), "limit_exceeds_max"),
    ] {
        let a = api
            .post(
                "/v1/sessions",
                &json!({"language": "python", "ttl_s": ttl_s}),
            )
            .await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (400, code),
            "ttl_s {ttl_s}: {a:?}"
        );
    }
    let created = api
        .post(
            "/v1/sessions",
            &json!({"language": "python", "ttl_s": 3600.0}),
        )
        .await;
    assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
    let id = created.body["id"]
        .as_str()
        .expect("a session id")
        .to_string();

    // A session's execute may not name a language: the spec allows only null there, and both
    // the gateway and the agent answer 400.
    let session = at(spec, &format!("{schemas}/SessionExecuteRequest/properties"));
    assert_eq!(session["language"]["type"], "null", "{session}");
    assert_eq!(session["version"]["type"], "null", "{session}");
    let path = format!("/v1/sessions/{id}/execute");
    for target in [api, agent] {
        let a = target
            .post(&path, &json!({"language": "python", "source": "print(1)"}))
            .await;
        assert_eq!(
            (a.status.as_u16(), a.code()),
            (400, "invalid_request"),
            "{a:?}"
        );
        let a = target
            .post(&path, &json!({"language": null, "source": "print(2)"}))
            .await;
        assert_eq!(a.status, StatusCode::OK, "{a:?}");
    }
    assert_eq!(
        api.delete(&format!("/v1/sessions/{id}")).await.status,
        StatusCode::NO_CONTENT
    );

    // An object is an object: fields given as an array are refused.
    let a = api
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "1", "limits": [1000]}),
        )
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (400, "invalid_request"),
        "{a:?}"
    );

    // 405 and 415 are in every operation's answers that can give them.
    for (path, item) in at(spec, "/paths").as_object().expect("paths") {
        for (method, operation) in item.as_object().expect("path item") {
            let responses = &operation["responses"];
            assert!(responses.get("405").is_some(), "{method} {path} lacks 405");
            if operation.get("requestBody").is_some() {
                for status in ["408", "413", "415"] {
                    assert!(
                        responses.get(status).is_some(),
                        "{method} {path} lacks {status}"
                    );
                }
            }
        }
    }
    let codes = at(spec, &format!("{schemas}/Problem/properties/code/enum"));
    for code in [
        "unsupported_media_type",
        "request_timeout",
        "uri_too_long",
        "headers_too_large",
    ] {
        assert!(codes.as_array().unwrap().contains(&json!(code)), "{code}");
    }
}
