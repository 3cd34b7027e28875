#!/usr/bin/env bash
# Runs a hello world in each of the fifteen built-in languages against a running codefleet
# (default http://127.0.0.1:8080, the address deploy/up.sh serves) and fails unless every one
# answers `ok` with the expected output. `deploy/smoke.sh URL [--wait SECONDS]`: with --wait, it
# first waits that long at most for every language to be ready.
set -euo pipefail
URL=${1:-http://127.0.0.1:8080}
WAIT=0
[ "${2:-}" = "--wait" ] && WAIT=${3:-600}
exec python3 - "$URL" "$WAIT" <<'PY'
import json, sys, time, urllib.request, urllib.error

url, wait = sys.argv[1], float(sys.argv[2])
hello = {
    "python": 'print("hello from python")',
    "javascript": 'console.log("hello from javascript")',
    "go": 'package main\nimport "fmt"\nfunc main() { fmt.Println("hello from go") }\n',
    "java": 'public class Main { public static void main(String[] a) { System.out.println("hello from java"); } }\n',
    "cpp": '#include <iostream>\nint main() { std::cout << "hello from cpp" << std::endl; }\n',
    "rust": 'fn main() { println!("hello from rust"); }\n',
    "c": '#include <stdio.h>\nint main(void) { puts("hello from c"); return 0; }\n',
    "typescript": 'const who: string = "typescript";\nconsole.log(`hello from ${who}`);\n',
    "bash": 'echo "hello from bash"\n',
    "ruby": 'puts "hello from ruby"\n',
    "php": '<?php echo "hello from php\\n";\n',
    "lua": 'print("hello from lua")\n',
    "perl": 'print "hello from perl\\n";\n',
    "sqlite": "SELECT 'hello from sqlite';\n",
    "csharp": 'public class P { public static void Main() { System.Console.WriteLine("hello from csharp"); } }\n',
}

def call(path, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())

deadline = time.time() + wait
while True:
    try:
        ready = {l["name"] for l in call("/v1/languages") if l.get("nodes_ready", 0) > 0}
    except (urllib.error.URLError, OSError, ValueError):
        ready = set()
    missing = sorted(set(hello) - ready)
    if not missing:
        break
    if time.time() >= deadline:
        sys.exit(f"smoke: not ready at {url}: {', '.join(missing)}")
    time.sleep(1)

failed = 0
for language, source in hello.items():
    try:
        # A compile on a busy machine may take longer than the default 10 s of wall time.
        r = call("/v1/execute", {"language": language, "source": source,
                                 "limits": {"compile_wall_time_ms": 60000}})
        out, status = r["run"]["stdout"] if r.get("run") else "", r["status"]
    except urllib.error.HTTPError as e:
        out, status = "", f"HTTP {e.code}: {e.read()[:200]!r}"
    ok = status == "ok" and out == f"hello from {language}\n"
    failed += not ok
    print(f"smoke: {language:<11} {'ok' if ok else 'FAILED'} ({status})")
sys.exit(1 if failed else 0)
PY
