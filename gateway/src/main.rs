//! `codefleet-gateway`: reads the configuration, starts tracing, binds, and serves until SIGINT
//! or SIGTERM. Exits 64 on a bad configuration.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use codefleet_gateway::Config;
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
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    match run(config).await {
        Ok(()) => ExitCode::SUCCESS,
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
    if config.dev {
        let gateway_url = format!("http://{}", listener.local_addr()?);
        start_dev_agent(&gateway_url, &config).await?;
    }
    codefleet_gateway::serve(config, listener, shutdown_signal()).await
}

/// TODO(dev agent): start a node agent in-process on the local Docker engine, reporting to
/// `gateway_url` with the gateway's cluster token, preparing images with visible progress. To be
/// wired to the node-agent crate; until then `--dev` fails with this error.
async fn start_dev_agent(gateway_url: &str, config: &Config) -> anyhow::Result<()> {
    let _ = (gateway_url, &config.cluster_token);
    anyhow::bail!("dev agent not wired yet")
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
