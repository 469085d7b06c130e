//! Command-line interface of `image-backup-agent`. Every flag can also be
//! given through the environment, as a DaemonSet manifest sets them.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args, Parser, Subcommand};

use crate::{
    containerd::{ContainerdStore, K8S_NAMESPACE, ReadPath},
    daemon::{Agent, DaemonConfig},
    guard::Guard,
    link::{CoordinatorLink, LinkTls},
    progress::{Progress, spawn_printer},
    push::{PushOptions, Pusher, Scope, SourceAccess},
};
use image_backup_oci::{
    BackupTarget, ImageRef,
    access::RegistryAccess,
    registry::{RegistryConfig, RetryPolicy},
};

#[derive(Parser, Debug)]
#[command(name = "image-backup-agent", version, about = "Copies images from a node's containerd to a backup registry")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Copy one image from containerd's content store to a registry.
    Push(PushArgs),
    /// Run as the node's agent: keep a session with the coordinator and run
    /// the copies it assigns.
    Run(RunArgs),
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Coordinator gRPC endpoint.
    #[arg(
        long,
        env = "IMAGE_BACKUP_COORDINATOR",
        default_value = "https://image-backup-coordinator.image-backup.svc:50051"
    )]
    pub coordinator: String,
    /// The CA the coordinator's certificate is checked against (the
    /// ConfigMap the coordinator publishes, mounted).
    #[arg(long, env = "IMAGE_BACKUP_COORDINATOR_CA", default_value = "/etc/image-backup/ca/ca.crt")]
    pub coordinator_ca: PathBuf,
    /// The name the coordinator's certificate must carry, when it is not
    /// the host of --coordinator.
    #[arg(long, env = "IMAGE_BACKUP_COORDINATOR_NAME")]
    pub coordinator_name: Option<String>,
    /// Talk to the coordinator in plain text (an http:// URL): its token and
    /// jobs then cross the network readable.
    #[arg(long, env = "IMAGE_BACKUP_PLAINTEXT")]
    pub plaintext: bool,
    /// The agent's projected ServiceAccount token, read for every session.
    #[arg(long, env = "IMAGE_BACKUP_TOKEN_FILE", default_value = "/var/run/secrets/image-backup/token")]
    pub token_file: PathBuf,
    /// Name of the node this agent runs on (downward API spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Identity of this agent (downward API metadata.name); the node name
    /// when unset.
    #[arg(long, env = "POD_NAME")]
    pub agent_id: Option<String>,
    /// Copies run at once.
    #[arg(long, env = "IMAGE_BACKUP_MAX_JOBS", default_value_t = 2)]
    pub max_jobs: u32,
    /// The backup registry (host[:port]): the only registry this agent
    /// pushes to.
    #[arg(long, env = "IMAGE_BACKUP_REGISTRY")]
    pub backup_registry: String,
    /// Repository prefix in the backup registry: the only place pushed to.
    #[arg(long, env = "IMAGE_BACKUP_PREFIX", default_value = "backup")]
    pub backup_prefix: String,
    /// A copy still running after this long is stopped and reported failed.
    #[arg(long, env = "IMAGE_BACKUP_JOB_TIMEOUT", default_value = "30m", value_parser = humantime::parse_duration)]
    pub job_timeout: Duration,
}

#[derive(Args, Debug)]
pub struct ContainerdArgs {
    /// containerd's gRPC socket.
    #[arg(long = "containerd", env = "IMAGE_BACKUP_CONTAINERD", default_value = "/run/containerd/containerd.sock")]
    pub socket: PathBuf,
    /// containerd namespace holding the images (the kubelet's is k8s.io).
    #[arg(long, env = "IMAGE_BACKUP_NAMESPACE", default_value = K8S_NAMESPACE)]
    pub namespace: String,
    /// How blob bytes are read: `auto` uses containerd's content directory
    /// when it is visible here (several times cheaper), else the API.
    #[arg(long, env = "IMAGE_BACKUP_CONTENT_READ", value_enum, default_value = "auto")]
    pub content_read: ReadPath,
}

#[derive(Args, Debug)]
pub struct RegistryArgs {
    #[command(flatten)]
    pub access: RegistryAccess,
    /// Give up on a failing registry call after this long (e.g. 2m, 30s).
    #[arg(long = "retry-timeout", env = "IMAGE_BACKUP_RETRY_TIMEOUT", default_value = "2m", value_parser = humantime::parse_duration)]
    pub retry_timeout: Duration,
    /// Blobs uploaded at once.
    #[arg(long, env = "IMAGE_BACKUP_PARALLEL_BLOBS", default_value_t = 4)]
    pub parallel_blobs: usize,
}

#[derive(Args, Debug)]
pub struct PushArgs {
    #[command(flatten)]
    pub containerd: ContainerdArgs,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Image as the kubelet ran it: name with tag, digest, or both.
    pub source: String,
    /// Where to push it, e.g. backup.example.com/mirror/docker.io/library/nginx:1.25.
    pub target: String,
}

impl RegistryArgs {
    pub fn config(&self) -> RegistryConfig {
        self.access.config(RetryPolicy { max_elapsed: self.retry_timeout, ..RetryPolicy::default() })
    }

    pub fn options(&self) -> PushOptions {
        PushOptions { parallel_blobs: self.parallel_blobs, ..PushOptions::default() }
    }
}

pub async fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::Run(args) => match daemon(args).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Push(args) => match push(args).await {
            Ok(pinned) => {
                println!("{pinned}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

async fn daemon(args: RunArgs) -> anyhow::Result<()> {
    let store = ContainerdStore::connect(&args.containerd.socket, &args.containerd.namespace)
        .await?
        .with_read_path(args.containerd.content_read)
        .await;
    let pusher = Pusher::new(store, args.registry.config(), args.registry.options());
    let tls = (!args.plaintext)
        .then(|| LinkTls { ca_file: args.coordinator_ca.clone(), server_name: args.coordinator_name.clone() });
    let config = DaemonConfig {
        coordinator: CoordinatorLink::new(args.coordinator, tls, Some(args.token_file))?,
        agent_id: args.agent_id.unwrap_or_else(|| args.node_name.clone()),
        node_name: args.node_name,
        max_jobs: args.max_jobs.max(1),
        reconnect_max: Duration::from_secs(30),
        progress_interval: Duration::from_secs(2),
        job_timeout: args.job_timeout,
    };
    // Without an API (a run outside a cluster) the agent cannot see what
    // its node's pods run, and refuses every copy.
    let client = match kube::Client::try_default().await {
        Ok(client) => Some(client),
        Err(e) => {
            tracing::warn!(error = %e, "no Kubernetes API: every assignment will be refused");
            None
        }
    };
    let backup = BackupTarget { registry: args.backup_registry.clone(), prefix: args.backup_prefix.clone() };
    let guard = Guard::new(backup, &config.node_name, client);
    Agent::new(config, pusher, guard).run(shutdown_signal()).await;
    Ok(())
}

/// Resolves on SIGTERM (the kubelet stopping the pod) or Ctrl-C.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

async fn push(args: PushArgs) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let source = ImageRef::parse(&args.source)?;
    let target = ImageRef::parse(&args.target)?;
    let store = ContainerdStore::connect(&args.containerd.socket, &args.containerd.namespace)
        .await?
        .with_read_path(args.containerd.content_read)
        .await;
    let pusher = Pusher::new(store, args.registry.config(), args.registry.options());
    let progress = Progress::new();
    let printer = spawn_printer(progress.clone());
    let report = pusher
        .push(&source, &target, &Scope::Whole, SourceAccess::default(), progress)
        .await
        .with_context(|| format!("pushing {source} to {target}"))?;
    drop(printer);
    let secs = report.duration.as_secs_f64();
    eprintln!(
        "pushed {:.1} MB in {secs:.2}s ({:.1} MB/s): {} blob(s) uploaded, {} mounted, {} already there",
        report.bytes_uploaded as f64 / 1e6,
        report.bytes_uploaded as f64 / 1e6 / secs.max(1e-6),
        report.blobs_uploaded,
        report.blobs_mounted,
        report.blobs_existing,
    );
    // A whole push always ends with the image pushed.
    Ok(report.pinned.unwrap_or_default())
}
