//! The patches applied to a Deployment as the API server holds it (JSON):
//! what they change, what they record, and what makes them fail whole.

use std::collections::BTreeMap;

use jiff::Timestamp;
use json_patch::Patch;
use serde_json::{Value, json};

use super::*;

const PINNED: &str = "backup.local/mirror/docker.io/library/nginx@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// A Deployment with an init container and two containers.
fn deployment() -> Value {
    json!({
        "metadata": { "name": "web", "namespace": "shop" },
        "spec": { "template": { "spec": {
            "initContainers": [{ "name": "migrate", "image": "quay.io/org/migrate:7" }],
            "containers": [
                { "name": "web", "image": "nginx:1.25" },
                { "name": "sidecar", "image": "docker.io/library/busybox:1.36" }
            ]
        } } }
    })
}

/// The template of a workload's JSON, as the coordinator reads it.
fn template(doc: &Value) -> Template {
    let spec = &doc["spec"]["template"]["spec"];
    let lists =
        [(ContainerList::InitContainers, &spec["initContainers"]), (ContainerList::Containers, &spec["containers"])];
    let containers = lists
        .into_iter()
        .flat_map(|(list, containers)| {
            containers.as_array().cloned().unwrap_or_default().into_iter().enumerate().map(move |(index, c)| {
                let text = |field: &str| c[field].as_str().unwrap().to_string();
                ContainerImage { list, index, name: text("name"), image: text("image") }
            })
        })
        .collect();
    Template {
        workload: "Deployment/shop/web".into(),
        containers,
        annotations: serde_json::from_value(doc["metadata"]["annotations"].clone()).unwrap(),
        pull_secrets: spec["imagePullSecrets"]
            .as_array()
            .map(|list| list.iter().map(|r| r["name"].as_str().unwrap().to_string()).collect()),
    }
}

fn apply(doc: &Value, patch: &Patch) -> Result<Value, json_patch::PatchError> {
    let mut doc = doc.clone();
    json_patch::patch(&mut doc, patch)?;
    Ok(doc)
}

fn annotated(annotations: Value) -> Value {
    let mut doc = deployment();
    doc["metadata"]["annotations"] = annotations;
    doc
}

fn nginx_on_backup() -> BTreeMap<String, String> {
    BTreeMap::from([("nginx:1.25".to_string(), PINNED.to_string())])
}

/// The deployment as the coordinator moved it: nginx on its backup.
fn rewritten() -> Value {
    let doc = deployment();
    apply(&doc, &backup_patch(&template(&doc), &nginx_on_backup(), None, Timestamp::now()).unwrap()).unwrap()
}

fn on_backup(image: &str) -> bool {
    image.starts_with("backup.local/mirror/")
}

// === the record ===

#[test]
fn reads_what_the_coordinator_wrote() {
    let hold = json!({ "reason": "RolloutFailed", "message": "ImagePullBackOff", "images": { "containers": { "web": "nginx:1.25" } } });
    let doc = annotated(json!({
        ORIGINAL_IMAGES_ANNOTATION: "{\"containers\":{\"web\":\"nginx:1.25\"}}",
        REWRITTEN_AT_ANNOTATION: "2026-11-26T10:00:00Z",
        HOLD_ANNOTATION: hold.to_string(),
        REWRITE_ANNOTATION: "True",
    }));
    let record = Record::read(&template(&doc)).unwrap();
    assert_eq!(record.originals.of(ContainerList::Containers, "web"), Some("nginx:1.25"));
    assert_eq!(record.rewritten_at, Some("2026-11-26T10:00:00Z".parse().unwrap()));
    let hold = record.hold.unwrap();
    assert_eq!(hold.reason, HoldReason::RolloutFailed);
    assert!(!hold.holds(&template(&doc)), "the workload runs three containers; the hold names one");
    assert_eq!(record.rewrite, Some(true));
}

#[test]
fn a_hold_lasts_while_the_images_are_the_same() {
    let doc = deployment();
    let images = OriginalImages::of_template(&template(&doc));
    let hold = Hold { reason: HoldReason::Reverted, message: String::new(), images };
    assert!(hold.holds(&template(&doc)));
    let mut moved = doc.clone();
    moved["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    assert!(!hold.holds(&template(&moved)), "a new version ends it");
}

#[test]
fn a_broken_annotation_names_itself() {
    let broken =
        [(HOLD_ANNOTATION, "{"), (ORIGINAL_IMAGES_ANNOTATION, "\"nginx\""), (REWRITTEN_AT_ANNOTATION, "yesterday")];
    for (annotation, text) in broken {
        let doc = annotated(json!({ annotation: text }));
        let error = Record::read(&template(&doc)).unwrap_err().to_string();
        assert!(error.starts_with("Deployment/shop/web: ") && error.contains(annotation), "{error}");
    }
}

// === the move to the backups ===

#[test]
fn patch_moves_containers_and_records_originals() {
    let doc = rewritten();
    assert_eq!(doc["spec"]["template"]["spec"]["containers"][0]["image"], PINNED);
    assert_eq!(doc["spec"]["template"]["spec"]["containers"][1]["image"], "docker.io/library/busybox:1.36");
    let record = Record::read(&template(&doc)).unwrap();
    assert_eq!(record.originals.containers, BTreeMap::from([("web".to_string(), "nginx:1.25".to_string())]));
    assert!(record.rewritten_at.is_some());
}

#[test]
fn a_version_deployed_since_a_rewrite_is_the_new_original() {
    let mut doc = rewritten();
    // Someone deploys nginx:1.27; it is backed up and moved in turn.
    doc["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    let backups = BTreeMap::from([("nginx:1.27".to_string(), PINNED.replace("0123", "4567"))]);
    let doc = apply(&doc, &backup_patch(&template(&doc), &backups, None, Timestamp::now()).unwrap()).unwrap();
    let record = Record::read(&template(&doc)).unwrap();
    assert_eq!(record.originals.containers["web"], "nginx:1.27");
}

#[test]
fn the_pull_secret_the_backups_need_is_added_once() {
    let doc = deployment();
    let patch = backup_patch(&template(&doc), &nginx_on_backup(), Some("backup-pull"), Timestamp::now()).unwrap();
    let doc = apply(&doc, &patch).unwrap();
    assert_eq!(doc["spec"]["template"]["spec"]["imagePullSecrets"], json!([{ "name": "backup-pull" }]));
    let init = BTreeMap::from([("quay.io/org/migrate:7".to_string(), PINNED.to_string())]);
    let patch = backup_patch(&template(&doc), &init, Some("backup-pull"), Timestamp::now()).unwrap();
    let doc = apply(&doc, &patch).unwrap();
    assert_eq!(doc["spec"]["template"]["spec"]["imagePullSecrets"].as_array().unwrap().len(), 1);
}

#[test]
fn a_hold_goes_with_the_next_move() {
    let doc = annotated(json!({ HOLD_ANNOTATION: "{\"reason\":\"Reverted\",\"message\":\"\",\"images\":{}}" }));
    let doc = apply(&doc, &backup_patch(&template(&doc), &nginx_on_backup(), None, Timestamp::now()).unwrap()).unwrap();
    assert!(Record::read(&template(&doc)).unwrap().hold.is_none());
}

#[test]
fn a_workload_changed_meanwhile_fails_the_whole_patch() {
    let doc = deployment();
    let patch = backup_patch(&template(&doc), &nginx_on_backup(), None, Timestamp::now()).unwrap();
    let mut changed = doc.clone();
    changed["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    assert!(apply(&changed, &patch).is_err());
    let mut renamed = doc;
    renamed["spec"]["template"]["spec"]["containers"][0]["name"] = json!("api");
    assert!(apply(&renamed, &patch).is_err());
}

#[test]
fn a_completed_rollout_leaves_no_time_behind() {
    let doc = rewritten();
    let settled = apply(&doc, &settled_patch(&template(&doc)).expect("a time to drop")).unwrap();
    let record = Record::read(&template(&settled)).unwrap();
    assert!(record.rewritten_at.is_none() && !record.originals.is_empty(), "{record:?}");
    assert!(settled_patch(&template(&settled)).is_none());
    // Moved again meanwhile: the time read is not the time there.
    let mut moved_again = doc.clone();
    moved_again["metadata"]["annotations"][REWRITTEN_AT_ANNOTATION] = json!("2030-01-01T00:00:00Z");
    assert!(apply(&moved_again, &settled_patch(&template(&doc)).unwrap()).is_err());
}

#[test]
fn nothing_to_rewrite_is_an_error_not_an_empty_patch() {
    let doc = deployment();
    let error = backup_patch(&template(&doc), &BTreeMap::new(), None, Timestamp::now()).unwrap_err();
    assert!(matches!(error, RewriteError::Nothing { .. }));
}

// === the way back ===

#[test]
fn moves_back_exactly_what_was_moved_and_holds_it_there() {
    let restore = restore_patch(&template(&rewritten()), on_backup, HoldReason::RolloutFailed, "ImagePullBackOff")
        .unwrap()
        .expect("something to restore");
    assert_eq!(restore.moves, [format!("web: {PINNED} -> nginx:1.25")]);
    let restored = apply(&rewritten(), &restore.patch).unwrap();
    assert_eq!(template(&restored).containers, template(&deployment()).containers);
    let record = Record::read(&template(&restored)).unwrap();
    assert!(record.originals.is_empty() && record.rewritten_at.is_none(), "{record:?}");
    let hold = record.hold.expect("held");
    assert_eq!((hold.reason, hold.message.as_str()), (HoldReason::RolloutFailed, "ImagePullBackOff"));
    assert!(hold.holds(&template(&restored)));
}

#[test]
fn a_rollback_by_someone_else_is_recorded_and_held() {
    let mut doc = rewritten();
    doc["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.25");
    let record = Record::read(&template(&doc)).unwrap();
    let reverted = reverted_containers(&template(&doc), &record);
    assert_eq!(reverted, ["web"]);
    let held = apply(&doc, &reverted_patch(&template(&doc), &reverted, "put back").unwrap()).unwrap();
    let record = Record::read(&template(&held)).unwrap();
    assert!(record.originals.is_empty() && record.rewritten_at.is_none());
    assert_eq!(record.hold.as_ref().map(|h| h.reason), Some(HoldReason::Reverted));
    assert!(record.hold.unwrap().holds(&template(&held)));
    assert_eq!(template(&held).containers, template(&doc).containers, "no image touched");
}

#[test]
fn a_container_someone_moved_on_is_left_alone() {
    let mut doc = rewritten();
    doc["spec"]["template"]["spec"]["containers"][0]["image"] = json!("nginx:1.27");
    assert!(restore_patch(&template(&doc), on_backup, HoldReason::Restored, "").unwrap().is_none());
}

#[test]
fn a_record_changed_meanwhile_fails_the_whole_restore() {
    let doc = rewritten();
    let restore = restore_patch(&template(&doc), on_backup, HoldReason::Restored, "").unwrap().unwrap();
    let mut changed = doc;
    changed["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION] = json!("{}");
    assert!(apply(&changed, &restore.patch).is_err());
}
