//! Several versions of a language side by side, through a real gateway and agent: the built-in
//! catalog's two runtimes of python, javascript, go, java, c, cpp and rust each run when their
//! version is asked for, the newest runs when none is, a prefix that ends inside a component
//! names neither (400 `unknown_language`), `/v1/languages` lists both at the gateway and the
//! agent, and a session runs the version it was created with.

use std::time::Duration;

use codefleet_tests::{eventually, Api, Cluster, StatusCode};
use serde_json::{json, Value};

/// A language, its older and newer version prefixes, a prefix that ends inside a component of
/// the newer (it names neither), what its program's output starts with before the version, and
/// the program, which prints the version of the toolchain that built or runs it.
struct Pair {
    language: &'static str,
    old: &'static str,
    new: &'static str,
    off_boundary: &'static str,
    printed: &'static str,
    source: &'static str,
}

const PAIRS: [Pair; 7] = [
    Pair {
        language: "python",
        old: "3.11",
        new: "3.13",
        off_boundary: "3.1",
        printed: "",
        source: "import sys\nprint(sys.version)\n",
    },
    Pair {
        language: "javascript",
        old: "18",
        new: "20",
        off_boundary: "2",
        printed: "v",
        source: "console.log(process.version)\n",
    },
    Pair {
        language: "go",
        old: "1.19",
        new: "1.24",
        off_boundary: "1.2",
        printed: "go",
        source: "package main\n\nimport (\n\t\"fmt\"\n\t\"runtime\"\n)\n\nfunc main() { fmt.Println(runtime.Version()) }\n",
    },
    Pair {
        language: "java",
        old: "17",
        new: "21",
        off_boundary: "2",
        printed: "",
        source: "public class Main { public static void main(String[] a) { System.out.println(System.getProperty(\"java.version\")); } }\n",
    },
    Pair {
        language: "c",
        old: "12",
        new: "14",
        off_boundary: "1",
        printed: "",
        source: "#include <stdio.h>\nint main(void) { printf(\"%s\\n\", __VERSION__); return 0; }\n",
    },
    Pair {
        language: "cpp",
        old: "12",
        new: "14",
        off_boundary: "1",
        printed: "",
        source: "#include <iostream>\nint main() { std::cout << __VERSION__ << std::endl; }\n",
    },
    Pair {
        language: "rust",
        old: "1.63",
        new: "1.85",
        off_boundary: "1.8",
        printed: "rustc ",
        // The compiled program asks the compiler beside it in the image: a Rust program has no
        // version of its compiler to print.
        source: "fn main() {\n    let out = std::process::Command::new(\"rustc\").arg(\"--version\").output().unwrap();\n    print!(\"{}\", String::from_utf8_lossy(&out.stdout));\n}\n",
    },
];

/// Every runtime of `language` that `/v1/languages` (in `langs`) lists, in its order.
fn runtimes_of<'a>(langs: &'a Value, language: &str) -> Vec<&'a Value> {
    langs
        .as_array()
        .unwrap()
        .iter()
        .filter(|l| l["name"] == language)
        .collect()
}

/// The versions of `pair` that `langs` lists, newest first, checked for shape.
fn listed_versions(langs: &Value, pair: &Pair) -> [String; 2] {
    let runtimes = runtimes_of(langs, pair.language);
    let versions: Vec<String> = runtimes
        .iter()
        .map(|l| l["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(versions.len(), 2, "{}: {runtimes:?}", pair.language);
    assert!(
        versions[0].starts_with(&format!("{}.", pair.new))
            && versions[1].starts_with(&format!("{}.", pair.old)),
        "{}: listed newest first: {versions:?}",
        pair.language
    );
    for l in &runtimes {
        assert_eq!(l["nodes_ready"], 1, "{l}");
        assert!(
            l["file_name"].is_string() && l["compiled"].is_boolean(),
            "{l}"
        );
        assert!(l["aliases"].is_array(), "{l}");
    }
    [versions[0].clone(), versions[1].clone()]
}

/// Runs `pair`'s program asking for `version` and checks that the version it printed and the
/// one the answer names are `expect`'s.
async fn runs(api: &Api, pair: &Pair, version: Option<&str>, expect: &str) {
    let mut body = json!({"language": pair.language, "source": pair.source});
    if let Some(v) = version {
        body["version"] = json!(v);
    }
    let r = api.execute(body).await;
    let what = format!("{} {version:?}", pair.language);
    assert_eq!(r["status"], "ok", "{what}: {r}");
    let stdout = r["run"]["stdout"].as_str().unwrap();
    let printed = format!("{}{expect}.", pair.printed);
    assert!(
        stdout.starts_with(&printed),
        "{what}: printed {stdout:?}, not {printed}*"
    );
    let named = r["language"]["version"].as_str().unwrap();
    assert!(
        named.starts_with(&format!("{expect}.")),
        "{what}: answer names {named}"
    );
    assert_eq!(r["language"]["name"], pair.language, "{what}");
}

/// An off-boundary prefix is 400 `unknown_language`, its detail naming both versions.
async fn refuses_off_boundary(api: &Api, pair: &Pair, versions: &[String; 2]) {
    let body =
        json!({"language": pair.language, "version": pair.off_boundary, "source": pair.source});
    let r = api.post("/v1/execute", &body).await;
    assert_eq!(
        (r.status, r.code()),
        (StatusCode::BAD_REQUEST, "unknown_language"),
        "{} {:?}: {r:?}",
        pair.language,
        pair.off_boundary
    );
    let detail = r.body["detail"].as_str().unwrap_or_default();
    assert!(
        versions.iter().all(|v| detail.contains(v.as_str())),
        "{}: the detail lists {versions:?}: {detail}",
        pair.language
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_version_of_a_language_runs_when_asked_the_newest_by_default() {
    let languages: Vec<&'static str> = PAIRS.iter().map(|p| p.language).collect();
    let mut cluster = Cluster::named("versions")
        .languages(&languages)
        .agent_arg("--pool-min", 0)
        .start()
        .await;
    let node = cluster.node_ids().remove(0);
    let agent = cluster.agent(&node).api.clone();
    let gateway = cluster.api.clone();
    // The gateway learns of the newer runtimes from the agent's next reports.
    eventually(
        Duration::from_secs(30),
        "the gateway lists two ready runtimes of each language",
        async || {
            let langs = gateway.get("/v1/languages").await.body;
            PAIRS.iter().all(|p| {
                let runtimes = runtimes_of(&langs, p.language);
                runtimes.len() == 2 && runtimes.iter().all(|l| l["nodes_ready"] == 1)
            })
        },
    )
    .await;

    let at_gateway = gateway.get("/v1/languages").await.body;
    let at_agent = agent.get("/v1/languages").await.body;
    for pair in &PAIRS {
        let versions = listed_versions(&at_gateway, pair);
        assert_eq!(
            listed_versions(&at_agent, pair),
            versions,
            "{}",
            pair.language
        );
        for l in runtimes_of(&at_agent, pair.language) {
            assert_eq!(l["image"], "ready", "{l}");
        }
        runs(&gateway, pair, Some(pair.old), pair.old).await;
        runs(&gateway, pair, Some(pair.new), pair.new).await;
        runs(&gateway, pair, None, pair.new).await;
        refuses_off_boundary(&gateway, pair, &versions).await;
        refuses_off_boundary(&agent, pair, &versions).await;
    }
    // Asked straight, the agent resolves the same way.
    runs(&agent, &PAIRS[0], Some("3.11"), "3.11").await;
    runs(&agent, &PAIRS[0], Some("3"), "3.13").await;

    // A session runs the version it was created with.
    for (version, expect) in [(Some("3.11"), "3.11"), (None, "3.13")] {
        let mut body = json!({"language": "python", "ttl_s": 60});
        if let Some(v) = version {
            body["version"] = json!(v);
        }
        let created = gateway.post("/v1/sessions", &body).await;
        assert_eq!(created.status, StatusCode::CREATED, "{created:?}");
        let named = created.body["language"]["version"].as_str().unwrap();
        assert!(named.starts_with(&format!("{expect}.")), "{created:?}");
        let id = created.body["id"].as_str().unwrap();
        let r = gateway
            .post(
                &format!("/v1/sessions/{id}/execute"),
                &json!({"source": PAIRS[0].source}),
            )
            .await;
        let stdout = r.body["run"]["stdout"].as_str().unwrap_or_default();
        assert!(stdout.starts_with(&format!("{expect}.")), "{r:?}");
        let deleted = gateway.delete(&format!("/v1/sessions/{id}")).await;
        assert!(deleted.status.is_success(), "{deleted:?}");
    }
    let refused = gateway
        .post(
            "/v1/sessions",
            &json!({"language": "python", "version": "3.1"}),
        )
        .await;
    assert_eq!(
        (refused.status, refused.code()),
        (StatusCode::BAD_REQUEST, "unknown_language"),
        "{refused:?}"
    );

    let nodes = cluster.stop().await;
    codefleet_tests::assert_nothing_left(nodes).await;
}
