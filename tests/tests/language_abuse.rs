//! The sandbox holds for the languages added beside the first six: in each, writing to the
//! root file system fails, a memory hog ends with `memory_limit`
//! (64 MiB; 160 MiB for TypeScript, whose compiler needs more), a connection out fails (where
//! the language has sockets), and a Bash fork bomb ends with `timeout`; the node serves the
//! next job of the same language normally after each.

use codefleet_tests::{AgentOpts, TestAgent};
use serde_json::{json, Value};

const NEW: [&str; 9] = [
    "c",
    "typescript",
    "bash",
    "ruby",
    "php",
    "lua",
    "perl",
    "sqlite",
    "csharp",
];

/// A program that tries to create /usr/codefleet and prints `refused` when it cannot.
fn write_root(language: &str) -> &'static str {
    match language {
        "c" => {
            "#include <stdio.h>\nint main(void) { FILE *f = fopen(\"/usr/codefleet\", \"w\");\n\
             \x20 puts(f ? \"written\" : \"refused\"); return 0; }\n"
        }
        "typescript" => {
            "import * as fs from \"fs\";\n\
             try { fs.writeFileSync(\"/usr/codefleet\", \"x\"); console.log(\"written\"); }\n\
             catch { console.log(\"refused\"); }\n"
        }
        "bash" => "if echo x 2>/dev/null >/usr/codefleet; then echo written; else echo refused; fi\n",
        "ruby" => {
            "begin\n  File.write('/usr/codefleet', 'x')\n  puts 'written'\n\
             rescue SystemCallError\n  puts 'refused'\nend\n"
        }
        "php" => "<?php echo @file_put_contents('/usr/codefleet', 'x') === false ? \"refused\\n\" : \"written\\n\";\n",
        "lua" => "print(io.open('/usr/codefleet', 'w') and 'written' or 'refused')\n",
        "perl" => "print open(my $f, '>', '/usr/codefleet') ? \"written\\n\" : \"refused\\n\";\n",
        "sqlite" => {
            "SELECT CASE WHEN writefile('/usr/codefleet', 'x') IS NULL THEN 'refused' ELSE 'written' END;\n"
        }
        "csharp" => {
            "public class P { public static void Main() {\n\
             \x20 try { System.IO.File.WriteAllText(\"/usr/codefleet\", \"x\"); System.Console.WriteLine(\"written\"); }\n\
             \x20 catch (System.Exception) { System.Console.WriteLine(\"refused\"); } } }\n"
        }
        other => panic!("{other}"),
    }
}

/// A program that keeps touching new memory, far past 64 MiB.
fn hog(language: &str) -> &'static str {
    match language {
        "c" => {
            "#include <stdlib.h>\n#include <string.h>\n\
             int main(void) { for (;;) { char *p = malloc(1 << 20); if (!p) return 3; memset(p, 1, 1 << 20); } }\n"
        }
        "typescript" => {
            "const kept: Buffer[] = [];\nfor (;;) kept.push(Buffer.alloc(1 << 20, 1));\n"
        }
        "bash" => "x=xxxxxxxxxxxxxxxx\nwhile :; do x=$x$x; done\n",
        "ruby" => "kept = []\nloop { kept << ('x' * (1 << 20)) }\n",
        "php" => "<?php\n$kept = [];\nfor (;;) { $kept[] = str_repeat('x', 1 << 20); }\n",
        "lua" => "local kept = {}\nlocal i = 0\nwhile true do i = i + 1; kept[i] = string.rep('x', 1 << 24) .. i end\n",
        "perl" => "my @kept;\nwhile (1) { push @kept, 'x' x (1 << 20); }\n",
        "sqlite" => "SELECT length(randomblob(400000000));\n",
        "csharp" => {
            "using System.Collections.Generic;\npublic class P { public static void Main() {\n\
             \x20 var kept = new List<byte[]>();\n\
             \x20 for (;;) { var b = new byte[1 << 20]; for (int i = 0; i < b.Length; i += 4096) b[i] = 1; kept.Add(b); } } }\n"
        }
        other => panic!("{other}"),
    }
}

/// A program that connects to 1.1.1.1:80 and prints `refused` when it cannot.
fn connect(language: &str) -> Option<&'static str> {
    Some(match language {
        "c" => {
            "#include <stdio.h>\n#include <arpa/inet.h>\n#include <sys/socket.h>\n\
             int main(void) { int s = socket(AF_INET, SOCK_STREAM, 0);\n\
             \x20 struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(80) };\n\
             \x20 inet_pton(AF_INET, \"1.1.1.1\", &a.sin_addr);\n\
             \x20 puts(s >= 0 && connect(s, (struct sockaddr *)&a, sizeof a) == 0 ? \"connected\" : \"refused\"); }\n"
        }
        "typescript" => {
            "import * as net from \"net\";\n\
             net.connect(80, \"1.1.1.1\").on(\"connect\", () => { console.log(\"connected\"); process.exit(0); })\n\
             \x20 .on(\"error\", () => console.log(\"refused\"));\n"
        }
        "bash" => "if (exec 3<>/dev/tcp/1.1.1.1/80) 2>/dev/null; then echo connected; else echo refused; fi\n",
        "ruby" => {
            "require 'socket'\nbegin\n  TCPSocket.new('1.1.1.1', 80)\n  puts 'connected'\n\
             rescue SystemCallError\n  puts 'refused'\nend\n"
        }
        "php" => "<?php echo @fsockopen('1.1.1.1', 80, $e, $m, 2) ? \"connected\\n\" : \"refused\\n\";\n",
        "perl" => {
            "use IO::Socket::INET;\n\
             print IO::Socket::INET->new(PeerAddr => '1.1.1.1:80', Timeout => 2) ? \"connected\\n\" : \"refused\\n\";\n"
        }
        "csharp" => {
            "public class P { public static void Main() {\n\
             \x20 try { new System.Net.Sockets.TcpClient(\"1.1.1.1\", 80); System.Console.WriteLine(\"connected\"); }\n\
             \x20 catch (System.Exception) { System.Console.WriteLine(\"refused\"); } } }\n"
        }
        "lua" | "sqlite" => return None,
        other => panic!("{other}"),
    })
}

async fn run(agent: &TestAgent, body: Value) -> Value {
    agent.api.execute(body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn root_fs_memory_and_network_are_contained_in_every_new_language() {
    let agent = TestAgent::start("newabuse", AgentOpts::languages(&NEW).arg("--pool-min", 0)).await;
    for lang in NEW {
        let r = run(
            &agent,
            json!({"language": lang, "source": write_root(lang)}),
        )
        .await;
        assert_eq!(r["status"], "ok", "{lang} root fs: {r}");
        assert_eq!(r["run"]["stdout"], "refused\n", "{lang} root fs: {r}");

        // tsc itself needs more than 64 MiB to compile (the compile stage has the job's limit).
        let memory: u64 = if lang == "typescript" {
            160 << 20
        } else {
            64 << 20
        };
        let r = run(
            &agent,
            json!({"language": lang, "source": hog(lang),
                   "limits": {"memory_bytes": memory, "wall_time_ms": 20000, "cpu_time_ms": 20000}}),
        )
        .await;
        assert_eq!(r["status"], "memory_limit", "{lang} memory hog: {r}");

        if let Some(source) = connect(lang) {
            let r = run(&agent, json!({"language": lang, "source": source})).await;
            assert_eq!(r["status"], "ok", "{lang} network: {r}");
            assert_eq!(r["run"]["stdout"], "refused\n", "{lang} network: {r}");
        }
    }
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bash_fork_bomb_times_out_and_the_next_job_runs() {
    let agent = TestAgent::start("bashbomb", AgentOpts::languages(&["bash"])).await;
    let r = run(
        &agent,
        json!({"language": "sh", "source": "b() { b | b & }\nwhile :; do b 2>/dev/null; done\n",
               "limits": {"wall_time_ms": 2000}}),
    )
    .await;
    assert_eq!(r["status"], "timeout", "fork bomb: {r}");
    let r = run(&agent, json!({"language": "bash", "source": "echo after"})).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["run"]["stdout"], "after\n", "{r}");
    agent.stop().await;
}
