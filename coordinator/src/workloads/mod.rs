//! The workload reconciler: once a Deployment or DaemonSet is fully rolled
//! out, make sure each of its images has an ImageBackup, and when all of
//! them are Completed, patch the workload to the pinned backups; then follow
//! the rollout that starts, and undo it if it fails.

pub mod context;
mod creating;
pub mod digests;
mod ensure;
mod follow;
pub mod open_backups;
pub mod owners;
pub mod pullable;
pub mod rollout;
pub mod usage;
pub mod wakers;
pub mod workload;

pub use context::Context;
pub use wakers::Wakers;

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    sync::Arc,
    time::Duration,
};

use image_backup_core::template::{
    HOLD_ANNOTATION, HoldReason, REWRITE_ANNOTATION, Record, RewriteError, Template, backup_patch, reverted_containers,
};
use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::ImageRef;
use k8s_openapi::{
    api::apps::v1::{DaemonSet, Deployment},
    jiff::Timestamp,
};
use kube::{
    Resource, ResourceExt,
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use tracing::{debug, info, instrument, warn};

use crate::error::{Error, kube_err};
use ensure::{Backup, backup_for};
use rollout::{Slot, Wake};
use usage::{Use, WorkloadKey};
use workload::{Patched, Workload};

/// How soon a workload reconciled before the caches synced looks again.
const SYNC_RETRY: Duration = Duration::from_millis(200);

/// How soon a workload looks again when the backup registry could not say
/// whether its pods can pull.
const PULL_CHECK_RETRY: Duration = Duration::from_secs(30);

/// How soon a workload whose pods report no digest yet looks again.
const DIGEST_RETRY: Duration = Duration::from_secs(2);

pub async fn reconcile_deployment(object: Arc<Deployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile(Workload::Deployment((*object).clone()), ctx).await
}

pub async fn reconcile_daemonset(object: Arc<DaemonSet>, ctx: Arc<Context>) -> Result<Action, Error> {
    reconcile(Workload::DaemonSet((*object).clone()), ctx).await
}

/// What keeps a workload from being patched now.
enum Waiting {
    /// Its ImageBackups: their changes wake it.
    Backups,
    /// Its pods' statuses: nothing wakes it, so it looks again soon.
    Pods,
}

#[instrument(skip_all, fields(workload = %workload.key()))]
async fn reconcile(workload: Workload, ctx: Arc<Context>) -> Result<Action, Error> {
    // Decisions below read the ImageBackups: from a store that has them
    // all, not one still filling after a start (each miss is a create).
    if !ctx.synced() {
        return Ok(Action::requeue(SYNC_RETRY));
    }
    // A coordinator that stepped down patches nothing and takes no
    // rollout slot: the next leader decides.
    if !ctx.fence.up() {
        return Ok(Action::await_change());
    }
    let _timer = ctx.metrics.reconcile_started(workload.kind());
    let key = workload.key();
    // Released when this reconcile ends, unless a rollout holds it.
    let mut slot = ctx.rollouts.slot(key.clone());
    if let Err(reason) = ctx.config.exclusions.check(&workload) {
        debug!(?reason, "excluded");
        if ctx.newly_excluded(&key) {
            forget(&ctx, &key);
        }
        return Ok(Action::await_change());
    }
    ctx.not_excluded(&key);
    let template = workload.template();
    let record = match Record::read(&template) {
        Ok(record) => record,
        Err(e) => {
            // Someone edited the coordinator's record by hand: nothing is
            // moved until it reads again.
            warn!(error = %e, "the coordinator's annotations cannot be read; leaving the workload as it is");
            ctx.event(&workload.object_ref(), EventType::Warning, "InvalidAnnotation", e.to_string()).await;
            return Ok(Action::await_change());
        }
    };
    let rolled_out = workload.rollout_complete();
    let mut images = Vec::new();
    // Backups the workload was patched to, by the source they stand for,
    // and the references it runs them by.
    let mut pinned = BTreeMap::new();
    let mut pinned_refs = BTreeSet::new();
    let mut pinned_sources = BTreeMap::new();
    let mut seen = HashSet::new();
    for container in &template.containers {
        if !seen.insert(container.image.clone()) {
            continue;
        }
        match ImageRef::parse(&container.image) {
            Ok(backup) if ctx.config.backup.holds(&backup) => {
                let source = record.originals.of(container.list, &container.name).and_then(|o| ImageRef::parse(o).ok());
                if let Some(source) = source.filter(|_| backup.digest().is_some()) {
                    let name = image_backup_crds::name_for(&source);
                    pinned.insert(name.clone(), Use::Pinned(container.image.clone()));
                    pinned_sources.insert(name, (source, container.image.clone()));
                    pinned_refs.insert(container.image.clone());
                }
            }
            Ok(source) => images.push((container, source)),
            Err(e) if rolled_out => {
                ctx.event(&workload.object_ref(), EventType::Warning, "InvalidImage", e.to_string()).await;
            }
            Err(_) => {}
        }
    }
    let reverted = reverted_containers(&template, &record);
    if !reverted.is_empty() {
        return follow::reverted(&ctx, &workload, &record, &reverted).await;
    }
    if let Some(why) = follow::lost_backup(&ctx, &workload, &record) {
        let names: Vec<String> = pinned.keys().cloned().collect();
        return follow::undo(&ctx, &workload, HoldReason::BackupLost, &why, &names).await;
    }
    // A pinned backup whose ImageBackup was deleted by hand gets one again,
    // from the digest the workload runs: it is re-verified, and copied
    // again only if the registry lacks it.
    for (name, (source, image)) in &pinned_sources {
        if ctx.backups.get(&ObjectRef::new(name)).is_none()
            && let Some((_, digest)) = image.rsplit_once('@')
        {
            ensure::create(&ctx, name, source, digest, &key).await?;
        }
    }
    if let Some(started) = record.rewritten_at {
        let names: Vec<String> = pinned.keys().cloned().collect();
        ctx.usage.set(&key, pinned.clone());
        let sources: Vec<ImageRef> = pinned_sources.values().map(|(source, _)| source.clone()).collect();
        let moved = follow::Moved { pinned: &pinned_refs, backups: &names, sources: &sources };
        if let Some(action) = follow::rollout(&ctx, &workload, started, &moved, &mut slot).await? {
            return Ok(action);
        }
    }
    if !rolled_out {
        // What it will run, with no digest yet: a workload moving to its
        // backups stops counting as a user of the content it ran.
        let runs = images.iter().map(|(_, s)| (image_backup_crds::name_for(s), Use::Runs(String::new())));
        ctx.usage.set(&key, pinned.into_iter().chain(runs).collect());
        debug!("rollout not complete");
        return Ok(Action::await_change());
    }
    // Digests of tagged images come from the pods.
    let tagged = images.iter().any(|(_, source)| source.digest().is_none());
    let pod_digests = if tagged { Some(ctx.digests.get(&ctx.client, &workload).await?) } else { None };
    let images: Vec<_> = images
        .into_iter()
        .map(|(container, source)| {
            let digest = match source.digest() {
                Some(digest) => Some(digest.to_string()),
                None => pod_digests.as_ref().and_then(|d| d.get(&container.name)).cloned(),
            };
            (container, source, digest)
        })
        .collect();
    let runs =
        images.iter().map(|(_, s, d)| (image_backup_crds::name_for(s), Use::Runs(d.clone().unwrap_or_default())));
    ctx.usage.set(&key, pinned.into_iter().chain(runs).collect());
    if ctx.config.refuse_private_images {
        let sources: Vec<ImageRef> = images.iter().map(|(_, source, _)| source.clone()).collect();
        let private = pullable::private_sources(&ctx, &workload, &sources).await?;
        if !private.is_empty() {
            // Anyone holding the backup registry's pull credentials could
            // pull what a tenant's own credentials kept private.
            let private: Vec<String> = private.iter().map(|s| s.to_string()).collect();
            let why = format!(
                "not backed up: its pods pull {} with a pull secret, and private images are refused (--refuse-private-images)",
                private.join(", ")
            );
            debug!(%why, "private images refused");
            ctx.metrics.patched("private_refused");
            ctx.event(&workload.object_ref(), EventType::Normal, "PrivateImagesNotBackedUp", why).await;
            return Ok(Action::await_change());
        }
    }

    let mut backups: BTreeMap<String, String> = BTreeMap::new();
    let mut names = Vec::new();
    let mut reduced = Vec::new();
    let mut waiting = None;
    for (container, source, digest) in &images {
        let Some(digest) = digest else {
            debug!(image = %source, "no pod reports the image's digest yet");
            waiting = Some(Waiting::Pods);
            continue;
        };
        match backup_for(&ctx, source, digest, &key).await? {
            Some(Backup { reference, left_out }) => {
                if !left_out.is_empty() {
                    reduced.push(format!("{} without {}", container.image, left_out.join(", ")));
                }
                backups.insert(container.image.clone(), reference);
                names.push(image_backup_crds::name_for(source));
            }
            None => {
                waiting.get_or_insert(Waiting::Backups);
            }
        }
    }
    match waiting {
        Some(Waiting::Pods) => return Ok(Action::requeue(DIGEST_RETRY)),
        Some(Waiting::Backups) => return Ok(Action::await_change()),
        None => {}
    }
    if backups.is_empty() {
        return Ok(Action::await_change());
    }
    if ctx.config.report_only {
        let message = format!(
            "report-only: every image is backed up; would move {} image(s) to {}",
            backups.len(),
            ctx.config.backup.registry
        );
        return Ok(leave(&ctx, &workload, &names, LeftAsIs { reason: "ReportOnly", message }).await);
    }
    if let Some(why) = left_as_is(&ctx, &workload, &template, &record) {
        return Ok(leave(&ctx, &workload, &names, why).await);
    }
    let references: Vec<ImageRef> = backups.values().filter_map(|r| ImageRef::parse(r).ok()).collect();
    let access = match pullable::check(&ctx, &workload, &references).await? {
        pullable::Verdict::Pullable(access) => access,
        pullable::Verdict::Refused(message) => {
            return Ok(leave(&ctx, &workload, &names, LeftAsIs { reason: "NotPullable", message }).await);
        }
        pullable::Verdict::Unknown(why) => {
            warn!(%why, "cannot tell now whether the pods could pull the backups; looking again soon");
            return Ok(Action::requeue(PULL_CHECK_RETRY));
        }
    };
    if !slot.take() {
        // Woken when a rollout in flight ends.
        debug!(limit = ctx.config.max_rollouts, "waiting for a rollout to end before starting another");
        ctx.metrics.patched("waiting_for_slot");
        return Ok(Action::await_change());
    }
    patch(&ctx, &workload, &template, &backups, &reduced, &access, &mut slot).await
}

/// Why a workload whose backups are all ready is not moved to them.
struct LeftAsIs {
    /// As Events and ImageBackup notes name it (`NotPullable`).
    reason: &'static str,
    message: String,
}

fn left_as_is(ctx: &Context, workload: &Workload, template: &Template, record: &Record) -> Option<LeftAsIs> {
    if let Some(hold) = record.hold.as_ref().filter(|hold| hold.holds(template)) {
        let message = format!(
            "held on its images ({}: {}); delete annotation {} to move it again",
            hold.reason.as_str(),
            hold.message,
            HOLD_ANNOTATION
        );
        return Some(LeftAsIs { reason: hold.reason.as_str(), message });
    }
    if record.rewrite == Some(false) {
        let message = format!("opted out by annotation {}", REWRITE_ANNOTATION);
        return Some(LeftAsIs { reason: "OptedOut", message });
    }
    if record.rewrite == Some(true) || ctx.config.rewrite_managed {
        return None;
    }
    owners::manager(workload, &ctx.config.managed_markers).map(|manager| LeftAsIs {
        reason: "Managed",
        message: format!(
            "{manager}, which would put its images back; backed up but not moved (annotate it {}=true to move it)",
            REWRITE_ANNOTATION
        ),
    })
}

/// Leaves the workload as it is, said once on each of its ImageBackups and
/// in an Event.
async fn leave(ctx: &Context, workload: &Workload, names: &[String], why: LeftAsIs) -> Action {
    ctx.metrics.patched(&crate::metrics::snake_case(why.reason));
    let mut new = false;
    for name in names {
        new |= follow::set_note(ctx, name, workload, why.reason, &why.message);
    }
    if new {
        info!(reason = why.reason, message = %why.message, "backed up; the workload is left as it is");
        ctx.event(&workload.object_ref(), EventType::Normal, "NotRewritten", why.message).await;
    }
    Action::await_change()
}

async fn patch(
    ctx: &Context,
    workload: &Workload,
    template: &Template,
    backups: &BTreeMap<String, String>,
    reduced: &[String],
    access: &pullable::Access,
    slot: &mut Slot<'_>,
) -> Result<Action, Error> {
    let key = workload.key();
    let secret = match access {
        pullable::Access::AsIs => None,
        pullable::Access::AddSecret(name) => Some(name.as_str()),
    };
    let patch = match backup_patch(template, backups, secret, Timestamp::now()) {
        Ok(patch) => patch,
        Err(RewriteError::Nothing { .. }) => {
            slot.release();
            return Ok(Action::await_change());
        }
        Err(e) => {
            slot.release();
            return Err(e.into());
        }
    };
    match workload.patch(&ctx.client, patch).await {
        Ok(Patched::Applied) => {
            slot.keep();
            ctx.metrics.patched("rewritten");
            info!(images = backups.len(), "workload moved to its backups; following its rollout");
            let note = format!("{} image(s) moved to backups in {}", backups.len(), ctx.config.backup.registry);
            ctx.event(&workload.object_ref(), EventType::Normal, "WorkloadRewritten", note).await;
            if !reduced.is_empty() {
                // Nodes of a left-out platform cannot run these: whoever
                // adds such a node must know before its pods fail to pull.
                let note =
                    format!("pinned to reduced indexes (platforms no node held are left out): {}", reduced.join("; "));
                ctx.event(&workload.object_ref(), EventType::Warning, "ReducedBackup", note).await;
            }
            Ok(Action::await_change())
        }
        // A `test` operation failed: the workload changed since it was
        // read. Never overwrite; its watch event brings the new version.
        Ok(Patched::Changed) => {
            slot.release();
            ctx.metrics.patched("changed_meanwhile");
            info!("workload changed meanwhile; reconsidering");
            Ok(Action::requeue(Duration::from_secs(1)))
        }
        Err(e) => {
            slot.release();
            Err(kube_err("patching workload", key.to_string())(e))
        }
    }
}

/// A workload the coordinator no longer looks after (excluded now): what
/// it used and what was noted about it go.
fn forget(ctx: &Context, key: &WorkloadKey) {
    follow::forget_notes(ctx, &key.to_string());
    ctx.usage.remove(key);
    ctx.digests.forget(key);
}

/// A deleted workload, as its watch reports it: forgotten, and its rollout
/// slot, if it held one, freed.
pub fn gone(ctx: &Context, key: &WorkloadKey) {
    forget(ctx, key);
    ctx.rollouts.forget(key);
    ctx.not_excluded(key);
}

/// A deleted ImageBackup, as the shared watch reports it: the workloads
/// that use it look again (and make a new one).
pub fn backup_deleted(ctx: &Context, name: &str) {
    ctx.creating.failed(name);
    for user in ctx.usage.workloads_of(name) {
        ctx.wakers.wake(&user);
    }
}

/// The workloads of `kind` to wake when an ImageBackup is finished (only
/// then can they act on it).
pub fn users_of<K>(ctx: &Context, backup: &ImageBackup, kind: &str) -> Vec<ObjectRef<K>>
where
    K: Resource<DynamicType = ()>,
{
    let finished = backup.status.as_ref().is_some_and(|s| matches!(s.phase, Phase::Completed | Phase::Failed));
    if !finished {
        return Vec::new();
    }
    ctx.usage
        .workloads_of(&backup.name_any())
        .into_iter()
        .filter(|w| w.kind == kind)
        .map(|w| ObjectRef::new(&w.name).within(&w.namespace))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use image_backup_crds::{ImageBackup, ImageBackupSpec, ImageBackupStatus, WorkloadNote};
    use serde_json::json;

    use super::*;
    use crate::{
        backups::notes::Pending,
        testing::{scripted, store, workloads_context as context},
        workloads::{usage::Usage, workload::tests::deployment},
    };

    /// An ImageBackup noting something about the test Deployment.
    fn noted() -> ImageBackup {
        let mut backup = ImageBackup::new(
            "nginx",
            ImageBackupSpec { source: "docker.io/library/nginx:1.25".into(), digest: "sha256:00".into() },
        );
        let note = WorkloadNote { workload: "Deployment/shop/web".into(), ..Default::default() };
        backup.status = Some(ImageBackupStatus { workloads: vec![note], ..Default::default() });
        backup
    }

    #[tokio::test]
    async fn an_excluded_workloads_notes_go_once_not_on_each_reconcile() {
        // No request is scripted: an excluded workload costs the API nothing.
        let (client, script) = scripted(vec![]);
        let ctx = context(client, &["--exclude-namespaces", "shop"], store(vec![noted()]), Arc::new(Usage::default()));
        ctx.mark_synced();
        let web = deployment(json!(null));
        reconcile(web.clone(), ctx.clone()).await.unwrap();
        assert!(matches!(ctx.notes.take("nginx").as_slice(), [Pending::Clear(w)] if w == "Deployment/shop/web"));
        reconcile(web, ctx.clone()).await.unwrap();
        assert!(ctx.notes.take("nginx").is_empty(), "looked for once");
        script.done().await;
    }
}
