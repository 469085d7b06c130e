//! The workload controllers' context: the shared part and the stores only
//! they write.

use std::{
    collections::HashSet,
    ops::Deref,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use image_backup_oci::registry::{Registry, RegistryError};
use parking_lot::Mutex;

use super::{
    creating::Creating, digests::DigestCache, open_backups::OpenBackups, rollout::Rollouts, usage::WorkloadKey,
    wakers::Wakers,
};
use crate::context::Shared;

/// What the Deployment and DaemonSet controllers reconcile with.
pub struct Context {
    shared: Arc<Shared>,
    pub creating: Creating,
    pub digests: DigestCache,
    /// The backup registry as a pod without credentials reads it.
    pub anonymous: Registry,
    pub open_backups: OpenBackups,
    /// Rollouts to backups in flight, cluster wide.
    pub rollouts: Rollouts,
    pub wakers: Wakers,
    /// Every watched store has listed its objects once.
    synced: AtomicBool,
    /// Excluded workloads whose notes went since this coordinator started.
    excluded: Mutex<HashSet<WorkloadKey>>,
}

// === impl Context ===

impl Context {
    pub fn new(shared: Arc<Shared>, wakers: Wakers) -> Result<Arc<Self>, RegistryError> {
        let config = &shared.config;
        let anonymous = crate::pull_secrets::anonymous_or(&config.backup.registry, &config.registry, None)?;
        let rollouts = Rollouts::new(config.max_rollouts, Box::new(wakers.clone()));
        Ok(Arc::new(Self {
            shared,
            creating: Creating::default(),
            digests: DigestCache::default(),
            anonymous,
            open_backups: OpenBackups::default(),
            rollouts,
            wakers,
            synced: AtomicBool::new(false),
            excluded: Mutex::default(),
        }))
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    pub fn mark_synced(&self) {
        self.synced.store(true, Ordering::Release);
    }

    /// Whether `workload` was just excluded, as far as this coordinator
    /// knows: true once per workload between inclusions, so what it left
    /// is looked for once and not on each of its status changes.
    pub fn newly_excluded(&self, workload: &WorkloadKey) -> bool {
        self.excluded.lock().insert(workload.clone())
    }

    /// `workload` is looked after (again), or gone.
    pub fn not_excluded(&self, workload: &WorkloadKey) {
        self.excluded.lock().remove(workload);
    }
}

impl Deref for Context {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}
