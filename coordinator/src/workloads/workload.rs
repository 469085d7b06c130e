//! The workloads the coordinator acts on: Deployments and DaemonSets outside
//! the excluded namespaces, not labelled to be skipped, whose rollout is
//! complete (so the images they run are on nodes, with their digests in the
//! pods' statuses).

use std::collections::BTreeSet;

use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::PodSpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};

use image_backup_core::template::Template;
pub use image_backup_core::template::{ContainerImage, ContainerList};

use super::usage::WorkloadKey;

/// Label that keeps a workload out of backups (`backup.k8slab.io/skip=true`).
pub const SKIP_LABEL: &str = "backup.k8slab.io/skip";

#[derive(Clone, Debug)]
pub enum Workload {
    Deployment(Deployment),
    DaemonSet(DaemonSet),
}

/// What became of a guarded patch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Patched {
    Applied,
    /// The workload changed (or went) since it was read: nothing applied.
    Changed,
}

impl Workload {
    pub fn kind(&self) -> &'static str {
        match self {
            Workload::Deployment(_) => "Deployment",
            Workload::DaemonSet(_) => "DaemonSet",
        }
    }

    pub fn metadata(&self) -> &ObjectMeta {
        match self {
            Workload::Deployment(d) => &d.metadata,
            Workload::DaemonSet(d) => &d.metadata,
        }
    }

    pub fn namespace(&self) -> &str {
        self.metadata().namespace.as_deref().unwrap_or("default")
    }

    pub fn name(&self) -> &str {
        self.metadata().name.as_deref().unwrap_or_default()
    }

    pub fn key(&self) -> WorkloadKey {
        WorkloadKey { kind: self.kind(), namespace: self.namespace().into(), name: self.name().into() }
    }

    pub fn pod_spec(&self) -> Option<&PodSpec> {
        match self {
            Workload::Deployment(d) => d.spec.template.spec.as_ref(),
            Workload::DaemonSet(d) => d.spec.template.spec.as_ref(),
        }
    }

    /// Reference for Events about the workload.
    pub fn object_ref(&self) -> k8s_openapi::api::core::v1::ObjectReference {
        use kube::Resource;
        match self {
            Workload::Deployment(d) => d.object_ref(&()),
            Workload::DaemonSet(d) => d.object_ref(&()),
        }
    }

    /// Selector of the workload's pods, to find the digests they run.
    pub fn selector(&self) -> &LabelSelector {
        match self {
            Workload::Deployment(d) => &d.spec.selector,
            Workload::DaemonSet(d) => &d.spec.selector,
        }
    }

    /// Whether the latest spec is fully rolled out: the controller has seen
    /// it, and every desired pod runs it and is available. Before that, the
    /// pods may still run other images, or none.
    pub fn rollout_complete(&self) -> bool {
        match self {
            Workload::Deployment(d) => d.rollout_complete(),
            Workload::DaemonSet(d) => d.rollout_complete(),
        }
    }

    /// Applies a JSON patch whose `test` operations guard it: a workload
    /// changed since it was read refuses it whole.
    pub async fn patch(&self, client: &kube::Client, patch: json_patch::Patch) -> Result<Patched, kube::Error> {
        use kube::api::{Api, Patch, PatchParams};
        let params = PatchParams { field_manager: Some(crate::MANAGER.into()), ..PatchParams::default() };
        let patch = Patch::<()>::Json(patch);
        let result = match self {
            Workload::Deployment(_) => Api::<Deployment>::namespaced(client.clone(), self.namespace())
                .patch(self.name(), &params, &patch)
                .await
                .map(|_| ()),
            Workload::DaemonSet(_) => Api::<DaemonSet>::namespaced(client.clone(), self.namespace())
                .patch(self.name(), &params, &patch)
                .await
                .map(|_| ()),
        };
        match result {
            Ok(()) => Ok(Patched::Applied),
            // A `test` operation failed (422), or the object went (404).
            Err(kube::Error::Api(status)) if matches!(status.code, 409 | 422 | 404) => Ok(Patched::Changed),
            Err(e) => Err(e),
        }
    }

    /// Whether the workload's controller has seen its latest spec.
    pub fn generation_observed(&self) -> bool {
        let observed = match self {
            Workload::Deployment(d) => d.status.as_ref().and_then(|s| s.observed_generation),
            Workload::DaemonSet(d) => d.status.as_ref().and_then(|s| s.observed_generation),
        };
        observed.unwrap_or(0) >= self.metadata().generation.unwrap_or(0)
    }

    /// What the patch builders read of it.
    pub fn template(&self) -> Template {
        Template {
            workload: self.key().to_string(),
            containers: self.container_images(),
            annotations: self.metadata().annotations.clone(),
            pull_secrets: self
                .pod_spec()
                .and_then(|spec| spec.image_pull_secrets.as_ref())
                .map(|list| list.iter().map(|r| r.name.clone()).collect()),
        }
    }

    /// Every container and init container with its image, init containers
    /// first, in pod-spec order.
    pub fn container_images(&self) -> Vec<ContainerImage> {
        let Some(spec) = self.pod_spec() else { return Vec::new() };
        let lists = [
            (ContainerList::InitContainers, spec.init_containers.as_deref().unwrap_or_default()),
            (ContainerList::Containers, spec.containers.as_slice()),
        ];
        lists
            .into_iter()
            .flat_map(|(list, containers)| {
                containers.iter().enumerate().filter_map(move |(index, c)| {
                    let image = c.image.clone()?;
                    Some(ContainerImage { list, index, name: c.name.clone(), image })
                })
            })
            .collect()
    }
}

/// Which workloads are never touched.
#[derive(Clone, Debug)]
pub struct Exclusions {
    pub namespaces: BTreeSet<String>,
}

/// Why a workload is left alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Excluded {
    Namespace,
    SkipLabel,
}

impl Exclusions {
    /// `kube-system` and the coordinator's own namespace are always in.
    pub fn new(namespaces: impl IntoIterator<Item = String>, own_namespace: &str) -> Self {
        let mut namespaces: BTreeSet<String> = namespaces.into_iter().filter(|n| !n.is_empty()).collect();
        namespaces.insert("kube-system".into());
        namespaces.insert(own_namespace.into());
        Self { namespaces }
    }

    pub fn check(&self, workload: &Workload) -> Result<(), Excluded> {
        if self.namespaces.contains(workload.namespace()) {
            return Err(Excluded::Namespace);
        }
        let skip = workload.metadata().labels.as_ref().and_then(|l| l.get(SKIP_LABEL));
        if skip.is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Err(Excluded::SkipLabel);
        }
        Ok(())
    }
}

/// A workload kind whose rollout can be complete: every replica updated to
/// the current generation and available, and no old one left. Read on
/// every watch event, so it borrows the object.
pub trait RollsOut {
    fn rollout_complete(&self) -> bool;
}

impl RollsOut for Deployment {
    fn rollout_complete(&self) -> bool {
        let Some(status) = &self.status else { return false };
        let desired = self.spec.replicas.unwrap_or(1);
        status.observed_generation.unwrap_or(0) >= self.metadata.generation.unwrap_or(0)
            && desired > 0
            && status.updated_replicas.unwrap_or(0) == desired
            && status.available_replicas.unwrap_or(0) == desired
            && status.replicas.unwrap_or(0) == desired
    }
}

impl RollsOut for DaemonSet {
    fn rollout_complete(&self) -> bool {
        let Some(status) = &self.status else { return false };
        let desired = status.desired_number_scheduled;
        status.observed_generation.unwrap_or(0) >= self.metadata.generation.unwrap_or(0)
            && desired > 0
            && status.updated_number_scheduled.unwrap_or(0) == desired
            && status.number_available.unwrap_or(0) == desired
            && status.number_ready == desired
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn deployment(status: serde_json::Value) -> Workload {
        Workload::Deployment(
            serde_json::from_value(json!({
                "metadata": { "name": "web", "namespace": "shop", "generation": 3 },
                "spec": {
                    "replicas": 2,
                    "selector": { "matchLabels": { "app": "web" } },
                    "template": {
                        "metadata": { "labels": { "app": "web" } },
                        "spec": {
                            "initContainers": [{ "name": "migrate", "image": "quay.io/org/migrate:7" }],
                            "containers": [
                                { "name": "web", "image": "nginx:1.25" },
                                { "name": "sidecar", "image": "docker.io/library/busybox:1.36" }
                            ]
                        }
                    }
                },
                "status": status,
            }))
            .unwrap(),
        )
    }

    #[test]
    fn deployment_rollout_complete_needs_every_replica_updated_and_available() {
        let done = json!({ "observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2, "readyReplicas": 2 });
        assert!(deployment(done).rollout_complete());
        let stale = json!({ "observedGeneration": 2, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2 });
        assert!(!deployment(stale).rollout_complete(), "controller has not seen the spec");
        let rolling = json!({ "observedGeneration": 3, "replicas": 3, "updatedReplicas": 2, "availableReplicas": 2 });
        assert!(!deployment(rolling).rollout_complete(), "an old pod remains");
        let unavailable =
            json!({ "observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 1 });
        assert!(!deployment(unavailable).rollout_complete());
        assert!(!deployment(json!(null)).rollout_complete());
    }

    #[test]
    fn daemonset_rollout_complete_needs_every_scheduled_pod_ready_and_updated() {
        let ds = |status: serde_json::Value| {
            Workload::DaemonSet(
                serde_json::from_value(json!({
                    "metadata": { "name": "agent", "namespace": "ops", "generation": 1 },
                    "spec": { "selector": {}, "template": { "spec": { "containers": [{ "name": "a", "image": "a:1" }] } } },
                    "status": status,
                }))
                .unwrap(),
            )
        };
        let full = |ready: i32| json!({ "observedGeneration": 1, "desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberMisscheduled": 0, "numberReady": ready, "numberAvailable": ready, "updatedNumberScheduled": 2 });
        assert!(ds(full(2)).rollout_complete());
        assert!(!ds(full(1)).rollout_complete());
        let none = json!({ "observedGeneration": 1, "desiredNumberScheduled": 0, "currentNumberScheduled": 0, "numberMisscheduled": 0, "numberReady": 0 });
        assert!(!ds(none).rollout_complete(), "no pod runs the images");
    }

    #[test]
    fn collects_init_and_app_containers_in_order() {
        let images: Vec<_> = deployment(json!(null))
            .container_images()
            .into_iter()
            .map(|c| (c.list.field(), c.index, c.name, c.image))
            .collect();
        assert_eq!(
            images,
            [
                ("initContainers", 0, "migrate".to_string(), "quay.io/org/migrate:7".to_string()),
                ("containers", 0, "web".to_string(), "nginx:1.25".to_string()),
                ("containers", 1, "sidecar".to_string(), "docker.io/library/busybox:1.36".to_string()),
            ]
        );
    }

    #[test]
    fn excludes_system_namespaces_and_skip_label() {
        let exclusions = Exclusions::new(["monitoring".to_string()], "image-backup");
        let mut w = deployment(json!(null));
        assert_eq!(exclusions.check(&w), Ok(()));
        if let Workload::Deployment(d) = &mut w {
            d.metadata.labels = Some([(SKIP_LABEL.to_string(), "true".to_string())].into());
        }
        assert_eq!(exclusions.check(&w), Err(Excluded::SkipLabel));
        for ns in ["kube-system", "image-backup", "monitoring"] {
            if let Workload::Deployment(d) = &mut w {
                d.metadata.labels = None;
                d.metadata.namespace = Some(ns.into());
            }
            assert_eq!(exclusions.check(&w), Err(Excluded::Namespace), "{ns}");
        }
    }
}
