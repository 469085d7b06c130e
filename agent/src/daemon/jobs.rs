//! The copies the coordinator assigns: each runs as its own task, within
//! the job deadline and the agent's limit of jobs at once, reports its
//! progress, and ends in a result delivered on the current session or kept
//! for the next. A cancel or a newer assignment of the job stops it.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use image_backup_oci::{
    ImageRef, ParseRefError,
    registry::{Credentials, docker_config},
};
use image_backup_proto::v1::{
    AgentMessage, Assignment, Finish as ProtoFinish, JobFailure, JobProgress, JobResult, JobSuccess,
    PlatformManifest as ProtoPlatformManifest, agent_message, job_result,
};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, error, info, info_span, warn};

use super::{Agent, inventory::to_proto_platform, lock, message};
use crate::{
    progress::Progress,
    push::{Finish, PushError, Scope, SourceAccess},
    store::ContentStore,
};

/// How often running copies are logged at info.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

pub(super) struct RunningJob {
    task: tokio::task::AbortHandle,
    progress: Arc<Progress>,
    /// The attempt its reports carry; a newer assignment of the same copy
    /// (the coordinator took the job back, then gave it here again) moves it.
    attempt: Arc<AtomicU32>,
    digest: String,
    target: String,
    scope: Scope,
}

// === impl Agent ===

impl<S: ContentStore> Agent<S> {
    /// Starts an assigned copy unless it is running already (a coordinator
    /// that restarted may assign it again: the running copy then answers for
    /// the new attempt) or the agent is full. A running copy of another
    /// digest under the same job is obsolete and stops.
    pub(super) fn start(self: Arc<Self>, assignment: Assignment) {
        let job_id = assignment.job_id.clone();
        let scope = scope_of(&assignment);
        let mut jobs = lock(&self.jobs);
        if let Some(running) = jobs.get(&job_id) {
            if running.digest == assignment.digest && running.target == assignment.target && running.scope == scope {
                debug!(job = %job_id, attempt = assignment.attempt, "already running; reporting as the new attempt");
                running.attempt.store(assignment.attempt, Ordering::Relaxed);
                return;
            }
            info!(job = %job_id, digest = %assignment.digest, target = %assignment.target, "the job now copies another digest or to another place; stopping the old copy");
            running.task.abort();
            jobs.remove(&job_id);
        }
        if jobs.len() >= self.config.max_jobs as usize {
            drop(jobs);
            let failure = JobFailure {
                message: format!("agent {} runs {} jobs already", self.config.agent_id, self.config.max_jobs),
                retryable: true,
                ..JobFailure::default()
            };
            let attempt = assignment.attempt;
            let digest = assignment.digest;
            self.deliver(JobResult { job_id, outcome: Some(job_result::Outcome::Failure(failure)), attempt, digest });
            return;
        }
        let progress = Progress::new();
        let span = info_span!("job", job = %job_id, source = %assignment.source, attempt = assignment.attempt);
        let agent = self.clone();
        let job_progress = progress.clone();
        let attempt = Arc::new(AtomicU32::new(assignment.attempt));
        let (digest, target) = (assignment.digest.clone(), assignment.target.clone());
        let task_attempt = attempt.clone();
        let task_scope = scope.clone();
        let task = tokio::spawn(
            async move {
                let outcome = agent.contained_copy(&assignment, &task_scope, job_progress).await;
                {
                    // A copy that replaced this one under the same job id
                    // stays.
                    let mut jobs = lock(&agent.jobs);
                    if jobs.get(&assignment.job_id).is_some_and(|job| Arc::ptr_eq(&job.attempt, &task_attempt)) {
                        jobs.remove(&assignment.job_id);
                    }
                }
                let attempt = task_attempt.load(Ordering::Relaxed);
                let result = JobResult {
                    job_id: assignment.job_id.clone(),
                    outcome: Some(outcome),
                    attempt,
                    digest: assignment.digest.clone(),
                };
                agent.deliver(result);
            }
            .instrument(span),
        );
        jobs.insert(job_id, RunningJob { task: task.abort_handle(), progress, attempt, digest, target, scope });
    }

    /// Stops a job the coordinator took back.
    pub(super) fn cancel(&self, job_id: &str, reason: &str) {
        if let Some(job) = lock(&self.jobs).remove(job_id) {
            info!(job = %job_id, %reason, "cancelling job");
            job.task.abort();
        }
    }

    /// A copy within the job deadline, a panic in it reported as a failure
    /// (its slot would otherwise stay taken for good).
    async fn contained_copy(
        &self,
        assignment: &Assignment,
        scope: &Scope,
        progress: Arc<Progress>,
    ) -> job_result::Outcome {
        use futures::FutureExt;
        let deadline = self.config.job_timeout;
        let copy = std::panic::AssertUnwindSafe(self.copy(assignment, scope, progress)).catch_unwind();
        let message = match tokio::time::timeout(deadline, copy).await {
            Ok(Ok(outcome)) => return outcome,
            Ok(Err(panic)) => {
                let what = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                error!(panic = %what, "the copy panicked");
                format!("the copy panicked on agent {}: {what}", self.config.agent_id)
            }
            Err(_) => {
                warn!(?deadline, "the copy ran past its deadline; stopped");
                format!("the copy did not finish within {}", humantime::format_duration(deadline))
            }
        };
        job_result::Outcome::Failure(JobFailure { message, retryable: true, ..JobFailure::default() })
    }

    async fn copy(&self, assignment: &Assignment, scope: &Scope, progress: Arc<Progress>) -> job_result::Outcome {
        let failure = |message: String, retryable: bool| {
            job_result::Outcome::Failure(JobFailure { message, retryable, ..JobFailure::default() })
        };
        let source = match source_reference(&assignment.source, &assignment.digest) {
            Ok(source) => source,
            Err(e) => return failure(e.to_string(), false),
        };
        let target = match ImageRef::parse(&assignment.target) {
            Ok(target) => target,
            Err(e) => return failure(e.to_string(), false),
        };
        let allowed = match self.guard.check_target(&source, &target) {
            Ok(()) => self.guard.check_digest(&assignment.digest).await,
            Err(refusal) => Err(refusal),
        };
        if let Err(refusal) = allowed {
            warn!(%target, digest = %assignment.digest, error = %refusal, "assignment refused");
            return failure(refusal.to_string(), refusal.retryable());
        }
        info!(%target, digest = %assignment.digest, "copy started");
        let credentials = match source_credentials(&assignment.source_docker_config, source.registry()) {
            Ok(credentials) => credentials,
            // Children to copy from the source need it read as the pods
            // would; referrers alone are worth a try without.
            Err(e) if !assignment.from_source.is_empty() => {
                warn!(error = %e, "the source cannot be read as the workload's pods would");
                let failure = JobFailure { message: e.to_string(), source_failed: true, ..JobFailure::default() };
                return job_result::Outcome::Failure(failure);
            }
            Err(e) => {
                warn!(error = %e, "reading the source for referrers without the workload's pull secret");
                None
            }
        };
        let access = SourceAccess { credentials, referrers: assignment.copy_referrers };
        let push = self.pusher.push(&source, &target, scope, access, progress.clone());
        let pushed = log_progress(push, &progress).await;
        match pushed {
            Ok(report) => {
                info!(
                    pinned = ?report.pinned,
                    manifests = report.manifests.len(),
                    uploaded_bytes = report.bytes_uploaded,
                    uploaded = report.blobs_uploaded,
                    mounted = report.blobs_mounted,
                    existing = report.blobs_existing,
                    elapsed = ?report.duration,
                    "copy finished"
                );
                job_result::Outcome::Success(JobSuccess {
                    pinned_reference: report.pinned.unwrap_or_default(),
                    digest: report.digest.unwrap_or_default(),
                    pushed_manifests: report.manifests.into_iter().map(to_proto_manifest).collect(),
                    from_source: report.from_source,
                    referrers: report.referrers.copied,
                    referrers_error: report.referrers.error.unwrap_or_default(),
                    bytes_uploaded: report.bytes_uploaded,
                    blobs_uploaded: report.blobs_uploaded,
                    blobs_mounted: report.blobs_mounted,
                    blobs_existing: report.blobs_existing,
                    duration_seconds: report.duration.as_secs_f64(),
                })
            }
            Err(e) => {
                warn!(error = %e, "copy failed");
                let (message, retryable) = (e.to_string(), e.retryable());
                match e {
                    PushError::IncompleteIndex { missing, pushed, .. } => job_result::Outcome::Failure(JobFailure {
                        message,
                        retryable,
                        pushed_manifests: pushed.into_iter().map(to_proto_manifest).collect(),
                        absent_manifests: missing.into_iter().map(|m| m.digest).collect(),
                        source_failed: false,
                    }),
                    // Only a part that was to copy children from the source
                    // tells the coordinator to go on without it; elsewhere
                    // (a layer the node lacks) it is an ordinary failure.
                    PushError::Source { .. } | PushError::SourceSize { .. } if !assignment.from_source.is_empty() => {
                        job_result::Outcome::Failure(JobFailure {
                            message,
                            retryable,
                            source_failed: true,
                            ..JobFailure::default()
                        })
                    }
                    _ => failure(message, retryable),
                }
            }
        }
    }

    pub(super) async fn report_progress(self: Arc<Self>, tx: mpsc::Sender<AgentMessage>) {
        let mut interval = tokio::time::interval(self.config.progress_interval);
        loop {
            interval.tick().await;
            let reports: Vec<JobProgress> = lock(&self.jobs)
                .iter()
                .map(|(job_id, job)| {
                    let s = job.progress.snapshot();
                    JobProgress {
                        job_id: job_id.clone(),
                        bytes_done: s.bytes_done,
                        bytes_total: s.bytes_total,
                        blobs_done: s.blobs_done,
                        blobs_total: s.blobs_total,
                        blobs_skipped: s.blobs_existing + s.blobs_mounted,
                        attempt: job.attempt.load(Ordering::Relaxed),
                        digest: job.digest.clone(),
                    }
                })
                .collect();
            for report in reports {
                if tx.send(message(agent_message::Message::Progress(report))).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Sends a result on the current session, or keeps it for the next.
    fn deliver(&self, result: JobResult) {
        let msg = message(agent_message::Message::Result(result));
        let sender = lock(&self.session).clone();
        match sender {
            Some(tx) => {
                if let Err(mpsc::error::TrySendError::Full(msg) | mpsc::error::TrySendError::Closed(msg)) =
                    tx.try_send(msg)
                {
                    lock(&self.undelivered).push(msg);
                }
            }
            None => lock(&self.undelivered).push(msg),
        }
    }
}

/// Aborts every running job when dropped.
pub(super) struct StopJobsOnDrop<'a>(pub(super) &'a Mutex<HashMap<String, RunningJob>>);

impl Drop for StopJobsOnDrop<'_> {
    fn drop(&mut self) {
        for (_, job) in lock(self.0).drain() {
            job.task.abort();
        }
    }
}

/// Runs a copy, logging how far it got now and then: an operator following
/// `kubectl logs` wants a line every few seconds, whether or not a
/// coordinator is connected, not one per report.
async fn log_progress<T>(copy: impl std::future::Future<Output = T>, progress: &Progress) -> T {
    let mut copy = std::pin::pin!(copy);
    let mut ticks =
        tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_LOG_INTERVAL, PROGRESS_LOG_INTERVAL);
    loop {
        tokio::select! {
            done = &mut copy => return done,
            _ = ticks.tick() => info!(progress = %progress.snapshot().summary(), "copying"),
        }
    }
}

/// The exact image the pods run: the normalized source pinned to the digest
/// the coordinator asks for.
fn source_reference(source: &str, digest: &str) -> Result<ImageRef, ParseRefError> {
    let parsed = ImageRef::parse(source)?;
    if digest.is_empty() || parsed.digest() == Some(digest) {
        return Ok(parsed);
    }
    let base = match parsed.tag() {
        Some(tag) => format!("{}:{tag}", parsed.name()),
        None => parsed.name(),
    };
    ImageRef::parse(&format!("{base}@{digest}"))
}

fn to_proto_manifest(m: crate::push::PlatformManifest) -> ProtoPlatformManifest {
    ProtoPlatformManifest { platform: Some(to_proto_platform(&m.platform)), digest: m.digest, attestation: false }
}

/// What of the image an assignment copies.
fn scope_of(assignment: &Assignment) -> Scope {
    let finish = match assignment.finish() {
        ProtoFinish::Whole => return Scope::Whole,
        ProtoFinish::None => Finish::None,
        ProtoFinish::Index => Finish::Index,
        ProtoFinish::Reduced => Finish::Reduced { keep: assignment.keep.clone() },
    };
    Scope::Part { manifests: assignment.manifests.clone(), from_source: assignment.from_source.clone(), finish }
}

/// The credentials for `host` in the docker config an assignment carries
/// (the source host's entry of the workload's pull secret), if any.
fn source_credentials(docker_config: &[u8], host: &str) -> Result<Option<Credentials>, String> {
    if docker_config.is_empty() {
        return Ok(None);
    }
    docker_config::credentials(docker_config, host)
        .map_err(|detail| format!("the source credentials the assignment carries for {host}: {detail}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn source_is_pinned_to_the_assigned_digest() {
        let r = source_reference("docker.io/library/nginx:1.25", DIGEST).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/nginx:1.25@{DIGEST}"));
        let r = source_reference(&format!("docker.io/library/nginx@{DIGEST}"), DIGEST).unwrap();
        assert_eq!(r.to_string(), format!("docker.io/library/nginx@{DIGEST}"));
        assert!(source_reference("Not A Ref", DIGEST).is_err());
    }
}
