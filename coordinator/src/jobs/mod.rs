//! What agents report about backup jobs, held until the ImageBackup
//! reconciler records it; the rules that turn it into status are the
//! core's (`image_backup_core::job`).

pub mod live;

pub use live::{JobWaker, LiveJobs};
