//! The JSON patches that move a workload's containers to their backups
//! and back. Each carries `test` operations that pin every container it
//! touches (its name and its image as read) and the record it read, so a
//! workload changed since the coordinator looked is refused whole (422)
//! and reconsidered, never overwritten.

use std::collections::BTreeMap;

use jiff::Timestamp;
use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, TestOperation, jsonptr::PointerBuf};
use serde_json::Value;

use super::{
    AnnotationError, ContainerImage, HOLD_ANNOTATION, Hold, HoldReason, ORIGINAL_IMAGES_ANNOTATION, OriginalImages,
    REWRITTEN_AT_ANNOTATION, Record, Template,
};

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error("{workload}: nothing to rewrite")]
    Nothing { workload: String },
}

/// A restore to apply: the patch and what it moves.
#[derive(Debug)]
pub struct Restore {
    pub patch: Patch,
    /// `container: backup -> original`, for logs and Events.
    pub moves: Vec<String>,
}

/// Builds the patch that points every container whose image is a key of
/// `backups` at its value (a backup reference pinned by digest), records
/// the originals in the annotation (keeping those of containers an earlier
/// rewrite moved), and when, so that the rollout it starts is watched; a
/// stale hold goes.
pub fn backup_patch(
    template: &Template,
    backups: &BTreeMap<String, String>,
    pull_secret: Option<&str>,
    now: Timestamp,
) -> Result<Patch, RewriteError> {
    let record = Record::read(template)?;
    let mut originals = record.originals;
    let mut ops = Vec::new();
    for container in &template.containers {
        let Some(backup) = backups.get(&container.image) else { continue };
        if *backup == container.image {
            continue;
        }
        ops.extend(move_image(container, backup));
        // What it runs now is its source: a version deployed since an
        // earlier rewrite replaces that rewrite's record.
        originals.list_mut(container.list).insert(container.name.clone(), container.image.clone());
    }
    if ops.is_empty() {
        return Err(RewriteError::Nothing { workload: template.workload.clone() });
    }
    // The pull secret the backups need, unless the pods use it already.
    if let Some(secret) = pull_secret {
        let entry = serde_json::json!({ "name": secret });
        match &template.pull_secrets {
            None => ops.push(PatchOperation::Add(AddOperation {
                path: pointer("/spec/template/spec/imagePullSecrets"),
                value: Value::Array(vec![entry]),
            })),
            Some(listed) if !listed.iter().any(|name| name == secret) => ops.push(PatchOperation::Add(AddOperation {
                path: pointer("/spec/template/spec/imagePullSecrets/-"),
                value: entry,
            })),
            Some(_) => {}
        }
    }
    if template.annotations.is_none() {
        ops.push(PatchOperation::Add(AddOperation {
            path: pointer("/metadata/annotations"),
            value: Value::Object(Default::default()),
        }));
    }
    ops.push(annotate(ORIGINAL_IMAGES_ANNOTATION, json_text(&originals)));
    ops.push(annotate(REWRITTEN_AT_ANNOTATION, Value::from(now.to_string())));
    if record.hold.is_some() {
        ops.push(remove_annotation(HOLD_ANNOTATION));
    }
    Ok(Patch(ops))
}

/// The patch that moves every container now running a backup (an image
/// `on_backup` accepts) back to its recorded original, drops the record,
/// and holds the workload there (see [`Hold`]); `None` when no container
/// runs a backup with a recorded original.
pub fn restore_patch(
    template: &Template,
    on_backup: impl Fn(&str) -> bool,
    reason: HoldReason,
    message: &str,
) -> Result<Option<Restore>, RewriteError> {
    let record = Record::read(template)?;
    let mut after = OriginalImages::of_template(template);
    let mut ops = Vec::new();
    let mut moves = Vec::new();
    for container in &template.containers {
        let Some(original) = record.originals.of(container.list, &container.name) else { continue };
        if !on_backup(&container.image) || original == container.image {
            continue;
        }
        ops.extend(move_image(container, original));
        moves.push(format!("{}: {} -> {original}", container.name, container.image));
        after.list_mut(container.list).insert(container.name.clone(), original.to_string());
    }
    if ops.is_empty() {
        return Ok(None);
    }
    // The record read is the record removed: a rewrite in between fails it.
    if let Some(text) = template.annotation(ORIGINAL_IMAGES_ANNOTATION) {
        ops.push(test_annotation(ORIGINAL_IMAGES_ANNOTATION, text));
        ops.push(remove_annotation(ORIGINAL_IMAGES_ANNOTATION));
    }
    if template.annotation(REWRITTEN_AT_ANNOTATION).is_some() {
        ops.push(remove_annotation(REWRITTEN_AT_ANNOTATION));
    }
    let hold = Hold { reason, message: message.to_string(), images: after };
    ops.push(annotate(HOLD_ANNOTATION, json_text(&hold)));
    Ok(Some(Restore { patch: Patch(ops), moves }))
}

/// The patch that records, without touching any image, that someone else
/// put `containers` back on their originals (a rollback, a redeploy): their
/// record goes and the workload is held where it is, so the coordinator
/// reports the change once instead of fighting it.
pub fn reverted_patch(template: &Template, containers: &[String], message: &str) -> Result<Patch, RewriteError> {
    let record = Record::read(template)?;
    let mut originals = record.originals;
    for list in [&mut originals.init_containers, &mut originals.containers] {
        list.retain(|name, _| !containers.contains(name));
    }
    let mut ops = Vec::new();
    if let Some(text) = template.annotation(ORIGINAL_IMAGES_ANNOTATION) {
        ops.push(test_annotation(ORIGINAL_IMAGES_ANNOTATION, text));
        if originals.is_empty() {
            ops.push(remove_annotation(ORIGINAL_IMAGES_ANNOTATION));
        } else {
            ops.push(annotate(ORIGINAL_IMAGES_ANNOTATION, json_text(&originals)));
        }
    }
    if template.annotation(REWRITTEN_AT_ANNOTATION).is_some() {
        ops.push(remove_annotation(REWRITTEN_AT_ANNOTATION));
    }
    let images = OriginalImages::of_template(template);
    let hold = Hold { reason: HoldReason::Reverted, message: message.into(), images };
    ops.push(annotate(HOLD_ANNOTATION, json_text(&hold)));
    Ok(Patch(ops))
}

/// The patch that drops the time of the last move once its rollout is
/// complete, so a later dip in availability (a node drained) is never
/// taken for a failed rollout; `None` when there is none to drop.
pub fn settled_patch(template: &Template) -> Option<Patch> {
    let value = template.annotation(REWRITTEN_AT_ANNOTATION)?;
    Some(Patch(vec![test_annotation(REWRITTEN_AT_ANNOTATION, value), remove_annotation(REWRITTEN_AT_ANNOTATION)]))
}

/// Containers someone put back on their recorded original image.
pub fn reverted_containers(template: &Template, record: &Record) -> Vec<String> {
    template
        .containers
        .iter()
        .filter(|c| record.originals.of(c.list, &c.name) == Some(c.image.as_str()))
        .map(|c| c.name.clone())
        .collect()
}

/// The operations that move one container to `image`, guarded by its name
/// and its image as read.
fn move_image(container: &ContainerImage, image: &str) -> [PatchOperation; 3] {
    let base = format!("/spec/template/spec/{}/{}", container.list.field(), container.index);
    [
        test(&format!("{base}/name"), Value::from(container.name.clone())),
        test(&format!("{base}/image"), Value::from(container.image.clone())),
        PatchOperation::Replace(ReplaceOperation {
            path: pointer(&format!("{base}/image")),
            value: Value::from(image),
        }),
    ]
}

/// A record as the annotation holds it: JSON text. The types serialize
/// infallibly (string maps and enums); an empty text would fail the read.
fn json_text(value: &impl serde::Serialize) -> Value {
    Value::from(serde_json::to_string(value).unwrap_or_default())
}

/// Sets an annotation (the annotations map exists).
fn annotate(key: &str, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(["metadata", "annotations", key]), value })
}

/// Fails the patch unless annotation `key` still holds `value`.
fn test_annotation(key: &str, value: &str) -> PatchOperation {
    PatchOperation::Test(TestOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", key]),
        value: Value::from(value),
    })
}

fn remove_annotation(key: &str) -> PatchOperation {
    PatchOperation::Remove(json_patch::RemoveOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", key]),
    })
}

fn pointer(path: &str) -> PointerBuf {
    PointerBuf::from_tokens(path.trim_start_matches('/').split('/'))
}

fn test(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Test(TestOperation { path: pointer(path), value })
}
