//! One backup job (an ImageBackup): its record, the agents' reports, the
//! plan of its copy, the one next step and each step's change to the
//! record. A failed copy's retry is decided in `next.rs` (`failed`,
//! `backoff`); what a retry writes, in `transition.rs`.

mod next;
pub mod plan;
mod report;
mod status;
mod transition;

pub use next::{Holder, Limits, Next, Observed, backoff, failed, lost, next, pending, waiting};
pub use report::{Failure, Finish, LiveJob, Outcome, Success};
pub use status::{Condition, Phase, PlatformCopy, Status, WorkloadNote};
pub use transition::{STALLED, Transition};

#[cfg(test)]
mod tests;
