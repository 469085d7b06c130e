use std::process::ExitCode;

use clap::Parser;
use image_backup_agent::cli::{Cli, Command, run};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // The daemon's log is what an operator reads with `kubectl logs`; the
    // push command draws progress on stderr and speaks only of trouble.
    let default = match cli.command {
        Command::Run(_) => "info",
        Command::Push(_) => "warn",
    };
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default)))
        .with_writer(std::io::stderr)
        .init();
    run(cli).await
}
