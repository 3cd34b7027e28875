//! The gateway's routes, its OpenAPI file and docs/api.md say the same thing: every route the
//! router serves is in the spec and in the doc's endpoint table, and back; every `ErrorCode` is
//! in the doc's error table (with its status) and in the spec's problem code enum; the job
//! statuses and the limits' defaults and maxima agree too.
//!
//! axum's `Router` cannot list its routes, so they are read from the `.route("path", method(..))`
//! calls of `router` in `src/handlers.rs`, and each one found is then sent through the real router
//! with `oneshot`: it must not reach the fallback, and every other method on its path must be 405.
//! A route added to `router` shows up in the source at once (nothing to keep in step by hand), and
//! the probes catch a parse that missed a method or misread a path. Ways of adding routes that the
//! parser does not read (`nest`, `route_service`, merging a router built elsewhere) fail the test.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::StatusCode;
use axum::Router;
use clap::Parser;
use codefleet_gateway::{router, Config, Gateway};
use codefleet_shared::api::Status;
use codefleet_shared::validate::{MAX_ARGS, MAX_FILES, MAX_FILE_NAME};
use codefleet_shared::{ErrorCode, ResolvedLimits};
use serde_json::Value;

#[path = "../../http-edge/tests/common/api_doc.rs"]
mod common;

use common::{
    assert_same, doc_routes, probe, routes_in_router, section, table_rows, unquote, Answer, Route,
    METHODS, PROBED,
};

const HANDLERS: &str = include_str!("../src/handlers.rs");
const SPEC: &str = include_str!("../openapi.json");
const DOC: &str = include_str!("../../docs/api.md");
const PROBLEM: &str = include_str!("../../shared/src/problem.rs");
const API: &str = include_str!("../../shared/src/api.rs");

#[test]
fn router_spec_and_doc_list_the_same_routes() {
    let served = routes_in_router(HANDLERS);
    assert!(
        served.contains(&("POST".into(), "/v1/execute".into())),
        "the parse of handlers.rs found {served:?}"
    );
    let spec = spec_routes(&spec());
    let doc = doc_routes(DOC, "gateway");
    assert_same(
        &served,
        "gateway/src/handlers.rs `router`",
        &spec,
        "gateway/openapi.json",
    );
    assert_same(
        &served,
        "gateway/src/handlers.rs `router`",
        &doc,
        "docs/api.md's endpoint table (served by gateway or both)",
    );
}

#[tokio::test]
async fn every_listed_route_is_served_and_nothing_else_on_its_path() {
    let app = gateway();
    let fallback = probe(&app, "GET", "/v1/no-such-route").await;
    assert!(is_fallback(&fallback), "the fallback changed: {fallback:?}");

    // The parse, the spec and the doc are compared above; here each of them meets the router.
    let mut listed = routes_in_router(HANDLERS);
    listed.extend(spec_routes(&spec()));
    listed.extend(doc_routes(DOC, "gateway"));
    let mut by_path: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (method, path) in &listed {
        by_path.entry(path).or_default().insert(method);
    }
    for (path, methods) in by_path {
        for method in PROBED {
            let answer = probe(&app, method, path).await;
            if methods.contains(method) {
                assert!(
                    !is_fallback(&answer) && answer.status != StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is listed but not served: {answer:?}"
                );
            } else {
                assert_eq!(
                    answer.status,
                    StatusCode::METHOD_NOT_ALLOWED,
                    "{method} {path} is served but neither the parse of `router`, the spec nor the doc has it: {answer:?}"
                );
                for allowed in &methods {
                    assert!(
                        answer.allow.contains(allowed),
                        "{method} {path}: Allow {:?} lacks {allowed}",
                        answer.allow
                    );
                }
            }
        }
    }
}

#[test]
fn every_error_code_is_documented_and_in_the_spec() {
    let codes = error_codes();
    assert!(codes.len() >= 17, "{codes:?}");
    let documented = doc_error_table(DOC);
    for code in &codes {
        assert_eq!(
            documented.get(code.as_str()),
            Some(&code.status()),
            "docs/api.md's error table needs `| {} | `{}` | ...`",
            code.status(),
            code.as_str()
        );
    }
    let names: BTreeSet<&str> = codes.iter().map(|c| c.as_str()).collect();
    for code in documented.keys() {
        assert!(
            names.contains(code.as_str()),
            "docs/api.md documents `{code}`, which ErrorCode does not have"
        );
    }

    let spec = spec();
    if let Some(listed) = spec.pointer("/components/schemas/Problem/properties/code/enum") {
        assert_eq!(
            string_set(listed),
            names.iter().map(|s| s.to_string()).collect(),
            "openapi.json's Problem code enum"
        );
    }
    // Every status a code answers with is a response the spec lists somewhere.
    let statuses: BTreeSet<u16> = spec["paths"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|item| item.as_object().unwrap().values())
        .filter_map(|op| op.get("responses")?.as_object())
        .flat_map(|responses| responses.keys().filter_map(|s| s.parse().ok()))
        .collect();
    for code in &codes {
        assert!(
            statuses.contains(&code.status()),
            "no operation in openapi.json answers {} ({})",
            code.status(),
            code.as_str()
        );
    }
}

#[test]
fn statuses_agree() {
    let statuses: BTreeSet<String> = enum_variants(API, "Status")
        .iter()
        .map(|variant| {
            let name = snake_case(variant);
            let status: Status = serde_json::from_value(Value::String(name.clone()))
                .unwrap_or_else(|e| panic!("Status::{variant} is not {name:?} on the wire: {e}"));
            assert_eq!(status.as_str(), name);
            name
        })
        .collect();
    let documented: BTreeSet<String> = table_rows(&section(DOC, "### Statuses"))
        .into_iter()
        .map(|cells| unquote(&cells[0]).to_string())
        .collect();
    assert_eq!(documented, statuses, "docs/api.md's status table");
    let spec = spec();
    let overall = &spec["components"]["schemas"]["ExecuteResponse"]["properties"]["status"]["enum"];
    assert_eq!(
        string_set(overall),
        statuses,
        "openapi.json ExecuteResponse.status"
    );
    let stage = &spec["components"]["schemas"]["StageResult"]["properties"]["status"]["enum"];
    let mut per_stage = statuses.clone();
    per_stage.remove("compile_error");
    assert_eq!(
        string_set(stage),
        per_stage,
        "openapi.json StageResult.status"
    );
}

#[test]
fn limits_and_input_maxima_agree() {
    let defaults = serde_json::to_value(ResolvedLimits::DEFAULT).unwrap();
    let maxima = serde_json::to_value(ResolvedLimits::MAX).unwrap();
    let rows = table_rows(&section(DOC, "### Limits"));
    let documented: BTreeSet<String> = rows.iter().map(|r| unquote(&r[0]).to_string()).collect();
    let names: BTreeSet<String> = maxima.as_object().unwrap().keys().cloned().collect();
    assert_eq!(documented, names, "docs/api.md's limits table");
    for cells in &rows {
        let name = unquote(&cells[0]);
        let number = |cell: &str| {
            cell.parse::<u64>()
                .unwrap_or_else(|_| panic!("{name}: {cell:?}"))
        };
        assert_eq!(
            number(&cells[1]),
            defaults[name],
            "default of {name} in docs/api.md"
        );
        assert_eq!(
            number(&cells[2]),
            maxima[name],
            "maximum of {name} in docs/api.md"
        );
    }
    let spec = spec();
    let schemas = &spec["components"]["schemas"];
    for name in &names {
        assert_eq!(
            schemas["Limits"]["properties"][name]["maximum"], maxima[name],
            "openapi.json Limits.{name}"
        );
    }
    assert_eq!(
        schemas["FileSpec"]["properties"]["name"]["maxLength"],
        MAX_FILE_NAME
    );
    for request in ["ExecuteRequest", "SessionExecuteRequest"] {
        let properties = &schemas[request]["properties"];
        assert_eq!(
            properties["files"]["maxItems"], MAX_FILES,
            "{request}.files"
        );
        assert_eq!(properties["args"]["maxItems"], MAX_ARGS, "{request}.args");
    }
}

#[test]
fn the_route_parser_reads_what_it_must_and_refuses_what_it_cannot() {
    let source = r#"
pub fn router(state: S) -> Router {
    let inner = Router::new()
        .route("/a/{id}", get(one).post(two))
        .route("/b", delete(|| async { "not (a) method" }));
    Router::new().merge(inner).route("/c", put(three)).with_state(state)
}
"#;
    let found: Vec<String> = routes_in_router(source)
        .into_iter()
        .map(|(m, p)| format!("{m} {p}"))
        .collect();
    assert_eq!(
        found,
        ["DELETE /b", "GET /a/{id}", "POST /a/{id}", "PUT /c"]
    );
    for unreadable in [
        "pub fn router() -> Router {\n    Router::new().nest(\"/x\", other())\n}\n",
        "pub fn router() -> Router {\n    Router::new().merge(elsewhere())\n}\n",
        "pub fn router() -> Router {\n    Router::new().route(PATH, get(x))\n}\n",
        "pub fn router() -> Router {\n    Router::new().route(\"/x\", any(x))\n}\n",
    ] {
        let parsed = std::panic::catch_unwind(|| routes_in_router(unreadable));
        assert!(parsed.is_err(), "should refuse: {unreadable}");
    }
}

// ---- the router's source ----

// ---- the router itself ----

fn gateway() -> Router {
    let config = Config::parse_from(["codefleet-gateway"]);
    router(Gateway::new(config).unwrap())
}

/// The router's fallback answered: no route has this path.
fn is_fallback(answer: &Answer) -> bool {
    answer.status == StatusCode::NOT_FOUND
        && answer.body["detail"]
            .as_str()
            .is_some_and(|d| d.starts_with("no route "))
}

// ---- the spec and the doc ----

fn spec() -> Value {
    serde_json::from_str(SPEC).expect("openapi.json is JSON")
}

fn spec_routes(spec: &Value) -> BTreeSet<Route> {
    let paths = spec["paths"].as_object().expect("paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            item.as_object()
                .expect("a path item")
                .keys()
                .filter(|key| METHODS.contains(&key.as_str()))
                .map(move |method| (method.to_uppercase(), path.clone()))
        })
        .collect()
}

/// Code → status from docs/api.md's error table.
fn doc_error_table(doc: &str) -> BTreeMap<String, u16> {
    let mut table = BTreeMap::new();
    for cells in table_rows(&section(doc, "## Errors")) {
        let status = cells[0]
            .parse()
            .unwrap_or_else(|_| panic!("status in {cells:?}"));
        let code = unquote(&cells[1]).to_string();
        assert!(
            table.insert(code, status).is_none(),
            "listed twice: {cells:?}"
        );
    }
    table
}

fn string_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect()
}

// ---- the shared types' source ----

/// Every `ErrorCode`, read from the enum's source so a new variant is seen here at once.
fn error_codes() -> Vec<ErrorCode> {
    enum_variants(PROBLEM, "ErrorCode")
        .iter()
        .map(|variant| {
            let name = snake_case(variant);
            let code: ErrorCode = serde_json::from_value(Value::String(name.clone()))
                .unwrap_or_else(|e| {
                    panic!("ErrorCode::{variant} is not {name:?} on the wire: {e}")
                });
            assert_eq!(code.as_str(), name, "ErrorCode::{variant}.as_str()");
            code
        })
        .collect()
}

/// The variant names of a fieldless `pub enum name { .. }` in `source`.
fn enum_variants(source: &str, name: &str) -> Vec<String> {
    let start = source
        .find(&format!("pub enum {name} {{"))
        .unwrap_or_else(|| panic!("no `pub enum {name}`"));
    let body = &source[start..];
    let body = &body[body.find('{').unwrap() + 1..body.find('}').unwrap()];
    body.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with("//") && !line.starts_with('#'))
        .map(|line| {
            let variant = line.trim_end_matches(',');
            assert!(
                variant.chars().all(|c| c.is_ascii_alphanumeric()),
                "{name}: cannot read variant {line:?}"
            );
            variant.to_string()
        })
        .collect()
}

fn snake_case(camel: &str) -> String {
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_lowercase());
    }
    out
}
