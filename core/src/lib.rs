//! What image-backup decides, apart from how it talks: the state machine of
//! a backup job and the plan of its copy, the patches that move a workload
//! to its backups and back, the judge of the rollout that follows, when an
//! unused backup goes and which workloads use which backup, in types of
//! their own. Nothing
//! here does I/O or knows Kubernetes, gRPC or containerd; the crates at the
//! edges translate (the CRD status in `image-backup-crds`, the agents'
//! messages in `image-backup-proto`), so every rule is tested as a plain
//! function.

pub mod job;
pub mod prune;
pub mod rollout;
pub mod template;
pub mod usage;

/// `42% 108.0/256.0 MB`: how far a copy got, as the agent's log, its
/// terminal and `kubectl get imagebackups` show it. An unknown total (the
/// copy has not read its manifests yet) shows 0%.
pub fn progress_summary(done: u64, total: u64) -> String {
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    format!("{pct}% {:.1}/{:.1} MB", done as f64 / 1e6, total as f64 / 1e6)
}
