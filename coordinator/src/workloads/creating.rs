//! ImageBackups being created, the workload reconciler's own.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

/// ImageBackups this coordinator is creating, so that workloads sharing an
/// image make one create between them. An entry lapses once the store
/// should long have shown the object, so one deleted later is made again.
#[derive(Default)]
pub struct Creating(Mutex<HashMap<String, Instant>>);

/// Longer than a watch event takes to reach the store.
const CREATE_SETTLE: Duration = Duration::from_secs(30);

impl Creating {
    /// Whether the caller should create `name` now.
    pub fn begin(&self, name: &str) -> bool {
        let mut creating = self.0.lock();
        creating.retain(|_, at| at.elapsed() < CREATE_SETTLE);
        match creating.entry(name.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Instant::now());
                true
            }
        }
    }

    /// The create failed: the next workload tries again.
    pub fn failed(&self, name: &str) {
        self.0.lock().remove(name);
    }
}
