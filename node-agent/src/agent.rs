//! The node agent put together: the image registry, the slots, the sandboxes (pools, starts,
//! resets), the sessions, the runner (the one job path) and the lifecycle flags, each owning
//! its state behind methods. Dependencies go one way: `http` → `agent` → `runner` →
//! `sessions`, `sandboxes`, `slots` → `registry`, `lifecycle`, `pool`, `sandbox` → `docker`.
//! What is here is the glue: admitting a job (lifecycle, then a slot), session creation, the
//! capacity report, and preparing the language images.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, Semaphore};

use codefleet_shared::cluster::{CapacityReport, LanguageCapacity, RuntimeCapacity};
use codefleet_shared::ids::{NodeId, SessionId};
use codefleet_shared::sandbox::{Job, Stage};
use codefleet_shared::stream::JobEvent;
use codefleet_shared::validate::resolve_limits;
use codefleet_shared::{
    CreateSession, ErrorCode, ExecuteRequest, ExecuteResponse, ImageState, LanguageInfo,
    LanguageRef, Problem, ResolvedLimits, SessionInfo,
};

use crate::catalog::{parse_version, Catalog, Language};
use crate::config::Config;
use crate::engine::{Engine, EngineError};
use crate::error::AgentError;
use crate::housekeeping::{self, Housekeeper, Wanted};
use crate::images::{self, Obtained, Plan};
use crate::job::{new_id, Prepared, OPEN_FILES};
use crate::lease::NodeLease;
use crate::lifecycle::Lifecycle;
use crate::registry::{ImageStatus, Registry};
use crate::runner::{Runner, Stream, Target, Ticket};
use crate::sandbox::{Control, Reaper, Sandbox};
use crate::sandboxes::Sandboxes;
use crate::sessions::{rfc3339, Session, Sessions};
use crate::slots::{Slot, Slots};
use crate::submissions::Submissions;

pub use crate::sandboxes::SANDBOX_OVERHEAD_BYTES;

/// Events a streamed job keeps waiting for its client at most (each at most
/// `shared::stream::CHUNK_BYTES` of output).
const STREAM_EVENTS: usize = 16;

pub struct Agent {
    config: Arc<Config>,
    registry: Arc<Registry>,
    lifecycle: Arc<Lifecycle>,
    slots: Arc<Slots>,
    sandboxes: Arc<Sandboxes>,
    sessions: Arc<Sessions>,
    submissions: Arc<Submissions>,
    runner: Runner,
    housekeeper: Housekeeper,
    /// This agent's hold on its node id (see `lease`); `None` only for agents built by hand.
    lease: Option<NodeLease>,
}

/// A streamed job under way: its events (the last one a `result` or an `error`), the sender of
/// its controls, and the task running it (true when the client stalled or went away).
pub struct Streaming {
    pub events: mpsc::Receiver<JobEvent>,
    pub control: mpsc::Sender<Control>,
    pub task: tokio::task::JoinHandle<bool>,
}

impl Agent {
    pub fn new(
        config: Config,
        catalog: Catalog,
        docker: Arc<dyn Engine>,
        reaper: Reaper,
        supervisor: String,
    ) -> Agent {
        let config = Arc::new(config);
        // Housekeeping keeps the images of every runtime of the catalog file, those `--enable`
        // leaves out included.
        let file = Catalog::load(config.languages.as_deref()).ok();
        let wanted = Wanted::of(
            &[Some(&catalog), file.as_ref()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>(),
            config.images_dir.as_deref(),
            config.registry.as_deref(),
        );
        let housekeeper = Housekeeper::new(
            wanted,
            &config.image_cache,
            Duration::from_secs(config.image_grace_s),
        );
        let registry = Arc::new(Registry::new(catalog, &config.node_id));
        let lifecycle = Arc::new(Lifecycle::default());
        let slots = Arc::new(Slots::new(
            config.slots,
            config.queue_length(),
            Duration::from_millis(config.queue_wait_ms),
            &config.node_id,
        ));
        let sandboxes = Arc::new(Sandboxes::new(
            config.clone(),
            registry.clone(),
            lifecycle.clone(),
            (docker, reaper, supervisor),
        ));
        let sessions = Arc::new(Sessions::new(config.max_sessions));
        let submissions = Arc::new(Submissions::new(&config));
        let runner = Runner::new(
            config.clone(),
            lifecycle.clone(),
            sandboxes.clone(),
            sessions.clone(),
        );
        Agent {
            config,
            registry,
            lifecycle,
            slots,
            sandboxes,
            sessions,
            submissions,
            runner,
            housekeeper,
            lease: None,
        }
    }

    /// Holds `lease` for as long as the agent lives.
    pub fn with_lease(mut self, lease: NodeLease) -> Agent {
        self.lease = Some(lease);
        self
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn node(&self) -> &str {
        &self.config.node_id
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn lifecycle(&self) -> &Lifecycle {
        &self.lifecycle
    }

    pub fn sandboxes(&self) -> &Arc<Sandboxes> {
        &self.sandboxes
    }

    pub fn sessions(&self) -> &Arc<Sessions> {
        &self.sessions
    }

    pub fn submissions(&self) -> &Arc<Submissions> {
        &self.submissions
    }

    pub fn slots(&self) -> &Arc<Slots> {
        &self.slots
    }

    pub(crate) fn runner(&self) -> &Runner {
        &self.runner
    }

    pub fn docker(&self) -> &dyn Engine {
        self.sandboxes.docker()
    }

    pub fn is_ready(&self) -> bool {
        self.lifecycle.is_ready()
    }

    pub fn languages(&self) -> Vec<LanguageInfo> {
        self.registry.languages()
    }

    /// Validates an execute request completely; nothing runs for a rejected one.
    pub fn prepare(&self, req: &ExecuteRequest) -> Result<Prepared, Problem> {
        let (language, version, _) = self
            .registry
            .resolve(req.language.as_deref(), req.version.as_deref())?;
        Prepared::new(req, (language, version), &self.config)
    }

    /// Validates an execute request in session `id`: the session's language, and no more
    /// memory than its container has.
    pub fn prepare_in_session(
        &self,
        id: &str,
        req: &ExecuteRequest,
    ) -> Result<(Prepared, Target), Problem> {
        let session = self.sessions.get(id)?;
        let fixed = (session.language.clone(), session.version.clone());
        let prepared = Prepared::new(req, fixed, &self.config)?;
        if prepared.limits.memory_bytes > session.limits.memory_bytes {
            return Err(Problem::new(
                ErrorCode::LimitExceedsMax,
                format!(
                    "limits.memory_bytes is above this session's {}",
                    session.limits.memory_bytes
                ),
            ));
        }
        Ok((prepared, Target::Session(session)))
    }

    /// Admits a job: refused while draining or without an engine, else a slot (queueing at
    /// most `wait`, bounded by `--queue-wait-ms`).
    pub async fn admit(&self, wait: Option<Duration>) -> Result<Slot, AgentError> {
        if let Some(refusal) = self.lifecycle.refusal(self.node()) {
            return Err(AgentError::unavailable(refusal));
        }
        Ok(self.slots.take(wait).await?)
    }

    /// Runs a validated job and answers as `/v1/execute` does. `wait` is the most the caller
    /// lets it queue for a slot.
    pub async fn execute(
        &self,
        prepared: Prepared,
        target: Target,
        (received, request_id): (Instant, Option<String>),
        wait: Option<Duration>,
    ) -> Result<ExecuteResponse, AgentError> {
        let slot = self.admit(wait).await?;
        let ticket = Ticket::new(received, request_id);
        self.runner
            .run(slot, &prepared, target, &ticket, None)
            .await
    }

    /// Admits a validated job and starts it streamed; refusals come back before any event.
    pub async fn execute_streamed(
        self: &Arc<Self>,
        prepared: Prepared,
        target: Target,
        (received, request_id): (Instant, Option<String>),
        wait: Option<Duration>,
    ) -> Result<Streaming, AgentError> {
        let slot = self.admit(wait).await?;
        let ticket = Ticket::new(received, request_id);
        let (stream, events, control) = Stream::new(STREAM_EVENTS);
        let agent = self.clone();
        let span = tracing::Span::current();
        let task = tokio::spawn(tracing::Instrument::instrument(
            async move {
                agent
                    .runner
                    .run_streamed(slot, prepared, target, ticket, stream)
                    .await
            },
            span,
        ));
        Ok(Streaming {
            events,
            control,
            task,
        })
    }

    pub async fn create_session(&self, req: CreateSession) -> Result<SessionInfo, AgentError> {
        if self.lifecycle.draining() {
            return Err(AgentError::unavailable(Problem::new(
                ErrorCode::NoCapacity,
                format!("node {} is draining", self.node()),
            )));
        }
        let (language, version, _) = self
            .registry
            .resolve(req.language.as_deref(), req.version.as_deref())?;
        let limits = resolve_limits(
            req.limits.as_ref(),
            &self.config.default_limits(),
            &self.config.max_limits(),
        )?;
        let ttl_s = req.ttl_s.unwrap_or(self.config.session_ttl_s);
        if ttl_s == 0 || ttl_s > self.config.session_max_ttl_s {
            let code = if ttl_s == 0 {
                ErrorCode::InvalidRequest
            } else {
                ErrorCode::LimitExceedsMax
            };
            let why = format!(
                "ttl_s must be between 1 and {}",
                self.config.session_max_ttl_s
            );
            return Err(Problem::new(code, why).into());
        }
        let full = || {
            AgentError::unavailable(Problem::new(
                ErrorCode::NoCapacity,
                format!("node {} holds its maximum of sessions", self.node()),
            ))
        };
        if !self.sessions.has_room() {
            return Err(full());
        }
        let key = self.sandboxes.key(&language, limits.memory_bytes);
        let sandbox = self.sandboxes.start(&key, "session").await.map_err(|e| {
            tracing::error!(error = %e, "starting a session sandbox failed");
            AgentError::unavailable(Problem::new(
                ErrorCode::Internal,
                format!("could not start the session's sandbox: {e}"),
            ))
        })?;
        let node = NodeId::parse(self.node()).map_err(|e| {
            AgentError::unavailable(Problem::new(
                ErrorCode::Internal,
                format!("this node's id: {e}"),
            ))
        })?;
        let id = SessionId::new(node, rand::random()).to_string();
        let session = Arc::new(Session::new(
            id.clone(),
            language,
            version,
            limits,
            Duration::from_secs(ttl_s),
            sandbox,
        ));
        let info = SessionInfo {
            id,
            language: LanguageRef {
                name: session.language.name.clone(),
                version: session.version.clone(),
            },
            node: self.node().to_string(),
            expires_at: rfc3339(session.expires_at()),
        };
        self.sessions.insert(session).map_err(|_| full())?;
        Ok(info)
    }

    /// The capacity report: every runtime in `runtimes` (newest first within a language), and
    /// in `languages` each language's first, the one a request without `version` gets.
    pub fn capacity(&self) -> CapacityReport {
        let warm = self.sandboxes.warm_counts();
        let runtimes: Vec<RuntimeCapacity> = self
            .registry
            .runtimes()
            .into_iter()
            .map(|(id, l)| RuntimeCapacity {
                capacity: LanguageCapacity {
                    image: l.image.unwrap_or(ImageState::Preparing),
                    warm: warm.get(&id).copied().unwrap_or(0),
                    version: l.version,
                    aliases: l.aliases,
                    compiled: l.compiled,
                    file_name: l.file_name,
                    error: l.error,
                },
                name: l.name,
                runtime: id,
            })
            .collect();
        let mut languages: BTreeMap<String, LanguageCapacity> = BTreeMap::new();
        for r in &runtimes {
            languages
                .entry(r.name.clone())
                .or_insert_with(|| r.capacity.clone());
        }
        CapacityReport {
            node_id: self.config.node_id.clone(),
            address: self
                .config
                .advertise
                .clone()
                .unwrap_or_else(|| format!("http://{}", self.config.listen)),
            slots_total: self.slots.total(),
            slots_busy: self.slots.busy(),
            queued: self.slots.queued(),
            draining: self.lifecycle.draining(),
            ready: self.lifecycle.up(),
            languages,
            sessions: self.sessions.len() as u32,
            runtimes,
            image_bytes: self.housekeeper.image_bytes(),
        }
    }

    /// Finds, pulls or builds one runtime's image, then reads its version from it.
    pub async fn prepare_image(
        self: &Arc<Self>,
        lang: &Language,
    ) -> Result<(String, String, Obtained), String> {
        let started = Instant::now();
        let config = &self.config;
        let plan = Plan::of(
            lang,
            config.images_dir.as_deref(),
            config.registry.as_deref(),
        )?;
        let obtained = images::obtain(
            self.docker(),
            &plan,
            &config.image_cache,
            config.registry.as_deref(),
            &lang.runtime(),
        )
        .await?;
        let tag = plan.tag;
        // Read the version from the image itself, through a real sandbox.
        self.registry.set(
            &lang.runtime(),
            ImageStatus::Ready {
                tag: tag.clone(),
                version: String::new(),
            },
        );
        let version = self.probe_version(lang).await;
        metrics::histogram!("codefleet_image_prepare_seconds", "language" => lang.name.clone())
            .record(started.elapsed().as_secs_f64());
        version.map(|v| (tag, v, obtained))
    }

    async fn probe_version(&self, lang: &Language) -> Result<String, String> {
        let key = self.sandboxes.default_key(lang);
        let mut sandbox = self
            .sandboxes
            .start(&key, "probe")
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
            outputs: None,
            snapshot_max_bytes: 0,
        };
        let stages = sandbox
            .run(job, Duration::from_secs(30), None)
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

    /// Prepares every runtime independently, `--prepare-parallel` at once; one failing does
    /// not stop the others. `done` is told of each as it ends (how, in how long, or why not).
    pub async fn prepare_all(
        self: &Arc<Self>,
        done: impl Fn(ImagePrepared) + Send + Sync + 'static,
    ) {
        let permits = usize::try_from(self.config.prepare_parallel).unwrap_or(1);
        let permits = Arc::new(Semaphore::new(permits));
        let done = Arc::new(done);
        let mut tasks = Vec::new();
        for lang in self.registry.catalog().languages.clone() {
            let agent = self.clone();
            let permits = permits.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let _permit = permits.acquire().await;
                let started = Instant::now();
                let runtime = lang.runtime();
                let (status, outcome) = match agent.prepare_image(&lang).await {
                    Ok((tag, version, obtained)) => {
                        tracing::info!(language = %lang.name, %runtime, %version, %tag, how = obtained.as_str(), "language ready");
                        (ImageStatus::Ready { tag, version: version.clone() }, Ok((version, obtained)))
                    }
                    Err(why) => {
                        metrics::counter!("codefleet_image_prepare_failures_total", "language" => lang.name.clone()).increment(1);
                        tracing::error!(language = %lang.name, %runtime, error = %why, "language unavailable");
                        (ImageStatus::Failed(why.clone()), Err(why))
                    }
                };
                agent.registry.set(&runtime, status);
                agent.sandboxes.refill_soon();
                done(ImagePrepared {
                    runtime,
                    outcome,
                    took: started.elapsed(),
                });
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// One housekeeping pass over the engine's images (see `housekeeping`).
    pub async fn housekeep_images(&self) -> Result<housekeeping::Pass, EngineError> {
        let serving: Vec<String> = self
            .registry
            .catalog()
            .languages
            .iter()
            .filter_map(|l| self.registry.ready_tag(&l.runtime()).ok())
            .collect();
        self.housekeeper
            .pass(self.docker(), &serving, Instant::now())
            .await
    }
}

/// How preparing one runtime's image ended.
#[derive(Debug, Clone)]
pub struct ImagePrepared {
    pub runtime: String,
    /// The version read and how the image came to be present, or why it is not usable.
    pub outcome: Result<(String, Obtained), String>,
    pub took: Duration,
}

/// Sandboxes left in the pools and sessions at shutdown, for the caller to drop.
impl Agent {
    /// Stops pool starts and resets (waiting for those under way) and takes out every pooled
    /// and session sandbox.
    pub async fn shutdown_sandboxes(&self) -> Vec<Sandbox> {
        let mut left = self.sandboxes.shutdown().await;
        for session in self.sessions.drain() {
            left.extend(session.sandbox.lock().await.take());
        }
        left
    }
}
