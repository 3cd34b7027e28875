//! One sandbox container and the channel to its supervisor: start it, hand it jobs, reset it.
//! A `Sandbox` removes its container when dropped (through the reaper), so a cancelled request
//! or a panic leaves nothing behind.

use std::time::{Duration, Instant};

use base64::Engine as _;
use futures_util::{FutureExt, StreamExt};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixListener;
use tokio::sync::mpsc;

use codefleet_shared::sandbox::{
    Collected, Command, Event, Job, SandboxFile, StageOutcome, CHANNEL_SOCKET, PROTOCOL_VERSION,
};

use crate::engine::{Engine, EngineError, Output, SandboxSpec};

/// What a caller sends a running job (an interactive or streaming one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Control {
    Stdin(Vec<u8>),
    CloseStdin,
    /// A signal number for every process of the running stage.
    Signal(i32),
}

/// A caller's two ends on a running job: the supervisor's `accepted`, `stage_started`, `output`
/// and `stage_finished` events as they come (a bounded channel: a caller that does not keep up
/// holds the job's output back; one that drops its receiver has the job killed, and `run` then
/// collects its result), and controls for the job (stdin, EOF, signals).
pub struct Live<'a> {
    pub events: mpsc::Sender<Event>,
    pub control: &'a mut mpsc::Receiver<Control>,
}

/// A job's outcome: its stages', and the files its `outputs` named (when it named any).
pub struct Ran {
    pub stages: Vec<StageOutcome>,
    pub outputs: Option<Collected>,
}

/// What `Sandbox::run` woke up for.
enum Step {
    Event(Result<Event, SandboxError>),
    Control(Option<Control>),
    CallerGone,
}

/// SIGKILL, sent to a job whose caller went away.
const SIGKILL: i32 = 9;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Docker(#[from] EngineError),
    #[error("the sandbox's supervisor went away")]
    Lost,
    /// The sandbox was found dead before the job reached it (its container removed or killed
    /// behind the agent's back, or the engine restarted): the job did not start, and another
    /// sandbox may run it.
    #[error("the sandbox was dead before the job started: {0}")]
    Dead(String),
    #[error("the sandbox did not answer within {0:?}")]
    Unresponsive(Duration),
    #[error("the sandbox could not run the job: {0}")]
    Failed(String),
    #[error("the sandbox speaks protocol {0}, this agent {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("the sandbox could not be reset: {0}")]
    Reset(String),
}

impl SandboxError {
    /// What failed, as the `cause` label of `codefleet_internal_errors_total`.
    pub fn cause(&self) -> &'static str {
        match self {
            SandboxError::Docker(_) => "docker",
            SandboxError::Lost => "supervisor_lost",
            SandboxError::Dead(_) => "sandbox_dead",
            SandboxError::Unresponsive(_) => "supervisor_unresponsive",
            SandboxError::Failed(_) => "sandbox_failed",
            SandboxError::Protocol(_) => "protocol",
            SandboxError::Reset(_) => "reset_failed",
        }
    }
}

/// Removes containers off the request path. Dropping a `Sandbox` queues its container here.
#[derive(Clone)]
pub struct Reaper {
    tx: mpsc::UnboundedSender<String>,
}

impl Reaper {
    /// Starts the reaper task; it ends when every `Reaper` clone is dropped and the queue is
    /// empty, so awaiting the handle waits for all pending removals.
    pub fn start(docker: std::sync::Arc<dyn Engine>) -> (Reaper, tokio::task::JoinHandle<()>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<String>();
        let handle = tokio::spawn(async move {
            while let Some(id) = rx.recv().await {
                match docker.remove(&id).await {
                    Ok(()) => metrics::counter!("codefleet_containers_removed_total").increment(1),
                    Err(e) => {
                        tracing::warn!(container = %id, error = %e, "removing container failed")
                    }
                }
            }
        });
        (Reaper { tx }, handle)
    }

    pub fn remove(&self, id: String) {
        if self.tx.send(id.clone()).is_err() {
            tracing::warn!(container = %id, "reaper stopped; container left for the next start");
        }
    }
}

pub struct Sandbox {
    pub id: String,
    pub uid: u32,
    pub jobs_run: u32,
    /// The work dir after the last job's compile stage, when that job asked for it (the
    /// compile cache takes it).
    pub snapshot: Option<Vec<SandboxFile>>,
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// Read by whoever waits for an event, in its own task: no hop through another task on
    /// the way from the supervisor's answer to the caller's response.
    output: Output,
    /// Bytes read but not yet decoded.
    lines: Lines,
    /// The longest line accepted from the supervisor.
    max_line: usize,
    /// What the supervisor still owes after a caller went away in the middle of a command (a
    /// cancelled request; a session's sandbox outlives it).
    owed: Owed,
    reaper: Reaper,
    /// The host directory of this sandbox's socket, removed with it.
    channel_dir: Option<PathBuf>,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.reaper.remove(std::mem::take(&mut self.id));
        if let Some(dir) = self.channel_dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A sandbox's socket: a fresh directory only root may enter (the job's user cannot reach it
/// from inside the sandbox), and a listener in it for the supervisor to connect to.
struct Channel {
    dir: PathBuf,
    listener: UnixListener,
}

impl Channel {
    /// `None` when the directory would not be root's (an agent not running as root): the
    /// supervisor, root without `DAC_OVERRIDE`, could not enter it; the attach stream serves.
    fn bind(root: &Path) -> std::io::Result<Option<Channel>> {
        std::fs::create_dir_all(root)?;
        let dir = root.join(format!("{:08x}", rand::random::<u32>()));
        std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        if std::fs::metadata(&dir)?.uid() != 0 {
            let _ = std::fs::remove_dir(&dir);
            return Ok(None);
        }
        match UnixListener::bind(dir.join(CHANNEL_SOCKET)) {
            Ok(listener) => Ok(Some(Channel { dir, listener })),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                Err(e)
            }
        }
    }
}

impl Sandbox {
    /// Creates and starts a container, connects to its supervisor (through a socket in a
    /// directory below `channel_root`, or the attach stream when that is `None`), and waits for
    /// the supervisor's hello.
    pub async fn start(
        docker: &dyn Engine,
        spec: &SandboxSpec,
        reaper: &Reaper,
        channel_root: Option<&Path>,
    ) -> Result<Sandbox, SandboxError> {
        let channel = match channel_root {
            Some(root) => Channel::bind(root)
                .map_err(|e| SandboxError::Failed(format!("binding the sandbox's socket: {e}")))?,
            None => None,
        };
        let mut spec = spec.clone();
        spec.channel = channel.as_ref().map(|c| c.dir.display().to_string());
        let created = docker.create_sandbox(&spec).await;
        let channel_dir = channel.as_ref().map(|c| c.dir.clone());
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                if let Some(dir) = channel_dir {
                    let _ = std::fs::remove_dir_all(dir);
                }
                return Err(e.into());
            }
        };
        metrics::counter!("codefleet_containers_created_total", "language" => spec.language.clone()).increment(1);
        // From here on the container and its socket are owned by the guard below.
        let mut sandbox = Sandbox {
            id,
            uid: job_uid(),
            jobs_run: 0,
            snapshot: None,
            input: Box::pin(tokio::io::sink()),
            output: Box::pin(futures_util::stream::empty()),
            lines: Lines::default(),
            max_line: spec.max_answer_bytes,
            owed: Owed::Nothing,
            reaper: reaper.clone(),
            channel_dir,
        };
        match channel {
            Some(channel) => {
                docker.start(&sandbox.id).await?;
                let wait = Duration::from_secs(30);
                let (stream, _) = tokio::time::timeout(wait, channel.listener.accept())
                    .await
                    .map_err(|_| SandboxError::Unresponsive(wait))?
                    .map_err(|e| SandboxError::Failed(format!("accepting the supervisor: {e}")))?;
                let (read, write) = stream.into_split();
                sandbox.input = Box::pin(write);
                sandbox.output = Box::pin(reader_stream(read).fuse());
            }
            None => {
                let attached = docker.attach(&sandbox.id).await?;
                sandbox.input = attached.input;
                sandbox.output = Box::pin(attached.output.fuse());
                docker.start(&sandbox.id).await?;
            }
        }
        match sandbox.next_event(Duration::from_secs(30)).await? {
            Event::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(sandbox),
            Event::Hello { version, .. } => Err(SandboxError::Protocol(version)),
            other => Err(SandboxError::Failed(format!(
                "expected hello, got {other:?}"
            ))),
        }
    }

    /// Whether the supervisor is still there, without waiting: an idle supervisor sends nothing,
    /// so a channel that has ended (or has bytes nobody asked for) means the container died or
    /// was removed behind the agent's back.
    pub fn alive(&mut self) -> bool {
        if !matches!(self.owed, Owed::Nothing) {
            return true; // busy with an abandoned command; `settle` judges it
        }
        match self.output.next().now_or_never() {
            None => true,
            Some(Some(Ok(chunk))) => {
                tracing::debug!(container = %self.id, bytes = chunk.len(), "unasked-for bytes from an idle supervisor");
                false
            }
            Some(_) => false,
        }
    }

    async fn send(&mut self, command: &Command) -> Result<(), SandboxError> {
        let mut line = serde_json::to_vec(command).expect("commands always serialize");
        line.push(b'\n');
        self.owed = Owed::PartialCommand;
        let write = async {
            self.input.write_all(&line).await?;
            self.input.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(())) => {
                self.owed = Owed::Nothing;
                Ok(())
            }
            Ok(Err(_)) => Err(SandboxError::Lost),
            Err(_) => Err(SandboxError::Unresponsive(Duration::from_secs(10))),
        }
    }

    async fn next_event(&mut self, within: Duration) -> Result<Event, SandboxError> {
        match tokio::time::timeout(within, self.read_event()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(SandboxError::Lost),
            Err(_) => Err(SandboxError::Unresponsive(within)),
        }
    }

    /// The next event, or `None` once the supervisor is gone. Cancel-safe: bytes already read
    /// stay in `lines`, and the stream keeps a read in progress.
    async fn read_event(&mut self) -> Option<Event> {
        loop {
            while let Some(line) = self.lines.next_line() {
                match serde_json::from_slice::<Event>(&line) {
                    Ok(event) => return Some(event),
                    Err(e) => tracing::warn!(error = %e, "unreadable line from a supervisor"),
                }
            }
            // No answer is this long (see `SandboxSpec::max_answer_bytes`): the channel is
            // broken; treat it as gone rather than buffer without end.
            if self.lines.pending.len() > self.max_line {
                tracing::error!(container = %self.id, bytes = self.lines.pending.len(), "a supervisor line without end; discarding the sandbox");
                return None;
            }
            match self.output.next().await {
                Some(Ok(chunk)) => self.lines.push(&chunk),
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Runs a job and waits for its stages' outcomes, at most `within` (see `run_job`).
    pub async fn run(
        &mut self,
        job: Job,
        within: Duration,
        live: Option<Live<'_>>,
    ) -> Result<Vec<StageOutcome>, SandboxError> {
        self.run_job(job, within, live).await.map(|ran| ran.stages)
    }

    /// Runs a job and waits for its outcome, at most `within`. With `live`, the job's progress
    /// events go to the caller as they come, and its controls to the job, until its result.
    pub async fn run_job(
        &mut self,
        job: Job,
        within: Duration,
        mut live: Option<Live<'_>>,
    ) -> Result<Ran, SandboxError> {
        self.settle().await?;
        if !self.alive() {
            return Err(SandboxError::Dead("its channel had ended".to_string()));
        }
        let id = job.id.clone();
        self.jobs_run += 1;
        self.snapshot = None;
        match self.send(&Command::Job(job)).await {
            Ok(()) => {}
            Err(SandboxError::Lost) => {
                return Err(SandboxError::Dead("the job could not be sent".to_string()))
            }
            Err(e) => return Err(e),
        }
        let by = Instant::now() + within;
        self.owed = Owed::Answer {
            job: Some(id.clone()),
            by,
        };
        let mut accepted = false;
        let mut controls_open = true;
        loop {
            let left = by.saturating_duration_since(Instant::now());
            let step = match live.as_mut() {
                Some(l) => tokio::select! {
                    biased;
                    event = self.next_event(left) => Step::Event(event),
                    control = l.control.recv(), if controls_open => Step::Control(control),
                    () = l.events.closed() => Step::CallerGone,
                },
                None => Step::Event(self.next_event(left).await),
            };
            // A channel that breaks under a control before the job was taken: not started.
            let not_started = |e: SandboxError| match e {
                SandboxError::Lost if !accepted => {
                    SandboxError::Dead("it went away before taking the job".to_string())
                }
                e => e,
            };
            let next = match step {
                Step::Event(event) => event,
                Step::Control(Some(control)) => {
                    self.control(&id, control).await.map_err(not_started)?;
                    continue;
                }
                Step::Control(None) => {
                    controls_open = false;
                    continue;
                }
                Step::CallerGone => {
                    // End the job; its result still comes.
                    live = None;
                    let kill = self.control(&id, Control::Signal(SIGKILL)).await;
                    kill.map_err(not_started)?;
                    continue;
                }
            };
            let event = match next {
                Ok(event) => event,
                // Gone before it said it took the job: the job did not start.
                Err(SandboxError::Lost) if !accepted => {
                    return Err(SandboxError::Dead(
                        "it went away before taking the job".to_string(),
                    ))
                }
                Err(e) => return Err(e),
            };
            match event {
                Event::Accepted { id: ref got }
                | Event::StageStarted { id: ref got, .. }
                | Event::Output { id: ref got, .. }
                | Event::StageFinished { id: ref got, .. }
                    if *got == id =>
                {
                    accepted = true;
                    let Some(l) = &live else { continue };
                    if l.events.send(event).await.is_err() {
                        live = None;
                        self.control(&id, Control::Signal(SIGKILL)).await?;
                    }
                }
                Event::Result {
                    id: got,
                    stages,
                    outputs,
                    snapshot,
                } if got == id => {
                    self.owed = Owed::Nothing;
                    self.snapshot = snapshot;
                    return Ok(Ran { stages, outputs });
                }
                Event::JobFailed { id: got, message } if got == id => {
                    self.owed = Owed::Nothing;
                    return Err(SandboxError::Failed(message));
                }
                Event::ResetFailed { message } => return Err(SandboxError::Reset(message)),
                other => tracing::debug!(event = ?other, "ignoring stale sandbox event"),
            }
        }
    }

    /// Sends a running job `id` a control, keeping what the supervisor owes.
    async fn control(&mut self, id: &str, control: Control) -> Result<(), SandboxError> {
        let id = id.to_string();
        let command = match control {
            Control::Stdin(data) => Command::Stdin {
                id,
                data_b64: base64::engine::general_purpose::STANDARD.encode(data),
            },
            Control::CloseStdin => Command::CloseStdin { id },
            Control::Signal(signal) => Command::Signal { id, signal },
        };
        let owed = std::mem::replace(&mut self.owed, Owed::Nothing);
        self.send(&command).await?;
        self.owed = owed;
        Ok(())
    }

    /// Resets the sandbox for another job.
    pub async fn reset(&mut self) -> Result<(), SandboxError> {
        self.make_ready(Command::Reset).await
    }

    /// Judging: makes the last job's work dir (the compiled program) root's and read-only to
    /// later runs (`Command::Freeze`).
    pub async fn freeze(&mut self) -> Result<(), SandboxError> {
        self.make_ready(Command::Freeze).await
    }

    /// Judging: back to the frozen program between two runs (`Command::Restore`).
    pub async fn restore(&mut self) -> Result<(), SandboxError> {
        self.make_ready(Command::Restore).await
    }

    /// Sends a command the supervisor answers with `Ready` or `ResetFailed`.
    async fn make_ready(&mut self, command: Command) -> Result<(), SandboxError> {
        self.settle().await?;
        self.send(&command).await?;
        self.owed = Owed::Answer {
            job: None,
            by: Instant::now() + RESET_WITHIN,
        };
        let answer = self.next_event(RESET_WITHIN).await?;
        self.owed = Owed::Nothing;
        match answer {
            Event::Ready => Ok(()),
            Event::ResetFailed { message } => Err(SandboxError::Reset(message)),
            other => Err(SandboxError::Reset(format!("unexpected answer {other:?}"))),
        }
    }

    /// Collects what an abandoned command still owes before the next one is sent. The
    /// supervisor answers one command at a time: until it has written that answer (which can be
    /// megabytes, more than a socket buffer holds) it reads nothing, so a new command sent
    /// before it is read could wait on a supervisor that waits on us.
    async fn settle(&mut self) -> Result<(), SandboxError> {
        match std::mem::replace(&mut self.owed, Owed::Nothing) {
            Owed::Nothing => Ok(()),
            Owed::PartialCommand => Err(SandboxError::Failed(
                "an earlier command was cut off while being sent".to_string(),
            )),
            Owed::Answer { job, by } => {
                let within = by.saturating_duration_since(Instant::now()) + SETTLE_MARGIN;
                let deadline = Instant::now() + within;
                loop {
                    let left = deadline.saturating_duration_since(Instant::now());
                    match (self.next_event(left).await?, &job) {
                        (Event::Result { id, .. } | Event::JobFailed { id, .. }, Some(want))
                            if &id == want =>
                        {
                            return Ok(())
                        }
                        (Event::Ready, None) => return Ok(()),
                        (Event::ResetFailed { message }, _) => {
                            return Err(SandboxError::Reset(message))
                        }
                        _ => {}
                    }
                }
            }
        }
    }
}

/// How long a supervisor may take to reset its sandbox.
const RESET_WITHIN: Duration = Duration::from_secs(10);
/// Slack, beyond an abandoned job's own deadline, for its answer to arrive.
const SETTLE_MARGIN: Duration = Duration::from_secs(2);

/// What a supervisor still owes this agent.
enum Owed {
    Nothing,
    /// A command was only partly written: the channel's framing is lost.
    PartialCommand,
    /// The answer to a job (`Some(id)`) or to a reset (`None`), due by `by`.
    Answer {
        job: Option<String>,
        by: Instant,
    },
}

/// Bytes of line buffer a sandbox keeps between answers.
const KEEP_BUFFER: usize = 64 * 1024;

/// Newline-terminated lines out of chunks that may split them anywhere. Each byte is searched
/// for a newline once, however many chunks a line of megabytes (a big result) arrives in.
#[derive(Default)]
struct Lines {
    pending: Vec<u8>,
    /// How many bytes at the start of `pending` are known to hold no newline.
    scanned: usize,
}

impl Lines {
    fn push(&mut self, chunk: &[u8]) {
        self.pending.extend_from_slice(chunk);
    }

    /// The next complete line, newline included.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        match self.pending[self.scanned..]
            .iter()
            .position(|&b| b == b'\n')
        {
            Some(i) => {
                let line = self.pending.drain(..=self.scanned + i).collect();
                self.scanned = 0;
                if self.pending.is_empty() {
                    // A big answer's buffer is not kept for the sandbox's whole life.
                    self.pending.shrink_to(KEEP_BUFFER);
                }
                Some(line)
            }
            None => {
                self.scanned = self.pending.len();
                None
            }
        }
    }
}

/// A random uid for a new sandbox's job user, so no two sandboxes share one: RLIMIT_NPROC then
/// counts exactly one job's processes, and a job can signal nothing outside its sandbox.
fn job_uid() -> u32 {
    rand::random_range(100_000..1_000_000_000)
}

/// The bytes of a socket's read half as a stream, ending at EOF or the first error.
fn reader_stream(
    read: tokio::net::unix::OwnedReadHalf,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, EngineError>> + Send {
    futures_util::stream::unfold(read, |mut read| async move {
        let mut buf = vec![0u8; 64 * 1024];
        match read.read(&mut buf).await {
            Ok(0) | Err(_) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(bytes::Bytes::from(buf)), read))
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sandbox around `output`, owning no container (the reaper is never started).
    fn on_output(chunks: Vec<&'static [u8]>, max_line: usize) -> Sandbox {
        let (tx, _) = mpsc::unbounded_channel();
        let items = chunks.into_iter().map(|c| Ok(bytes::Bytes::from_static(c)));
        Sandbox {
            id: "test".into(),
            uid: 1,
            jobs_run: 0,
            snapshot: None,
            input: Box::pin(tokio::io::sink()),
            output: Box::pin(futures_util::stream::iter(items).fuse()),
            lines: Lines::default(),
            max_line,
            owed: Owed::Nothing,
            reaper: Reaper { tx },
            channel_dir: None,
        }
    }

    /// A supervisor that sends a line without end is taken as gone once the line passes the
    /// cap, instead of growing the agent's buffer; lines within it are read.
    #[tokio::test]
    async fn a_line_without_end_is_cut_off_at_the_cap() {
        let mut sandbox = on_output(
            vec![b"{\"type\":\"pong\"}\n", &[b'x'; 4096], &[b'x'; 4096]],
            5000,
        );
        // The channel stays open after those bytes, as a misbehaving supervisor's would.
        let chunks =
            std::mem::replace(&mut sandbox.output, Box::pin(futures_util::stream::empty()));
        sandbox.output = Box::pin(chunks.chain(futures_util::stream::pending()));
        assert_eq!(sandbox.read_event().await, Some(Event::Pong));
        let cut = tokio::time::timeout(Duration::from_secs(5), sandbox.read_event()).await;
        assert_eq!(cut.ok(), Some(None), "cut off past 5000 bytes");
    }

    /// An idle sandbox whose channel ended is not alive; one whose channel is open is.
    #[tokio::test]
    async fn alive_tells_an_ended_channel() {
        let mut ended = on_output(vec![], 1 << 20);
        assert!(!ended.alive());
        let mut open = on_output(vec![], 1 << 20);
        open.output = Box::pin(futures_util::stream::pending());
        assert!(open.alive());
        let mut chatty = on_output(vec![b"{}\n"], 1 << 20);
        assert!(!chatty.alive(), "bytes nobody asked for");
    }

    /// Lines come out whole and in order wherever the chunks split them, several per chunk or
    /// one over many chunks.
    #[test]
    fn lines_survive_any_split() {
        let big = "x".repeat(300_000);
        let text = format!("{{\"a\":1}}\n{{\"b\":\"{big}\"}}\n\n{{\"c\":3}}\npartial");
        let want: Vec<String> = text.split_inclusive('\n').map(str::to_string).collect();
        for size in [1, 7, 4096, 65_536, text.len()] {
            let mut lines = Lines::default();
            let mut got = Vec::new();
            for chunk in text.as_bytes().chunks(size) {
                lines.push(chunk);
                while let Some(line) = lines.next_line() {
                    got.push(String::from_utf8(line).unwrap());
                }
            }
            assert_eq!(got, want[..want.len() - 1], "chunks of {size}");
            assert_eq!(lines.pending, b"partial", "the unfinished line stays");
        }
    }
}
