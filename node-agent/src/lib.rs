//! codefleet node agent: owns one Docker engine, prepares language images, keeps warm sandboxes
//! and sessions, runs jobs with limits, and reports its capacity to gateways.
//!
//! Layout (ARCHITECTURE.md has the map and the one way dependencies go): `config` (flags),
//! `catalog` (languages), `images` (recipes, pulls and tags), `housekeeping` (image disk use,
//! stale images removed), `engine` (the seam to the container engine: trait, errors,
//! spec), `docker` (its bollard implementation, the only module that talks to Docker), `sandbox` (one container and its supervisor channel), `pool` (warm sandboxes and
//! their sizing policy), `registry` (image states, language resolution), `lifecycle`, `slots`,
//! `sandboxes` (pools, starts, resets, refills), `sessions`, `submissions` (the async
//! submissions and their store) and `callback` (their callbacks' guard, signature, delivery),
//! `job` (a validated job),
//! `runner` (the one job path, buffered or streamed), `error` (the agent's error type),
//! `agent` (the parts put together), `http` and `connect` (the API, the WebSocket), `report`
//! (capacity reports), `telemetry`.
#![forbid(unsafe_code)]

pub mod agent;
pub mod callback;
pub mod catalog;
pub mod compile_cache;
pub mod config;
pub mod connect;
pub mod docker;
pub mod engine;
pub mod error;
pub mod housekeeping;
pub mod http;
pub mod images;
pub mod job;
pub mod judge;
pub mod lease;
pub mod lifecycle;
pub mod pool;
pub mod registry;
pub mod report;
pub mod runner;
pub mod sandbox;
pub mod sandboxes;
pub mod sessions;
pub mod slots;
pub mod submissions;
pub mod telemetry;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::TcpListener;

pub use crate::agent::Agent;
pub use crate::config::Config;

use crate::catalog::Catalog;
use crate::docker::Docker;
use crate::engine::Engine;
use crate::sandbox::Reaper;

/// Builds the agent from its configuration (without serving). Fails with
/// [`lease::LeaseHeld`] when another live agent on this machine has the same node id.
pub fn build(config: Config) -> anyhow::Result<Arc<Agent>> {
    let lease =
        lease::NodeLease::acquire(&config.run_dir, &config.node_id).map_err(|e| match e {
            lease::LeaseError::Held(held) => anyhow::Error::new(held),
            other => anyhow::Error::new(other),
        })?;
    let catalog = Catalog::load(config.languages.as_deref())
        .and_then(|c| c.restrict(&config.enable))
        .map_err(anyhow::Error::msg)
        .context("loading the language catalog")?;
    let supervisor = config.supervisor_path().context(
        "the sandbox supervisor binary was not found: build it with deploy/build-supervisor.sh or pass --supervisor",
    )?;
    let docker: Arc<dyn Engine> =
        Arc::new(Docker::connect(config.engine_timeouts()).context("connecting to Docker")?);
    let (reaper, _) = Reaper::start(docker.clone());
    let agent = Agent::new(
        config,
        catalog,
        docker,
        reaper,
        supervisor.to_string_lossy().into_owned(),
    );
    Ok(Arc::new(agent.with_lease(lease)))
}

/// Serves the agent API on `listener` until `shutdown` resolves, then drains (in-flight jobs
/// get the configured grace) and removes every container this node owns.
pub async fn serve(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    telemetry::prometheus();
    let agent = build(config)?;
    run(agent, listener, shutdown).await
}

/// Serves an already built agent; see `serve`.
pub async fn run(
    agent: Arc<Agent>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let node = agent.node().to_string();
    tracing::info!(%node, address = %listener.local_addr()?, "agent listening");
    let tasks = vec![
        tokio::spawn(startup(agent.clone())),
        tokio::spawn(health_loop(agent.clone())),
        tokio::spawn(agent.sandboxes().clone().refill_loop()),
        tokio::spawn(agent.sessions().clone().expire_loop()),
        tokio::spawn(report::report_loop(agent.clone())),
        tokio::spawn(submissions::run_loop(agent.clone())),
        tokio::spawn(housekeeping_loop(agent.clone())),
    ];

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let draining = agent.clone();
    let graceful = async move {
        shutdown.await;
        draining.lifecycle().drain();
        tracing::info!(node = %draining.node(), "shutting down: draining in-flight jobs");
        let _ = stop_tx.send(true);
    };
    let app = http::router(agent.clone());
    let server = codefleet_http_edge::serve(listener, app, agent.config().edge_limits(), graceful);
    let grace = Duration::from_secs(agent.config().grace_s);
    // Submissions already running get the same grace; the others run at the next start.
    let submissions = agent.submissions().clone();
    tokio::select! {
        () = async { server.await; submissions.settle(grace).await } => {}
        _ = async {
            let _ = stop_rx.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(grace).await;
        } => tracing::warn!(?grace, "grace period over; stopping with jobs still running"),
    }
    agent.submissions().shutdown();
    // Tell gateways we are going, then clean up everything this node owns.
    if !agent.config().gateways.is_empty() {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()?;
        report::report_once(&agent, &client).await;
    }
    for task in tasks {
        task.abort();
    }
    cleanup(&agent).await;
    tracing::info!(%node, "agent stopped");
    Ok(())
}

/// Waits for Docker, removes what an earlier run of this node left behind, then prepares images.
async fn startup(agent: Arc<Agent>) {
    loop {
        match agent.docker().ping().await {
            Ok(()) => break,
            Err(e) => {
                tracing::warn!(error = %e, "docker unreachable; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
    agent.lifecycle().set_docker_ok(true);
    match remove_owned(agent.docker(), agent.node()).await {
        Ok(0) => {}
        Ok(n) => {
            tracing::info!(node = %agent.node(), removed = n, "removed containers an earlier run left behind")
        }
        Err(e) => tracing::error!(error = %e, "could not list this node's old containers"),
    }
    // The sockets of those containers went with them.
    if let Some(dir) = agent.config().channel_root() {
        let _ = std::fs::remove_dir_all(dir);
    }
    agent.lifecycle().set_started();
    agent.prepare_all(|_| {}).await;
    // Measured at once, now that every runtime's image is known.
    if agent.config().image_housekeeping_s > 0 {
        if let Err(e) = agent.housekeep_images().await {
            tracing::warn!(error = %e, "image housekeeping failed");
        }
    }
}

/// Image housekeeping every `--image-housekeeping-s` (never when 0), the first pass as soon as
/// the engine answers.
async fn housekeeping_loop(agent: Arc<Agent>) {
    let every = agent.config().image_housekeeping_s;
    if every == 0 {
        return;
    }
    loop {
        if agent.lifecycle().up() {
            if let Err(e) = agent.housekeep_images().await {
                tracing::warn!(error = %e, "image housekeeping failed");
            }
        }
        tokio::time::sleep(Duration::from_secs(every)).await;
    }
}

async fn health_loop(agent: Arc<Agent>) {
    loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let ok = agent.docker().ping().await.is_ok();
        if agent.lifecycle().set_docker_ok(ok) {
            tracing::warn!(reachable = ok, "docker reachability changed");
        }
    }
}

/// Removes every container labelled with `node`; returns how many there were.
pub async fn remove_owned(docker: &dyn Engine, node: &str) -> Result<usize, engine::EngineError> {
    let ids = docker.list_owned(node).await?;
    let removals = ids.iter().map(|id| docker.remove(id));
    for r in futures_util::future::join_all(removals).await {
        if let Err(e) = r {
            tracing::warn!(error = %e, "removing an owned container failed");
        }
    }
    Ok(ids.len())
}

/// Stops pool starts and resets (waiting for them), drops pools and sessions, and sweeps until
/// no container of this node is left for a second (a removal queued by a dropped sandbox, or a
/// create the engine was still working on, may still land, hence the repeat).
async fn cleanup(agent: &Agent) {
    drop(agent.shutdown_sandboxes().await);
    if let Some(dir) = agent.config().channel_root() {
        let _ = std::fs::remove_dir_all(dir);
    }
    let mut quiet_rounds = 0;
    for _ in 0..20 {
        match remove_owned(agent.docker(), agent.node()).await {
            Ok(0) => quiet_rounds += 1,
            Ok(_) => quiet_rounds = 0,
            Err(e) => tracing::warn!(error = %e, "cleanup sweep failed"),
        }
        if quiet_rounds >= 4 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `--prepare-only`: finds or builds every language image and reads its version. Returns
/// whether all are ready.
pub async fn prepare_images(mut config: Config) -> anyhow::Result<bool> {
    config.node_id = format!("prepare-{}", std::process::id());
    let agent = build(config)?;
    agent
        .docker()
        .ping()
        .await
        .context("Docker is unreachable")?;
    agent.lifecycle().set_docker_ok(true);
    agent.lifecycle().set_started();
    let all = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let failed = all.clone();
    agent
        .prepare_all(move |p| {
            let (state, detail) = match &p.outcome {
                Ok((version, obtained)) => ("ready", format!("{version} ({})", obtained.as_str())),
                Err(why) => {
                    failed.store(false, std::sync::atomic::Ordering::Relaxed);
                    ("failed", why.clone())
                }
            };
            println!(
                "{:<28} {:<7} {:>7.1} s  {detail}",
                p.runtime,
                state,
                p.took.as_secs_f64()
            );
        })
        .await;
    cleanup(&agent).await;
    Ok(all.load(std::sync::atomic::Ordering::Relaxed))
}
