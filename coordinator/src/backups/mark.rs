//! The mark of prune's mark-and-sweep. The usage index knows the workloads
//! the coordinator watches; a backup may also be run by a StatefulSet, a Job,
//! a CronJob or a bare pod, kept for rollback by an old ReplicaSet or a
//! ControllerRevision, or pinned by a workload excluded since it was moved.
//! Before anything leaves the registry, every pod template in the cluster
//! is read, whatever its kind.

use image_backup_core::prune;
use image_backup_oci::ImageRef;
use kube::{
    Api, Client, ResourceExt,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};

/// The kinds whose objects are, or hold, pod templates.
const KINDS: [(&str, &str, &str, &str); 8] = [
    ("", "v1", "Pod", "pods"),
    ("apps", "v1", "Deployment", "deployments"),
    ("apps", "v1", "DaemonSet", "daemonsets"),
    ("apps", "v1", "StatefulSet", "statefulsets"),
    ("apps", "v1", "ReplicaSet", "replicasets"),
    ("apps", "v1", "ControllerRevision", "controllerrevisions"),
    ("batch", "v1", "Job", "jobs"),
    ("batch", "v1", "CronJob", "cronjobs"),
];

/// Objects listed per request.
const PAGE: u32 = 500;

/// The objects (`Kind/namespace/name`) whose pod templates name the backup
/// repository `repository` (`host/prefix/…`, as [`ImageRef::name`] gives
/// it) at one of `digests`, or by a tag, which may stand for any of them.
pub async fn users(client: &Client, repository: &str, digests: &[String]) -> Result<Vec<String>, kube::Error> {
    let mut users = Vec::new();
    for (group, version, kind, plural) in KINDS {
        let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, kind), plural);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let mut params = ListParams::default().limit(PAGE);
        loop {
            let page = api.list(&params).await?;
            for object in &page.items {
                if prune::names_a_backup(&object.data, &|image| names(image, repository, digests)) {
                    let namespace = object.namespace().unwrap_or_default();
                    users.push(format!("{kind}/{namespace}/{}", object.name_any()));
                }
            }
            match page.metadata.continue_ {
                Some(token) if !token.is_empty() => params = params.continue_token(&token),
                _ => break,
            }
        }
    }
    Ok(users)
}

/// Whether `image` names `repository` at one of `digests`, or by a tag.
fn names(image: &str, repository: &str, digests: &[String]) -> bool {
    let Ok(image) = ImageRef::parse(image) else { return false };
    image.name() == repository && image.digest().is_none_or(|digest| digests.iter().any(|d| d == digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const REPO: &str = "backup.example:5000/backup/docker.io/library/web";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER: &str = "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

    fn uses(image: &str) -> bool {
        names(image, REPO, &[DIGEST.to_string()])
    }

    #[test]
    fn the_backup_is_named_by_digest_or_tag() {
        assert!(uses(&format!("{REPO}@{DIGEST}")));
        assert!(uses(&format!("{REPO}:1.25")), "a tag may stand for the digest");
    }

    #[test]
    fn other_digests_and_repositories_are_not_uses() {
        assert!(!uses(&format!("{REPO}@{OTHER}")));
        assert!(!uses(&format!("docker.io/library/web@{DIGEST}")), "the source at the same digest is not the backup");
        assert!(!uses("not a reference"));
    }
}
