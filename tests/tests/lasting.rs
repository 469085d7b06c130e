//! Backups that last, on the API server (the emulator, and a real one when
//! IMAGE_BACKUP_TEST_KUBECONFIG gives it), real containerd and a real
//! registry: a Completed backup is looked for again on schedule and copied
//! again when it is gone; one that no node can copy again moves its
//! workloads back to their sources; an ImageBackup deleted by hand while
//! used comes back without a copy; one no workload uses goes after a grace
//! period, and the registry keeps what it copied; pruned, it goes only once
//! no pod template of any kind names it, after a quarantine.

use std::time::Duration;

use image_backup_coordinator::{backups::unused::QUARANTINED_SINCE_ANNOTATION, config::CoordinatorConfig};
use image_backup_core::template::HoldReason;
use image_backup_crds::Phase;
use image_backup_tests::{
    cluster::{ApiServerKind, coordinator_config, eventually, metric},
    on_both_api_servers,
    one_node::{OneNode, WAIT},
};
use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    core::v1::Pod,
};
use kube::{
    Api,
    api::{DeleteParams, ResourceExt},
};
use serde_json::json;

/// Completed backups looked for again every second.
fn verifying(s: &OneNode) -> CoordinatorConfig {
    CoordinatorConfig { verify_every: Duration::from_secs(1), ..coordinator_config(&s.backup_host()) }
}

async fn copied_again(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    let web = s.image("shop/web:1", 101).await;
    s.deploy("Deployment", "shop", "web", serde_json::json!({}), &web).await;
    let coordinator = s.start(verifying(&s)).await;
    s.runs("Deployment", "shop", "web", &s.pinned(&web)).await;
    let uploads = s.proxy.uploads();

    // Someone deletes the backup from the registry (its tags go with it).
    s.backup.delete_manifest(&s.repository(&web), web.1.digest()).await.unwrap();
    eventually("the backup is found missing and copied again", WAIT, || async {
        let missing =
            metric(&coordinator.metrics_url, "image_backup_backup_verifications_total{outcome=\"missing\"}").await?;
        let served = s.backup.manifest(&s.repository(&web), web.1.digest()).await.map_err(|e| e.to_string())?;
        let status = s.image_backup(&web).await.and_then(|b| b.status).unwrap_or_default();
        if missing >= 1.0 && served.is_some() && status.phase == Phase::Completed && status.lost_at.is_none() {
            Ok(())
        } else {
            Err(format!("{missing} found missing, served: {}, {:?}", served.is_some(), status.phase))
        }
    })
    .await;
    // The layers were still there: only the manifest and its tags came back.
    assert_eq!(s.proxy.uploads(), uploads, "no blob uploaded again");
    let tags = s.backup.tags(&s.repository(&web)).await.unwrap();
    assert!(
        tags.contains(&"1".to_string()) && tags.contains(&image_backup_oci::digest_tag(web.1.digest())),
        "{tags:?}"
    );
    assert_eq!(s.image_of("Deployment", "shop", "web").await, s.pinned(&web), "the workload stays on its backup");
    let status = s.image_backup(&web).await.unwrap().status.unwrap();
    assert!(status.last_verified.is_some());
}
on_both_api_servers!(copied_again: a_backup_gone_from_the_registry_is_copied_again_on_the_emulator, a_backup_gone_from_the_registry_is_copied_again_on_a_real_api_server);

async fn lost(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    let web = s.image("shop/web:1", 102).await;
    s.deploy("Deployment", "shop", "web", serde_json::json!({}), &web).await;
    let coordinator = s.start(verifying(&s)).await;
    s.runs("Deployment", "shop", "web", &s.pinned(&web)).await;

    // The node no longer holds the image, the source is long gone, and
    // then the backup goes too: nothing can copy it again.
    s.node.forget(web.1.digest()).await.unwrap();
    s.backup.delete_manifest(&s.repository(&web), web.1.digest()).await.unwrap();
    s.runs("Deployment", "shop", "web", &web.0).await;
    let hold = s.hold("Deployment", "shop", "web").await.expect("held on its source");
    assert_eq!(hold.reason, HoldReason::BackupLost);
    assert!(hold.message.contains("gone from the registry"), "{}", hold.message);
    s.recorded("shop", "web", "BackupLost").await;
    let status = s.image_backup(&web).await.unwrap().status.unwrap();
    assert_eq!(status.phase, Phase::Failed);
    assert!(status.lost_at.is_some(), "{status:?}");
    let restored =
        metric(&coordinator.metrics_url, "image_backup_workloads_restored_total{outcome=\"backup_lost\"}").await;
    assert_eq!(restored, Ok(1.0));
}
on_both_api_servers!(lost: a_backup_no_node_can_copy_again_moves_its_workloads_back_on_the_emulator, a_backup_no_node_can_copy_again_moves_its_workloads_back_on_a_real_api_server);

async fn deletions(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    let (web, api) = (s.image("shop/web:1", 103).await, s.image("shop/api:1", 104).await);
    s.deploy("Deployment", "shop", "web", serde_json::json!({}), &web).await;
    s.deploy("Deployment", "shop", "api", serde_json::json!({}), &api).await;
    let config = CoordinatorConfig { unused_grace: Duration::from_secs(2), ..coordinator_config(&s.backup_host()) };
    let coordinator = s.start(config).await;
    s.runs("Deployment", "shop", "web", &s.pinned(&web)).await;
    s.runs("Deployment", "shop", "api", &s.pinned(&api)).await;
    let uploads = s.proxy.uploads();

    // Deleted by hand while web runs it: made again from what web runs,
    // and nothing is copied again.
    let first = s.image_backup(&web).await.unwrap();
    let backups = Api::<image_backup_crds::ImageBackup>::all(s.client.clone());
    backups.delete(&first.name_any(), &DeleteParams::default()).await.unwrap();
    eventually("web's ImageBackup is made again and Completed", WAIT, || async {
        match s.image_backup(&web).await {
            Some(b) if b.uid() != first.uid() => {
                let phase = b.status.map(|s| s.phase);
                if phase == Some(Phase::Completed) { Ok(()) } else { Err(format!("{phase:?}")) }
            }
            other => Err(format!("{:?}", other.map(|b| b.uid()))),
        }
    })
    .await;
    assert_eq!(s.image_backup(&web).await.unwrap().spec.digest, web.1.digest());
    assert_eq!(s.proxy.uploads(), uploads, "the registry held it: no blob uploaded again");

    // api goes: its ImageBackup is deleted after the grace period, the
    // registry keeps the copy, and web's stays.
    Api::<Deployment>::namespaced(s.client.clone(), "shop").delete("api", &DeleteParams::default()).await.unwrap();
    eventually("api's ImageBackup is deleted once unused", WAIT, || async {
        match s.image_backup(&api).await {
            None => Ok(()),
            Some(b) => Err(format!("annotations {:?}", b.annotations())),
        }
    })
    .await;
    assert!(s.backup.manifest(&s.repository(&api), api.1.digest()).await.unwrap().is_some(), "the copy stays");
    let deleted = metric(&coordinator.metrics_url, "image_backup_unused_imagebackups_deleted_total").await;
    assert_eq!(deleted, Ok(1.0));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = s.image_backup(&web).await.expect("web's ImageBackup stays: web uses it");
    assert!(!kept.annotations().contains_key("backup.k8slab.io/unused-since"));
}
on_both_api_servers!(deletions: imagebackups_deleted_by_hand_come_back_and_unused_ones_go_on_the_emulator, imagebackups_deleted_by_hand_come_back_and_unused_ones_go_on_a_real_api_server);

async fn pruning(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    // Two tags of one content: two ImageBackups, one digest in one
    // repository.
    let (one, web) = (s.image("shop/api:1", 105).await, s.image("shop/web:1", 106).await);
    let two = (format!("{}/shop/api:2", s.src), one.1.clone());
    let platform = &one.1.platforms[0];
    let held: Vec<&str> =
        platform.layers.iter().chain([&platform.config, &platform.manifest]).map(|b| b.digest.as_str()).collect();
    two.1.import(&s.node, &two.0, &[], &held).await.unwrap();
    for (name, image) in [("one", &one), ("two", &two), ("web", &web)] {
        s.deploy("Deployment", "shop", name, serde_json::json!({}), image).await;
    }
    let config = CoordinatorConfig {
        unused_grace: Duration::from_secs(2),
        prune: true,
        prune_quarantine: Duration::from_secs(4),
        ..coordinator_config(&s.backup_host())
    };
    let coordinator = s.start(config).await;
    for (name, image) in [("one", &one), ("two", &two), ("web", &web)] {
        s.runs("Deployment", "shop", name, &s.pinned(image)).await;
    }
    // A StatefulSet, which the coordinator does not watch, runs the backup
    // too.
    let pinned = s.pinned(&two);
    let template = |name: &str| json!({ "metadata": { "labels": { "app": name } }, "spec": { "containers": [{ "name": "db", "image": pinned }] } });
    let statefulsets = Api::<StatefulSet>::namespaced(s.client.clone(), "shop");
    let db = json!({ "apiVersion": "apps/v1", "kind": "StatefulSet", "metadata": { "name": "db" },
        "spec": { "serviceName": "db", "selector": { "matchLabels": { "app": "db" } }, "template": template("db") } });
    image_backup_tests::cluster::create(&statefulsets, db).await;

    let deployments = Api::<Deployment>::namespaced(s.client.clone(), "shop");
    // one goes: its ImageBackup too, but the digest two uses stays.
    deployments.delete("one", &DeleteParams::default()).await.unwrap();
    eventually("one's ImageBackup is deleted", WAIT, || async {
        if s.image_backup(&one).await.is_none() { Ok(()) } else { Err("still there".to_string()) }
    })
    .await;
    assert!(served(&s, &two).await, "two's ImageBackup (and two) still use the digest");
    // two goes: no watched workload uses the digest, but the StatefulSet's
    // template names it: kept.
    deployments.delete("two", &DeleteParams::default()).await.unwrap();
    kept_for(&s, &two, "StatefulSet/shop/db").await;
    assert!(served(&s, &two).await);

    // The StatefulSet goes: two waits in quarantine, and a pod made
    // meanwhile keeps it again.
    statefulsets.delete("db", &DeleteParams::default()).await.unwrap();
    eventually("two is quarantined", WAIT, || async {
        let backup = s.image_backup(&two).await.ok_or("gone")?;
        let marked = backup.annotations().contains_key(QUARANTINED_SINCE_ANNOTATION);
        if marked { Ok(()) } else { Err(format!("{:?}", backup.annotations())) }
    })
    .await;
    let pods = Api::<Pod>::namespaced(s.client.clone(), "shop");
    let debug = json!({ "apiVersion": "v1", "kind": "Pod", "metadata": { "name": "debug" }, "spec": template("debug")["spec"] });
    image_backup_tests::cluster::create(&pods, debug).await;
    kept_for(&s, &two, "Pod/shop/debug").await;
    assert!(served(&s, &two).await);
    let backup = s.image_backup(&two).await.expect("kept");
    assert!(!backup.annotations().contains_key(QUARANTINED_SINCE_ANNOTATION), "out of quarantine");

    // Nothing names it any more: after its quarantine it leaves the
    // registry.
    let at_once = DeleteParams { grace_period_seconds: Some(0), ..DeleteParams::default() };
    pods.delete("debug", &at_once).await.unwrap();
    eventually("the digest nobody uses is pruned", WAIT, || async {
        if served(&s, &two).await { Err("still served".to_string()) } else { Ok(()) }
    })
    .await;
    assert!(s.image_backup(&two).await.is_none());
    assert!(served(&s, &web).await, "web's backup stays");
    let pruned = metric(&coordinator.metrics_url, "image_backup_pruned_manifests_total").await;
    assert_eq!(pruned, Ok(1.0));
}

/// Waits for a BackupKept Event on the ImageBackup of `image` naming `user`.
async fn kept_for(s: &OneNode, image: &(String, image_backup_tests::TestImage), user: &str) {
    let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&image.0).unwrap());
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(s.client.clone(), "default");
    eventually(&format!("kept for {user}"), WAIT, || async {
        let list = events.list(&Default::default()).await.map_err(|e| e.to_string())?.items;
        let kept = list.iter().any(|e| {
            e.reason.as_deref() == Some("BackupKept")
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name.as_str())
                && e.note.as_deref().is_some_and(|n| n.contains(user))
        });
        if kept { Ok(()) } else { Err(format!("{} events", list.len())) }
    })
    .await;
}
on_both_api_servers!(pruning: unused_backups_are_pruned_from_the_registry_when_asked_on_the_emulator, unused_backups_are_pruned_from_the_registry_when_asked_on_a_real_api_server);

/// Whether the backup registry serves the backup of `image`.
async fn served(s: &OneNode, image: &(String, image_backup_tests::TestImage)) -> bool {
    s.backup.manifest(&s.repository(image), image.1.digest()).await.unwrap().is_some()
}
