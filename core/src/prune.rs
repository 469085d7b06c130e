//! When an ImageBackup no workload uses goes, and when what it copied
//! leaves the registry: a grace period from the first time it is found
//! unused (any use within it clears the mark), then, with prune on, a
//! quarantine entered only when no pod template in the cluster names it,
//! and left for the registry only when none does at its end either.

use std::time::Duration;

use jiff::Timestamp;

/// What to do with an ImageBackup, by its use and its mark.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing now.
    Keep,
    /// Used again: the mark (and any quarantine) goes.
    Unmark,
    /// Found unused for the first time: marked now.
    Mark,
    /// Unused for the whole grace period, no copy in flight: it goes (after
    /// the quarantine, with prune on).
    Expire,
}

/// The step for an ImageBackup used or not (`used`), marked unused since
/// `unused_since`, with a copy in flight or not (`copying`: it finishes
/// first).
pub fn step(used: bool, unused_since: Option<Timestamp>, copying: bool, now: Timestamp, grace: Duration) -> Step {
    match (used, unused_since) {
        (true, Some(_)) => Step::Unmark,
        (false, None) => Step::Mark,
        (false, Some(since)) if elapsed(now, since) >= grace && !copying => Step::Expire,
        _ => Step::Keep,
    }
}

/// Whether the sweep wakes the ImageBackup to take a step: its mark is to
/// change, or its grace has run out.
pub fn due(used: bool, unused_since: Option<Timestamp>, now: Timestamp, grace: Duration) -> bool {
    match (used, unused_since) {
        (true, Some(_)) | (false, None) => true,
        (false, Some(since)) => elapsed(now, since) >= grace,
        (true, None) => false,
    }
}

/// How long an expired ImageBackup in quarantine since `since` still
/// waits before the cluster is read again; `None` when it is time.
pub fn quarantine_left(since: Option<Timestamp>, now: Timestamp, quarantine: Duration) -> Option<Duration> {
    let waited = elapsed(now, since?);
    (waited < quarantine).then(|| quarantine - waited)
}

/// What reading every pod template in the cluster says of an expired
/// ImageBackup.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A template names it (another kind, an excluded namespace, rollback
    /// history): kept, its grace started again.
    Kept,
    /// None does, and it was not in quarantine: it enters it.
    Quarantine,
    /// None did when it entered quarantine, nor does at its end: its
    /// manifests leave the registry with it.
    Prune,
}

pub fn after_reading(named_by: usize, quarantined: bool) -> Verdict {
    match (named_by, quarantined) {
        (0, true) => Verdict::Prune,
        (0, false) => Verdict::Quarantine,
        _ => Verdict::Kept,
    }
}

/// Whether an object of any kind, as JSON, names an image `is_backup`
/// accepts: every string under an `image` key counts, at any depth, so
/// containers, init and ephemeral containers, a ControllerRevision's raw
/// template and a pod's container statuses are all read, and a kind that
/// nests its template deeper (a CronJob) needs no rule of its own.
pub fn names_a_backup(object: &serde_json::Value, is_backup: &impl Fn(&str) -> bool) -> bool {
    use serde_json::Value;
    match object {
        Value::Object(fields) => fields.iter().any(|(key, field)| match (key.as_str(), field) {
            ("image", Value::String(image)) => is_backup(image),
            _ => names_a_backup(field, is_backup),
        }),
        Value::Array(items) => items.iter().any(|item| names_a_backup(item, is_backup)),
        _ => false,
    }
}

fn elapsed(now: Timestamp, since: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn steps() {
        let now: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let ago = |hours: i64| Some(now - jiff::SignedDuration::from_hours(hours));
        // (used, unused since, copying, the step, woken by the sweep)
        let cases = [
            (true, None, false, Step::Keep, false),
            (true, ago(30), false, Step::Unmark, true),
            (false, None, false, Step::Mark, true),
            (false, None, true, Step::Mark, true),
            (false, ago(1), false, Step::Keep, false),
            (false, ago(24), false, Step::Expire, true),
            // Woken, but a copy in flight finishes first.
            (false, ago(30), true, Step::Keep, true),
        ];
        for (used, since, copying, expected, woken) in cases {
            assert_eq!(step(used, since, copying, now, 24 * HOUR), expected, "{used} {since:?} {copying}");
            assert_eq!(due(used, since, now, 24 * HOUR), woken, "{used} {since:?}");
        }
    }

    #[test]
    fn quarantine() {
        let now: Timestamp = "2026-12-06T12:00:00Z".parse().unwrap();
        let ago = |hours: i64| Some(now - jiff::SignedDuration::from_hours(hours));
        assert_eq!(quarantine_left(None, now, 7 * 24 * HOUR), None, "not in quarantine: read the cluster");
        assert_eq!(quarantine_left(ago(24), now, 7 * 24 * HOUR), Some(6 * 24 * HOUR));
        assert_eq!(quarantine_left(ago(7 * 24), now, 7 * 24 * HOUR), None);
        assert_eq!(after_reading(2, true), Verdict::Kept);
        assert_eq!(after_reading(1, false), Verdict::Kept);
        assert_eq!(after_reading(0, false), Verdict::Quarantine);
        assert_eq!(after_reading(0, true), Verdict::Prune);
    }

    #[test]
    fn every_kind_of_template_is_read_at_any_depth() {
        use serde_json::json;
        let is_backup = |image: &str| image == "backup/web@sha256:1";
        let statefulset = json!({ "spec": { "template": { "spec": {
            "initContainers": [{ "name": "init", "image": "busybox" }],
            "containers": [{ "name": "web", "image": "backup/web@sha256:1" }] } } } });
        // A ControllerRevision keeps its template as raw data.
        let revision = json!({ "data": { "spec": { "template": { "spec": {
            "containers": [{ "image": "backup/web@sha256:1" }] } } } } });
        let cronjob = json!({ "spec": { "jobTemplate": { "spec": { "template": { "spec": {
            "containers": [{ "image": "backup/web@sha256:1" }] } } } } } });
        let pod = json!({ "spec": { "ephemeralContainers": [{ "image": "backup/web@sha256:1" }] } });
        for object in [statefulset, revision, cronjob, pod] {
            assert!(names_a_backup(&object, &is_backup), "{object}");
        }
        let other = json!({ "spec": { "containers": [{ "image": "web:1" }, { "image": 7 }] },
            "metadata": { "annotations": { "note": "backup/web@sha256:1" } } });
        assert!(!names_a_backup(&other, &is_backup), "only images count");
    }
}
