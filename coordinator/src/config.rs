//! What the coordinator is told at start.

use std::time::Duration;

use image_backup_oci::{BackupTarget, registry::RegistryConfig};

use crate::{
    leader::LeaseSettings,
    trust::{agents::AgentAccount, tls::TlsSettings},
    workloads::workload::Exclusions,
};

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    /// Where backups go.
    pub backup: BackupTarget,
    /// How to reach the backup registry to verify copies.
    pub registry: RegistryConfig,
    pub exclusions: Exclusions,
    /// The coordinator's own namespace, where jobs' pull secrets live.
    pub namespace: String,
    /// Do everything but patch workloads.
    pub report_only: bool,
    /// How long an ImageBackup no workload uses is kept; zero forever.
    pub unused_grace: Duration,
    /// Delete from the registry what such an ImageBackup copied.
    pub prune: bool,
    /// How long a backup to prune waits, no pod template naming it.
    pub prune_quarantine: Duration,
    /// Rollouts to backups in flight at once, cluster wide.
    pub max_rollouts: usize,
    /// How long a rollout to backups may take before it is undone.
    pub rollout_timeout: Duration,
    /// A pull Secret (in the coordinator's namespace) for the backup
    /// registry, added to workloads whose pods have no access of their own.
    pub backup_pull_secret: Option<String>,
    /// Copy that Secret into a workload's namespace that lacks it.
    pub copy_pull_secret: bool,
    /// Read the pull secrets of workloads' pods (off: no Secret outside
    /// the coordinator's namespace is read).
    pub read_pull_secrets: bool,
    /// Back up no image the pods pull with a pull secret.
    pub refuse_private_images: bool,
    /// Move workloads another controller manages, too.
    pub rewrite_managed: bool,
    /// Label or annotation keys that mark a workload as managed by a tool,
    /// beyond the known ones.
    pub managed_markers: Vec<String>,
    /// Failed attempts in a row after which a job is marked Stalled (it
    /// keeps retrying transient failures), and lost copies in a row after
    /// which it fails.
    pub max_attempts: u32,
    /// Backoff after the first failed attempt; doubles per attempt.
    pub retry_backoff: Duration,
    /// The longest backoff between attempts.
    pub max_retry_backoff: Duration,
    /// An agent silent for this long loses its jobs.
    pub heartbeat_deadline: Duration,
    /// How long children of an index that no connected node holds are
    /// waited for before the backup goes without them.
    pub reduce_after: Duration,
    /// Fail such a backup instead of pushing a reduced index.
    pub require_complete_index: bool,
    /// How often Completed backups are looked for in the registry again;
    /// zero never.
    pub verify_every: Duration,
    /// Reconciles run at once, per kind.
    pub concurrency: u16,
    /// Whose tokens open agent sessions.
    pub agents: AgentAccount,
    /// TLS of the gRPC port; `None` serves plain text.
    pub tls: Option<TlsSettings>,
    /// JobService reads without a token.
    pub anonymous_reads: bool,
    /// The Lease coordinators elect their leader on.
    pub lease: LeaseSettings,
}
