//! Which workloads use which ImageBackup: the index the workload
//! reconciles keep (each sets what its workload uses now), read to wake
//! workloads when a backup finishes, to keep what is in use from prune, and
//! to tell people who uses an image.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
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

/// How a workload uses an ImageBackup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Use {
    /// It runs the source, at this digest (empty while its pods report
    /// none): the backup is for it.
    Runs(String),
    /// It was patched to this backup reference (pinned by digest),
    /// whatever its source runs now.
    Pinned(String),
}

/// Which workloads use which ImageBackup, and how.
#[derive(Default)]
pub struct Index {
    by_workload: HashMap<WorkloadKey, BTreeMap<String, Use>>,
    by_backup: HashMap<String, BTreeSet<WorkloadKey>>,
}

// === impl Index ===

impl Index {
    /// The ImageBackups `workload` uses now and how, replacing what it used
    /// before.
    pub fn set(&mut self, workload: &WorkloadKey, backups: BTreeMap<String, Use>) {
        let before = self.by_workload.remove(workload).unwrap_or_default();
        for gone in before.keys().filter(|name| !backups.contains_key(*name)) {
            if let Some(users) = self.by_backup.get_mut(gone) {
                users.remove(workload);
                if users.is_empty() {
                    self.by_backup.remove(gone);
                }
            }
        }
        for name in backups.keys() {
            self.by_backup.entry(name.clone()).or_default().insert(workload.clone());
        }
        if !backups.is_empty() {
            self.by_workload.insert(workload.clone(), backups);
        }
    }

    pub fn remove(&mut self, workload: &WorkloadKey) {
        self.set(workload, BTreeMap::new());
    }

    /// The digests that workloads still running the source of ImageBackup
    /// `name` run (those known); workloads already pinned to a backup are
    /// served whatever the source does.
    pub fn digests_of(&self, name: &str) -> BTreeSet<String> {
        let users = self.by_backup.get(name).into_iter().flatten();
        users
            .filter_map(|user| match self.by_workload.get(user).and_then(|backups| backups.get(name)) {
                Some(Use::Runs(digest)) if !digest.is_empty() => Some(digest.clone()),
                _ => None,
            })
            .collect()
    }

    /// Whether any workload is pinned to the backup `reference`.
    pub fn pins(&self, reference: &str) -> bool {
        self.by_workload.values().flat_map(|uses| uses.values()).any(|u| matches!(u, Use::Pinned(r) if r == reference))
    }

    /// The workloads that use the ImageBackup `name`, in order.
    pub fn workloads_of(&self, name: &str) -> Vec<WorkloadKey> {
        self.by_backup.get(name).map(|users| users.iter().cloned().collect()).unwrap_or_default()
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
        let mut usage = Index::default();
        let runs = |digest: &str| Use::Runs(digest.into());
        let uses = |names: &[(&str, Use)]| names.iter().map(|(n, u)| (n.to_string(), u.clone())).collect();
        usage.set(&key("web"), uses(&[("nginx", runs("sha256:1")), ("busybox", runs(""))]));
        usage.set(&key("api"), uses(&[("nginx", runs("sha256:2"))]));
        usage.set(&key("old"), uses(&[("nginx", Use::Pinned("b/nginx@sha256:0".into()))]));
        assert!(usage.pins("b/nginx@sha256:0") && !usage.pins("b/nginx@sha256:1"));
        assert_eq!(usage.workloads_of("nginx"), [key("api"), key("old"), key("web")]);
        assert_eq!(usage.digests_of("nginx"), ["sha256:1".to_string(), "sha256:2".to_string()].into());
        assert!(usage.digests_of("busybox").is_empty(), "unknown digests are left out");
        usage.set(&key("web"), uses(&[("busybox", runs(""))]));
        assert_eq!(usage.workloads_of("nginx"), [key("api"), key("old")]);
        usage.remove(&key("api"));
        usage.remove(&key("old"));
        assert!(usage.workloads_of("nginx").is_empty());
        assert_eq!(usage.workloads_of("busybox"), [key("web")]);
        assert_eq!(key("web").to_string(), "Deployment/shop/web");
    }
}
