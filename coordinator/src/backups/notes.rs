//! What workload reconciles have to say on an ImageBackup (a workload not
//! moved to it, or moved back, and why). They hand it here; the ImageBackup
//! reconciler, the one writer of its status, folds it in.

use std::collections::HashMap;

use image_backup_crds::{ImageBackupStatus, WorkloadNote};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};
use parking_lot::Mutex;

/// Notes kept on one ImageBackup: enough for every workload a person
/// would look for, bounded for an image thousands of workloads run.
const MAX_NOTES: usize = 20;

/// A change to the notes of one ImageBackup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pending {
    Set(WorkloadNote),
    /// The workload runs the backup now (or is gone): its note goes.
    Clear(String),
}

#[derive(Default)]
pub struct Notes(Mutex<HashMap<String, Vec<Pending>>>);

// === impl Notes ===

impl Notes {
    /// Queues a change for ImageBackup `name`; the caller wakes it.
    pub fn push(&self, name: &str, change: Pending) {
        self.0.lock().entry(name.to_string()).or_default().push(change);
    }

    pub fn take(&self, name: &str) -> Vec<Pending> {
        self.0.lock().remove(name).unwrap_or_default()
    }

    /// Changes a failed write did not record, ahead of newer ones.
    pub fn put_back(&self, name: &str, mut changes: Vec<Pending>) {
        let mut notes = self.0.lock();
        let queued = notes.entry(name.to_string()).or_default();
        changes.append(queued);
        *queued = changes;
    }
}

/// `status` with `changes` applied; newest first, one note per workload.
pub fn apply(status: &ImageBackupStatus, changes: &[Pending]) -> ImageBackupStatus {
    let mut next = status.clone();
    for change in changes {
        match change {
            Pending::Set(note) => {
                next.workloads.retain(|n| n.workload != note.workload);
                next.workloads.insert(0, note.clone());
            }
            Pending::Clear(workload) => next.workloads.retain(|n| n.workload != *workload),
        }
    }
    next.workloads.truncate(MAX_NOTES);
    next
}

/// A note as the API stores it: `time` set now.
pub fn note(workload: String, reason: &str, message: String) -> WorkloadNote {
    WorkloadNote { workload, reason: reason.into(), message, time: Some(Time(Timestamp::now())) }
}

/// Whether `status` holds `note` already, whenever it was written.
pub fn has(status: Option<&ImageBackupStatus>, note: &WorkloadNote) -> bool {
    status.is_some_and(|s| {
        s.workloads.iter().any(|n| n.workload == note.workload && n.reason == note.reason && n.message == note.message)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_note_per_workload_newest_first_and_bounded() {
        let set = |w: &str, reason: &str| {
            Pending::Set(WorkloadNote { workload: w.into(), reason: reason.into(), ..Default::default() })
        };
        let status = apply(
            &ImageBackupStatus::default(),
            &[set("a", "Managed"), set("b", "NotPullable"), set("a", "RolloutFailed")],
        );
        let notes: Vec<_> = status.workloads.iter().map(|n| (n.workload.as_str(), n.reason.as_str())).collect();
        assert_eq!(notes, [("a", "RolloutFailed"), ("b", "NotPullable")]);
        assert!(has(Some(&status), &status.workloads[1].clone()));
        let cleared = apply(&status, &[Pending::Clear("a".into())]);
        assert_eq!(cleared.workloads.len(), 1);
        let many: Vec<_> = (0..30).map(|i| set(&format!("w{i}"), "Managed")).collect();
        let status = apply(&ImageBackupStatus::default(), &many);
        assert_eq!((status.workloads.len(), status.workloads[0].workload.as_str()), (MAX_NOTES, "w29"));
    }
}
