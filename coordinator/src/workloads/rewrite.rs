//! The one patch that moves a workload to its backups. It is a JSON patch
//! whose `test` operations pin every container's old name and image, so a
//! workload changed since the coordinator looked is refused whole (422) and
//! reconsidered, never overwritten.

use std::collections::BTreeMap;

use json_patch::{AddOperation, Patch, PatchOperation, ReplaceOperation, TestOperation, jsonptr::PointerBuf};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::workload::{ContainerList, Workload};

/// Workload annotation recording the images it ran before the rewrite.
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "backup.k8slab.io/original-images";

/// What the annotation holds: container name to original image, per list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalImages {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub init_containers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub containers: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("{workload}: annotation {ORIGINAL_IMAGES_ANNOTATION} is not valid JSON: {error}")]
    Annotation { workload: String, error: serde_json::Error },
    #[error("{workload}: nothing to rewrite")]
    Nothing { workload: String },
}

/// The images a workload ran before it was patched, from its annotation.
pub fn originals(workload: &Workload) -> Result<OriginalImages, RewriteError> {
    match workload.metadata().annotations.as_ref().and_then(|a| a.get(ORIGINAL_IMAGES_ANNOTATION)) {
        Some(text) => serde_json::from_str::<OriginalImages>(text)
            .map_err(|error| RewriteError::Annotation { workload: workload.key().to_string(), error }),
        None => Ok(OriginalImages::default()),
    }
}

impl OriginalImages {
    /// The original image of a container.
    pub fn of(&self, list: ContainerList, container: &str) -> Option<&str> {
        let list = match list {
            ContainerList::InitContainers => &self.init_containers,
            ContainerList::Containers => &self.containers,
        };
        list.get(container).map(String::as_str)
    }
}

/// Builds the patch that points every container whose image is a key of
/// `backups` at its value (a backup reference pinned by digest), and records
/// the originals in the annotation (keeping those of an earlier rewrite).
pub fn backup_patch(workload: &Workload, backups: &BTreeMap<String, String>) -> Result<Patch, RewriteError> {
    let mut originals = originals(workload)?;
    let mut ops = Vec::new();
    for container in workload.container_images() {
        let Some(backup) = backups.get(&container.image) else { continue };
        if *backup == container.image {
            continue;
        }
        let base = format!("/spec/template/spec/{}/{}", container.list.field(), container.index);
        ops.push(test(&format!("{base}/name"), Value::from(container.name.clone())));
        ops.push(test(&format!("{base}/image"), Value::from(container.image.clone())));
        ops.push(PatchOperation::Replace(ReplaceOperation {
            path: pointer(&format!("{base}/image")),
            value: Value::from(backup.clone()),
        }));
        let list = match container.list {
            ContainerList::InitContainers => &mut originals.init_containers,
            ContainerList::Containers => &mut originals.containers,
        };
        list.entry(container.name).or_insert(container.image);
    }
    if ops.is_empty() {
        return Err(RewriteError::Nothing { workload: workload.key().to_string() });
    }
    let annotation = serde_json::to_string(&originals).unwrap_or_default();
    if workload.metadata().annotations.is_none() {
        ops.push(PatchOperation::Add(AddOperation {
            path: pointer("/metadata/annotations"),
            value: Value::Object(Default::default()),
        }));
    }
    ops.push(PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(["metadata", "annotations", ORIGINAL_IMAGES_ANNOTATION]),
        value: Value::from(annotation),
    }));
    Ok(Patch(ops))
}

fn pointer(path: &str) -> PointerBuf {
    PointerBuf::from_tokens(path.trim_start_matches('/').split('/'))
}

fn test(path: &str, value: Value) -> PatchOperation {
    PatchOperation::Test(TestOperation { path: pointer(path), value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::workload::tests::deployment;
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
        let patch = backup_patch(&workload, &backups).unwrap();
        let mut doc = as_json(&workload);
        json_patch::patch(&mut doc, &patch).unwrap();
        assert_eq!(doc["spec"]["template"]["spec"]["containers"][0]["image"], PINNED);
        assert_eq!(doc["spec"]["template"]["spec"]["containers"][1]["image"], "docker.io/library/busybox:1.36");
        let recorded: OriginalImages =
            serde_json::from_str(doc["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].as_str().unwrap()).unwrap();
        assert_eq!(recorded.containers, BTreeMap::from([("web".to_string(), "nginx:1.25".to_string())]));
    }

    #[test]
    fn a_workload_changed_meanwhile_fails_the_whole_patch() {
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())]);
        let patch = backup_patch(&workload, &backups).unwrap();
        let mut changed = as_json(&workload);
        changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
        let before = changed.clone();
        assert!(json_patch::patch(&mut changed, &patch).is_err());
        assert_eq!(changed, before, "nothing applied");
    }

    #[test]
    fn nothing_to_rewrite_is_an_error_not_an_empty_patch() {
        let workload = deployment(json!(null));
        assert!(matches!(backup_patch(&workload, &BTreeMap::new()), Err(RewriteError::Nothing { .. })));
    }
}
