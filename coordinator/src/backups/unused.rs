//! ImageBackups no workload uses any more (the workloads were deleted, or
//! moved to other images) are deleted once they have been unused for a
//! grace period. The time one was first found unused is kept on it, in an
//! annotation, so the grace survives a restart and a new leader; any use
//! within it clears the mark. What the backup copied stays in the registry
//! (a workload that comes back is pinned to it again without a copy),
//! unless `--prune` asks to delete it with the ImageBackup. Then it is a
//! mark-and-sweep: every pod template in the cluster is read first (the
//! usage index sees only the workloads the coordinator watches), and a
//! backup no template names waits in quarantine (`--prune-quarantine`)
//! before it goes; a use found meanwhile keeps it.

use std::{sync::Arc, time::Duration};

use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::ImageRef;
use k8s_openapi::jiff::Timestamp;
use kube::{
    Resource, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::{controller::Action, events::EventType},
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::{
    MANAGER,
    backups::context::Context,
    error::{Error, kube_err},
};

use super::mark;
use image_backup_core::prune::{self, Step, Verdict};

/// ImageBackup annotation: since when no workload uses it.
pub const UNUSED_SINCE_ANNOTATION: &str = "backup.k8slab.io/unused-since";
/// ImageBackup annotation: since when it waits to be pruned, no pod
/// template in the cluster naming it.
pub const QUARANTINED_SINCE_ANNOTATION: &str = "backup.k8slab.io/quarantined-since";

/// Whether `backup` is used, by the in-memory usage the workload
/// reconcilers keep. Only meaningful once every workload was reconciled
/// after the start; see [`sweep`].
fn used(ctx: &Context, name: &str) -> bool {
    !ctx.usage.workloads_of(name).is_empty()
}

fn unused_since(backup: &ImageBackup) -> Option<Timestamp> {
    since(backup, UNUSED_SINCE_ANNOTATION)
}

fn since(backup: &ImageBackup, annotation: &str) -> Option<Timestamp> {
    backup.annotations().get(annotation).and_then(|t| t.parse().ok())
}

/// Wakes, from time to time, each ImageBackup whose mark is to change or
/// whose grace has run out; their reconciles do the writes. It starts one
/// grace period after the caches synced, when every workload has long been
/// reconciled and counted.
pub async fn sweep(ctx: Arc<Context>) {
    let grace = ctx.config.unused_grace;
    if grace.is_zero() {
        return std::future::pending().await;
    }
    let _ = ctx.backups.wait_until_ready().await;
    tokio::time::sleep(grace.min(Duration::from_secs(600))).await;
    ctx.start_sweeping();
    let mut tick = tokio::time::interval((grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(300)));
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        for backup in ctx.backups.state() {
            let name = backup.name_any();
            if prune::due(used(&ctx, &name), unused_since(&backup), now, grace) {
                ctx.backup_waker.wake(&name);
            }
        }
    }
}

/// Marks, unmarks or deletes `backup` by its use; `Some` when it was
/// deleted and its reconcile ends here.
pub async fn check(ctx: &Context, backup: &ImageBackup) -> Result<Option<Action>, Error> {
    if !ctx.sweeping() {
        return Ok(None);
    }
    let name = backup.name_any();
    let phase = backup.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let copying = matches!(phase, Phase::Assigned | Phase::Pushing);
    let mark = |value: serde_json::Value| {
        Patch::Merge(json!({ "metadata": { "annotations": { UNUSED_SINCE_ANNOTATION: value } } }))
    };
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    match prune::step(used(ctx, &name), unused_since(backup), copying, Timestamp::now(), ctx.config.unused_grace) {
        Step::Unmark => {
            debug!("used again");
            let unmark = json!({ UNUSED_SINCE_ANNOTATION: null, QUARANTINED_SINCE_ANNOTATION: null });
            ctx.backup_api()
                .patch(&name, &params, &Patch::Merge(json!({ "metadata": { "annotations": unmark } })))
                .await
                .map_err(kube_err("unmarking ImageBackup", &name))?;
        }
        Step::Mark => {
            info!(grace = %humantime::format_duration(ctx.config.unused_grace), "no workload uses it; deleted after the grace period unless one does again");
            ctx.backup_api()
                .patch(&name, &params, &mark(Timestamp::now().to_string().into()))
                .await
                .map_err(kube_err("marking ImageBackup unused", &name))?;
        }
        Step::Expire => {
            if ctx.config.prune
                && let Some(action) = quarantine(ctx, backup).await?
            {
                return Ok(Some(action));
            }
            // Deleted only as it was read: a use recorded meanwhile wins.
            let params = DeleteParams {
                preconditions: Some(Preconditions { resource_version: backup.resource_version(), uid: None }),
                ..DeleteParams::default()
            };
            match ctx.backup_api().delete(&name, &params).await {
                Ok(_) => {
                    ctx.metrics.deleted_unused();
                    if ctx.config.prune && ctx.fence.up() {
                        info!(source = %backup.spec.source, "deleted: no workload used it for the grace period");
                        prune(ctx, backup).await;
                    } else {
                        info!(source = %backup.spec.source, "deleted: no workload used it for the grace period; the registry keeps the copy");
                    }
                    return Ok(Some(Action::await_change()));
                }
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {}
                Err(e) => return Err(kube_err("deleting unused ImageBackup", name)(e)),
            }
        }
        Step::Keep => {}
    }
    Ok(None)
}

/// Prune's mark, and its quarantine: `None` once `backup` may go with its
/// manifests (no pod template in the cluster named them when it entered
/// quarantine, nor when the quarantine ended); else what to do meanwhile.
/// The cluster is read twice per backup, not on every look: in between,
/// the usage index notices a watched workload that takes it up again.
async fn quarantine(ctx: &Context, backup: &ImageBackup) -> Result<Option<Action>, Error> {
    let name = backup.name_any();
    let quarantined = since(backup, QUARANTINED_SINCE_ANNOTATION);
    let now = Timestamp::now();
    if let Some(left) = prune::quarantine_left(quarantined, now, ctx.config.prune_quarantine) {
        return Ok(Some(Action::requeue(left)));
    }
    let Some((target, digests)) = candidates(ctx, backup) else { return Ok(None) };
    if digests.is_empty() {
        // Everything it copied is another's too: nothing leaves the registry.
        return Ok(None);
    }
    let users = mark::users(&ctx.client, &target.name(), &digests)
        .await
        .map_err(kube_err("reading every pod template for uses of", &name))?;
    let annotate = |annotations: serde_json::Value| Patch::Merge(json!({ "metadata": { "annotations": annotations } }));
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    match prune::after_reading(users.len(), quarantined.is_some()) {
        Verdict::Prune => Ok(None),
        Verdict::Quarantine => {
            let quarantine = humantime::format_duration(ctx.config.prune_quarantine);
            info!(%quarantine, "no pod template in the cluster names it: in quarantine, then pruned unless one does");
            ctx.backup_api()
                .patch(&name, &params, &annotate(json!({ QUARANTINED_SINCE_ANNOTATION: now.to_string() })))
                .await
                .map_err(kube_err("quarantining ImageBackup", &name))?;
            let note =
                format!("no pod template names {}: pruned after {quarantine} unless one does", digests.join(", "));
            ctx.event(&backup.object_ref(&()), EventType::Normal, "BackupQuarantined", note).await;
            Ok(Some(Action::requeue(ctx.config.prune_quarantine)))
        }
        // A use the usage index does not see (another kind, an excluded
        // namespace, rollback history): kept, and looked at again after
        // another grace period.
        Verdict::Kept => {
            let shown: Vec<&str> = users.iter().take(5).map(String::as_str).collect();
            info!(users = ?shown, count = users.len(), "no watched workload uses it, but pod templates name it: kept");
            let restored = json!({ UNUSED_SINCE_ANNOTATION: now.to_string(), QUARANTINED_SINCE_ANNOTATION: null });
            ctx.backup_api()
                .patch(&name, &params, &annotate(restored))
                .await
                .map_err(kube_err("keeping ImageBackup", &name))?;
            let note = format!("not pruned: {} still name it ({} in all)", shown.join(", "), users.len());
            ctx.event(&backup.object_ref(&()), EventType::Normal, "BackupKept", note).await;
            Ok(Some(Action::await_change()))
        }
    }
}

/// The backup repository of `backup`, and the manifests it copied there
/// (its digest, and a reduced index of it) that no other ImageBackup stands
/// for and no watched workload is pinned to; `None` for a source that is
/// not a valid reference.
fn candidates(ctx: &Context, backup: &ImageBackup) -> Option<(ImageRef, Vec<String>)> {
    let source = ImageRef::parse(&backup.spec.source).ok()?;
    let target = ctx.config.backup.reference_for(&source).ok()?;
    let mut digests = vec![backup.spec.digest.clone()];
    let reference = backup.status.as_ref().and_then(|s| s.backup_reference.as_deref());
    if let Some((_, digest)) = reference.and_then(|r| r.rsplit_once('@'))
        && !digests.iter().any(|d| d == digest)
    {
        digests.push(digest.to_string());
    }
    let name = backup.name_any();
    digests.retain(|digest| {
        let pinned = target.pinned(digest);
        let kept = ctx.usage.pins(&pinned) || referenced_elsewhere(ctx, &name, target.repository(), digest);
        if kept {
            info!(%pinned, "kept in the registry: still in use");
        }
        !kept
    });
    Some((target, digests))
}

/// Deletes from the registry the manifests `backup` copied that nothing
/// uses (see [`candidates`]). Deleting a manifest drops its tags; the
/// registry's garbage collection frees the blobs no manifest uses any more.
async fn prune(ctx: &Context, backup: &ImageBackup) {
    let Some((target, digests)) = candidates(ctx, backup) else { return };
    for digest in digests {
        let pinned = target.pinned(&digest);
        match ctx.registry.delete_manifest(target.repository(), &digest).await {
            Ok(deleted) => {
                if deleted {
                    ctx.metrics.pruned();
                }
                info!(%pinned, "deleted from the registry (prune)");
            }
            Err(e) => warn!(%pinned, error = %e, "could not delete it from the registry (prune); it stays"),
        }
    }
}

/// Whether an ImageBackup other than `name` copied `digest` into
/// `repository`.
fn referenced_elsewhere(ctx: &Context, name: &str, repository: &str, digest: &str) -> bool {
    ctx.backups.state().iter().filter(|other| other.name_any() != name).any(|other| {
        let same_repository = ImageRef::parse(&other.spec.source)
            .ok()
            .and_then(|source| ctx.config.backup.reference_for(&source).ok())
            .is_some_and(|target| target.repository() == repository);
        let reference = other.status.as_ref().and_then(|s| s.backup_reference.as_deref());
        let reduced = reference.and_then(|r| r.rsplit_once('@')).is_some_and(|(_, d)| d == digest);
        same_repository && (other.spec.digest == digest || reduced)
    })
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use http::{Method, StatusCode};
    use image_backup_crds::{ImageBackupSpec, ImageBackupStatus};
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        testing::{Exchange, backups_context as context, scripted, store},
        workloads::usage::{Usage, Use, WorkloadKey},
    };

    const NAME: &str = "nginx-0123";
    const PATH: &str = "/apis/backup.k8slab.io/v1alpha1/imagebackups/nginx-0123";

    fn backup(phase: Phase, annotations: &[(&str, &str)]) -> ImageBackup {
        let mut backup = ImageBackup::new(
            NAME,
            ImageBackupSpec { source: "docker.io/library/nginx:1.25".into(), digest: "sha256:00".into() },
        );
        backup.metadata.resource_version = Some("42".into());
        backup.metadata.annotations = Some(annotations.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect());
        backup.status = Some(ImageBackupStatus { phase, ..ImageBackupStatus::default() });
        backup
    }

    fn hours_ago(hours: i64) -> String {
        (Timestamp::now() - k8s_openapi::jiff::SignedDuration::from_hours(hours)).to_string()
    }

    /// Runs the prune check of `backup` against `script`, used by a
    /// workload or not.
    async fn check_with(backup: ImageBackup, used: bool, script: Vec<Exchange>) -> Option<Action> {
        let usage = Arc::new(Usage::default());
        if used {
            let web = WorkloadKey { kind: "Deployment", namespace: "shop".into(), name: "web".into() };
            usage.set(&web, BTreeMap::from([(NAME.to_string(), Use::Runs("sha256:00".into()))]));
        }
        let (client, script) = scripted(script);
        let ctx = context(client, &["--unused-grace", "1h"], store(vec![backup.clone()]), usage);
        ctx.start_sweeping();
        let action = check(&ctx, &backup).await.expect("the check goes through");
        script.done().await;
        action
    }

    fn annotations(body: &Value) -> &Value {
        &body["metadata"]["annotations"]
    }

    #[tokio::test]
    async fn an_unused_backup_is_marked_with_the_time() {
        let patch = Exchange::new(
            Method::PATCH,
            &format!("{PATH}?&fieldManager=image-backup-coordinator"),
            StatusCode::OK,
            json!(backup(Phase::Completed, &[])),
        )
        .checking(|body| {
            let since = annotations(body)[UNUSED_SINCE_ANNOTATION].as_str().expect("a time");
            assert!(since.parse::<Timestamp>().is_ok(), "{since}");
        });
        assert_eq!(check_with(backup(Phase::Completed, &[]), false, vec![patch]).await, None);
    }

    #[tokio::test]
    async fn a_backup_used_again_loses_its_marks() {
        let marked = backup(
            Phase::Completed,
            &[(UNUSED_SINCE_ANNOTATION, &hours_ago(2)), (QUARANTINED_SINCE_ANNOTATION, &hours_ago(1))],
        );
        let patch = Exchange::new(
            Method::PATCH,
            &format!("{PATH}?&fieldManager=image-backup-coordinator"),
            StatusCode::OK,
            json!(marked),
        )
        .checking(|body| {
            let unmark = json!({ UNUSED_SINCE_ANNOTATION: null, QUARANTINED_SINCE_ANNOTATION: null });
            assert_eq!(annotations(body), &unmark);
        });
        assert_eq!(check_with(marked.clone(), true, vec![patch]).await, None);
    }

    #[tokio::test]
    async fn an_expired_backup_is_deleted_only_as_it_was_read() {
        let expired = backup(Phase::Completed, &[(UNUSED_SINCE_ANNOTATION, &hours_ago(2))]);
        let delete = Exchange::new(Method::DELETE, &format!("{PATH}?"), StatusCode::OK, json!(expired))
            .checking(|body| assert_eq!(body["preconditions"]["resourceVersion"], "42"));
        assert_eq!(check_with(expired.clone(), false, vec![delete]).await, Some(Action::await_change()));
        // A use recorded meanwhile changed it: the delete is refused, and
        // nothing is lost.
        let conflict = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Conflict", "code": 409, "message": "the object has been modified" });
        let refused = Exchange::new(Method::DELETE, &format!("{PATH}?"), StatusCode::CONFLICT, conflict);
        assert_eq!(check_with(expired, false, vec![refused]).await, None);
    }

    #[tokio::test]
    async fn a_copy_in_flight_and_a_fresh_mark_are_left_alone() {
        let copying = backup(Phase::Pushing, &[(UNUSED_SINCE_ANNOTATION, &hours_ago(2))]);
        assert_eq!(check_with(copying, false, vec![]).await, None);
        let fresh = backup(Phase::Completed, &[(UNUSED_SINCE_ANNOTATION, &hours_ago(0))]);
        assert_eq!(check_with(fresh, false, vec![]).await, None);
    }
}
