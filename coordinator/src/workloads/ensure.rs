//! The ImageBackups a workload needs: made when missing, pointed at the
//! digest its pods run when the tag moved, and read back as the pinned
//! backup reference once Completed and verified.

use image_backup_crds::{ImageBackup, ImageBackupSpec, Phase};
use image_backup_oci::ImageRef;
use json_patch::{Patch as JsonPatch, PatchOperation, ReplaceOperation, TestOperation, jsonptr::PointerBuf};
use kube::{
    Resource, ResourceExt,
    api::{Patch, PatchParams, PostParams},
    runtime::{events::EventType, reflector::ObjectRef},
};
use serde_json::Value;
use tracing::{debug, info, warn};

use super::usage::WorkloadKey;
use crate::{
    MANAGER,
    error::{Error, kube_err},
    workloads::context::Context,
};

/// A verified backup a workload can be pinned to.
pub struct Backup {
    pub reference: String,
    /// Platforms a reduced index left out.
    pub left_out: Vec<String>,
}

/// The pinned backup reference of `source` at `digest` once its ImageBackup
/// is Completed for that digest; until then, makes sure one exists for it.
pub async fn backup_for(
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
    let backup = ctx.written.newest(backup);
    if backup.spec.source != source.to_string() {
        // Names hash the source; an ImageBackup of that name made for
        // another source is never shared, nor changed.
        warn!(imagebackup = %name, %source, other = %backup.spec.source, workload = %user, "the ImageBackup named for this source is another source's; not backed up");
        return Ok(None);
    }
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
    // it is used only if the backup registry (which every node's push
    // credentials write) holds it in that repository as a proven reduction
    // of exactly this source index (`backups::proof`).
    let Ok(target) = ctx.config.backup.reference_for(source) else { return Ok(None) };
    let reference = match status.backup_reference {
        Some(reference) if reference == target.pinned(digest) => reference,
        Some(reference) if status.reduced => match reduced_index_of(ctx, &target, &reference, digest).await {
            Ok(reference) => reference,
            Err(Some(why)) => {
                warn!(%reference, %why, "a reduced backup recorded in status is not used");
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
/// index the registry serves as a proven reduction of `source_index`; else
/// why not (`None` when the registry could not say now).
async fn reduced_index_of(
    ctx: &Context,
    target: &ImageRef,
    reference: &str,
    source_index: &str,
) -> Result<String, Option<String>> {
    let digest = reference
        .strip_prefix(&target.name())
        .and_then(|rest| rest.strip_prefix('@'))
        .ok_or_else(|| Some("it is not in the backup repository of the source".to_string()))?;
    match crate::backups::proof::reduction(&ctx.registry, target.repository(), digest, source_index).await {
        Ok(Ok(())) => Ok(target.pinned(digest)),
        Ok(Err(why)) => Err(Some(why)),
        Err(e) => {
            debug!(%reference, error = %e, "cannot read the reduced index now");
            Err(None)
        }
    }
}

pub async fn create(
    ctx: &Context,
    name: &str,
    source: &ImageRef,
    digest: &str,
    user: &WorkloadKey,
) -> Result<(), Error> {
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
