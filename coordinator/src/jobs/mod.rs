//! Backup jobs apart from Kubernetes: what agents report (held until it is
//! recorded) and the state machine that turns it into status.

pub mod live;
pub mod machine;
pub mod plan;

pub use live::{LiveJob, LiveJobs, Outcome};
