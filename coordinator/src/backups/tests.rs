//! The reconcile against scripted API responses and a scripted registry.

use std::{collections::HashSet, sync::Arc};

use http::{Method, StatusCode};
use image_backup_crds::{ImageBackupSpec, ImageBackupStatus, Phase as CrdPhase};
use image_backup_oci::media::sha256_digest;
use image_backup_proto::v1::{JobResult, JobSuccess, job_result};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};

use super::*;
use crate::{
    testing::{Exchange, backups_context as context, registry, registry_serving, scripted, store},
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
    pushing_of(DIGEST)
}

/// An ImageBackup of `digest` whose attempt 1 agent-a is pushing.
fn pushing_of(digest: &str) -> ImageBackup {
    let mut backup = ImageBackup::new(
        NAME,
        ImageBackupSpec { source: "docker.io/library/nginx:1.25".into(), digest: digest.into() },
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
    reconcile_after(pushing(), host, digest, script).await
}

/// The reconcile of `backup` after agent-a said it pushed `digest`.
async fn reconcile_after(backup: ImageBackup, host: &str, digest: &str, script: Vec<Exchange>) {
    let (client, script) = scripted(script);
    let flags = ["--backup-registry", host, "--insecure-registry", host];
    let ctx = context(client, &flags, store(vec![backup.clone()]), Arc::new(Usage::default()));
    ctx.jobs.assigned(NAME, 1, &backup.spec.digest, "agent-a");
    let success = JobSuccess { digest: digest.into(), bytes_uploaded: 1000, ..JobSuccess::default() };
    let result = JobResult {
        job_id: NAME.into(),
        outcome: Some(job_result::Outcome::Success(success)),
        attempt: 1,
        digest: backup.spec.digest.clone(),
    };
    assert!(ctx.jobs.result("agent-a", &result));
    reconcile(Arc::new(backup), ctx).await.expect("the reconcile goes through");
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

/// A source index of two platforms, its digest, and the reduced index of
/// its amd64 manifest alone (bytes and digest), as an agent pushes it.
fn source_and_reduction() -> (Vec<u8>, String, Vec<u8>, String) {
    let amd64 = format!("sha256:{}", "a".repeat(64));
    let arm64 = format!("sha256:{}", "b".repeat(64));
    let child = |digest: &str, arch: &str| {
        json!({ "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest, "size": 10,
                "platform": { "os": "linux", "architecture": arch } })
    };
    let source = serde_json::to_vec(&json!({ "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [child(&amd64, "amd64"), child(&arm64, "arm64")] }))
    .unwrap();
    let source_digest = sha256_digest(&source);
    let reduced = image_backup_oci::index::reduced(&source, &source_digest, &HashSet::from([amd64.as_str()])).unwrap();
    let reduced_digest = sha256_digest(&reduced);
    (source, source_digest, reduced, reduced_digest)
}

/// [`pushing_of`] the source index, its attempt planned as a reduced index.
fn reducing(source_digest: &str) -> ImageBackup {
    let mut backup = pushing_of(source_digest);
    backup.status.as_mut().unwrap().reducing = true;
    backup
}

#[tokio::test]
async fn a_reduced_index_the_registry_proves_is_completed_as_reduced() {
    let (_, source_digest, reduced, reduced_digest) = source_and_reduction();
    let host = registry_serving(vec![(format!("backup/docker.io/library/nginx@{reduced_digest}"), reduced)]).await;
    let pinned = format!("{host}/backup/docker.io/library/nginx@{reduced_digest}");
    let put = Exchange::new(Method::PUT, STATUS_PATH, StatusCode::OK, Value::Null).checking(move |body| {
        assert_eq!(status(body)["phase"], "Completed", "{body}");
        assert_eq!(status(body)["reduced"], true);
        assert_eq!(status(body)["backupReference"], pinned.as_str());
    });
    let event = Exchange::new(Method::POST, EVENTS_PATH, StatusCode::CREATED, json!({}))
        .checking(|body| assert_eq!(body["reason"], "BackupCompleted"));
    reconcile_after(reducing(&source_digest), &host, &reduced_digest, vec![put, event]).await;
}

#[tokio::test]
async fn a_forged_reduced_index_is_refused_and_the_job_fails() {
    let (_, source_digest, reduced, _) = source_and_reduction();
    // The node swaps the kept child for an image of its own: served, and
    // annotated as the source's reduction, but not one.
    let own = format!("sha256:{}", "e".repeat(64));
    let forged = String::from_utf8(reduced).unwrap().replace(&format!("sha256:{}", "a".repeat(64)), &own).into_bytes();
    let forged_digest = sha256_digest(&forged);
    let host = registry_serving(vec![(format!("backup/docker.io/library/nginx@{forged_digest}"), forged)]).await;
    let put = Exchange::new(Method::PUT, STATUS_PATH, StatusCode::OK, Value::Null).checking(|body| {
        assert_eq!(status(body)["phase"], "Failed", "{body}");
        assert_eq!(status(body)["backupReference"], Value::Null);
        let error = status(body)["lastError"].as_str().unwrap_or_default();
        assert!(error.contains("node node-a pushed a reduced index that is refused"), "{error}");
    });
    let event = Exchange::new(Method::POST, EVENTS_PATH, StatusCode::CREATED, json!({}))
        .checking(|body| assert_eq!((&body["reason"], &body["type"]), (&json!("BackupFailed"), &json!("Warning"))));
    reconcile_after(reducing(&source_digest), &host, &forged_digest, vec![put, event]).await;
}
