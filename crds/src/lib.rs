//! The ImageBackup custom resource: one per normalized source image, named
//! deterministically so that creating it is idempotent across events,
//! workloads and coordinator restarts.

mod job;
mod name;

pub use name::name_for;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of every image-backup resource.
pub const GROUP: &str = "backup.k8slab.io";

/// What to copy: the source image as the kubelet ran it, and the digest the
/// pods report.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "backup.k8slab.io",
    version = "v1alpha1",
    kind = "ImageBackup",
    plural = "imagebackups",
    singular = "imagebackup",
    shortname = "ib",
    status = "ImageBackupStatus",
    printcolumn = r#"{"name":"Source","type":"string","jsonPath":".spec.source"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".status.node"}"#,
    printcolumn = r#"{"name":"Progress","type":"string","jsonPath":".status.progress"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.message"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ImageBackupSpec {
    /// Normalized source reference, e.g. `docker.io/library/nginx:1.25`.
    pub source: String,
    /// Digest to copy (index or manifest), e.g. `sha256:...`.
    pub digest: String,
}

/// Where a job is. Completed and Failed are final for an attempt series.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum Phase {
    #[default]
    Pending,
    Assigned,
    Pushing,
    Completed,
    Failed,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageBackupStatus {
    #[serde(default)]
    pub phase: Phase,
    /// Node whose containerd the copy is read from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
    /// Assignments made so far (every part of an index counts).
    #[serde(default)]
    pub attempts: u32,
    /// Failed or lost attempts since the last one that copied something;
    /// the retry limit and the backoff count these.
    #[serde(default)]
    pub failures: u32,
    #[serde(default)]
    pub bytes_done: u64,
    #[serde(default)]
    pub bytes_total: u64,
    /// Human-readable progress for `kubectl get`, e.g. `42% (108/256 MB)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<String>,
    /// Backup reference pinned by digest, set only once the coordinator has
    /// seen the manifest in the backup registry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_reference: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// For an index: each child manifest, and where its copy came from.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformCopy>,
    /// The backup is a reduced index: only the children some node held,
    /// annotated with the source index digest. Nodes of a left-out
    /// platform cannot run it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reduced: bool,
    /// The attempt in flight was planned to push a reduced index: only its
    /// result may name a digest other than the source's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reducing: bool,
    /// Platforms of the source index the backup leaves out, because no
    /// node held them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub left_out: Vec<String>,
    /// Signatures and other referrers copied from the source with the
    /// image: manifest digests, and the tags they are filed under.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub referrers: Vec<String>,
    /// Why the image's referrers could not be copied from the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub referrers_error: Option<String>,
    /// Why what no node holds could not come from the source registry;
    /// set once the source was tried and failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_error: Option<String>,
    /// What the job waits for, in words (`waiting for a free agent ...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the coordinator last saw the backup in the registry (at its
    /// copy, then on every re-verification).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified: Option<Time>,
    /// When a re-verification found the backup gone from the registry;
    /// cleared once it is copied again. Workloads pinned to a lost backup
    /// that cannot be copied again are moved back to their sources.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lost_at: Option<Time>,
    /// The spec generation this status describes; a newer spec (the digest
    /// moved) starts the job over.
    #[serde(default)]
    pub observed_generation: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// Workloads that use this backup but were not moved to it, or were
    /// moved back, and why; newest first, one entry per workload.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<WorkloadNote>,
}

/// Why a workload does not run a backup it could.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadNote {
    /// `Deployment/shop/web`.
    pub workload: String,
    /// `RolloutFailed`, `HeldOnBackup`, `NotPullable`, `Managed`, `Reverted`,
    /// `Restored`.
    pub reason: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<Time>,
}

/// One child manifest of an index and its copy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PlatformCopy {
    /// `linux/arm64/v8`; `unknown/unknown` for an attestation.
    pub platform: String,
    pub digest: String,
    /// A buildx attestation entry, which no node's containerd holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attestation: bool,
    /// Where the copy came from, once in the backup registry:
    /// `node/<name>` for a node's containerd, `source` for the source
    /// registry, `registry` when the backup registry held it already.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copied_from: Option<String>,
}

/// The CRD manifest as YAML, exactly as `deploy/crds/imagebackup.yaml` holds it.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&ImageBackup::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in manifest is what `kubectl apply` installs; it must never
    /// drift from the types the coordinator reads and writes.
    #[test]
    fn checked_in_crd_matches_types() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/crds/imagebackup.yaml");
        let checked_in = std::fs::read_to_string(path).expect("read deploy/crds/imagebackup.yaml");
        assert_eq!(
            checked_in,
            crd_yaml().expect("serialize CRD"),
            "deploy/crds/imagebackup.yaml is stale: run `cargo run -p image-backup-crds --bin crdgen`"
        );
    }

    #[test]
    fn crd_is_cluster_scoped_with_status_and_short_name() {
        use kube::CustomResourceExt;
        let crd = ImageBackup::crd();
        assert_eq!(crd.spec.scope, "Cluster");
        assert_eq!(crd.spec.names.short_names, Some(vec!["ib".to_string()]));
        let version = &crd.spec.versions[0];
        assert!(version.subresources.as_ref().and_then(|s| s.status.as_ref()).is_some());
        let columns: Vec<_> = version.additional_printer_columns.iter().flatten().map(|c| c.name.as_str()).collect();
        assert_eq!(columns, ["Source", "Phase", "Node", "Progress", "Message", "Age"]);
    }
}
