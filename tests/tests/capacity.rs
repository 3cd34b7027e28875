//! Saturation and failed images: 503 `no_capacity` and `language_unavailable`, each with
//! `Retry-After`, and the capacity report that says why.

use std::time::Duration;

use codefleet_tests::{containers_of, AgentOpts, TestAgent};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_node_answers_no_capacity_and_a_failed_image_language_unavailable() {
    // A catalog with a language whose recipe cannot build: it fails on its own, python works.
    let dir = std::env::temp_dir().join(format!("codefleet-broken-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("broken")).unwrap();
    std::fs::create_dir_all(dir.join("python")).unwrap();
    std::fs::write(
        dir.join("broken/Dockerfile"),
        "FROM debian:bookworm-slim\nRUN exit 3\n",
    )
    .unwrap();
    std::fs::copy(
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../deploy/images/python/Dockerfile"
        ),
        dir.join("python/Dockerfile"),
    )
    .unwrap();
    let catalog = dir.join("languages.toml");
    std::fs::write(
        &catalog,
        "[[language]]\nname = \"python\"\nimage = \"python\"\nfile_name = \"main.py\"\nversion = [\"python3\", \"--version\"]\nrun = [\"python3\", \"{entry}\"]\n\n\
         [[language]]\nname = \"broken\"\nimage = \"broken\"\nfile_name = \"main.x\"\nversion = [\"true\"]\nrun = [\"true\"]\n",
    )
    .unwrap();
    let mut opts = AgentOpts::languages(&["python"])
        .arg("--languages", catalog.display())
        .arg("--images-dir", dir.display())
        .arg("--slots", 1)
        .arg("--queue-wait-ms", 200);
    opts.enable_only_these = false;
    let agent = TestAgent::start("busy", opts).await;

    // The broken language ends failed with its reason, and jobs for it get 503 + Retry-After.
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        let langs = agent.api.get("/v1/languages").await.body;
        let broken = langs
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == "broken")
            .cloned()
            .unwrap();
        if broken["image"] == "failed" {
            assert!(
                broken["error"].as_str().unwrap().contains("exit"),
                "{broken}"
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "broken image never failed: {broken}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let a = agent
        .api
        .post("/v1/execute", &json!({"language": "broken", "source": "x"}))
        .await;
    assert_eq!(
        (a.status.as_u16(), a.code()),
        (503, "language_unavailable"),
        "{a:?}"
    );
    assert!(a.headers.contains_key("retry-after"));

    // One slot: a long job holds it, the next waits 200 ms, then 503 no_capacity + Retry-After.
    let api = agent.api.clone();
    let long = tokio::spawn(async move {
        api.python("import time\ntime.sleep(3)\nprint('done')")
            .await
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    let a = agent
        .api
        .post(
            "/v1/execute",
            &json!({"language": "python", "source": "print(2)"}),
        )
        .await;
    assert_eq!((a.status.as_u16(), a.code()), (503, "no_capacity"), "{a:?}");
    assert_eq!(a.headers["retry-after"], "1");
    let cap = agent.api.get("/v1/capacity").await.body;
    assert_eq!(
        (cap["slots_total"].as_u64(), cap["slots_busy"].as_u64()),
        (Some(1), Some(1)),
        "{cap}"
    );
    assert_eq!(cap["languages"]["broken"]["image"], "failed");
    assert_eq!(long.await.unwrap()["run"]["stdout"], "done\n");
    let node = agent.node.clone();
    agent.stop().await;
    assert!(containers_of(&node).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
