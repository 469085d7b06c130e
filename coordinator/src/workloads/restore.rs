//! Moving a workload back to the images it ran before the coordinator moved
//! it, from the `original-images` annotation: the coordinator does it when a
//! rollout fails or a backup is lost, and `image-backup-coordinator restore`
//! does it for people. Like the rewrite, it is one JSON patch whose `test`
//! operations pin every container it touches and the annotation it read, so
//! a workload changed meanwhile is refused whole, never overwritten.

use image_backup_oci::{BackupTarget, ImageRef};
use json_patch::Patch;
use serde_json::Value;

use super::{
    annotations::{
        HOLD_ANNOTATION, Hold, HoldReason, ORIGINAL_IMAGES_ANNOTATION, OriginalImages, REWRITTEN_AT_ANNOTATION, Record,
    },
    rewrite::{RewriteError, annotate, move_image, remove_annotation, test_annotation},
    workload::Workload,
};

/// A restore to apply: the patch and what it moves.
#[derive(Debug)]
pub struct Restore {
    pub patch: Patch,
    /// `container: backup -> original`, for logs and Events.
    pub moves: Vec<String>,
}

/// The patch that moves every container now running a backup under
/// `backup` back to its recorded original, drops the record, and holds the
/// workload there (see [`Hold`]); `None` when no container runs a backup
/// with a recorded original.
pub fn restore_patch(
    workload: &Workload,
    backup: &BackupTarget,
    reason: HoldReason,
    message: &str,
) -> Result<Option<Restore>, RewriteError> {
    let record = Record::read(workload)?;
    let mut after = OriginalImages::of_workload(workload);
    let mut ops = Vec::new();
    let mut moves = Vec::new();
    for container in workload.container_images() {
        let Some(original) = record.originals.of(container.list, &container.name) else { continue };
        let on_backup = ImageRef::parse(&container.image).is_ok_and(|image| backup.holds(&image));
        if !on_backup || original == container.image {
            continue;
        }
        ops.extend(move_image(&container, original));
        moves.push(format!("{}: {} -> {original}", container.name, container.image));
        after.list_mut(container.list).insert(container.name, original.to_string());
    }
    if ops.is_empty() {
        return Ok(None);
    }
    let annotations = workload.metadata().annotations.as_ref();
    // The record read is the record removed: a rewrite in between fails it.
    if let Some(text) = annotations.and_then(|a| a.get(ORIGINAL_IMAGES_ANNOTATION)) {
        ops.push(test_annotation(ORIGINAL_IMAGES_ANNOTATION, text));
        ops.push(remove_annotation(ORIGINAL_IMAGES_ANNOTATION));
    }
    if annotations.is_some_and(|a| a.contains_key(REWRITTEN_AT_ANNOTATION)) {
        ops.push(remove_annotation(REWRITTEN_AT_ANNOTATION));
    }
    let hold = Hold { reason, message: message.to_string(), images: after };
    ops.push(annotate(HOLD_ANNOTATION, Value::from(serde_json::to_string(&hold).unwrap_or_default())));
    Ok(Some(Restore { patch: Patch(ops), moves }))
}

/// The patch that records, without touching any image, that someone else
/// put `containers` back on their originals (a rollback, a redeploy): their
/// record goes and the workload is held where it is, so the coordinator
/// reports the change once instead of fighting it.
pub fn reverted_patch(workload: &Workload, containers: &[String], message: &str) -> Result<Patch, RewriteError> {
    let record = Record::read(workload)?;
    let mut originals = record.originals.clone();
    for list in [&mut originals.init_containers, &mut originals.containers] {
        list.retain(|name, _| !containers.contains(name));
    }
    let annotations = workload.metadata().annotations.clone().unwrap_or_default();
    let mut ops = Vec::new();
    if let Some(text) = annotations.get(ORIGINAL_IMAGES_ANNOTATION) {
        ops.push(test_annotation(ORIGINAL_IMAGES_ANNOTATION, text));
        if originals.is_empty() {
            ops.push(remove_annotation(ORIGINAL_IMAGES_ANNOTATION));
        } else {
            ops.push(annotate(
                ORIGINAL_IMAGES_ANNOTATION,
                Value::from(serde_json::to_string(&originals).unwrap_or_default()),
            ));
        }
    }
    if annotations.contains_key(REWRITTEN_AT_ANNOTATION) {
        ops.push(remove_annotation(REWRITTEN_AT_ANNOTATION));
    }
    let hold =
        Hold { reason: HoldReason::Reverted, message: message.into(), images: OriginalImages::of_workload(workload) };
    ops.push(annotate(HOLD_ANNOTATION, Value::from(serde_json::to_string(&hold).unwrap_or_default())));
    Ok(Patch(ops))
}

/// Containers someone put back on their recorded original image.
pub fn reverted_containers(workload: &Workload, record: &Record) -> Vec<String> {
    workload
        .container_images()
        .into_iter()
        .filter(|c| record.originals.of(c.list, &c.name) == Some(c.image.as_str()))
        .map(|c| c.name)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::{
        annotations::ORIGINAL_IMAGES_ANNOTATION, rewrite::backup_patch, workload::tests::deployment,
    };
    use k8s_openapi::jiff::Timestamp;
    use serde_json::json;
    use std::collections::BTreeMap;

    const PINNED: &str = "backup.local/mirror/docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn target() -> BackupTarget {
        BackupTarget { registry: "backup.local".into(), prefix: "mirror".into() }
    }

    fn apply(workload: &Workload, patch: &Patch) -> Result<Workload, json_patch::PatchError> {
        let Workload::Deployment(d) = workload else { unreachable!() };
        let mut doc = serde_json::to_value(d).unwrap();
        json_patch::patch(&mut doc, patch)?;
        Ok(Workload::Deployment(serde_json::from_value(doc).unwrap()))
    }

    fn rewritten() -> Workload {
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())]);
        apply(&workload, &backup_patch(&workload, &backups, None, Timestamp::now()).unwrap()).unwrap()
    }

    #[test]
    fn moves_back_exactly_what_was_moved_and_holds_it_there() {
        let before = deployment(json!(null));
        let restore = restore_patch(&rewritten(), &target(), HoldReason::RolloutFailed, "ImagePullBackOff")
            .unwrap()
            .expect("something to restore");
        assert_eq!(restore.moves, [format!("web: {PINNED} -> nginx:1.25")]);
        let restored = apply(&rewritten(), &restore.patch).unwrap();
        assert_eq!(restored.container_images(), before.container_images());
        let record = Record::read(&restored).unwrap();
        assert!(record.originals.is_empty() && record.rewritten_at.is_none(), "{record:?}");
        let hold = record.hold.expect("held");
        assert_eq!((hold.reason, hold.message.as_str()), (HoldReason::RolloutFailed, "ImagePullBackOff"));
        assert!(hold.holds(&restored));
    }

    #[test]
    fn a_rollback_by_someone_else_is_recorded_and_held() {
        let mut workload = rewritten();
        if let Workload::Deployment(d) = &mut workload {
            d.spec.template.spec.as_mut().unwrap().containers[0].image = Some("nginx:1.25".into());
        }
        let record = Record::read(&workload).unwrap();
        let reverted = reverted_containers(&workload, &record);
        assert_eq!(reverted, ["web"]);
        let held = apply(&workload, &reverted_patch(&workload, &reverted, "put back").unwrap()).unwrap();
        let record = Record::read(&held).unwrap();
        assert!(record.originals.is_empty() && record.rewritten_at.is_none());
        assert_eq!(record.hold.as_ref().map(|h| h.reason), Some(HoldReason::Reverted));
        assert!(record.hold.unwrap().holds(&held));
        assert_eq!(held.container_images(), workload.container_images(), "no image touched");
    }

    #[test]
    fn a_container_someone_moved_on_is_left_alone() {
        let mut workload = rewritten();
        if let Workload::Deployment(d) = &mut workload {
            d.spec.template.spec.as_mut().unwrap().containers[0].image = Some("nginx:1.27".into());
        }
        assert!(restore_patch(&workload, &target(), HoldReason::Restored, "").unwrap().is_none());
    }

    #[test]
    fn a_record_changed_meanwhile_fails_the_whole_restore() {
        let workload = rewritten();
        let restore = restore_patch(&workload, &target(), HoldReason::Restored, "").unwrap().unwrap();
        let mut changed = workload.clone();
        if let Workload::Deployment(d) = &mut changed {
            d.metadata.annotations.as_mut().unwrap().insert(ORIGINAL_IMAGES_ANNOTATION.into(), "{}".into());
        }
        assert!(apply(&changed, &restore.patch).is_err());
    }
}
