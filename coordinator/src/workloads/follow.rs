//! After the patch: the rollout it started is followed until it completes,
//! and undone if its pods fail; a workload someone else moved back is held
//! where it is. Both leave their record on the workload and a note on the
//! ImageBackups concerned.

use std::{collections::BTreeSet, time::Duration};

use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::ImageRef;
use k8s_openapi::{api::core::v1::Pod, jiff::Timestamp};
use kube::{
    Api, ResourceExt,
    api::ListParams,
    core::Selector,
    runtime::{controller::Action, events::EventType, reflector::ObjectRef},
};
use tracing::{info, warn};

use image_backup_core::template::{HoldReason, Record, restore_patch, reverted_patch, settled_patch};

use super::{
    pullable,
    rollout::{Slot, Verdict, judge},
    workload::{Patched, Workload},
};
use crate::{
    backups::notes::{self, Pending},
    error::{Error, kube_err},
    workloads::context::Context,
};

/// How often a rollout in flight is looked at: its pods' pull failures
/// change no field of the workload, so no watch event tells of them.
const ROLLOUT_POLL: Duration = Duration::from_secs(5);

/// How often a rollout held on its backups (slow, its sources not
/// pullable) is looked at again: it may finish, or its sources come back.
const HELD_RECHECK: Duration = Duration::from_secs(60);

/// What a rewrite moved: the backup references it pinned, their
/// ImageBackups, and the sources they stand for.
pub struct Moved<'a> {
    pub pinned: &'a BTreeSet<String>,
    pub backups: &'a [String],
    pub sources: &'a [ImageRef],
}

/// Follows the rollout the coordinator started at `started` to what
/// `moved` names; `None` when the reconcile goes on as usual.
pub async fn rollout(
    ctx: &Context,
    workload: &Workload,
    started: Timestamp,
    moved: &Moved<'_>,
    slot: &mut Slot<'_>,
) -> Result<Option<Action>, Error> {
    let Moved { pinned, backups, sources } = *moved;
    let elapsed = Duration::try_from(Timestamp::now().duration_since(started)).unwrap_or_default();
    let verdict = if pinned.is_empty() || workload.rollout_complete() {
        // Done, or nothing it moved runs a backup now: nothing to follow.
        Verdict::Done
    } else if !workload.generation_observed() {
        // Its controller has not made the new pods yet: none to look at.
        judge(workload, &[], pinned, elapsed, ctx.config.rollout_timeout)
    } else {
        let pods = pods_of(ctx, workload).await?;
        judge(workload, &pods, pinned, elapsed, ctx.config.rollout_timeout)
    };
    match verdict {
        Verdict::Rolling => {
            slot.keep();
            Ok(Some(Action::requeue(ROLLOUT_POLL)))
        }
        Verdict::Done => {
            let Some(patch) = settled_patch(&workload.template()) else { return Ok(None) };
            workload
                .patch(&ctx.client, patch)
                .await
                .map_err(kube_err("settling workload", workload.key().to_string()))?;
            if !pinned.is_empty() {
                info!(seconds = elapsed.as_secs(), "rollout to the backups complete");
            }
            for name in backups {
                clear_note(ctx, name, workload);
            }
            Ok(Some(Action::await_change()))
        }
        Verdict::Failed(why) => undo(ctx, workload, HoldReason::RolloutFailed, &why, backups).await.map(Some),
        // Nothing says the backups are at fault: moving back is worth it
        // only to a source the pods can pull, or it turns a slow rollout
        // into a broken one exactly when the source is gone.
        Verdict::Slow(why) => match pullable::sources(ctx, workload, sources).await? {
            Ok(()) => undo(ctx, workload, HoldReason::RolloutFailed, &why, backups).await.map(Some),
            Err(unpullable) => {
                let why = format!("{why}, but {unpullable}: the workload stays on its backups");
                let mut new = false;
                for name in backups {
                    new |= set_note(ctx, name, workload, HELD_ON_BACKUP, &why);
                }
                if new {
                    warn!(why, "rollout slow and the source unpullable; holding the workload on its backups");
                    ctx.event(&workload.object_ref(), EventType::Warning, HELD_ON_BACKUP, why).await;
                }
                // Its slot goes to the next workload; this one is looked
                // at again, and moved back if its source returns.
                Ok(Some(Action::requeue(HELD_RECHECK)))
            }
        },
    }
}

/// Why a workload whose rollout is slow stays on its backups (Event
/// reason, and the note on its ImageBackups).
pub const HELD_ON_BACKUP: &str = "HeldOnBackup";

/// Moves the workload back to its original images, for `reason`, and says
/// so on the workload and its ImageBackups.
pub async fn undo(
    ctx: &Context,
    workload: &Workload,
    reason: HoldReason,
    why: &str,
    backups: &[String],
) -> Result<Action, Error> {
    let on_backup = |image: &str| ctx.config.backup.holds_reference(image);
    let Some(restore) = restore_patch(&workload.template(), on_backup, reason, why)? else {
        return Ok(Action::await_change());
    };
    match workload.patch(&ctx.client, restore.patch).await {
        Ok(Patched::Applied) => {
            ctx.metrics.restored(reason.as_str());
            warn!(reason = reason.as_str(), why, moved = ?restore.moves, "moved back to the original images");
            let note = format!("{why}; moved back to the original images: {}", restore.moves.join(", "));
            ctx.event(&workload.object_ref(), EventType::Warning, reason.as_str(), note).await;
            for name in backups {
                set_note(ctx, name, workload, reason.as_str(), why);
            }
            Ok(Action::await_change())
        }
        Ok(Patched::Changed) => Ok(Action::requeue(Duration::from_secs(1))),
        Err(e) => Err(kube_err("restoring workload", workload.key().to_string())(e)),
    }
}

/// Someone put `containers` back on their source images: recorded and
/// held, never fought.
pub async fn reverted(
    ctx: &Context,
    workload: &Workload,
    record: &Record,
    containers: &[String],
) -> Result<Action, Error> {
    let why = format!(
        "container(s) {} were moved back to their source images by someone else (a rollback, a redeploy); \
         the coordinator leaves the workload as it is until its images change",
        containers.join(", ")
    );
    let patch = reverted_patch(&workload.template(), containers, &why)?;
    match workload.patch(&ctx.client, patch).await {
        Ok(Patched::Applied) => {
            warn!(?containers, "the workload was moved back to its source images; holding it there");
            ctx.event(&workload.object_ref(), EventType::Warning, "RewriteReverted", why.clone()).await;
            for container in workload.container_images().iter().filter(|c| containers.contains(&c.name)) {
                let source = record.originals.of(container.list, &container.name);
                if let Some(source) = source.and_then(|s| image_backup_oci::ImageRef::parse(s).ok()) {
                    set_note(ctx, &image_backup_crds::name_for(&source), workload, HoldReason::Reverted.as_str(), &why);
                }
            }
            Ok(Action::await_change())
        }
        Ok(Patched::Changed) => Ok(Action::requeue(Duration::from_secs(1))),
        Err(e) => Err(kube_err("holding workload", workload.key().to_string())(e)),
    }
}

/// Why the workload must leave its backups: one it is pinned to is gone
/// from the registry and its ImageBackup could not copy it again.
pub fn lost_backup(ctx: &Context, workload: &Workload, record: &Record) -> Option<String> {
    workload.container_images().into_iter().find_map(|container| {
        let source = record.originals.of(container.list, &container.name)?;
        let source = image_backup_oci::ImageRef::parse(source).ok()?;
        let backup = ctx.backups.get(&ObjectRef::<ImageBackup>::new(&image_backup_crds::name_for(&source)))?;
        let status = backup.status.as_ref()?;
        let lost = status.phase == Phase::Failed
            && status.lost_at.is_some()
            && status.backup_reference.as_deref() == Some(container.image.as_str());
        lost.then(|| {
            format!(
                "its backup {} is gone from the registry and could not be copied again ({})",
                container.image,
                status.last_error.as_deref().unwrap_or("no node holds it and the source cannot provide it")
            )
        })
    })
}

/// Queues a note on ImageBackup `name` about `workload`, unless it holds
/// the same already; whether it was new.
pub fn set_note(ctx: &Context, name: &str, workload: &Workload, reason: &str, message: &str) -> bool {
    let note = notes::note(workload.key().to_string(), reason, message.to_string());
    let status = ctx.backups.get(&ObjectRef::<ImageBackup>::new(name)).and_then(|b| b.status.clone());
    if notes::has(status.as_ref(), &note) {
        return false;
    }
    ctx.notes.push(name, Pending::Set(note));
    ctx.backup_waker.wake(name);
    true
}

/// Drops the note about `workload` from ImageBackup `name`, if it has one.
pub fn clear_note(ctx: &Context, name: &str, workload: &Workload) {
    let key = workload.key().to_string();
    let status = ctx.backups.get(&ObjectRef::<ImageBackup>::new(name)).and_then(|b| b.status.clone());
    if status.is_some_and(|s| s.workloads.iter().any(|n| n.workload == key)) {
        ctx.notes.push(name, Pending::Clear(key));
        ctx.backup_waker.wake(name);
    }
}

/// Drops the notes about `workload` (deleted, or excluded now) from every
/// ImageBackup that has one: nothing else would, as the note of a workload
/// that still exists goes when its rollout to the backups completes.
pub fn forget_notes(ctx: &Context, workload: &str) {
    for backup in ctx.backups.state() {
        let about = backup.status.as_ref().is_some_and(|s| s.workloads.iter().any(|n| n.workload == workload));
        if about {
            let name = backup.name_any();
            ctx.notes.push(&name, Pending::Clear(workload.to_string()));
            ctx.backup_waker.wake(&name);
        }
    }
}

/// The pods the workload's selector matches, of every revision.
async fn pods_of(ctx: &Context, workload: &Workload) -> Result<Vec<Pod>, Error> {
    let Ok(selector) = Selector::try_from(workload.selector().clone()) else { return Ok(Vec::new()) };
    let api = Api::<Pod>::namespaced(ctx.client.clone(), workload.namespace());
    let list = api
        .list(&ListParams::default().labels_from(&selector))
        .await
        .map_err(kube_err("listing pods of", workload.key().to_string()))?;
    Ok(list.items)
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use http::{Method, StatusCode};
    use image_backup_oci::ImageRef;
    use k8s_openapi::jiff::Timestamp;
    use serde_json::{Value, json};

    use super::*;
    use crate::{
        testing::{Exchange, config, scripted, store, workloads_context as context},
        workloads::{usage::Usage, workload::tests::deployment},
    };
    use image_backup_core::template::backup_patch;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
    const PATCH_PATH: &str = "/apis/apps/v1/namespaces/shop/deployments/web?&fieldManager=image-backup-coordinator";

    /// The test Deployment as the coordinator moved it: `nginx:1.25` on
    /// its backup.
    fn moved() -> (Workload, String) {
        let source = ImageRef::parse("nginx:1.25").unwrap();
        let pinned = config(&[]).backup.reference_for(&source).unwrap().pinned(DIGEST).to_string();
        let workload = deployment(json!(null));
        let backups = BTreeMap::from([("nginx:1.25".to_string(), pinned.clone())]);
        let patch = backup_patch(&workload.template(), &backups, None, Timestamp::now()).unwrap();
        let Workload::Deployment(d) = &workload else { unreachable!() };
        let mut doc = serde_json::to_value(d).unwrap();
        json_patch::patch(&mut doc, &patch).unwrap();
        (Workload::Deployment(serde_json::from_value(doc).unwrap()), pinned)
    }

    /// The image the JSON patch `body` puts in the `web` container.
    fn web_image(body: &Value) -> Option<&str> {
        let ops = body.as_array()?;
        ops.iter()
            .find(|op| op["op"] == "replace" && op["path"] == "/spec/template/spec/containers/0/image")
            .and_then(|op| op["value"].as_str())
    }

    #[tokio::test]
    async fn a_failed_rollout_goes_back_to_the_sources_and_says_why() {
        let (workload, pinned) = moved();
        let patch = Exchange::new(Method::PATCH, PATCH_PATH, StatusCode::OK, json!({})).checking(move |body| {
            assert_eq!(web_image(body), Some("nginx:1.25"), "{body}");
            // Guarded: applied only to the workload as it was read.
            let tests: Vec<&Value> = body.as_array().unwrap().iter().filter(|op| op["op"] == "test").collect();
            assert!(tests.iter().any(|op| op["value"] == pinned.as_str()), "{body}");
        });
        let event = Exchange::new(
            Method::POST,
            "/apis/events.k8s.io/v1/namespaces/shop/events?",
            StatusCode::CREATED,
            json!({}),
        )
        .checking(|body| {
            assert_eq!((body["reason"].as_str(), body["type"].as_str()), (Some("RolloutFailed"), Some("Warning")));
            let note = body["note"].as_str().unwrap();
            assert!(
                note.starts_with("pod web-2: ImagePullBackOff; moved back to the original images: web: "),
                "{note}"
            );
        });
        let (client, script) = scripted(vec![patch, event]);
        let ctx = context(client, &[], store(Vec::new()), Arc::new(Usage::default()));
        let backups = ["nginx-backup".to_string()];
        let action = undo(&ctx, &workload, HoldReason::RolloutFailed, "pod web-2: ImagePullBackOff", &backups).await;
        assert_eq!(action.unwrap(), Action::await_change());
        script.done().await;
        let queued = ctx.notes.take("nginx-backup");
        assert!(matches!(queued.as_slice(), [Pending::Set(note)] if note.reason == "RolloutFailed"), "{queued:?}");
    }

    #[tokio::test]
    async fn a_workload_changed_meanwhile_is_looked_at_again_not_overwritten() {
        let (workload, _) = moved();
        let invalid = json!({ "kind": "Status", "apiVersion": "v1", "status": "Failure", "reason": "Invalid", "code": 422, "message": "the test operation failed" });
        let refused = Exchange::new(Method::PATCH, PATCH_PATH, StatusCode::UNPROCESSABLE_ENTITY, invalid);
        let (client, script) = scripted(vec![refused]);
        let ctx = context(client, &[], store(Vec::new()), Arc::new(Usage::default()));
        let backups = ["nginx-backup".to_string()];
        let action = undo(&ctx, &workload, HoldReason::RolloutFailed, "why", &backups).await;
        assert_eq!(action.unwrap(), Action::requeue(Duration::from_secs(1)));
        script.done().await;
        assert!(ctx.notes.take("nginx-backup").is_empty(), "nothing said of a move that did not happen");
    }
}
