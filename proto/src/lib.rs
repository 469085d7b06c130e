//! The gRPC contract of image-backup: `AgentService` (the agent's session with
//! the coordinator) and `JobService` (inspection for people and tools).

mod job;

pub mod v1 {
    tonic::include_proto!("imagebackup.v1");

    /// Every field but the source credentials, which are only said to be
    /// there or not.
    impl std::fmt::Debug for Assignment {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            let credentials = if self.source_docker_config.is_empty() { "none" } else { "(redacted)" };
            f.debug_struct("Assignment")
                .field("job_id", &self.job_id)
                .field("source", &self.source)
                .field("digest", &self.digest)
                .field("target", &self.target)
                .field("attempt", &self.attempt)
                .field("manifests", &self.manifests)
                .field("finish", &self.finish())
                .field("keep", &self.keep)
                .field("from_source", &self.from_source)
                .field("source_docker_config", &credentials)
                .field("copy_referrers", &self.copy_referrers)
                .finish()
        }
    }
}

/// Encoded `FileDescriptorSet` of every image-backup proto, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imagebackup_descriptor");

// Agents and the coordinator show progress alike.
pub use image_backup_core::progress_summary;

#[cfg(test)]
mod tests {
    use super::v1::Assignment;

    #[test]
    fn an_assignment_never_prints_its_credentials() {
        let secret = br#"{"auths":{"registry.example":{"auth":"c2VjcmV0OnMzY3IzdA=="}}}"#;
        let assignment =
            Assignment { job_id: "job".into(), source_docker_config: secret.to_vec(), ..Default::default() };
        let printed = format!("{assignment:?}");
        assert!(printed.contains("job") && printed.contains("(redacted)"), "{printed}");
        assert!(!printed.contains("c2VjcmV0") && !printed.contains("99, 50"), "{printed}");
    }
}
