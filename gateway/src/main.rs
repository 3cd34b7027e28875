//! `codefleet-gateway`: reads the configuration, starts tracing, binds, and serves until SIGINT
//! or SIGTERM. Exits 64 on a bad configuration.
//!
//! `--dev` (a node agent in this process) is the only use of the agent crate, behind the
//! default-on `dev` feature; a gateway built without it answers `--dev` with exit 64.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use codefleet_gateway::Config;
#[cfg(feature = "dev")]
use codefleet_node_agent::lease::LeaseHeld;
use codefleet_shared::ids::NodeId;
use tracing_subscriber::EnvFilter;

/// `EX_USAGE` from sysexits.h.
const BAD_CONFIG: u8 = 64;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse().map_err(|e| (e.use_stderr(), e)) {
        Ok(config) => config,
        Err((false, help)) => {
            let _ = help.print();
            return ExitCode::SUCCESS;
        }
        Err((true, error)) => {
            let _ = error.print();
            return ExitCode::from(BAD_CONFIG);
        }
    };
    let config = match config.validate() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("codefleet-gateway: bad configuration: {error}");
            return ExitCode::from(BAD_CONFIG);
        }
    };
    if let Some(Err(error)) = config.dev_node_id.as_deref().map(NodeId::parse) {
        eprintln!("codefleet-gateway: bad configuration: --dev-node-id: {error}");
        return ExitCode::from(BAD_CONFIG);
    }
    if config.dev && !cfg!(feature = "dev") {
        eprintln!(
            "codefleet-gateway: --dev needs a gateway built with the `dev` feature \
             (cargo build -p codefleet-gateway --features dev)"
        );
        return ExitCode::from(BAD_CONFIG);
    }
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
        // The `--dev` agent's node id is held by another live agent on this machine.
        #[cfg(feature = "dev")]
        Err(error) if error.downcast_ref::<LeaseHeld>().is_some() => {
            eprintln!("codefleet-gateway: {error:#}");
            ExitCode::from(BAD_CONFIG)
        }
        Err(error) => {
            tracing::error!(error = format!("{error:#}"), "gateway failed");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    // One signal stops both the gateway and, in `--dev`, its local agent.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    #[cfg(feature = "dev")]
    let dev_agent = if config.dev {
        let gateway_url = format!("http://{}", listener.local_addr()?);
        Some(start_dev_agent(&gateway_url, &config, stopped(stop_rx.clone())).await?)
    } else {
        None
    };
    #[cfg(not(feature = "dev"))]
    let dev_agent: Option<tokio::task::JoinHandle<anyhow::Result<()>>> = None;
    tokio::spawn(async move {
        shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let served = codefleet_gateway::serve(config, listener, stopped(stop_rx)).await;
    if let Some(agent) = dev_agent {
        // The agent drains and removes its containers before the process exits.
        agent.await??;
    }
    served
}

/// `--dev`: a node agent in this process on the local Docker engine, reporting to this gateway
/// with its cluster token. Its images are prepared in the background with progress in the log;
/// `GET /v1/languages` shows each one as it becomes ready.
#[cfg(feature = "dev")]
async fn start_dev_agent(
    gateway_url: &str,
    config: &Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio::task::JoinHandle<anyhow::Result<()>>> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let node = match &config.dev_node_id {
        Some(node) => node.clone(),
        None => dev_node_id(config.listen.port()),
    };
    let mut agent = codefleet_node_agent::Config::for_node(&node, address);
    agent.gateways = vec![gateway_url.to_string()];
    agent.cluster_token = config.cluster_token.clone();
    agent.advertise = Some(format!("http://{address}"));
    tracing::info!(agent = %address, %node, "dev mode: starting a local agent");
    codefleet_node_agent::telemetry::prometheus();
    // Built here, before serving, so a node id another agent holds stops the gateway at once.
    let agent = codefleet_node_agent::build(agent)?;
    Ok(tokio::spawn(codefleet_node_agent::run(
        agent, listener, shutdown,
    )))
}

/// `dev-<host name>-<port>`, reduced to the characters a node id may hold.
#[cfg(feature = "dev")]
fn dev_node_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    match host.is_empty() {
        true => format!("dev-{port}"),
        false => format!("dev-{host}-{port}"),
    }
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    let mut terminate =
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(signal) => signal,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; stopping on SIGINT only");
                let _ = interrupt.await;
                return;
            }
        };
    tokio::select! {
        _ = interrupt => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutdown signal received");
}
