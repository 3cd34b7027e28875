//! Every language of the catalog really compiles and runs: hello world reading stdin and args,
//! and a compile error for each compiled language.

use codefleet_tests::{AgentOpts, TestAgent};
use serde_json::json;

const ALL: [&str; 6] = ["python", "javascript", "go", "java", "cpp", "rust"];

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
        other => panic!("no hello for {other}"),
    }
}

fn broken(language: &str) -> &'static str {
    match language {
        "go" => "package main\n\nfunc main() { undefinedThing() }\n",
        "java" => "public class Main { public static void main(String[] a) { int x = \"no\"; } }\n",
        "cpp" => "int main() { return undefined_thing; }\n",
        "rust" => "fn main() { let x: u32 = \"no\"; }\n",
        other => panic!("{other} is not compiled"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_world_reads_stdin_and_args_in_every_language_and_compile_errors_are_reported() {
    let agent = TestAgent::start("langs", AgentOpts::languages(&ALL).arg("--pool-min", 0)).await;
    let langs = agent.api.get("/v1/languages").await.body;
    for lang in ALL {
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

        let r = agent
            .api
            .execute(json!({"language": lang, "source": hello(lang), "stdin": "world\n", "args": ["a", "b c"]}))
            .await;
        assert_eq!(r["status"], "ok", "{lang}: {r}");
        assert_eq!(r["run"]["stdout"], "hello world a b c\n", "{lang}: {r}");
        assert_eq!(r["language"]["name"], lang);
        assert_eq!(r["language"]["version"], version);
        let compiled = entry["compiled"].as_bool().unwrap();
        assert_eq!(r["compile"].is_null(), !compiled, "{lang}: {r}");

        if compiled {
            let r = agent
                .api
                .execute(json!({"language": lang, "source": broken(lang)}))
                .await;
            assert_eq!(r["status"], "compile_error", "{lang}: {r}");
            assert!(r["run"].is_null(), "{lang}: {r}");
            let stderr = r["compile"]["stderr"].as_str().unwrap();
            assert!(
                !stderr.is_empty() && r["compile"]["exit_code"] != 0,
                "{lang}: {r}"
            );
        }
    }
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
