//! The agent's routes and docs/api.md say the same thing: every route the agent's router serves
//! is in the doc's endpoint table (served by `agent` or `both`), and back. The routes are read
//! from the `.route(..)` calls of `router` in `src/http.rs`; then each one, and each one the doc
//! lists, is sent through the real router with `oneshot` (over an agent built without starting
//! anything: no Docker call, no node-id lease): it must not reach the fallback, and every other
//! method on its path must be 405. The reader and the prober are shared with
//! `gateway/tests/api_doc.rs` (in `http-edge/tests/common/api_doc.rs`), which checks the
//! gateway's router, `gateway/openapi.json` and the error table the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use axum::http::StatusCode;
use axum::Router;
use clap::Parser;
use codefleet_node_agent::catalog::Catalog;
use codefleet_node_agent::docker::Docker;
use codefleet_node_agent::engine::Engine;
use codefleet_node_agent::sandbox::Reaper;
use codefleet_node_agent::{http, Agent, Config};

#[path = "../../http-edge/tests/common/api_doc.rs"]
mod common;

use common::{assert_same, doc_routes, probe, routes_in_router, Answer, PROBED};

const HTTP: &str = include_str!("../src/http.rs");
const DOC: &str = include_str!("../../docs/api.md");

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

// ---- the router itself ----

/// The agent's router over an agent that was built but not started: it has not pinged Docker,
/// so it is not ready, and every probe is answered before any Docker call.
fn agent_router() -> Router {
    let node = format!("api-doc-{}", std::process::id());
    let config = Config::parse_from(["codefleet-agent", "--node-id", &node]);
    let catalog = Catalog::load(None).expect("the built-in catalog");
    let docker: Arc<dyn Engine> = Arc::new(
        Docker::connect(config.engine_timeouts()).expect("a Docker client (it connects lazily)"),
    );
    let (reaper, _) = Reaper::start(docker.clone());
    let agent = Agent::new(config, catalog, docker, reaper, String::new());
    http::router(Arc::new(agent))
}

/// The router's fallback answered: no route has this path.
fn is_fallback(answer: &Answer) -> bool {
    answer.status == StatusCode::NOT_FOUND && answer.body["detail"] == "no such route"
}

// ---- the doc ----
