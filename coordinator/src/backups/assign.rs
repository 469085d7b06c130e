//! Handing an attempt to an agent: its slot reserved, the attempt recorded
//! in status, then the assignment sent.

use image_backup_core::job::{self, Finish, Holder, Limits, Next, Observed, Transition, plan::Part};
use image_backup_crds::ImageBackup;
use image_backup_oci::ImageRef;
use image_backup_proto::v1::Assignment;
use kube::{Resource, ResourceExt, runtime::controller::Action, runtime::events::EventType};
use std::time::Duration;
use tracing::{debug, info, warn};

use super::{job_status, since, since_verified, source_auth, status};
use crate::{backups::context::Context, error::Error};

/// Reserves the agent's slot, records the attempt, then delivers it: the
/// attempt exists in status before any agent starts it.
pub(super) async fn assign(
    ctx: &Context,
    backup: &ImageBackup,
    target: &Result<ImageRef, String>,
    transition: Transition,
    limits: &Limits,
) -> Result<Option<Action>, Error> {
    let Transition::Assigned { agent_id, node, attempt, part, .. } = &transition else {
        return Ok(Some(Action::await_change()));
    };
    let name = backup.name_any();
    let target = match target {
        Ok(target) => target,
        Err(error) => {
            let transition = Transition::Failed { error: error.clone(), absent: Vec::new() };
            return Ok(status::write(ctx, backup, &transition).await?.map(|written| {
                warn!(error = ?written.status.as_ref().and_then(|s| s.last_error.as_deref()), "invalid source");
                Action::await_change()
            }));
        }
    };
    if let Err(e) = ctx.hub.reserve(agent_id, &name, *attempt, &backup.spec.digest) {
        // Another job took the slot first; this one decides again here,
        // not in a requeued step: a freed slot wakes every waiting job,
        // and all but one land here.
        debug!(error = %e, "agent slot taken meanwhile");
        return lost_race(ctx, backup, limits).await;
    }
    let Some(_) = status::write(ctx, backup, &transition).await? else {
        ctx.hub.release(agent_id, &name);
        return Ok(None);
    };
    let mut assignment = assignment(&name, backup, target, *attempt, part);
    // Only children to copy from the source are worth reading the users'
    // pull secrets for (API calls per workload); referrers and a layer a
    // node lacks are read with the agent's own credentials, or none.
    if !assignment.from_source.is_empty()
        && let Ok(source) = ImageRef::parse(&backup.spec.source)
    {
        assignment.source_docker_config =
            source_auth::for_source(ctx, backup, source.registry()).await.unwrap_or_default();
    }
    // The attempt is recorded; an agent starts it only while this
    // coordinator still leads (the next leader finds it and decides).
    if !ctx.fence.up() {
        ctx.hub.release(agent_id, &name);
        return Ok(Some(Action::await_change()));
    }
    if let Err(e) = ctx.hub.send(agent_id, assignment) {
        warn!(agent = %agent_id, error = %e, "assignment not delivered");
        ctx.jobs.lose(&name, *attempt, &format!("assignment not delivered: {e}"));
        return Ok(Some(Action::await_change()));
    }
    info!(agent = %agent_id, %node, attempt, manifests = part.manifests.len(), finish = ?part.finish, "copy assigned");
    let note = format!("copy of {} assigned to node {node} (attempt {attempt})", backup.spec.source);
    ctx.event(&backup.object_ref(&()), EventType::Normal, "BackupStarted", note).await;
    Ok(Some(Action::await_change()))
}

fn assignment(name: &str, backup: &ImageBackup, target: &ImageRef, attempt: u32, part: &Part) -> Assignment {
    Assignment {
        job_id: name.to_string(),
        source: backup.spec.source.clone(),
        digest: backup.spec.digest.clone(),
        target: target.to_string(),
        attempt,
        manifests: part.manifests.clone(),
        finish: image_backup_proto::v1::Finish::from(part.finish).into(),
        keep: part.keep.clone(),
        from_source: part.from_source.clone(),
        source_docker_config: Vec::new(),
        // The part that pushes the image copies what refers to it.
        copy_referrers: matches!(part.finish, Finish::Whole | Finish::Index),
    }
}

/// The slot went to another job: waits for the next one, and says so, or
/// tries again at once if one freed meanwhile.
async fn lost_race(ctx: &Context, backup: &ImageBackup, limits: &Limits) -> Result<Option<Action>, Error> {
    ctx.jobs.wait_for_agent(&backup.name_any());
    let status = job_status(backup);
    let observed = Observed {
        generation: backup.metadata.generation.unwrap_or(1),
        digest: &backup.spec.digest,
        status: &status,
        live: None,
        holder: Holder::Absent,
        holdings: ctx.hub.holdings(&backup.spec.digest),
        target: None,
        since_transition: since(&status),
        since_verified: since_verified(&status),
        since_report: None,
        uptime: ctx.hub.uptime(),
    };
    match job::pending(&observed, limits) {
        Next::Assign { .. } => Ok(Some(Action::requeue(Duration::ZERO))),
        Next::Record(transition @ Transition::Waiting { .. }) => {
            Ok(status::write(ctx, backup, &transition).await?.map(|_| Action::await_change()))
        }
        Next::After(after) => Ok(Some(Action::requeue(after))),
        _ => Ok(Some(Action::await_change())),
    }
}
