//! One sandbox container and the channel to its supervisor: start it, hand it jobs, reset it.
//! A `Sandbox` removes its container when dropped (through the reaper), so a cancelled request
//! or a panic leaves nothing behind.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use codefleet_shared::sandbox::{Command, Event, Job, StageOutcome, PROTOCOL_VERSION};

use crate::docker::{Docker, DockerError, SandboxSpec};

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Docker(#[from] DockerError),
    #[error("the sandbox's supervisor went away")]
    Lost,
    #[error("the sandbox did not answer within {0:?}")]
    Unresponsive(Duration),
    #[error("the sandbox could not run the job: {0}")]
    Failed(String),
    #[error("the sandbox speaks protocol {0}, this agent {PROTOCOL_VERSION}")]
    Protocol(u32),
    #[error("the sandbox could not be reset: {0}")]
    Reset(String),
}

/// Removes containers off the request path. Dropping a `Sandbox` queues its container here.
#[derive(Clone)]
pub struct Reaper {
    tx: mpsc::UnboundedSender<String>,
}

impl Reaper {
    /// Starts the reaper task; it ends when every `Reaper` clone is dropped and the queue is
    /// empty, so awaiting the handle waits for all pending removals.
    pub fn start(docker: Docker) -> (Reaper, tokio::task::JoinHandle<()>) {
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
    pub language: String,
    pub memory_bytes: u64,
    pub uid: u32,
    pub jobs_run: u32,
    pub created: Instant,
    input: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    events: mpsc::Receiver<Event>,
    reaper: Reaper,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.reaper.remove(std::mem::take(&mut self.id));
    }
}

impl Sandbox {
    /// Creates, attaches and starts a container, and waits for its supervisor's hello.
    pub async fn start(
        docker: &Docker,
        spec: &SandboxSpec,
        reaper: &Reaper,
    ) -> Result<Sandbox, SandboxError> {
        let id = docker.create_sandbox(spec).await?;
        metrics::counter!("codefleet_containers_created_total", "language" => spec.language.clone()).increment(1);
        // From here on the container is owned by the guard below, whatever happens.
        let (tx, events) = mpsc::channel(16);
        let mut sandbox = Sandbox {
            id,
            language: spec.language.clone(),
            memory_bytes: spec.memory_bytes,
            uid: job_uid(),
            jobs_run: 0,
            created: Instant::now(),
            input: Box::pin(tokio::io::sink()),
            events,
            reaper: reaper.clone(),
        };
        let attached = docker.attach(&sandbox.id).await?;
        sandbox.input = attached.input;
        tokio::spawn(read_events(attached.output, tx));
        docker.start(&sandbox.id).await?;
        match sandbox.next_event(Duration::from_secs(30)).await? {
            Event::Hello { version, .. } if version == PROTOCOL_VERSION => Ok(sandbox),
            Event::Hello { version, .. } => Err(SandboxError::Protocol(version)),
            other => Err(SandboxError::Failed(format!(
                "expected hello, got {other:?}"
            ))),
        }
    }

    async fn send(&mut self, command: &Command) -> Result<(), SandboxError> {
        let mut line = serde_json::to_vec(command).expect("commands always serialize");
        line.push(b'\n');
        let write = async {
            self.input.write_all(&line).await?;
            self.input.flush().await
        };
        match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(_)) => Err(SandboxError::Lost),
            Err(_) => Err(SandboxError::Unresponsive(Duration::from_secs(10))),
        }
    }

    async fn next_event(&mut self, within: Duration) -> Result<Event, SandboxError> {
        match tokio::time::timeout(within, self.events.recv()).await {
            Ok(Some(event)) => Ok(event),
            Ok(None) => Err(SandboxError::Lost),
            Err(_) => Err(SandboxError::Unresponsive(within)),
        }
    }

    /// Runs a job and waits for its outcome, at most `within`.
    pub async fn run(
        &mut self,
        job: Job,
        within: Duration,
    ) -> Result<Vec<StageOutcome>, SandboxError> {
        let id = job.id.clone();
        self.jobs_run += 1;
        self.send(&Command::Job(job)).await?;
        loop {
            match self.next_event(within).await? {
                Event::Result { id: got, stages } if got == id => return Ok(stages),
                Event::JobFailed { id: got, message } if got == id => {
                    return Err(SandboxError::Failed(message))
                }
                Event::ResetFailed { message } => return Err(SandboxError::Reset(message)),
                other => tracing::debug!(event = ?other, "ignoring stale sandbox event"),
            }
        }
    }

    /// Resets the sandbox for another job.
    pub async fn reset(&mut self) -> Result<(), SandboxError> {
        self.send(&Command::Reset).await?;
        match self.next_event(Duration::from_secs(10)).await? {
            Event::Ready => Ok(()),
            Event::ResetFailed { message } => Err(SandboxError::Reset(message)),
            other => Err(SandboxError::Reset(format!("unexpected answer {other:?}"))),
        }
    }
}

/// A random uid for a new sandbox's job user, so no two sandboxes share one: RLIMIT_NPROC then
/// counts exactly one job's processes, and a job can signal nothing outside its sandbox.
fn job_uid() -> u32 {
    rand::random_range(100_000..1_000_000_000)
}

/// Splits the container's stdout into lines and decodes each as an `Event`.
async fn read_events(
    mut output: std::pin::Pin<
        Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, DockerError>> + Send>,
    >,
    tx: mpsc::Sender<Event>,
) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(Ok(chunk)) = output.next().await {
        buf.extend_from_slice(&chunk);
        while let Some(pos) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            match serde_json::from_slice::<Event>(&line) {
                Ok(event) => {
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unreadable line from a supervisor"),
            }
        }
    }
}
