//! Command-line interface of `image-backup-coordinator`; every flag can also
//! be set from the environment, as the Deployment manifest does.

use std::{net::SocketAddr, time::Duration};

use clap::{Args, Parser, Subcommand};
use image_backup_oci::{access::RegistryAccess, registry::RetryPolicy};

use crate::{
    config::CoordinatorConfig,
    leader::LeaseSettings,
    trust::{
        agents::{AgentAccount, DEFAULT_AUDIENCE},
        tls::{TlsSettings, TlsSource},
    },
    workloads::workload::Exclusions,
};
use image_backup_oci::BackupTarget;

#[derive(Parser, Debug)]
#[command(
    name = "image-backup-coordinator",
    version,
    about = "Backs up the images ready workloads run and points them at the copies",
    subcommand_negates_reqs = true
)]
pub struct Cli {
    /// Without one, the coordinator runs.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Backup registry host (host[:port]).
    // An Option that clap requires unless a subcommand is given: a plain
    // String is demanded by the derive even when `restore` negated it.
    #[arg(long, env = "IMAGE_BACKUP_REGISTRY", required = true)]
    pub backup_registry: Option<String>,
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
    /// Rollouts to backups in flight at once, cluster wide; the next
    /// workload is moved when one completes or is undone.
    #[arg(long, env = "IMAGE_BACKUP_MAX_ROLLOUTS", default_value_t = 5)]
    pub max_rollouts: usize,
    /// How long a rollout to backups may take before it is undone.
    #[arg(long, env = "IMAGE_BACKUP_ROLLOUT_TIMEOUT", default_value = "15m", value_parser = humantime::parse_duration)]
    pub rollout_timeout: Duration,
    /// A pull Secret in this namespace with credentials for the backup
    /// registry: added to a workload whose pods could not pull its backups
    /// otherwise (the workload's namespace must hold a Secret of that name,
    /// or --copy-pull-secret copies it there).
    #[arg(long, env = "IMAGE_BACKUP_PULL_SECRET")]
    pub backup_pull_secret: Option<String>,
    /// Copy --backup-pull-secret into a workload's namespace that lacks it
    /// (needs the RBAC of deploy/options/copy-pull-secret.yaml).
    #[arg(long, env = "IMAGE_BACKUP_COPY_PULL_SECRET")]
    pub copy_pull_secret: bool,
    /// Read the pull secrets workloads' pods use (needs the RBAC of
    /// deploy/options/read-pull-secrets.yaml: get on Secrets in every
    /// namespace): to copy what no node holds from a private source, to
    /// check the pods can pull their backups with their own credentials,
    /// and whether a slow rollout's source still serves them.
    #[arg(long, env = "IMAGE_BACKUP_READ_PULL_SECRETS")]
    pub read_pull_secrets: bool,
    /// Back up no image a workload's pods pull with a pull secret: on a
    /// cluster whose tenants must not see each other's private images,
    /// since anyone with the backup registry's pull credentials could pull
    /// the copy. Without --read-pull-secrets, any pull secret of the pods
    /// counts; with it, only one holding credentials for the image's
    /// registry.
    #[arg(long, env = "IMAGE_BACKUP_REFUSE_PRIVATE_IMAGES")]
    pub refuse_private_images: bool,
    /// Also move workloads another controller manages (an ownerReference,
    /// Argo CD, Flux or Helm markers); without it they are backed up only,
    /// unless annotated backup.k8slab.io/rewrite=true.
    #[arg(long, env = "IMAGE_BACKUP_REWRITE_MANAGED")]
    pub rewrite_managed: bool,
    /// More label or annotation keys marking a workload as managed by a
    /// tool, comma-separated (say app.kubernetes.io/instance, for Argo CD's
    /// label tracking).
    #[arg(long, env = "IMAGE_BACKUP_MANAGED_MARKERS", value_delimiter = ',')]
    pub managed_markers: Vec<String>,
    /// gRPC address for agents and JobService.
    #[arg(long, env = "IMAGE_BACKUP_GRPC_ADDR", default_value = "0.0.0.0:50051")]
    pub grpc_addr: SocketAddr,
    /// HTTP address for /metrics, /healthz and /readyz.
    #[arg(long, env = "IMAGE_BACKUP_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,
    /// Failed attempts in a row after which a job is marked Stalled: it
    /// keeps retrying a transient failure (network, 5xx, 429, timeouts)
    /// for as long as it lasts. A copy lost this many times in a row (its
    /// agent gone each time) fails.
    #[arg(long, env = "IMAGE_BACKUP_MAX_ATTEMPTS", default_value_t = 5)]
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt.
    #[arg(long, env = "IMAGE_BACKUP_RETRY_BACKOFF", default_value = "30s", value_parser = humantime::parse_duration)]
    pub retry_backoff: Duration,
    /// The longest wait between attempts of a job that keeps failing.
    #[arg(long, env = "IMAGE_BACKUP_MAX_RETRY_BACKOFF", default_value = "10m", value_parser = humantime::parse_duration)]
    pub max_retry_backoff: Duration,
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
    /// How often every Completed backup is looked for in the backup
    /// registry again (a HEAD of the pinned manifest); one found missing is
    /// copied again. 0 never.
    #[arg(long, env = "IMAGE_BACKUP_VERIFY_EVERY", default_value = "6h", value_parser = humantime::parse_duration)]
    pub verify_every: Duration,
    /// How long an ImageBackup that no workload uses any more is kept
    /// before it is deleted (the registry keeps what it copied). 0 keeps
    /// them forever.
    #[arg(long, env = "IMAGE_BACKUP_UNUSED_GRACE", default_value = "24h", value_parser = humantime::parse_duration)]
    pub unused_grace: Duration,
    /// With an unused ImageBackup, also delete from the backup registry
    /// the manifests it copied that no other ImageBackup or workload uses
    /// (the coordinator's registry credentials must allow deletes).
    #[arg(long, env = "IMAGE_BACKUP_PRUNE")]
    pub prune: bool,
    /// With --prune, how long an unused backup no pod template in the
    /// cluster names waits before it is deleted; the cluster is read again
    /// then, and a use found keeps it.
    #[arg(long, env = "IMAGE_BACKUP_PRUNE_QUARANTINE", default_value = "7d", value_parser = humantime::parse_duration)]
    pub prune_quarantine: Duration,
    /// Reconciles run at once, per kind: bounds memory and API load when
    /// thousands of workloads change together (after a start, say).
    #[arg(long, env = "IMAGE_BACKUP_CONCURRENCY", default_value_t = 32)]
    pub concurrency: u16,
    #[command(flatten)]
    pub registry: RegistryAccess,
    #[command(flatten)]
    pub trust: TrustArgs,
    /// The Lease (in this namespace) replicas elect their leader on.
    #[arg(long, env = "IMAGE_BACKUP_LEASE_NAME", default_value = "image-backup-coordinator")]
    pub lease_name: String,
    /// How long a leader that stopped renewing keeps the Lease before
    /// another replica takes over.
    #[arg(long, env = "IMAGE_BACKUP_LEASE_DURATION", default_value = "15s", value_parser = humantime::parse_duration)]
    pub lease_duration: Duration,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Move workloads back to the images they ran before the coordinator
    /// moved them to backups, and hold them there (delete the annotation
    /// backup.k8slab.io/hold to let a coordinator move one again).
    Restore(RestoreArgs),
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    /// `deployment/NAME` or `daemonset/NAME` in --namespace; every moved
    /// workload of --namespace (or, with --all, of the cluster) without one.
    pub workload: Option<String>,
    /// The workloads' namespace.
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    /// Every moved workload of the cluster.
    #[arg(long, conflicts_with_all = ["namespace", "workload"])]
    pub all: bool,
    /// Say what would change, change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Backup registry host the workloads were moved to (host[:port]).
    #[arg(long, env = "IMAGE_BACKUP_REGISTRY")]
    pub backup_registry: String,
    /// Repository prefix in the backup registry.
    #[arg(long, env = "IMAGE_BACKUP_PREFIX", default_value = "backup")]
    pub backup_prefix: String,
}

/// Who may use the gRPC port, and over what.
#[derive(Args, Debug)]
pub struct TrustArgs {
    /// The ServiceAccount (in this namespace) whose pod-bound tokens open
    /// agent sessions.
    #[arg(long, env = "IMAGE_BACKUP_AGENT_SERVICE_ACCOUNT", default_value = "image-backup-agent")]
    pub agent_service_account: String,
    /// Audience of agent tokens (the projected token's `audience`).
    #[arg(long, env = "IMAGE_BACKUP_AGENT_AUDIENCE", default_value = DEFAULT_AUDIENCE)]
    pub agent_audience: String,
    /// Serve gRPC without TLS (a port only reachable over a trusted link).
    #[arg(long, env = "IMAGE_BACKUP_GRPC_PLAINTEXT")]
    pub grpc_plaintext: bool,
    /// Serve the certificate of this `kubernetes.io/tls` Secret (one
    /// cert-manager writes, say); without it the coordinator issues its own
    /// from a CA it keeps in --tls-ca-secret.
    #[arg(long, env = "IMAGE_BACKUP_TLS_SECRET")]
    pub tls_secret: Option<String>,
    /// Where the coordinator keeps its own CA.
    #[arg(long, env = "IMAGE_BACKUP_TLS_CA_SECRET", default_value = "image-backup-ca")]
    pub tls_ca_secret: String,
    /// The ConfigMap (key `ca.crt`) the coordinator publishes the CA to, for
    /// agents to trust.
    #[arg(long, env = "IMAGE_BACKUP_TLS_CA_CONFIGMAP", default_value = "image-backup-ca")]
    pub tls_ca_config_map: String,
    /// Names (DNS or IP) the coordinator's own certificate covers,
    /// comma-separated; the Service's names in this namespace when unset.
    #[arg(long, env = "IMAGE_BACKUP_TLS_NAMES", value_delimiter = ',')]
    pub tls_names: Vec<String>,
    /// Let JobService calls without a token read jobs.
    #[arg(long, env = "IMAGE_BACKUP_ANONYMOUS_READS")]
    pub anonymous_reads: bool,
}

/// The Service agents and people reach the coordinator through.
const SERVICE: &str = "image-backup-coordinator";

impl TrustArgs {
    fn tls(&self, namespace: &str) -> Option<TlsSettings> {
        if self.grpc_plaintext {
            return None;
        }
        let source = match &self.tls_secret {
            Some(secret) => TlsSource::Secret(secret.clone()),
            None => {
                let names = if self.tls_names.is_empty() {
                    let svc = format!("{SERVICE}.{namespace}.svc");
                    vec![SERVICE.to_string(), format!("{SERVICE}.{namespace}"), format!("{svc}.cluster.local"), svc]
                } else {
                    self.tls_names.clone()
                };
                TlsSource::OwnCa { ca_secret: self.tls_ca_secret.clone(), names }
            }
        };
        Some(TlsSettings { source, ca_config_map: self.tls_ca_config_map.clone(), namespace: namespace.to_string() })
    }
}

impl Cli {
    pub fn config(&self) -> CoordinatorConfig {
        CoordinatorConfig {
            // Present whenever the coordinator runs (clap requires it).
            backup: BackupTarget {
                registry: self.backup_registry.clone().unwrap_or_default(),
                prefix: self.backup_prefix.clone(),
            },
            registry: self
                .registry
                .config(RetryPolicy { max_elapsed: Duration::from_secs(20), ..RetryPolicy::default() }),
            exclusions: Exclusions::new(self.exclude_namespaces.clone(), &self.namespace),
            namespace: self.namespace.clone(),
            report_only: self.report_only,
            max_rollouts: self.max_rollouts.max(1),
            rollout_timeout: self.rollout_timeout,
            backup_pull_secret: self.backup_pull_secret.clone().filter(|s| !s.is_empty()),
            copy_pull_secret: self.copy_pull_secret,
            read_pull_secrets: self.read_pull_secrets,
            refuse_private_images: self.refuse_private_images,
            rewrite_managed: self.rewrite_managed,
            managed_markers: self.managed_markers.iter().filter(|m| !m.is_empty()).cloned().collect(),
            max_attempts: self.max_attempts.max(1),
            retry_backoff: self.retry_backoff,
            max_retry_backoff: self.max_retry_backoff.max(self.retry_backoff),
            heartbeat_deadline: self.heartbeat_deadline,
            reduce_after: self.reduce_after,
            require_complete_index: self.require_complete_index,
            verify_every: self.verify_every,
            unused_grace: self.unused_grace,
            prune: self.prune,
            prune_quarantine: self.prune_quarantine,
            concurrency: self.concurrency.max(1),
            agents: AgentAccount {
                namespace: self.namespace.clone(),
                service_account: self.trust.agent_service_account.clone(),
                audience: self.trust.agent_audience.clone(),
            },
            tls: self.trust.tls(&self.namespace),
            anonymous_reads: self.trust.anonymous_reads,
            lease: LeaseSettings {
                name: self.lease_name.clone(),
                namespace: self.namespace.clone(),
                duration: self.lease_duration,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Command};

    #[test]
    fn restore_needs_only_its_own_flags() {
        let args = ["image-backup-coordinator", "restore", "--backup-registry", "backup.example", "--all"];
        let cli = Cli::try_parse_from(args).unwrap_or_else(|e| panic!("{e}"));
        let Some(Command::Restore(restore)) = cli.command else { panic!("restore") };
        assert_eq!(restore.backup_registry, "backup.example");
        assert!(restore.all);
    }

    #[test]
    fn running_needs_the_backup_registry() {
        let error = Cli::try_parse_from(["image-backup-coordinator"]).map(|_| ()).unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::MissingRequiredArgument);
        let cli = Cli::try_parse_from(["image-backup-coordinator", "--backup-registry", "backup.example"]).unwrap();
        assert_eq!(cli.config().backup.registry, "backup.example");
    }
}
