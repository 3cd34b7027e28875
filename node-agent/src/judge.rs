//! Judge mode (`POST /v1/judge`): one program compiled once in one sandbox, then run once per
//! test in that sandbox, each run's output judged by the request's checker.
//!
//! Between two runs nothing is left over: after the compile the supervisor freezes the work dir
//! (`Command::Freeze`: the program's files become root's, read-only to the job user, who may
//! still add files beside them), and after every run it restores the sandbox to that state
//! (`Command::Restore`: every process killed, everything the job user made removed, `/tmp`,
//! `/dev/shm`, `/dev/mqueue` and System V IPC emptied, all of it checked). A sandbox that fails
//! a restore is discarded and the program compiled again in another for the tests left.
//!
//! A `program` checker is a second program, compiled once in a sandbox of its own from the
//! pools, frozen and restored the same way, run for each test that ran to completion.
//!
//! A program the node compiled before (by a judge or an execute) comes from the compile cache
//! (`compile_cache`): its kept files are written instead of its sources, nothing is compiled,
//! and the freeze is the same.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use tokio::sync::mpsc;

use codefleet_shared::judge::{
    check_judge, test_limits, Checker, JudgeEvent, JudgeRequest, JudgeResponse, TestResult,
    Verdict, CHECKER_FILES, MAX_MESSAGE_BYTES,
};
use codefleet_shared::sandbox::{Job, SandboxFile};
use codefleet_shared::{
    ExecuteRequest, LanguageRef, Problem, ResolvedLimits, StageResult, Status, Timing,
};

use crate::agent::Agent;
use crate::compile_cache as cache;
use crate::config::Config;
use crate::error::AgentError;
use crate::job::{job_deadline, new_id, Prepared};
use crate::pool::{InUse, PoolKey};
use crate::runner::Ticket;
use crate::sandbox::{Sandbox, SandboxError};
use crate::sandboxes::Sandboxes;
use crate::slots::Slot;

/// Dead pooled sandboxes one load may meet before it gives up.
const MAX_DEAD: u32 = 4;

/// A validated judge request; nothing runs for a rejected one.
pub struct PreparedJudge {
    pub program: Prepared,
    pub tests: Vec<PreparedTest>,
    pub checker: Checker,
    /// The `program` checker, validated like any job (its arguments the test's file names).
    pub checker_program: Option<Prepared>,
    pub stop_on_first_failure: bool,
}

pub struct PreparedTest {
    pub stdin: String,
    pub expected: String,
    pub limits: ResolvedLimits,
}

impl Agent {
    /// Validates a judge request completely: the tests and checker (`check_judge`), the program
    /// as `/v1/execute` would, each test's limits within the maxima, the checker program.
    pub fn prepare_judge(&self, req: &JudgeRequest) -> Result<PreparedJudge, Problem> {
        check_judge(req)?;
        let program = self.prepare(&req.program)?;
        let max = self.config().max_limits();
        let tests = req
            .tests
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, t)| {
                Ok(PreparedTest {
                    stdin: t.stdin.clone(),
                    expected: t.expected.clone(),
                    limits: test_limits(i, &program.limits, t.limits.as_ref(), &max)?,
                })
            })
            .collect::<Result<Vec<_>, Problem>>()?;
        let checker = req.checker.clone().unwrap_or_default();
        let checker_program = match &checker {
            Checker::Program { program } => {
                let req = ExecuteRequest {
                    args: Some(CHECKER_FILES.iter().map(|f| f.to_string()).collect()),
                    ..(**program).clone()
                };
                Some(self.prepare(&req).map_err(|mut p| {
                    p.detail = format!("checker: {}", p.detail);
                    p
                })?)
            }
            _ => None,
        };
        Ok(PreparedJudge {
            program,
            tests,
            checker,
            checker_program,
            stop_on_first_failure: req.stop_on_first_failure,
        })
    }

    /// Judges a validated request holding `slot`; with `events`, each step is sent as it ends
    /// (a client that takes none for the stall time stops the judge: the tests left are not
    /// run). An error means nothing was answered.
    pub async fn judge(
        &self,
        slot: Slot,
        judge: &PreparedJudge,
        ticket: &Ticket,
        events: Option<&mpsc::Sender<JudgeEvent>>,
    ) -> Result<JudgeResponse, AgentError> {
        let config = self.config();
        let stall = Duration::from_millis(config.stream_stall_ms);
        let mut gone = false;
        let emit = |event: JudgeEvent| {
            let events = events.cloned();
            async move {
                match events {
                    Some(tx) => matches!(
                        tokio::time::timeout(stall, tx.send(event)).await,
                        Ok(Ok(()))
                    ),
                    None => true,
                }
            }
        };
        let id = new_id("jd");
        let p = &judge.program;
        let language = LanguageRef {
            name: p.language.name.clone(),
            version: p.version.clone(),
        };
        gone |= !emit(JudgeEvent::Accepted {
            id: id.clone(),
            node: self.node().to_string(),
            language: language.clone(),
            queued_ms: ticket.queued.as_millis() as u64,
            request_id: ticket.request_id.clone(),
        })
        .await;
        let mut program = Loaded::new(self.sandboxes(), config, p);
        let mut checker = judge
            .checker_program
            .as_ref()
            .map(|c| (Loaded::new(self.sandboxes(), config, c), None));
        let skipped = |why: Option<&str>| TestResult {
            verdict: Verdict::Skipped,
            run: None,
            message: why.map(str::to_string),
        };
        let mut tests = Vec::with_capacity(judge.tests.len());
        let loaded = program.load().await;
        let cached = program.cached;
        let (compile, failed) = match loaded {
            Ok(Compiled::Ok(compile)) => (compile, None),
            Ok(Compiled::Failed(compile)) => (Some(compile), Some(Verdict::CompileError)),
            Err(failure) => {
                let (verdict, why) = failure.verdict();
                (Some(failed_stage(verdict, &why)), Some(verdict))
            }
        };
        if let Some(compile) = &compile {
            gone |= !emit(JudgeEvent::Compile {
                result: compile.clone(),
            })
            .await;
        }
        let mut stop = failed.is_some();
        for (index, test) in judge.tests.iter().enumerate() {
            let result = if stop || gone {
                skipped(failed.map(|_| "the program did not compile"))
            } else {
                let run = program.run(&[], &test.stdin, &test.limits).await;
                self.judge_run(run, test, judge, &mut checker).await
            };
            metrics::counter!("codefleet_judge_tests_total", "verdict" => verdict_name(result.verdict))
                .increment(1);
            stop |= judge.stop_on_first_failure && result.verdict != Verdict::Accepted;
            if !gone {
                let event = JudgeEvent::Test {
                    index,
                    result: result.clone(),
                };
                gone |= !emit(event).await;
            }
            tests.push(result);
        }
        drop(slot);
        program.finish();
        if let Some((checker, _)) = checker {
            checker.finish();
        }
        let (verdict, first_failure) = match failed {
            Some(verdict) => (verdict, None),
            None => JudgeResponse::overall(&tests),
        };
        Ok(JudgeResponse {
            id,
            language,
            verdict,
            first_failure,
            compile,
            cached,
            checker: judge.checker.name().to_string(),
            tests,
            node: self.node().to_string(),
            timing: Timing {
                queued_ms: ticket.queued.as_millis() as u64,
                total_ms: ticket.received.elapsed().as_millis() as u64,
            },
            attempts: None,
            request_id: ticket.request_id.clone(),
        })
    }

    /// A test's result from its run: the run's own verdict when it did not end normally, else
    /// the checker's.
    async fn judge_run(
        &self,
        run: Result<StageResult, Failure>,
        test: &PreparedTest,
        judge: &PreparedJudge,
        checker: &mut Option<(Loaded<'_>, Option<String>)>,
    ) -> TestResult {
        let run = match run {
            Ok(run) => run,
            Err(failure) => {
                let (verdict, why) = failure.verdict();
                return TestResult {
                    verdict,
                    run: None,
                    message: Some(why),
                };
            }
        };
        if let Some(verdict) = Verdict::of_run(run.status) {
            return TestResult {
                verdict,
                run: Some(run),
                message: None,
            };
        }
        let (verdict, message) = match (judge.checker.accepts(&test.expected, &run.stdout), checker)
        {
            (Some(true), _) => (Verdict::Accepted, None),
            (Some(false), _) => (Verdict::WrongAnswer, None),
            (None, Some((program, broken))) => check_with(program, broken, test, &run).await,
            (None, None) => (
                Verdict::InternalError,
                Some("no checker program".to_string()),
            ),
        };
        TestResult {
            verdict,
            run: Some(run),
            message,
        }
    }
}

/// Runs the checker program on one test's output: exit 0 accepts, exit 1 is a wrong answer,
/// anything else (and a checker that does not compile) is `internal_error` with why.
async fn check_with(
    checker: &mut Loaded<'_>,
    broken: &mut Option<String>,
    test: &PreparedTest,
    run: &StageResult,
) -> (Verdict, Option<String>) {
    if broken.is_none() && !checker.loaded() {
        *broken = match checker.load().await {
            Ok(Compiled::Ok(_)) => None,
            Ok(Compiled::Failed(c)) => {
                Some(format!("the checker did not compile: {}", clip(&c.stderr)))
            }
            Err(failure) => Some(format!(
                "the checker could not run: {}",
                failure.verdict().1
            )),
        };
    }
    if let Some(why) = broken {
        return (Verdict::InternalError, Some(why.clone()));
    }
    let files = [&test.stdin, &test.expected, &run.stdout]
        .iter()
        .zip(CHECKER_FILES)
        .map(|(content, name)| SandboxFile {
            name: name.to_string(),
            content_b64: base64::engine::general_purpose::STANDARD.encode(content.as_bytes()),
            executable: false,
        })
        .collect::<Vec<_>>();
    let limits = checker.prepared.limits;
    match checker.run(&files, "", &limits).await {
        Ok(r) if r.status == Status::Ok => (Verdict::Accepted, message(&r.stdout)),
        Ok(r) if r.status == Status::RuntimeError && r.exit_code == Some(1) => {
            (Verdict::WrongAnswer, message(&r.stdout))
        }
        Ok(r) => {
            let how = match (r.exit_code, &r.signal) {
                (_, Some(signal)) => format!("was killed by {signal}"),
                (Some(code), None) => format!("exited with {code}"),
                (None, None) => "ended".to_string(),
            };
            let why = format!(
                "the checker failed ({}): it {how}; stderr: {}",
                r.status.as_str(),
                clip(&r.stderr)
            );
            (Verdict::InternalError, Some(why))
        }
        Err(failure) => (
            Verdict::InternalError,
            Some(format!(
                "the checker could not run: {}",
                failure.verdict().1
            )),
        ),
    }
}

/// A checker's stdout as a test's message: none when empty, at most `MAX_MESSAGE_BYTES`.
fn message(stdout: &str) -> Option<String> {
    let text = clip(stdout);
    (!text.is_empty()).then_some(text)
}

fn clip(text: &str) -> String {
    let mut end = text.len().min(MAX_MESSAGE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].trim_end().to_string()
}

fn verdict_name(v: Verdict) -> &'static str {
    match v {
        Verdict::Accepted => "accepted",
        Verdict::WrongAnswer => "wrong_answer",
        Verdict::TimeLimit => "time_limit",
        Verdict::MemoryLimit => "memory_limit",
        Verdict::OutputLimit => "output_limit",
        Verdict::RuntimeError => "runtime_error",
        Verdict::Skipped => "skipped",
        Verdict::InternalError => "internal_error",
        Verdict::CompileError => "compile_error",
    }
}

/// A stage that stands for a sandbox failure (as the compile stage of a judge whose program
/// never got a working sandbox).
fn failed_stage(verdict: Verdict, why: &str) -> StageResult {
    StageResult {
        status: match verdict {
            Verdict::MemoryLimit => Status::MemoryLimit,
            _ => Status::InternalError,
        },
        exit_code: None,
        signal: None,
        stdout: String::new(),
        stderr: format!("codefleet: {why}\n"),
        stdout_truncated: false,
        stderr_truncated: false,
        wall_time_ms: 0,
        cpu_time_ms: 0,
        memory_bytes: 0,
    }
}

/// How a program's load ended when it had a sandbox that worked.
enum Compiled {
    /// Ready to run; the compile stage when the language compiles.
    Ok(Option<StageResult>),
    /// The compile stage failed (or the files could not be written).
    Failed(StageResult),
}

/// Why a run (or load) has no outcome: the sandbox failed under it.
enum Failure {
    /// The engine killed the sandbox for memory: the job's own memory use (its processes and
    /// files) brought it down.
    Memory,
    /// The node failed.
    Internal(String),
}

impl Failure {
    fn verdict(&self) -> (Verdict, String) {
        match self {
            Failure::Memory => (
                Verdict::MemoryLimit,
                "the job's memory use (its processes and the files it keeps) reached the \
                 sandbox's limit and the sandbox was stopped"
                    .to_string(),
            ),
            Failure::Internal(why) => {
                (Verdict::InternalError, format!("the sandbox failed: {why}"))
            }
        }
    }
}

/// A program compiled once in one sandbox and frozen there, run many times; the sandbox is
/// replaced (and the program compiled again) when it fails.
struct Loaded<'a> {
    sandboxes: &'a Arc<Sandboxes>,
    config: &'a Config,
    prepared: &'a Prepared,
    key: PoolKey,
    _in_use: InUse<'a>,
    sandbox: Option<Sandbox>,
    /// The sandbox's job count before the judge took it: a judge counts as one job.
    jobs_before: u32,
    /// The loaded program came from the compile cache.
    cached: bool,
}

impl<'a> Loaded<'a> {
    fn new(sandboxes: &'a Arc<Sandboxes>, config: &'a Config, prepared: &'a Prepared) -> Self {
        let key = sandboxes.key(&prepared.language, prepared.limits.memory_bytes);
        let in_use = sandboxes.begin(&key);
        Loaded {
            sandboxes,
            config,
            prepared,
            key,
            _in_use: in_use,
            sandbox: None,
            jobs_before: 0,
            cached: false,
        }
    }

    fn loaded(&self) -> bool {
        self.sandbox.is_some()
    }

    /// Writes the program's files and compiles it in a sandbox, then freezes it there.
    async fn load(&mut self) -> Result<Compiled, Failure> {
        let mut dead = 0;
        loop {
            let mut sandbox = acquire(self.sandboxes, &self.key, self.prepared.isolation).await?;
            self.jobs_before = sandbox.jobs_run;
            let mut job = self.prepared.job(sandbox.uid, self.config, false);
            job.outputs = None; // a judge answers with verdicts, not files
            job.stages.retain(|s| s.name == "compile");
            let cache = self.sandboxes.compile_cache();
            let cached = cache.lookup(self.prepared);
            match &cached {
                cache::Use::Off => {}
                cache::Use::Miss(_) => job.snapshot_max_bytes = cache.entry_limit(),
                // The program's files as its compile left them, and no compile.
                cache::Use::Hit(program) => {
                    job.files = program.files.clone();
                    job.stages.clear();
                }
            }
            let deadline = job_deadline(&self.prepared.limits);
            let stages = match sandbox.run(job, deadline, None).await {
                Err(SandboxError::Dead(why)) if dead < MAX_DEAD => {
                    dead += 1;
                    metrics::counter!("codefleet_sandboxes_dead_total").increment(1);
                    tracing::warn!(container = %sandbox.id, %why, "pooled sandbox was dead; judging on another");
                    continue;
                }
                Err(e) => return Err(failure(self.sandboxes, sandbox, e).await),
                Ok(stages) => stages,
            };
            let hit = match &cached {
                cache::Use::Hit(program) => Some(program.compile.clone()),
                _ => None,
            };
            if hit.is_none() {
                let language = self.key.language.clone();
                metrics::counter!("codefleet_judge_compiles_total", "language" => language.clone())
                    .increment(1);
                if stages.iter().any(|s| s.name == "compile") {
                    metrics::counter!("codefleet_compiles_total", "language" => language)
                        .increment(1);
                }
            }
            // A failed stage without a compile stage is the files' write (reported as `run`):
            // the work dir could not hold them.
            if let Some(failed) = stages.iter().find(|s| s.result.status != Status::Ok) {
                let result = failed.result.clone();
                self.sandbox = Some(sandbox);
                self.finish_sandbox();
                return Ok(Compiled::Failed(result));
            }
            if let Err(e) = sandbox.freeze().await {
                return Err(failure(self.sandboxes, sandbox, e).await);
            }
            let compile = stages.into_iter().find(|s| s.name == "compile");
            if let (cache::Use::Miss(key), Some(files), Some(c)) =
                (&cached, sandbox.snapshot.take(), &compile)
            {
                cache.insert(*key, files, c.result.clone());
            }
            self.sandbox = Some(sandbox);
            self.cached = hit.is_some();
            return Ok(Compiled::Ok(hit.or(compile.map(|s| s.result))));
        }
    }

    /// Runs the program once with `files` added, `stdin` and `limits`, then restores the
    /// sandbox to the frozen program. Loads it again first when its sandbox was lost.
    async fn run(
        &mut self,
        files: &[SandboxFile],
        stdin: &str,
        limits: &ResolvedLimits,
    ) -> Result<StageResult, Failure> {
        let mut dead = 0;
        loop {
            if self.sandbox.is_none() {
                if let Compiled::Failed(c) = self.load().await? {
                    let why = format!("the program no longer compiles: {}", clip(&c.stderr));
                    return Err(internal("judge_reload", why));
                }
            }
            let uid = self.sandbox.as_ref().expect("loaded above").uid;
            let job = self.run_job(uid, files, stdin, limits);
            let sandbox = self.sandbox.as_mut().expect("loaded above");
            match sandbox.run(job, job_deadline(limits), None).await {
                Ok(stages) => {
                    let Some(outcome) = stages.into_iter().last() else {
                        return Err(internal("sandbox_failed", "a run without a stage".into()));
                    };
                    if let Err(e) = sandbox.restore().await {
                        // The outcome stands; the tests left get a clean sandbox.
                        tracing::warn!(container = %sandbox.id, error = %e, "restore failed; discarding the sandbox");
                        metrics::counter!("codefleet_sandbox_reset_failures_total").increment(1);
                        self.sandbox = None;
                    }
                    return Ok(outcome.result);
                }
                Err(SandboxError::Dead(why)) if dead < MAX_DEAD => {
                    dead += 1;
                    tracing::warn!(%why, "a judge's sandbox was dead; loading the program again");
                    self.sandbox = None;
                }
                Err(e) => {
                    let sandbox = self.sandbox.take().expect("ran above");
                    return Err(failure(self.sandboxes, sandbox, e).await);
                }
            }
        }
    }

    /// The supervisor's job for one run: no files but `files` (the program's are frozen in
    /// the sandbox), the run stage alone with this run's stdin and limits.
    fn run_job(
        &self,
        uid: u32,
        files: &[SandboxFile],
        stdin: &str,
        limits: &ResolvedLimits,
    ) -> Job {
        let mut job = self.prepared.job(uid, self.config, false);
        job.outputs = None;
        job.files = files.to_vec();
        job.stages.retain(|s| s.name == "run");
        for stage in &mut job.stages {
            stage.stdin = stdin.to_string();
            stage.wall_time_ms = limits.wall_time_ms;
            stage.cpu_time_ms = limits.cpu_time_ms;
            stage.processes = limits.processes;
            stage.output_bytes = limits.output_bytes;
            stage.file_size_bytes = limits.file_size_bytes;
        }
        job
    }

    /// Hands the sandbox back to the pools (reset in the background).
    fn finish_sandbox(&mut self) {
        if let Some(mut sandbox) = self.sandbox.take() {
            sandbox.jobs_run = self.jobs_before + 1;
            self.sandboxes.recycle(self.key.clone(), sandbox);
        }
    }

    fn finish(mut self) {
        self.finish_sandbox();
    }
}

/// A sandbox from the pools, or a new one. (Free functions, not methods: a `Loaded` holds a
/// sandbox, which is not `Sync`, so no `&Loaded` may live across an await.)
async fn acquire(
    sandboxes: &Sandboxes,
    key: &PoolKey,
    isolation: codefleet_shared::Isolation,
) -> Result<Sandbox, Failure> {
    if let Some((sandbox, source)) = sandboxes.take(key, isolation).await {
        metrics::counter!("codefleet_sandbox_acquired_total", "language" => key.language.clone(), "source" => source.as_str())
            .increment(1);
        sandboxes.refill_soon();
        return Ok(sandbox);
    }
    sandboxes.refill_soon();
    sandboxes
        .start(key, "pool")
        .await
        .map_err(|e| internal("container_start", e.to_string()))
}

/// Why `sandbox` failed under a job; the sandbox is discarded.
async fn failure(sandboxes: &Sandboxes, sandbox: Sandbox, error: SandboxError) -> Failure {
    tracing::warn!(container = %sandbox.id, error = %error, "a judge's sandbox failed; discarding it");
    let oom = matches!(error, SandboxError::Lost | SandboxError::Dead(_))
        && sandboxes
            .docker()
            .oom_killed(&sandbox.id)
            .await
            .unwrap_or(false);
    drop(sandbox);
    if oom {
        metrics::counter!("codefleet_sandbox_oom_total").increment(1);
        return Failure::Memory;
    }
    internal(error.cause(), error.to_string())
}

/// The node's failure, counted by cause.
fn internal(cause: &'static str, why: String) -> Failure {
    metrics::counter!("codefleet_internal_errors_total", "cause" => cause).increment(1);
    Failure::Internal(why)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_clipped_on_a_character_boundary() {
        assert_eq!(message(""), None);
        assert_eq!(message("ok\n").as_deref(), Some("ok"));
        let long = "é".repeat(MAX_MESSAGE_BYTES);
        let clipped = clip(&long);
        assert!(clipped.len() <= MAX_MESSAGE_BYTES);
        assert!(clipped.chars().all(|c| c == 'é'));
    }

    #[test]
    fn verdict_names_are_the_wire_names() {
        for v in [
            Verdict::Accepted,
            Verdict::WrongAnswer,
            Verdict::TimeLimit,
            Verdict::MemoryLimit,
            Verdict::OutputLimit,
            Verdict::RuntimeError,
            Verdict::Skipped,
            Verdict::InternalError,
            Verdict::CompileError,
        ] {
            assert_eq!(
                serde_json::to_string(&v).unwrap(),
                format!("\"{}\"", verdict_name(v))
            );
        }
    }
}
