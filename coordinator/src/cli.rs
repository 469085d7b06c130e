//! Command-line interface of `image-backup-coordinator`; every flag can also
//! be set from the environment, as the Deployment manifest does.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use image_backup_oci::{access::RegistryAccess, registry::RetryPolicy};

use crate::{config::CoordinatorConfig, workloads::workload::Exclusions};
use image_backup_oci::BackupTarget;

#[derive(Parser, Debug)]
#[command(
    name = "image-backup-coordinator",
    version,
    about = "Backs up the images ready workloads run and points them at the copies"
)]
pub struct Cli {
    /// Backup registry host (host[:port]).
    #[arg(long, env = "IMAGE_BACKUP_REGISTRY")]
    pub backup_registry: String,
    /// Repository prefix in the backup registry.
    #[arg(long, env = "IMAGE_BACKUP_PREFIX", default_value = "backup")]
    pub backup_prefix: String,
    /// Namespaces never touched, comma-separated (kube-system and the
    /// coordinator's own are always excluded).
    #[arg(long, env = "IMAGE_BACKUP_EXCLUDE_NAMESPACES", value_delimiter = ',')]
    pub exclude_namespaces: Vec<String>,
    /// The coordinator's own namespace.
    #[arg(long, env = "POD_NAMESPACE", default_value = "image-backup")]
    pub namespace: String,
    /// Identity in agent sessions and events.
    #[arg(long, env = "POD_NAME", default_value = "image-backup-coordinator")]
    pub id: String,
    /// Back images up but never patch workloads.
    #[arg(long, env = "IMAGE_BACKUP_REPORT_ONLY")]
    pub report_only: bool,
    /// gRPC address for agents and JobService.
    #[arg(long, env = "IMAGE_BACKUP_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "IMAGE_BACKUP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Attempts before a job stays Failed.
    #[arg(long, env = "IMAGE_BACKUP_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt.
    #[arg(long, env = "IMAGE_BACKUP_RETRY_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// An agent silent this long loses its jobs to another node.
    #[arg(long, env = "IMAGE_BACKUP_HEARTBEAT_DEADLINE", default_value = "30s", value_parser = humantime::parse_duration)]
    pub heartbeat_deadline: Duration,
    /// How long platforms of an index that no connected node holds are
    /// waited for (a node may be joining) before the backup is pushed as a
    /// reduced index without them.
    #[arg(long, env = "IMAGE_BACKUP_REDUCE_AFTER", default_value = "2m", value_parser = humantime::parse_duration)]
    pub reduce_after: Duration,
    /// Never push a reduced index: a backup whose platforms are not all on
    /// some node fails instead, and its workloads are left as they are.
    #[arg(long, env = "IMAGE_BACKUP_REQUIRE_COMPLETE_INDEX")]
    pub require_complete_index: bool,
    /// Reconciles run at once, per kind: bounds memory and API load when
    /// thousands of workloads change together (after a start, say).
    #[arg(long, env = "IMAGE_BACKUP_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    #[command(flatten)]
    pub registry: RegistryAccess,
}

impl Cli {
    pub fn config(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            backup: BackupTarget { registry: self.backup_registry.clone(), prefix: self.backup_prefix.clone() },
            registry: self
                .registry
                .config(RetryPolicy { max_elapsed: Duration::from_secs(20), ..RetryPolicy::default() }),
            exclusions: Exclusions::new(self.exclude_namespaces.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            report_only: self.report_only,
            max_attempts: self.max_attempts.max(1),
            retry_backoff: self.retry_backoff,
            heartbeat_deadline: self.heartbeat_deadline,
            reduce_after: self.reduce_after,
            require_complete_index: self.require_complete_index,
            concurrency: self.concurrency.max(1),
        }
    }
}
