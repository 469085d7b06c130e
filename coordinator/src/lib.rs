//! The image-backup coordinator: watches ready Deployments and DaemonSets,
//! keeps one ImageBackup per source image, assigns copies to node agents and
//! patches workloads to the backup references once every copy is verified.
//!
//! This crate holds the decisions so far: which workloads are eligible and
//! ready, what images they run, how ImageBackups and backup references are
//! named, and the guarded patch that moves a workload to its backups. The
//! controllers and the gRPC services that use them come next.

pub mod agents;
pub mod jobs;
pub mod naming;
pub mod rewrite;
pub mod workload;
