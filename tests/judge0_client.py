"""Drives codefleet's Judge0-compatible API with the official Judge0 Python client (PyPI
`judge0`), unchanged, through its public functions only. Run by tests/tests/judge0.rs in a venv
of its own: `python judge0_client.py <gateway url> <api key>`. Each check raises on a wrong
answer; the last line printed is a JSON summary of what the client saw."""

import json
import sys

import judge0

url, key = sys.argv[1], sys.argv[2]
client = judge0.Client(url, headers={"X-Auth-Token": key})
seen = {"about_version": client.version, "languages": sorted(lang.id for lang in client.languages)}


def expect(what, got, want):
    if got != want:
        raise AssertionError(f"{what}: got {got!r}, want {want!r}")


# Python, with stdin and an expected output.
py = judge0.run(
    client=client,
    source_code="name = input()\nprint(f'hello, {name}')\n",
    language=judge0.PYTHON,
    stdin="judge0",
    expected_output="hello, judge0",
)
expect("python status", py.status, judge0.Status.ACCEPTED)
expect("python stdout", py.stdout, "hello, judge0\n")
assert py.time is not None and py.time >= 0, py.time
assert py.memory is not None and py.memory > 0, py.memory
seen["python"] = {"status": int(py.status), "stdout": py.stdout, "time": py.time,
                  "memory": py.memory, "token": str(py.token)}

# C++, compiled, with arguments and an additional file from a zip.
cpp_source = """#include <fstream>
#include <iostream>
#include <string>
int main(int argc, char** argv) {
    std::ifstream in("data.txt");
    std::string word;
    in >> word;
    std::cout << word << " " << argc - 1 << " " << argv[1] << std::endl;
}
"""
files = judge0.Filesystem(content=[judge0.File(name="data.txt", content="zipped\n")])
cpp = judge0.run(
    client=client,
    submissions=judge0.Submission(
        source_code=cpp_source,
        language=judge0.CPP,
        additional_files=files,
        command_line_arguments="first 'second arg'",
    ),
)
expect("c++ status", cpp.status, judge0.Status.ACCEPTED)
expect("c++ stdout", cpp.stdout, "zipped 2 first\n")
seen["cpp"] = {"status": int(cpp.status), "stdout": cpp.stdout}

# A compile error.
broken = judge0.run(client=client, source_code="int main() { return nope; }\n", language=judge0.CPP)
expect("compile error status", broken.status, judge0.Status.COMPILATION_ERROR)
assert broken.compile_output and "nope" in broken.compile_output, broken.compile_output
expect("compile error stdout", broken.stdout, None)
seen["compile_error"] = {"status": int(broken.status), "compile_output": broken.compile_output}

# A time limit.
slow = judge0.run(
    client=client,
    source_code="while True:\n    pass\n",
    language=judge0.PYTHON,
    cpu_time_limit=1,
    wall_time_limit=3,
)
expect("time limit status", slow.status, judge0.Status.TIME_LIMIT_EXCEEDED)
seen["time_limit"] = {"status": int(slow.status), "time": slow.time}

# A batch: one program against test cases (POST /submissions/batch, polled in batches).
batch = judge0.run(
    client=client,
    source_code="a, b = map(int, input().split())\nprint(a + b)\n",
    language=judge0.PYTHON,
    test_cases=[("1 2", "3"), ("20 22", "42"), ("2 2", "5"), ("0 0", "0")],
)
statuses = [int(s.status) for s in batch]
expect("batch statuses", statuses, [3, 3, 4, 3])
expect("batch stdout", [s.stdout for s in batch], ["3\n", "42\n", "4\n", "0\n"])
expect("batch tokens distinct", len({str(s.token) for s in batch}), 4)
seen["batch"] = {"statuses": statuses}

# Submissions of two languages at once, then waited for.
mixed = judge0.async_run(
    client=client,
    submissions=[
        judge0.Submission(source_code="print(6 * 7)", language=judge0.PYTHON),
        judge0.Submission(
            source_code="#include <cstdio>\nint main(){ std::printf(\"%d\\n\", 6 * 7); }\n",
            language=judge0.CPP,
        ),
    ],
)
mixed = judge0.wait(client=client, submissions=mixed)
expect("mixed stdout", [s.stdout for s in mixed], ["42\n", "42\n"])
seen["mixed"] = {"statuses": [int(s.status) for s in mixed]}

print(json.dumps(seen))
