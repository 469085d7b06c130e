//! What the coordinator records on a workload it changed, in annotations:
//! they travel with the object, so a restarted coordinator, a new leader
//! and the `restore` command all read the same record.
//!
//! - `original-images`: the image each moved container ran before.
//! - `rewritten-at`: when the coordinator last moved it, which bounds how
//!   long its rollout is watched.
//! - `hold`: the coordinator moved it back (or someone else did) and will
//!   not move it again while it runs exactly these images.

use std::collections::BTreeMap;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use super::{ContainerList, Template};

/// Workload annotation recording the images it ran before the rewrite.
pub const ORIGINAL_IMAGES_ANNOTATION: &str = "backup.k8slab.io/original-images";
/// Workload annotation: when the coordinator last moved it to backups.
pub const REWRITTEN_AT_ANNOTATION: &str = "backup.k8slab.io/rewritten-at";
/// Workload annotation: leave the workload on these images (see [`Hold`]).
/// Deleting it lets the coordinator move the workload again.
pub const HOLD_ANNOTATION: &str = "backup.k8slab.io/hold";
/// Workload annotation opting a workload another controller manages in
/// (`"true"`) or any workload out (`"false"`) of being moved to backups.
pub const REWRITE_ANNOTATION: &str = "backup.k8slab.io/rewrite";

/// Container name to image, per list of the pod spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OriginalImages {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub init_containers: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub containers: BTreeMap<String, String>,
}

/// Why a workload is held on its source images.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum HoldReason {
    /// Its rollout to the backups failed and was undone.
    RolloutFailed,
    /// Someone (a rollback, a redeploy) put its source images back.
    Reverted,
    /// `image-backup-coordinator restore` moved it back.
    Restored,
    /// Its backup vanished from the registry and could not be made again.
    BackupLost,
}

/// The `hold` annotation: the workload is not moved again while its
/// template runs exactly `images`; any change to them (a new version, an
/// edit) ends the hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hold {
    pub reason: HoldReason,
    pub message: String,
    pub images: OriginalImages,
}

#[derive(Debug, thiserror::Error)]
pub enum AnnotationError {
    #[error("{workload}: annotation {annotation} is not valid: {error}")]
    Json { workload: String, annotation: &'static str, error: serde_json::Error },
    #[error("{workload}: annotation {REWRITTEN_AT_ANNOTATION} is not a time: {error}")]
    Time { workload: String, error: jiff::Error },
}

/// What the coordinator recorded on a workload.
#[derive(Clone, Debug, Default)]
pub struct Record {
    pub originals: OriginalImages,
    pub rewritten_at: Option<Timestamp>,
    pub hold: Option<Hold>,
    /// The `rewrite` annotation: `Some(true)` opts in, `Some(false)` out.
    pub rewrite: Option<bool>,
}

// === impl OriginalImages ===

impl OriginalImages {
    /// Every container's image as the template has it now.
    pub fn of_template(template: &Template) -> Self {
        let mut images = Self::default();
        for container in &template.containers {
            images.list_mut(container.list).insert(container.name.clone(), container.image.clone());
        }
        images
    }

    /// The image recorded for a container.
    pub fn of(&self, list: ContainerList, container: &str) -> Option<&str> {
        let list = match list {
            ContainerList::InitContainers => &self.init_containers,
            ContainerList::Containers => &self.containers,
        };
        list.get(container).map(String::as_str)
    }

    pub fn list_mut(&mut self, list: ContainerList) -> &mut BTreeMap<String, String> {
        match list {
            ContainerList::InitContainers => &mut self.init_containers,
            ContainerList::Containers => &mut self.containers,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.init_containers.is_empty() && self.containers.is_empty()
    }
}

// === impl HoldReason ===

impl HoldReason {
    pub fn as_str(self) -> &'static str {
        match self {
            HoldReason::RolloutFailed => "RolloutFailed",
            HoldReason::Reverted => "Reverted",
            HoldReason::Restored => "Restored",
            HoldReason::BackupLost => "BackupLost",
        }
    }
}

// === impl Hold ===

impl Hold {
    /// Whether the hold still applies to the template as it is.
    pub fn holds(&self, template: &Template) -> bool {
        self.images == OriginalImages::of_template(template)
    }
}

// === impl Record ===

impl Record {
    pub fn read(template: &Template) -> Result<Self, AnnotationError> {
        let json = |annotation: &'static str| {
            template
                .annotation(annotation)
                .map(serde_json::from_str::<serde_json::Value>)
                .transpose()
                .map_err(|error| AnnotationError::Json { workload: template.workload.clone(), annotation, error })
        };
        let originals = match json(ORIGINAL_IMAGES_ANNOTATION)? {
            Some(value) => parse(template, ORIGINAL_IMAGES_ANNOTATION, value)?,
            None => OriginalImages::default(),
        };
        let hold = match json(HOLD_ANNOTATION)? {
            Some(value) => Some(parse(template, HOLD_ANNOTATION, value)?),
            None => None,
        };
        let rewritten_at = template
            .annotation(REWRITTEN_AT_ANNOTATION)
            .map(str::parse::<Timestamp>)
            .transpose()
            .map_err(|error| AnnotationError::Time { workload: template.workload.clone(), error })?;
        let rewrite = template.annotation(REWRITE_ANNOTATION).map(|v| v.trim().eq_ignore_ascii_case("true"));
        Ok(Self { originals, rewritten_at, hold, rewrite })
    }
}

fn parse<T: serde::de::DeserializeOwned>(
    template: &Template,
    annotation: &'static str,
    value: serde_json::Value,
) -> Result<T, AnnotationError> {
    serde_json::from_value(value).map_err(|error| AnnotationError::Json {
        workload: template.workload.clone(),
        annotation,
        error,
    })
}
