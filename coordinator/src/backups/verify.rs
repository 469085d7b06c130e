//! The agent's word is not enough: a copy it reports, and a Completed
//! backup from time to time, are looked for in the backup registry.

use image_backup_core::job::{self, Failure, Limits, Success, Transition};
use image_backup_crds::ImageBackup;
use image_backup_oci::ImageRef;
use tracing::{debug, warn};

use super::proof;
use crate::backups::context::Context;

/// The agent's word is not enough: the coordinator looks in the registry.
/// `None` when the registry could not say.
pub(super) async fn verify(
    ctx: &Context,
    backup: &ImageBackup,
    target: &Result<ImageRef, String>,
    status: &job::Status,
    limits: &Limits,
    success: &Success,
) -> Option<Transition> {
    let target = match target {
        Ok(target) => target,
        Err(error) => return Some(Transition::Failed { error: error.clone(), absent: Vec::new() }),
    };
    let failure = |message: String| {
        let failure = Failure { message, retryable: true, ..Failure::default() };
        job::failed(status, limits, &failure, &backup.spec.digest)
    };
    let source = &backup.spec.digest;
    let reduced = success.digest != *source;
    let found = if reduced {
        // The machine let it through only for an attempt planned to push a
        // reduced index; the registry must prove it one.
        match proof::reduction(&ctx.registry, target.repository(), &success.digest, source).await {
            Ok(Ok(())) => Ok(Some(success.digest.clone())),
            Ok(Err(why)) => {
                let node = status.node.as_deref().unwrap_or("?");
                warn!(digest = %success.digest, %node, why, "a reduced index that is not the source's refused");
                let error = format!("node {node} pushed a reduced index that is refused: {why}");
                return Some(Transition::Failed { error, absent: Vec::new() });
            }
            Err(e) => Err(e),
        }
    } else {
        ctx.registry.manifest_digest(target.repository(), source).await.map(|d| d.filter(|d| d == source))
    };
    match found {
        Ok(Some(digest)) => {
            ctx.metrics.pushed(success.bytes_uploaded, success.duration_seconds);
            Some(Transition::Completed {
                reference: target.pinned(&digest),
                bytes: success.bytes_uploaded,
                node: status.node.clone().unwrap_or_default(),
                manifests: success.pushed_manifests.clone(),
                from_source: success.from_source.clone(),
                reduced,
                referrers: success.referrers.clone(),
                referrers_error: success.referrers_error.clone(),
            })
        }
        Ok(None) => Some(failure(format!(
            "agent reported {} pushed, but {} does not serve it as a backup of {source}",
            success.digest,
            target.name()
        ))),
        Err(e) => {
            warn!(error = %e, "could not verify the backup in the registry; trying again");
            None
        }
    }
}

/// Looks for a Completed backup in the registry again (a HEAD of the
/// pinned manifest; for a reduced index, its proof read again); `None`
/// when the registry could not say.
pub(super) async fn reverify(
    ctx: &Context,
    backup: &ImageBackup,
    target: &ImageRef,
    status: &job::Status,
) -> Option<Transition> {
    let source = backup.spec.digest.as_str();
    let reference = status.backup_reference.clone().unwrap_or_else(|| target.pinned(source));
    let digest = reference.rsplit_once('@').map_or(source, |(_, digest)| digest);
    let found = if digest != source && status.reduced {
        // One made before reduced indexes carried their proof, or altered
        // since, is copied again like a lost one.
        proof::reduction(&ctx.registry, target.repository(), digest, source).await
    } else {
        let served = ctx.registry.manifest_digest(target.repository(), digest).await;
        served.map(|found| match found.as_deref() == Some(digest) {
            true => Ok(()),
            false => Err(format!("the backup registry no longer serves {reference}")),
        })
    };
    match found {
        Ok(Ok(())) => {
            ctx.metrics.verified("present");
            debug!(%reference, "backup still in the registry");
            Some(Transition::Verified)
        }
        Ok(Err(error)) => {
            ctx.metrics.verified("missing");
            Some(Transition::Missing { error })
        }
        Err(e) => {
            ctx.metrics.verified("error");
            warn!(%reference, error = %e, "could not look for the backup in the registry; trying again");
            None
        }
    }
}
