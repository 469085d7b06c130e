//! Backups lately seen served to anonymous pulls.

use image_backup_oci::ImageRef;

/// Backups lately seen served to anonymous pulls: workloads sharing an
/// image (hundreds, at times) then cost the registry one request, not one
/// each.
#[derive(Default)]
pub struct OpenBackups(parking_lot::Mutex<std::collections::HashMap<String, std::time::Instant>>);

/// How long an anonymous pull is trusted to go on working.
const OPEN_FOR: std::time::Duration = std::time::Duration::from_secs(300);
/// Entries kept at most; the oldest go first.
const OPEN_KEPT: usize = 10_000;

impl OpenBackups {
    pub fn all(&self, backups: &[ImageRef]) -> bool {
        let seen = self.0.lock();
        backups.iter().all(|b| seen.get(&b.to_string()).is_some_and(|at| at.elapsed() < OPEN_FOR))
    }

    pub fn insert(&self, backups: &[ImageRef]) {
        let mut seen = self.0.lock();
        if seen.len() + backups.len() > OPEN_KEPT {
            seen.retain(|_, at| at.elapsed() < OPEN_FOR);
        }
        if seen.len() + backups.len() > OPEN_KEPT {
            seen.clear();
        }
        let now = std::time::Instant::now();
        for backup in backups {
            seen.insert(backup.to_string(), now);
        }
    }
}
