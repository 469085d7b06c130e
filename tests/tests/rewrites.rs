//! Safe rewrites on the API server (the emulator, and a real one when
//! IMAGE_BACKUP_TEST_KUBECONFIG gives it), real containerd and a real
//! registry: workloads another controller manages are backed up but not
//! moved, a rollback by someone else is held rather than fought, rollouts
//! start a few at a time, a slow rollout goes back only to a source that
//! still serves, and `restore` moves workloads back. Rollouts that fail on a
//! real kubelet are in real_node_rollouts.rs.

use std::time::Duration;

use image_backup_coordinator::{cli::RestoreArgs, config::CoordinatorConfig, restore::restore};
use image_backup_core::template::{
    HoldReason, ORIGINAL_IMAGES_ANNOTATION, REWRITE_ANNOTATION, REWRITTEN_AT_ANNOTATION,
};
use image_backup_crds::{ImageBackup, Phase};
use image_backup_tests::{
    MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{ApiServerKind, coordinator_config, eventually, metric},
    on_both_api_servers,
    one_node::{OneNode, WAIT},
    rollouts::STUCK_LABEL,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

async fn managed_and_reverted(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    let web = s.image("shop/web:1", 71).await;
    s.deploy("Deployment", "shop", "web", json!({}), &web).await;
    s.deploy("Deployment", "shop", "flux", json!({ "kustomize.toolkit.fluxcd.io/name": "apps" }), &web).await;
    s.deploy("Deployment", "shop", "owned", json!({}), &web).await;
    // An operator's Deployment names its custom resource as owner.
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), "shop");
    let owner = json!({ "apiVersion": "example.com/v1", "kind": "Database", "name": "pg", "uid": "5f0c6b9e-0000-4000-8000-000000000001", "controller": true });
    let patch = Patch::Merge(json!({ "metadata": { "ownerReferences": [owner] } }));
    deployments.patch("owned", &PatchParams::default(), &patch).await.unwrap();
    let coordinator = s.start(coordinator_config(&s.backup_host())).await;

    s.runs("Deployment", "shop", "web", &s.pinned(&web)).await;
    eventually("the managed Deployments are noted on the ImageBackup", WAIT, || async {
        let mut notes = s.notes(&web).await;
        notes.sort();
        let expected = [
            ("Deployment/shop/flux".to_string(), "Managed".to_string()),
            ("Deployment/shop/owned".to_string(), "Managed".to_string()),
        ];
        if notes == expected { Ok(()) } else { Err(format!("{notes:?}")) }
    })
    .await;
    for name in ["flux", "owned"] {
        assert_eq!(s.image_of("Deployment", "shop", name).await, web.0, "{name} is left on its source");
        s.recorded("shop", name, "NotRewritten").await;
    }
    let managed = metric(&coordinator.metrics_url, "image_backup_workload_patches_total{outcome=\"managed\"}").await;
    assert!(managed.as_ref().is_ok_and(|n| *n >= 2.0), "{managed:?}");

    // Its owner opts the Flux one in.
    let opt_in = Patch::Merge(json!({ "metadata": { "annotations": { REWRITE_ANNOTATION: "true" } } }));
    deployments.patch("flux", &PatchParams::default(), &opt_in).await.unwrap();
    s.runs("Deployment", "shop", "flux", &s.pinned(&web)).await;

    // Someone rolls web back to its source: recorded and held, not fought.
    let back = json!([{ "op": "replace", "path": "/spec/template/spec/containers/0/image", "value": web.0 }]);
    deployments
        .patch("web", &PatchParams::default(), &Patch::<()>::Json(serde_json::from_value(back).unwrap()))
        .await
        .unwrap();
    eventually("web is held where it was put back", WAIT, || async {
        match s.hold("Deployment", "shop", "web").await {
            Some(hold) if hold.reason == HoldReason::Reverted => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    s.recorded("shop", "web", "RewriteReverted").await;
    assert_eq!(s.annotation("Deployment", "shop", "web", ORIGINAL_IMAGES_ANNOTATION).await, None);
    eventually("the ImageBackup notes the rollback", WAIT, || async {
        let notes = s.notes(&web).await;
        let reverted = notes.contains(&("Deployment/shop/web".to_string(), "Reverted".to_string()));
        if reverted { Ok(()) } else { Err(format!("{notes:?}")) }
    })
    .await;
    s.touch("Deployment", "shop", "web", "1").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(s.image_of("Deployment", "shop", "web").await, web.0, "the coordinator does not move it again");

    // A workload that goes takes its note with it.
    deployments.delete("owned", &Default::default()).await.unwrap();
    eventually("the deleted Deployment's note goes", WAIT, || async {
        let notes = s.notes(&web).await;
        let owned = notes.iter().any(|(workload, _)| workload == "Deployment/shop/owned");
        if owned { Err(format!("{notes:?}")) } else { Ok(()) }
    })
    .await;
}
on_both_api_servers!(managed_and_reverted: managed_workloads_are_left_alone_and_a_rollback_is_held_on_the_emulator, managed_workloads_are_left_alone_and_a_rollback_is_held_on_a_real_api_server);

async fn one_rollout_at_a_time(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    let images = [s.image("shop/a:1", 81).await, s.image("shop/b:1", 82).await, s.image("shop/c:1", 83).await];
    for (name, image) in ["a", "b", "c"].iter().zip(&images) {
        s.deploy("Deployment", "shop", name, json!({}), image).await;
    }
    // Backed up first, so that all three are ready to move at once.
    let config = coordinator_config(&s.backup_host());
    let first = s.start(CoordinatorConfig { report_only: true, ..config.clone() }).await;
    eventually("every image is backed up", WAIT, || async {
        let list = Api::<ImageBackup>::all(s.client.clone()).list(&ListParams::default()).await.unwrap();
        let done = list.items.iter().filter(|b| b.status.as_ref().is_some_and(|s| s.phase == Phase::Completed));
        if done.count() == 3 { Ok(()) } else { Err(format!("{} ImageBackups", list.items.len())) }
    })
    .await;
    first.stop().await;
    let coordinator = s.start(CoordinatorConfig { max_rollouts: 1, ..config }).await;
    // Never two rollouts at once: a workload keeps its `rewritten-at` until
    // its rollout completes. All three are read in one list, at one
    // resourceVersion: read one by one, a rollout that settles between two
    // reads and the next one it lets start would both be counted.
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), "shop");
    eventually("every Deployment runs its backup, one rollout at a time", WAIT, || async {
        let list = deployments.list(&ListParams::default()).await.unwrap();
        let mut moving = 0;
        let mut moved = 0;
        for (name, image) in ["a", "b", "c"].iter().zip(&images) {
            let deployment = list.items.iter().find(|d| d.metadata.name.as_deref() == Some(*name)).unwrap();
            let annotations = deployment.metadata.annotations.clone().unwrap_or_default();
            moving += annotations.contains_key(REWRITTEN_AT_ANNOTATION) as usize;
            let spec = deployment.spec.template.spec.as_ref().unwrap();
            moved += (spec.containers[0].image.as_deref() == Some(s.pinned(image).as_str())) as usize;
        }
        assert!(moving <= 1, "{moving} rollouts in flight");
        if moved == 3 && moving == 0 { Ok(()) } else { Err(format!("{moved} moved, {moving} in flight")) }
    })
    .await;
    let waited =
        metric(&coordinator.metrics_url, "image_backup_workload_patches_total{outcome=\"waiting_for_slot\"}").await;
    assert!(waited.as_ref().is_ok_and(|n| *n >= 1.0), "{waited:?}");
}
on_both_api_servers!(one_rollout_at_a_time: rollouts_start_one_at_a_time_when_asked_on_the_emulator, rollouts_start_one_at_a_time_when_asked_on_a_real_api_server);

async fn restore_command(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop", "ops"]).await else { return };
    let (web, api, agent) =
        (s.image("shop/web:1", 91).await, s.image("shop/api:1", 92).await, s.image("ops/agent:1", 93).await);
    s.deploy("Deployment", "shop", "web", json!({}), &web).await;
    s.deploy("Deployment", "shop", "api", json!({}), &api).await;
    s.deploy("DaemonSet", "ops", "agent", json!({}), &agent).await;
    let _coordinator = s.start(coordinator_config(&s.backup_host())).await;
    let moved = [
        ("Deployment", "shop", "web", &web),
        ("Deployment", "shop", "api", &api),
        ("DaemonSet", "ops", "agent", &agent),
    ];
    for (kind, ns, name, image) in moved {
        s.runs(kind, ns, name, &s.pinned(image)).await;
    }

    let args = |workload: Option<&str>, namespace: Option<&str>, all: bool, dry_run: bool| RestoreArgs {
        workload: workload.map(str::to_string),
        namespace: namespace.map(str::to_string),
        all,
        dry_run,
        backup_registry: s.backup_host(),
        backup_prefix: "backup".into(),
    };
    let dry = restore(s.client.clone(), &args(None, None, true, true)).await.unwrap();
    assert_eq!((dry.restored, dry.lines.lines().count()), (0, 3), "{}", dry.lines);
    assert_eq!(s.image_of("Deployment", "shop", "web").await, s.pinned(&web), "a dry run changes nothing");

    let one = restore(s.client.clone(), &args(Some("deployment/web"), Some("shop"), false, false)).await.unwrap();
    assert_eq!(one.restored, 1, "{}", one.lines);
    assert_eq!(s.image_of("Deployment", "shop", "web").await, web.0);
    assert_eq!(s.image_of("Deployment", "shop", "api").await, s.pinned(&api), "only the one named");
    let shop = restore(s.client.clone(), &args(None, Some("shop"), false, false)).await.unwrap();
    assert_eq!(shop.restored, 1, "web has nothing left to restore: {}", shop.lines);
    assert_eq!(s.image_of("DaemonSet", "ops", "agent").await, s.pinned(&agent), "another namespace");
    let all = restore(s.client.clone(), &args(None, None, true, false)).await.unwrap();
    assert_eq!(all.restored, 1, "{}", all.lines);

    for (kind, ns, name, image) in moved {
        assert_eq!(s.image_of(kind, ns, name).await, image.0, "{name}");
        assert_eq!(s.annotation(kind, ns, name, ORIGINAL_IMAGES_ANNOTATION).await, None);
        assert_eq!(s.hold(kind, ns, name).await.map(|h| h.reason), Some(HoldReason::Restored), "{name}");
        // The running coordinator looks again and leaves it there.
        s.touch(kind, ns, name, "after-restore").await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (kind, ns, name, image) in moved {
        assert_eq!(s.image_of(kind, ns, name).await, image.0, "{name} stays restored");
    }
    let nothing = restore(s.client.clone(), &args(None, None, true, false)).await.unwrap();
    assert_eq!(nothing.restored, 0);
    let unnamed = restore(s.client.clone(), &args(None, None, false, false)).await.unwrap_err();
    assert!(unnamed.to_string().contains("--all"), "{unnamed}");
}
on_both_api_servers!(restore_command: restore_moves_workloads_back_and_holds_them_on_the_emulator, restore_moves_workloads_back_and_holds_them_on_a_real_api_server);

/// Two Deployments whose rollouts to their backups never finish (their
/// controller never makes the new pods, which no pod shows): the one whose
/// source is gone stays on its backup, saying why, since moving it back
/// would leave it nothing to pull; the one whose source still serves its
/// image goes back to it.
async fn slow_rollouts(kind: ApiServerKind) {
    let Some(s) = OneNode::new(kind, &["shop"]).await else { return };
    let stuck = json!({ STUCK_LABEL: "true" });
    let gone = s.image("shop/gone:1", 81).await;
    s.deploy("Deployment", "shop", "gone", stuck.clone(), &gone).await;
    let source = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[64 << 10], 82);
    source.push("shop/live", "1", &image).await.unwrap();
    let live = (format!("{}/shop/live:1", source.host()), image);
    live.1.import(&s.node, &live.0, &[], &[]).await.unwrap();
    s.deploy("Deployment", "shop", "live", stuck, &live).await;
    let mut config =
        CoordinatorConfig { rollout_timeout: Duration::from_secs(3), ..coordinator_config(&s.backup_host()) };
    config.registry.insecure_hosts.push(source.host());
    let _coordinator = s.start(config).await;

    eventually("the live one is moved back to its source", WAIT, || async {
        let hold = s.hold("Deployment", "shop", "live").await;
        match (s.image_of("Deployment", "shop", "live").await, hold) {
            (image, Some(hold)) if image == live.0 && hold.reason == HoldReason::RolloutFailed => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    eventually("the gone one is held on its backup", WAIT, || async {
        let events = s.events("shop", "gone").await;
        if events.iter().any(|e| e == "HeldOnBackup") { Ok(()) } else { Err(format!("{events:?}")) }
    })
    .await;
    assert_eq!(s.image_of("Deployment", "shop", "gone").await, s.pinned(&gone));
    assert_eq!(s.hold("Deployment", "shop", "gone").await, None);
    assert!(s.notes(&gone).await.contains(&("Deployment/shop/gone".to_string(), "HeldOnBackup".to_string())));
    let backup = s.image_backup(&gone).await.unwrap();
    let note = backup.status.unwrap().workloads.into_iter().find(|n| n.reason == "HeldOnBackup").unwrap();
    assert!(note.message.contains("did not complete within 3s") && note.message.contains(&s.src), "{}", note.message);
}
on_both_api_servers!(slow_rollouts: a_slow_rollout_goes_back_only_to_a_source_that_serves_on_the_emulator, a_slow_rollout_goes_back_only_to_a_source_that_serves_on_a_real_api_server);
