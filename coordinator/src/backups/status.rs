//! Writing a transition to the status subresource. The write is a PUT that
//! carries the resourceVersion it was decided from: a status that changed
//! meanwhile makes it fail with a conflict (409), never be overwritten.

use std::sync::Arc;

use image_backup_core::job::{self, Transition};
use image_backup_crds::ImageBackup;
use k8s_openapi::jiff::Timestamp;
use kube::{ResourceExt, api::PostParams};

use crate::context::{Context, Error, MANAGER, kube_err};

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
