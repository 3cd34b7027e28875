//! Every language of the catalog really compiles and runs: hello world reading stdin and args,
//! and a compile error for each compiled language; the same for the newer toolchains of
//! deploy/images/trixie.toml.

use codefleet_tests::{AgentOpts, Api, TestAgent};
use serde_json::{json, Value};

const ALL: [&str; 15] = [
    "python",
    "javascript",
    "go",
    "java",
    "cpp",
    "rust",
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

fn hello(language: &str) -> &'static str {
    match language {
        "python" => "import sys\nname = input()\nprint('hello', name, *sys.argv[1:])\n",
        "javascript" => {
            "const line = require('fs').readFileSync(0, 'utf8').split('\\n')[0];\n\
             console.log(['hello', line, ...process.argv.slice(2)].join(' '));\n"
        }
        "go" => {
            "package main\n\nimport (\n\t\"bufio\"\n\t\"fmt\"\n\t\"os\"\n\t\"strings\"\n)\n\n\
             func main() {\n\tline, _ := bufio.NewReader(os.Stdin).ReadString('\\n')\n\
             \tparts := append([]string{\"hello\", strings.TrimSpace(line)}, os.Args[1:]...)\n\
             \tfmt.Println(strings.Join(parts, \" \"))\n}\n"
        }
        "java" => {
            "import java.util.Scanner;\n\npublic class Main {\n  public static void main(String[] args) {\n\
             \x20   String line = new Scanner(System.in).nextLine();\n\
             \x20   StringBuilder sb = new StringBuilder(\"hello \" + line);\n\
             \x20   for (String a : args) sb.append(' ').append(a);\n\
             \x20   System.out.println(sb);\n  }\n}\n"
        }
        "cpp" => {
            "#include <iostream>\n#include <string>\nint main(int argc, char** argv) {\n\
             \x20 std::string line; std::getline(std::cin, line);\n\
             \x20 std::cout << \"hello \" << line;\n\
             \x20 for (int i = 1; i < argc; i++) std::cout << ' ' << argv[i];\n\
             \x20 std::cout << std::endl;\n}\n"
        }
        "rust" => {
            "use std::io::BufRead;\nfn main() {\n\
             \x20   let line = std::io::stdin().lock().lines().next().unwrap().unwrap();\n\
             \x20   let mut parts = vec![\"hello\".to_string(), line];\n\
             \x20   parts.extend(std::env::args().skip(1));\n\
             \x20   println!(\"{}\", parts.join(\" \"));\n}\n"
        }
        "c" => {
            "#include <stdio.h>\n#include <string.h>\nint main(int argc, char **argv) {\n\
             \x20 char line[256];\n\
             \x20 if (!fgets(line, sizeof line, stdin)) return 1;\n\
             \x20 line[strcspn(line, \"\\n\")] = 0;\n\
             \x20 printf(\"hello %s\", line);\n\
             \x20 for (int i = 1; i < argc; i++) printf(\" %s\", argv[i]);\n\
             \x20 printf(\"\\n\");\n  return 0;\n}\n"
        }
        "typescript" => {
            "import * as fs from \"fs\";\n\
             const line: string = fs.readFileSync(0, \"utf8\").split(\"\\n\")[0];\n\
             const parts: string[] = [\"hello\", line, ...process.argv.slice(2)];\n\
             console.log(parts.join(\" \"));\n"
        }
        "bash" => "read -r line\necho \"hello $line $*\"\n",
        "ruby" => "line = $stdin.gets.chomp\nputs([\"hello\", line, *ARGV].join(\" \"))\n",
        "php" => {
            "<?php\n$line = trim(fgets(STDIN));\n\
             echo implode(\" \", array_merge([\"hello\", $line], array_slice($argv, 1))), \"\\n\";\n"
        }
        "lua" => {
            "local parts = {\"hello\", io.read(\"l\")}\n\
             for _, a in ipairs(arg) do parts[#parts + 1] = a end\n\
             print(table.concat(parts, \" \"))\n"
        }
        "perl" => {
            "my $line = <STDIN>;\nchomp $line;\nprint join(\" \", \"hello\", $line, @ARGV), \"\\n\";\n"
        }
        // stdin is data for `.import '|cat'`; the args are the rows of the `args` table.
        "sqlite" => {
            "CREATE TABLE input(line TEXT);\n.import '|cat' input\n\
             SELECT 'hello ' || (SELECT line FROM input LIMIT 1)\n\
             \x20 || coalesce((SELECT group_concat(' ' || value, '' ORDER BY i) FROM args), '');\n"
        }
        "csharp" => {
            "using System;\nusing System.Linq;\n\npublic class Program {\n\
             \x20 public static void Main(string[] args) {\n\
             \x20   string line = Console.ReadLine();\n\
             \x20   Console.WriteLine(string.Join(\" \", new[] { \"hello\", line }.Concat(args)));\n\
             \x20 }\n}\n"
        }
        other => panic!("no hello for {other}"),
    }
}

fn broken(language: &str) -> &'static str {
    match language {
        "go" => "package main\n\nfunc main() { undefinedThing() }\n",
        "java" => "public class Main { public static void main(String[] a) { int x = \"no\"; } }\n",
        "cpp" => "int main() { return undefined_thing; }\n",
        "rust" => "fn main() { let x: u32 = \"no\"; }\n",
        "c" => "int main(void) { return undefined_thing; }\n",
        // A type error, not a syntax error: tsc checks types.
        "typescript" => "const x: number = \"no\";\nconsole.log(x);\n",
        "csharp" => "public class Program { public static void Main() { int x = \"no\"; } }\n",
        other => panic!("{other} is not compiled"),
    }
}

/// A piece of the compiler's message for `broken(language)`.
fn compiler_says(language: &str) -> &'static str {
    match language {
        "go" => "undefinedThing",
        "java" => "incompatible types",
        "cpp" | "c" => "undefined_thing",
        "rust" => "mismatched types",
        "typescript" => "TS2322",
        "csharp" => "CS0029",
        other => panic!("{other} is not compiled"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_reads_stdin_and_args_in_every_language_and_compile_errors_are_reported() {
    let agent = TestAgent::start("langs", AgentOpts::languages(&ALL).arg("--pool-min", 0)).await;
    let langs = agent.api.get("/v1/languages").await.body;
    for lang in ALL {
        check_hello_and_compile_error(&agent.api, &langs, lang).await;
    }
    agent.stop().await;
}

/// The newer toolchains from Debian trixie (deploy/images/trixie.toml, not served by default):
/// every image builds, reports the version it is for, and runs the same programs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_trixie_toolchains_build_and_run_hello_stdin_args_and_compile_errors() {
    const TRIXIE: [(&str, &str); 7] = [
        ("python", "3.13."),
        ("javascript", "20."),
        ("go", "1.24"),
        ("java", "21."),
        ("cpp", "14."),
        ("rust", "1.85."),
        ("c", "14."),
    ];
    let images = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/images");
    let names: Vec<&'static str> = TRIXIE.iter().map(|(n, _)| *n).collect();
    let opts = AgentOpts::languages(&names)
        .arg("--pool-min", 0)
        .arg("--languages", format!("{images}/trixie.toml"))
        .arg("--images-dir", images);
    let agent = TestAgent::start("trixie", opts).await;
    let langs = agent.api.get("/v1/languages").await.body;
    for (lang, version) in TRIXIE {
        let found = check_hello_and_compile_error(&agent.api, &langs, lang).await;
        assert!(
            found.starts_with(version),
            "{lang}: {found} is not {version}"
        );
    }
    let r = agent
        .api
        .python("import numpy, pandas, matplotlib, scipy, sympy\nprint(matplotlib.get_backend().lower())")
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(r["run"]["stdout"], "agg\n", "{r}");
    assert_eq!(r["run"]["stderr"], "", "{r}");
    agent.stop().await;
}

/// Hello world with stdin and args in `lang` (as `/v1/languages` lists it in `langs`), and a
/// compile error with the compiler's message if it is compiled. Returns the version it ran.
/// The compile's wall time these checks allow: a compiler (tsc takes seconds of CPU) starved by
/// the other tests on two cores can outlast the default 10 s, which is not what they test.
const SLOW_COMPILE_OK_MS: u64 = 60_000;

async fn check_hello_and_compile_error(api: &Api, langs: &Value, lang: &str) -> String {
    let entry = langs
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == lang)
        .unwrap();
    let version = entry["version"].as_str().unwrap();
    assert!(
        version.chars().next().is_some_and(|c| c.is_ascii_digit()),
        "{lang} version {version:?} read from the image"
    );
    assert_eq!(entry["image"], "ready");

    let r = api
        .execute(json!({"language": lang, "source": hello(lang), "stdin": "world\n", "args": ["a", "b c"], "limits": {"compile_wall_time_ms": SLOW_COMPILE_OK_MS}}))
        .await;
    assert_eq!(r["status"], "ok", "{lang}: {r}");
    assert_eq!(r["run"]["stdout"], "hello world a b c\n", "{lang}: {r}");
    assert_eq!(r["language"]["name"], lang);
    assert_eq!(r["language"]["version"], version);
    let compiled = entry["compiled"].as_bool().unwrap();
    assert_eq!(r["compile"].is_null(), !compiled, "{lang}: {r}");

    if compiled {
        let r = api
            .execute(json!({"language": lang, "source": broken(lang), "limits": {"compile_wall_time_ms": SLOW_COMPILE_OK_MS}}))
            .await;
        assert_eq!(r["status"], "compile_error", "{lang}: {r}");
        assert!(r["run"].is_null(), "{lang}: {r}");
        let stderr = r["compile"]["stderr"].as_str().unwrap();
        assert!(
            stderr.contains(compiler_says(lang)) && r["compile"]["exit_code"] != 0,
            "{lang}: {r}"
        );
    }
    version.to_string()
}

/// SQLite's conventions (deploy/languages.toml): stdin is data for `.import '|cat'`, args are rows of
/// the `args` table whatever they hold, and the first error stops the script and fails the run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_scripts_read_stdin_as_data_args_as_a_table_and_stop_at_an_error() {
    let agent = TestAgent::start("sqlite", AgentOpts::languages(&["sqlite"])).await;
    let script = "CREATE TABLE t(name TEXT, n INTEGER);\n.import --csv '|cat' t\n\
                  SELECT name, sum(n) FROM t GROUP BY name ORDER BY name;\n\
                  SELECT i, value, length(value) FROM args ORDER BY i;\n";
    let r = agent
        .api
        .execute(json!({"language": "sqlite3", "source": script,
            "stdin": "a,1\nb,2\na,3\n", "args": ["it's", "x'); DROP TABLE t; --", "two\nlines\n"]}))
        .await;
    assert_eq!(r["status"], "ok", "{r}");
    assert_eq!(
        r["run"]["stdout"], "a|4\nb|2\n1|it's|4\n2|x'); DROP TABLE t; --|21\n3|two\nlines\n|10\n",
        "{r}"
    );
    let r = agent
        .api
        .execute(json!({"language": "sqlite", "source": "SELECT 1;\nSELECT * FROM missing;\nSELECT 2;\n"}))
        .await;
    assert_eq!(r["status"], "runtime_error", "{r}");
    assert_eq!(r["run"]["stdout"], "1\n", "{r}");
    assert!(
        r["run"]["stderr"]
            .as_str()
            .unwrap()
            .contains("no such table"),
        "{r}"
    );
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_files_with_the_first_as_entry_point() {
    let agent = TestAgent::start("files", AgentOpts::languages(&["python", "cpp"])).await;
    let r = agent
        .api
        .execute(json!({"language": "python", "files": [
            {"name": "app.py", "content": "from lib.util import twice\nprint(twice(21))\nprint(open('data.bin','rb').read())"},
            {"name": "lib/__init__.py", "content": ""},
            {"name": "lib/util.py", "content": "def twice(x):\n    return 2 * x\n"},
            {"name": "data.bin", "content": "AAEC/w==", "encoding": "base64"}
        ]}))
        .await;
    assert_eq!(r["run"]["stdout"], "42\nb'\\x00\\x01\\x02\\xff'\n", "{r}");
    let r = agent
        .api
        .execute(json!({"language": "cpp", "files": [
            {"name": "prog.cpp", "content": "#include \"util.h\"\n#include <cstdio>\nint main(){ std::printf(\"%d\\n\", twice(21)); }"},
            {"name": "util.h", "content": "inline int twice(int x) { return 2 * x; }\n"}
        ]}))
        .await;
    assert_eq!(r["run"]["stdout"], "42\n", "{r}");
    agent.stop().await;
}
