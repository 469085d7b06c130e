//! The ImageBackup controller's context: the shared part and the stores
//! only it writes.

use std::{
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use crate::{agents::AgentHub, context::Shared, jobs::LiveJobs};

/// What the ImageBackup controller and the sweep of unused backups work
/// with.
pub struct Context {
    shared: Arc<Shared>,
    pub hub: Arc<AgentHub>,
    /// What agents reported, until the ImageBackup reconciler records it.
    pub jobs: Arc<LiveJobs>,
    /// Unused ImageBackups are looked after (see `backups::unused`).
    sweeping: AtomicBool,
}

// === impl Context ===

impl Context {
    pub fn new(shared: Arc<Shared>, hub: Arc<AgentHub>, jobs: Arc<LiveJobs>) -> Arc<Self> {
        Arc::new(Self { shared, hub, jobs, sweeping: AtomicBool::new(false) })
    }

    pub fn sweeping(&self) -> bool {
        self.sweeping.load(Ordering::Acquire)
    }

    pub fn start_sweeping(&self) {
        self.sweeping.store(true, Ordering::Release);
    }
}

impl Deref for Context {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}
