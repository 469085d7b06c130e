//! The image-backup coordinator: watches ready Deployments and DaemonSets,
//! keeps one ImageBackup per source image, assigns copies to node agents and
//! patches workloads to the backup references once every copy is verified.
//!
//! - [`workloads`]: the workload reconciler (images, pod digests, the patch)
//! - [`backups`]: the ImageBackup reconciler, the one writer of its status
//! - [`jobs`]: jobs apart from Kubernetes (agent reports, the state machine)
//! - [`agents`]: agent sessions, what their nodes hold, their free slots
//! - [`grpc`]: JobService, health and reflection
//! - [`trust`]: agent and reader authentication, TLS of the gRPC port
//! - [`restore`]: the `restore` command, the way back

pub mod agents;
pub mod backoff;
pub mod backups;
pub mod cli;
pub mod config;
pub mod context;
pub mod error;
pub mod grpc;
pub mod jobs;
pub mod leader;
pub mod metrics;
pub mod probes;
pub mod pull_secrets;
pub mod relist;
pub mod restore;
pub mod run;
#[cfg(test)]
mod testing;
pub mod trust;
pub mod workloads;

/// Name the coordinator writes under (field manager, event reporter).
pub const MANAGER: &str = "image-backup-coordinator";
