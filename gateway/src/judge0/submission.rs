//! Judge0 submissions, translated both ways and nothing else (no I/O): a Judge0 body checked
//! with Judge0's rules and messages (field errors for a 422) and made a native execute or judge
//! request; a native answer (or a stored native submission) made Judge0's submission fields, in
//! Judge0's units, and cut to the `fields` asked for, base64 where asked.

use std::collections::BTreeMap;

use base64::Engine;
use codefleet_shared::api::{
    Encoding, ExecuteRequest, ExecuteResponse, FileSpec, Limits, ResolvedLimits,
};
use codefleet_shared::judge::{Checker, JudgeRequest, JudgeResponse, TestCase, Verdict};
use codefleet_shared::submission::{Submission, SubmissionResult, SubmissionStatus};
use codefleet_shared::{StageResult, Status};
use serde_json::{json, Map, Value};

use super::languages::{self, Judge0Language, Resolved};
use super::zip;

/// Field name → Judge0's messages for it: the body of a 422.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

/// Judge0's status descriptions, by id (1-14).
pub const STATUSES: [&str; 14] = [
    "In Queue",
    "Processing",
    "Accepted",
    "Wrong Answer",
    "Time Limit Exceeded",
    "Compilation Error",
    "Runtime Error (SIGSEGV)",
    "Runtime Error (SIGXFSZ)",
    "Runtime Error (SIGFPE)",
    "Runtime Error (SIGABRT)",
    "Runtime Error (NZEC)",
    "Runtime Error (Other)",
    "Internal Error",
    "Exec Format Error",
];

pub const IN_QUEUE: u8 = 1;
pub const PROCESSING: u8 = 2;
pub const ACCEPTED: u8 = 3;
pub const WRONG_ANSWER: u8 = 4;
pub const TIME_LIMIT: u8 = 5;
pub const COMPILATION_ERROR: u8 = 6;
pub const SIGSEGV: u8 = 7;
pub const SIGXFSZ: u8 = 8;
pub const SIGFPE: u8 = 9;
pub const SIGABRT: u8 = 10;
pub const NZEC: u8 = 11;
pub const OTHER: u8 = 12;
pub const INTERNAL_ERROR: u8 = 13;

/// `{"id", "description"}` of status `id`.
pub fn status_json(id: u8) -> Value {
    json!({"id": id, "description": STATUSES[usize::from(id - 1)]})
}

/// Every field of a Judge0 1.13.1 submission, in its order: what `fields=*` selects (a strict
/// client refuses any other key).
pub const ALL_FIELDS: [&str; 35] = [
    "source_code",
    "language_id",
    "stdin",
    "expected_output",
    "stdout",
    "status_id",
    "created_at",
    "finished_at",
    "time",
    "memory",
    "stderr",
    "token",
    "number_of_runs",
    "cpu_time_limit",
    "cpu_extra_time",
    "wall_time_limit",
    "memory_limit",
    "stack_limit",
    "max_processes_and_or_threads",
    "enable_per_process_and_thread_time_limit",
    "enable_per_process_and_thread_memory_limit",
    "max_file_size",
    "compile_output",
    "exit_code",
    "exit_signal",
    "message",
    "wall_time",
    "compiler_options",
    "command_line_arguments",
    "redirect_stderr_to_stdout",
    "callback_url",
    "additional_files",
    "enable_network",
    "status",
    "language",
];

/// What a request without `fields` gets.
pub const DEFAULT_FIELDS: [&str; 8] = [
    "token",
    "time",
    "memory",
    "stdout",
    "stderr",
    "compile_output",
    "message",
    "status",
];

/// The text fields that `base64_encoded=true` encodes (`additional_files` is always base64).
const TEXT_FIELDS: [&str; 7] = [
    "source_code",
    "stdin",
    "expected_output",
    "stdout",
    "stderr",
    "compile_output",
    "message",
];

/// The fields a `fields` parameter names, Judge0's way: comma-separated, `*` for all, none
/// for the defaults; unknown names are the error (Judge0's 400 `invalid fields: [...]`).
pub fn parse_fields(asked: Option<&str>) -> Result<Vec<&'static str>, String> {
    let asked: Vec<&str> = asked
        .unwrap_or_default()
        .split(',')
        .filter(|f| !f.is_empty())
        .collect();
    let invalid: Vec<&str> = asked
        .iter()
        .copied()
        .filter(|f| *f != "*" && !ALL_FIELDS.contains(f))
        .collect();
    if !invalid.is_empty() {
        return Err(format!("invalid fields: [{}]", invalid.join(", ")));
    }
    if asked.contains(&"*") {
        return Ok(ALL_FIELDS.to_vec());
    }
    let chosen: Vec<&'static str> = ALL_FIELDS
        .iter()
        .copied()
        .filter(|f| asked.contains(f))
        .collect();
    Ok(match chosen.is_empty() {
        true => DEFAULT_FIELDS.to_vec(),
        false => chosen,
    })
}

/// A submission's fields, text unencoded, every one of [`ALL_FIELDS`] present (`null` where
/// unknown).
#[derive(Debug, Clone, PartialEq)]
pub struct Record(Map<String, Value>);

impl Record {
    fn new() -> Record {
        Record(
            ALL_FIELDS
                .iter()
                .map(|f| (f.to_string(), Value::Null))
                .collect(),
        )
    }

    fn set(&mut self, field: &str, value: impl Into<Value>) {
        debug_assert!(ALL_FIELDS.contains(&field), "{field}");
        self.0.insert(field.to_string(), value.into());
    }

    pub fn get(&self, field: &str) -> &Value {
        self.0.get(field).unwrap_or(&Value::Null)
    }

    /// The answer's object: `fields` only, text in base64 when `base64` is set.
    pub fn select(&self, fields: &[&str], base64: bool) -> Value {
        let mut out = Map::new();
        for &field in fields {
            let mut value = self.get(field).clone();
            if base64 && TEXT_FIELDS.contains(&field) {
                if let Value::String(text) = &value {
                    value = Value::String(encode(text.as_bytes()));
                }
            }
            out.insert(field.to_string(), value);
        }
        Value::Object(out)
    }
}

/// Standard base64 with padding, on one line.
pub fn encode(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// Base64 as Judge0 takes it: line breaks and other whitespace ignored, padding optional.
pub fn decode(text: &str) -> Option<Vec<u8>> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let trimmed = compact.trim_end_matches('=');
    base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(trimmed)
        .ok()
}

/// Unix milliseconds as Rails writes a time: `2026-01-31T12:00:00.123Z`.
pub fn timestamp(unix_ms: u64) -> String {
    let (days, ms) = ((unix_ms / 86_400_000) as i64, unix_ms % 86_400_000);
    let (year, month, day) = codefleet_shared::time::civil_from_days(days);
    let (h, m, s, milli) = (
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1_000 % 60,
        ms % 1_000,
    );
    format!("{year:04}-{month:02}-{day:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// Milliseconds as Judge0's seconds: a decimal string, `"0.012"`.
fn seconds(ms: f64) -> String {
    format!("{:.3}", ms / 1000.0)
}

/// Judge0's defaults and maxima where codefleet has nothing of its own (stack, runs, batches).
pub const DEFAULT_STACK_KB: u64 = 64_000;
pub const MAX_STACK_KB: u64 = 128_000;
pub const MAX_CPU_EXTRA_TIME_S: f64 = 5.0;
pub const MAX_NUMBER_OF_RUNS: u64 = 20;
pub const MAX_BATCH: usize = 20;
/// Judge0's bound on command_line_arguments and compiler_options.
const MAX_OPTION_CHARS: usize = 512;

/// A Judge0 submission body, checked: everything the native request and the answer need.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    pub language: Judge0Language,
    pub source: Vec<u8>,
    pub stdin: Option<String>,
    pub expected_output: Option<String>,
    pub files: Vec<zip::Entry>,
    pub args: Vec<String>,
    pub limits: Limits,
    pub redirect: bool,
    pub runs: u64,
    /// The request's fields as the submission echoes them (`fields=*`), defaults filled in.
    pub echo: Map<String, Value>,
}

/// Reads Judge0 values loosely, as Rails does (`5`, `5.0` and `"5"` are the same number),
/// collecting Judge0's messages.
struct Reader<'a> {
    body: &'a Map<String, Value>,
    errors: FieldErrors,
}

impl<'a> Reader<'a> {
    fn error(&mut self, field: &str, message: impl Into<String>) {
        self.errors
            .entry(field.to_string())
            .or_default()
            .push(message.into());
    }

    fn present(&self, field: &str) -> Option<&'a Value> {
        self.body.get(field).filter(|v| !v.is_null())
    }

    fn text(&mut self, field: &str) -> Option<String> {
        match self.present(field)? {
            Value::String(s) => Some(s.clone()),
            Value::Number(n) => Some(n.to_string()),
            Value::Bool(b) => Some(b.to_string()),
            _ => {
                self.error(field, "must be a string");
                None
            }
        }
    }

    fn number(&mut self, field: &str) -> Option<f64> {
        let value = match self.present(field)? {
            Value::Number(n) => n.as_f64(),
            Value::String(s) if s.trim().is_empty() => return None,
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        };
        if value.is_none_or(|v| !v.is_finite()) {
            self.error(field, "is not a number");
            return None;
        }
        value
    }

    /// A number within `min..=max` (`min_exclusive`: above `min`).
    fn bounded(&mut self, field: &str, min: f64, min_exclusive: bool, max: f64) -> Option<f64> {
        let value = self.number(field)?;
        if min_exclusive && value <= min {
            self.error(field, format!("must be greater than {}", show(min)));
        } else if !min_exclusive && value < min {
            self.error(
                field,
                format!("must be greater than or equal to {}", show(min)),
            );
        } else if value > max {
            self.error(
                field,
                format!("must be less than or equal to {}", show(max)),
            );
        } else {
            return Some(value);
        }
        None
    }

    fn flag(&mut self, field: &str) -> Option<bool> {
        match self.present(field)? {
            Value::Bool(b) => Some(*b),
            Value::String(s) if s == "true" || s == "1" => Some(true),
            Value::String(s) if s == "false" || s == "0" || s.is_empty() => Some(false),
            Value::Number(n) => Some(n.as_f64() != Some(0.0)),
            _ => {
                self.error(field, "is not a boolean");
                None
            }
        }
    }
}

/// A number as Rails prints it in a message: `15`, `0.5`.
fn show(value: f64) -> String {
    if value.fract() == 0.0 {
        format!("{value:.1}")
    } else {
        value.to_string()
    }
}

/// A decimal as Judge0 echoes it (`"5.0"`).
fn decimal(value: f64) -> Value {
    Value::String(show(value))
}

/// Splits `command_line_arguments` into arguments the way Judge0's bash run script would: the
/// characters Judge0 strips (`$ & ; < > | \``) removed, then words split on whitespace, with
/// single quotes, double quotes and backslashes quoting.
pub fn split_arguments(line: &str) -> Result<Vec<String>, String> {
    let line: String = line
        .trim()
        .chars()
        .filter(|c| !"$&;<>|`".contains(*c))
        .collect();
    let mut args = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    args.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("has an unterminated single quote".into()),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("has an unterminated double quote".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("has an unterminated double quote".into()),
                    }
                }
            }
            '\\' => {
                let w = word.get_or_insert_with(String::new);
                if let Some(c) = chars.next() {
                    w.push(c);
                }
            }
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    args.extend(word);
    Ok(args)
}

/// Checks a Judge0 submission body. `base64`: `source_code`, `stdin` and `expected_output` are
/// base64 (`additional_files` always is). `max`: the gateway's maxima; `max_extract` bounds
/// the archive's files in all.
pub fn check(
    body: &Map<String, Value>,
    base64: bool,
    max: &ResolvedLimits,
    max_extract: usize,
) -> Result<Checked, FieldErrors> {
    let mut r = Reader {
        body,
        errors: FieldErrors::new(),
    };
    let text = |r: &mut Reader, field: &str| -> Option<Vec<u8>> {
        let value = r.text(field)?;
        if !base64 {
            return Some(value.into_bytes());
        }
        let decoded = decode(&value);
        if decoded.is_none() {
            r.error(field, "is not valid base64");
        }
        decoded
    };
    let source = text(&mut r, "source_code").filter(|s| !s.is_empty());
    if source.is_none() && !r.errors.contains_key("source_code") {
        r.error("source_code", "can't be blank");
    }
    let stdin = text(&mut r, "stdin").and_then(|bytes| match String::from_utf8(bytes) {
        Ok(s) => Some(s),
        Err(_) => {
            r.error("stdin", "must be UTF-8 text here");
            None
        }
    });
    let expected_output =
        text(&mut r, "expected_output").map(|b| String::from_utf8_lossy(&b).into_owned());
    let language = match r.number("language_id") {
        None if !r.errors.contains_key("language_id") => {
            r.error("language_id", "can't be blank");
            None
        }
        None => None,
        Some(id) => {
            let found = (id.fract() == 0.0 && id >= 0.0)
                .then(|| languages::by_id(id as u32))
                .flatten();
            if found.is_none() {
                r.error(
                    "language_id",
                    format!("language with id {id} doesn't exist"),
                );
            }
            found.copied()
        }
    };

    let ms = |v: u64| v as f64 / 1000.0;
    let kb = |v: u64| (v / 1024) as f64;
    let defaults = ResolvedLimits::DEFAULT;
    let cpu = r.bounded("cpu_time_limit", 0.0, true, ms(max.cpu_time_ms));
    let extra = r.bounded("cpu_extra_time", 0.0, false, MAX_CPU_EXTRA_TIME_S);
    let wall = r.bounded("wall_time_limit", 0.0, true, ms(max.wall_time_ms));
    let memory = r.bounded("memory_limit", 2048.0, false, kb(max.memory_bytes));
    let stack = r.bounded("stack_limit", 0.0, false, MAX_STACK_KB as f64);
    let processes = r.bounded(
        "max_processes_and_or_threads",
        0.0,
        true,
        max.processes as f64,
    );
    let file_size = r.bounded("max_file_size", 0.0, true, kb(max.file_size_bytes));
    let runs = r.bounded("number_of_runs", 0.0, true, MAX_NUMBER_OF_RUNS as f64);
    for (field, value) in [
        ("max_processes_and_or_threads", processes),
        ("memory_limit", memory),
        ("max_file_size", file_size),
        ("number_of_runs", runs),
        ("stack_limit", stack),
    ] {
        if value.is_some_and(|v| v.fract() != 0.0) {
            r.error(field, "must be an integer");
        }
    }
    for field in [
        "enable_per_process_and_thread_time_limit",
        "enable_per_process_and_thread_memory_limit",
    ] {
        if r.flag(field) == Some(true) {
            r.error(field, "this option cannot be enabled");
        }
    }
    if r.flag("enable_network") == Some(true) {
        r.error("enable_network", "enabling network is not allowed");
    }
    let redirect = r.flag("redirect_stderr_to_stdout").unwrap_or(false);
    if r.text("callback_url").is_some_and(|u| !u.is_empty()) {
        r.error("callback_url", "setting callback is not allowed");
    }
    let compiler_options = r.text("compiler_options").unwrap_or_default();
    if !compiler_options.trim().is_empty() {
        r.error(
            "compiler_options",
            "setting compiler options is not allowed",
        );
    }
    let arguments = r.text("command_line_arguments").unwrap_or_default();
    let args = if arguments.chars().count() > MAX_OPTION_CHARS {
        r.error(
            "command_line_arguments",
            format!("is too long (maximum is {MAX_OPTION_CHARS} characters)"),
        );
        Vec::new()
    } else {
        split_arguments(&arguments).unwrap_or_else(|e| {
            r.error("command_line_arguments", e);
            Vec::new()
        })
    };
    let archive = r.text("additional_files").filter(|a| !a.is_empty());
    let files = match &archive {
        None => Vec::new(),
        Some(text) => match decode(text) {
            None => {
                r.error("additional_files", "is not valid base64");
                Vec::new()
            }
            Some(bytes) => {
                let max_files = codefleet_shared::validate::MAX_FILES - 1;
                zip::read(&bytes, max_files, max_extract).unwrap_or_else(|e| {
                    r.error("additional_files", e);
                    Vec::new()
                })
            }
        },
    };
    if redirect && expected_output.is_some() {
        r.error(
            "redirect_stderr_to_stdout",
            "cannot be combined with expected_output on codefleet",
        );
    }
    if !r.errors.is_empty() {
        return Err(r.errors);
    }
    let (Some(language), Some(source)) = (language, source) else {
        unreachable!("a missing language or source is a field error");
    };

    let limits = Limits {
        cpu_time_ms: cpu.map(|s| (s * 1000.0).round() as u64),
        wall_time_ms: wall.map(|s| (s * 1000.0).round() as u64),
        memory_bytes: memory.map(|k| k as u64 * 1024),
        processes: processes.map(|p| p as u64),
        file_size_bytes: file_size.map(|k| k as u64 * 1024),
        ..Limits::default()
    };
    let runs = runs.map_or(1, |n| n as u64);
    let mut echo = Map::new();
    let mut put = |field: &str, value: Value| {
        echo.insert(field.to_string(), value);
    };
    put("source_code", String::from_utf8_lossy(&source).into());
    put("language_id", language.id.into());
    put("stdin", stdin.clone().into());
    put("expected_output", expected_output.clone().into());
    put("number_of_runs", runs.into());
    put(
        "cpu_time_limit",
        decimal(cpu.unwrap_or(ms(defaults.cpu_time_ms))),
    );
    put("cpu_extra_time", decimal(extra.unwrap_or(0.0)));
    put(
        "wall_time_limit",
        decimal(wall.unwrap_or(ms(defaults.wall_time_ms))),
    );
    put(
        "memory_limit",
        (memory.map_or(defaults.memory_bytes / 1024, |m| m as u64)).into(),
    );
    put(
        "stack_limit",
        (stack.map_or(DEFAULT_STACK_KB, |s| s as u64)).into(),
    );
    put(
        "max_processes_and_or_threads",
        (processes.map_or(defaults.processes, |p| p as u64)).into(),
    );
    put("enable_per_process_and_thread_time_limit", false.into());
    put("enable_per_process_and_thread_memory_limit", false.into());
    put(
        "max_file_size",
        (file_size.map_or(defaults.file_size_bytes / 1024, |f| f as u64)).into(),
    );
    put("compiler_options", Value::Null);
    put(
        "command_line_arguments",
        (!arguments.is_empty()).then_some(arguments).into(),
    );
    put("redirect_stderr_to_stdout", redirect.into());
    put("callback_url", Value::Null);
    put("additional_files", archive.into());
    put("enable_network", false.into());
    Ok(Checked {
        language,
        source,
        stdin,
        expected_output,
        files,
        args,
        limits,
        redirect,
        runs,
        echo,
    })
}

/// The native request a checked submission becomes.
#[derive(Debug, Clone, PartialEq)]
pub enum Native {
    /// One run, no expected output: `POST /v1/execute`.
    Execute(ExecuteRequest),
    /// An expected output or several runs: `POST /v1/judge`, one test per run, the `lines`
    /// checker (Judge0's comparison), stopping at the first failure when there is an expected
    /// output.
    Judge(JudgeRequest),
}

impl Native {
    pub fn of(checked: &Checked, runtime: &Resolved) -> Native {
        let base64 = |data: &[u8]| FileSpec {
            name: String::new(),
            content: encode(data),
            encoding: Encoding::Base64,
        };
        let (source, files) = match (String::from_utf8(checked.source.clone()), &checked.files) {
            (Ok(source), files) if files.is_empty() => (Some(source), None),
            _ => {
                let entry = FileSpec {
                    name: runtime.file_name.clone(),
                    ..base64(&checked.source)
                };
                // As Judge0 unzips with `-n`: the source file wins over an archive's file of
                // the same name.
                let extra = checked
                    .files
                    .iter()
                    .filter(|f| f.name != runtime.file_name)
                    .map(|f| FileSpec {
                        name: f.name.clone(),
                        ..base64(&f.data)
                    });
                (None, Some(std::iter::once(entry).chain(extra).collect()))
            }
        };
        let limits = (checked.limits != Limits::default()).then_some(checked.limits);
        let program = ExecuteRequest {
            language: Some(runtime.entry.language.to_string()),
            version: Some(runtime.version.clone()),
            source,
            files,
            args: (!checked.args.is_empty()).then(|| checked.args.clone()),
            limits,
            ..ExecuteRequest::default()
        };
        if checked.expected_output.is_none() && checked.runs == 1 {
            return Native::Execute(ExecuteRequest {
                stdin: checked.stdin.clone(),
                ..program
            });
        }
        let test = TestCase {
            stdin: checked.stdin.clone().unwrap_or_default(),
            expected: checked.expected_output.clone().unwrap_or_default(),
            limits: None,
        };
        Native::Judge(JudgeRequest {
            program,
            tests: Some(vec![test; checked.runs as usize]),
            checker: Some(Checker::Lines {}),
            stop_on_first_failure: checked.expected_output.is_some(),
        })
    }
}

/// What a token carries besides the native token: what the answer needs that the native
/// submission does not keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenFacts {
    pub language_id: u32,
    /// Whether an expected output decides Accepted (else every completed run is).
    pub expected: bool,
    pub redirect: bool,
}

/// The Judge0 token of a native submission: `<native token>.<language id><flags>` (`e`: an
/// expected output was given, `r`: stderr goes to stdout). Any gateway can read it.
pub fn token(native: &str, facts: TokenFacts) -> String {
    let e = if facts.expected { "e" } else { "" };
    let r = if facts.redirect { "r" } else { "" };
    format!("{native}.{}{e}{r}", facts.language_id)
}

/// The native token and the facts of a Judge0 token; `None` when it is not one of ours.
pub fn parse_token(token: &str) -> Option<(&str, TokenFacts)> {
    let (native, suffix) = token.rsplit_once('.')?;
    let digits = suffix
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(suffix.len());
    let (id, flags) = suffix.split_at(digits);
    let flags_ok = matches!(flags, "" | "e" | "r" | "er");
    if !native.contains('.') || !flags_ok {
        return None;
    }
    Some((
        native,
        TokenFacts {
            language_id: id.parse().ok()?,
            expected: flags.contains('e'),
            redirect: flags.contains('r'),
        },
    ))
}

/// How a finished job ended, in Judge0's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub status: u8,
    pub stdout: Option<String>,
    pub stderr: Option<String>,
    pub compile_output: Option<String>,
    pub message: Option<String>,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    /// CPU seconds.
    pub time: Option<String>,
    pub wall_time: Option<String>,
    /// KB.
    pub memory: Option<u64>,
}

impl Outcome {
    pub fn failed(status: u8, message: String) -> Outcome {
        Outcome {
            status,
            stdout: None,
            stderr: None,
            compile_output: None,
            message: Some(message),
            exit_code: None,
            exit_signal: None,
            time: None,
            wall_time: None,
            memory: None,
        }
    }
}

/// A signal's number on Linux, from its name.
fn signal_number(name: &str) -> Option<i32> {
    const NAMES: [&str; 31] = [
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
    NAMES.iter().position(|n| *n == name).map(|i| i as i32 + 1)
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

/// A stage's output as `compile_output`: its stdout and stderr together.
fn compile_output(stage: &StageResult) -> Option<String> {
    non_empty(format!("{}{}", stage.stdout, stage.stderr))
}

/// The program did not compile.
fn compile_failed(compile: Option<&StageResult>) -> Outcome {
    let output = match compile {
        Some(stage) if stage.status == Status::Timeout => {
            Some("Compilation time limit exceeded.".to_string())
        }
        Some(stage) => compile_output(stage),
        None => None,
    };
    Outcome {
        compile_output: output,
        message: None,
        ..Outcome::failed(COMPILATION_ERROR, String::new())
    }
}

/// One run's outcome; `accepted`: whether its output is the expected one (if any).
fn run_outcome(run: &StageResult, accepted: bool, redirect: bool) -> Outcome {
    let signal = run.signal.as_deref().and_then(signal_number);
    let (status, message) = match run.status {
        Status::Ok if accepted => (ACCEPTED, None),
        Status::Ok => (WRONG_ANSWER, None),
        Status::RuntimeError => match signal {
            Some(11) => (SIGSEGV, None),
            Some(25) => (SIGXFSZ, None),
            Some(8) => (SIGFPE, None),
            Some(6) => (SIGABRT, None),
            Some(_) => (OTHER, None),
            None => (NZEC, None),
        },
        Status::Timeout => (TIME_LIMIT, Some("Time limit exceeded".to_string())),
        // Judge0 has no memory verdict: its sandbox's OOM kill is a SIGKILL, which its clients
        // know as "Runtime Error (Other)" with exit signal 9.
        Status::MemoryLimit => (OTHER, Some("Memory limit exceeded".to_string())),
        Status::OutputLimit => (SIGXFSZ, Some("Output limit exceeded".to_string())),
        Status::CompileError => (COMPILATION_ERROR, None),
        Status::InternalError => (INTERNAL_ERROR, non_empty(run.stderr.trim().to_string())),
    };
    let message = message.or_else(|| match (status, signal, run.exit_code) {
        (SIGSEGV..=SIGABRT | OTHER, Some(n), _) => Some(format!("Caught fatal signal {n}")),
        (NZEC, _, Some(code)) => Some(format!("Exited with error status {code}")),
        _ => None,
    });
    let exit_signal = match run.status {
        Status::MemoryLimit => Some(9),
        Status::OutputLimit => Some(25),
        _ => signal,
    };
    let (stdout, stderr) = match redirect {
        true => (format!("{}{}", run.stdout, run.stderr), String::new()),
        false => (run.stdout.clone(), run.stderr.clone()),
    };
    let internal = status == INTERNAL_ERROR;
    Outcome {
        status,
        stdout: non_empty(stdout).filter(|_| !internal),
        stderr: non_empty(stderr).filter(|_| !internal),
        compile_output: None,
        message,
        exit_code: Some(run.exit_code.unwrap_or(0)),
        exit_signal,
        time: Some(seconds(run.cpu_time_ms as f64)),
        wall_time: Some(seconds(run.wall_time_ms as f64)),
        memory: Some(run.memory_bytes / 1024),
    }
}

/// Several runs of one program, Judge0's `number_of_runs`: up to the first one not accepted,
/// whose outcome it is, with the time and memory averaged over the runs up to it.
fn runs_outcome<'r>(
    runs: impl IntoIterator<Item = (&'r StageResult, bool)>,
    compile: Option<&StageResult>,
    redirect: bool,
) -> Outcome {
    let mut taken: Vec<&StageResult> = Vec::new();
    let mut last = None;
    for (run, accepted) in runs {
        let outcome = run_outcome(run, accepted, redirect);
        taken.push(run);
        let stop = outcome.status != ACCEPTED;
        last = Some(outcome);
        if stop {
            break;
        }
    }
    let Some(mut outcome) = last else {
        return Outcome::failed(INTERNAL_ERROR, "the program did not run".to_string());
    };
    if taken.len() > 1 && outcome.status != INTERNAL_ERROR {
        let n = taken.len() as f64;
        let mean = |f: fn(&StageResult) -> u64| taken.iter().map(|r| f(r) as f64).sum::<f64>() / n;
        outcome.time = Some(seconds(mean(|r| r.cpu_time_ms)));
        outcome.wall_time = Some(seconds(mean(|r| r.wall_time_ms)));
        outcome.memory = Some((mean(|r| r.memory_bytes) / 1024.0) as u64);
    }
    outcome.compile_output = compile.and_then(compile_output);
    outcome
}

/// The outcome of `POST /v1/execute`'s answer.
pub fn from_execute(answer: &ExecuteResponse, redirect: bool) -> Outcome {
    if answer.status == Status::CompileError {
        return compile_failed(answer.compile.as_ref());
    }
    runs_outcome(
        answer.run.iter().map(|run| (run, true)),
        answer.compile.as_ref(),
        redirect,
    )
}

/// The outcome of `POST /v1/judge`'s answer; `expected`: the tests' verdicts decide Accepted.
pub fn from_judge(answer: &JudgeResponse, expected: bool, redirect: bool) -> Outcome {
    if answer.verdict == Verdict::CompileError {
        return compile_failed(answer.compile.as_ref());
    }
    let runs = answer.tests.iter().map_while(|test| {
        let run = test.run.as_ref()?;
        let accepted = !expected || test.verdict == Verdict::Accepted;
        Some((run, accepted))
    });
    let mut outcome = runs_outcome(runs, answer.compile.as_ref(), redirect);
    if let Some(test) = answer.tests.iter().find(|t| {
        t.verdict == Verdict::InternalError
            && t.run.as_ref().is_some_and(|r| r.status == Status::Ok)
    }) {
        outcome.status = INTERNAL_ERROR;
        outcome.message = test.message.clone();
    }
    outcome
}

/// A submission's record from what is known of it: the request's echo (or only its language),
/// where it is, and its outcome once it has one.
pub struct Facts<'a> {
    pub token: Option<String>,
    pub language: Option<&'a Resolved>,
    pub language_id: u32,
    pub echo: Option<&'a Map<String, Value>>,
    pub status: u8,
    pub outcome: Option<Outcome>,
    pub created_at_ms: Option<u64>,
    pub finished_at_ms: Option<u64>,
}

pub fn record(facts: Facts<'_>) -> Record {
    let mut record = Record::new();
    for (field, value) in facts.echo.into_iter().flatten() {
        record.set(field, value.clone());
    }
    record.set("language_id", facts.language_id);
    let name = facts.language.map(Resolved::name);
    record.set("language", json!({"id": facts.language_id, "name": name}));
    record.set("token", facts.token);
    record.set("created_at", facts.created_at_ms.map(timestamp));
    record.set("finished_at", facts.finished_at_ms.map(timestamp));
    let status = facts.outcome.as_ref().map_or(facts.status, |o| o.status);
    record.set("status_id", status);
    record.set("status", status_json(status));
    if let Some(o) = facts.outcome {
        record.set("stdout", o.stdout);
        record.set("stderr", o.stderr);
        record.set("compile_output", o.compile_output);
        record.set("message", o.message);
        record.set("exit_code", o.exit_code);
        record.set("exit_signal", o.exit_signal);
        record.set("time", o.time);
        record.set("wall_time", o.wall_time);
        record.set("memory", o.memory);
    }
    record
}

/// Where a stored native submission is, as Judge0's status and (when done) outcome.
pub fn stored(submission: &Submission, facts: TokenFacts) -> (u8, Option<Outcome>) {
    match submission.status {
        SubmissionStatus::Queued => (IN_QUEUE, None),
        SubmissionStatus::Running => (PROCESSING, None),
        SubmissionStatus::Done => match &submission.result {
            Some(SubmissionResult::Execute(answer)) => {
                (ACCEPTED, Some(from_execute(answer, facts.redirect)))
            }
            Some(SubmissionResult::Judge(answer)) => (
                ACCEPTED,
                Some(from_judge(answer, facts.expected, facts.redirect)),
            ),
            None => (
                INTERNAL_ERROR,
                Some(Outcome::failed(INTERNAL_ERROR, "no result was kept".into())),
            ),
        },
        SubmissionStatus::Failed => {
            let why = submission.error.as_ref().map_or_else(
                || "the node could not run it".to_string(),
                |p| p.detail.clone(),
            );
            (INTERNAL_ERROR, Some(Outcome::failed(INTERNAL_ERROR, why)))
        }
        SubmissionStatus::Cancelled => (
            INTERNAL_ERROR,
            Some(Outcome::failed(INTERNAL_ERROR, "cancelled".into())),
        ),
    }
}

#[cfg(test)]
mod tests;
