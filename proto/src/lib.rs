//! The gRPC contract of image-backup: `AgentService` (the agent's session with
//! the coordinator) and `JobService` (inspection for people and tools).

pub mod v1 {
    tonic::include_proto!("imagebackup.v1");
}

/// Encoded `FileDescriptorSet` of every image-backup proto, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imagebackup_descriptor");

/// `42% 108.0/256.0 MB`: how far a copy got, as the agent's log, its
/// terminal and `kubectl get imagebackups` show it. An unknown total (the
/// copy has not read its manifests yet) shows 0%.
pub fn progress_summary(done: u64, total: u64) -> String {
    let pct = (done * 100).checked_div(total).unwrap_or(0);
    format!("{pct}% {:.1}/{:.1} MB", done as f64 / 1e6, total as f64 / 1e6)
}
