//! Images from a registry and image housekeeping, against the real engine: a runtime image
//! pushed to a local registry (Debian's `docker-registry`, started here on 127.0.0.1, which
//! Docker treats as an insecure registry by default) is pulled by an agent whose catalog names
//! it (`pull`), labelled, and runs hello; and an agent's housekeeping removes a stale image of
//! its own image cache after the grace period, never one a container uses, nor an image of
//! another cache or an unlabelled one.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use codefleet_node_agent::catalog::{Catalog, BUILTIN_CATALOG};
use codefleet_node_agent::images::Plan;
use codefleet_tests::{eventually, free_port, node_id, AgentOpts, AgentProcess, TestAgent};
use serde_json::{json, Value};

const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A `docker-registry` serving on 127.0.0.1 from a storage dir of its own, killed (and its dir
/// removed) when dropped.
struct LocalRegistry {
    child: Child,
    dir: PathBuf,
    address: String,
}

impl LocalRegistry {
    async fn start(name: &str) -> LocalRegistry {
        assert!(
            std::path::Path::new(REGISTRY_BIN).is_file(),
            "{REGISTRY_BIN} is missing: apt-get install docker-registry (.ci/run does)"
        );
        let dir = std::env::temp_dir().join(format!("codefleet-registry-{}", node_id(name)));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("storage")).unwrap();
        let address = format!("127.0.0.1:{}", free_port());
        let config = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: {address}\n",
            dir.join("storage").display()
        );
        std::fs::write(dir.join("config.yml"), config).unwrap();
        let log = std::fs::File::create(dir.join("registry.log")).unwrap();
        let child = Command::new(REGISTRY_BIN)
            .arg("serve")
            .arg(dir.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("docker-registry starts");
        let registry = LocalRegistry {
            child,
            dir,
            address,
        };
        let url = format!("http://{}/v2/", registry.address);
        let http = reqwest::Client::new();
        eventually(
            Duration::from_secs(20),
            "the registry answers",
            async || {
                http.get(&url)
                    .send()
                    .await
                    .is_ok_and(|r| r.status().is_success())
            },
        )
        .await;
        registry
    }
}

impl Drop for LocalRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Images (by tag) and containers a test made, removed when it ends, however it ends.
#[derive(Default)]
struct Made {
    images: Vec<String>,
    containers: Vec<String>,
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = docker(&["rm", "-f", c]);
        }
        for image in &self.images {
            let _ = docker(&["rmi", image]);
        }
    }
}

/// Runs the docker CLI; its stdout, or its stderr as the error.
fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker CLI runs");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
    }
}

fn image_present(tag: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", tag]).is_ok()
}

/// The tag of the built-in Lua runtime's image, made first when it is not there.
fn lua_image() -> String {
    let catalog = Catalog::parse(BUILTIN_CATALOG).unwrap();
    let tag = Plan::of(catalog.find("lua").unwrap(), None, None)
        .unwrap()
        .tag;
    if !image_present(&tag) {
        let status = Command::new(codefleet_tests::bin_path("codefleet-agent"))
            .args(["--prepare-only", "--enable", "lua"])
            .status()
            .expect("codefleet-agent runs");
        assert!(status.success(), "preparing the Lua image failed");
    }
    tag
}

/// The built-in catalog's Lua entry, as TOML, with its `image` line replaced by `image`.
fn lua_entry(image_lines: &str) -> String {
    let entry = BUILTIN_CATALOG
        .split("[[language]]")
        .find(|e| e.contains("name = \"lua\""))
        .expect("a Lua entry");
    let body: Vec<&str> = entry
        .lines()
        .filter(|l| !l.starts_with("image ") && !l.starts_with('#'))
        .collect();
    format!("[[language]]\n{image_lines}\n{}\n", body.join("\n").trim())
}

async fn hello(api: &codefleet_tests::Api) -> Value {
    api.execute(json!({
        "language": "lua",
        "source": "local line = io.read('l')\nprint('hello ' .. line .. ' ' .. table.concat(arg, ' '))\n",
        "stdin": "world\n",
        "args": ["a", "b"],
    }))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_named_to_pull_is_pulled_from_a_local_registry_and_runs_hello() {
    let registry = LocalRegistry::start("pull").await;
    let mut made = Made::default();
    let unique = node_id("pull");

    // A locally built runtime image, pushed under a name and tag nothing here has.
    let source = lua_image();
    let repository = format!("codefleet-regtest/{unique}-lua:v1");
    let pushed = format!("{}/{repository}", registry.address);
    docker(&["tag", &source, &pushed]).unwrap();
    made.images.push(pushed.clone());
    docker(&["push", &pushed]).unwrap();
    docker(&["rmi", &pushed]).unwrap();
    assert!(!image_present(&pushed));

    let dir = std::env::temp_dir().join(format!("codefleet-pull-{unique}"));
    std::fs::create_dir_all(&dir).unwrap();
    let catalog = dir.join("languages.toml");
    let image = format!("regtest-{unique}-lua");
    std::fs::write(
        &catalog,
        lua_entry(&format!("image = \"{image}\"\npull = \"{repository}\"")),
    )
    .unwrap();
    let cache = format!("regtest-{unique}");
    let lang = Catalog::load(Some(&catalog)).unwrap().languages[0].clone();
    let tag = Plan::of(&lang, None, Some(&registry.address)).unwrap().tag;
    made.images.push(tag.clone());
    assert!(!image_present(&tag));

    let mut opts = AgentOpts::languages(&["lua"])
        .arg("--languages", catalog.display())
        .arg("--registry", &registry.address)
        .arg("--image-cache", &cache);
    opts.enable_only_these = false;
    let node = node_id("pull");
    let mut agent = AgentProcess::spawn(&node, free_port(), &opts).await;

    let r = hello(&agent.api).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["run"]["stdout"], "hello world a b\n", "{r}");
    let langs = agent.api.get("/v1/languages").await.body;
    let lua = &langs.as_array().unwrap()[0];
    assert!(
        lua["version"].as_str().unwrap().starts_with("5.4"),
        "{langs}"
    );

    // Pulled (with progress lines, as a build has), then labelled as the agent's own.
    let log = std::fs::read_to_string(AgentProcess::log_path(&node)).unwrap();
    let pulling: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("pulling image") && l.contains(&image))
        .collect();
    assert!(
        pulling.iter().any(|l| l.contains("Digest:"))
            && pulling.iter().any(|l| l.contains(&pushed)),
        "pull progress in the log: {pulling:#?}"
    );
    assert!(image_present(&pushed), "the pulled reference is here now");
    let labels: Value = serde_json::from_str(
        &docker(&[
            "image",
            "inspect",
            "--format",
            "{{json .Config.Labels}}",
            &tag,
        ])
        .unwrap(),
    )
    .unwrap();
    assert_eq!(labels["codefleet.image"], image.as_str(), "{labels}");
    assert_eq!(labels["codefleet.pulled"], pushed.as_str(), "{labels}");
    assert_eq!(labels["codefleet.cache"], cache.as_str(), "{labels}");

    // Its disk use is reported once measured.
    let size: u64 = docker(&["image", "inspect", "--format", "{{.Size}}", &tag])
        .unwrap()
        .parse()
        .unwrap();
    let api = agent.api.clone();
    eventually(
        Duration::from_secs(30),
        "image_bytes reported",
        async || {
            let c = api.get("/v1/capacity").await.body;
            c["image_bytes"].as_u64().is_some_and(|b| b >= size)
        },
    )
    .await;

    agent.signal("TERM");
    assert!(agent.exited(Duration::from_secs(60)).await.is_some());
    let _ = std::fs::remove_dir_all(&dir);
    drop(made);
    assert!(!image_present(&tag) && !image_present(&pushed));
    drop(registry);
}

/// Builds an image of no layer (`FROM scratch`) tagged `tag`, its own id through its labels.
fn build_labelled(made: &mut Made, tag: &str, labels: &[(String, String)]) {
    use std::io::Write as _;
    let mut args = vec![
        "build".to_string(),
        "-q".into(),
        "-t".into(),
        tag.to_string(),
    ];
    for (k, v) in labels {
        args.extend(["--label".to_string(), format!("{k}={v}")]);
    }
    args.push("-".into());
    let mut child = Command::new("docker")
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"FROM scratch\n").unwrap();
    drop(stdin);
    assert!(child.wait().unwrap().success(), "building {tag}");
    made.images.push(tag.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn housekeeping_removes_only_the_stale_images_of_its_cache_and_none_in_use() {
    let unique = node_id("hk");
    let cache = format!("regtest-{unique}");
    let mut made = Made::default();
    let labels = |image: &str, hash: &str, cache: &str| {
        [
            ("codefleet.image", image),
            ("codefleet.recipe", hash),
            ("codefleet.cache", cache),
        ]
        .map(|(k, v)| (k.to_string(), v.to_string()))
    };
    let tag = |what: &str| format!("codefleet-regtest-{unique}-{what}:v1");
    let catalog = Catalog::parse(BUILTIN_CATALOG).unwrap();
    let lua_hash = Plan::of(catalog.find("lua").unwrap(), None, None)
        .unwrap()
        .hash;
    let gone = format!("gone-{unique}");
    let other = format!("{cache}-other");
    // Stale: a runtime no longer in the catalog, an older recipe of one that is, and one a
    // container (not the agent's) is made from. Kept: the catalog's current Lua recipe, a stale
    // one of another cache, one without the agent's labels.
    let images = [
        ("stale-gone", labels(&gone, "000000000000", &cache).to_vec()),
        ("stale-old", labels("lua", "000000000000", &cache).to_vec()),
        ("stale-used", labels(&gone, "111111111111", &cache).to_vec()),
        ("current", labels("lua", &lua_hash, &cache).to_vec()),
        (
            "other-cache",
            labels(&gone, "000000000000", &other).to_vec(),
        ),
        ("plain", vec![("regtest".to_string(), unique.clone())]),
    ];
    for (what, labels) in &images {
        build_labelled(&mut made, &tag(what), labels);
    }
    let container = docker(&[
        "create",
        "--entrypoint",
        "/nothing",
        "--label",
        &format!("codefleet.test={unique}"),
        &tag("stale-used"),
    ])
    .unwrap();
    made.containers.push(container.clone());

    let opts = AgentOpts::languages(&["lua"])
        .arg("--image-cache", &cache)
        .arg("--image-grace-s", 1)
        .arg("--image-housekeeping-s", 1);
    let agent = TestAgent::start("hk", opts).await;

    for what in ["stale-gone", "stale-old"] {
        let t = tag(what);
        eventually(
            Duration::from_secs(60),
            &format!("{t} removed"),
            async || !image_present(&t),
        )
        .await;
    }
    // Three more passes: what is kept stays.
    let passes = Instant::now();
    let api = agent.api.clone();
    eventually(Duration::from_secs(30), "three more passes", async || {
        passes.elapsed() > Duration::from_secs(3) && api.get("/readyz").await.status.is_success()
    })
    .await;
    for what in ["stale-used", "current", "other-cache", "plain"] {
        assert!(image_present(&tag(what)), "{what} kept");
    }

    // The container gone, the image it used goes too.
    docker(&["rm", "-f", &container]).unwrap();
    let used = tag("stale-used");
    eventually(
        Duration::from_secs(30),
        "the formerly used image removed",
        async || !image_present(&used),
    )
    .await;
    for what in ["current", "other-cache", "plain"] {
        assert!(image_present(&tag(what)), "{what} kept");
    }

    // Disk use in the capacity report and as a metric.
    let c = agent.api.get("/v1/capacity").await.body;
    assert!(c["image_bytes"].as_u64().is_some(), "{c}");
    let metrics = agent.api.get("/metrics").await.body;
    assert!(
        metrics
            .as_str()
            .is_some_and(|m| m.contains("codefleet_image_bytes")),
        "{metrics}"
    );
    agent.stop().await;
    drop(made);
}
