//! An in-process container engine for tests (compiled for this crate's unit tests and with the
//! `fake-engine` feature; never in the release binary). Containers are records; starting one
//! runs a fake supervisor as a task that connects to the sandbox's channel exactly as the real
//! one does (the unix socket in the directory the spec names, or the attach stream) and speaks
//! the real protocol of `codefleet_shared::sandbox`: `hello`, `accepted`, `result`,
//! `job_failed`, `ready`, `reset_failed`, `pong`, and for streaming jobs `stage_started` and
//! `output`, with `stdin`, `close_stdin` and `signal` during an interactive stage.
//!
//! A job's entry file (its first file) is a script, one command a line:
//!
//! | line | what the stage does |
//! |---|---|
//! | `print TEXT`, `eprint TEXT` | writes `TEXT` and a newline to stdout, stderr |
//! | `exit N` | ends with exit code N (`runtime_error` unless 0) |
//! | `sleep MS` | waits; past the stage's wall limit it is killed (`timeout`) |
//! | `read` | copies one line of stdin to stdout (waits for `stdin` in an interactive stage) |
//! | `write NAME TEXT`, `cat NAME` | a file in the sandbox's work dir, kept until reset |
//! | `compile-error TEXT` | the compile stage fails with `TEXT` on stderr |
//! | `fail TEXT` | the supervisor answers `job_failed` |
//! | `crash` | the container dies after accepting the job |
//! | `oom` | the container dies after accepting, with the engine's OOM record set |
//! | `taint` | the next reset of this sandbox fails |
//!
//! A job without files (the agent's version probe) prints `<argv[0]> <version>`. Tests also
//! script the engine: make it unreachable, fail creates, delay supervisors' hello, have the next
//! sandboxes that get a job die before accepting it, kill a container behind the
//! agent's back; give it images (labelled, of a size) and references a pull finds; and they
//! observe every create, remove, build, pull, image removal and delivered job. Images are kept
//! by tag, a tag naming one image id; an image's last tag cannot be removed while a container
//! made from it exists, as with Docker.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio_util::codec::{BytesCodec, FramedRead};

use codefleet_shared::sandbox::{
    Command, Event, Job, Stage, StageOutcome, CHANNEL_SOCKET, PROTOCOL_VERSION,
};
use codefleet_shared::stream::OutputStream;
use codefleet_shared::{StageResult, Status};

use super::{Attached, Engine, EngineError, ImageInfo, SandboxSpec};

/// The engine. Cheap to share: tests keep an `Arc<FakeEngine>` and hand the agent a clone as
/// `Arc<dyn Engine>`.
#[derive(Default)]
pub struct FakeEngine {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    unreachable: bool,
    /// Tag to image.
    images: HashMap<String, FakeImage>,
    /// References a pull finds.
    registry: HashMap<String, FakeImage>,
    next_image: u64,
    builds: Vec<String>,
    pulls: Vec<String>,
    images_removed: Vec<String>,
    containers: HashMap<String, Container>,
    created: Vec<Created>,
    removed: Vec<String>,
    jobs: Vec<Delivery>,
    faults: Faults,
    version: Option<String>,
}

#[derive(Default)]
struct Faults {
    fail_creates: u32,
    die_before_accept: u32,
    start_delay: Duration,
}

struct Container {
    spec: SandboxSpec,
    /// The supervisor's end of the attach stream, until the container starts.
    attached: Option<tokio::io::DuplexStream>,
    supervisor: Option<tokio::task::AbortHandle>,
    running: bool,
    oom_killed: bool,
}

#[derive(Debug, Clone)]
struct FakeImage {
    id: String,
    labels: BTreeMap<String, String>,
    size: u64,
}

/// A container as it was created.
#[derive(Debug, Clone)]
pub struct Created {
    pub id: String,
    pub spec: SandboxSpec,
}

/// A job a supervisor read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub container: String,
    pub job: String,
    /// Whether the supervisor acknowledged it (`accepted`) before anything else happened.
    pub accepted: bool,
}

/// A container that exists (created and not removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Present {
    pub id: String,
    pub kind: &'static str,
    pub language: String,
    /// Started and not dead.
    pub running: bool,
}

impl FakeEngine {
    pub fn new() -> Arc<FakeEngine> {
        Arc::new(FakeEngine::default())
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state()
    }

    /// Makes every call fail with `Unreachable` (or answer again).
    pub fn set_reachable(&self, reachable: bool) {
        self.state().unreachable = !reachable;
    }

    /// An image that is present without a build (no labels, 100 bytes).
    pub fn add_image(&self, tag: &str) {
        self.add_labelled_image(tag, BTreeMap::new(), 100);
    }

    /// An image that is present without a build, with labels and a size; returns its id.
    pub fn add_labelled_image(
        &self,
        tag: &str,
        labels: BTreeMap<String, String>,
        size: u64,
    ) -> String {
        let mut state = self.state();
        let image = state.new_image(labels, size);
        state.images.insert(tag.to_string(), image.clone());
        image.id
    }

    /// An image a pull of `reference` finds (in no registry but this engine's own).
    pub fn add_to_registry(&self, reference: &str, size: u64) {
        let mut state = self.state();
        let image = state.new_image(BTreeMap::new(), size);
        state.registry.insert(reference.to_string(), image);
    }

    /// The references pulled so far.
    pub fn pulls(&self) -> Vec<String> {
        self.state().pulls.clone()
    }

    /// The image tags removed so far, in order.
    pub fn images_removed(&self) -> Vec<String> {
        self.state().images_removed.clone()
    }

    /// The labels of the image tagged `tag`, when there is one.
    pub fn image_labels(&self, tag: &str) -> Option<BTreeMap<String, String>> {
        self.state().images.get(tag).map(|i| i.labels.clone())
    }

    /// The version the probe job reports (default `1.0.0`).
    pub fn set_version(&self, version: &str) {
        self.state().version = Some(version.to_string());
    }

    /// The next `n` creates fail with `Rejected` (status 500).
    pub fn fail_creates(&self, n: u32) {
        self.state().faults.fail_creates = n;
    }

    /// The next `n` sandboxes that read a job die before accepting it.
    pub fn die_before_accept(&self, n: u32) {
        self.state().faults.die_before_accept = n;
    }

    /// Supervisors started from now on wait this long before their hello.
    pub fn set_start_delay(&self, delay: Duration) {
        self.state().faults.start_delay = delay;
    }

    /// Kills a container behind the agent's back: its supervisor goes away, the container
    /// stays (stopped) until removed.
    pub fn kill(&self, id: &str) {
        let mut state = self.state();
        if let Some(c) = state.containers.get_mut(id) {
            c.stop();
        }
    }

    /// Every container created so far, in order.
    pub fn created(&self) -> Vec<Created> {
        self.state().created.clone()
    }

    /// Every container removed so far, in order.
    pub fn removed(&self) -> Vec<String> {
        self.state().removed.clone()
    }

    /// The containers that exist now.
    pub fn present(&self) -> Vec<Present> {
        let state = self.state();
        let mut present: Vec<Present> = state
            .containers
            .iter()
            .map(|(id, c)| Present {
                id: id.clone(),
                kind: c.spec.kind,
                language: c.spec.language.clone(),
                running: c.running,
            })
            .collect();
        present.sort_by(|a, b| a.id.cmp(&b.id));
        present
    }

    /// The tags built so far.
    pub fn builds(&self) -> Vec<String> {
        self.state().builds.clone()
    }

    /// Every job a supervisor read, in order.
    pub fn jobs(&self) -> Vec<Delivery> {
        self.state().jobs.clone()
    }

    fn reachable(&self, call: &'static str) -> Result<(), EngineError> {
        if self.state().unreachable {
            return Err(EngineError::Unreachable {
                call,
                message: "the fake engine was told to be away".to_string(),
            });
        }
        Ok(())
    }

    fn not_found(call: &'static str, id: &str) -> EngineError {
        EngineError::NotFound {
            call,
            message: format!("no such container: {id}"),
        }
    }

    async fn start_container(&self, id: &str) -> Result<(), EngineError> {
        self.reachable("start_container")?;
        let (spec, attached, delay) = {
            let mut state = self.state();
            let delay = state.faults.start_delay;
            let c = state
                .containers
                .get_mut(id)
                .ok_or_else(|| Self::not_found("start_container", id))?;
            if c.running {
                return Ok(());
            }
            c.running = true;
            (c.spec.clone(), c.attached.take(), delay)
        };
        let channel: Channel = match (&spec.channel, attached) {
            (Some(dir), _) => Channel::Socket(Path::new(dir).join(CHANNEL_SOCKET)),
            (None, Some(end)) => Channel::Attached(end),
            (None, None) => Channel::Nothing,
        };
        let supervisor = Supervisor {
            inner: self.inner.clone(),
            container: id.to_string(),
            files: HashMap::new(),
            frozen: None,
            tainted: false,
        };
        let task = tokio::spawn(supervisor.run(channel, delay));
        if let Some(c) = self.state().containers.get_mut(id) {
            c.supervisor = Some(task.abort_handle());
        } else {
            task.abort(); // removed meanwhile
        }
        Ok(())
    }
}

impl State {
    fn new_image(&mut self, labels: BTreeMap<String, String>, size: u64) -> FakeImage {
        self.next_image += 1;
        FakeImage {
            id: format!("sha256:fake{:06}", self.next_image),
            labels,
            size,
        }
    }

    /// The ids of the images a container was created from.
    fn used_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .containers
            .values()
            .filter_map(|c| self.images.get(&c.spec.image).map(|i| i.id.clone()))
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

impl Inner {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().expect("fake engine lock")
    }
}

impl Container {
    fn stop(&mut self) {
        self.running = false;
        self.attached = None;
        if let Some(task) = self.supervisor.take() {
            task.abort();
        }
    }
}

impl Engine for FakeEngine {
    fn ping(&self) -> BoxFuture<'_, Result<(), EngineError>> {
        async move { self.reachable("ping") }.boxed()
    }

    fn image_exists<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        async move {
            self.reachable("inspect_image")?;
            Ok(self.state().images.contains_key(tag))
        }
        .boxed()
    }

    fn pull<'a>(
        &'a self,
        reference: &'a str,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        async move {
            self.reachable("pull")?;
            let mut state = self.state();
            state.pulls.push(reference.to_string());
            let Some(image) = state.registry.get(reference).cloned() else {
                return Err(EngineError::ImageMissing {
                    image: reference.to_string(),
                    message: "not in the fake engine's registry".to_string(),
                });
            };
            progress("fake0001: Pull complete");
            progress(&format!("Digest: {}", image.id));
            state.images.insert(reference.to_string(), image);
            Ok(())
        }
        .boxed()
    }

    fn tag<'a>(
        &'a self,
        source: &'a str,
        target: &'a str,
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        async move {
            self.reachable("tag_image")?;
            let mut state = self.state();
            let image = state
                .images
                .get(source)
                .cloned()
                .ok_or_else(|| EngineError::NotFound {
                    call: "tag_image",
                    message: format!("no such image: {source}"),
                })?;
            state.images.insert(target.to_string(), image);
            Ok(())
        }
        .boxed()
    }

    fn build<'a>(
        &'a self,
        tag: &'a str,
        _context_tar: Vec<u8>,
        labels: &'a BTreeMap<String, String>,
        progress: &'a mut (dyn FnMut(&str) + Send),
    ) -> BoxFuture<'a, Result<(), EngineError>> {
        async move {
            self.reachable("build")?;
            progress("Step 1/1 : FROM scratch");
            let mut state = self.state();
            state.builds.push(tag.to_string());
            let image = state.new_image(labels.clone(), 1_000);
            state.images.insert(tag.to_string(), image);
            Ok(())
        }
        .boxed()
    }

    fn images(&self) -> BoxFuture<'_, Result<Vec<ImageInfo>, EngineError>> {
        async move {
            self.reachable("list_images")?;
            let state = self.state();
            let mut by_id: BTreeMap<String, ImageInfo> = BTreeMap::new();
            for (tag, image) in &state.images {
                by_id
                    .entry(image.id.clone())
                    .or_insert_with(|| ImageInfo {
                        id: image.id.clone(),
                        tags: vec![],
                        labels: image.labels.clone(),
                        size: image.size,
                    })
                    .tags
                    .push(tag.clone());
            }
            Ok(by_id
                .into_values()
                .map(|mut i| {
                    i.tags.sort();
                    i
                })
                .collect())
        }
        .boxed()
    }

    fn images_in_use(&self) -> BoxFuture<'_, Result<Vec<String>, EngineError>> {
        async move {
            self.reachable("list_containers")?;
            Ok(self.state().used_ids())
        }
        .boxed()
    }

    fn remove_image<'a>(&'a self, tag: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        async move {
            self.reachable("remove_image")?;
            let mut state = self.state();
            let image = state
                .images
                .get(tag)
                .cloned()
                .ok_or_else(|| EngineError::NotFound {
                    call: "remove_image",
                    message: format!("no such image: {tag}"),
                })?;
            let last_tag = state.images.values().filter(|i| i.id == image.id).count() == 1;
            if last_tag && state.used_ids().contains(&image.id) {
                return Err(EngineError::Conflict {
                    call: "remove_image",
                    message: format!("image {tag} is used by a container"),
                });
            }
            state.images.remove(tag);
            state.images_removed.push(tag.to_string());
            Ok(())
        }
        .boxed()
    }

    fn create_sandbox<'a>(
        &'a self,
        spec: &'a SandboxSpec,
    ) -> BoxFuture<'a, Result<String, EngineError>> {
        async move {
            self.reachable("create_container")?;
            let mut state = self.state();
            if state.faults.fail_creates > 0 {
                state.faults.fail_creates -= 1;
                return Err(EngineError::Rejected {
                    call: "create_container",
                    status: 500,
                    message: "the fake engine was told to refuse this create".to_string(),
                });
            }
            if !state.images.contains_key(&spec.image) {
                return Err(EngineError::ImageMissing {
                    image: spec.image.clone(),
                    message: "no such image".to_string(),
                });
            }
            state.next_id += 1;
            let id = format!("fake{:06}", state.next_id);
            state.created.push(Created {
                id: id.clone(),
                spec: spec.clone(),
            });
            let container = Container {
                spec: spec.clone(),
                attached: None,
                supervisor: None,
                running: false,
                oom_killed: false,
            };
            state.containers.insert(id.clone(), container);
            Ok(id)
        }
        .boxed()
    }

    fn attach<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Attached, EngineError>> {
        async move {
            self.reachable("attach_container")?;
            let (agent_end, supervisor_end) = tokio::io::duplex(64 * 1024);
            let mut state = self.state();
            let c = state
                .containers
                .get_mut(id)
                .ok_or_else(|| Self::not_found("attach_container", id))?;
            c.attached = Some(supervisor_end);
            let (read, write) = tokio::io::split(agent_end);
            Ok(Attached {
                output: Box::pin(bytes_of(read)),
                input: Box::pin(write),
            })
        }
        .boxed()
    }

    fn start<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        self.start_container(id).boxed()
    }

    fn remove<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<(), EngineError>> {
        async move {
            self.reachable("remove_container")?;
            let mut state = self.state();
            if let Some(mut c) = state.containers.remove(id) {
                c.stop();
                state.removed.push(id.to_string());
            }
            Ok(())
        }
        .boxed()
    }

    fn oom_killed<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<bool, EngineError>> {
        async move {
            self.reachable("inspect_container")?;
            let state = self.state();
            let c = state
                .containers
                .get(id)
                .ok_or_else(|| Self::not_found("inspect_container", id))?;
            Ok(c.oom_killed)
        }
        .boxed()
    }

    fn list_owned<'a>(&'a self, node: &'a str) -> BoxFuture<'a, Result<Vec<String>, EngineError>> {
        async move {
            self.reachable("list_containers")?;
            let state = self.state();
            let mut ids: Vec<String> = state
                .containers
                .iter()
                .filter(|(_, c)| c.spec.node == node)
                .map(|(id, _)| id.clone())
                .collect();
            ids.sort();
            Ok(ids)
        }
        .boxed()
    }
}

/// The bytes of a reader as the stream a channel's output is, ending at EOF or an error.
fn bytes_of(
    read: impl AsyncRead + Send + 'static,
) -> impl futures_util::Stream<Item = Result<Bytes, EngineError>> + Send {
    FramedRead::new(read, BytesCodec::new()).scan((), |_, chunk| {
        std::future::ready(chunk.ok().map(|b| Ok(b.freeze())))
    })
}

/// Where a fake supervisor finds the agent.
enum Channel {
    Socket(std::path::PathBuf),
    Attached(tokio::io::DuplexStream),
    /// Started without attach or socket: nobody listens (as a real container would be).
    Nothing,
}

/// The supervisor's end of its channel: events out, commands in, and the commands that came
/// during a stage and wait for it to end.
struct Link {
    write: Pin<Box<dyn AsyncWrite + Send>>,
    commands: mpsc::UnboundedReceiver<Command>,
    pending: VecDeque<Command>,
}

impl Link {
    async fn send(&mut self, event: &Event) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).expect("events always serialize");
        line.push(b'\n');
        self.write.write_all(&line).await?;
        self.write.flush().await
    }

    /// The next command, those held back first; `None` once the agent's end is closed.
    async fn next(&mut self) -> Option<Command> {
        match self.pending.pop_front() {
            Some(command) => Some(command),
            None => self.commands.recv().await,
        }
    }
}

/// One sandbox's PID 1.
struct Supervisor {
    inner: Arc<Inner>,
    container: String,
    /// The work dir: job files and what scripts wrote, until a reset.
    files: HashMap<String, String>,
    /// A judge's frozen program: what `restore` brings the work dir back to.
    frozen: Option<HashMap<String, String>>,
    tainted: bool,
}

/// How a script ended a stage early.
enum Ending {
    Exit(i32),
    Killed(&'static str, Status),
    JobFailed(String),
    /// The container went down: `true` when for memory.
    Died(bool),
}

/// A stage's output so far, sent as `output` events when the job streams.
struct Out {
    stage: String,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    stdout_truncated: bool,
    stderr_truncated: bool,
    limit: u64,
}

impl Supervisor {
    async fn run(mut self, channel: Channel, delay: Duration) {
        type Halves = (
            Pin<Box<dyn AsyncRead + Send>>,
            Pin<Box<dyn AsyncWrite + Send>>,
        );
        let (read, write): Halves = match channel {
            Channel::Socket(path) => match tokio::net::UnixStream::connect(&path).await {
                Ok(stream) => {
                    let (r, w) = stream.into_split();
                    (Box::pin(r), Box::pin(w))
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "fake supervisor could not connect");
                    return self.die(false);
                }
            },
            Channel::Attached(end) => {
                let (r, w) = tokio::io::split(end);
                (Box::pin(r), Box::pin(w))
            }
            Channel::Nothing => return,
        };
        // Commands are read in their own task, so stdin and signals reach a running stage.
        let (tx, commands) = mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut lines = BufReader::new(read).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                match serde_json::from_str::<Command>(&line) {
                    Ok(command) => {
                        if tx.send(command).is_err() {
                            break;
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "fake supervisor: unreadable command"),
                }
            }
        });
        let _reader = AbortOnDrop(reader);
        let mut link = Link {
            write,
            commands,
            pending: VecDeque::new(),
        };
        tokio::time::sleep(delay).await;
        let hello = Event::Hello {
            version: PROTOCOL_VERSION,
            cgroup: "none".to_string(),
        };
        if link.send(&hello).await.is_err() {
            return self.die(false);
        }
        while let Some(command) = link.next().await {
            let answer = match command {
                Command::Ping => Event::Pong,
                Command::Reset => self.reset(),
                Command::Freeze => {
                    self.frozen = Some(self.files.clone());
                    Event::Ready
                }
                Command::Restore => match (&self.frozen, self.tainted) {
                    (Some(frozen), false) => {
                        self.files = frozen.clone();
                        Event::Ready
                    }
                    _ => Event::ResetFailed {
                        message: "the fake sandbox has nothing frozen, or is tainted".to_string(),
                    },
                },
                Command::Job(job) => match self.job(job, &mut link).await {
                    Some(answer) => answer,
                    None => break, // the container died
                },
                // Outside a job these are ignored, as the real supervisor does.
                Command::Stdin { .. } | Command::CloseStdin { .. } | Command::Signal { .. } => {
                    continue
                }
            };
            if link.send(&answer).await.is_err() {
                break;
            }
        }
        // PID 1 is gone, and with it the container.
        self.die(false);
    }

    fn reset(&mut self) -> Event {
        if self.tainted {
            return Event::ResetFailed {
                message: "the fake sandbox found something it could not remove".to_string(),
            };
        }
        self.files.clear();
        self.frozen = None;
        Event::Ready
    }

    /// Runs a job; `None` when the container died on the way.
    async fn job(&mut self, job: Job, link: &mut Link) -> Option<Event> {
        let die = {
            let mut state = self.inner.state();
            let f = &mut state.faults.die_before_accept;
            let die = *f > 0;
            *f = f.saturating_sub(1);
            state.jobs.push(Delivery {
                container: self.container.clone(),
                job: job.id.clone(),
                accepted: !die,
            });
            die
        };
        if die {
            self.die(false);
            return None;
        }
        let id = job.id.clone();
        link.send(&Event::Accepted { id: id.clone() }).await.ok()?;
        for f in &job.files {
            let content = base64::engine::general_purpose::STANDARD
                .decode(&f.content_b64)
                .unwrap_or_default();
            self.files.insert(
                f.name.clone(),
                String::from_utf8_lossy(&content).into_owned(),
            );
        }
        let script: Vec<String> = match job.files.first() {
            Some(entry) => self.files[&entry.name]
                .lines()
                .map(str::to_string)
                .collect(),
            None => Vec::new(),
        };
        let mut stages = Vec::new();
        for stage in &job.stages {
            if job.stream {
                let started = Event::StageStarted {
                    id: id.clone(),
                    stage: stage.name.clone(),
                };
                link.send(&started).await.ok()?;
            }
            let started = Instant::now();
            let mut out = Out {
                stage: stage.name.clone(),
                stdout: Vec::new(),
                stderr: Vec::new(),
                stdout_truncated: false,
                stderr_truncated: false,
                limit: stage.output_bytes,
            };
            let ending = if job.files.is_empty() {
                let version = self.inner.state().version.clone();
                let tool = stage.argv.first().map_or("fake", String::as_str);
                let line = format!("{tool} {}\n", version.as_deref().unwrap_or("1.0.0"));
                out.write(OutputStream::Stdout, line.as_bytes(), &job, link)
                    .await
                    .ok()?
            } else {
                let mut run = StageRun {
                    stage,
                    stdin: stage.stdin.as_bytes().to_vec(),
                    stdin_open: stage.interactive,
                    started,
                };
                self.interpret(&script, &mut run, &mut out, &job, link)
                    .await?
            };
            let (status, exit_code, signal, overshoot) = match ending {
                None => (Status::Ok, Some(0), None, None),
                Some(Ending::Exit(0)) => (Status::Ok, Some(0), None, None),
                Some(Ending::Exit(n)) => (Status::RuntimeError, Some(n), None, None),
                Some(Ending::Killed(signal, status)) => {
                    let overshoot = (status == Status::Timeout).then_some(0.0);
                    (status, None, Some(signal.to_string()), overshoot)
                }
                Some(Ending::JobFailed(message)) => return Some(Event::JobFailed { id, message }),
                Some(Ending::Died(oom)) => {
                    self.die(oom);
                    return None;
                }
            };
            let failed = status != Status::Ok;
            stages.push(StageOutcome {
                name: stage.name.clone(),
                result: StageResult {
                    status,
                    exit_code,
                    signal,
                    stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                    stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
                    stdout_truncated: out.stdout_truncated,
                    stderr_truncated: out.stderr_truncated,
                    wall_time_ms: started.elapsed().as_millis() as u64,
                    cpu_time_ms: 0,
                    memory_bytes: 1 << 20,
                },
                kill_overshoot_ms: overshoot,
            });
            if failed {
                break;
            }
        }
        // The fake's jobs write no files: whatever `outputs` names is not there.
        let outputs = job.outputs.as_ref().map(|_| Default::default());
        Some(Event::Result {
            id,
            stages,
            outputs,
            snapshot: None,
        })
    }

    /// Runs `script` as one stage; `Some(None)` when it ran to its end.
    async fn interpret(
        &mut self,
        script: &[String],
        run: &mut StageRun<'_>,
        out: &mut Out,
        job: &Job,
        link: &mut Link,
    ) -> Option<Option<Ending>> {
        let compile = run.stage.name == "compile";
        for line in script {
            let (word, rest) = line.trim().split_once(' ').unwrap_or((line.trim(), ""));
            let step = match (compile, word) {
                (_, "") => None,
                (true, "compile-error") => {
                    let text = format!("{rest}\n");
                    out.write(OutputStream::Stderr, text.as_bytes(), job, link)
                        .await
                        .ok()?
                        .or(Some(Ending::Exit(1)))
                }
                // A compile stage only looks for compile errors.
                (true, _) | (false, "compile-error") => None,
                (false, "print" | "eprint") => {
                    let stream = if word == "print" {
                        OutputStream::Stdout
                    } else {
                        OutputStream::Stderr
                    };
                    let text = format!("{rest}\n");
                    out.write(stream, text.as_bytes(), job, link).await.ok()?
                }
                (false, "exit") => Some(Ending::Exit(rest.trim().parse().unwrap_or(1))),
                (false, "sleep") => {
                    let ms = rest.trim().parse().unwrap_or(0);
                    run.wait(Duration::from_millis(ms), link).await
                }
                (false, "read") => match run.read_line(link).await {
                    Ok(Some(line)) => out
                        .write(OutputStream::Stdout, &line, job, link)
                        .await
                        .ok()?,
                    Ok(None) => None,
                    Err(ending) => Some(ending),
                },
                (false, "write") => {
                    let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
                    self.files.insert(name.to_string(), format!("{text}\n"));
                    None
                }
                (false, "cat") => match self.files.get(rest.trim()).cloned() {
                    Some(text) => out
                        .write(OutputStream::Stdout, text.as_bytes(), job, link)
                        .await
                        .ok()?,
                    None => {
                        let text = format!("cat: {rest}: No such file or directory\n");
                        out.write(OutputStream::Stderr, text.as_bytes(), job, link)
                            .await
                            .ok()?
                            .or(Some(Ending::Exit(1)))
                    }
                },
                (false, "fail") => Some(Ending::JobFailed(rest.to_string())),
                (false, "crash") => Some(Ending::Died(false)),
                (false, "oom") => Some(Ending::Died(true)),
                (false, "taint") => {
                    self.tainted = true;
                    None
                }
                (false, _) => {
                    let text = format!("fake: unknown command {word:?}\n");
                    out.write(OutputStream::Stderr, text.as_bytes(), job, link)
                        .await
                        .ok()?
                        .or(Some(Ending::Exit(127)))
                }
            };
            if step.is_some() {
                return Some(step);
            }
        }
        Some(None)
    }

    /// The container goes down: its channel closes and the engine records why.
    fn die(&self, oom: bool) {
        let mut state = self.inner.state();
        if let Some(c) = state.containers.get_mut(&self.container) {
            c.running = false;
            c.oom_killed |= oom;
            c.supervisor = None;
        }
    }
}

/// Ends the command reader with its supervisor (aborted or not): the channel closes only when
/// both of its halves are gone.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One stage in progress: its stdin and its clock.
struct StageRun<'a> {
    stage: &'a Stage,
    stdin: Vec<u8>,
    stdin_open: bool,
    started: Instant,
}

impl StageRun<'_> {
    fn deadline(&self) -> Instant {
        self.started + Duration::from_millis(self.stage.wall_time_ms)
    }

    /// Handles one command that arrived while the stage runs; `Some` when it ends the stage.
    fn during(&mut self, command: Command, pending: &mut VecDeque<Command>) -> Option<Ending> {
        match command {
            Command::Stdin { data_b64, .. } if self.stdin_open => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(data_b64)
                    .unwrap_or_default();
                self.stdin.extend_from_slice(&data);
                None
            }
            Command::CloseStdin { .. } => {
                self.stdin_open = false;
                None
            }
            Command::Signal { signal, .. } => {
                Some(Ending::Killed(signal_name(signal), Status::RuntimeError))
            }
            Command::Stdin { .. } => None,
            other => {
                pending.push_back(other);
                None
            }
        }
    }

    /// Waits `d`, or less when the wall limit or a signal comes first.
    async fn wait(&mut self, d: Duration, link: &mut Link) -> Option<Ending> {
        let until = (Instant::now() + d).min(self.deadline());
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(until.into()) => break,
                command = link.commands.recv() => match command {
                    Some(c) => {
                        if let Some(ending) = self.during(c, &mut link.pending) {
                            return Some(ending);
                        }
                    }
                    None => return Some(Ending::Died(false)),
                },
            }
        }
        (Instant::now() >= self.deadline()).then_some(Ending::Killed("SIGKILL", Status::Timeout))
    }

    /// One line of stdin (newline included), `None` at its end.
    async fn read_line(&mut self, link: &mut Link) -> Result<Option<Vec<u8>>, Ending> {
        loop {
            if let Some(i) = self.stdin.iter().position(|&b| b == b'\n') {
                return Ok(Some(self.stdin.drain(..=i).collect()));
            }
            if !self.stdin_open {
                let rest = std::mem::take(&mut self.stdin);
                return Ok((!rest.is_empty()).then_some(rest));
            }
            tokio::select! {
                () = tokio::time::sleep_until(self.deadline().into()) => {
                    return Err(Ending::Killed("SIGKILL", Status::Timeout));
                }
                command = link.commands.recv() => match command {
                    Some(c) => {
                        if let Some(ending) = self.during(c, &mut link.pending) {
                            return Err(ending);
                        }
                    }
                    None => return Err(Ending::Died(false)),
                },
            }
        }
    }
}

impl Out {
    /// Keeps `data` up to the output limit, sending it as an event when the job streams;
    /// `Some` when the limit was passed (the real supervisor kills the stage then).
    async fn write(
        &mut self,
        stream: OutputStream,
        data: &[u8],
        job: &Job,
        link: &mut Link,
    ) -> std::io::Result<Option<Ending>> {
        let (buf, truncated) = match stream {
            OutputStream::Stdout => (&mut self.stdout, &mut self.stdout_truncated),
            OutputStream::Stderr => (&mut self.stderr, &mut self.stderr_truncated),
        };
        let room = (self.limit as usize).saturating_sub(buf.len());
        let kept = &data[..data.len().min(room)];
        let offset = buf.len() as u64;
        buf.extend_from_slice(kept);
        if job.stream && !kept.is_empty() {
            let event = Event::Output {
                id: job.id.clone(),
                stage: self.stage.clone(),
                stream,
                offset,
                data_b64: base64::engine::general_purpose::STANDARD.encode(kept),
            };
            link.send(&event).await?;
        }
        if kept.len() < data.len() {
            *truncated = true;
            return Ok(Some(Ending::Killed("SIGKILL", Status::OutputLimit)));
        }
        Ok(None)
    }
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        2 => "SIGINT",
        9 => "SIGKILL",
        15 => "SIGTERM",
        _ => "SIGUSR1",
    }
}

#[cfg(test)]
mod tests {
    //! The fake supervisor over the attach stream, driven by hand with the real protocol.
    use super::*;
    use codefleet_shared::sandbox::SandboxFile;
    use futures_util::StreamExt;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            image: "img".into(),
            node: "n".into(),
            language: "fake".into(),
            kind: "pool",
            supervisor: String::new(),
            memory_bytes: 1,
            cpus: 1.0,
            pids: 1,
            scratch_bytes: 1,
            file_size_bytes: 1,
            open_files: 1,
            channel: None,
            max_answer_bytes: 1 << 20,
        }
    }

    fn job(script: &str, stream: bool, interactive: bool) -> Job {
        Job {
            id: "j1".into(),
            uid: 1,
            gid: 1,
            files: vec![SandboxFile {
                name: "main".into(),
                content_b64: base64::engine::general_purpose::STANDARD.encode(script),
                executable: false,
            }],
            stages: vec![Stage {
                name: "run".into(),
                argv: vec!["fake".into(), "main".into()],
                stdin: String::new(),
                wall_time_ms: 5_000,
                cpu_time_ms: 5_000,
                memory_bytes: 1,
                processes: 1,
                output_bytes: 1 << 20,
                file_size_bytes: 1,
                open_files: 1,
                interactive,
            }],
            env: vec![],
            stream,
            outputs: None,
            snapshot_max_bytes: 0,
        }
    }

    struct Channel {
        output: super::super::Output,
        input: Pin<Box<dyn AsyncWrite + Send>>,
        pending: Vec<u8>,
    }

    impl Channel {
        async fn open(fake: &FakeEngine) -> Channel {
            fake.add_image("img");
            let id = fake.create_sandbox(&spec()).await.unwrap();
            let attached = fake.attach(&id).await.unwrap();
            fake.start(&id).await.unwrap();
            Channel {
                output: attached.output,
                input: attached.input,
                pending: Vec::new(),
            }
        }

        async fn send(&mut self, command: &Command) {
            let mut line = serde_json::to_vec(command).unwrap();
            line.push(b'\n');
            self.input.write_all(&line).await.unwrap();
        }

        async fn next(&mut self) -> Option<Event> {
            loop {
                if let Some(i) = self.pending.iter().position(|&b| b == b'\n') {
                    let line: Vec<u8> = self.pending.drain(..=i).collect();
                    return Some(serde_json::from_slice(&line).unwrap());
                }
                let chunk = tokio::time::timeout(Duration::from_secs(5), self.output.next())
                    .await
                    .expect("the fake answers within 5 s")?
                    .unwrap();
                self.pending.extend_from_slice(&chunk);
            }
        }
    }

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A streaming job gets `stage_started` and `output` events in order, offsets counting
    /// each stream's bytes, then the result carrying all of the output.
    #[tokio::test]
    async fn a_streaming_job_sends_stage_started_and_output_events() {
        let fake = FakeEngine::new();
        let mut ch = Channel::open(&fake).await;
        assert!(matches!(
            ch.next().await,
            Some(Event::Hello {
                version: PROTOCOL_VERSION,
                ..
            })
        ));
        ch.send(&Command::Job(job(
            "print a\neprint e\nprint b\n",
            true,
            false,
        )))
        .await;
        let mut got = Vec::new();
        while let Some(event) = ch.next().await {
            let last = matches!(event, Event::Result { .. });
            got.push(event);
            if last {
                break;
            }
        }
        let output = |stream, offset, data: &str| Event::Output {
            id: "j1".into(),
            stage: "run".into(),
            stream,
            offset,
            data_b64: b64(data),
        };
        assert_eq!(got[0], Event::Accepted { id: "j1".into() });
        assert_eq!(
            got[1],
            Event::StageStarted {
                id: "j1".into(),
                stage: "run".into()
            }
        );
        assert_eq!(got[2], output(OutputStream::Stdout, 0, "a\n"));
        assert_eq!(got[3], output(OutputStream::Stderr, 0, "e\n"));
        assert_eq!(got[4], output(OutputStream::Stdout, 2, "b\n"));
        let Event::Result { stages, .. } = &got[5] else {
            panic!("{got:?}")
        };
        assert_eq!(
            (stages[0].result.stdout.as_str(), stages[0].result.status),
            ("a\nb\n", Status::Ok)
        );
    }

    /// An interactive stage reads what `stdin` commands send, line by line, until
    /// `close_stdin`; a `signal` ends a stage that waits.
    #[tokio::test]
    async fn an_interactive_stage_reads_stdin_commands_and_dies_by_signal() {
        let fake = FakeEngine::new();
        let mut ch = Channel::open(&fake).await;
        ch.next().await;
        ch.send(&Command::Job(job("read\nread\nread\n", false, true)))
            .await;
        assert_eq!(ch.next().await, Some(Event::Accepted { id: "j1".into() }));
        for line in ["one\n", "two\n"] {
            let data_b64 = b64(line);
            ch.send(&Command::Stdin {
                id: "j1".into(),
                data_b64,
            })
            .await;
        }
        ch.send(&Command::CloseStdin { id: "j1".into() }).await;
        let Some(Event::Result { stages, .. }) = ch.next().await else {
            panic!()
        };
        assert_eq!(stages[0].result.stdout, "one\ntwo\n");

        ch.send(&Command::Reset).await;
        assert_eq!(ch.next().await, Some(Event::Ready));
        ch.send(&Command::Job(job("read\n", false, true))).await;
        assert_eq!(ch.next().await, Some(Event::Accepted { id: "j1".into() }));
        ch.send(&Command::Signal {
            id: "j1".into(),
            signal: 9,
        })
        .await;
        let Some(Event::Result { stages, .. }) = ch.next().await else {
            panic!()
        };
        assert_eq!(stages[0].result.signal.as_deref(), Some("SIGKILL"));
        ch.send(&Command::Ping).await;
        assert_eq!(ch.next().await, Some(Event::Pong));
    }

    /// Killing a container ends its channel; removing it is observed; a removed container is
    /// gone from the list, a killed one is not.
    #[tokio::test]
    async fn kill_ends_the_channel_and_remove_is_recorded() {
        let fake = FakeEngine::new();
        let mut ch = Channel::open(&fake).await;
        ch.next().await;
        let id = fake.created()[0].id.clone();
        fake.kill(&id);
        assert_eq!(ch.next().await, None, "the channel ended");
        assert_eq!(
            fake.list_owned("n").await.unwrap(),
            std::slice::from_ref(&id)
        );
        assert!(!fake.present()[0].running);
        fake.remove(&id).await.unwrap();
        assert_eq!(fake.removed(), [id]);
        assert!(fake.list_owned("n").await.unwrap().is_empty());
    }
}
