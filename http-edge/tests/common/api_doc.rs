//! What the API-doc tests of the gateway and of the agent share: reading the `.route(..)` calls
//! of a router's source, probing a router with `oneshot`, and reading docs/api.md's tables. Each
//! crate includes this file (`#[path]`) into its own `tests/api_doc.rs`; it is no test target
//! of its own (cargo builds only the files directly in `tests/`).
#![allow(dead_code)]

use std::collections::BTreeSet;

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use serde_json::Value;
use tower::ServiceExt;

/// Methods a route may be built with, as axum's `routing` functions are named.
pub const METHODS: [&str; 8] = [
    "get", "post", "put", "patch", "delete", "head", "options", "trace",
];
/// Methods sent to every served path: each is either served or 405.
pub const PROBED: [&str; 5] = ["GET", "POST", "PUT", "PATCH", "DELETE"];

/// `(METHOD, path)`.
pub type Route = (String, String);

/// Every (METHOD, path) that `pub fn router` in `source` registers with `.route(..)`.
pub fn routes_in_router(source: &str) -> BTreeSet<Route> {
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
pub fn calls<'t>(text: &'t str, needle: &str) -> Vec<(usize, &'t str)> {
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
pub fn closing_paren(text: &str) -> usize {
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
pub fn top_level_calls(expression: &str) -> Vec<String> {
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
            // rustfmt leaves a trailing comma after the last argument of a wrapped call.
            assert!(
                trimmed.trim().trim_start_matches(',').trim().is_empty(),
                "cannot read method router {expression:?}"
            );
            return names;
        };
        names.push(name);
        rest = &args[closing_paren(args) + 1..];
    }
}

#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub allow: String,
    pub body: Value,
}

/// Sends `method path` (path parameters filled in) with an empty JSON object as its body.
pub async fn probe(app: &Router, method: &str, path: &str) -> Answer {
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

/// The routes docs/api.md's endpoint table says `who` (gateway or agent) serves.
pub fn doc_routes(doc: &str, who: &str) -> BTreeSet<Route> {
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
pub fn section(doc: &str, heading: &str) -> String {
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
pub fn table_rows(section: &str) -> Vec<Vec<String>> {
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

pub fn unquote(cell: &str) -> &str {
    cell.strip_prefix('`')
        .and_then(|c| c.strip_suffix('`'))
        .unwrap_or_else(|| panic!("{cell:?} is not in backticks"))
}

pub fn assert_same(
    left: &BTreeSet<Route>,
    left_name: &str,
    right: &BTreeSet<Route>,
    right_name: &str,
) {
    let only_left: Vec<_> = left.difference(right).collect();
    let only_right: Vec<_> = right.difference(left).collect();
    assert!(
        only_left.is_empty() && only_right.is_empty(),
        "in {left_name} only: {only_left:?}\nin {right_name} only: {only_right:?}"
    );
}
