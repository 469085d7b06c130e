//! Writing to the status subresource: a transition, and the notes workload
//! reconciles queued. A write is a PUT that carries the resourceVersion it
//! was decided from: a status that changed meanwhile makes it fail with a
//! conflict (409), never be overwritten.

use std::sync::Arc;

use image_backup_core::job::{self, Transition};
use image_backup_crds::ImageBackup;
use k8s_openapi::jiff::Timestamp;
use kube::{ResourceExt, api::PostParams};

use super::notes;
use crate::{
    MANAGER,
    backups::context::Context,
    error::{Error, kube_err},
};

/// Records `transition`; the object as written, or `None` when `backup`
/// was stale.
pub async fn write(
    ctx: &Context,
    backup: &ImageBackup,
    transition: &Transition,
) -> Result<Option<Arc<ImageBackup>>, Error> {
    let name = backup.name_any();
    let current = backup.status.clone().unwrap_or_default();
    let mut next = backup.clone();
    let current = job::Status::from(&current);
    next.status = Some(transition.apply(&current, Timestamp::now()).into());
    next.metadata.managed_fields = None;
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    match ctx.backup_api().replace_status(&name, &params, &next).await {
        Ok(written) => {
            let written = Arc::new(written);
            ctx.written.remember(written.clone());
            ctx.metrics.status_written(transition);
            Ok(Some(written))
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(None),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            // Deleted meanwhile: nothing left to record.
            ctx.written.forget(&name);
            ctx.jobs.forget(&name);
            Ok(None)
        }
        Err(e) => Err(kube_err("writing status of ImageBackup", name)(e)),
    }
}

/// Writes the queued notes of `backup`, if any changes its status; the
/// object as it stands after.
pub async fn write_notes(ctx: &Context, backup: Arc<ImageBackup>) -> Result<Arc<ImageBackup>, Error> {
    let name = backup.name_any();
    let changes = ctx.notes.take(&name);
    if changes.is_empty() {
        return Ok(backup);
    }
    let mut object = backup;
    for _ in 0..3 {
        let current = object.status.clone().unwrap_or_default();
        let next = notes::apply(&current, &changes);
        if next == current {
            return Ok(object);
        }
        let mut updated = (*object).clone();
        updated.status = Some(next);
        updated.metadata.managed_fields = None;
        let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
        match ctx.backup_api().replace_status(&name, &params, &updated).await {
            Ok(written) => {
                let written = Arc::new(written);
                ctx.written.remember(written.clone());
                return Ok(written);
            }
            Err(kube::Error::Api(status)) if status.code == 409 => {
                let fresh = ctx.backup_api().get_opt(&name).await.map_err(kube_err("getting ImageBackup", &name))?;
                let Some(fresh) = fresh else { return Ok(object) };
                object = Arc::new(fresh);
            }
            Err(kube::Error::Api(status)) if status.code == 404 => return Ok(object),
            Err(e) => {
                ctx.notes.put_back(&name, changes);
                return Err(kube_err("writing notes to ImageBackup", name)(e));
            }
        }
    }
    ctx.notes.put_back(&name, changes);
    Ok(object)
}
