//! The agent's routes and docs/api.md say the same thing: every route the agent's router serves
//! is in the doc's endpoint table (served by `agent` or `both`), and back. The routes are read
//! from the `.route(..)` calls of `router` in `src/http.rs`; then each one, and each one the doc
//! lists, is sent through the real router with `oneshot` (over an agent built without starting
//! anything: no Docker call, no node-id lease): it must not reach the fallback, and every other
//! method on its path must be 405. The reader is the one of `gateway/tests/api_doc.rs`, which
//! checks the gateway's router, `gateway/openapi.json` and the error table the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use clap::Parser;
use codefleet_node_agent::catalog::Catalog;
use codefleet_node_agent::docker::Docker;
use codefleet_node_agent::sandbox::Reaper;
use codefleet_node_agent::{http, Agent, Config};
use serde_json::Value;
use tower::ServiceExt;

const HTTP: &str = include_str!("../src/http.rs");
const DOC: &str = include_str!("../../docs/api.md");

/// Methods a route may be built with, as axum's `routing` functions are named.
const METHODS: [&str; 8] = [
    "get", "post", "put", "patch", "delete", "head", "options", "trace",
];
/// Methods sent to every served path: each is either served or 405.
const PROBED: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

type Route = (String, String);

#[test]
fn router_and_doc_list_the_same_routes() {
    let served = routes_in_router(HTTP);
    assert!(
        served.contains(&("GET".into(), "/v1/capacity".into())),
        "the parse of http.rs found {served:?}"
    );
    let doc = doc_routes(DOC, "agent");
    assert_same(
        &served,
        "node-agent/src/http.rs `router`",
        &doc,
        "docs/api.md's endpoint table (served by agent or both)",
    );
}

#[tokio::test]
async fn every_listed_route_is_served_and_nothing_else_on_its_path() {
    let app = agent_router();
    let fallback = probe(&app, "GET", "/v1/no-such-route").await;
    assert!(is_fallback(&fallback), "the fallback changed: {fallback:?}");

    let mut listed = routes_in_router(HTTP);
    listed.extend(doc_routes(DOC, "agent"));
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
                    "{method} {path} is served but neither the parse of `router` nor the doc has it: {answer:?}"
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

// ---- the router's source ----

/// Every (METHOD, path) that `pub fn router` in `source` registers with `.route(..)`.
fn routes_in_router(source: &str) -> BTreeSet<Route> {
    let start = source.find("pub fn router(").expect("a `pub fn router(`");
    let body = &source[start..];
    let body = &body[..body.find("\n}\n").expect("the end of `router`")];
    for construct in [
        ".nest(",
        ".nest_service(",
        ".route_service(",
        ".fallback_service(",
    ] {
        assert!(
            !body.contains(construct),
            "`router` uses `{construct}`, which this test cannot list routes of: extend it"
        );
    }
    for (_, args) in calls(body, ".merge(") {
        let local = args.trim();
        assert!(
            body.contains(&format!("let {local} = Router::new()")),
            "`router` merges `{local}`, not a router built in `router` itself: extend this test"
        );
    }
    let mut routes = BTreeSet::new();
    for (_, args) in calls(body, ".route(") {
        let args = args.trim_start();
        let path = args
            .strip_prefix('"')
            .and_then(|rest| rest.split_once('"'))
            .map(|(path, _)| path)
            .unwrap_or_else(|| panic!("a route's path must be a string literal: .route({args})"));
        let (_, method_router) = args
            .split_once(',')
            .unwrap_or_else(|| panic!("no method router in .route({args})"));
        let methods = top_level_calls(method_router);
        assert!(!methods.is_empty(), "no method in .route({args})");
        for method in methods {
            assert!(
                METHODS.contains(&method.as_str()),
                "`{method}(..)` in .route({args}) is not a method this test knows: extend it"
            );
            routes.insert((method.to_uppercase(), path.to_string()));
        }
    }
    routes
}

/// The argument text of every `needle` call in `text` (needle ends with `(`), with its offset.
fn calls<'t>(text: &'t str, needle: &str) -> Vec<(usize, &'t str)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(at) = text[from..].find(needle) {
        let open = from + at + needle.len();
        let close = open + closing_paren(&text[open..]);
        out.push((open, &text[open..close]));
        from = open;
    }
    out
}

/// Offset of the `)` closing a call whose arguments start `text`, skipping strings.
fn closing_paren(text: &str) -> usize {
    let mut depth = 0usize;
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => {
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => break,
                        _ => {}
                    }
                }
            }
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' if depth > 0 => depth -= 1,
            ')' => return i,
            _ => {}
        }
    }
    panic!("unbalanced call: {text}")
}

/// Names called at the top level of an expression: `get(a).post(b)` gives get, post.
fn top_level_calls(expression: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expression;
    loop {
        let trimmed = rest.trim_start().trim_start_matches('.');
        let name: String = trimmed
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let after = &trimmed[name.len()..];
        let Some(args) = after.strip_prefix('(') else {
            assert!(
                trimmed.trim().is_empty(),
                "cannot read method router {expression:?}"
            );
            return names;
        };
        names.push(name);
        rest = &args[closing_paren(args) + 1..];
    }
}

// ---- the router itself ----

/// The agent's router over an agent that was built but not started: it has not pinged Docker,
/// so it is not ready, and every probe is answered before any Docker call.
fn agent_router() -> Router {
    let node = format!("api-doc-{}", std::process::id());
    let config = Config::parse_from(["codefleet-agent", "--node-id", &node]);
    let catalog = Catalog::load(None).expect("the built-in catalog");
    let docker = Docker::connect().expect("a Docker client (it connects lazily)");
    let (reaper, _) = Reaper::start(docker.clone());
    let agent = Agent::new(config, catalog, docker, reaper, String::new());
    http::router(Arc::new(agent))
}

#[derive(Debug)]
struct Answer {
    status: StatusCode,
    allow: String,
    body: Value,
}

/// Sends `method path` (path parameters filled in) with an empty JSON object as its body.
async fn probe(app: &Router, method: &str, path: &str) -> Answer {
    let uri = path.replace("{id}", "probe");
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from("{}"))
        .unwrap();
    let response = app.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let allow = response
        .headers()
        .get(header::ALLOW)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    Answer {
        status,
        allow,
        body,
    }
}

/// The router's fallback answered: no route has this path.
fn is_fallback(answer: &Answer) -> bool {
    answer.status == StatusCode::NOT_FOUND && answer.body["detail"] == "no such route"
}

// ---- the doc ----

/// The routes docs/api.md's endpoint table says `who` (gateway or agent) serves.
fn doc_routes(doc: &str, who: &str) -> BTreeSet<Route> {
    let mut routes = BTreeSet::new();
    for cells in table_rows(&section(doc, "## Endpoints")) {
        let served_by = cells[2].as_str();
        assert!(
            ["both", "gateway", "agent"].contains(&served_by),
            "served by {served_by:?} in {cells:?}"
        );
        if served_by == who || served_by == "both" {
            let route = (
                unquote(&cells[0]).to_string(),
                unquote(&cells[1]).to_string(),
            );
            assert!(routes.insert(route), "listed twice: {cells:?}");
        }
    }
    routes
}

/// The lines under `heading` (a whole line) up to the next heading of the same or a higher level.
fn section(doc: &str, heading: &str) -> String {
    let level = |line: &str| {
        let hashes = line.split(' ').next().unwrap_or("");
        (!hashes.is_empty() && hashes.chars().all(|c| c == '#')).then_some(hashes.len())
    };
    let mine = level(heading).expect("a markdown heading");
    let mut lines = doc.lines().skip_while(|line| *line != heading);
    assert!(lines.next().is_some(), "docs/api.md has no `{heading}`");
    let body: Vec<&str> = lines
        .take_while(|line| level(line).is_none_or(|l| l > mine))
        .collect();
    body.join("\n")
}

/// The cells of a section's table body rows (header and separator left out).
fn table_rows(section: &str) -> Vec<Vec<String>> {
    let rows: Vec<Vec<String>> = section
        .lines()
        .filter(|line| line.starts_with('|'))
        .skip(2)
        .map(|line| {
            line.trim_matches('|')
                .split(" | ")
                .map(|cell| cell.trim().to_string())
                .collect()
        })
        .collect();
    assert!(!rows.is_empty(), "no table in {section:.60}");
    rows
}

fn unquote(cell: &str) -> &str {
    cell.strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .unwrap_or_else(|| panic!("{cell:?} is not in backticks"))
}

fn assert_same(left: &BTreeSet<Route>, left_name: &str, right: &BTreeSet<Route>, right_name: &str) {
    let only_left: Vec<_> = left.difference(right).collect();
    let only_right: Vec<_> = right.difference(left).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty(),
        "in {left_name} only: {only_left:?}\nin {right_name} only: {only_right:?}"
    );
}
