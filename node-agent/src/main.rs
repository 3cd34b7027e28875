//! `codefleet-agent`: read the configuration, start tracing, bind, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use codefleet_node_agent::lease::LeaseHeld;
use codefleet_node_agent::{prepare_images, serve, telemetry, Config};

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::try_parse() {
        Ok(c) => c,
        Err(e) if e.use_stderr() => {
            let _ = e.print();
            return ExitCode::from(64);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    telemetry::init_tracing();
    if config.prepare_only {
        return match prepare_images(config).await {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("codefleet-agent: {e:#}");
                ExitCode::from(1)
            }
        };
    }
    let listener = match tokio::net::TcpListener::bind(config.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("codefleet-agent: cannot listen on {}: {e}", config.listen);
            return ExitCode::from(64);
        }
    };
    match serve(config, listener, shutdown_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        // Another agent serves this node id: a configuration error, like a bad flag.
        Err(e) if e.downcast_ref::<LeaseHeld>().is_some() => {
            eprintln!("codefleet-agent: {e:#}");
            ExitCode::from(64)
        }
        Err(e) => {
            eprintln!("codefleet-agent: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
