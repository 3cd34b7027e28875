//! Piston ↔ codefleet, as pure functions: the catalog's runtimes as Piston lists them (its
//! language names, aliases and package names for these languages), a Piston execute body
//! checked as Piston checks it and turned into the native `ExecuteRequest`, and a native stage
//! result turned into Piston's stage (its statuses, signal names and messages).

use base64::Engine as _;
use codefleet_shared::api::{Encoding, FileSpec, Limits, StageResult, Status};
use codefleet_shared::{ExecuteRequest, LanguageInfo, ResolvedLimits};
use serde_json::Value;

use super::semver::{newest_matching, Version};
use super::wire;

/// How Piston names a codefleet language: its name, its aliases and, where its package provides
/// several languages, the package (`runtime`). Taken from Piston's package files for these
/// languages; a language Piston does not have keeps its own name and aliases.
struct Family {
    native: &'static str,
    language: &'static str,
    aliases: &'static [&'static str],
    runtime: Option<&'static str>,
}

const FAMILIES: &[Family] = &[
    Family {
        native: "python",
        language: "python",
        aliases: &["py", "py3", "python3"],
        runtime: None,
    },
    Family {
        native: "javascript",
        language: "javascript",
        aliases: &["node-javascript", "node-js", "javascript", "js"],
        runtime: Some("node"),
    },
    Family {
        native: "go",
        language: "go",
        aliases: &["go", "golang"],
        runtime: None,
    },
    Family {
        native: "java",
        language: "java",
        aliases: &[],
        runtime: None,
    },
    Family {
        native: "cpp",
        language: "c++",
        aliases: &["cpp", "g++"],
        runtime: Some("gcc"),
    },
    Family {
        native: "c",
        language: "c",
        aliases: &["gcc"],
        runtime: Some("gcc"),
    },
    Family {
        native: "rust",
        language: "rust",
        aliases: &["rs"],
        runtime: None,
    },
    Family {
        native: "typescript",
        language: "typescript",
        aliases: &["ts", "node-ts", "tsc"],
        runtime: None,
    },
    Family {
        native: "bash",
        language: "bash",
        aliases: &["sh"],
        runtime: None,
    },
    Family {
        native: "ruby",
        language: "ruby",
        aliases: &["ruby3", "rb"],
        runtime: None,
    },
    Family {
        native: "php",
        language: "php",
        aliases: &[],
        runtime: None,
    },
    Family {
        native: "lua",
        language: "lua",
        aliases: &[],
        runtime: None,
    },
    Family {
        native: "perl",
        language: "perl",
        aliases: &["pl"],
        runtime: None,
    },
    Family {
        native: "sqlite",
        language: "sqlite3",
        aliases: &["sqlite", "sql"],
        runtime: None,
    },
    Family {
        native: "csharp",
        language: "csharp",
        aliases: &["mono", "mono-csharp", "mono-c#", "mono-cs", "c#", "cs"],
        runtime: Some("mono"),
    },
];

/// One runtime as Piston sees it, and the native runtime behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PistonRuntime {
    pub language: String,
    pub version: Version,
    pub aliases: Vec<String>,
    pub runtime: Option<String>,
    /// The native language name and exact version: what the native request names.
    pub native_name: String,
    pub native_version: String,
    /// The native entry file name, for an entry file the request leaves unnamed.
    pub file_name: String,
}

impl PistonRuntime {
    fn of(info: &LanguageInfo) -> Option<PistonRuntime> {
        let version = Version::of_catalog(&info.version)?;
        let family = FAMILIES.iter().find(|f| f.native == info.name);
        let (language, mut aliases, runtime) = match family {
            Some(f) => (
                f.language.to_string(),
                f.aliases.iter().map(|a| a.to_string()).collect::<Vec<_>>(),
                f.runtime.map(str::to_string),
            ),
            None => (info.name.clone(), info.aliases.clone(), None),
        };
        // Piston's Python packages also answer to `python3.<minor>`.
        if language == "python" && version.0 == 3 {
            aliases.push(format!("python3.{}", version.1));
        }
        Some(PistonRuntime {
            language,
            version,
            aliases,
            runtime,
            native_name: info.name.clone(),
            native_version: info.version.clone(),
            file_name: info.file_name.clone(),
        })
    }

    /// Whether Piston's `language` field names this runtime (its name or an alias, exactly).
    pub fn is_named(&self, language: &str) -> bool {
        self.language == language || self.aliases.iter().any(|a| a == language)
    }

    pub fn wire(&self) -> wire::Runtime {
        wire::Runtime {
            language: self.language.clone(),
            version: self.version.to_string(),
            aliases: self.aliases.clone(),
            runtime: self.runtime.clone(),
        }
    }

    /// The package that provides it, as Piston names packages.
    pub fn package(&self) -> &str {
        self.runtime.as_deref().unwrap_or(&self.language)
    }
}

/// The runtimes some node runs (a version is known for it), in the catalog's order: by native
/// name, newest first. Two runtimes of a language whose versions read the same as semver are
/// listed once (the newer).
pub fn runtimes<'a>(languages: impl IntoIterator<Item = &'a LanguageInfo>) -> Vec<PistonRuntime> {
    let mut out: Vec<PistonRuntime> = Vec::new();
    for runtime in languages.into_iter().filter_map(PistonRuntime::of) {
        let seen = out
            .iter()
            .any(|r| r.language == runtime.language && r.version == runtime.version);
        if !seen {
            out.push(runtime);
        }
    }
    out
}

/// The newest runtime named by `language` whose version `selector` names.
pub fn select<'a>(
    runtimes: &'a [PistonRuntime],
    language: &str,
    selector: &str,
) -> Option<&'a PistonRuntime> {
    let named = runtimes.iter().filter(|r| r.is_named(language));
    newest_matching(selector, named.map(|r| (r.version, r)))
}

/// The packages behind `runtimes`, each once.
pub fn packages(runtimes: &[PistonRuntime]) -> Vec<wire::Package> {
    let mut out: Vec<wire::Package> = Vec::new();
    for r in runtimes {
        let package = wire::Package {
            language: r.package().to_string(),
            language_version: r.version.to_string(),
            installed: true,
        };
        if !out.contains(&package) {
            out.push(package);
        }
    }
    out
}

/// The newest package called `language` whose version `selector` names.
pub fn find_package(
    runtimes: &[PistonRuntime],
    language: &str,
    selector: &str,
) -> Option<wire::Package> {
    let named = runtimes.iter().filter(|r| r.package() == language);
    newest_matching(selector, named.map(|r| (r.version, r))).map(|r| wire::Package {
        language: r.package().to_string(),
        language_version: r.version.to_string(),
        installed: true,
    })
}

/// A Piston execute body, checked and translated.
#[derive(Debug, Clone, PartialEq)]
pub struct Translated {
    pub native: ExecuteRequest,
    pub runtime: PistonRuntime,
}

/// Piston's constraints in the order it checks them, each with the native maximum it is held
/// to.
fn constraints(max: &ResolvedLimits) -> [(&'static str, u64); 6] {
    [
        ("compile_memory_limit", max.memory_bytes),
        ("run_memory_limit", max.memory_bytes),
        ("compile_timeout", max.compile_wall_time_ms),
        ("run_timeout", max.wall_time_ms),
        ("compile_cpu_time", max.compile_wall_time_ms),
        ("run_cpu_time", max.cpu_time_ms),
    ]
}

/// Whether Piston leaves a constraint at its default: absent, `null` or 0 (JavaScript's other
/// false values, `false` and `""`, are refused here as not numbers).
fn unset(value: Option<&Value>) -> bool {
    match value {
        None | Some(Value::Null) => true,
        Some(Value::Number(n)) => n.as_f64() == Some(0.0),
        Some(_) => false,
    }
}

/// One constraint: absent (or 0) is the server's default, -1 its maximum.
fn constraint(body: &Value, name: &str, max: u64) -> Result<Option<u64>, String> {
    let value = body.get(name);
    if unset(value) {
        return Ok(None);
    }
    let Some(number) = value.and_then(Value::as_f64) else {
        return Err(format!("If specified, {name} must be a number"));
    };
    if number == -1.0 {
        return Ok(Some(max));
    }
    if number > max as f64 {
        return Err(format!(
            "{name} cannot exceed the configured limit of {max}"
        ));
    }
    if number < 0.0 {
        return Err(format!("{name} must be non-negative"));
    }
    Ok(Some(number.ceil() as u64))
}

/// A file's encoding as Piston takes it: `base64`, `hex`, or any other string as `utf8`; and
/// whether it counts as utf8 for the rule that one file must be (only a missing, null, empty or
/// `utf8` encoding does).
fn encoding(file: &Value) -> (&str, bool) {
    let given = file.get("encoding").and_then(Value::as_str);
    let declared_utf8 = matches!(given, None | Some("" | "utf8"));
    let taken = ["base64", "hex"]
        .into_iter()
        .find(|e| given == Some(*e))
        .unwrap_or("utf8");
    (taken, declared_utf8)
}

fn hex_to_base64(hex: &str) -> Option<String> {
    let hex = hex.as_bytes();
    if !hex.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = hex
        .chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect::<Option<Vec<u8>>>()?;
    Some(base64::engine::general_purpose::STANDARD.encode(bytes))
}

/// Checks `body` as Piston's `get_job` does (the same order, the same messages) and translates
/// it. `interactive`: for `/api/v2/connect`, where Piston feeds stdin from `data` messages
/// only; `stdin` is then passed as given, without the newline Piston's execute adds.
pub fn translate(
    body: &Value,
    runtimes: &[PistonRuntime],
    max: &ResolvedLimits,
    interactive: bool,
) -> Result<Translated, String> {
    let string = |name: &str| {
        body.get(name)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    let language =
        string("language").ok_or_else(|| "language is required as a string".to_string())?;
    let version = string("version").ok_or_else(|| "version is required as a string".to_string())?;
    let files = body
        .get("files")
        .and_then(Value::as_array)
        .ok_or_else(|| "files is required as an array".to_string())?;
    for (i, file) in files.iter().enumerate() {
        if !file.get("content").is_some_and(Value::is_string) {
            return Err(format!("files[{i}].content is required as a string"));
        }
        for field in ["name", "encoding"] {
            if !file.get(field).is_none_or(|v| v.is_string() || v.is_null()) {
                return Err(format!("files[{i}].{field} must be a string"));
            }
        }
    }
    let runtime = select(runtimes, language, version)
        .ok_or_else(|| format!("{language}-{version} runtime is unknown"))?;
    if !files.iter().any(|f| encoding(f).1) {
        return Err("files must include at least one utf8 encoded file".to_string());
    }
    let mut limits = [None; 6];
    for (slot, (name, max)) in limits.iter_mut().zip(constraints(max)) {
        *slot = constraint(body, name, max)?;
    }
    let [compile_memory, run_memory, compile_timeout, run_timeout, compile_cpu, run_cpu] = limits;

    // The entry is the first file taken as utf8, as Piston runs it; it goes first natively.
    let entry = files
        .iter()
        .position(|f| encoding(f).0 == "utf8")
        .expect("a file counts as utf8 only when it is taken as utf8");
    let mut native_files = Vec::with_capacity(files.len());
    for i in std::iter::once(entry).chain((0..files.len()).filter(|&i| i != entry)) {
        let file = &files[i];
        let content = file["content"].as_str().expect("checked above").to_string();
        let name = match file.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ if i == entry => runtime.file_name.clone(),
            _ => format!("file{i}.code"),
        };
        let (content, encoding) = match encoding(file).0 {
            "base64" => (content, Encoding::Base64),
            "hex" => {
                let bytes = hex_to_base64(&content)
                    .ok_or_else(|| format!("files[{i}].content is not hex"))?;
                (bytes, Encoding::Base64)
            }
            _ => (content, Encoding::Utf8),
        };
        native_files.push(FileSpec {
            name,
            content,
            encoding,
        });
    }

    let stdin = match body.get("stdin") {
        None | Some(Value::Null) => String::new(),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err("stdin must be a string".to_string()),
    };
    // Piston's execute ends stdin with a newline when it lacks one.
    let stdin = match interactive || stdin.ends_with('\n') {
        true => stdin,
        false => stdin + "\n",
    };
    let args = match body.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(args)) => args
            .iter()
            .map(|a| a.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| "args must be an array of strings".to_string())?,
        Some(_) => return Err("args must be an array of strings".to_string()),
    };
    let compile_wall = match (compile_timeout, compile_cpu) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let memory = compile_memory.max(run_memory);
    let limits = Limits {
        wall_time_ms: run_timeout,
        cpu_time_ms: run_cpu,
        compile_wall_time_ms: compile_wall,
        memory_bytes: memory,
        ..Limits::default()
    };
    let native = ExecuteRequest {
        language: Some(runtime.native_name.clone()),
        version: Some(runtime.native_version.clone()),
        files: Some(native_files),
        stdin: (!stdin.is_empty()).then_some(stdin),
        args: (!args.is_empty()).then_some(args),
        limits: (limits != Limits::default()).then_some(limits),
        ..ExecuteRequest::default()
    };
    Ok(Translated {
        native,
        runtime: runtime.clone(),
    })
}

/// A stage's output as the stream delivered it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Streams {
    pub stdout: String,
    pub stderr: String,
    /// Both, in the order the chunks came.
    pub output: String,
}

impl Streams {
    /// What a stage without output events had: stdout, then stderr.
    pub fn of_result(result: &StageResult) -> Streams {
        Streams {
            stdout: result.stdout.clone(),
            stderr: result.stderr.clone(),
            output: format!("{}{}", result.stdout, result.stderr),
        }
    }
}

/// The number of the signals a stage can end with, for isolate's "Caught fatal signal N".
fn signal_number(name: &str) -> Option<i32> {
    const SIGNALS: &[&str] = &[
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    SIGNALS
        .iter()
        .position(|s| *s == name)
        .map(|i| i as i32 + 1)
}

/// The signals a client may send on `/api/v2/connect`: the ones the native socket sends.
pub const SIGNALS: &[&str] = &[
    "SIGKILL", "SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP", "SIGUSR1", "SIGUSR2",
];

/// Piston's status, message and signal for a native stage.
fn status(result: &StageResult) -> (Option<&'static str>, Option<String>, Option<String>) {
    let signal = result.signal.clone();
    let killed = Some("SIGKILL".to_string());
    match result.status {
        Status::Ok => (None, None, signal),
        Status::RuntimeError => match &result.signal {
            Some(name) => {
                let message = match signal_number(name) {
                    Some(n) => format!("Caught fatal signal {n}"),
                    None => format!("Caught fatal signal {name}"),
                };
                (Some("SG"), Some(message), signal)
            }
            None => {
                let code = result.exit_code.unwrap_or(1);
                let message = format!("Exited with error status {code}");
                (Some("RE"), Some(message), None)
            }
        },
        Status::Timeout => (Some("TO"), Some("Time limit exceeded".into()), killed),
        Status::MemoryLimit => (Some("SG"), Some("Memory limit exceeded".into()), killed),
        Status::OutputLimit if result.stderr_truncated && !result.stdout_truncated => {
            (Some("EL"), Some("stderr length exceeded".into()), killed)
        }
        Status::OutputLimit if result.stdout_truncated => {
            (Some("OL"), Some("stdout length exceeded".into()), killed)
        }
        // A file past `file_size_bytes`: the kernel's SIGXFSZ.
        Status::OutputLimit => {
            let signal = signal.or(Some("SIGXFSZ".to_string()));
            (Some("SG"), Some("File size limit exceeded".into()), signal)
        }
        Status::InternalError | Status::CompileError => {
            let message = match result.stderr.trim() {
                "" => "the sandbox failed".to_string(),
                why => why.to_string(),
            };
            (Some("XX"), Some(message), signal)
        }
    }
}

/// A native stage as Piston reports it, its output from `streams`.
pub fn stage(result: &StageResult, streams: Streams) -> wire::Stage {
    let (status, message, signal) = status(result);
    wire::Stage {
        stdout: streams.stdout,
        stderr: streams.stderr,
        output: streams.output,
        code: match signal {
            Some(_) => None,
            None => result.exit_code,
        },
        signal,
        message,
        status,
        cpu_time: result.cpu_time_ms,
        wall_time: result.wall_time_ms,
        memory: result.memory_bytes,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn info(name: &str, version: &str, file_name: &str) -> LanguageInfo {
        LanguageInfo {
            name: name.into(),
            aliases: vec![],
            version: version.into(),
            compiled: false,
            file_name: file_name.into(),
            nodes_ready: 1,
            image: None,
            error: None,
        }
    }

    fn catalog() -> Vec<PistonRuntime> {
        runtimes(&[
            info("cpp", "14.2.0", "main.cpp"),
            info("cpp", "12.2.0", "main.cpp"),
            info("java", "17.0.13", "Main.java"),
            info("javascript", "v20.19.2", "main.js"),
            info("python", "3.13.5", "main.py"),
            info("python", "3.11.2", "main.py"),
            info("python", "", "main.py"),
            info("sqlite", "3.40.1", "main.sql"),
            info("zig", "0.13", "main.zig"),
        ])
    }

    fn body(extra: Value) -> Value {
        let mut body = json!({"language": "python", "version": "*",
                              "files": [{"content": "print(1)"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        body
    }

    fn run(extra: Value) -> Result<Translated, String> {
        translate(&body(extra), &catalog(), &ResolvedLimits::MAX, false)
    }

    #[test]
    fn runtimes_carry_pistons_names() {
        let listed: Vec<(String, String, Option<String>)> = catalog()
            .iter()
            .map(|r| (r.language.clone(), r.version.to_string(), r.runtime.clone()))
            .collect();
        let want = [
            ("c++", "14.2.0", Some("gcc")),
            ("c++", "12.2.0", Some("gcc")),
            ("java", "17.0.13", None),
            ("javascript", "20.19.2", Some("node")),
            ("python", "3.13.5", None),
            ("python", "3.11.2", None),
            ("sqlite3", "3.40.1", None),
            ("zig", "0.13.0", None),
        ]
        .map(|(l, v, r)| (l.to_string(), v.to_string(), r.map(str::to_string)));
        assert_eq!(listed, want);
        let python = &catalog()[5];
        assert_eq!(python.aliases, ["py", "py3", "python3", "python3.11"]);
        assert_eq!(
            packages(&catalog())[0],
            wire::Package {
                language: "gcc".into(),
                language_version: "14.2.0".into(),
                installed: true
            }
        );
        assert_eq!(
            find_package(&catalog(), "python", "3.11.x").map(|p| p.language_version),
            Some("3.11.2".to_string())
        );
        assert_eq!(find_package(&catalog(), "python", "2"), None);
    }

    #[test]
    fn selection_by_name_alias_and_selector() {
        let pick = |language: &str, selector: &str| {
            select(&catalog(), language, selector).map(|r| r.native_version.clone())
        };
        assert_eq!(pick("python", "*").as_deref(), Some("3.13.5"));
        assert_eq!(pick("py", "3.11.x").as_deref(), Some("3.11.2"));
        assert_eq!(pick("python3.11", "*").as_deref(), Some("3.11.2"));
        assert_eq!(pick("cpp", "12").as_deref(), Some("12.2.0"));
        assert_eq!(pick("c++", "*").as_deref(), Some("14.2.0"));
        assert_eq!(pick("node-js", "20.19.2").as_deref(), Some("v20.19.2"));
        assert_eq!(pick("sqlite", "*").as_deref(), Some("3.40.1"));
        assert_eq!(pick("Python", "*"), None, "Piston matches names exactly");
        assert_eq!(pick("python", "4.x"), None);
    }

    #[test]
    fn bad_bodies_get_pistons_messages_in_pistons_order() {
        let table: &[(Value, &str)] = &[
            (json!([]), "language is required as a string"),
            (json!({}), "language is required as a string"),
            (json!({"language": 5}), "language is required as a string"),
            (
                json!({"language": "python"}),
                "version is required as a string",
            ),
            (
                json!({"language": "python", "version": ""}),
                "version is required as a string",
            ),
            (
                json!({"language": "python", "version": "*", "files": {}}),
                "files is required as an array",
            ),
            (
                json!({"language": "python", "version": "*", "files": [{"content": 1}]}),
                "files[0].content is required as a string",
            ),
            (
                json!({"language": "cobol", "version": "*", "files": []}),
                "cobol-* runtime is unknown",
            ),
            (
                json!({"language": "python", "version": "2.x", "files": []}),
                "python-2.x runtime is unknown",
            ),
            (
                json!({"language": "python", "version": "*",
                       "files": [{"content": "AA==", "encoding": "base64"}]}),
                "files must include at least one utf8 encoded file",
            ),
        ];
        for (body, message) in table {
            let got = translate(body, &catalog(), &ResolvedLimits::MAX, false);
            assert_eq!(got.unwrap_err(), *message, "{body}");
        }
        let table: &[(Value, &str)] = &[
            (
                json!({"run_timeout": "5"}),
                "If specified, run_timeout must be a number",
            ),
            (
                json!({"run_timeout": 30001}),
                "run_timeout cannot exceed the configured limit of 30000",
            ),
            (
                json!({"compile_memory_limit": 2_000_000_000_u64}),
                "compile_memory_limit cannot exceed the configured limit of 1073741824",
            ),
            (
                json!({"run_cpu_time": -2}),
                "run_cpu_time must be non-negative",
            ),
            (
                json!({"run_timeout": 99999, "compile_memory_limit": -5}),
                "compile_memory_limit must be non-negative",
            ),
            (json!({"stdin": 5}), "stdin must be a string"),
            (
                json!({"run_timeout": false}),
                "If specified, run_timeout must be a number",
            ),
            (
                json!({"files": [{"content": "x", "encoding": 1}]}),
                "files[0].encoding must be a string",
            ),
            (
                json!({"files": [{"content": "x", "name": ["a"]}]}),
                "files[0].name must be a string",
            ),
            (
                json!({"args": ["a", 1]}),
                "args must be an array of strings",
            ),
            (
                json!({"files": [{"content": "abc", "encoding": "hex"}, {"content": "x"}]}),
                "files[0].content is not hex",
            ),
        ];
        for (extra, message) in table {
            assert_eq!(run(extra.clone()).unwrap_err(), *message, "{extra}");
        }
    }

    #[test]
    fn a_body_becomes_the_native_request() {
        let t = run(json!({
            "version": "3.11",
            "files": [
                {"name": "data.bin", "content": "AAE=", "encoding": "base64"},
                {"content": "print(1)"},
                {"content": "6869", "encoding": "hex"},
                {"content": "y", "encoding": "latin1"},
            ],
            "stdin": "x",
            "args": ["a", "b"],
            "run_timeout": 3000,
            "compile_timeout": 10000,
            "compile_cpu_time": 4000.5,
            "run_memory_limit": -1,
            "compile_memory_limit": 0,
        }))
        .unwrap();
        let native = t.native;
        assert_eq!(native.language.as_deref(), Some("python"));
        assert_eq!(native.version.as_deref(), Some("3.11.2"));
        let files = native.files.unwrap();
        let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["main.py", "data.bin", "file2.code", "file3.code"]);
        assert_eq!(files[2].content, "aGk=");
        assert_eq!(files[2].encoding, Encoding::Base64);
        assert_eq!(files[3].encoding, Encoding::Utf8);
        assert_eq!(native.stdin.as_deref(), Some("x\n"));
        assert_eq!(native.args.unwrap(), ["a", "b"]);
        let limits = native.limits.unwrap();
        assert_eq!(limits.wall_time_ms, Some(3000));
        assert_eq!(limits.cpu_time_ms, None);
        assert_eq!(limits.compile_wall_time_ms, Some(4001));
        assert_eq!(limits.memory_bytes, Some(ResolvedLimits::MAX.memory_bytes));

        let plain = run(json!({})).unwrap().native;
        assert_eq!(
            plain.stdin.as_deref(),
            Some("\n"),
            "Piston adds the newline"
        );
        assert_eq!(plain.limits, None);
        let connect = translate(&body(json!({})), &catalog(), &ResolvedLimits::MAX, true);
        assert_eq!(connect.unwrap().native.stdin, None);
    }

    fn result(status: Status, exit_code: Option<i32>, signal: Option<&str>) -> StageResult {
        StageResult {
            status,
            exit_code,
            signal: signal.map(str::to_string),
            stdout: "o".into(),
            stderr: "e".into(),
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_ms: 12,
            cpu_time_ms: 9,
            memory_bytes: 4096,
        }
    }

    #[test]
    fn native_stages_in_pistons_terms() {
        let see = |r: StageResult| {
            let s = stage(&r, Streams::of_result(&r));
            (s.status, s.code, s.signal, s.message)
        };
        let some = |s: &str| Some(s.to_string());
        assert_eq!(
            see(result(Status::Ok, Some(0), None)),
            (None, Some(0), None, None)
        );
        assert_eq!(
            see(result(Status::RuntimeError, Some(3), None)),
            (
                Some("RE"),
                Some(3),
                None,
                some("Exited with error status 3")
            )
        );
        assert_eq!(
            see(result(Status::RuntimeError, None, Some("SIGSEGV"))),
            (
                Some("SG"),
                None,
                some("SIGSEGV"),
                some("Caught fatal signal 11")
            )
        );
        assert_eq!(
            see(result(Status::Timeout, None, Some("SIGKILL"))),
            (
                Some("TO"),
                None,
                some("SIGKILL"),
                some("Time limit exceeded")
            )
        );
        assert_eq!(
            see(result(Status::MemoryLimit, None, None)),
            (
                Some("SG"),
                None,
                some("SIGKILL"),
                some("Memory limit exceeded")
            )
        );
        let mut out = result(Status::OutputLimit, None, Some("SIGKILL"));
        out.stdout_truncated = true;
        assert_eq!(see(out.clone()).0, Some("OL"));
        out.stdout_truncated = false;
        out.stderr_truncated = true;
        assert_eq!(see(out).0, Some("EL"));
        let file = result(Status::OutputLimit, None, None);
        assert_eq!(see(file).2, some("SIGXFSZ"));
        assert_eq!(
            see(result(Status::InternalError, None, None)),
            (Some("XX"), None, None, some("e"))
        );
        let r = result(Status::Ok, Some(0), None);
        let s = stage(&r, Streams::of_result(&r));
        assert_eq!(
            (s.output.as_str(), s.cpu_time, s.wall_time, s.memory),
            ("oe", 9, 12, 4096)
        );
    }
}
