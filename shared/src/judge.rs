//! Judging: one program, compiled once, run against many test cases, each answer compared with
//! the expected output by a checker. The bodies of `POST /v1/judge`, their limits, the built-in
//! checkers (plain functions, here so that both the agent and any client can apply the same
//! rules) and the verdicts.

use serde::{Deserialize, Serialize};

use std::time::Duration;

use crate::api::{
    object_only, ExecuteRequest, LanguageRef, Limits, ResolvedLimits, StageResult, Status, Timing,
};
use crate::problem::{ErrorCode, Problem};
use crate::validate::resolve_limits;

/// The most test cases one judge request may carry.
pub const MAX_TESTS: usize = 256;
/// The most bytes of all tests' `stdin` and `expected` together.
pub const MAX_TESTS_BYTES: usize = 16 * 1024 * 1024;
/// The largest tolerance a `float` checker accepts (a larger one would accept anything).
pub const MAX_TOLERANCE: f64 = 1.0e6;

/// The files a `program` checker finds in its work dir, in the order of its arguments: the
/// test's input, the expected output, the judged program's output.
pub const CHECKER_FILES: [&str; 3] = ["input.txt", "expected.txt", "output.txt"];
/// The most bytes of a checker's stdout kept as a test's `message`.
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Time allowed per test beyond its own limits (the restore between runs, the round trips).
pub const PER_TEST_OVERHEAD: Duration = Duration::from_millis(1000);

/// `POST /v1/judge` as it arrives: the program as in `POST /v1/execute` (without `stdin`, which
/// each test carries), the tests, and how answers are checked.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct JudgeRequest {
    #[serde(flatten)]
    pub program: ExecuteRequest,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option_vec"
    )]
    pub tests: Option<Vec<TestCase>>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option"
    )]
    pub checker: Option<Checker>,
    /// Stop at the first test that is not accepted; the rest are `skipped`.
    #[serde(default)]
    pub stop_on_first_failure: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    #[serde(default)]
    pub stdin: String,
    #[serde(default)]
    pub expected: String,
    /// This test's own run limits, over the request's (`compile_wall_time_ms` does not apply).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "object_only::option"
    )]
    pub limits: Option<Limits>,
}

/// How a test's output is compared with its `expected`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Checker {
    /// Byte for byte.
    Exact {},
    /// Line by line, ignoring each line's trailing whitespace and trailing blank lines (Judge0's
    /// rule). The default.
    Lines {},
    /// The same whitespace-separated tokens.
    Tokens {},
    /// The same tokens, where two numbers are equal within `abs_tol` or within `rel_tol` of the
    /// expected one (either suffices); tokens that are not numbers must be equal.
    Float {
        #[serde(default = "default_tolerance")]
        abs_tol: f64,
        #[serde(default = "default_tolerance")]
        rel_tol: f64,
    },
    /// A program, run like any job for every test that ran to completion, with the test's input,
    /// the expected output and the program's output in its work dir as `input.txt`,
    /// `expected.txt` and `output.txt` (their names also its first three arguments): exit 0
    /// accepts, exit 1 is a wrong answer, anything else is the checker's failure
    /// (`internal_error` for that test). What it prints on stdout becomes the test's `message`.
    Program {
        #[serde(flatten)]
        program: Box<ExecuteRequest>,
    },
}

impl Default for Checker {
    fn default() -> Checker {
        Checker::Lines {}
    }
}

fn default_tolerance() -> f64 {
    1e-6
}

impl Checker {
    /// Compares `actual` with `expected` for the built-in checkers; `None` for `program`.
    pub fn accepts(&self, expected: &str, actual: &str) -> Option<bool> {
        Some(match self {
            Checker::Exact {} => expected == actual,
            Checker::Lines {} => lines(expected) == lines(actual),
            Checker::Tokens {} => expected.split_whitespace().eq(actual.split_whitespace()),
            Checker::Float { abs_tol, rel_tol } => {
                floats_match(expected, actual, *abs_tol, *rel_tol)
            }
            Checker::Program { .. } => return None,
        })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Checker::Exact {} => "exact",
            Checker::Lines {} => "lines",
            Checker::Tokens {} => "tokens",
            Checker::Float { .. } => "float",
            Checker::Program { .. } => "program",
        }
    }
}

/// The lines of `text` without their trailing whitespace, trailing blank lines dropped.
fn lines(text: &str) -> Vec<&str> {
    let mut out: Vec<&str> = text.lines().map(str::trim_end).collect();
    while out.last().is_some_and(|l| l.is_empty()) {
        out.pop();
    }
    out
}

fn floats_match(expected: &str, actual: &str, abs_tol: f64, rel_tol: f64) -> bool {
    let mut want = expected.split_whitespace();
    let mut got = actual.split_whitespace();
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g)) => {
                let same = match (number(w), number(g)) {
                    (Some(w), Some(g)) => {
                        let diff = (w - g).abs();
                        diff <= abs_tol || diff <= rel_tol * w.abs()
                    }
                    _ => w == g,
                };
                if !same {
                    return false;
                }
            }
            _ => return false,
        }
    }
}

/// A finite number written as a decimal (`nan`, `inf` and the like are words, not numbers).
fn number(token: &str) -> Option<f64> {
    let looks_numeric = token
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.' | b'e' | b'E'));
    let value: f64 = token.parse().ok().filter(|_| looks_numeric)?;
    value.is_finite().then_some(value)
}

/// A test's outcome.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    Accepted,
    WrongAnswer,
    TimeLimit,
    MemoryLimit,
    OutputLimit,
    RuntimeError,
    /// Not run: an earlier test failed and the request asked to stop there.
    Skipped,
    /// The node could not run the test, or the checker program failed.
    InternalError,
    /// Only as the overall verdict: the program did not compile, no test ran.
    CompileError,
}

impl Verdict {
    /// The verdict of a run that did not complete normally; `None` when it did (the checker
    /// decides).
    pub fn of_run(status: Status) -> Option<Verdict> {
        match status {
            Status::Ok => None,
            Status::RuntimeError => Some(Verdict::RuntimeError),
            Status::Timeout => Some(Verdict::TimeLimit),
            Status::MemoryLimit => Some(Verdict::MemoryLimit),
            Status::OutputLimit => Some(Verdict::OutputLimit),
            Status::CompileError => Some(Verdict::CompileError),
            Status::InternalError => Some(Verdict::InternalError),
        }
    }
}

/// One test's result in the answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestResult {
    pub verdict: Verdict,
    /// The run, absent when the test was skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<StageResult>,
    /// What the checker program printed, or why the test could not be judged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// `200` answer of `POST /v1/judge`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JudgeResponse {
    pub id: String,
    pub language: LanguageRef,
    /// `accepted` when every test is; else the first failing test's verdict (or `compile_error`).
    pub verdict: Verdict,
    /// Index of the first test not accepted.
    pub first_failure: Option<usize>,
    pub compile: Option<StageResult>,
    /// Whether the compiled program came from the node's compile cache.
    #[serde(default)]
    pub cached: bool,
    pub checker: String,
    pub tests: Vec<TestResult>,
    pub node: String,
    pub timing: Timing,
    /// Nodes the gateway tried (set by a gateway).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

impl JudgeResponse {
    /// The overall verdict and first failure of `tests` (after a compile that succeeded).
    pub fn overall(tests: &[TestResult]) -> (Verdict, Option<usize>) {
        match tests
            .iter()
            .position(|t| !matches!(t.verdict, Verdict::Accepted | Verdict::Skipped))
        {
            Some(i) => (tests[i].verdict, Some(i)),
            None => (Verdict::Accepted, None),
        }
    }
}

/// One event of a judge streamed as NDJSON (`Accept: application/x-ndjson`): `accepted` once
/// the node took the judge, `compile` when the program's compile stage ended (languages that
/// compile), one `test` per test in order as each is judged (skipped ones too), then exactly
/// one `result` (the buffered answer) or `error`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum JudgeEvent {
    Accepted {
        id: String,
        node: String,
        language: LanguageRef,
        queued_ms: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    Compile {
        result: StageResult,
    },
    Test {
        index: usize,
        result: TestResult,
    },
    Result {
        result: Box<JudgeResponse>,
    },
    Error {
        error: Problem,
    },
}

impl JudgeEvent {
    /// The event as one NDJSON line.
    pub fn to_line(&self) -> String {
        let mut line = serde_json::to_string(self).expect("events serialize");
        line.push('\n');
        line
    }
}

/// Test `index`'s limits: the request's (`program`, already resolved) with the test's own over
/// them, within `max`. A test cannot set `memory_bytes` (every test runs in the one sandbox,
/// whose memory is the request's) nor `compile_wall_time_ms`.
pub fn test_limits(
    index: usize,
    program: &ResolvedLimits,
    asked: Option<&Limits>,
    max: &ResolvedLimits,
) -> Result<ResolvedLimits, Problem> {
    let Some(asked) = asked else {
        return Ok(*program);
    };
    for (name, set) in [
        ("memory_bytes", asked.memory_bytes.is_some()),
        ("compile_wall_time_ms", asked.compile_wall_time_ms.is_some()),
    ] {
        if set {
            return Err(Problem::new(
                ErrorCode::InvalidRequest,
                format!(
                    "tests[{index}].limits.{name}: set it in the request's `limits`, for all tests"
                ),
            ));
        }
    }
    resolve_limits(Some(asked), program, max).map_err(|mut p| {
        p.detail = format!("tests[{index}]: {}", p.detail);
        p
    })
}

/// The longest a judge may take by its limits: one compile, every test's wall time, and for a
/// `program` checker its compile and one run per test; plus `PER_TEST_OVERHEAD` per test.
pub fn judge_budget(
    program: &ResolvedLimits,
    tests: &[ResolvedLimits],
    checker: Option<&ResolvedLimits>,
) -> Duration {
    let runs: u64 = tests.iter().map(|t| t.wall_time_ms).sum();
    let checks = checker.map_or(0, |c| {
        c.compile_wall_time_ms + c.wall_time_ms * tests.len() as u64
    });
    Duration::from_millis(program.compile_wall_time_ms + runs + checks)
        + PER_TEST_OVERHEAD * tests.len() as u32
}

/// Checks what `POST /v1/execute`'s checks do not: the tests, their size, the checker.
pub fn check_judge(req: &JudgeRequest) -> Result<(), Problem> {
    let invalid = |detail: String| Err(Problem::new(ErrorCode::InvalidRequest, detail));
    if req.program.stdin.is_some() {
        return invalid(
            "`stdin` belongs to each test (`tests[i].stdin`) in a judge request".into(),
        );
    }
    let Some(tests) = &req.tests else {
        return invalid("`tests` is required: a list of {stdin, expected}".into());
    };
    if tests.is_empty() || tests.len() > MAX_TESTS {
        return invalid(format!(
            "`tests` must hold 1 to {MAX_TESTS} tests, not {}",
            tests.len()
        ));
    }
    let bytes: usize = tests.iter().map(|t| t.stdin.len() + t.expected.len()).sum();
    if bytes > MAX_TESTS_BYTES {
        return invalid(format!(
            "the tests' stdin and expected output add up to {bytes} bytes; at most {MAX_TESTS_BYTES}"
        ));
    }
    if let Some(Checker::Float { abs_tol, rel_tol }) = &req.checker {
        for (name, tol) in [("abs_tol", abs_tol), ("rel_tol", rel_tol)] {
            if !(0.0..=MAX_TOLERANCE).contains(tol) {
                return invalid(format!(
                    "`checker.{name}` must be between 0 and {MAX_TOLERANCE}, not {tol}"
                ));
            }
        }
    }
    if let Some(Checker::Program { program }) = &req.checker {
        if program.stdin.is_some() || program.args.is_some() {
            return invalid(
                "a checker program gets the test's files as arguments; `stdin` and `args` are not allowed"
                    .into(),
            );
        }
        let taken = program
            .files
            .iter()
            .flatten()
            .find(|f| CHECKER_FILES.contains(&f.name.as_str()));
        if let Some(file) = taken {
            return invalid(format!(
                "a checker program's file may not be called {:?}: the test's files take that name",
                file.name
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_checkers() {
        let float = Checker::Float {
            abs_tol: 1e-3,
            rel_tol: 1e-6,
        };
        // (checker, expected, actual) -> accepted
        let table: &[(&Checker, &str, &str, bool)] = &[
            (&Checker::Exact {}, "1 2\n", "1 2\n", true),
            (&Checker::Exact {}, "1 2\n", "1 2", false),
            (&Checker::Lines {}, "1 2\n3\n", "1 2  \n3\n\n\n", true),
            (&Checker::Lines {}, "1 2\n3\n", "1 2\r\n3", true),
            (&Checker::Lines {}, "1 2\n3\n", " 1 2\n3\n", false), // leading space counts
            (&Checker::Lines {}, "1\n\n2\n", "1\n2\n", false),    // inner blank lines count
            (&Checker::Lines {}, "", "\n\n", true),
            (&Checker::Tokens {}, "1 2\n3", " 1\n2   3 \n", true),
            (&Checker::Tokens {}, "1 2 3", "1 2", false),
            (&float, "0.3333", "0.33333333", true),
            (&float, "0.333", "0.335", false),
            (&float, "1000000000", "1000000500", true), // within rel_tol
            (&float, "1e3 x", "1000.0004 x", true),
            (&float, "1 x", "1 y", false),
            (&float, "1", "1 2", false),
            (&float, "nan", "nan", true), // words compared as words
            (&float, "1", "nan", false),
            (&float, "1", "inf", false),
        ];
        for (checker, expected, actual, want) in table {
            assert_eq!(
                checker.accepts(expected, actual),
                Some(*want),
                "{} {expected:?} {actual:?}",
                checker.name()
            );
        }
    }

    #[test]
    fn requests_parse_with_the_program_flattened() {
        let req: JudgeRequest = serde_json::from_str(
            r#"{"language":"python","source":"print(input())","tests":[{"stdin":"1\n","expected":"1\n"}],
               "checker":{"type":"float","abs_tol":0.5},"stop_on_first_failure":true}"#,
        )
        .unwrap();
        assert_eq!(req.program.language.as_deref(), Some("python"));
        assert_eq!(req.tests.as_ref().unwrap().len(), 1);
        assert_eq!(
            req.checker,
            Some(Checker::Float {
                abs_tol: 0.5,
                rel_tol: 1e-6
            })
        );
        assert!(check_judge(&req).is_ok());
        let program: JudgeRequest = serde_json::from_str(
            r#"{"language":"c","source":"x","tests":[{}],
               "checker":{"type":"program","language":"python","source":"import sys"}}"#,
        )
        .unwrap();
        match program.checker {
            Some(Checker::Program { program }) => {
                assert_eq!(program.language.as_deref(), Some("python"))
            }
            other => panic!("{other:?}"),
        }
        assert!(serde_json::from_str::<Checker>(r#"{"type":"regex"}"#).is_err());
        // Objects only: serde's derived structs and tagged enums would take arrays too.
        for arrays in [
            r#"{"tests":[[]]}"#,
            r#"{"tests":[{"limits":[null,null]}]}"#,
            r#"{"tests":[{}],"checker":["exact"]}"#,
        ] {
            assert!(
                serde_json::from_str::<JudgeRequest>(arrays).is_err(),
                "{arrays}"
            );
        }
        assert!(serde_json::from_str::<TestCase>(r#"{"input":"1"}"#).is_err());
    }

    #[test]
    fn bad_judge_requests_are_refused_with_a_reason() {
        let with = |f: &dyn Fn(&mut JudgeRequest)| {
            let mut req = JudgeRequest {
                tests: Some(vec![TestCase::default()]),
                ..JudgeRequest::default()
            };
            f(&mut req);
            check_judge(&req).err().map(|p| p.detail)
        };
        assert_eq!(with(&|_| {}), None);
        let refusals = [
            with(&|r| r.tests = None),
            with(&|r| r.tests = Some(vec![])),
            with(&|r| r.tests = Some(vec![TestCase::default(); MAX_TESTS + 1])),
            with(&|r| r.program.stdin = Some("x".into())),
            with(&|r| {
                r.tests = Some(vec![TestCase {
                    stdin: "x".repeat(MAX_TESTS_BYTES),
                    expected: "y".into(),
                    limits: None,
                }])
            }),
            with(&|r| {
                r.checker = Some(Checker::Float {
                    abs_tol: -1.0,
                    rel_tol: 0.0,
                })
            }),
            with(&|r| {
                r.checker = Some(Checker::Float {
                    abs_tol: f64::NAN,
                    rel_tol: 0.0,
                })
            }),
            with(&|r| {
                r.checker = Some(Checker::Program {
                    program: Box::new(ExecuteRequest {
                        files: Some(vec![crate::api::FileSpec {
                            name: "expected.txt".into(),
                            content: String::new(),
                            encoding: Default::default(),
                        }]),
                        ..ExecuteRequest::default()
                    }),
                })
            }),
        ];
        for (i, refusal) in refusals.iter().enumerate() {
            assert!(refusal.is_some(), "case {i} was accepted");
        }
    }

    #[test]
    fn a_tests_limits_are_the_requests_with_its_own_over_them() {
        let max = ResolvedLimits {
            wall_time_ms: 10_000,
            ..ResolvedLimits::DEFAULT
        };
        let program = ResolvedLimits {
            wall_time_ms: 2_000,
            ..ResolvedLimits::DEFAULT
        };
        assert_eq!(test_limits(0, &program, None, &max), Ok(program));
        let own = Limits {
            wall_time_ms: Some(500),
            ..Limits::default()
        };
        let got = test_limits(0, &program, Some(&own), &max).unwrap();
        assert_eq!(got.wall_time_ms, 500);
        assert_eq!(got.memory_bytes, program.memory_bytes);
        let over = Limits {
            wall_time_ms: Some(10_001),
            ..Limits::default()
        };
        let refused = test_limits(3, &program, Some(&over), &max).unwrap_err();
        assert_eq!(refused.code, ErrorCode::LimitExceedsMax);
        assert!(refused.detail.starts_with("tests[3]"), "{}", refused.detail);
        let memory = Limits {
            memory_bytes: Some(1 << 20),
            ..Limits::default()
        };
        let refused = test_limits(1, &program, Some(&memory), &max).unwrap_err();
        assert_eq!(refused.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn the_budget_covers_one_compile_and_every_run() {
        let l = |compile, wall| ResolvedLimits {
            compile_wall_time_ms: compile,
            wall_time_ms: wall,
            ..ResolvedLimits::DEFAULT
        };
        let tests = [l(0, 1_000), l(0, 3_000)];
        assert_eq!(
            judge_budget(&l(10_000, 0), &tests, None),
            Duration::from_millis(14_000) + PER_TEST_OVERHEAD * 2
        );
        assert_eq!(
            judge_budget(&l(10_000, 0), &tests, Some(&l(5_000, 500))),
            Duration::from_millis(14_000 + 5_000 + 2 * 500) + PER_TEST_OVERHEAD * 2
        );
    }

    #[test]
    fn judge_events_are_single_tagged_lines() {
        let line = JudgeEvent::Test {
            index: 2,
            result: TestResult {
                verdict: Verdict::WrongAnswer,
                run: None,
                message: Some("a\nb".into()),
            },
        }
        .to_line();
        assert_eq!(line.matches('\n').count(), 1);
        assert!(line.starts_with(r#"{"type":"test","index":2,"#), "{line}");
    }

    #[test]
    fn the_overall_verdict_is_the_first_failure() {
        let t = |verdict| TestResult {
            verdict,
            run: None,
            message: None,
        };
        assert_eq!(
            JudgeResponse::overall(&[t(Verdict::Accepted), t(Verdict::Accepted)]),
            (Verdict::Accepted, None)
        );
        assert_eq!(
            JudgeResponse::overall(&[
                t(Verdict::Accepted),
                t(Verdict::TimeLimit),
                t(Verdict::WrongAnswer)
            ]),
            (Verdict::TimeLimit, Some(1))
        );
        assert_eq!(
            JudgeResponse::overall(&[t(Verdict::WrongAnswer), t(Verdict::Skipped)]),
            (Verdict::WrongAnswer, Some(0))
        );
    }
}
