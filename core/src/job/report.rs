//! What agents say about the attempts they run, in the core's own types
//! (`image-backup-proto` converts the wire messages).

use std::time::Instant;

/// What an assignment copies of an index (a single-platform image is
/// always copied whole).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Finish {
    /// Every child the node holds, then the index (the other children must
    /// be in the backup registry already).
    #[default]
    Whole,
    /// Only the listed children; another assignment finishes the index.
    None,
    /// The listed children, then the index byte for byte.
    Index,
    /// The listed children, then an index of only them and the kept
    /// children, carrying the source index as its proof.
    Reduced,
}

/// A copy the agent says it made.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Success {
    pub pinned_reference: String,
    /// What was pushed: the source's digest, or a reduced index's own.
    pub digest: String,
    pub bytes_uploaded: u64,
    pub duration_seconds: f64,
    /// Children of an index this part pushed.
    pub pushed_manifests: Vec<String>,
    /// Those of them read from the source registry.
    pub from_source: Vec<String>,
    pub referrers: Vec<String>,
    /// Why not every referrer was copied, if so.
    pub referrers_error: Option<String>,
}

/// An attempt that failed, as its agent says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Failure {
    pub message: String,
    /// Trying again can help (network, 5xx, 429, timeouts).
    pub retryable: bool,
    /// Children the backup registry turned out not to hold.
    pub absent_manifests: Vec<String>,
    /// The source registry could not provide what no node holds.
    pub source_failed: bool,
}

/// How a copy ended, as its agent reported it.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Success(Success),
    Failure(Failure),
    /// The agent went away (session ended, heartbeat missed) mid-copy.
    Lost(String),
}

/// The latest report of one attempt of a job.
#[derive(Clone, Debug, PartialEq)]
pub struct LiveJob {
    pub attempt: u32,
    /// The digest the attempt copies: attempt numbers start again when a
    /// job's digest moves.
    pub digest: String,
    pub agent_id: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub outcome: Option<Outcome>,
    /// When the agent last said anything of it (or it was handed over).
    pub updated: Instant,
}

// === impl LiveJob ===

impl LiveJob {
    pub fn new(attempt: u32, digest: &str, agent_id: &str) -> Self {
        Self {
            attempt,
            digest: digest.into(),
            agent_id: agent_id.into(),
            bytes_done: 0,
            bytes_total: 0,
            outcome: None,
            updated: Instant::now(),
        }
    }

    /// Whether this is the attempt `attempt` of `digest` on `agent_id`.
    pub fn is(&self, attempt: u32, digest: &str, agent_id: &str) -> bool {
        self.attempt == attempt && self.digest == digest && self.agent_id == agent_id
    }
}
