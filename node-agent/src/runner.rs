//! The one job path. A job that holds a slot gets a sandbox (a session's, or from the pools:
//! warm, fresh or cold, past pooled ones found dead), runs, and ends as an `ExecuteResponse`,
//! the buffered answer. A streamed job (`Stream`) also gives its progress as
//! `shared::stream::JobEvent`s while it runs — `accepted`, `stage_started`, `output`,
//! `stage_finished` — and takes stdin and signals; its last event is that same answer. The
//! buffered `/v1/execute`, a session's execute, the NDJSON stream and the WebSocket all run
//! here.
//!
//! A stream is bounded: a few events wait for the client at most, and a client that takes none
//! for `--stream-stall-ms` (or goes away) has its job killed; the result is still collected so
//! the sandbox can be reset.

use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::mpsc;

use codefleet_shared::sandbox::{Event, StageOutcome};
use codefleet_shared::stream::{JobEvent, OutputStream};
use codefleet_shared::{ExecuteResponse, LanguageRef, StageResult, Status, Timing};

use crate::compile_cache as cache;
use crate::config::Config;
use crate::error::AgentError;
use crate::job::{new_id, Prepared};
use crate::lifecycle::{docker_unreachable, Lifecycle};
use crate::pool::Source;
use crate::sandbox::{Control, Live, Ran, Sandbox, SandboxError};
use crate::sandboxes::Sandboxes;
use crate::sessions::{Session, Sessions};
use crate::slots::Slot;

/// Dead pooled sandboxes a job may meet before it is started on a new one.
const MAX_DEAD_PER_JOB: u32 = 4;
/// Supervisor events buffered between a sandbox and the stream's forwarder.
const SANDBOX_EVENTS: usize = 4;

/// Where a job runs.
pub enum Target {
    /// A pooled (or new) sandbox, reset after the job.
    Pool,
    /// The session's own sandbox, kept.
    Session(Arc<Session>),
}

/// When a job came and what it is called.
#[derive(Clone)]
pub struct Ticket {
    pub received: Instant,
    /// How long it waited for its slot.
    pub queued: Duration,
    /// The id the edge gave the request.
    pub request_id: Option<String>,
}

impl Ticket {
    /// A job that took its slot just now.
    pub fn new(received: Instant, request_id: Option<String>) -> Ticket {
        Ticket {
            received,
            queued: received.elapsed(),
            request_id,
        }
    }
}

/// The caller's ends of a streamed job.
pub struct Stream {
    /// Where the job's events go: bounded, so a slow client holds the job back, never memory.
    pub events: mpsc::Sender<JobEvent>,
    /// Stdin, EOF and signals for the job (none for an NDJSON stream).
    pub control: mpsc::Receiver<Control>,
    /// Set when the client took no event for the stall time: its job was killed.
    pub stalled: bool,
}

impl Stream {
    /// A stream of `capacity` events, and the ends the client side keeps.
    pub fn new(capacity: usize) -> (Stream, mpsc::Receiver<JobEvent>, mpsc::Sender<Control>) {
        let (events, events_rx) = mpsc::channel(capacity);
        let (control_tx, control) = mpsc::channel(capacity);
        let stream = Stream {
            events,
            control,
            stalled: false,
        };
        (stream, events_rx, control_tx)
    }
}

pub struct Runner {
    config: Arc<Config>,
    lifecycle: Arc<Lifecycle>,
    sandboxes: Arc<Sandboxes>,
    sessions: Arc<Sessions>,
}

/// What the `accepted` event and the answer say about where the job ran, and what it does
/// with the compile cache.
struct Placement<'a> {
    prepared: &'a Prepared,
    ticket: &'a Ticket,
    source: &'static str,
    cache: &'a cache::Use,
}

impl Runner {
    pub fn new(
        config: Arc<Config>,
        lifecycle: Arc<Lifecycle>,
        sandboxes: Arc<Sandboxes>,
        sessions: Arc<Sessions>,
    ) -> Runner {
        Runner {
            config,
            lifecycle,
            sandboxes,
            sessions,
        }
    }

    fn node(&self) -> &str {
        &self.config.node_id
    }

    fn stall(&self) -> Duration {
        Duration::from_millis(self.config.stream_stall_ms)
    }

    /// Runs a validated job that holds `slot` on `target`, streaming its events to `stream`
    /// when given, and returns the answer. An error means nothing was answered for the job.
    pub async fn run(
        &self,
        slot: Slot,
        prepared: &Prepared,
        target: Target,
        ticket: &Ticket,
        stream: Option<&mut Stream>,
    ) -> Result<ExecuteResponse, AgentError> {
        let response = match target {
            Target::Pool => self.run_pooled(slot, prepared, ticket, stream).await?,
            Target::Session(session) => {
                self.run_in_session(slot, prepared, &session, ticket, stream)
                    .await?
            }
        };
        record(&response, prepared);
        tracing::debug!(job = %response.id, status = response.status.as_str(), sandbox = response.sandbox.as_deref().unwrap_or("none"), "job answered");
        Ok(response)
    }

    /// Runs a streamed job to its end: its events, then its answer (or error) as the last one.
    /// Returns whether the client stalled or went away before the last event was taken.
    pub async fn run_streamed(
        &self,
        slot: Slot,
        prepared: Prepared,
        target: Target,
        ticket: Ticket,
        mut stream: Stream,
    ) -> bool {
        let last = match self
            .run(slot, &prepared, target, &ticket, Some(&mut stream))
            .await
        {
            Ok(response) => JobEvent::Result {
                result: Box::new(response),
            },
            Err(e) => JobEvent::Error { error: e.problem },
        };
        if stream.stalled {
            return true;
        }
        !matches!(
            tokio::time::timeout(self.stall(), stream.events.send(last)).await,
            Ok(Ok(()))
        )
    }

    async fn run_pooled(
        &self,
        slot: Slot,
        prepared: &Prepared,
        ticket: &Ticket,
        mut stream: Option<&mut Stream>,
    ) -> Result<ExecuteResponse, AgentError> {
        let key = self
            .sandboxes
            .key(&prepared.language, prepared.limits.memory_bytes);
        let in_use = self.sandboxes.begin(&key);
        // The compile cache serves buffered jobs: a stream's compile events are the compiler's.
        let cache = match stream {
            None if !prepared.interactive => self.sandboxes.compile_cache().lookup(prepared),
            _ => cache::Use::Off,
        };
        let mut dead = 0;
        let (outcome, mut sandbox, source, id) = loop {
            let (mut sandbox, source) = match self.sandboxes.take(&key, prepared.isolation).await {
                Some(found) => found,
                None => match self.sandboxes.start(&key, "pool").await {
                    Ok(sb) => (sb, Source::Cold),
                    Err(e) => {
                        tracing::error!(language = %key.language, error = %e, "starting a sandbox failed");
                        // An engine that went away: the job did not start, and the caller may
                        // send it elsewhere.
                        if self.sandboxes.docker().ping().await.is_err() {
                            self.lifecycle.set_docker_ok(false);
                            return Err(AgentError::unavailable(docker_unreachable(self.node())));
                        }
                        let (why, cause) = (e.to_string(), "container_start");
                        return Ok(self.internal_error(
                            new_id("ex"),
                            prepared,
                            ticket,
                            cause,
                            &why,
                        ));
                    }
                },
            };
            if source != Source::Warm {
                // The pool shrank: let the refiller start a replacement now, not at its next tick.
                self.sandboxes.refill_soon();
            }
            let place = Placement {
                prepared,
                ticket,
                source: source.as_str(),
                cache: &cache,
            };
            let (id, outcome) = self
                .attempt(&mut sandbox, &place, stream.as_deref_mut())
                .await;
            match outcome {
                // A pooled sandbox that died behind our back (its container removed, the
                // engine restarted): the job never reached it, so another sandbox runs it.
                Err(SandboxError::Dead(why)) if dead < MAX_DEAD_PER_JOB => {
                    dead += 1;
                    metrics::counter!("codefleet_sandboxes_dead_total").increment(1);
                    tracing::warn!(container = %sandbox.id, %why, "pooled sandbox was dead; running the job on another");
                    self.sandboxes.refill_soon();
                }
                outcome => break (outcome, sandbox, source, id),
            }
        };
        metrics::counter!("codefleet_sandbox_acquired_total", "language" => key.language.clone(), "source" => source.as_str())
            .increment(1);
        drop(slot);
        let response = match outcome {
            Ok(ran) => {
                if let (cache::Use::Miss(key), Some(files)) = (&cache, sandbox.snapshot.take()) {
                    let compiled = ran.stages.iter().find(|s| s.name == "compile");
                    if let Some(c) = compiled.filter(|c| c.result.status == Status::Ok) {
                        let compile = c.result.clone();
                        self.sandboxes.compile_cache().insert(*key, files, compile);
                    }
                }
                let place = Placement {
                    prepared,
                    ticket,
                    source: source.as_str(),
                    cache: &cache,
                };
                let response = self.respond(id, &place, ran);
                // Start the reset before releasing the key, so the refiller never sees the
                // sandbox as neither in use nor coming back.
                self.sandboxes.recycle(key.clone(), sandbox);
                response
            }
            Err(e) => self.sandbox_failed(sandbox, id, prepared, ticket, &e).await,
        };
        drop(in_use);
        Ok(response)
    }

    async fn run_in_session(
        &self,
        slot: Slot,
        prepared: &Prepared,
        session: &Session,
        ticket: &Ticket,
        stream: Option<&mut Stream>,
    ) -> Result<ExecuteResponse, AgentError> {
        let mut guard = session.sandbox.lock().await;
        let Some(sandbox) = guard.as_mut() else {
            return Err(Sessions::not_found(&session.id).into());
        };
        let place = Placement {
            prepared,
            ticket,
            source: "session",
            cache: &cache::Use::Off,
        };
        let (id, outcome) = self.attempt(sandbox, &place, stream).await;
        drop(slot);
        session.touch();
        Ok(match outcome {
            Ok(ran) => self.respond(id, &place, ran),
            Err(e) => {
                // The session's sandbox is gone; so is the session.
                let sandbox = guard.take().expect("checked above");
                self.sessions.remove(&session.id);
                self.sandbox_failed(sandbox, id, prepared, ticket, &e).await
            }
        })
    }

    /// Runs the job once in `sandbox`; streamed, its events are forwarded while it runs.
    async fn attempt(
        &self,
        sandbox: &mut Sandbox,
        place: &Placement<'_>,
        stream: Option<&mut Stream>,
    ) -> (String, Result<Ran, SandboxError>) {
        let prepared = place.prepared;
        let mut job = prepared.job(sandbox.uid, &self.config, stream.is_some());
        match place.cache {
            cache::Use::Off => {}
            cache::Use::Miss(_) => {
                job.snapshot_max_bytes = self.sandboxes.compile_cache().entry_limit();
            }
            // The program as its compile left it, instead of its sources and the compile.
            cache::Use::Hit(program) => {
                job.files = program.files.clone();
                job.stages.retain(|s| s.name != "compile");
            }
        }
        let id = job.id.clone();
        let within = prepared.deadline();
        let Some(stream) = stream else {
            return (id, sandbox.run_job(job, within, None).await);
        };
        let (events, from_sandbox) = mpsc::channel(SANDBOX_EVENTS);
        let live = Live {
            events,
            control: &mut stream.control,
        };
        let accepted = JobEvent::Accepted {
            id: id.clone(),
            node: self.node().to_string(),
            language: language_ref(prepared),
            queued_ms: place.ticket.queued.as_millis() as u64,
            sandbox: Some(place.source.to_string()),
            request_id: place.ticket.request_id.clone(),
        };
        let (outcome, delivered) = tokio::join!(
            sandbox.run_job(job, within, Some(live)),
            forward(from_sandbox, &stream.events, accepted, self.stall()),
        );
        if !delivered {
            tracing::info!(job = %id, "the client stopped taking the stream's events; its job was killed");
            stream.stalled = true;
        }
        (id, outcome)
    }

    /// Builds the answer from the stages that ran (and, for a program from the compile cache,
    /// its compile stage as it ran then) and the files collected after them.
    fn respond(&self, id: String, place: &Placement<'_>, ran: Ran) -> ExecuteResponse {
        let (p, ticket) = (place.prepared, place.ticket);
        let mut compile = None;
        let mut run = None;
        if let cache::Use::Hit(program) = place.cache {
            compile = Some(program.compile.clone());
        }
        for s in ran.stages {
            if let Some(ms) = s.kill_overshoot_ms {
                metrics::histogram!("codefleet_timeout_overshoot_seconds").record(ms / 1e3);
            }
            match s.name.as_str() {
                "compile" => compile = Some(s.result),
                _ => run = Some(s.result),
            }
        }
        let status = match (&compile, &run) {
            (Some(c), _) if c.status != Status::Ok => Status::CompileError,
            (_, Some(r)) => r.status,
            _ => Status::InternalError,
        };
        if status == Status::CompileError {
            run = None;
        }
        let mut response = self.answer(id, p, ticket, status, (compile, run));
        response.sandbox = Some(place.source.to_string());
        if place.cache.is_hit() {
            response.cached = Some(true);
        }
        if p.outputs.is_some() {
            let collected = ran.outputs.unwrap_or_default();
            response.files = Some(collected.files);
            response.files_skipped = collected.skipped;
        }
        response
    }

    fn answer(
        &self,
        id: String,
        p: &Prepared,
        ticket: &Ticket,
        status: Status,
        (compile, run): (Option<StageResult>, Option<StageResult>),
    ) -> ExecuteResponse {
        ExecuteResponse {
            id,
            language: language_ref(p),
            status,
            compile,
            run,
            node: self.node().to_string(),
            cached: p.language.compile.is_some().then_some(false),
            timing: Timing {
                queued_ms: ticket.queued.as_millis() as u64,
                total_ms: ticket.received.elapsed().as_millis() as u64,
            },
            sandbox: None,
            attempts: None,
            request_id: ticket.request_id.clone(),
            files: None,
            files_skipped: Vec::new(),
        }
    }

    /// The answer for a job the node failed (never the program's doing); counted by cause.
    fn internal_error(
        &self,
        id: String,
        p: &Prepared,
        ticket: &Ticket,
        cause: &'static str,
        why: &str,
    ) -> ExecuteResponse {
        metrics::counter!("codefleet_internal_errors_total", "cause" => cause).increment(1);
        let stderr = format!("codefleet: the sandbox failed: {why}\n");
        self.failed_answer(id, p, ticket, Status::InternalError, stderr)
    }

    /// An answer whose one stage is `status` with `stderr` saying why, and nothing else ran.
    fn failed_answer(
        &self,
        id: String,
        p: &Prepared,
        ticket: &Ticket,
        status: Status,
        stderr: String,
    ) -> ExecuteResponse {
        let failed = StageResult {
            status,
            exit_code: None,
            signal: None,
            stdout: String::new(),
            stderr,
            stdout_truncated: false,
            stderr_truncated: false,
            wall_time_ms: 0,
            cpu_time_ms: 0,
            memory_bytes: 0,
        };
        self.answer(id, p, ticket, status, (None, Some(failed)))
    }

    /// The answer for a job whose sandbox failed under it; the sandbox is discarded. When the
    /// engine says the container was killed for memory, the job's own memory use (its files,
    /// its processes) took the sandbox down: that is the job's `memory_limit`, not the node's
    /// failure.
    async fn sandbox_failed(
        &self,
        sandbox: Sandbox,
        id: String,
        prepared: &Prepared,
        ticket: &Ticket,
        error: &SandboxError,
    ) -> ExecuteResponse {
        tracing::warn!(container = %sandbox.id, error = %error, "sandbox failed; discarding it");
        let oom = matches!(error, SandboxError::Lost | SandboxError::Dead(_))
            && self
                .sandboxes
                .docker()
                .oom_killed(&sandbox.id)
                .await
                .unwrap_or(false);
        drop(sandbox);
        if oom {
            metrics::counter!("codefleet_sandbox_oom_total").increment(1);
            let why = "codefleet: the job's memory use (its processes and the files it keeps) \
                       reached the sandbox's limit and the sandbox was stopped\n";
            return self.failed_answer(id, prepared, ticket, Status::MemoryLimit, why.into());
        }
        self.internal_error(id, prepared, ticket, error.cause(), &error.to_string())
    }
}

fn language_ref(p: &Prepared) -> LanguageRef {
    LanguageRef {
        name: p.language.name.clone(),
        version: p.version.clone(),
    }
}

/// Passes a running job's supervisor events on to the client as `JobEvent`s, each within
/// `stall`. Returns false when the client stopped taking them (or went away): the receiver is
/// dropped on return, which has the sandbox kill the job.
async fn forward(
    mut from_sandbox: mpsc::Receiver<Event>,
    to_client: &mpsc::Sender<JobEvent>,
    accepted: JobEvent,
    stall: Duration,
) -> bool {
    let mut accepted = Some(accepted);
    let mut text = Text::default();
    loop {
        let event = tokio::select! {
            event = from_sandbox.recv() => match event {
                Some(event) => event,
                None => return true,
            },
            // A client that went away (a closed socket) is noticed at once, output or not.
            () = to_client.closed() => return false,
        };
        let events = match event {
            Event::Accepted { .. } => accepted.take().into_iter().collect(),
            Event::StageStarted { stage, .. } => {
                text = Text::default();
                vec![JobEvent::StageStarted { stage }]
            }
            Event::Output {
                stage,
                stream,
                offset,
                data_b64,
                ..
            } => {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(data_b64)
                    .unwrap_or_default();
                text.push(&stage, stream, offset, &bytes)
                    .into_iter()
                    .collect()
            }
            Event::StageFinished { outcome, .. } => {
                let mut events = text.flush(&outcome.name);
                events.push(stage_finished(outcome));
                events
            }
            _ => vec![],
        };
        for event in events {
            match tokio::time::timeout(stall, to_client.send(event)).await {
                Ok(Ok(())) => {}
                _ => return false,
            }
        }
    }
}

fn stage_finished(outcome: StageOutcome) -> JobEvent {
    let r = outcome.result;
    JobEvent::StageFinished {
        stage: outcome.name,
        status: r.status,
        exit_code: r.exit_code,
        signal: r.signal,
        stdout_truncated: r.stdout_truncated,
        stderr_truncated: r.stderr_truncated,
        wall_time_ms: r.wall_time_ms,
        cpu_time_ms: r.cpu_time_ms,
        memory_bytes: r.memory_bytes,
    }
}

/// A stage's output bytes made text chunk by chunk, as the buffered answer makes the whole of
/// it (invalid UTF-8 replaced): a character split between two chunks waits for its end, so the
/// chunks' texts joined are exactly the answer's text.
#[derive(Default)]
struct Text {
    /// Per stream (stdout, stderr): the start of an unfinished character, and its offset.
    held: [(Vec<u8>, u64); 2],
}

impl Text {
    fn push(
        &mut self,
        stage: &str,
        stream: OutputStream,
        offset: u64,
        bytes: &[u8],
    ) -> Option<JobEvent> {
        let (held, held_at) = &mut self.held[usize::from(stream == OutputStream::Stderr)];
        if held.is_empty() {
            *held_at = offset;
        }
        held.extend_from_slice(bytes);
        let whole = complete_prefix(held);
        if whole == 0 {
            return None;
        }
        let rest = held.split_off(whole);
        let data = String::from_utf8_lossy(held).into_owned();
        let event = JobEvent::Output {
            stage: stage.to_string(),
            stream,
            offset: *held_at,
            data,
        };
        *held_at += whole as u64;
        *held = rest;
        Some(event)
    }

    /// What is still held at the end of a stage, as it is (replaced where invalid).
    fn flush(&mut self, stage: &str) -> Vec<JobEvent> {
        let mut events = Vec::new();
        for (i, stream) in [OutputStream::Stdout, OutputStream::Stderr]
            .into_iter()
            .enumerate()
        {
            let (held, held_at) = std::mem::take(&mut self.held[i]);
            if !held.is_empty() {
                events.push(JobEvent::Output {
                    stage: stage.to_string(),
                    stream,
                    offset: held_at,
                    data: String::from_utf8_lossy(&held).into_owned(),
                });
            }
        }
        events
    }
}

/// How many leading bytes of `bytes` can be made text now: all but an unfinished (so far valid)
/// character at the end.
fn complete_prefix(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                // Invalid bytes are replaced where they are; go on after them.
                Some(n) => at += e.valid_up_to() + n,
                // The end is the start of a character still to come.
                None => return at + e.valid_up_to(),
            },
        }
    }
}

fn record(r: &ExecuteResponse, p: &Prepared) {
    let lang = p.language.name.clone();
    metrics::counter!("codefleet_executions_total", "language" => lang.clone(), "status" => r.status.as_str()).increment(1);
    // A compile stage from the cache did not run now.
    let compiled = r.compile.as_ref().filter(|_| r.cached != Some(true));
    if compiled.is_some() {
        metrics::counter!("codefleet_compiles_total", "language" => lang.clone()).increment(1);
    }
    for (stage, result) in [("compile", compiled), ("run", r.run.as_ref())] {
        if let Some(s) = result {
            metrics::histogram!("codefleet_execution_stage_seconds", "language" => lang.clone(), "stage" => stage)
                .record(s.wall_time_ms as f64 / 1e3);
        }
    }
    metrics::histogram!("codefleet_execution_duration_seconds", "language" => lang)
        .record(r.timing.total_ms as f64 / 1e3);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(events: &[JobEvent]) -> Vec<(u64, String)> {
        events
            .iter()
            .map(|e| match e {
                JobEvent::Output { offset, data, .. } => (*offset, data.clone()),
                other => panic!("not output: {other:?}"),
            })
            .collect()
    }

    /// However the bytes are split, the chunks' texts join to the buffered answer's text, and
    /// each offset is where its chunk starts in the stream.
    #[test]
    fn chunks_join_to_the_answers_text() {
        let bytes = "aé€😀b".as_bytes().to_vec();
        let mut with_invalid = bytes.clone();
        with_invalid.extend_from_slice(&[0xff, b'c', 0xe2, 0x82]); // invalid, then a cut-off end
        for input in [bytes, with_invalid] {
            let whole = String::from_utf8_lossy(&input).into_owned();
            for size in 1..=input.len() {
                let mut text = Text::default();
                let mut events = Vec::new();
                for (i, chunk) in input.chunks(size).enumerate() {
                    let offset = (i * size) as u64;
                    events.extend(text.push("run", OutputStream::Stdout, offset, chunk));
                }
                events.extend(text.flush("run"));
                let got = texts(&events);
                let joined: String = got.iter().map(|(_, t)| t.as_str()).collect();
                assert_eq!(joined, whole, "chunks of {size}");
                let mut at = 0;
                for (offset, _) in &got {
                    assert!(*offset >= at, "offsets go forward");
                    at = *offset;
                }
                assert_eq!(got[0].0, 0);
            }
        }
    }

    #[test]
    fn complete_prefixes() {
        let table: [(&[u8], usize); 6] = [
            (b"abc", 3),
            ("é".as_bytes(), 2),
            (&[b'a', 0xc3], 1),
            (&[0xe2, 0x82], 0),
            (&[0xff, b'a'], 2),
            (&[b'a', 0xff, 0xf0, 0x9f], 2),
        ];
        for (bytes, want) in table {
            assert_eq!(complete_prefix(bytes), want, "{bytes:?}");
        }
    }
}
