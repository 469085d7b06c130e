//! The ImageBackup reconciler, the one writer of ImageBackup status. It
//! reads the object from the reflector store and what agents reported from
//! [`LiveJobs`](crate::jobs::LiveJobs), asks the state machine for the next
//! step, performs it, and records it with optimistic concurrency.

pub mod mark;
pub mod notes;
pub mod proof;
pub mod source_auth;
mod status;
pub mod unused;

use std::{sync::Arc, time::Duration};

use image_backup_core::job::{
    self, Failure, Finish, Holder, Limits, Next, Observed, Phase, Success, Transition,
    plan::{Holdings, Part},
};
use image_backup_crds::ImageBackup;
use image_backup_oci::ImageRef;
use image_backup_proto::v1::Assignment;
use k8s_openapi::jiff::Timestamp;
use kube::{Resource, ResourceExt, runtime::controller::Action, runtime::events::EventType};
use tracing::{debug, info, instrument, warn};

use crate::{
    context::Context,
    error::{Error, kube_err},
};

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
            Ok(target) => match reverify(ctx, backup, target, &status).await {
                Some(transition) => transition,
                None => return Ok(Some(Action::requeue(VERIFY_RETRY))),
            },
            // Nowhere to look: no workload is pinned to it any more either.
            Err(error) => Transition::Failed { error: error.clone(), absent: Vec::new() },
        },
        Next::Verify(success) => match verify(ctx, backup, &target, &status, &limits, &success).await {
            Some(transition) => transition,
            // The registry did not answer: the agent's result stays until
            // it does, and no attempt is spent on it.
            None => return Ok(Some(Action::requeue(VERIFY_RETRY))),
        },
        Next::Assign { agent_id, node, attempt, part } => {
            let transition =
                Transition::Assigned { agent_id, node, attempt, children: observed.holdings.children.clone(), part };
            return assign(ctx, backup, &target, transition, &limits).await;
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

/// Reserves the agent's slot, records the attempt, then delivers it: the
/// attempt exists in status before any agent starts it.
async fn assign(
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

/// The backup reference a job pushes to, from the spec and the configured
/// backup location.
fn target_of(ctx: &Context, backup: &ImageBackup) -> Result<ImageRef, String> {
    let source = ImageRef::parse(&backup.spec.source)
        .map_err(|e| format!("source {:?} is not a valid image reference: {e}", backup.spec.source))?;
    ctx.config.backup.reference_for(&source).map_err(|e| format!("no backup reference for {source}: {e}"))
}

/// The agent's word is not enough: the coordinator looks in the registry.
/// `None` when the registry could not say.
async fn verify(
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
async fn reverify(ctx: &Context, backup: &ImageBackup, target: &ImageRef, status: &job::Status) -> Option<Transition> {
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
mod tests {
    use std::sync::Arc;

    use http::{Method, StatusCode};
    use image_backup_crds::{ImageBackupSpec, ImageBackupStatus, Phase as CrdPhase};
    use image_backup_proto::v1::{JobResult, JobSuccess, job_result};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        testing::{Exchange, context, registry, scripted, store},
        workloads::usage::Usage,
    };

    const NAME: &str = "nginx-0123";
    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const OTHER: &str = "sha256:ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
    const STATUS_PATH: &str =
        "/apis/backup.k8slab.io/v1alpha1/imagebackups/nginx-0123/status?&fieldManager=image-backup-coordinator";
    const EVENTS_PATH: &str = "/apis/events.k8s.io/v1/namespaces/default/events?";

    /// An ImageBackup whose attempt 1 agent-a is pushing.
    fn pushing() -> ImageBackup {
        let mut backup = ImageBackup::new(
            NAME,
            ImageBackupSpec { source: "docker.io/library/nginx:1.25".into(), digest: DIGEST.into() },
        );
        backup.metadata.generation = Some(1);
        backup.metadata.resource_version = Some("7".into());
        backup.status = Some(ImageBackupStatus {
            phase: CrdPhase::Pushing,
            agent: Some("agent-a".into()),
            node: Some("node-a".into()),
            attempts: 1,
            observed_generation: 1,
            last_transition_time: Some(Time(Timestamp::now())),
            ..ImageBackupStatus::default()
        });
        backup
    }

    /// The reconcile of [`pushing`] after agent-a said it pushed `digest`,
    /// with the backup registry at `host`, against `script`.
    async fn reconcile_after_success(host: &str, digest: &str, script: Vec<Exchange>) {
        let (client, script) = scripted(script);
        let flags = ["--backup-registry", host, "--insecure-registry", host];
        let ctx = context(client, &flags, store(vec![pushing()]), Arc::new(Usage::default()));
        ctx.jobs.assigned(NAME, 1, DIGEST, "agent-a");
        let success = JobSuccess { digest: digest.into(), bytes_uploaded: 1000, ..JobSuccess::default() };
        let result = JobResult {
            job_id: NAME.into(),
            outcome: Some(job_result::Outcome::Success(success)),
            attempt: 1,
            digest: DIGEST.into(),
        };
        assert!(ctx.jobs.result("agent-a", &result));
        reconcile(Arc::new(pushing()), ctx).await.expect("the reconcile goes through");
        script.done().await;
    }

    fn status(body: &Value) -> &Value {
        &body["status"]
    }

    #[tokio::test]
    async fn a_copy_the_registry_serves_is_completed() {
        let host = registry(vec![format!("backup/docker.io/library/nginx@{DIGEST}")]).await;
        let pinned = format!("{host}/backup/docker.io/library/nginx@{DIGEST}");
        let put = Exchange::new(Method::PUT, STATUS_PATH, StatusCode::OK, Value::Null).checking(move |body| {
            assert_eq!(status(body)["phase"], "Completed", "{body}");
            assert_eq!(status(body)["backupReference"], pinned.as_str());
            assert_eq!(body["metadata"]["resourceVersion"], "7", "written at the version decided from");
        });
        let event = Exchange::new(Method::POST, EVENTS_PATH, StatusCode::CREATED, json!({}))
            .checking(|body| assert_eq!(body["reason"], "BackupCompleted"));
        reconcile_after_success(&host, DIGEST, vec![put, event]).await;
    }

    #[tokio::test]
    async fn a_copy_the_registry_does_not_serve_is_retried_not_completed() {
        let host = registry(Vec::new()).await;
        let put = Exchange::new(Method::PUT, STATUS_PATH, StatusCode::OK, Value::Null).checking(|body| {
            assert_eq!(status(body)["phase"], "Pending", "{body}");
            let error = status(body)["lastError"].as_str().unwrap_or_default();
            assert!(error.contains("does not serve it as a backup of"), "{error}");
            assert_eq!(status(body)["backupReference"], Value::Null);
        });
        reconcile_after_success(&host, DIGEST, vec![put]).await;
    }

    #[tokio::test]
    async fn a_digest_the_plan_did_not_ask_for_fails_without_a_look() {
        // Served, even: an attempt not planned as a reduced index may not
        // choose what the backup is.
        let host = registry(vec![format!("backup/docker.io/library/nginx@{OTHER}")]).await;
        let put = Exchange::new(Method::PUT, STATUS_PATH, StatusCode::OK, Value::Null).checking(|body| {
            assert_eq!(status(body)["phase"], "Failed", "{body}");
            let error = status(body)["lastError"].as_str().unwrap_or_default();
            assert!(error.contains("refused"), "{error}");
        });
        let event = Exchange::new(Method::POST, EVENTS_PATH, StatusCode::CREATED, json!({}))
            .checking(|body| assert_eq!((&body["reason"], &body["type"]), (&json!("BackupFailed"), &json!("Warning"))));
        reconcile_after_success(&host, OTHER, vec![put, event]).await;
    }
}
