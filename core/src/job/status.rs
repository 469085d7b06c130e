//! What a job's record says: the ImageBackup status, field for field, in
//! the core's own types (`image-backup-crds` converts both ways).

use jiff::Timestamp;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Phase {
    #[default]
    Pending,
    Assigned,
    Pushing,
    Completed,
    Failed,
}

/// The record of one job.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Status {
    pub phase: Phase,
    pub node: Option<String>,
    pub agent: Option<String>,
    /// Attempts handed to agents for the current digest.
    pub attempts: u32,
    /// Failed (or lost) attempts in a row.
    pub failures: u32,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub progress: Option<String>,
    pub backup_reference: Option<String>,
    pub last_error: Option<String>,
    /// For an index: each child and where its copy came from.
    pub platforms: Vec<PlatformCopy>,
    /// The backup is an index with fewer children than the source's.
    pub reduced: bool,
    /// The attempt in flight was planned to push a reduced index.
    pub reducing: bool,
    pub left_out: Vec<String>,
    pub referrers: Vec<String>,
    pub referrers_error: Option<String>,
    /// Why the source could not provide what no node holds.
    pub source_error: Option<String>,
    pub message: Option<String>,
    pub last_verified: Option<Timestamp>,
    /// When a Completed backup was found gone from the registry.
    pub lost_at: Option<Timestamp>,
    pub observed_generation: i64,
    pub last_transition_time: Option<Timestamp>,
    pub conditions: Vec<Condition>,
    /// What workload reconciles had to say about the backup.
    pub workloads: Vec<WorkloadNote>,
}

/// A child of an index and where its copy came from.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformCopy {
    pub platform: String,
    pub digest: String,
    pub attestation: bool,
    /// `node/<name>`, `source` or `registry`; `None` until copied.
    pub copied_from: Option<String>,
}

/// A condition of the record, as Kubernetes conditions go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    pub reason: String,
    pub message: String,
    pub last_transition_time: Timestamp,
    pub observed_generation: Option<i64>,
}

/// Why a workload that runs the image is not (or no longer) on its backup.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkloadNote {
    /// `Kind/namespace/name`.
    pub workload: String,
    pub reason: String,
    pub message: String,
    pub time: Option<Timestamp>,
}
