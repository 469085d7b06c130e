//! The image-backup coordinator: watches ready Deployments and DaemonSets,
//! keeps one ImageBackup per source image, assigns copies to node agents and
//! patches workloads to the backup references once every copy is verified.
//!

pub mod agents;
pub mod cli;
pub mod config;
pub mod controller;
pub mod jobs;
pub mod metrics;
pub mod rewrite;
pub mod run;
pub mod workload;
