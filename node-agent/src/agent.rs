//! The agent's state and its one job path: validate, take a slot, take a sandbox (warm, fresh
//! or cold), run, answer, then reset the sandbox off the request path and pool it again.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::sync::{Notify, Semaphore};

use codefleet_shared::cluster::{CapacityReport, LanguageCapacity};
use codefleet_shared::sandbox::{Job, SandboxFile, Stage, StageOutcome};
use codefleet_shared::validate::{check_args, job_files, resolve_limits, JobFile};
use codefleet_shared::version::version_matches;
use codefleet_shared::{
    ErrorCode, ExecuteRequest, ExecuteResponse, ImageState, Isolation, LanguageInfo, LanguageRef,
    Problem, ResolvedLimits, StageResult, Status, Timing,
};

use crate::catalog::{parse_version, Catalog, Language};
use crate::config::Config;
use crate::engine::{Engine, EngineError, SandboxSpec};
use crate::images::Recipe;
use crate::pool::{PoolKey, Pools, Sizing, Source};
use crate::sandbox::{Reaper, Sandbox, SandboxError};
use crate::sessions::Sessions;

/// Memory a sandbox gets above the job's limit, for the supervisor and the kernel's page cache.
pub const SANDBOX_OVERHEAD_BYTES: u64 = 16 << 20;
/// Open files per job process.
const OPEN_FILES: u64 = 256;
/// Added to a job's own time limits when waiting for its answer.
const ANSWER_MARGIN: Duration = Duration::from_secs(10);
/// Container starts under way at once (each costs the engine real CPU).
const PARALLEL_STARTS: usize = 2;
/// How long a `recycled` job waits for a sandbox being reset before taking a never-used one.
const RESET_WAIT: Duration = Duration::from_millis(100);
/// How long it waits for a reset when no never-used sandbox is ready either (the alternative is
/// a cold start): a reset answers or fails within its own deadline of 10 s.
const RESET_WAIT_NO_FRESH: Duration = Duration::from_secs(10);
/// Dead pooled sandboxes a job may meet before it is started on a new one.
const MAX_DEAD_PER_JOB: u32 = 4;

#[derive(Debug, Clone)]
pub enum ImageStatus {
    Preparing,
    Ready { tag: String, version: String },
    Failed(String),
}

impl ImageStatus {
    pub fn state(&self) -> ImageState {
        match self {
            ImageStatus::Preparing => ImageState::Preparing,
            ImageStatus::Ready { .. } => ImageState::Ready,
            ImageStatus::Failed(_) => ImageState::Failed,
        }
    }
}

pub struct Agent {
    pub config: Config,
    pub catalog: Catalog,
    pub docker: Arc<dyn Engine>,
    pub reaper: Reaper,
    pub supervisor: String,
    pub images: RwLock<HashMap<String, ImageStatus>>,
    pub pools: Pools,
    pub sessions: Sessions,
    slots: Arc<Semaphore>,
    starts: Arc<Semaphore>,
    pub busy: AtomicU32,
    pub queued: AtomicU32,
    pub draining: AtomicBool,
    pub docker_ok: AtomicBool,
    /// Set once the orphans of an earlier run are gone and the agent may create containers.
    pub started: AtomicBool,
    pub refill: Notify,
    /// Woken whenever a reset sandbox is back in a pool.
    returned: Notify,
    /// This agent's hold on its node id (see `lease`); `None` only for agents built by hand.
    pub lease: Option<crate::lease::NodeLease>,
}

/// One job waiting for a slot; counted in the queue until dropped, however the wait ends (a
/// cancelled request included).
struct Queued<'a> {
    agent: &'a Agent,
}

impl<'a> Queued<'a> {
    /// Joins the queue, unless it is full.
    fn join(agent: &'a Agent) -> Option<Queued<'a>> {
        let max = agent.config.queue_length();
        let joined = agent
            .queued
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < max).then_some(n + 1)
            });
        let depth = joined.ok()? + 1;
        metrics::gauge!("codefleet_queue_depth").set(f64::from(depth));
        Some(Queued { agent })
    }
}

impl Drop for Queued<'_> {
    fn drop(&mut self) {
        let depth = self.agent.queued.fetch_sub(1, Ordering::SeqCst) - 1;
        metrics::gauge!("codefleet_queue_depth").set(f64::from(depth));
    }
}

/// A slot held by one job; freed on drop.
pub struct Slot {
    agent: Arc<Agent>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.agent.busy.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A validated job, ready for a sandbox.
pub struct Prepared {
    pub language: Language,
    pub version: String,
    pub limits: ResolvedLimits,
    pub job_files: Vec<JobFile>,
    pub stdin: String,
    pub args: Vec<String>,
    pub isolation: Isolation,
}

impl Agent {
    pub fn new(
        config: Config,
        catalog: Catalog,
        docker: Arc<dyn Engine>,
        reaper: Reaper,
        supervisor: String,
    ) -> Agent {
        let images = catalog
            .languages
            .iter()
            .map(|l| (l.name.clone(), ImageStatus::Preparing))
            .collect();
        let slots = Arc::new(Semaphore::new(config.slots as usize));
        let max_sessions = config.max_sessions;
        Agent {
            config,
            catalog,
            docker,
            reaper,
            supervisor,
            images: RwLock::new(images),
            pools: Pools::default(),
            sessions: Sessions::new(max_sessions),
            slots,
            starts: Arc::new(Semaphore::new(PARALLEL_STARTS)),
            busy: AtomicU32::new(0),
            queued: AtomicU32::new(0),
            draining: AtomicBool::new(false),
            docker_ok: AtomicBool::new(false),
            started: AtomicBool::new(false),
            refill: Notify::new(),
            returned: Notify::new(),
            lease: None,
        }
    }

    pub fn node(&self) -> &str {
        &self.config.node_id
    }

    pub fn is_ready(&self) -> bool {
        self.docker_ok.load(Ordering::SeqCst)
            && self.started.load(Ordering::SeqCst)
            && !self.draining.load(Ordering::SeqCst)
    }

    pub fn image_status(&self, language: &str) -> ImageStatus {
        self.images
            .read()
            .expect("images lock")
            .get(language)
            .cloned()
            .unwrap_or(ImageStatus::Failed("not in the catalog".into()))
    }

    pub fn set_image_status(&self, language: &str, status: ImageStatus) {
        self.images
            .write()
            .expect("images lock")
            .insert(language.to_string(), status);
    }

    /// Resolves `language` and `version` to a ready language, or the right problem.
    pub fn resolve_language(
        &self,
        language: Option<&str>,
        version: Option<&str>,
    ) -> Result<(Language, String, String), Problem> {
        let name = language
            .filter(|l| !l.trim().is_empty())
            .ok_or_else(|| Problem::new(ErrorCode::InvalidRequest, "`language` is required"))?;
        let lang = self.catalog.find(name).ok_or_else(|| {
            Problem::new(
                ErrorCode::UnknownLanguage,
                format!(
                    "no language {name:?}; available: {}",
                    self.catalog.names().join(", ")
                ),
            )
        })?;
        match self.image_status(&lang.name) {
            ImageStatus::Ready { tag, version: v } => {
                if !version_matches(version, &v) {
                    let asked = version.unwrap_or_default();
                    return Err(Problem::new(
                        ErrorCode::UnknownLanguage,
                        format!("no version {asked:?} of {}; available: {v}", lang.name),
                    ));
                }
                Ok((lang.clone(), v, tag))
            }
            ImageStatus::Preparing => Err(Problem::new(
                ErrorCode::LanguageUnavailable,
                format!(
                    "{} is still being prepared on node {}",
                    lang.name,
                    self.node()
                ),
            )),
            ImageStatus::Failed(why) => Err(Problem::new(
                ErrorCode::LanguageUnavailable,
                format!(
                    "{} is unavailable on node {}: {why}",
                    lang.name,
                    self.node()
                ),
            )
            .with_retry_after(30)),
        }
    }

    /// Validates an execute request completely; nothing runs for a rejected one.
    pub fn prepare(
        &self,
        req: &ExecuteRequest,
        fixed: Option<(&Language, &str)>,
    ) -> Result<Prepared, Problem> {
        let (language, version) = match fixed {
            Some((l, v)) => (l.clone(), v.to_string()),
            None => {
                let (l, v, _) =
                    self.resolve_language(req.language.as_deref(), req.version.as_deref())?;
                (l, v)
            }
        };
        let files = job_files(
            req.source.as_deref(),
            req.files.as_deref(),
            &language.file_name,
        )?;
        let limits = resolve_limits(
            req.limits.as_ref(),
            &self.config.default_limits(),
            &self.config.max_limits(),
        )?;
        let args = req.args.clone().unwrap_or_default();
        check_args(&args)?;
        Ok(Prepared {
            language,
            version,
            limits,
            job_files: files,
            stdin: req.stdin.clone().unwrap_or_default(),
            args,
            isolation: req.isolation.unwrap_or_default(),
        })
    }

    /// Takes a free slot, or queues for one: at most `wait` (bounded by `--queue-wait-ms`), and
    /// only while fewer than `--queue-length` jobs wait already; beyond that the job is refused
    /// at once, so a burst queues and an overload sheds without piling up.
    pub async fn take_slot(self: &Arc<Self>, wait: Option<Duration>) -> Result<Slot, Problem> {
        if self.draining.load(Ordering::SeqCst) {
            return Err(Problem::new(
                ErrorCode::NoCapacity,
                format!("node {} is draining", self.node()),
            ));
        }
        if !self.docker_ok.load(Ordering::SeqCst) {
            return Err(docker_unreachable(self.node()));
        }
        let started = Instant::now();
        let permit = match self.slots.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let busy = |why: String| {
                    metrics::counter!("codefleet_queue_rejections_total").increment(1);
                    Problem::new(ErrorCode::NoCapacity, why).with_retry_after(1)
                };
                let Some(_waiting) = Queued::join(self) else {
                    return Err(busy(format!(
                        "all {} slots of node {} are busy and {} jobs wait already",
                        self.config.slots,
                        self.node(),
                        self.config.queue_length()
                    )));
                };
                let most = Duration::from_millis(self.config.queue_wait_ms);
                let wait = wait.map_or(most, |w| w.min(most));
                match tokio::time::timeout(wait, self.slots.clone().acquire_owned()).await {
                    Ok(Ok(permit)) => permit,
                    _ => {
                        return Err(busy(format!(
                            "all {} slots of node {} stayed busy for {} ms",
                            self.config.slots,
                            self.node(),
                            wait.as_millis()
                        )))
                    }
                }
            }
        };
        metrics::histogram!("codefleet_queue_wait_seconds").record(started.elapsed().as_secs_f64());
        self.busy.fetch_add(1, Ordering::SeqCst);
        Ok(Slot {
            agent: self.clone(),
            _permit: permit,
        })
    }

    pub fn pool_key(&self, language: &str, memory_bytes: u64) -> PoolKey {
        PoolKey {
            language: language.to_string(),
            memory_bytes,
        }
    }

    pub fn sizing(&self, key: &PoolKey) -> Sizing {
        let min = if key.memory_bytes == self.config.default_limits().memory_bytes {
            self.config.pool_min
        } else {
            0
        };
        Sizing {
            min,
            max: self.config.pool_max,
        }
    }

    pub fn spec(&self, key: &PoolKey, tag: &str, kind: &'static str) -> SandboxSpec {
        let max = self.config.max_limits();
        SandboxSpec {
            image: tag.to_string(),
            node: self.config.node_id.clone(),
            language: key.language.clone(),
            kind,
            supervisor: self.supervisor.clone(),
            memory_bytes: key.memory_bytes + SANDBOX_OVERHEAD_BYTES,
            cpus: self.config.sandbox_cpus,
            pids: max.processes as i64 + 16,
            scratch_bytes: self.config.scratch_bytes,
            file_size_bytes: max.file_size_bytes,
            open_files: OPEN_FILES,
            channel: None,
            // Both streams at the most output a job may keep, each byte escaped as `\uXXXX` at
            // worst, and room for the rest of the result.
            max_answer_bytes: 12 * max.output_bytes as usize + (1 << 20),
        }
    }

    /// Starts a new sandbox for `key` (the cold path, also used to fill pools).
    pub async fn start_sandbox(
        &self,
        key: &PoolKey,
        kind: &'static str,
    ) -> Result<Sandbox, SandboxError> {
        let tag = match self.image_status(&key.language) {
            ImageStatus::Ready { tag, .. } => tag,
            other => return Err(SandboxError::Failed(format!("image not ready: {other:?}"))),
        };
        let spec = self.spec(key, &tag, kind);
        let channel_root = self.config.channel_root();
        Sandbox::start(&*self.docker, &spec, &self.reaper, channel_root.as_deref()).await
    }

    /// Starts a pool sandbox and runs the language's warm-up program in it, then resets it: the
    /// first run of a toolchain in a new container pays for loading it, and a user's job should
    /// not. The sandbox still never ran another job, so it serves `fresh` jobs.
    pub async fn start_warm_sandbox(&self, key: &PoolKey) -> Result<Sandbox, SandboxError> {
        let mut sandbox = self.start_sandbox(key, "pool").await?;
        let Some(lang) = self.catalog.find(&key.language) else {
            return Ok(sandbox);
        };
        let Some(source) = &lang.warmup else {
            return Ok(sandbox);
        };
        let limits = ResolvedLimits {
            memory_bytes: key.memory_bytes,
            ..self.config.default_limits()
        };
        let warmup = Prepared {
            language: lang.clone(),
            version: String::new(),
            limits,
            job_files: vec![JobFile {
                name: lang.file_name.clone(),
                content: source.as_bytes().to_vec(),
            }],
            stdin: String::new(),
            args: vec![],
            isolation: Isolation::Fresh,
        };
        let job = self.job(&warmup, sandbox.uid);
        let stages = sandbox.run(job, job_deadline(&limits)).await?;
        if let Some(failed) = stages.iter().find(|s| s.result.status != Status::Ok) {
            tracing::warn!(language = %key.language, stage = %failed.name, stderr = %failed.result.stderr, "warm-up program failed");
        }
        sandbox.reset().await?;
        sandbox.jobs_run = 0;
        Ok(sandbox)
    }

    /// Runs a validated job on this node and answers as `/v1/execute` does. `wait` is the most
    /// the caller lets it queue for a slot.
    pub async fn execute(
        self: &Arc<Self>,
        prepared: Prepared,
        received: Instant,
        wait: Option<Duration>,
    ) -> Result<ExecuteResponse, Problem> {
        let slot = self.take_slot(wait).await?;
        let timing = (received, received.elapsed());
        let key = self.pool_key(&prepared.language.name, prepared.limits.memory_bytes);
        let in_use = self.pools.begin(&key, Instant::now());
        let mut dead = 0;
        let (outcome, sandbox, source, id) = loop {
            let (mut sandbox, source) = match self.warm_sandbox(&key, prepared.isolation).await {
                Some(found) => found,
                None => match self.start_sandbox(&key, "pool").await {
                    Ok(sb) => (sb, Source::Cold),
                    Err(e) => {
                        tracing::error!(language = %key.language, error = %e, "starting a sandbox failed");
                        // An engine that went away: the job did not start, and the caller may
                        // send it elsewhere.
                        if self.docker.ping().await.is_err() {
                            self.docker_ok.store(false, Ordering::SeqCst);
                            return Err(docker_unreachable(self.node()));
                        }
                        let why = e.to_string();
                        let id = new_id("ex");
                        let cause = "container_start";
                        return Ok(internal_error(self, id, &prepared, timing, cause, &why));
                    }
                },
            };
            if source != Source::Warm {
                // The pool shrank: let the refiller start a replacement now, not at its next tick.
                self.refill.notify_one();
            }
            let job = self.job(&prepared, sandbox.uid);
            let id = job.id.clone();
            match sandbox.run(job, job_deadline(&prepared.limits)).await {
                // A pooled sandbox that died behind our back (its container removed, the
                // engine restarted): the job never reached it, so another sandbox runs it.
                Err(SandboxError::Dead(why)) if dead < MAX_DEAD_PER_JOB => {
                    dead += 1;
                    metrics::counter!("codefleet_sandboxes_dead_total").increment(1);
                    tracing::warn!(container = %sandbox.id, %why, "pooled sandbox was dead; running the job on another");
                    self.refill.notify_one();
                }
                outcome => break (outcome, sandbox, source, id),
            }
        };
        metrics::counter!("codefleet_sandbox_acquired_total", "language" => key.language.clone(), "source" => source.as_str())
            .increment(1);
        drop(slot);
        let response = match outcome {
            Ok(stages) => {
                let response = respond(self, id, &prepared, stages, timing, source.as_str());
                // Start the reset before releasing the key, so the refiller never sees the
                // sandbox as neither in use nor coming back.
                self.recycle(key.clone(), sandbox);
                response
            }
            Err(e) => {
                self.sandbox_failed(sandbox, id, &prepared, timing, &e)
                    .await
            }
        };
        drop(in_use);
        record(&response, &prepared);
        tracing::debug!(job = %response.id, status = response.status.as_str(), sandbox = source.as_str(), "job answered");
        Ok(response)
    }

    /// The answer for a job whose sandbox failed under it; the sandbox is discarded. When the
    /// engine says the container was killed for memory, the job's own memory use (its files,
    /// its processes) took the sandbox down: that is the job's `memory_limit`, not the node's
    /// failure.
    pub async fn sandbox_failed(
        &self,
        sandbox: Sandbox,
        id: String,
        prepared: &Prepared,
        timing: (Instant, Duration),
        error: &SandboxError,
    ) -> ExecuteResponse {
        tracing::warn!(container = %sandbox.id, error = %error, "sandbox failed; discarding it");
        let oom = matches!(error, SandboxError::Lost | SandboxError::Dead(_))
            && self.docker.oom_killed(&sandbox.id).await.unwrap_or(false);
        drop(sandbox);
        if oom {
            metrics::counter!("codefleet_sandbox_oom_total").increment(1);
            let why = "codefleet: the job's memory use (its processes and the files it keeps) \
                       reached the sandbox's limit and the sandbox was stopped\n";
            return failed_answer(self, id, prepared, timing, Status::MemoryLimit, why.into());
        }
        internal_error(
            self,
            id,
            prepared,
            timing,
            error.cause(),
            &error.to_string(),
        )
    }

    /// A ready sandbox from the pool: for a `recycled` job a reset one first, waiting for one
    /// being reset (a reset takes milliseconds, a cold start hundreds): a little when a
    /// never-used one is ready, until the reset ends when none is; then one that never ran a job.
    async fn warm_sandbox(&self, key: &PoolKey, isolation: Isolation) -> Option<(Sandbox, Source)> {
        if isolation == Isolation::Recycled {
            let started = Instant::now();
            loop {
                // Register interest before looking, so a reset ending in between is not missed.
                let returned = self.returned.notified();
                if let Some(sb) = self.pools.take_recycled(key) {
                    return Some((sb, Source::Warm));
                }
                let patience = if self.pools.has_fresh(key) {
                    RESET_WAIT
                } else {
                    RESET_WAIT_NO_FRESH
                };
                let left = patience.saturating_sub(started.elapsed());
                if self.pools.resetting(key) == 0 || left.is_zero() {
                    break;
                }
                let _ = tokio::time::timeout(left, returned).await;
            }
        }
        self.pools.take_fresh(key).map(|sb| (sb, Source::Fresh))
    }

    /// Resets a used sandbox in the background and pools it again, or removes it.
    pub fn recycle(self: &Arc<Self>, key: PoolKey, mut sandbox: Sandbox) {
        if sandbox.jobs_run >= self.config.recycle_after || self.draining.load(Ordering::SeqCst) {
            return;
        }
        self.pools.begin_reset(&key);
        let agent = self.clone();
        tokio::spawn(async move {
            let clean = match sandbox.reset().await {
                Ok(()) => Some(sandbox),
                Err(e) => {
                    metrics::counter!("codefleet_sandbox_reset_failures_total").increment(1);
                    tracing::warn!(container = %sandbox.id, error = %e, "reset failed; discarding the sandbox");
                    None
                }
            };
            // Dropping what the pool does not take removes it.
            drop(
                agent
                    .pools
                    .end_reset(&key, clean, agent.sizing(&key), Instant::now()),
            );
            agent.returned.notify_waiters();
        });
    }

    /// The supervisor's job for a validated request.
    pub fn job(&self, p: &Prepared, uid: u32) -> Job {
        let entry = p.job_files[0].name.clone();
        let (compile, run) = p.language.commands(&entry, &p.args);
        let l = &p.limits;
        let stage = |name: &str,
                     argv: Vec<String>,
                     stdin: String,
                     (wall, cpu): (u64, u64),
                     file_size: u64| Stage {
            name: name.to_string(),
            argv,
            stdin,
            wall_time_ms: wall,
            cpu_time_ms: cpu,
            memory_bytes: l.memory_bytes,
            processes: l.processes,
            output_bytes: l.output_bytes,
            file_size_bytes: file_size,
            open_files: OPEN_FILES,
            interactive: false,
        };
        let mut stages = Vec::new();
        if let Some(argv) = compile {
            // Compilers and linkers write larger files than programs usually do; the tmpfs size
            // still bounds them.
            let t = l.compile_wall_time_ms;
            let file_size = self
                .config
                .max_limits()
                .file_size_bytes
                .max(l.file_size_bytes);
            stages.push(stage("compile", argv, String::new(), (t, t), file_size));
        }
        let times = (l.wall_time_ms, l.cpu_time_ms);
        stages.push(stage("run", run, p.stdin.clone(), times, l.file_size_bytes));
        Job {
            id: new_id("ex"),
            uid,
            gid: uid,
            files: p
                .job_files
                .iter()
                .map(|f| SandboxFile {
                    name: f.name.clone(),
                    content_b64: base64::engine::general_purpose::STANDARD.encode(&f.content),
                    executable: false,
                })
                .collect(),
            stages,
            env: p
                .language
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            stream: false,
        }
    }

    pub fn languages(&self) -> Vec<LanguageInfo> {
        let mut out: Vec<LanguageInfo> = self
            .catalog
            .languages
            .iter()
            .map(|l| {
                let status = self.image_status(&l.name);
                let (version, error) = match &status {
                    ImageStatus::Ready { version, .. } => (version.clone(), None),
                    ImageStatus::Failed(why) => (String::new(), Some(why.clone())),
                    ImageStatus::Preparing => (String::new(), None),
                };
                LanguageInfo {
                    name: l.name.clone(),
                    aliases: l.aliases.clone(),
                    version,
                    compiled: l.compiled(),
                    file_name: l.file_name.clone(),
                    nodes_ready: u32::from(matches!(status, ImageStatus::Ready { .. })),
                    image: Some(status.state()),
                    error,
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    pub fn capacity(&self) -> CapacityReport {
        let warm = self.pools.warm_counts();
        let languages: BTreeMap<String, LanguageCapacity> = self
            .languages()
            .into_iter()
            .map(|l| {
                let cap = LanguageCapacity {
                    image: l.image.unwrap_or(ImageState::Preparing),
                    warm: warm.get(&l.name).copied().unwrap_or(0),
                    version: l.version,
                    aliases: l.aliases,
                    compiled: l.compiled,
                    file_name: l.file_name,
                    error: l.error,
                };
                (l.name, cap)
            })
            .collect();
        CapacityReport {
            node_id: self.config.node_id.clone(),
            address: self
                .config
                .advertise
                .clone()
                .unwrap_or_else(|| format!("http://{}", self.config.listen)),
            slots_total: self.config.slots,
            slots_busy: self.busy.load(Ordering::SeqCst),
            queued: self.queued.load(Ordering::SeqCst),
            draining: self.draining.load(Ordering::SeqCst),
            ready: self.docker_ok.load(Ordering::SeqCst) && self.started.load(Ordering::SeqCst),
            languages,
            sessions: self.sessions.len() as u32,
        }
    }

    /// Finds or builds one language's image, then reads its version from it.
    pub async fn prepare_image(
        self: &Arc<Self>,
        lang: &Language,
    ) -> Result<(String, String), String> {
        let started = Instant::now();
        let recipe = Recipe::of(lang, self.config.images_dir.as_deref())?;
        let tag = recipe.tag(&lang.image);
        let present = self
            .docker
            .image_exists(&tag)
            .await
            .map_err(|e| e.to_string())?;
        if !present {
            let pulled = match &self.config.registry {
                Some(registry) => {
                    let reference = format!("{}/{tag}", registry.trim_end_matches('/'));
                    tracing::info!(language = %lang.name, %reference, "pulling image");
                    self.docker
                        .pull(&reference, &tag)
                        .await
                        .map_err(|e| tracing::info!(error = %e, "pull failed; building"))
                        .is_ok()
                }
                None => false,
            };
            if !pulled {
                tracing::info!(language = %lang.name, %tag, "building image from its recipe");
                let name = lang.name.clone();
                let mut last = Instant::now();
                let mut progress = move |line: &str| {
                    if line.starts_with("Step ") || last.elapsed() > Duration::from_secs(10) {
                        last = Instant::now();
                        tracing::info!(language = %name, progress = %line, "building image");
                    }
                };
                self.docker
                    .build(&tag, recipe.context_tar(), &mut progress)
                    .await
                    .map_err(|e| match e {
                        EngineError::ImageMissing { .. } => format!(
                            "{e} (no base image and no registry: run deploy/images/bootstrap-base.sh)"
                        ),
                        e => e.to_string(),
                    })?;
            }
        }
        // Read the version from the image itself, through a real sandbox.
        self.set_image_status(
            &lang.name,
            ImageStatus::Ready {
                tag: tag.clone(),
                version: String::new(),
            },
        );
        let version = self.probe_version(lang).await;
        metrics::histogram!("codefleet_image_prepare_seconds", "language" => lang.name.clone())
            .record(started.elapsed().as_secs_f64());
        match version {
            Ok(v) => Ok((tag, v)),
            Err(e) => Err(e),
        }
    }

    async fn probe_version(&self, lang: &Language) -> Result<String, String> {
        let key = self.pool_key(&lang.name, self.config.default_limits().memory_bytes);
        let mut sandbox = self
            .start_sandbox(&key, "probe")
            .await
            .map_err(|e| format!("probe sandbox: {e}"))?;
        let l = ResolvedLimits::DEFAULT;
        let job = Job {
            id: new_id("probe"),
            uid: sandbox.uid,
            gid: sandbox.uid,
            files: vec![],
            stages: vec![Stage {
                name: "version".into(),
                argv: lang.version.clone(),
                stdin: String::new(),
                wall_time_ms: 20_000,
                cpu_time_ms: 20_000,
                memory_bytes: l.memory_bytes,
                processes: l.processes,
                output_bytes: 4096,
                file_size_bytes: l.file_size_bytes,
                open_files: OPEN_FILES,
                interactive: false,
            }],
            env: vec![],
            stream: false,
        };
        let stages = sandbox
            .run(job, Duration::from_secs(30))
            .await
            .map_err(|e| format!("version probe: {e}"))?;
        let r = &stages.first().ok_or("version probe: no result")?.result;
        parse_version(&format!("{}\n{}", r.stdout, r.stderr)).ok_or_else(|| {
            format!(
                "no version in the output of {:?}: {:?}",
                lang.version, r.stderr
            )
        })
    }

    /// Prepares every language independently; one failing does not stop the others.
    pub async fn prepare_all(self: &Arc<Self>) {
        let builds = Arc::new(Semaphore::new(2));
        let mut tasks = Vec::new();
        for lang in self.catalog.languages.clone() {
            let agent = self.clone();
            let builds = builds.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = builds.acquire().await;
                let status = match agent.prepare_image(&lang).await {
                    Ok((tag, version)) => {
                        tracing::info!(language = %lang.name, %version, %tag, "language ready");
                        ImageStatus::Ready { tag, version }
                    }
                    Err(why) => {
                        metrics::counter!("codefleet_image_prepare_failures_total", "language" => lang.name.clone()).increment(1);
                        tracing::error!(language = %lang.name, error = %why, "language unavailable");
                        ImageStatus::Failed(why)
                    }
                };
                agent.set_image_status(&lang.name, status);
                agent.refill.notify_one();
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Keeps the pools at their target size; runs until the task is aborted.
    pub async fn refill_loop(self: Arc<Self>) {
        loop {
            let wanted: Vec<PoolKey> = self
                .catalog
                .languages
                .iter()
                .filter(|l| matches!(self.image_status(&l.name), ImageStatus::Ready { ref version, .. } if !version.is_empty()))
                .map(|l| self.pool_key(&l.name, self.config.default_limits().memory_bytes))
                .collect();
            // Sandboxes whose containers died behind our back go before any job is handed one,
            // and the plan below replaces them.
            let dead = self.pools.take_dead(Sandbox::alive);
            if !dead.is_empty() {
                metrics::counter!("codefleet_sandboxes_dead_total").increment(dead.len() as u64);
                tracing::warn!(count = dead.len(), "pooled sandboxes died; replacing them");
                drop(dead);
            }
            let can_start = self.started.load(Ordering::SeqCst)
                && !self.draining.load(Ordering::SeqCst)
                && self.docker_ok.load(Ordering::SeqCst);
            if can_start {
                let (refills, idle) = self.pools.plan(|k| self.sizing(k), &wanted, Instant::now());
                drop(idle);
                for refill in refills {
                    for _ in 0..refill.start {
                        let agent = self.clone();
                        let key = refill.key.clone();
                        tokio::spawn(async move {
                            let _permit = agent.starts.clone().acquire_owned().await;
                            match agent.start_warm_sandbox(&key).await {
                                Ok(sb) => agent.pools.put_fresh(&key, sb, Instant::now()),
                                Err(e) => {
                                    agent.pools.start_failed(&key);
                                    tracing::warn!(language = %key.language, error = %e, "filling the pool failed");
                                    tokio::time::sleep(Duration::from_secs(1)).await;
                                }
                            }
                        });
                    }
                }
            }
            for (lang, n) in self.pools.warm_counts() {
                metrics::gauge!("codefleet_warm_sandboxes", "language" => lang).set(n as f64);
            }
            metrics::gauge!("codefleet_slots_busy").set(self.busy.load(Ordering::SeqCst) as f64);
            let reachable = self.docker_ok.load(Ordering::SeqCst);
            metrics::gauge!("codefleet_docker_reachable").set(f64::from(u8::from(reachable)));
            let _ = tokio::time::timeout(Duration::from_millis(500), self.refill.notified()).await;
        }
    }
}

/// How long to wait for a job's answer: its own limits plus a margin.
pub fn job_deadline(l: &ResolvedLimits) -> Duration {
    Duration::from_millis(l.compile_wall_time_ms + l.wall_time_ms) + ANSWER_MARGIN
}

/// `ex_…`, `se_…`: a prefix and 16 random hex digits.
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}_{:016x}", rand::random::<u64>())
}

/// Builds the answer from the stages that ran.
pub fn respond(
    agent: &Agent,
    id: String,
    p: &Prepared,
    stages: Vec<StageOutcome>,
    (received, queued): (Instant, Duration),
    source: &str,
) -> ExecuteResponse {
    let mut compile = None;
    let mut run = None;
    for s in stages {
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
    ExecuteResponse {
        id,
        language: LanguageRef {
            name: p.language.name.clone(),
            version: p.version.clone(),
        },
        status,
        compile,
        run,
        node: agent.node().to_string(),
        timing: Timing {
            queued_ms: queued.as_millis() as u64,
            total_ms: received.elapsed().as_millis() as u64,
        },
        sandbox: Some(source.to_string()),
        attempts: None,
        request_id: None,
    }
}

/// The answer for a job the node failed (never the program's doing); counted by cause.
pub fn internal_error(
    agent: &Agent,
    id: String,
    p: &Prepared,
    timing: (Instant, Duration),
    cause: &'static str,
    why: &str,
) -> ExecuteResponse {
    metrics::counter!("codefleet_internal_errors_total", "cause" => cause).increment(1);
    let stderr = format!("codefleet: the sandbox failed: {why}\n");
    failed_answer(agent, id, p, timing, Status::InternalError, stderr)
}

/// An answer whose one stage is `status` with `stderr` saying why, and nothing else ran.
fn failed_answer(
    agent: &Agent,
    id: String,
    p: &Prepared,
    (received, queued): (Instant, Duration),
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
    ExecuteResponse {
        id,
        language: LanguageRef {
            name: p.language.name.clone(),
            version: p.version.clone(),
        },
        status,
        compile: None,
        run: Some(failed),
        node: agent.node().to_string(),
        timing: Timing {
            queued_ms: queued.as_millis() as u64,
            total_ms: received.elapsed().as_millis() as u64,
        },
        sandbox: None,
        attempts: None,
        request_id: None,
    }
}

/// 503 for work that arrives while this node's Docker engine does not answer.
pub fn docker_unreachable(node: &str) -> Problem {
    Problem::new(
        ErrorCode::NoCapacity,
        format!("node {node} cannot reach its Docker engine"),
    )
    .with_retry_after(2)
}

fn record(r: &ExecuteResponse, p: &Prepared) {
    let lang = p.language.name.clone();
    metrics::counter!("codefleet_executions_total", "language" => lang.clone(), "status" => r.status.as_str()).increment(1);
    for (stage, result) in [("compile", &r.compile), ("run", &r.run)] {
        if let Some(s) = result {
            metrics::histogram!("codefleet_execution_stage_seconds", "language" => lang.clone(), "stage" => stage)
                .record(s.wall_time_ms as f64 / 1e3);
        }
    }
    metrics::histogram!("codefleet_execution_duration_seconds", "language" => lang)
        .record(r.timing.total_ms as f64 / 1e3);
}
