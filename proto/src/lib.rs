//! The gRPC contract of image-backup: `AgentService` (the agent's session with
//! the coordinator) and `JobService` (inspection for people and tools).

pub mod v1 {
    tonic::include_proto!("imagebackup.v1");
}

/// Encoded `FileDescriptorSet` of every image-backup proto, for gRPC server
/// reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("imagebackup_descriptor");
