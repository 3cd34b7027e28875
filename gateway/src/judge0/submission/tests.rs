use super::*;
use codefleet_shared::api::{LanguageRef, Timing};
use codefleet_shared::judge::TestResult;

fn body(value: Value) -> Map<String, Value> {
    value.as_object().cloned().unwrap()
}

fn checked(value: Value) -> Checked {
    check(&body(value), false, &ResolvedLimits::MAX, 1 << 20).unwrap()
}

fn errors(value: Value) -> FieldErrors {
    check(&body(value), false, &ResolvedLimits::MAX, 1 << 20).unwrap_err()
}

fn python() -> Resolved {
    Resolved {
        entry: *languages::by_id(71).unwrap(),
        version: "3.11.2".into(),
        file_name: "main.py".into(),
        compiled: false,
    }
}

fn stage(status: Status, stdout: &str) -> StageResult {
    StageResult {
        status,
        exit_code: Some(0),
        signal: None,
        stdout: stdout.into(),
        stderr: String::new(),
        stdout_truncated: false,
        stderr_truncated: false,
        wall_time_ms: 20,
        cpu_time_ms: 12,
        memory_bytes: 8 << 20,
    }
}

fn execute(
    status: Status,
    compile: Option<StageResult>,
    run: Option<StageResult>,
) -> ExecuteResponse {
    serde_json::from_value(json!({
        "id": "ex_1", "language": LanguageRef { name: "cpp".into(), version: "12.2.0".into() },
        "status": status, "compile": compile, "run": run, "node": "n1",
        "timing": Timing::default(),
    }))
    .unwrap()
}

#[test]
fn fields_are_judge0s() {
    assert_eq!(parse_fields(None).unwrap(), DEFAULT_FIELDS.to_vec());
    assert_eq!(parse_fields(Some("")).unwrap(), DEFAULT_FIELDS.to_vec());
    assert_eq!(parse_fields(Some("*")).unwrap(), ALL_FIELDS.to_vec());
    assert_eq!(
        parse_fields(Some("status,stdout")).unwrap(),
        vec!["stdout", "status"],
        "in Judge0's order"
    );
    assert_eq!(
        parse_fields(Some("stdout,bogus,worse")).unwrap_err(),
        "invalid fields: [bogus, worse]"
    );
}

#[test]
fn a_body_without_source_or_language_is_a_422_with_field_errors() {
    let got = errors(json!({}));
    assert_eq!(got["source_code"], vec!["can't be blank"]);
    assert_eq!(got["language_id"], vec!["can't be blank"]);
    let got = errors(json!({"source_code": "x", "language_id": 9999}));
    assert_eq!(
        got["language_id"],
        vec!["language with id 9999 doesn't exist"]
    );
    assert_eq!(got.len(), 1);
}

#[test]
fn limits_take_judge0_units_and_bounds() {
    let c = checked(json!({
        "source_code": "print(1)", "language_id": 71,
        "cpu_time_limit": 2.5, "wall_time_limit": "4", "memory_limit": 65536,
        "max_processes_and_or_threads": 10, "max_file_size": 2048, "number_of_runs": 3,
        "stack_limit": 1000, "cpu_extra_time": 0.5,
    }));
    assert_eq!(c.limits.cpu_time_ms, Some(2500));
    assert_eq!(c.limits.wall_time_ms, Some(4000));
    assert_eq!(c.limits.memory_bytes, Some(64 << 20));
    assert_eq!(c.limits.processes, Some(10));
    assert_eq!(c.limits.file_size_bytes, Some(2 << 20));
    assert_eq!(c.runs, 3);
    assert_eq!(c.echo["cpu_time_limit"], "2.5");
    assert_eq!(c.echo["memory_limit"], 65536);

    let got = errors(json!({
        "source_code": "x", "language_id": 71, "cpu_time_limit": 31, "memory_limit": 100,
        "number_of_runs": 0, "wall_time_limit": "soon", "max_file_size": 1.5,
    }));
    assert_eq!(
        got["cpu_time_limit"],
        vec!["must be less than or equal to 30.0"]
    );
    assert_eq!(
        got["memory_limit"],
        vec!["must be greater than or equal to 2048.0"]
    );
    assert_eq!(got["number_of_runs"], vec!["must be greater than 0.0"]);
    assert_eq!(got["wall_time_limit"], vec!["is not a number"]);
    assert_eq!(got["max_file_size"], vec!["must be an integer"]);
}

#[test]
fn options_codefleet_does_not_offer_are_refused_as_judge0_refuses_them() {
    let got = errors(json!({
        "source_code": "x", "language_id": 54, "compiler_options": "-O3",
        "enable_network": true, "callback_url": "http://example.com/cb",
        "enable_per_process_and_thread_time_limit": true,
        "redirect_stderr_to_stdout": true, "expected_output": "1",
    }));
    assert_eq!(
        got["compiler_options"],
        vec!["setting compiler options is not allowed"]
    );
    assert_eq!(
        got["enable_network"],
        vec!["enabling network is not allowed"]
    );
    assert_eq!(got["callback_url"], vec!["setting callback is not allowed"]);
    assert_eq!(
        got["enable_per_process_and_thread_time_limit"],
        vec!["this option cannot be enabled"]
    );
    assert!(got.contains_key("redirect_stderr_to_stdout"));
    // Off, or empty, they are fine.
    checked(
        json!({"source_code": "x", "language_id": 54, "compiler_options": "",
        "enable_network": false, "callback_url": null}),
    );
}

#[test]
fn base64_fields_are_decoded_and_bad_base64_is_a_field_error() {
    let c = check(
        &body(
            json!({"source_code": "cHJpbnQo\naW5wdXQoKSk=", "language_id": 71,
            "stdin": "NDI", "expected_output": encode(b"42\n")}),
        ),
        true,
        &ResolvedLimits::MAX,
        1 << 20,
    )
    .unwrap();
    assert_eq!(c.source, b"print(input())");
    assert_eq!(c.stdin.as_deref(), Some("42"));
    assert_eq!(c.expected_output.as_deref(), Some("42\n"));
    let got = check(
        &body(json!({"source_code": "***", "language_id": 71})),
        true,
        &ResolvedLimits::MAX,
        1 << 20,
    )
    .unwrap_err();
    assert_eq!(got["source_code"], vec!["is not valid base64"]);
}

#[test]
fn command_line_arguments_split_like_the_shell_judge0_hands_them_to() {
    let split = |s: &str| split_arguments(s).unwrap();
    assert_eq!(split("a  b"), vec!["a", "b"]);
    assert_eq!(
        split(r#"'one two' "th\"ree" four\ five"#),
        vec!["one two", "th\"ree", "four five"]
    );
    assert_eq!(
        split("x; rm -rf / | y $(z)"),
        vec!["x", "rm", "-rf", "/", "y", "(z)"]
    );
    assert_eq!(split(""), Vec::<String>::new());
    assert!(split_arguments("'open").is_err());
}

#[test]
fn a_plain_submission_is_an_execute_and_an_expected_output_or_runs_a_judge() {
    let c = checked(
        json!({"source_code": "print(input())", "language_id": 71, "stdin": "7",
        "command_line_arguments": "a b", "cpu_time_limit": 1}),
    );
    let Native::Execute(request) = Native::of(&c, &python()) else {
        panic!("an execute");
    };
    assert_eq!(request.language.as_deref(), Some("python"));
    assert_eq!(request.version.as_deref(), Some("3.11.2"));
    assert_eq!(request.source.as_deref(), Some("print(input())"));
    assert_eq!(request.stdin.as_deref(), Some("7"));
    assert_eq!(request.args, Some(vec!["a".to_string(), "b".to_string()]));
    assert_eq!(request.limits.unwrap().cpu_time_ms, Some(1000));

    let c = checked(json!({"source_code": "print(1)", "language_id": 71,
        "expected_output": "1", "number_of_runs": 3}));
    let Native::Judge(judge) = Native::of(&c, &python()) else {
        panic!("a judge");
    };
    let tests = judge.tests.unwrap();
    assert_eq!(tests.len(), 3);
    assert_eq!(tests[2].expected, "1");
    assert_eq!(judge.checker, Some(Checker::Lines {}));
    assert!(judge.stop_on_first_failure);
    assert!(judge.program.stdin.is_none());
}

#[test]
fn additional_files_travel_as_files_and_the_source_wins_a_clash() {
    let zip = zip::tests::archive(&[
        ("data.txt", b"42\n", true),
        ("main.py", b"print('from the zip')", false),
    ]);
    let c = checked(
        json!({"source_code": "print(open('data.txt').read())", "language_id": 71,
        "additional_files": encode(&zip)}),
    );
    let Native::Execute(request) = Native::of(&c, &python()) else {
        panic!("an execute");
    };
    let files = request.files.unwrap();
    let names: Vec<&str> = files.iter().map(|f| f.name.as_str()).collect();
    assert_eq!(names, ["main.py", "data.txt"]);
    assert_eq!(
        decode(&files[0].content).unwrap(),
        b"print(open('data.txt').read())"
    );
    assert_eq!(decode(&files[1].content).unwrap(), b"42\n");
    assert!(request.source.is_none());

    let got =
        errors(json!({"source_code": "x", "language_id": 71, "additional_files": encode(b"junk")}));
    assert!(
        got["additional_files"][0].contains("not a readable zip"),
        "{got:?}"
    );
}

#[test]
fn runs_end_in_judge0_statuses() {
    let ok = from_execute(
        &execute(Status::Ok, None, Some(stage(Status::Ok, "hi\n"))),
        false,
    );
    assert_eq!(ok.status, ACCEPTED);
    assert_eq!(ok.stdout.as_deref(), Some("hi\n"));
    assert_eq!(ok.stderr, None, "empty is null, as in Judge0");
    assert_eq!(ok.time.as_deref(), Some("0.012"));
    assert_eq!(ok.wall_time.as_deref(), Some("0.020"));
    assert_eq!(ok.memory, Some(8192));
    assert_eq!(ok.exit_code, Some(0));

    let signalled = |signal: &str| {
        let mut run = stage(Status::RuntimeError, "");
        run.exit_code = None;
        run.signal = Some(signal.into());
        from_execute(&execute(Status::RuntimeError, None, Some(run)), false)
    };
    for (signal, status, number) in [
        ("SIGSEGV", SIGSEGV, 11),
        ("SIGXFSZ", SIGXFSZ, 25),
        ("SIGFPE", SIGFPE, 8),
        ("SIGABRT", SIGABRT, 6),
        ("SIGBUS", OTHER, 7),
    ] {
        let o = signalled(signal);
        assert_eq!(
            (o.status, o.exit_signal),
            (status, Some(number)),
            "{signal}"
        );
        assert_eq!(o.message, Some(format!("Caught fatal signal {number}")));
    }
    let mut exit3 = stage(Status::RuntimeError, "");
    exit3.exit_code = Some(3);
    let nzec = from_execute(&execute(Status::RuntimeError, None, Some(exit3)), false);
    assert_eq!((nzec.status, nzec.exit_code), (NZEC, Some(3)));

    let tle = from_execute(
        &execute(Status::Timeout, None, Some(stage(Status::Timeout, ""))),
        false,
    );
    assert_eq!(tle.status, TIME_LIMIT);
    let mle = from_execute(
        &execute(
            Status::MemoryLimit,
            None,
            Some(stage(Status::MemoryLimit, "")),
        ),
        false,
    );
    assert_eq!((mle.status, mle.exit_signal), (OTHER, Some(9)));
    assert_eq!(mle.message.as_deref(), Some("Memory limit exceeded"));

    let mut compiler = stage(Status::RuntimeError, "");
    compiler.stderr = "main.cpp:1: error: x\n".into();
    let ce = from_execute(&execute(Status::CompileError, Some(compiler), None), false);
    assert_eq!(ce.status, COMPILATION_ERROR);
    assert_eq!(ce.compile_output.as_deref(), Some("main.cpp:1: error: x\n"));
    assert_eq!((ce.time, ce.memory, ce.stdout), (None, None, None));
    let slow = from_execute(
        &execute(Status::CompileError, Some(stage(Status::Timeout, "")), None),
        false,
    );
    assert_eq!(
        slow.compile_output.as_deref(),
        Some("Compilation time limit exceeded.")
    );

    let mut noisy = stage(Status::Ok, "out\n");
    noisy.stderr = "err\n".into();
    let merged = from_execute(&execute(Status::Ok, None, Some(noisy)), true);
    assert_eq!(
        (merged.stdout.as_deref(), merged.stderr),
        (Some("out\nerr\n"), None)
    );
}

fn judge(verdicts: &[(Verdict, Option<StageResult>)]) -> JudgeResponse {
    let tests: Vec<TestResult> = verdicts
        .iter()
        .map(|(verdict, run)| TestResult {
            verdict: *verdict,
            run: run.clone(),
            message: None,
        })
        .collect();
    let (verdict, first_failure) = JudgeResponse::overall(&tests);
    JudgeResponse {
        id: "jd_1".into(),
        language: LanguageRef {
            name: "python".into(),
            version: "3.11.2".into(),
        },
        verdict,
        first_failure,
        compile: None,
        cached: false,
        checker: "lines".into(),
        tests,
        node: "n1".into(),
        timing: Timing::default(),
        attempts: None,
        request_id: None,
    }
}

#[test]
fn judged_runs_give_accepted_or_wrong_answer_and_average_their_times() {
    let ok = |ms| StageResult {
        cpu_time_ms: ms,
        ..stage(Status::Ok, "1\n")
    };
    let answer = judge(&[
        (Verdict::Accepted, Some(ok(10))),
        (Verdict::Accepted, Some(ok(20))),
    ]);
    let o = from_judge(&answer, true, false);
    assert_eq!((o.status, o.time.as_deref()), (ACCEPTED, Some("0.015")));

    let answer = judge(&[
        (Verdict::Accepted, Some(ok(10))),
        (Verdict::WrongAnswer, Some(ok(30))),
        (Verdict::Skipped, None),
    ]);
    let o = from_judge(&answer, true, false);
    assert_eq!((o.status, o.time.as_deref()), (WRONG_ANSWER, Some("0.020")));
    // Without an expected output, a run that completed is accepted whatever it printed.
    assert_eq!(from_judge(&answer, false, false).status, ACCEPTED);
}

#[test]
fn stored_submissions_tell_where_they_are() {
    let stored = |status: SubmissionStatus| Submission {
        token: "sb_00.n1".into(),
        kind: "execute".into(),
        status,
        created_at_ms: 0,
        started_at_ms: None,
        finished_at_ms: None,
        result: None,
        error: None,
    };
    let facts = TokenFacts {
        language_id: 71,
        expected: false,
        redirect: false,
    };
    assert_eq!(
        submission_status(&stored(SubmissionStatus::Queued), facts),
        IN_QUEUE
    );
    assert_eq!(
        submission_status(&stored(SubmissionStatus::Running), facts),
        PROCESSING
    );
    assert_eq!(
        submission_status(&stored(SubmissionStatus::Failed), facts),
        INTERNAL_ERROR
    );
    let mut done = stored(SubmissionStatus::Done);
    done.result = Some(SubmissionResult::Execute(Box::new(execute(
        Status::Ok,
        None,
        Some(stage(Status::Ok, "x")),
    ))));
    assert_eq!(submission_status(&done, facts), ACCEPTED);
}

fn submission_status(submission: &Submission, facts: TokenFacts) -> u8 {
    let (status, outcome) = stored(submission, facts);
    outcome.map_or(status, |o| o.status)
}

#[test]
fn tokens_carry_what_the_answer_needs() {
    let facts = TokenFacts {
        language_id: 105,
        expected: true,
        redirect: false,
    };
    let t = token("sb_0123abcd.node-a", facts);
    assert_eq!(t, "sb_0123abcd.node-a.105e");
    assert_eq!(parse_token(&t), Some(("sb_0123abcd.node-a", facts)));
    let both = TokenFacts {
        language_id: 71,
        expected: true,
        redirect: true,
    };
    assert_eq!(parse_token(&token("sb_1.n", both)), Some(("sb_1.n", both)));
    for bad in ["", "sb_1", "sb_1.n", "sb_1.n.x71", "sb_1.n.71q", "sb_1.n."] {
        assert_eq!(parse_token(bad), None, "{bad:?}");
    }
}

#[test]
fn times_are_written_as_rails_writes_them() {
    assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
    assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
    assert_eq!(timestamp(951_782_400_000), "2000-02-29T00:00:00.000Z");
}

#[test]
fn records_select_fields_and_encode_text() {
    let c = checked(json!({"source_code": "print(1)", "language_id": 71}));
    let outcome = from_execute(
        &execute(Status::Ok, None, Some(stage(Status::Ok, "1\n"))),
        false,
    );
    let r = record(Facts {
        token: Some("t".into()),
        language: Some(&python()),
        language_id: 71,
        echo: Some(&c.echo),
        status: outcome.status,
        outcome: Some(outcome),
        created_at_ms: Some(0),
        finished_at_ms: Some(1),
    });
    let all = r.select(&ALL_FIELDS, true);
    let keys: Vec<&String> = all.as_object().unwrap().keys().collect();
    assert_eq!(keys.len(), ALL_FIELDS.len());
    assert_eq!(all["stdout"], encode(b"1\n"));
    assert_eq!(all["source_code"], encode(b"print(1)"));
    assert_eq!(all["status"], json!({"id": 3, "description": "Accepted"}));
    assert_eq!(
        all["language"],
        json!({"id": 71, "name": "Python (3.11.2)"})
    );
    assert_eq!(all["time"], "0.012");
    assert_eq!(all["created_at"], "1970-01-01T00:00:00.000Z");
    let plain = r.select(&DEFAULT_FIELDS, false);
    assert_eq!(plain["stdout"], "1\n");
    assert_eq!(plain.as_object().unwrap().len(), DEFAULT_FIELDS.len());
}
