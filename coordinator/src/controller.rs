//! The reconcilers. Workloads: once a Deployment or DaemonSet is fully
//! rolled out, make sure each of its images has an ImageBackup, and when
//! all of them are Completed, patch the workload to the pinned backups.
//! ImageBackups: assign Pending jobs to an agent on a node that holds the
//! digest, and follow what the agents report until the coordinator itself
//! has seen the manifest in the backup registry.
//!
//! All durable state is in the API server (ImageBackup status, workload
//! annotations); a restarted coordinator picks up from there.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Duration,
};

use futures::StreamExt;
use image_backup_crds::{ImageBackup, ImageBackupSpec, Phase};
use image_backup_oci::{
    ImageRef,
    registry::{Registry, RegistryError},
};
use image_backup_proto::v1::{Assignment, JobResult, job_result};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{ObjectReference, Pod},
    },
    apimachinery::pkg::apis::meta::v1::LabelSelector,
};
use kube::{
    Api, Client, Resource, ResourceExt,
    api::{ListParams, Patch, PatchParams, PostParams},
    runtime::{
        controller::Action,
        events::{Event, EventType, Recorder, Reporter},
    },
};
use serde_json::json;
use tracing::{debug, info, warn};

use crate::{
    agents::{AgentEvent, AgentHub},
    config::CoordinatorConfig,
    jobs::JobBoard,
    metrics::Metrics,
    rewrite::{RewriteError, backup_patch},
    workload::Workload,
};

/// Name the coordinator writes under (field manager, event reporter).
pub const MANAGER: &str = "image-backup-coordinator";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("{action} {object}: {source}")]
    Kube { action: &'static str, object: String, source: kube::Error },
    #[error(transparent)]
    Rewrite(#[from] RewriteError),
    #[error("backup registry: {0}")]
    Registry(#[from] RegistryError),
}

fn kube_err(action: &'static str, object: impl Into<String>) -> impl FnOnce(kube::Error) -> ReconcileError {
    let object = object.into();
    move |source| ReconcileError::Kube { action, object, source }
}

/// What every reconcile shares.
pub struct Context {
    pub client: Client,
    pub config: CoordinatorConfig,
    pub hub: Arc<AgentHub>,
    pub board: Arc<JobBoard>,
    pub registry: Registry,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
}

impl Context {
    pub fn new(
        client: Client,
        config: CoordinatorConfig,
        hub: Arc<AgentHub>,
        board: Arc<JobBoard>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, RegistryError> {
        let registry = Registry::new(&config.backup.registry, &config.registry)?;
        let recorder = Recorder::new(client.clone(), Reporter { controller: MANAGER.into(), instance: None });
        Ok(Arc::new(Self { client, config, hub, board, registry, recorder, metrics }))
    }

    fn backups(&self) -> Api<ImageBackup> {
        Api::all(self.client.clone())
    }

    async fn event(&self, object: ObjectReference, type_: EventType, reason: &str, note: String) {
        let event = Event { type_, reason: reason.into(), note: Some(note), action: reason.into(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &object).await {
            warn!(reason, error = %e, "could not record an event");
        }
    }

    /// Merge-patches an ImageBackup's status subresource.
    async fn set_status(&self, name: &str, status: serde_json::Value) -> Result<ImageBackup, ReconcileError> {
        self.backups()
            .patch_status(name, &PatchParams::default(), &Patch::Merge(json!({ "status": status })))
            .await
            .map_err(kube_err("patching status of ImageBackup", name))
    }
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

// ---------------------------------------------------------------- workloads

pub async fn reconcile_deployment(object: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    reconcile_workload(Workload::Deployment((*object).clone()), ctx).await
}

pub async fn reconcile_daemonset(object: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    reconcile_workload(Workload::DaemonSet((*object).clone()), ctx).await
}

async fn reconcile_workload(workload: Workload, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    let key = workload.key();
    if let Err(reason) = ctx.config.exclusions.check(&workload) {
        debug!(workload = %key, ?reason, "excluded");
        return Ok(Action::await_change());
    }
    if !workload.rollout_complete() {
        debug!(workload = %key, "rollout not complete");
        return Ok(Action::await_change());
    }
    let mut backups: BTreeMap<String, String> = BTreeMap::new();
    let mut waiting = false;
    let mut pod_digests: Option<HashMap<String, String>> = None;
    let mut seen = std::collections::HashSet::new();
    for container in workload.container_images() {
        if !seen.insert(container.image.clone()) {
            continue;
        }
        let source = match ImageRef::parse(&container.image) {
            Ok(source) => source,
            Err(e) => {
                ctx.event(workload.object_ref(), EventType::Warning, "InvalidImage", e.to_string()).await;
                waiting = true;
                continue;
            }
        };
        if ctx.config.backup.holds(&source) {
            continue;
        }
        let name = image_backup_crds::name_for(&source);
        // The digest the pods run is the one to back up: a tag may have
        // moved since an ImageBackup for it was made.
        let digest = match source.digest() {
            Some(digest) => Some(digest.to_string()),
            None => {
                if pod_digests.is_none() {
                    pod_digests = Some(running_digests(&ctx.client, &workload).await?);
                }
                pod_digests.as_ref().and_then(|d| d.get(&container.name)).cloned()
            }
        };
        let Some(digest) = digest else {
            debug!(workload = %key, image = %source, "no pod reports the image's digest yet");
            waiting = true;
            continue;
        };
        let backup = match ctx.backups().get_opt(&name).await.map_err(kube_err("getting ImageBackup", &name))? {
            Some(backup) if backup.spec.digest != digest => {
                retarget(&ctx, &backup, &digest, &key).await?;
                waiting = true;
                continue;
            }
            Some(backup) => backup,
            None => create_backup(&ctx, &name, &source, &digest, &workload).await?,
        };
        let status = backup.status.clone().unwrap_or_default();
        if !status.workloads.contains(&key) {
            let mut workloads = status.workloads.clone();
            workloads.push(key.clone());
            workloads.sort();
            ctx.set_status(&name, json!({ "workloads": workloads })).await?;
        }
        match (status.phase, status.backup_reference) {
            (Phase::Completed, Some(reference)) => {
                backups.insert(container.image.clone(), reference);
            }
            _ => waiting = true,
        }
    }
    if waiting {
        // ImageBackup changes wake this workload up; the requeue covers
        // pods that have not reported their digests yet.
        return Ok(Action::requeue(Duration::from_secs(15)));
    }
    if backups.is_empty() {
        return Ok(Action::await_change());
    }
    if ctx.config.report_only {
        info!(workload = %key, images = backups.len(), "every image is backed up (report-only: workload left as is)");
        return Ok(Action::await_change());
    }
    let patch = match backup_patch(&workload, &backups) {
        Ok(patch) => patch,
        Err(RewriteError::Nothing { .. }) => return Ok(Action::await_change()),
        Err(e) => return Err(e.into()),
    };
    let params = PatchParams { field_manager: Some(MANAGER.into()), ..PatchParams::default() };
    let result = match &workload {
        Workload::Deployment(_) => Api::<Deployment>::namespaced(ctx.client.clone(), workload.namespace())
            .patch(workload.name(), &params, &Patch::<()>::Json(patch))
            .await
            .map(|_| ()),
        Workload::DaemonSet(_) => Api::<DaemonSet>::namespaced(ctx.client.clone(), workload.namespace())
            .patch(workload.name(), &params, &Patch::<()>::Json(patch))
            .await
            .map(|_| ()),
    };
    match result {
        Ok(()) => {
            ctx.metrics.patched("rewritten");
            info!(workload = %key, images = backups.len(), "workload now runs its backups");
            let note = format!("{} image(s) moved to backups in {}", backups.len(), ctx.config.backup.registry);
            ctx.event(workload.object_ref(), EventType::Normal, "WorkloadRewritten", note).await;
            Ok(Action::await_change())
        }
        // A `test` operation failed: the workload changed since it was
        // read. Never overwrite; look again at the new version.
        Err(kube::Error::Api(status)) if status.code == 422 || status.code == 409 => {
            ctx.metrics.patched("changed_meanwhile");
            info!(workload = %key, "workload changed meanwhile; reconsidering");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(e) => Err(ReconcileError::Kube { action: "patching workload", object: key, source: e }),
    }
}

/// Points an ImageBackup whose copy is finished at the digest the pods run
/// now (the tag moved), starting a new copy; one still in flight is left to
/// finish first.
async fn retarget(ctx: &Context, backup: &ImageBackup, digest: &str, workload: &str) -> Result<(), ReconcileError> {
    let name = backup.name_any();
    let phase = backup.status.as_ref().map(|s| s.phase).unwrap_or_default();
    // Listed, the workload is woken by this ImageBackup's changes.
    let mut workloads = backup.status.as_ref().map(|s| s.workloads.clone()).unwrap_or_default();
    if !workloads.iter().any(|w| w == workload) {
        workloads.push(workload.to_string());
        workloads.sort();
    }
    if !matches!(phase, Phase::Completed | Phase::Failed) {
        debug!(imagebackup = %name, "digest moved while a copy is in flight; waiting for it");
        ctx.set_status(&name, json!({ "workloads": workloads })).await?;
        return Ok(());
    }
    info!(imagebackup = %name, old = %backup.spec.digest, new = %digest, %workload, "the tag moved; copying the new digest");
    ctx.backups()
        .patch(&name, &PatchParams::default(), &Patch::Merge(json!({ "spec": { "digest": digest } })))
        .await
        .map_err(kube_err("retargeting ImageBackup", &name))?;
    ctx.set_status(
        &name,
        json!({
            "phase": "Pending",
            "attempts": 0,
            "backupReference": null,
            "bytesDone": 0,
            "progress": null,
            "lastError": null,
            "missingPlatforms": null,
            "workloads": workloads,
            "lastTransitionTime": now(),
        }),
    )
    .await?;
    Ok(())
}

async fn create_backup(
    ctx: &Context,
    name: &str,
    source: &ImageRef,
    digest: &str,
    workload: &Workload,
) -> Result<ImageBackup, ReconcileError> {
    let backup = ImageBackup::new(name, ImageBackupSpec { source: source.to_string(), digest: digest.into() });
    match ctx.backups().create(&PostParams { field_manager: Some(MANAGER.into()), ..Default::default() }, &backup).await
    {
        Ok(created) => {
            info!(imagebackup = %name, %source, %digest, workload = %workload.key(), "ImageBackup created");
            Ok(created)
        }
        // Another workload or event created it first: join it.
        Err(kube::Error::Api(status)) if status.code == 409 => {
            ctx.backups().get(name).await.map_err(kube_err("getting ImageBackup", name))
        }
        Err(e) => Err(ReconcileError::Kube { action: "creating ImageBackup", object: name.into(), source: e }),
    }
}

/// Digest each container of the workload's pods runs, from `imageID` in
/// their statuses (`repo@sha256:...`). Only the workload's own pods are
/// listed, through its selector.
async fn running_digests(client: &Client, workload: &Workload) -> Result<HashMap<String, String>, ReconcileError> {
    let selector = selector_string(workload.selector());
    let pods = Api::<Pod>::namespaced(client.clone(), workload.namespace())
        .list(&ListParams::default().labels(&selector))
        .await
        .map_err(kube_err("listing pods of", workload.key()))?;
    let mut digests = HashMap::new();
    for pod in pods {
        let Some(status) = pod.status else { continue };
        for container in
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten())
        {
            let digest = container.image_id.rsplit_once('@').map(|(_, d)| d.to_string());
            if let Some(digest) = digest.filter(|d| d.starts_with("sha256:")) {
                digests.entry(container.name.clone()).or_insert(digest);
            }
        }
    }
    Ok(digests)
}

fn selector_string(selector: &LabelSelector) -> String {
    let mut parts: Vec<String> = selector.match_labels.iter().flatten().map(|(k, v)| format!("{k}={v}")).collect();
    for expr in selector.match_expressions.iter().flatten() {
        let values = expr.values.clone().unwrap_or_default().join(",");
        parts.push(match expr.operator.as_str() {
            "In" => format!("{} in ({values})", expr.key),
            "NotIn" => format!("{} notin ({values})", expr.key),
            "Exists" => expr.key.clone(),
            _ => format!("!{}", expr.key),
        });
    }
    parts.join(",")
}

// ------------------------------------------------------------ image backups

pub async fn reconcile_backup(backup: Arc<ImageBackup>, ctx: Arc<Context>) -> Result<Action, ReconcileError> {
    ctx.board.upsert(&backup).await;
    let name = backup.name_any();
    let status = backup.status.clone().unwrap_or_default();
    match status.phase {
        Phase::Completed | Phase::Failed => Ok(Action::await_change()),
        Phase::Assigned | Phase::Pushing => {
            let agent = status.agent.as_deref().and_then(|id| ctx.hub.agents().into_iter().find(|a| a.agent_id == id));
            // A connected agent that no longer lists the job (it restarted)
            // has lost it too; the grace covers a result still on its way.
            let grace = ctx.config.heartbeat_deadline;
            let running = agent.as_ref().is_some_and(|a| a.running_jobs.contains(&name));
            if running || (agent.is_some() && since_transition(&status) < grace) {
                return Ok(Action::requeue(Duration::from_secs(30).min(grace)));
            }
            let message = format!(
                "agent {} on node {} lost the copy",
                status.agent.as_deref().unwrap_or("?"),
                status.node.as_deref().unwrap_or("?")
            );
            warn!(imagebackup = %name, "{message}");
            ctx.set_status(&name, json!({ "phase": "Pending", "lastError": message, "lastTransitionTime": now() }))
                .await?;
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Phase::Pending => {
            if status.attempts > 0 {
                let backoff = ctx.config.retry_backoff * 2u32.saturating_pow(status.attempts.saturating_sub(1).min(10));
                let since = since_transition(&status);
                if since < backoff {
                    return Ok(Action::requeue(backoff - since));
                }
            }
            let candidates = ctx.hub.candidates(&backup.spec.digest);
            let Some(agent) = candidates.first() else {
                let message = format!("no connected agent runs on a node that holds {}", backup.spec.digest);
                if status.last_error.as_deref() != Some(message.as_str()) {
                    ctx.set_status(&name, json!({ "phase": "Pending", "lastError": message })).await?;
                }
                return Ok(Action::requeue(Duration::from_secs(15)));
            };
            let source = ImageRef::parse(&backup.spec.source);
            let target = source.as_ref().ok().map(|s| ctx.config.backup.reference_for(s));
            let (Ok(_), Some(Ok(target))) = (&source, target) else {
                let message = format!("source {:?} is not a valid image reference", backup.spec.source);
                ctx.set_status(&name, json!({ "phase": "Failed", "lastError": message })).await?;
                ctx.event(backup.object_ref(&()), EventType::Warning, "BackupFailed", message).await;
                return Ok(Action::await_change());
            };
            let attempt = status.attempts + 1;
            let assignment = Assignment {
                job_id: name.clone(),
                source: backup.spec.source.clone(),
                digest: backup.spec.digest.clone(),
                target: target.to_string(),
                attempt,
                credentials_ref: String::new(),
            };
            if let Err(e) = ctx.hub.assign(&agent.agent_id, assignment) {
                debug!(imagebackup = %name, error = %e, "assignment not delivered");
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            ctx.set_status(
                &name,
                json!({
                    "phase": "Assigned",
                    "node": agent.node_name,
                    "agent": agent.agent_id,
                    "attempts": attempt,
                    "lastError": null,
                    "lastTransitionTime": now(),
                }),
            )
            .await?;
            let note =
                format!("copy of {} assigned to node {} (attempt {attempt})", backup.spec.source, agent.node_name);
            ctx.event(backup.object_ref(&()), EventType::Normal, "BackupStarted", note).await;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
    }
}

/// Time since the status last changed phase (forever when never).
fn since_transition(status: &image_backup_crds::ImageBackupStatus) -> Duration {
    status
        .last_transition_time
        .as_ref()
        .and_then(|t| k8s_openapi::jiff::Timestamp::now().duration_since(t.0).try_into().ok())
        .unwrap_or(Duration::MAX)
}

/// Applies what agents report to the ImageBackup statuses, until the hub
/// closes.
pub async fn follow_agents(ctx: Arc<Context>) {
    let mut events = ctx.hub.subscribe();
    loop {
        let event = match events.recv().await {
            Ok(event) => event,
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                warn!(missed, "agent events dropped; the periodic requeue catches up");
                continue;
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        let outcome = match event {
            AgentEvent::Progress { progress, .. } => {
                let pct = (progress.bytes_done * 100).checked_div(progress.bytes_total).unwrap_or(0);
                let text = format!(
                    "{pct}% {:.1}/{:.1} MB",
                    progress.bytes_done as f64 / 1e6,
                    progress.bytes_total as f64 / 1e6
                );
                ctx.set_status(
                    &progress.job_id,
                    json!({
                        "phase": "Pushing",
                        "bytesDone": progress.bytes_done,
                        "bytesTotal": progress.bytes_total,
                        "progress": text,
                    }),
                )
                .await
                .map(|_| ())
            }
            AgentEvent::Result { result, node, .. } => job_result(&ctx, result, &node).await,
            AgentEvent::Disconnected { running_jobs, node, .. } => {
                for job in running_jobs {
                    let message = format!("agent on node {node} disconnected during the copy");
                    let _ = ctx
                        .set_status(
                            &job,
                            json!({ "phase": "Pending", "lastError": message, "lastTransitionTime": now() }),
                        )
                        .await;
                }
                Ok(())
            }
            AgentEvent::Connected { .. } | AgentEvent::Inventory { .. } => Ok(()),
        };
        if let Err(e) = outcome {
            warn!(error = %e, "could not record an agent report");
        }
    }
}

async fn job_result(ctx: &Context, result: JobResult, node: &str) -> Result<(), ReconcileError> {
    let name = result.job_id.clone();
    let Some(backup) = ctx.backups().get_opt(&name).await.map_err(kube_err("getting ImageBackup", &name))? else {
        return Ok(());
    };
    let status = backup.status.clone().unwrap_or_default();
    let failure = match result.outcome {
        Some(job_result::Outcome::Success(success)) => {
            // The agent's word is not enough: the coordinator looks itself.
            match verify(ctx, &backup).await {
                Ok(pinned) => {
                    ctx.metrics.bytes_pushed.inc_by(success.bytes_uploaded);
                    ctx.metrics.push_seconds.observe(success.duration_seconds);
                    ctx.set_status(
                        &name,
                        json!({
                            "phase": "Completed",
                            "backupReference": pinned,
                            "bytesDone": status.bytes_total.max(success.bytes_uploaded),
                            "progress": "100%",
                            "lastError": null,
                            "missingPlatforms": null,
                            "lastTransitionTime": now(),
                        }),
                    )
                    .await?;
                    let note = format!("{} backed up as {pinned} from node {node}", backup.spec.source);
                    ctx.event(backup.object_ref(&()), EventType::Normal, "BackupCompleted", note).await;
                    return Ok(());
                }
                Err(message) => (message, true, Vec::new()),
            }
        }
        Some(job_result::Outcome::Failure(failure)) => {
            let missing: Vec<String> = failure
                .missing_platforms
                .iter()
                .map(|p| {
                    if p.variant.is_empty() {
                        format!("{}/{}", p.os, p.architecture)
                    } else {
                        format!("{}/{}/{}", p.os, p.architecture, p.variant)
                    }
                })
                .collect();
            (failure.message, failure.retryable, missing)
        }
        None => ("agent sent a result without an outcome".to_string(), true, Vec::new()),
    };
    let (message, retryable, missing) = failure;
    let final_failure = !retryable || status.attempts >= ctx.config.max_attempts;
    let phase = if final_failure { "Failed" } else { "Pending" };
    ctx.set_status(
        &name,
        json!({
            "phase": phase,
            "lastError": message,
            "missingPlatforms": if missing.is_empty() { serde_json::Value::Null } else { json!(missing) },
            "lastTransitionTime": now(),
        }),
    )
    .await?;
    if final_failure {
        let note = format!("{} after {} attempt(s): {message}", backup.spec.source, status.attempts);
        ctx.event(backup.object_ref(&()), EventType::Warning, "BackupFailed", note).await;
    }
    Ok(())
}

/// HEADs the backup in the registry; the pinned reference when it serves
/// the expected digest.
async fn verify(ctx: &Context, backup: &ImageBackup) -> Result<String, String> {
    let source = ImageRef::parse(&backup.spec.source).map_err(|e| e.to_string())?;
    let target = ctx.config.backup.reference_for(&source).map_err(|e| e.to_string())?;
    let expected = &backup.spec.digest;
    match ctx.registry.manifest_digest(target.repository(), expected).await {
        Ok(Some(digest)) if &digest == expected => Ok(target.pinned(expected)),
        Ok(other) => Err(format!(
            "agent reported success, but {} serves {} for {expected}",
            target.name(),
            other.as_deref().unwrap_or("nothing")
        )),
        Err(e) => Err(format!("verifying {}: {e}", target.pinned(expected))),
    }
}

/// Streams of ImageBackups to wake when the agents change: a Pending job
/// may now have a node that holds its digest.
pub fn agent_triggers(hub: &AgentHub) -> impl futures::Stream<Item = ()> + Send + 'static {
    tokio_stream::wrappers::BroadcastStream::new(hub.subscribe()).filter_map(|event| async move {
        match event {
            Ok(AgentEvent::Connected { .. } | AgentEvent::Inventory { .. } | AgentEvent::Disconnected { .. }) => {
                Some(())
            }
            _ => None,
        }
    })
}
