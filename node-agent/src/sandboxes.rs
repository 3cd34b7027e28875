//! Where jobs get their sandboxes: the warm pools (taking a ready one, waiting a little for one
//! being reset), cold starts, the warm-up of new pool sandboxes, resets after a job, and the
//! refill loop that keeps each pool at its target. Starts and resets run as tasks tracked here,
//! so shutdown cancels them and waits for them instead of polling Docker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use codefleet_shared::validate::JobFile;
use codefleet_shared::{Isolation, ResolvedLimits, Status};

use crate::catalog::Language;
use crate::compile_cache::CompileCache;
use crate::config::Config;
use crate::engine::{Engine, SandboxSpec};
use crate::job::{Prepared, OPEN_FILES};
use crate::lifecycle::Lifecycle;
use crate::pool::{InUse, PoolKey, Pools, Sizing, Source};
use crate::registry::Registry;
use crate::sandbox::{Reaper, Sandbox, SandboxError};

/// Memory a sandbox gets above the job's limit, for the supervisor and the kernel's page cache.
pub const SANDBOX_OVERHEAD_BYTES: u64 = 16 << 20;
/// Container starts under way at once (each costs the engine real CPU).
const PARALLEL_STARTS: usize = 2;
/// How long a `recycled` job waits for a sandbox being reset before taking a never-used one.
const RESET_WAIT: Duration = Duration::from_millis(100);
/// How long it waits for a reset when no never-used sandbox is ready either (the alternative is
/// a cold start): a reset answers or fails within its own deadline of 10 s.
const RESET_WAIT_NO_FRESH: Duration = Duration::from_secs(10);

pub struct Sandboxes {
    config: Arc<Config>,
    registry: Arc<Registry>,
    lifecycle: Arc<Lifecycle>,
    docker: Arc<dyn Engine>,
    reaper: Reaper,
    supervisor: String,
    pools: Pools,
    starts: Arc<Semaphore>,
    /// Wakes the refill loop.
    refill: Notify,
    /// Woken whenever a reset sandbox is back in a pool.
    returned: Notify,
    /// Pool starts and resets under way.
    tasks: TaskTracker,
    /// Cancelled at shutdown: tracked tasks stop at their next await.
    stop: CancellationToken,
    /// Programs compiled here, for jobs that send the same program again.
    compile_cache: CompileCache,
}

impl Sandboxes {
    pub fn new(
        config: Arc<Config>,
        registry: Arc<Registry>,
        lifecycle: Arc<Lifecycle>,
        (docker, reaper, supervisor): (Arc<dyn Engine>, Reaper, String),
    ) -> Sandboxes {
        Sandboxes {
            registry,
            lifecycle,
            docker,
            reaper,
            supervisor,
            pools: Pools::default(),
            starts: Arc::new(Semaphore::new(PARALLEL_STARTS)),
            refill: Notify::new(),
            returned: Notify::new(),
            tasks: TaskTracker::new(),
            stop: CancellationToken::new(),
            compile_cache: CompileCache::new(config.compile_cache_bytes),
            config,
        }
    }

    pub fn compile_cache(&self) -> &CompileCache {
        &self.compile_cache
    }

    pub fn docker(&self) -> &dyn Engine {
        &*self.docker
    }

    /// Used sandboxes of `key` being reset right now.
    pub fn resetting(&self, key: &PoolKey) -> u32 {
        self.pools.resetting(key)
    }

    /// The pool of runtime `runtime` at `memory_bytes`.
    pub fn key(&self, runtime: &Language, memory_bytes: u64) -> PoolKey {
        PoolKey {
            language: runtime.name.clone(),
            runtime: runtime.runtime(),
            memory_bytes,
        }
    }

    /// The pool of the default memory limit for `runtime`.
    pub fn default_key(&self, runtime: &Language) -> PoolKey {
        self.key(runtime, self.config.default_limits().memory_bytes)
    }

    /// A pool's bounds: `--pool-min` for the default memory limit of a language's default
    /// runtime (its newest, once none of its runtimes is still being prepared), none for other
    /// runtimes and limits (they keep warm sandboxes by recent demand); at most `--pool-max`.
    pub fn sizing(&self, key: &PoolKey) -> Sizing {
        let default = key.memory_bytes == self.config.default_limits().memory_bytes
            && self.registry.default_runtime(&key.language).as_deref() == Some(&key.runtime);
        let min = if default { self.config.pool_min } else { 0 };
        Sizing {
            min,
            max: self.config.pool_max,
        }
    }

    fn spec(&self, key: &PoolKey, tag: &str, kind: &'static str) -> SandboxSpec {
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
            // worst, the output files in base64 (4/3), a compiled program's files for the compile
            // cache (base64), and room for the rest of the result.
            max_answer_bytes: 12 * max.output_bytes as usize
                + 2 * max.output_files_bytes as usize
                + (self.compile_cache.entry_limit() * 4 / 3) as usize
                + (1 << 20),
        }
    }

    /// Starts a new sandbox for `key` (the cold path, sessions, probes, pool fills).
    pub async fn start(&self, key: &PoolKey, kind: &'static str) -> Result<Sandbox, SandboxError> {
        let tag = self
            .registry
            .ready_tag(&key.runtime)
            .map_err(SandboxError::Failed)?;
        let spec = self.spec(key, &tag, kind);
        let channel_root = self.config.channel_root();
        Sandbox::start(&*self.docker, &spec, &self.reaper, channel_root.as_deref()).await
    }

    /// Runs the language's warm-up program in a new pool sandbox, then resets it: the
    /// first run of a toolchain in a new container pays for loading it, and a user's job should
    /// not. The sandbox still never ran another job, so it serves `fresh` jobs.
    async fn warm_up(&self, key: &PoolKey, mut sandbox: Sandbox) -> Result<Sandbox, SandboxError> {
        let Some(lang) = self.registry.catalog().runtime(&key.runtime) else {
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
            interactive: false,
            outputs: None,
        };
        let job = warmup.job(sandbox.uid, &self.config, false);
        let stages = sandbox.run(job, warmup.deadline(), None).await?;
        if let Some(failed) = stages.iter().find(|s| s.result.status != Status::Ok) {
            tracing::warn!(language = %key.language, stage = %failed.name, stderr = %failed.result.stderr, "warm-up program failed");
        }
        sandbox.reset().await?;
        sandbox.jobs_run = 0;
        Ok(sandbox)
    }

    /// Counts one more job using `key` (for sizing) until the guard is dropped.
    pub fn begin(&self, key: &PoolKey) -> InUse<'_> {
        self.pools.begin(key, Instant::now())
    }

    /// A ready sandbox from the pool: for a `recycled` job a reset one first, waiting for one
    /// being reset (a reset takes milliseconds, a cold start hundreds): a little when a
    /// never-used one is ready, until the reset ends when none is; then one that never ran a job.
    pub async fn take(&self, key: &PoolKey, isolation: Isolation) -> Option<(Sandbox, Source)> {
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
        if sandbox.jobs_run >= self.config.recycle_after || self.lifecycle.draining() {
            return;
        }
        self.pools.begin_reset(&key);
        let this = self.clone();
        self.tasks.spawn(async move {
            let reset = tokio::select! {
                reset = sandbox.reset() => reset,
                () = this.stop.cancelled() => Err(SandboxError::Reset("shutting down".into())),
            };
            let clean = match reset {
                Ok(()) => Some(sandbox),
                Err(e) => {
                    metrics::counter!("codefleet_sandbox_reset_failures_total").increment(1);
                    tracing::warn!(container = %sandbox.id, error = %e, "reset failed; discarding the sandbox");
                    None
                }
            };
            // Dropping what the pool does not take removes it.
            drop(
                this.pools
                    .end_reset(&key, clean, this.sizing(&key), Instant::now()),
            );
            this.returned.notify_waiters();
        });
    }

    /// Asks the refill loop to look now, not at its next tick.
    pub fn refill_soon(&self) {
        self.refill.notify_one();
    }

    /// Ready sandboxes per runtime id.
    pub fn warm_counts(&self) -> std::collections::HashMap<String, u32> {
        self.pools.warm_counts()
    }

    /// Keeps the pools at their target size; runs until the task is aborted.
    pub async fn refill_loop(self: Arc<Self>) {
        loop {
            let wanted: Vec<PoolKey> = self
                .registry
                .serving()
                .iter()
                .map(|runtime| self.default_key(runtime))
                .collect();
            // Sandboxes whose containers died behind our back go before any job is handed one,
            // and the plan below replaces them.
            let dead = self.pools.take_dead(Sandbox::alive);
            if !dead.is_empty() {
                metrics::counter!("codefleet_sandboxes_dead_total").increment(dead.len() as u64);
                tracing::warn!(count = dead.len(), "pooled sandboxes died; replacing them");
                drop(dead);
            }
            if self.lifecycle.is_ready() && !self.stop.is_cancelled() {
                let (refills, idle) = self.pools.plan(|k| self.sizing(k), &wanted, Instant::now());
                drop(idle);
                for refill in refills {
                    for _ in 0..refill.start {
                        self.spawn_start(refill.key.clone());
                    }
                }
            }
            let mut per_language: std::collections::BTreeMap<String, u32> = Default::default();
            for (runtime, n) in self.pools.warm_counts() {
                let language = runtime.split_once('/').map_or(runtime.as_str(), |(l, _)| l);
                *per_language.entry(language.to_string()).or_default() += n;
            }
            for (lang, n) in per_language {
                metrics::gauge!("codefleet_warm_sandboxes", "language" => lang).set(n as f64);
            }
            let reachable = self.lifecycle.docker_ok();
            metrics::gauge!("codefleet_docker_reachable").set(f64::from(u8::from(reachable)));
            let _ = tokio::time::timeout(Duration::from_millis(500), self.refill.notified()).await;
        }
    }

    /// Starts one warm sandbox for `key`'s pool, tracked.
    fn spawn_start(self: &Arc<Self>, key: PoolKey) {
        let this = self.clone();
        self.tasks.spawn(async move {
            let permit = tokio::select! {
                permit = this.starts.clone().acquire_owned() => permit,
                () = this.stop.cancelled() => {
                    this.pools.start_failed(&key);
                    return;
                }
            };
            // A start that has begun is not cut off: the engine could still create a container
            // the agent never heard of after shutdown's last sweep. It is bounded by the engine
            // calls' timeouts; only the warm-up after it stops at shutdown.
            let started = match this.start(&key, "pool").await {
                Ok(sandbox) => tokio::select! {
                    warm = this.warm_up(&key, sandbox) => warm,
                    () = this.stop.cancelled() => {
                        this.pools.start_failed(&key);
                        return;
                    }
                },
                Err(e) => Err(e),
            };
            drop(permit);
            match started {
                Ok(sb) => this.pools.put_fresh(&key, sb, Instant::now()),
                Err(e) => {
                    this.pools.start_failed(&key);
                    tracing::warn!(language = %key.language, error = %e, "filling the pool failed");
                    tokio::select! {
                        () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        () = this.stop.cancelled() => {}
                    }
                }
            }
        });
    }

    /// Stops starting and resetting: cancels the tracked tasks and waits for them (a start cut
    /// off drops its sandbox, which queues its container's removal), then takes every pooled
    /// sandbox out for the caller to drop.
    pub async fn shutdown(&self) -> Vec<Sandbox> {
        self.stop.cancel();
        self.tasks.close();
        self.tasks.wait().await;
        self.pools.drain()
    }

    /// Takes every pooled sandbox out, without stopping anything (`--prepare-only`).
    pub fn drain(&self) -> Vec<Sandbox> {
        self.pools.drain()
    }
}
