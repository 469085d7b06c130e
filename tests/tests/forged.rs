//! A compromised node cannot pin anyone's workload to content it made up,
//! nor keep a job cycling by dropping it again and again.
//! Every node holds the same push credential, so a rogue agent (a session
//! opened by hand with the token of an agent pod on its node) can push
//! anything to the backup registry and report anything. Here it plays
//! along until it is asked for a reduced index of a victim's image, then
//! pushes an index of its own image, annotated as a reduction of the
//! victim's source index and carrying that index's true bytes. On real
//! gRPC, a real registry and an API server (the emulator, and a real one
//! when IMAGE_BACKUP_TEST_KUBECONFIG gives it).

use std::time::Duration;

use base64::Engine as _;
use image_backup_coordinator::config::CoordinatorConfig;
use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::index::{self, LEFT_OUT_ANNOTATION, SOURCE_INDEX_ANNOTATION, SOURCE_INDEX_BYTES_ANNOTATION};
use image_backup_proto::v1::{
    Assignment, Finish, Inventory, InventoryImage, JobFailure, JobResult, JobSuccess, Platform, PlatformManifest,
    agent_message, coordinator_message, job_result,
};
use image_backup_tests::{
    MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, Placement, Workloads, cluster, coordinator_client, coordinator_config, eventually, prepare,
    },
    identity::agent_token,
    image::{Blob, sha256},
    init_tracing, on_both_api_servers,
    run::start_coordinator,
    session::Session,
};
use kube::Api;
use serde_json::{Value, json};

const KB: usize = 1 << 10;

on_both_api_servers!(forged_reduced_index: a_forged_reduced_index_is_refused_on_the_emulator, a_forged_reduced_index_is_refused_on_a_real_api_server);

async fn forged_reduced_index(kind: ApiServerKind) {
    init_tracing();
    let Some((_cluster, admin)) = cluster(kind).await else { return };
    prepare(&admin, &["shop", "image-backup"]).await;
    let backup_registry = Registry::start(RegistryAuth::None).await.unwrap();
    // A buildx image whose source is gone, run by a DaemonSet whose pods
    // are all on the rogue's node: it is the one holder the coordinator has.
    let image = TestImage::buildx(MediaTypes::Oci, 200 * KB, &[100 * KB], &["amd64", "arm64"], 46);
    let reference = "registry.gone.example/team/victim:1";
    let w = Workloads { client: admin.clone() };
    let spec = [("app", reference, image.digest(), false)];
    w.deploy("DaemonSet", "shop", "victim", json!({}), &spec, Placement { nodes: &["node-evil"], ready: true }).await;
    let client = coordinator_client(kind, &admin).await;
    let coordinator = start_coordinator(&admin, &client, coordinator_config(&backup_registry.host())).await;

    let token = agent_token(&admin, "node-evil").await;
    let mut rogue = Session::open(&coordinator.channel().await, Some(&token), "node-evil").await.unwrap();
    assert!(matches!(rogue.next().await, Some(coordinator_message::Message::Registered(_))));
    rogue.send(agent_message::Message::Inventory(inventory(&image, reference))).await;
    let heartbeats = rogue.heartbeats(Duration::from_secs(1));

    // It plays along (the amd64 part copied, the source unreachable) until
    // it is asked for the reduced index.
    let repository = "backup/registry.gone.example/team/victim";
    let own = TestImage::single(MediaTypes::Oci, &[50 * KB], 99);
    let forged = forged_index(&image, &own);
    loop {
        let Some(coordinator_message::Message::Assignment(assignment)) =
            rogue.next_within(Duration::from_secs(60)).await
        else {
            continue;
        };
        let outcome = match assignment.finish() {
            Finish::None => {
                backup_registry
                    .push(repository, "part", &TestImage::of(MediaTypes::Oci, image.platform("amd64").clone()))
                    .await
                    .unwrap();
                let pushed = assignment
                    .manifests
                    .iter()
                    .map(|digest| PlatformManifest { digest: digest.clone(), ..Default::default() })
                    .collect();
                job_result::Outcome::Success(JobSuccess { pushed_manifests: pushed, ..JobSuccess::default() })
            }
            Finish::Index | Finish::Whole => job_result::Outcome::Failure(JobFailure {
                message: "the source is gone".into(),
                source_failed: true,
                ..JobFailure::default()
            }),
            Finish::Reduced => {
                backup_registry.push(repository, "own", &own).await.unwrap();
                backup_registry.put_manifest(repository, &forged.digest, &forged).await.unwrap();
                let success = JobSuccess {
                    digest: forged.digest.clone(),
                    pinned_reference: String::new(),
                    ..JobSuccess::default()
                };
                rogue.send(result(&assignment, job_result::Outcome::Success(success))).await;
                break;
            }
        };
        rogue.send(result(&assignment, outcome)).await;
    }

    // Refused where people look: the ImageBackup failed with the reason, a
    // Warning Event, and the workload still on its source.
    let backups: Api<ImageBackup> = Api::all(admin.clone());
    let status = || async {
        let all = backups.list(&Default::default()).await.unwrap().items;
        all.into_iter().find(|b| b.spec.source == reference).and_then(|b| b.status).unwrap_or_default()
    };
    eventually("the forged backup fails", Duration::from_secs(30), || async {
        let status = status().await;
        if status.phase == Phase::Failed { Ok(()) } else { Err(format!("{status:?}")) }
    })
    .await;
    let failed = status().await;
    let error = failed.last_error.unwrap_or_default();
    assert!(
        error.contains(&own.digest().to_string()) && error.contains("is not a child of the source index"),
        "{error}"
    );
    assert_eq!(failed.backup_reference, None, "nothing to pin");
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(admin.clone(), "default");
    let notes: Vec<String> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("BackupFailed") && e.type_.as_deref() == Some("Warning"))
        .filter_map(|e| e.note)
        .collect();
    assert!(notes.iter().any(|n| n.contains(&forged.digest) && n.contains("node-evil")), "{notes:?}");
    assert_eq!(w.images("DaemonSet", "shop", "victim").await.0, [reference], "still on its source");
    heartbeats.abort();
}

/// What the rogue claims its node holds: the victim's index, in use, with
/// its amd64 child whole.
fn inventory(image: &TestImage, reference: &str) -> Inventory {
    let index = image.index.as_ref().expect("an index");
    let children = index::children(&index.data).unwrap();
    let manifest = |child: &index::Child| {
        let name = child.platform.to_string();
        let mut parts = name.split('/').map(str::to_string);
        let (os, architecture) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
        PlatformManifest {
            platform: Some(Platform { os, architecture, variant: parts.next().unwrap_or_default() }),
            digest: child.digest().to_string(),
            attestation: child.attestation,
        }
    };
    let amd64 = &image.platform("amd64").manifest.digest;
    let held = InventoryImage {
        name: reference.into(),
        digest: image.digest().into(),
        media_type: index.media_type.clone(),
        present_manifests: children.iter().filter(|c| c.digest() == amd64).map(manifest).collect(),
        manifests: children.iter().map(manifest).collect(),
        in_use: true,
    };
    Inventory { full: true, added: vec![held], removed: vec![] }
}

/// The victim's index with its children swapped for the rogue's own image,
/// dressed as a reduction: the source digest, the left-out platforms, and
/// the source index's own bytes, which the rogue's node holds.
fn forged_index(image: &TestImage, own: &TestImage) -> Blob {
    let source = image.index.as_ref().expect("an index");
    let mut index: Value = serde_json::from_slice(&source.data).unwrap();
    let own_manifest = &own.platforms[0].manifest;
    index["manifests"] = json!([{
        "mediaType": own_manifest.media_type, "digest": own_manifest.digest, "size": own_manifest.size(),
        "platform": { "os": "linux", "architecture": "amd64" },
    }]);
    index["annotations"] = json!({
        SOURCE_INDEX_ANNOTATION: image.digest(),
        LEFT_OUT_ANNOTATION: "linux/arm64",
        SOURCE_INDEX_BYTES_ANNOTATION: base64::engine::general_purpose::STANDARD.encode(&source.data),
    });
    let data = bytes::Bytes::from(serde_json::to_vec(&index).unwrap());
    Blob { media_type: source.media_type.clone(), digest: sha256(&data), data, gc_labels: Default::default() }
}

fn result(assignment: &Assignment, outcome: job_result::Outcome) -> agent_message::Message {
    agent_message::Message::Result(JobResult {
        job_id: assignment.job_id.clone(),
        attempt: assignment.attempt,
        digest: assignment.digest.clone(),
        outcome: Some(outcome),
    })
}

on_both_api_servers!(lost_again_and_again: a_copy_lost_again_and_again_fails_on_the_emulator, a_copy_lost_again_and_again_fails_on_a_real_api_server);

/// An agent that goes away each time it is given the copy (as one the copy
/// crashes would): after `max_attempts` losses in a row the job fails,
/// saying so, instead of cycling for ever.
async fn lost_again_and_again(kind: ApiServerKind) {
    init_tracing();
    let Some((_cluster, admin)) = cluster(kind).await else { return };
    prepare(&admin, &["shop", "image-backup"]).await;
    let backup_registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[64 * KB], 47);
    let reference = "registry.gone.example/team/crashy:1";
    let w = Workloads { client: admin.clone() };
    let spec = [("app", reference, image.digest(), false)];
    w.deploy("Deployment", "shop", "crashy", json!({}), &spec, Placement { nodes: &["node-crash"], ready: true }).await;
    let client = coordinator_client(kind, &admin).await;
    let config = CoordinatorConfig {
        max_attempts: 3,
        heartbeat_deadline: Duration::from_secs(1),
        retry_backoff: Duration::from_millis(100),
        ..coordinator_config(&backup_registry.host())
    };
    let coordinator = start_coordinator(&admin, &client, config).await;
    let token = agent_token(&admin, "node-crash").await;
    let held = InventoryImage {
        name: reference.into(),
        digest: image.digest().into(),
        media_type: image.root().media_type.clone(),
        in_use: true,
        ..InventoryImage::default()
    };
    let backups: Api<ImageBackup> = Api::all(admin.clone());
    let status = || async {
        let all = backups.list(&Default::default()).await.unwrap().items;
        all.into_iter().find(|b| b.spec.source == reference).and_then(|b| b.status).unwrap_or_default()
    };
    let mut assigned = 0;
    while status().await.phase != Phase::Failed && assigned < 10 {
        let mut agent = Session::open(&coordinator.channel().await, Some(&token), "node-crash").await.unwrap();
        assert!(matches!(agent.next().await, Some(coordinator_message::Message::Registered(_))));
        let inventory = Inventory { full: true, added: vec![held.clone()], removed: vec![] };
        agent.send(agent_message::Message::Inventory(inventory)).await;
        // Alive until it goes: its heartbeats keep it within the deadline.
        let heartbeats = agent.heartbeats(Duration::from_millis(200));
        let assignment = agent.next_within(Duration::from_secs(30)).await;
        heartbeats.abort();
        match assignment {
            Some(coordinator_message::Message::Assignment(_)) => assigned += 1,
            other => {
                if status().await.phase == Phase::Failed {
                    break;
                }
                panic!("no assignment: {other:?}");
            }
        }
        // Gone mid-copy, without a word.
        drop(agent);
        eventually("the loss is recorded", Duration::from_secs(30), || async {
            let status = status().await;
            if status.phase == Phase::Pending || status.phase == Phase::Failed {
                Ok(())
            } else {
                Err(format!("{status:?}"))
            }
        })
        .await;
    }
    let failed = status().await;
    assert_eq!(failed.phase, Phase::Failed, "{failed:?}");
    assert_eq!(assigned, 3, "one assignment per attempt allowed");
    let error = failed.last_error.unwrap_or_default();
    assert!(error.contains("lost 3 times in a row"), "{error}");
}
