//! The workload reconciler: once a Deployment or DaemonSet is fully rolled
//! out, make sure each of its images has an ImageBackup, and when all of
//! them are Completed, patch the workload to the pinned backups.

pub mod digests;
pub mod rewrite;
pub mod usage;
pub mod workload;

use std::{
    collections::{BTreeMap, HashSet},
    sync::Arc,
    time::Duration,
};

use image_backup_crds::{ImageBackup, ImageBackupSpec, Phase};
use image_backup_oci::{ImageRef, index::SOURCE_INDEX_ANNOTATION};
use json_patch::{Patch as JsonPatch, PatchOperation, ReplaceOperation, TestOperation, jsonptr::PointerBuf};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::{
    Api, Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use serde_json::Value;
use tracing::{debug, info, instrument, warn};

use crate::context::{Context, Error, MANAGER, kube_err};
use rewrite::{RewriteError, backup_patch};
use usage::{Use, WorkloadKey};
use workload::Workload;

/// How soon a workload whose pods report no digest yet looks again.
const DIGEST_RETRY: Duration = Duration::from_secs(2);

pub async fn reconcile_deployment(object: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile(Workload::Deployment((*object).clone()), ctx).await
}

pub async fn reconcile_daemonset(object: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile(Workload::DaemonSet((*object).clone()), ctx).await
}

/// What keeps a workload from being patched now.
enum Waiting {
    /// Its ImageBackups: their changes wake it.
    Backups,
    /// Its pods' statuses: nothing wakes it, so it looks again soon.
    Pods,
}

#[instrument(skip_all, fields(workload = %workload.key()))]
async fn reconcile(workload: Workload, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_started(workload.kind());
    let key = workload.key();
    if let Err(reason) = ctx.config.exclusions.check(&workload) {
        debug!(?reason, "excluded");
        ctx.usage.remove(&key);
        ctx.digests.forget(&key);
        return Ok(Action::await_change());
    }
    let rolled_out = workload.rollout_complete();
    let originals = rewrite::originals(&workload).unwrap_or_default();
    let mut images = Vec::new();
    // Backups the workload was patched to, by the source they stand for.
    let mut pinned = BTreeMap::new();
    let mut seen = HashSet::new();
    for container in workload.container_images() {
        if !seen.insert(container.image.clone()) {
            continue;
        }
        match ImageRef::parse(&container.image) {
            Ok(backup) if ctx.config.backup.holds(&backup) => {
                let source = originals.of(container.list, &container.name).and_then(|o| ImageRef::parse(o).ok());
                if let Some(source) = source.filter(|_| backup.digest().is_some()) {
                    pinned.insert(image_backup_crds::name_for(&source), Use::Pinned);
                }
            }
            Ok(source) => images.push((container, source)),
            Err(e) if rolled_out => {
                ctx.event(&workload.object_ref(), EventType::Warning, "InvalidImage", e.to_string()).await;
            }
            Err(_) => {}
        }
    }
    if !rolled_out {
        // What it will run, with no digest yet: a workload moving to its
        // backups stops counting as a user of the content it ran.
        let runs = images.iter().map(|(_, s)| (image_backup_crds::name_for(s), Use::Runs(String::new())));
        ctx.usage.set(&key, pinned.into_iter().chain(runs).collect());
        debug!("rollout not complete");
        return Ok(Action::await_change());
    }
    // Digests of tagged images come from the pods.
    let tagged = images.iter().any(|(_, source)| source.digest().is_none());
    let pod_digests = if tagged { Some(ctx.digests.get(&ctx.client, &workload).await?) } else { None };
    let images: Vec<_> = images
        .into_iter()
        .map(|(container, source)| {
            let digest = match source.digest() {
                Some(digest) => Some(digest.to_string()),
                None => pod_digests.as_ref().and_then(|d| d.get(&container.name)).cloned(),
            };
            (container, source, digest)
        })
        .collect();
    let runs =
        images.iter().map(|(_, s, d)| (image_backup_crds::name_for(s), Use::Runs(d.clone().unwrap_or_default())));
    ctx.usage.set(&key, pinned.into_iter().chain(runs).collect());

    let mut backups: BTreeMap<String, String> = BTreeMap::new();
    let mut reduced = Vec::new();
    let mut waiting = None;
    for (container, source, digest) in &images {
        let Some(digest) = digest else {
            debug!(image = %source, "no pod reports the image's digest yet");
            waiting = Some(Waiting::Pods);
            continue;
        };
        match backup_for(&ctx, source, digest, &key).await? {
            Some(Backup { reference, left_out }) => {
                if !left_out.is_empty() {
                    reduced.push(format!("{} without {}", container.image, left_out.join(", ")));
                }
                backups.insert(container.image.clone(), reference);
            }
            None => {
                waiting.get_or_insert(Waiting::Backups);
            }
        }
    }
    match waiting {
        Some(Waiting::Pods) => return Ok(Action::requeue(DIGEST_RETRY)),
        Some(Waiting::Backups) => return Ok(Action::await_change()),
        None => {}
    }
    if backups.is_empty() {
        return Ok(Action::await_change());
    }
    if ctx.config.report_only {
        info!(images = backups.len(), "every image is backed up (report-only: workload left as is)");
        ctx.metrics.patched("report_only");
        return Ok(Action::await_change());
    }
    patch(&ctx, &workload, &backups, &reduced).await
}

/// A verified backup a workload can be pinned to.
struct Backup {
    reference: String,
    /// Platforms a reduced index left out.
    left_out: Vec<String>,
}

/// The pinned backup reference of `source` at `digest` once its ImageBackup
/// is Completed for that digest; until then, makes sure one exists for it.
async fn backup_for(
    ctx: &Context,
    source: &ImageRef,
    digest: &str,
    user: &WorkloadKey,
) -> Result<Option<Backup>, Error> {
    let name = image_backup_crds::name_for(source);
    let Some(backup) = ctx.backups.get(&ObjectRef::new(&name)) else {
        create(ctx, &name, source, digest, user).await?;
        return Ok(None);
    };
    let backup = ctx.written.freshest(backup);
    let status = backup.status.clone().unwrap_or_default();
    if backup.spec.digest != digest {
        retarget(ctx, &backup, digest, user).await?;
        return Ok(None);
    }
    let current = status.observed_generation == backup.metadata.generation.unwrap_or(1);
    if !(current && status.phase == Phase::Completed) {
        return Ok(None);
    }
    // The reference comes from the spec and the configured location, never
    // from status alone: for a whole copy it is the source digest in the
    // backup repository, and status only confirms the copy was verified
    // there. A reduced index has a digest of its own, which status names;
    // it is used only if the backup registry (which only agents' push
    // credentials write) holds it in that repository as a reduced index of
    // exactly this source index.
    let Ok(target) = ctx.config.backup.reference_for(source) else { return Ok(None) };
    let reference = match status.backup_reference {
        Some(reference) if reference == target.pinned(digest) => reference,
        Some(reference) if status.reduced => match reduced_index_of(ctx, &target, &reference, digest).await {
            Ok(reference) => reference,
            Err(Some(why)) => {
                warn!(%reference, why, "a reduced backup recorded in status is not used");
                let note = format!("status names {reference}, but {why}: no workload is patched to it");
                ctx.event(&backup.object_ref(&()), EventType::Warning, "UnverifiedBackup", note).await;
                return Ok(None);
            }
            Err(None) => return Ok(None),
        },
        _ => return Ok(None),
    };
    Ok(Some(Backup { reference, left_out: status.left_out }))
}

/// `reference` if it names, in the backup repository of `target`, a reduced
/// index the registry serves with `source_index` as its source; else why
/// not (`None` when the registry could not say now).
async fn reduced_index_of(
    ctx: &Context,
    target: &ImageRef,
    reference: &str,
    source_index: &str,
) -> Result<String, Option<&'static str>> {
    let digest = reference
        .strip_prefix(&target.name())
        .and_then(|rest| rest.strip_prefix('@'))
        .ok_or(Some("it is not in the backup repository of the source"))?;
    let bytes = match ctx.registry.manifest(target.repository(), digest).await {
        Ok(Some((_, bytes))) => bytes,
        Ok(None) => return Err(Some("the backup registry does not hold it")),
        Err(e) => {
            debug!(%reference, error = %e, "cannot read the reduced index now");
            return Err(None);
        }
    };
    let annotated = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|index| index["annotations"][SOURCE_INDEX_ANNOTATION].as_str().map(str::to_string));
    if annotated.as_deref() == Some(source_index) {
        Ok(target.pinned(digest))
    } else {
        Err(Some("the backup registry does not hold it as a reduced index of the source's index"))
    }
}

async fn create(ctx: &Context, name: &str, source: &ImageRef, digest: &str, user: &WorkloadKey) -> Result<(), Error> {
    // Workloads sharing an image are reconciled at once; one of them
    // creates its ImageBackup, the others wait for it to show in the store.
    if !ctx.creating.begin(name) {
        return Ok(());
    }
    let backup = ImageBackup::new(name, ImageBackupSpec { source: source.to_string(), digest: digest.into() });
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    match ctx.backup_api().create(&params, &backup).await {
        Ok(_) => {
            info!(imagebackup = %name, %source, %digest, workload = %user, "ImageBackup created");
            Ok(())
        }
        // Another workload came first: it is joined, and its changes wake
        // this workload too.
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => {
            ctx.creating.failed(name);
            Err(kube_err("creating ImageBackup", name)(e))
        }
    }
}

/// Points a finished ImageBackup at the digest the pods run now (the tag
/// moved); one still in flight finishes first. The patch tests the old
/// digest, so two workloads that see different digests never flip it back
/// and forth within one change.
async fn retarget(ctx: &Context, backup: &ImageBackup, digest: &str, user: &WorkloadKey) -> Result<(), Error> {
    let name = backup.name_any();
    let status = backup.status.clone().unwrap_or_default();
    let settled = status.observed_generation == backup.metadata.generation.unwrap_or(1);
    if !settled || matches!(status.phase, Phase::Assigned | Phase::Pushing) {
        debug!(imagebackup = %name, "digest moved while a copy is in flight; waiting for it");
        return Ok(());
    }
    // Workloads that still run the old content (not yet patched) keep it:
    // two workloads on one tag with different contents would otherwise flip
    // the ImageBackup back and forth, copying each time.
    let wanted = ctx.usage.digests_of(&name);
    if wanted.contains(&backup.spec.digest) {
        info!(imagebackup = %name, workload = %user, wanted = ?wanted, "the tag runs as different contents; the backup of the content other workloads run comes first");
        return Ok(());
    }
    info!(imagebackup = %name, old = %backup.spec.digest, new = %digest, workload = %user, "the tag moved; copying the new digest");
    let pointer = PointerBuf::from_tokens(["spec", "digest"]);
    let patch = JsonPatch(vec![
        PatchOperation::Test(TestOperation { path: pointer.clone(), value: Value::from(backup.spec.digest.clone()) }),
        PatchOperation::Replace(ReplaceOperation { path: pointer, value: Value::from(digest) }),
    ]);
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    match ctx.backup_api().patch(&name, &params, &Patch::<()>::Json(patch)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => Ok(()),
        Err(e) => Err(kube_err("retargeting ImageBackup", name)(e)),
    }
}

async fn patch(
    ctx: &Context,
    workload: &Workload,
    backups: &BTreeMap<String, String>,
    reduced: &[String],
) -> Result<Action, Error> {
    let key = workload.key();
    let patch = match backup_patch(workload, backups) {
        Ok(patch) => patch,
        Err(RewriteError::Nothing { .. }) => return Ok(Action::await_change()),
        Err(e) => return Err(e.into()),
    };
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    let patch = Patch::<()>::Json(patch);
    let result = match workload {
        Workload::Deployment(_) => Api::<Deployment>::namespaced(ctx.client.clone(), workload.namespace())
            .patch(workload.name(), &params, &patch)
            .await
            .map(|_| ()),
        Workload::DaemonSet(_) => Api::<DaemonSet>::namespaced(ctx.client.clone(), workload.namespace())
            .patch(workload.name(), &params, &patch)
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => {
            ctx.metrics.patched("rewritten");
            info!(images = backups.len(), "workload now runs its backups");
            let note = format!("{} image(s) moved to backups in {}", backups.len(), ctx.config.backup.registry);
            ctx.event(&workload.object_ref(), EventType::Normal, "WorkloadRewritten", note).await;
            if !reduced.is_empty() {
                // Nodes of a left-out platform cannot run these: whoever
                // adds such a node must know before its pods fail to pull.
                let note =
                    format!("pinned to reduced indexes (platforms no node held are left out): {}", reduced.join("; "));
                ctx.event(&workload.object_ref(), EventType::Warning, "ReducedBackup", note).await;
            }
            Ok(Action::await_change())
        }
        // A `test` operation failed: the workload changed since it was
        // read. Never overwrite; its watch event brings the new version.
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => {
            ctx.metrics.patched("changed_meanwhile");
            info!("workload changed meanwhile; reconsidering");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(e) => Err(kube_err("patching workload", key.to_string())(e)),
    }
}

/// The workloads of `kind` to wake when an ImageBackup is finished (only
/// then can they act on it).
pub fn users_of<K>(ctx: &Context, backup: &ImageBackup, kind: &str) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    let finished = backup.status.as_ref().is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed));
    if !finished {
        return Vec::new();
    }
    ctx.usage
        .workloads_of(&backup.name_any())
        .into_iter()
        .filter(|w| w.kind == kind)
        .map(|w| ObjectRef::new(&w.name).within(&w.namespace))
        .collect()
}
