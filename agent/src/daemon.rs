//! Daemon mode: the agent keeps one session with the coordinator, tells it
//! which images this node's containerd holds (and keeps that current from
//! containerd's events), heartbeats, and runs the copies it is assigned with
//! the push engine, a bounded number at once. Jobs outlive sessions: a
//! coordinator restart does not stop a push, and its result is delivered on
//! the next session.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use futures::StreamExt;
use image_backup_oci::{
    ImageRef, ParseRefError,
    media::PlatformName,
    registry::{Credentials, docker_config},
};
use image_backup_proto::v1::{
    AgentMessage, Assignment, CoordinatorMessage, Finish as ProtoFinish, Heartbeat, Inventory, InventoryImage,
    JobFailure, JobProgress, JobResult, JobSuccess, Platform as ProtoPlatform,
    PlatformManifest as ProtoPlatformManifest, Register, agent_message, agent_service_client::AgentServiceClient,
    coordinator_message, job_result,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::{
    containerd::ContainerdStore,
    guard::Guard,
    link::{CoordinatorLink, LinkError},
    progress::Progress,
    push::{Finish, PushError, Pusher, Scope, SourceAccess},
    store::{ContentStore, ImageEvent, ImageRecord, StoreError},
};

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// How to reach the coordinator.
    pub coordinator: CoordinatorLink,
    /// Kubernetes node this agent runs on.
    pub node_name: String,
    /// Stable identity of this agent (its pod name).
    pub agent_id: String,
    /// Copies run at once.
    pub max_jobs: u32,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// How often progress of running jobs is reported.
    pub progress_interval: Duration,
    /// A copy still running after this long is stopped and reported failed.
    pub job_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("coordinator {endpoint} refused the session: {status}")]
    Refused { endpoint: String, status: Box<tonic::Status> },
    #[error("session with coordinator {endpoint} broke: {status}")]
    Broken { endpoint: String, status: Box<tonic::Status> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// How often running copies are logged at info.
const PROGRESS_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// Heartbeat period until the coordinator says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

struct RunningJob {
    task: tokio::task::AbortHandle,
    progress: Arc<Progress>,
    /// The attempt its reports carry; a newer assignment of the same copy
    /// (the coordinator took the job back, then gave it here again) moves it.
    attempt: Arc<AtomicU32>,
    digest: String,
    target: String,
    scope: Scope,
}

/// The node agent in daemon mode. Cheap to share; all state is behind locks.
pub struct Agent<S = ContainerdStore> {
    config: DaemonConfig,
    pusher: Pusher<S>,
    /// What no assignment can make this agent do.
    guard: Guard,
    jobs: Mutex<HashMap<String, RunningJob>>,
    /// Sender of the current session, if one is up.
    session: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    /// Results finished while no session was up, delivered on the next one.
    undelivered: Mutex<Vec<AgentMessage>>,
}

impl<S: ContentStore> Agent<S> {
    pub fn new(config: DaemonConfig, pusher: Pusher<S>, guard: Guard) -> Arc<Self> {
        Arc::new(Self {
            config,
            pusher,
            guard,
            jobs: Mutex::default(),
            session: Mutex::default(),
            undelivered: Mutex::default(),
        })
    }

    /// Runs sessions until `shutdown` resolves, reconnecting with jittered
    /// exponential backoff after each failure. A session is renewed before
    /// its token expires by opening the next one first, so no job is lost.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        // Jobs outlive sessions, not the agent: however `run` ends, even
        // dropped mid-way, no copy goes on pushing behind its back.
        let _jobs = StopJobsOnDrop(&self.jobs);
        let _pods = AbortOnDrop(vec![tokio::spawn({
            let agent = self.clone();
            async move { agent.guard.follow().await }
        })]);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(200);
        loop {
            let opened = tokio::select! {
                () = &mut shutdown => {
                    info!("shutting down");
                    return;
                }
                opened = self.clone().open() => opened,
            };
            match opened {
                Ok(mut session) => {
                    backoff = Duration::from_millis(200);
                    loop {
                        let renew = session.renew_in;
                        let step = tokio::select! {
                            () = &mut shutdown => {
                                info!("shutting down");
                                return;
                            }
                            ended = self.serve(&mut session) => Step::Ended(ended),
                            () = sleep_or_never(renew) => Step::Renew,
                        };
                        match step {
                            Step::Ended(Ok(())) => {
                                info!("coordinator closed the session; reconnecting");
                                break;
                            }
                            Step::Ended(Err(e)) => {
                                warn!(error = %e, retry_in = ?backoff, "coordinator session failed");
                                break;
                            }
                            // The next session registers before this one
                            // goes: the coordinator swaps them.
                            Step::Renew => match self.clone().open().await {
                                Ok(next) => {
                                    session = next;
                                    info!("session renewed with the current token");
                                }
                                Err(e) => {
                                    warn!(error = %e, "renewing the session failed; trying again in 30s");
                                    session.renew_in = Some(Duration::from_secs(30));
                                }
                            },
                        }
                    }
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "coordinator session failed"),
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(self.config.reconnect_max);
        }
    }

    /// Opens a session: registers, reports the inventory, and makes it the
    /// one results go to.
    async fn open(self: Arc<Self>) -> Result<Session, SessionError> {
        let link = &self.config.coordinator;
        let token = link.token().await?;
        let channel = link.connect().await?;
        let (tx, rx) = mpsc::channel(256);
        // Registration and the full inventory are queued before the call, so
        // the coordinator never sees an anonymous session; the channel holds
        // them until the call starts reading it. Jobs with a result not yet
        // delivered count as running: their results are still to come.
        let mut running: Vec<String> = lock(&self.jobs).keys().cloned().collect();
        running.extend(lock(&self.undelivered).iter().filter_map(result_job).map(str::to_string));
        let _ = tx.send(message(agent_message::Message::Register(self.register(running)))).await;
        // Changes of what is in use from here on are told (see follow_use).
        let use_changes = self.guard.in_use().subscribe();
        let inventory = self.full_inventory().await?;
        let told: HashMap<String, bool> = inventory.added.iter().map(|i| (i.name.clone(), i.in_use)).collect();
        let _ = tx.send(message(agent_message::Message::Inventory(inventory))).await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let renew_in = token.and_then(|token| {
            request.metadata_mut().insert("authorization", token.authorization);
            token.renew_in
        });
        let endpoint = link.endpoint().to_string();
        let replies = AgentServiceClient::new(channel)
            .session(request)
            .await
            .map_err(|status| SessionError::Refused { endpoint: endpoint.clone(), status: Box::new(status) })?
            .into_inner();
        *lock(&self.session) = Some(tx.clone());
        info!(coordinator = %endpoint, "session established");
        let undelivered = std::mem::take(&mut *lock(&self.undelivered));
        for result in undelivered {
            let _ = tx.send(result).await;
        }
        let heartbeat = Arc::new(Mutex::new(DEFAULT_HEARTBEAT));
        // Aborted with the session, however it ends (even dropped by a
        // shutdown): they hold the outbound stream open.
        let background = AbortOnDrop(vec![
            tokio::spawn(self.clone().heartbeats(tx.clone(), heartbeat.clone())),
            tokio::spawn(self.clone().report_progress(tx.clone())),
            tokio::spawn(self.clone().follow_images(tx.clone())),
            tokio::spawn(self.clone().follow_use(tx.clone(), told, use_changes)),
        ]);
        Ok(Session { replies, heartbeat, renew_in, endpoint, _background: background, tx })
    }

    /// Serves a session's assignments until either side goes away.
    async fn serve(self: &Arc<Self>, session: &mut Session) -> Result<(), SessionError> {
        let result = loop {
            match session.replies.message().await {
                Ok(Some(reply)) => match reply.message {
                    Some(coordinator_message::Message::Registered(registered)) => {
                        if registered.heartbeat_interval_seconds > 0 {
                            *lock(&session.heartbeat) =
                                Duration::from_secs(registered.heartbeat_interval_seconds.into());
                        }
                        info!(coordinator_id = %registered.coordinator_id, "registered");
                    }
                    Some(coordinator_message::Message::Assignment(assignment)) => self.clone().start(assignment),
                    Some(coordinator_message::Message::Cancel(cancel)) => {
                        if let Some(job) = lock(&self.jobs).remove(&cancel.job_id) {
                            info!(job = %cancel.job_id, reason = %cancel.reason, "cancelling job");
                            job.task.abort();
                        }
                    }
                    None => debug!("empty message from coordinator"),
                },
                Ok(None) => break Ok(()),
                Err(status) => {
                    break Err(SessionError::Broken { endpoint: session.endpoint.clone(), status: Box::new(status) });
                }
            }
        };
        // Results go to the next session instead of a stream nobody reads.
        let mut current = lock(&self.session);
        if current.as_ref().is_some_and(|tx| tx.same_channel(&session.tx)) {
            *current = None;
        }
        result
    }

    fn register(&self, running_job_ids: Vec<String>) -> Register {
        Register {
            node_name: self.config.node_name.clone(),
            agent_id: self.config.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            platform: Some(node_platform()),
            max_concurrent_jobs: self.config.max_jobs,
            running_job_ids,
        }
    }

    async fn full_inventory(&self) -> Result<Inventory, StoreError> {
        let mut added = Vec::new();
        for record in self.pusher.store().list_images().await? {
            added.push(self.inventory_image(record).await);
        }
        Ok(Inventory { full: true, added, removed: Vec::new() })
    }

    /// An image as the coordinator needs to know it; for an index, which
    /// platform manifests this node actually holds.
    async fn inventory_image(&self, record: ImageRecord) -> InventoryImage {
        let (mut manifests, mut present_manifests) = (Vec::new(), Vec::new());
        match self.pusher.index_content(&record.target).await {
            Ok(Some(index)) => {
                for (child, whole) in index.children {
                    let manifest = ProtoPlatformManifest {
                        platform: Some(to_proto_platform(&child.platform)),
                        digest: child.digest().to_string(),
                        attestation: child.attestation,
                    };
                    if whole {
                        present_manifests.push(manifest.clone());
                    }
                    manifests.push(manifest);
                }
            }
            Ok(None) => {}
            Err(e) => warn!(image = %record.name, error = %e, "could not read the image's index"),
        }
        InventoryImage {
            in_use: self.guard.in_use().runs(&record.target.digest),
            name: record.name,
            digest: record.target.digest,
            media_type: record.target.media_type,
            present_manifests,
            manifests,
        }
    }

    async fn heartbeats(self: Arc<Self>, tx: mpsc::Sender<AgentMessage>, period: Arc<Mutex<Duration>>) {
        loop {
            let wait = *lock(&period);
            tokio::time::sleep(wait).await;
            let running_job_ids = lock(&self.jobs).keys().cloned().collect();
            let beat = Heartbeat { sent_at: Some(std::time::SystemTime::now().into()), running_job_ids };
            if tx.send(message(agent_message::Message::Heartbeat(beat))).await.is_err() {
                return;
            }
        }
    }

    async fn report_progress(self: Arc<Self>, tx: mpsc::Sender<AgentMessage>) {
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

    /// Keeps the coordinator's view of this node's images current.
    async fn follow_images(self: Arc<Self>, tx: mpsc::Sender<AgentMessage>) {
        let events = match self.pusher.store().image_events().await {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "cannot follow containerd's image events; the inventory refreshes only per session");
                return;
            }
        };
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            let inventory = match event {
                Ok(ImageEvent::Upserted(name)) => match self.pusher.store().image(&name).await {
                    Ok(Some(record)) => {
                        Inventory { full: false, added: vec![self.inventory_image(record).await], removed: Vec::new() }
                    }
                    Ok(None) => Inventory { full: false, added: Vec::new(), removed: vec![name] },
                    Err(e) => {
                        warn!(image = %name, error = %e, "could not read a new image");
                        continue;
                    }
                },
                Ok(ImageEvent::Deleted(name)) => Inventory { full: false, added: Vec::new(), removed: vec![name] },
                Err(e) => {
                    warn!(error = %e, "containerd's event stream failed");
                    return;
                }
            };
            if tx.send(message(agent_message::Message::Inventory(inventory))).await.is_err() {
                return;
            }
        }
    }

    /// Tells the coordinator which images came into use on this node, or
    /// went out of it, as its pods change.
    async fn follow_use(
        self: Arc<Self>,
        tx: mpsc::Sender<AgentMessage>,
        mut sent: HashMap<String, bool>,
        mut changes: tokio::sync::watch::Receiver<u64>,
    ) {
        loop {
            let Ok(records) = self.pusher.store().list_images().await else { return };
            let mut changed = Vec::new();
            for record in records {
                let in_use = self.guard.in_use().runs(&record.target.digest);
                // An image listed since (by follow_images) was told as it
                // was then; telling it again is harmless, missing a change not.
                if sent.insert(record.name.clone(), in_use).unwrap_or(false) != in_use {
                    changed.push(self.inventory_image(record).await);
                }
            }
            if !changed.is_empty() {
                let inventory = Inventory { full: false, added: changed, removed: Vec::new() };
                if tx.send(message(agent_message::Message::Inventory(inventory))).await.is_err() {
                    return;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// Starts an assigned copy unless it is running already (a coordinator
    /// that restarted may assign it again: the running copy then answers for
    /// the new attempt) or the agent is full. A running copy of another
    /// digest under the same job is obsolete and stops.
    fn start(self: Arc<Self>, assignment: Assignment) {
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

/// An open session with the coordinator.
struct Session {
    replies: tonic::Streaming<CoordinatorMessage>,
    heartbeat: Arc<Mutex<Duration>>,
    /// When to open the next one (the token's renewal time).
    renew_in: Option<Duration>,
    endpoint: String,
    tx: mpsc::Sender<AgentMessage>,
    _background: AbortOnDrop,
}

/// What ended a wait on a session.
enum Step {
    Ended(Result<(), SessionError>),
    Renew,
}

async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// The job a queued result message is about.
fn result_job(message: &AgentMessage) -> Option<&str> {
    match &message.message {
        Some(agent_message::Message::Result(result)) => Some(&result.job_id),
        _ => None,
    }
}

/// Aborts every running job when dropped.
struct StopJobsOnDrop<'a>(&'a Mutex<HashMap<String, RunningJob>>);

impl Drop for StopJobsOnDrop<'_> {
    fn drop(&mut self) {
        for (_, job) in lock(self.0).drain() {
            job.task.abort();
        }
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
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

fn message(message: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(message) }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// This node's platform in OCI terms (Go's GOOS/GOARCH names).
pub fn node_platform() -> ProtoPlatform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ProtoPlatform { os: std::env::consts::OS.into(), architecture: architecture.into(), variant: String::new() }
}

fn to_proto_platform(p: &PlatformName) -> ProtoPlatform {
    let (os, architecture, variant) = p.parts();
    ProtoPlatform { os: os.into(), architecture: architecture.into(), variant: variant.into() }
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
