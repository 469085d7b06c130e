//! The ImageBackup reconciler, the one writer of ImageBackup status. It
//! reads the object from the reflector store and what agents reported from
//! [`LiveJobs`](crate::jobs::LiveJobs), asks the state machine for the next
//! step, performs it, and records it with optimistic concurrency.

mod assign;
pub mod context;
pub mod mark;
pub mod notes;
pub mod proof;
pub mod source_auth;
mod status;
pub mod unused;
mod verify;

pub use context::Context;

use std::{sync::Arc, time::Duration};

use image_backup_core::job::{self, Holder, Limits, Next, Observed, Phase, Transition, plan::Holdings};
use image_backup_crds::ImageBackup;
use image_backup_oci::ImageRef;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt, runtime::controller::Action, runtime::events::EventType};
use tracing::{debug, info, instrument, warn};

use crate::error::{Error, kube_err};

/// How often a stale write is retried from a fresh read before the
/// reconcile is requeued.
const CONFLICT_RETRIES: usize = 3;

/// How soon a verification the registry did not answer is tried again.
const VERIFY_RETRY: Duration = Duration::from_secs(5);

#[instrument(skip_all, fields(imagebackup = %backup.name_any()))]
pub async fn reconcile(backup: Arc<ImageBackup>, ctx: Arc<Context>) -> Result<Action, Error> {
    if !ctx.fence.up() {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started("ImageBackup");
    let mut object = status::write_notes(&ctx, ctx.written.freshest(backup)).await?;
    if let Some(action) = unused::check(&ctx, &object).await? {
        return Ok(action);
    }
    for _ in 0..CONFLICT_RETRIES {
        match step(&object, &ctx).await? {
            Some(action) => return Ok(action),
            None => {
                debug!("status changed meanwhile; deciding again from a fresh read");
                let name = object.name_any();
                let fresh = ctx.backup_api().get_opt(&name).await.map_err(kube_err("getting ImageBackup", &name))?;
                let Some(fresh) = fresh else { return Ok(Action::await_change()) };
                object = Arc::new(fresh);
            }
        }
    }
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// A deleted ImageBackup, as the shared watch reports it: what agents
/// reported and what was written go, and a copy still running stops.
pub fn deleted(ctx: &Context, name: &str) {
    info!(imagebackup = %name, "ImageBackup deleted");
    ctx.jobs.forget(name);
    ctx.written.forget(name);
    ctx.hub.cancel_anywhere(name, "the ImageBackup was deleted");
}

/// Performs the next step; `None` when the status write met a newer
/// version of the object.
async fn step(backup: &ImageBackup, ctx: &Context) -> Result<Option<Action>, Error> {
    let name = backup.name_any();
    let status = job_status(backup);
    let limits = limits(ctx);
    let live = ctx
        .jobs
        .get(&name)
        .filter(|live| live.is(status.attempts, &backup.spec.digest, status.agent.as_deref().unwrap_or_default()));
    let holdings = if status.phase == Phase::Pending {
        // Registered before the slots are read, so a slot freed in between
        // still wakes it; an assignment takes it off the list.
        ctx.jobs.wait_for_agent(&name);
        ctx.hub.holdings(&backup.spec.digest)
    } else {
        Holdings::default()
    };
    let target = target_of(ctx, backup);
    let pinned = target.as_ref().ok().map(|t| t.pinned(&backup.spec.digest));
    let observed = Observed {
        generation: backup.metadata.generation.unwrap_or(1),
        digest: &backup.spec.digest,
        status: &status,
        live: live.as_ref(),
        holder: status.agent.as_deref().map_or(Holder::Absent, |agent| ctx.hub.holder(agent, &name)),
        holdings,
        target: pinned.as_deref(),
        since_transition: since(&status),
        since_verified: since_verified(&status),
        since_report: live.as_ref().map(|l| l.updated.elapsed()),
        uptime: ctx.hub.uptime(),
    };
    let transition = match job::next(&observed, &limits) {
        Next::Idle => return Ok(Some(Action::await_change())),
        Next::After(wait) => return Ok(Some(Action::requeue(wait))),
        Next::Record(transition) => transition,
        Next::Reverify => match &target {
            Ok(target) => match verify::reverify(ctx, backup, target, &status).await {
                Some(transition) => transition,
                None => return Ok(Some(Action::requeue(VERIFY_RETRY))),
            },
            // Nowhere to look: no workload is pinned to it any more either.
            Err(error) => Transition::Failed { error: error.clone(), absent: Vec::new() },
        },
        Next::Verify(success) => match verify::verify(ctx, backup, &target, &status, &limits, &success).await {
            Some(transition) => transition,
            // The registry did not answer: the agent's result stays until
            // it does, and no attempt is spent on it.
            None => return Ok(Some(Action::requeue(VERIFY_RETRY))),
        },
        Next::Assign { agent_id, node, attempt, part } => {
            let transition =
                Transition::Assigned { agent_id, node, attempt, children: observed.holdings.children.clone(), part };
            return assign::assign(ctx, backup, &target, transition, &limits).await;
        }
    };
    let Some(written) = status::write(ctx, backup, &transition).await? else { return Ok(None) };
    after_write(ctx, backup, &written, &transition).await;
    Ok(Some(match transition {
        // The backoff is kept in status (the transition time), so it
        // survives a coordinator restart.
        Transition::Retry { .. } | Transition::Lost { .. } => {
            let failures = written.status.as_ref().map_or(1, |s| s.failures);
            Action::requeue(job::backoff(&limits, failures, &backup.spec.digest).max(Duration::from_millis(100)))
        }
        Transition::Restart { .. } | Transition::Copied { .. } | Transition::SourceFailed { .. } => {
            Action::requeue(Duration::ZERO)
        }
        Transition::Waiting { recheck: Some(after), .. } => Action::requeue(after),
        Transition::Missing { .. } => Action::requeue(Duration::ZERO),
        Transition::Verified | Transition::Completed { .. } if !limits.verify_every.is_zero() => {
            Action::requeue(limits.verify_every)
        }
        _ => Action::await_change(),
    }))
}

fn limits(ctx: &Context) -> Limits {
    Limits {
        max_attempts: ctx.config.max_attempts,
        retry_backoff: ctx.config.retry_backoff,
        max_backoff: ctx.config.max_retry_backoff,
        grace: ctx.config.heartbeat_deadline,
        reduce_after: ctx.config.reduce_after,
        require_complete: ctx.config.require_complete_index,
        verify_every: ctx.config.verify_every,
    }
}

/// The backup reference a job pushes to, from the spec and the configured
/// backup location.
fn target_of(ctx: &Context, backup: &ImageBackup) -> Result<ImageRef, String> {
    let source = ImageRef::parse(&backup.spec.source)
        .map_err(|e| format!("source {:?} is not a valid image reference: {e}", backup.spec.source))?;
    ctx.config.backup.reference_for(&source).map_err(|e| format!("no backup reference for {source}: {e}"))
}

/// Events and bookkeeping once a transition is recorded.
async fn after_write(ctx: &Context, backup: &ImageBackup, written: &ImageBackup, transition: &Transition) {
    let status = written.status.clone().unwrap_or_default();
    let name = backup.name_any();
    let object = backup.object_ref(&());
    let source = &backup.spec.source;
    match transition {
        Transition::Completed { reference, reduced, .. } => {
            ctx.jobs.recorded(&name, status.attempts);
            info!(%reference, reduced, "backup completed");
            let note = if *reduced {
                format!("{source} backed up as {reference}, a reduced index without {}", status.left_out.join(", "))
            } else {
                format!("{source} backed up as {reference}")
            };
            ctx.event(&object, EventType::Normal, "BackupCompleted", note).await;
        }
        Transition::Failed { error, .. } => {
            ctx.jobs.recorded(&name, status.attempts);
            warn!(%error, attempts = status.attempts, "backup failed");
            let note = format!("{source} after {} attempt(s): {error}", status.attempts);
            ctx.event(&object, EventType::Warning, "BackupFailed", note).await;
        }
        Transition::Retry { error, .. } => {
            ctx.jobs.recorded(&name, status.attempts);
            warn!(%error, attempt = status.attempts, "attempt failed; retrying");
        }
        Transition::Lost { error } => {
            ctx.jobs.recorded(&name, status.attempts);
            // The agent may still be there (a missed heartbeat, a lost
            // report): its copy must not run on beside the next attempt.
            if let Some(agent) = backup.status.as_ref().and_then(|s| s.agent.as_deref()) {
                ctx.hub.cancel(agent, &name, error);
            }
            warn!(%error, attempt = status.attempts, "copy lost; another attempt follows");
        }
        Transition::Restart { .. } => {
            ctx.jobs.forget(&name);
            info!(digest = %backup.spec.digest, "new digest to copy");
        }
        Transition::Waiting { message, .. } => debug!(%message, "waiting"),
        Transition::SourceFailed { error } => {
            ctx.jobs.recorded(&name, status.attempts);
            warn!(%error, "the source cannot provide what no node holds");
        }
        Transition::Copied { .. } => ctx.jobs.recorded(&name, status.attempts),
        Transition::Missing { error } => {
            ctx.jobs.forget(&name);
            warn!(%error, "backup gone from the registry; copying it again");
            let note = format!("{error}; copying {source} again from a node that holds it, or from the source");
            ctx.event(&object, EventType::Warning, "BackupMissing", note).await;
        }
        Transition::Verified => {}
        Transition::Assigned { .. } | Transition::Progress { .. } => {}
    }
}

/// The status of `backup` as the core's job record.
fn job_status(backup: &ImageBackup) -> job::Status {
    backup.status.as_ref().map(job::Status::from).unwrap_or_default()
}

/// Time since the backup was last seen in the registry: since it was
/// Completed, for a status written before re-verification existed.
fn since_verified(status: &job::Status) -> Duration {
    match status.last_verified {
        Some(t) => Timestamp::now().duration_since(t).try_into().unwrap_or(Duration::ZERO),
        None => since(status),
    }
}

/// Time since the status last changed phase (forever when never).
fn since(status: &job::Status) -> Duration {
    status
        .last_transition_time
        .and_then(|t| Timestamp::now().duration_since(t).try_into().ok())
        .unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests;
