//! The usage index (`image_backup_core::usage`), shared. Its one writer
//! is the workload controllers (`workloads/mod.rs`: a reconcile sets what
//! its workload uses, a deleted or excluded workload is removed); nothing
//! of it is stored, since every workload is reconciled once after a start.

use std::collections::{BTreeMap, BTreeSet};

use image_backup_core::usage::Index;
pub use image_backup_core::usage::{Use, WorkloadKey};
use parking_lot::Mutex;

#[derive(Default)]
pub struct Usage(Mutex<Index>);

// === impl Usage ===

impl Usage {
    pub fn set(&self, workload: &WorkloadKey, backups: BTreeMap<String, Use>) {
        self.0.lock().set(workload, backups);
    }

    pub fn remove(&self, workload: &WorkloadKey) {
        self.0.lock().remove(workload);
    }

    pub fn digests_of(&self, name: &str) -> BTreeSet<String> {
        self.0.lock().digests_of(name)
    }

    pub fn pins(&self, reference: &str) -> bool {
        self.0.lock().pins(reference)
    }

    pub fn workloads_of(&self, name: &str) -> Vec<WorkloadKey> {
        self.0.lock().workloads_of(name)
    }
}
