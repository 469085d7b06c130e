//! ImageBackups no workload uses any more (the workloads were deleted, or
//! moved to other images) are deleted once they have been unused for a
//! grace period. The time one was first found unused is kept on it, in an
//! annotation, so the grace survives a restart and a new leader; any use
//! within it clears the mark. What the backup copied stays in the registry
//! (a workload that comes back is pinned to it again without a copy),
//! unless `--prune` asks to delete it with the ImageBackup.

use std::{sync::Arc, time::Duration};

use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::ImageRef;
use k8s_openapi::jiff::Timestamp;
use kube::{
    ResourceExt,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
    runtime::controller::Action,
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::context::{Context, Error, MANAGER, kube_err};

/// ImageBackup annotation: since when no workload uses it.
pub const UNUSED_SINCE_ANNOTATION: &str = "backup.k8slab.io/unused-since";

/// Whether `backup` is used, by the in-memory usage the workload
/// reconcilers keep. Only meaningful once every workload was reconciled
/// after the start; see [`sweep`].
fn used(ctx: &Context, name: &str) -> bool {
    !ctx.usage.workloads_of(name).is_empty()
}

fn unused_since(backup: &ImageBackup) -> Option<Timestamp> {
    backup.annotations().get(UNUSED_SINCE_ANNOTATION).and_then(|t| t.parse().ok())
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
    ctx.sweeping.store(true, std::sync::atomic::Ordering::Release);
    let mut tick = tokio::time::interval((grace / 4).clamp(Duration::from_secs(1), Duration::from_secs(300)));
    loop {
        tick.tick().await;
        let now = Timestamp::now();
        for backup in ctx.backups.state() {
            let name = backup.name_any();
            let wake = match (used(&ctx, &name), unused_since(&backup)) {
                (true, Some(_)) | (false, None) => true,
                (false, Some(since)) => elapsed(now, since) >= grace,
                (true, None) => false,
            };
            if wake {
                ctx.jobs.wake(&name);
            }
        }
    }
}

fn elapsed(now: Timestamp, since: Timestamp) -> Duration {
    Duration::try_from(now.duration_since(since)).unwrap_or_default()
}

/// Marks, unmarks or deletes `backup` by its use; `Some` when it was
/// deleted and its reconcile ends here.
pub async fn check(ctx: &Context, backup: &ImageBackup) -> Result<Option<Action>, Error> {
    if !ctx.sweeping.load(std::sync::atomic::Ordering::Acquire) {
        return Ok(None);
    }
    let name = backup.name_any();
    let phase = backup.status.as_ref().map(|s| s.phase).unwrap_or_default();
    let mark = |value: serde_json::Value| {
        Patch::Merge(json!({ "metadata": { "annotations": { UNUSED_SINCE_ANNOTATION: value } } }))
    };
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    match (used(ctx, &name), unused_since(backup)) {
        (true, Some(_)) => {
            debug!("used again");
            ctx.backup_api()
                .patch(&name, &params, &mark(serde_json::Value::Null))
                .await
                .map_err(kube_err("unmarking ImageBackup", &name))?;
        }
        (false, None) => {
            info!(grace = %humantime::format_duration(ctx.config.unused_grace), "no workload uses it; deleted after the grace period unless one does again");
            ctx.backup_api()
                .patch(&name, &params, &mark(Timestamp::now().to_string().into()))
                .await
                .map_err(kube_err("marking ImageBackup unused", &name))?;
        }
        // A copy in flight finishes first.
        (false, Some(since))
            if elapsed(Timestamp::now(), since) >= ctx.config.unused_grace
                && !matches!(phase, Phase::Assigned | Phase::Pushing) =>
        {
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
        _ => {}
    }
    Ok(None)
}

/// Deletes from the registry the manifests `backup` copied (its digest,
/// and a reduced index of it), each unless another ImageBackup stands for
/// it in the same repository or a workload is pinned to it. Deleting a
/// manifest drops its tags; the registry's garbage collection frees the
/// blobs no manifest uses any more.
async fn prune(ctx: &Context, backup: &ImageBackup) {
    let Ok(source) = ImageRef::parse(&backup.spec.source) else { return };
    let Ok(target) = ctx.config.backup.reference_for(&source) else { return };
    let mut digests = vec![backup.spec.digest.clone()];
    let reference = backup.status.as_ref().and_then(|s| s.backup_reference.as_deref());
    if let Some((_, digest)) = reference.and_then(|r| r.rsplit_once('@'))
        && !digests.iter().any(|d| d == digest)
    {
        digests.push(digest.to_string());
    }
    let name = backup.name_any();
    for digest in digests {
        let pinned = target.pinned(&digest);
        if ctx.usage.pins(&pinned) || referenced_elsewhere(ctx, &name, target.repository(), &digest) {
            info!(%pinned, "kept in the registry: still in use");
            continue;
        }
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
