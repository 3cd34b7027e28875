//! The gateway library does not depend on the node agent, nor through it on bollard and Docker:
//! only the binary's `--dev` wiring uses the agent, behind the default-on `dev` feature. These
//! checks read cargo's own view of the manifest and the dependency graph (no build), so they
//! fail the moment a dependency brings the agent or bollard back into the library.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

const MANIFEST: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml");

/// Runs cargo (the one running these tests) offline on the gateway's manifest.
fn cargo(args: &[&str]) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args(args)
        .args(["--offline", "--manifest-path", MANIFEST])
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")))
        .output()
        .expect("cargo runs");
    assert!(
        output.status.success(),
        "cargo {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).expect("cargo prints UTF-8")
}

/// The names of the packages in `cargo tree` output printed with `--prefix none`.
fn package_names(tree: &str) -> Vec<&str> {
    tree.lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect()
}

#[test]
fn without_the_dev_feature_nothing_reaches_the_agent_or_bollard() {
    let tree = cargo(&[
        "tree",
        "--no-default-features",
        "--edges",
        "normal",
        "--prefix",
        "none",
    ]);
    let names = package_names(&tree);
    // The graph is the gateway's: its own serving crate is in it.
    assert!(names.contains(&"codefleet-http-edge"), "{tree}");
    for banned in ["codefleet-node-agent", "bollard", "bollard-stubs"] {
        assert!(
            !names.contains(&banned),
            "{banned} is in the graph:\n{tree}"
        );
    }
}

#[test]
fn the_agent_is_only_an_optional_dependency_of_the_default_dev_feature() {
    let metadata: Value =
        serde_json::from_str(&cargo(&["metadata", "--format-version", "1", "--no-deps"]))
            .expect("cargo metadata is JSON");
    let gateway = metadata["packages"]
        .as_array()
        .and_then(|packages| packages.iter().find(|p| p["name"] == "codefleet-gateway"))
        .expect("the gateway package");
    let agent: Vec<&Value> = gateway["dependencies"]
        .as_array()
        .expect("dependencies")
        .iter()
        .filter(|d| d["name"] == "codefleet-node-agent")
        .collect();
    assert_eq!(agent.len(), 1, "one dependency on the agent: {agent:?}");
    assert_eq!(agent[0]["optional"], true, "{:?}", agent[0]);
    assert_eq!(
        agent[0]["kind"],
        Value::Null,
        "a normal dependency: {:?}",
        agent[0]
    );

    let features = gateway["features"].as_object().expect("features");
    assert_eq!(
        features["dev"],
        serde_json::json!(["dep:codefleet-node-agent"])
    );
    let enabling: Vec<&String> = features
        .iter()
        .filter(|(_, enables)| {
            enables.as_array().is_some_and(|e| {
                e.iter()
                    .any(|x| x.as_str().is_some_and(|x| x.contains("node-agent")))
            })
        })
        .map(|(name, _)| name)
        .collect();
    assert_eq!(enabling, ["dev"], "only `dev` enables the agent");
    // deploy/up.sh and the tests run `codefleet-gateway --dev` from a default build.
    assert!(
        features["default"]
            .as_array()
            .is_some_and(|d| d.iter().any(|f| f == "dev")),
        "`dev` is a default feature: {features:?}"
    );
}
