//! Abuse is contained, the agent stays ready, and nothing of a job survives it: on the warm
//! (recycled) path, which is the agent's normal path, and with `fresh` isolation.

use std::time::{Duration, Instant};

use codefleet_tests::{containers_of, eventually, AgentOpts, StatusCode, TestAgent};
use serde_json::{json, Value};

fn run(r: &Value) -> &Value {
    &r["run"]
}

/// A pool of one sandbox per language and memory limit: consecutive `recycled` jobs share its
/// container, since a job waits for the one sandbox's reset when no never-used one is ready.
/// Tests that need a particular sandbox arrange it this way, never by timing.
async fn one_sandbox_agent(name: &str) -> TestAgent {
    TestAgent::start(name, pool_of_one()).await
}

fn pool_of_one() -> AgentOpts {
    AgentOpts::languages(&["python", "cpp"])
        .arg("--pool-min", 1)
        .arg("--pool-max", 1)
}

/// The job ran in a pool sandbox (reset after an earlier job, or never used), not a cold one.
fn pooled(r: &Value) {
    assert!(
        matches!(r["sandbox"].as_str(), Some("warm" | "fresh")),
        "ran on the warm path: {r}"
    );
}

/// Waits until the agent reports at least `n` ready sandboxes for `language`.
async fn wait_warm(agent: &TestAgent, language: &str, n: u64) {
    eventually(
        Duration::from_secs(60),
        &format!("{language} pool at {n}"),
        async || {
            let cap = agent.api.get("/v1/capacity").await.body;
            cap["languages"][language]["warm"].as_u64().unwrap_or(0) >= n
        },
    )
    .await;
}

async fn assert_ready(agent: &TestAgent) {
    let r = agent.api.get("/readyz").await;
    assert_eq!(r.status, StatusCode::OK, "agent stays ready");
    let r = agent.api.python("print('still fine')").await;
    assert_eq!(run(&r)["stdout"], "still fine\n", "{r}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abuse_is_contained_and_answered_with_the_right_status() {
    let agent = one_sandbox_agent("abuse").await;
    let api = &agent.api;
    wait_warm(&agent, "python", 1).await;

    // Fork bomb: the process limit holds, the wall limit ends it.
    let r = api
        .execute(json!({"language": "python", "limits": {"wall_time_ms": 1500, "processes": 32}, "source":
            "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"}))
        .await;
    assert_eq!(r["status"], "timeout", "fork bomb: {r}");
    pooled(&r);
    assert_ready(&agent).await;

    // Memory bombs, each limit its own pool (a cgroup's limit is fixed): the first job of a
    // limit starts that pool's sandbox, the second runs in it again after its reset.
    for round in 0..2 {
        let r = api
            .execute(
                json!({"language": "python", "limits": {"memory_bytes": 64 << 20}, "source":
                "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n"}),
            )
            .await;
        assert_eq!(r["status"], "memory_limit", "memory bomb: {r}");
        if round == 1 {
            assert_eq!(r["sandbox"], "warm", "memory bomb on a reset sandbox: {r}");
        }
        assert_ready(&agent).await;

        let r = api
            .execute(json!({"language": "cpp", "limits": {"memory_bytes": 48 << 20}, "source":
                "#include <vector>\n#include <cstring>\nint main(){ std::vector<char*> v; for(;;){ char* p = new char[1<<20]; std::memset(p, 1, 1<<20); v.push_back(p);} }"}))
            .await;
        assert_eq!(r["status"], "memory_limit", "C++ memory bomb: {r}");
        if round == 1 {
            assert_eq!(
                r["sandbox"], "warm",
                "C++ memory bomb on a reset sandbox: {r}"
            );
        }
    }

    // CPU spin: the CPU limit.
    let r = api
        .execute(json!({"language": "python", "limits": {"cpu_time_ms": 700, "wall_time_ms": 30000}, "source": "while True:\n    pass\n"}))
        .await;
    assert_eq!(r["status"], "timeout", "cpu spin: {r}");
    pooled(&r);
    let cpu = run(&r)["cpu_time_ms"].as_u64().unwrap();
    assert!(
        (700..1200).contains(&cpu),
        "cpu spin stopped near the CPU limit, used {cpu} ms: {r}"
    );

    // Sleep past the wall limit: answered near the limit, measured from the program's start.
    let started = Instant::now();
    let r = api
        .execute(json!({"language": "python", "limits": {"wall_time_ms": 600}, "source": "import time\ntime.sleep(30)\n"}))
        .await;
    assert_eq!(r["status"], "timeout", "sleep: {r}");
    pooled(&r);
    let wall = run(&r)["wall_time_ms"].as_u64().unwrap();
    // Generous bounds: the machine is shared; the benchmark reports the real overshoot.
    assert!(
        (600..1500).contains(&wall),
        "killed at {wall} ms for a 600 ms limit"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "answered near the limit"
    );
    assert_eq!(run(&r)["signal"], "SIGKILL");

    // Output flood: truncated at the cap, output_limit.
    let r = api
        .execute(json!({"language": "python", "limits": {"output_bytes": 10000}, "source": "while True:\n    print('x' * 999)\n"}))
        .await;
    assert_eq!(r["status"], "output_limit", "flood: {r}");
    pooled(&r);
    assert_eq!(run(&r)["stdout_truncated"], true);
    assert_eq!(run(&r)["stdout"].as_str().unwrap().len(), 10000);

    // The most output a job may keep, on both streams, much of it escaped in JSON: a result line
    // of megabytes crosses the channel in many chunks and comes back whole.
    let r = api
        .execute(json!({"language": "python", "limits": {"output_bytes": 1 << 20}, "source":
            "import sys\nsys.stdout.write('\"\\\\\\x01z' * (1 << 18))\nsys.stderr.write('y' * (1 << 20))\n"}))
        .await;
    let head: String = r.to_string().chars().take(400).collect();
    assert_eq!(r["status"], "ok", "{head}");
    pooled(&r);
    let out = run(&r)["stdout"].as_str().unwrap();
    assert_eq!(out.len(), 1 << 20);
    assert_eq!(&out[..8], "\"\\\u{1}z\"\\\u{1}z");
    assert_eq!(run(&r)["stdout_truncated"], false);
    assert_eq!(run(&r)["stderr"].as_str().unwrap().len(), 1 << 20);

    // Filling the work dir and /tmp: bounded by the file size limit and the tmpfs size.
    for dir in ["/work", "/tmp", "/dev/shm"] {
        let r = api
            .execute(json!({"language": "python", "limits": {"file_size_bytes": 1 << 30 >> 4}, "source": format!(
                "import os\nn = 0\ntry:\n    for i in range(10000):\n        with open('{dir}/fill%d' % i, 'wb') as f:\n            f.write(b'x' * (4 << 20))\n        n += 1\nexcept OSError as e:\n    print('stopped', e.errno, n)\n")}))
            .await;
        let out = run(&r)["stdout"].as_str().unwrap_or_default().to_string();
        assert!(out.starts_with("stopped"), "filling {dir}: {r}");
        pooled(&r);
        assert_ready(&agent).await;
    }

    // A network connection attempt: there is no network.
    let r = api
        .python("import socket\ntry:\n    socket.create_connection(('10.255.255.1', 80), timeout=2)\n    print('connected')\nexcept OSError as e:\n    print('no network', e.errno)\n")
        .await;
    assert!(
        run(&r)["stdout"]
            .as_str()
            .unwrap()
            .starts_with("no network"),
        "{r}"
    );
    pooled(&r);
    let r = api
        .python("import socket\nprint(sorted(n for _, n in socket.if_nameindex()))\n")
        .await;
    assert_eq!(run(&r)["stdout"], "['lo']\n", "only loopback: {r}");
    pooled(&r);

    // Writes to the root filesystem fail; the job is not root and holds no capability.
    let r = api
        .python("import os\nfor p in ['/etc/x', '/usr/x', '/x', '/opt/codefleet/x']:\n    try:\n        open(p, 'w')\n        print('wrote', p)\n    except OSError as e:\n        print(e.errno)\nprint(os.getuid() != 0, open('/proc/self/status').read().split('CapEff:')[1].split()[0])\n")
        .await;
    assert_eq!(
        run(&r)["stdout"],
        "30\n30\n30\n30\nTrue 0000000000000000\n",
        "{r}"
    );
    pooled(&r);

    // The job looks for secrets in every process's environment: none visible.
    let r = api
        .python("import glob\nseen = []\nfor p in glob.glob('/proc/[0-9]*/environ'):\n    try:\n        seen.append(open(p).read())\n    except OSError:\n        pass\nprint('TOKEN' in ''.join(seen).upper(), 'abuse-secret' in ''.join(seen))\n")
        .await;
    assert_eq!(run(&r)["stdout"], "False False\n", "{r}");
    pooled(&r);

    // The supervisor (PID 1) cannot be signalled or inspected by the job, nor can the job reach
    // the agent's socket directory.
    let r = api
        .python("import os, signal\ntry:\n    os.kill(1, signal.SIGKILL)\n    print('killed pid 1')\nexcept OSError as e:\n    print(e.errno)\nfor p in ['/proc/1/fd', '/run/codefleet']:\n    try:\n        os.listdir(p)\n    except OSError as e:\n        print(e.errno)\n")
        .await;
    assert_eq!(run(&r)["stdout"], "1\n13\n13\n", "{r}");
    pooled(&r);
    assert_ready(&agent).await;
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_of_one_job_is_visible_to_the_next_in_the_same_sandbox() {
    isolation_between_jobs(TestAgent::start("isolation", pool_of_one()).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_attach_stream_channel_isolates_jobs_the_same_way() {
    let opts = pool_of_one().arg("--channel", "attach");
    isolation_between_jobs(TestAgent::start("isolation-attach", opts).await).await;
}

async fn isolation_between_jobs(agent: TestAgent) {
    let api = &agent.api;
    // The pool's one sandbox is ready, and the first job takes it.
    wait_warm(&agent, "python", 1).await;
    let first = api
        .python("print(open('/etc/hostname').read().strip())")
        .await;
    let container = run(&first)["stdout"].as_str().unwrap().trim().to_string();

    let leave_traces = r#"
import os, subprocess, ctypes, sys
for d in ['/work', '/tmp', '/dev/shm']:
    with open(d + '/trace', 'w') as f:
        f.write('x')
libc = ctypes.CDLL(None, use_errno=True)
print('mq', libc.mq_open(b'/trace', os.O_CREAT | os.O_RDWR, 0o600, None) >= 0)
os.makedirs('/work/deep/er', exist_ok=True)
os.chmod('/work/deep', 0)
subprocess.Popen(['sleep', '1000'], start_new_session=True)
subprocess.Popen(['sh', '-c', 'while true; do sleep 1; done'])
libc.shmget.restype = ctypes.c_int
print('shm', libc.shmget(0x1234, 4096, 0o1666))
os.environ['LEAK'] = '1'
print(open('/etc/hostname').read().strip())
"#;
    let look = r#"
import os
print(sorted(os.listdir('/work')), sorted(os.listdir('/tmp')), sorted(os.listdir('/dev/shm')), sorted(os.listdir('/dev/mqueue')))
print(sorted(p for p in os.listdir('/proc') if p.isdigit() and p not in ('1', str(os.getpid()))))
print(open('/proc/sysvipc/shm').read().count('\n') - 1, 'LEAK' in os.environ)
print(open('/etc/hostname').read().strip())
"#;
    for round in 0..3 {
        let r = api.python(leave_traces).await;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["sandbox"], "warm", "round {round}: {r}");
        assert!(
            run(&r)["stdout"].as_str().unwrap().contains("mq True"),
            "{r}"
        );
        assert!(run(&r)["stdout"].as_str().unwrap().contains("shm "), "{r}");
        assert!(
            !run(&r)["stdout"].as_str().unwrap().contains("shm -1"),
            "the job could make shared memory: {r}"
        );
        assert!(
            run(&r)["stdout"].as_str().unwrap().contains(&container),
            "same container: {r}"
        );

        let r = api.python(look).await;
        assert_eq!(r["sandbox"], "warm");
        assert_eq!(
            run(&r)["stdout"],
            format!("['main.py'] [] [] []\n[]\n0 False\n{container}\n"),
            "round {round}: {r}"
        );
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fresh_isolation_never_reuses_a_sandbox_and_pools_refill() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 2)
        .arg("--pool-max", 4);
    let agent = TestAgent::start("fresh", opts).await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..5 {
        let r = agent
            .api
            .execute(json!({"language": "python", "isolation": "fresh", "source":
                "import os\nprint(open('/etc/hostname').read().strip())\nprint(os.listdir('/work'), os.listdir('/tmp'))"}))
            .await;
        assert!(
            matches!(r["sandbox"].as_str(), Some("fresh" | "cold")),
            "{r}"
        );
        let out = run(&r)["stdout"].as_str().unwrap().to_string();
        let (host, files) = out.trim().split_once('\n').unwrap();
        // The pool's warm-up left nothing behind either.
        assert_eq!(files, "['main.py'] []", "{r}");
        let host = host.to_string();
        assert!(
            seen.insert(host.clone()),
            "fresh job got a used sandbox {host}"
        );
    }
    // The pool comes back to its target of ready sandboxes, off the request path.
    wait_warm(&agent, "python", 2).await;
    let r = agent.api.python("print(1)").await;
    pooled(&r);
    let node = agent.node.clone();
    agent.stop().await;
    assert!(
        containers_of(&node).is_empty(),
        "a stopped agent leaves no container"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_jobs_of_mixed_languages_all_succeed() {
    let opts = AgentOpts::languages(&["python", "javascript", "cpp"])
        .arg("--slots", 8)
        .arg("--queue-wait-ms", 60000);
    let agent = TestAgent::start("concurrent", opts).await;
    let jobs = (0..20).map(|i| {
        let api = agent.api.clone();
        let body = match i % 3 {
            0 => json!({"language": "python", "source": format!("print({i} * 2)")}),
            1 => json!({"language": "javascript", "source": format!("console.log({i} * 2)")}),
            _ => json!({"language": "cpp", "source": format!("#include <cstdio>\nint main(){{ std::printf(\"%d\\n\", {i} * 2); }}")}),
        };
        async move { (i, api.execute(body).await) }
    });
    for (i, r) in futures_util::future::join_all(jobs).await {
        assert_eq!(r["status"], "ok", "job {i}: {r}");
        assert_eq!(run(&r)["stdout"], format!("{}\n", i * 2), "job {i}: {r}");
    }
    agent.stop().await;
}

/// A pool of one keeps reusing its one sandbox: it does not start a never-used one beside it
/// while the job runs, only to discard the used one when it comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_of_one_reuses_its_sandbox() {
    let opts = AgentOpts::languages(&["python"])
        .arg("--pool-min", 1)
        .arg("--pool-max", 1);
    let agent = TestAgent::start("pool-of-one", opts).await;
    wait_warm(&agent, "python", 1).await;
    let mut hosts = Vec::new();
    for i in 0..8 {
        let r = agent
            .api
            .python("print(open('/etc/hostname').read().strip())")
            .await;
        assert_eq!(r["status"], "ok", "{r}");
        if i > 0 {
            assert_eq!(r["sandbox"], "warm", "job {i}: {r}");
        }
        hosts.push(run(&r)["stdout"].as_str().unwrap().trim().to_string());
        // Give the refiller a tick to act, as it would between real requests.
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert!(
        hosts.iter().all(|h| h == &hosts[0]),
        "one container: {hosts:?}"
    );
    assert_eq!(containers_of(&agent.node).len(), 1);
    agent.stop().await;
}
