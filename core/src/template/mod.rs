//! A workload's pod template as the coordinator changes it, and the record
//! it keeps on the workload: the patches that move it to its backups and
//! back, built here from a view of the template with no Kubernetes types
//! (the coordinator makes the view from a Deployment or a DaemonSet).

mod patch;
mod record;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

pub use patch::{
    Restore, RewriteError, backup_patch, restore_patch, reverted_containers, reverted_patch, settled_patch,
};
pub use record::{
    AnnotationError, HOLD_ANNOTATION, Hold, HoldReason, ORIGINAL_IMAGES_ANNOTATION, OriginalImages, REWRITE_ANNOTATION,
    REWRITTEN_AT_ANNOTATION, Record,
};

/// Which list of the pod spec a container is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ContainerList {
    InitContainers,
    Containers,
}

/// One container of a pod template and the image it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerImage {
    pub list: ContainerList,
    /// Its place in its list, as JSON pointers count.
    pub index: usize,
    pub name: String,
    pub image: String,
}

/// What the patch builders read of a workload.
#[derive(Clone, Debug, Default)]
pub struct Template {
    /// `Kind/namespace/name`, for errors.
    pub workload: String,
    /// Every container with an image, init containers first, in pod-spec
    /// order.
    pub containers: Vec<ContainerImage>,
    /// The workload's annotations; `None` when it has none at all (a patch
    /// then creates the map before adding to it).
    pub annotations: Option<BTreeMap<String, String>>,
    /// The pod spec's `imagePullSecrets`; `None` when the field is absent.
    pub pull_secrets: Option<Vec<String>>,
}

// === impl ContainerList ===

impl ContainerList {
    /// Field name in the pod spec, as JSON pointers and annotations use it.
    pub fn field(self) -> &'static str {
        match self {
            ContainerList::InitContainers => "initContainers",
            ContainerList::Containers => "containers",
        }
    }
}

// === impl Template ===

impl Template {
    fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.as_ref().and_then(|a| a.get(key)).map(String::as_str)
    }
}
