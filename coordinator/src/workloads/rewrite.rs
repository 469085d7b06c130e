//! The one patch that moves a workload to its backups. It is a JSON patch
//! whose `test` operations pin every container's old name and image, so a
//! workload changed since the coordinator looked is refused whole (422) and
//! reconsidered, never overwritten.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, TestOperation, jsonptr::PointerBuf};
use k8s_openapi::jiff::Timestamp;
use serde_json::Value;

use super::{
    annotations::{AnnotationError, HOLD_ANNOTATION, ORIGINAL_IMAGES_ANNOTATION, REWRITTEN_AT_ANNOTATION, Record},
    workload::{ContainerImage, Workload},
};

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error(transparent)]
    Annotation(#[from] AnnotationError),
    #[error("{workload}: nothing to rewrite")]
    Nothing { workload: String },
}

/// Builds the patch that points every container whose image is a key of
/// `backups` at its value (a backup reference pinned by digest), records
/// the originals in the annotation (keeping those of containers an earlier
/// rewrite moved),
/// and when, so that the rollout it starts is watched; a stale hold goes.
pub fn backup_patch(
    workload: &Workload,
    backups: &BTreeMap<String, String>,
    pull_secret: Option<&str>,
    now: Timestamp,
) -> Result<Patch, RewriteError> {
    let record = Record::read(workload)?;
    let mut originals = record.originals;
    let mut ops = Vec::new();
    for container in workload.container_images() {
        let Some(backup) = backups.get(&container.image) else { continue };
        if *backup == container.image {
            continue;
        }
        ops.extend(move_image(&container, backup));
        // What it runs now is its source: a version deployed since an
        // earlier rewrite replaces that rewrite's record.
        originals.list_mut(container.list).insert(container.name, container.image);
    }
    if ops.is_empty() {
        return Err(RewriteError::Nothing { workload: workload.key().to_string() });
    }
    // The pull secret the backups need, unless the pods use it already.
    if let Some(secret) = pull_secret {
        let listed = workload.pod_spec().and_then(|spec| spec.image_pull_secrets.as_ref());
        let entry = serde_json::json!({ "name": secret });
        match listed {
            None => ops.push(PatchOperation::Add(AddOperation {
                path: pointer("/spec/template/spec/imagePullSecrets"),
                value: Value::Array(vec![entry]),
            })),
            Some(list) if !list.iter().any(|r| r.name == secret) => ops.push(PatchOperation::Add(AddOperation {
                path: pointer("/spec/template/spec/imagePullSecrets/-"),
                value: entry,
            })),
            Some(_) => {}
        }
    }
    let annotation = serde_json::to_string(&originals).unwrap_or_default();
    if workload.metadata().annotations.is_none() {
        ops.push(PatchOperation::Add(AddOperation {
            path: pointer("/metadata/annotations"),
            value: Value::Object(Default::default()),
        }));
    }
    ops.push(annotate(ORIGINAL_IMAGES_ANNOTATION, Value::from(annotation)));
    ops.push(annotate(REWRITTEN_AT_ANNOTATION, Value::from(now.to_string())));
    if record.hold.is_some() {
        ops.push(remove_annotation(HOLD_ANNOTATION));
    }
    Ok(Patch(ops))
}

/// The operations that move one container to `image`, guarded by its name
/// and its image as read.
pub(super) fn move_image(container: &ContainerImage, image: &str) -> [PatchOperation; 3] {
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

/// Sets an annotation (the annotations map exists).
pub(super) fn annotate(key: &str, value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation { path: PointerBuf::from_tokens(["metadata", "annotations", key]), value })
}

/// Fails the patch unless annotation `key` still holds `value`.
pub(super) fn test_annotation(key: &str, value: &str) -> PatchOperation {
    PatchOperation::Test(TestOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", key]),
        value: Value::from(value),
    })
}

pub(super) fn remove_annotation(key: &str) -> PatchOperation {
    PatchOperation::Remove(json_patch::RemoveOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", key]),
    })
}

pub(super) fn pointer(path: &str) -> PointerBuf {
    PointerBuf::from_tokens(path.trim_start_matches('/').split('/'))
}

pub(super) fn test(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Test(TestOperation { path: pointer(path), value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::{annotations::OriginalImages, workload::tests::deployment};
    use serde_json::json;

    fn as_json(workload: &Workload) -> serde_json::Value {
        match workload {
            Workload::Deployment(d) => serde_json::to_value(d).unwrap(),
            Workload::DaemonSet(d) => serde_json::to_value(d).unwrap(),
        }
    }

    const PINNED: &str = "backup.local/mirror/docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn patch_moves_containers_and_records_originals() {
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())]);
        let patch = backup_patch(&workload, &backups, None, Timestamp::now()).unwrap();
        let mut doc = as_json(&workload);
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc["spec"]["template"]["spec"]["containers"][0]["image"], PINNED);
        assert_eq!(doc["spec"]["template"]["spec"]["containers"][1]["image"], "docker.io/library/busybox:1.36");
        let recorded: OriginalImages =
            serde_json::from_str(doc["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(recorded.containers, BTreeMap::from([("web".to_string(), "nginx:1.25".to_string())]));
    }

    #[test]
    fn a_version_deployed_since_a_rewrite_is_the_new_original() {
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())]);
        let mut doc = as_json(&workload);
        json_patch::patch(&mut doc, &backup_patch(&workload, &backups, None, Timestamp::now()).unwrap()).unwrap();
        // Someone deploys nginx:1.27; it is backed up and moved in turn.
        doc["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
        let redeployed = Workload::Deployment(serde_json::from_value(doc).unwrap());
        let backups = BTreeMap::from([("nginx:1.27".to_string(), PINNED.replace("0123", "4567"))]);
        let mut doc = as_json(&redeployed);
        json_patch::patch(&mut doc, &backup_patch(&redeployed, &backups, None, Timestamp::now()).unwrap()).unwrap();
        let recorded: OriginalImages =
            serde_json::from_str(doc["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(recorded.containers["web"], "nginx:1.27");
    }

    #[test]
    fn the_pull_secret_the_backups_need_is_added_once() {
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())]);
        let patch = backup_patch(&workload, &backups, Some("backup-pull"), Timestamp::now()).unwrap();
        let mut doc = as_json(&workload);
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc["spec"]["template"]["spec"]["imagePullSecrets"], json!([{ "name": "backup-pull" }]));
        let again = Workload::Deployment(serde_json::from_value(doc).unwrap());
        let init = BTreeMap::from([("quay.io/org/migrate:7".to_string(), PINNED.to_string())]);
        let patch = backup_patch(&again, &init, Some("backup-pull"), Timestamp::now()).unwrap();
        let mut doc = as_json(&again);
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc["spec"]["template"]["spec"]["imagePullSecrets"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn a_workload_changed_meanwhile_fails_the_whole_patch() {
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())]);
        let patch = backup_patch(&workload, &backups, None, Timestamp::now()).unwrap();
        let mut changed = as_json(&workload);
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
        let before = changed.clone();
        assert!(json_patch::patch(&mut changed, &patch).is_err());
        assert_eq!(changed, before, "nothing applied");
    }

    #[test]
    fn nothing_to_rewrite_is_an_error_not_an_empty_patch() {
        let workload = deployment(json!(null));
        assert!(matches!(
            backup_patch(&workload, &BTreeMap::new(), None, Timestamp::now()),
            Err(RewriteError::Nothing { .. })
        ));
    }
}
