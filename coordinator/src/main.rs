use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use image_backup_coordinator::{
    cli::{Cli, Command},
    metrics::Metrics,
    restore::restore,
    run::run,
};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .init();
    match start(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn start(cli: Cli) -> anyhow::Result<()> {
    let config = kube::Config::infer().await.context("finding the Kubernetes API (KUBECONFIG or in-cluster)")?;
    if let Some(Command::Restore(args)) = &cli.command {
        let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
        let report = restore(client, args).await?;
        print!("{}", report.lines);
        println!("{} workload(s) restored", report.restored);
        return Ok(());
    }
    let metrics = Metrics::new();
    let client = metrics.counted_client(config).context("building the Kubernetes client")?;
    let listener =
        tokio::net::TcpListener::bind(cli.grpc_addr).await.with_context(|| format!("binding {}", cli.grpc_addr))?;
    let metrics_listener = tokio::net::TcpListener::bind(cli.metrics_addr)
        .await
        .with_context(|| format!("binding {}", cli.metrics_addr))?;
    run(client, cli.config(), listener, metrics_listener, cli.id.clone(), metrics, shutdown_signal()).await?;
    Ok(())
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        },
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
