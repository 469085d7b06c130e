//! Which workloads use which ImageBackup, in memory. It is rebuilt by the
//! workload reconcilers as they run (all of them run once after a start),
//! so nothing of it needs to be stored; it wakes the workloads when an
//! ImageBackup finishes and tells JobService who uses an image.

use std::{
    collections::{BTreeSet, HashMap},
    fmt,
    sync::Mutex,
};

/// A workload: `Kind/namespace/name`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkloadKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for WorkloadKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.kind, self.namespace, self.name)
    }
}

#[derive(Default)]
struct Index {
    by_workload: HashMap<WorkloadKey, BTreeSet<String>>,
    by_backup: HashMap<String, BTreeSet<WorkloadKey>>,
}

#[derive(Default)]
pub struct Usage(Mutex<Index>);

// === impl Usage ===

impl Usage {
    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The ImageBackups `workload` uses now, replacing what it used before.
    pub fn set(&self, workload: &WorkloadKey, backups: BTreeSet<String>) {
        let mut index = self.lock();
        let before = index.by_workload.remove(workload).unwrap_or_default();
        for gone in before.difference(&backups) {
            if let Some(users) = index.by_backup.get_mut(gone) {
                users.remove(workload);
                if users.is_empty() {
                    index.by_backup.remove(gone);
                }
            }
        }
        for name in &backups {
            index.by_backup.entry(name.clone()).or_default().insert(workload.clone());
        }
        if !backups.is_empty() {
            index.by_workload.insert(workload.clone(), backups);
        }
    }

    pub fn remove(&self, workload: &WorkloadKey) {
        self.set(workload, BTreeSet::new());
    }

    /// The workloads that use the ImageBackup `name`, in order.
    pub fn workloads_of(&self, name: &str) -> Vec<WorkloadKey> {
        self.lock().by_backup.get(name).map(|users| users.iter().cloned().collect()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(name: &str) -> WorkloadKey {
        WorkloadKey { kind: "Deployment", namespace: "shop".into(), name: name.into() }
    }

    #[test]
    fn follows_what_each_workload_uses_now() {
        let usage = Usage::default();
        usage.set(&key("web"), ["nginx".to_string(), "busybox".to_string()].into());
        usage.set(&key("api"), ["nginx".to_string()].into());
        assert_eq!(usage.workloads_of("nginx"), [key("api"), key("web")]);
        usage.set(&key("web"), ["busybox".to_string()].into());
        assert_eq!(usage.workloads_of("nginx"), [key("api")]);
        usage.remove(&key("api"));
        assert!(usage.workloads_of("nginx").is_empty());
        assert_eq!(usage.workloads_of("busybox"), [key("web")]);
        assert_eq!(key("web").to_string(), "Deployment/shop/web");
    }
}
