//! The whole loop on a real node: a Deployment whose pod the kubelet really
//! runs from an image it pulled from a source registry is backed up from the
//! node's containerd, patched and rolled out; then the source goes away, the
//! node forgets the image, and the pod starts again, pulled from the backup.
//! Once for a single-platform image, once for a buildx-style index of which
//! the kubelet pulled only the node's platform, backed up with the source
//! already gone: a reduced index of what the node holds.
//!
//! Needs the real one-node cluster that `.ci/run` starts (KUBECONFIG,
//! K8S_NODE_NAME, K8S_CONTAINERD_SOCKET, K8S_CERTS_D); skipped without it.

use std::time::Duration;

use image_backup_agent::{containerd::ContainerdStore, store::ContentStore};
use image_backup_crds::{ImageBackup, Phase};
use image_backup_tests::{
    MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{coordinator_config, eventually, quick_retries},
    image::PlatformImage,
    node::{K8S_NAMESPACE, rolled_out, runnable_image, scene, sleeper},
    run::{start_agent_on, start_coordinator},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod};
use kube::{
    Api,
    api::{DeleteParams, ListParams, PostParams},
};

/// One node, one coordinator at a time: a coordinator backs up every
/// workload of the cluster.
static NODE: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_from_the_backup_after_the_source_and_the_node_copy_are_gone() {
    backup_then_pull_again(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_runs_from_a_reduced_index_of_what_the_kubelet_pulled() {
    backup_then_pull_again(true).await;
}

async fn backup_then_pull_again(multi: bool) {
    let _turn = NODE.lock().await;
    let Some((node, client, ns)) = scene().await else { return };

    // A runnable image in a source registry the node pulls from.
    let source = Registry::start(RegistryAuth::None).await.unwrap();
    let backup = Registry::start(RegistryAuth::None).await.unwrap();
    node.trust_plain_http(&source.host()).unwrap();
    node.trust_plain_http(&backup.host()).unwrap();
    let platform = runnable_image();
    let image = if multi {
        // The arm64 part and the attestations stay in the source: the
        // kubelet pulls only its own platform.
        let arm64 = PlatformImage::build(MediaTypes::Oci, &[64 << 10], "linux", "arm64", 61);
        let attestation = |seed| PlatformImage::build(MediaTypes::Oci, &[1 << 10], "unknown", "unknown", seed);
        TestImage::indexed(MediaTypes::Oci, vec![platform, arm64], vec![attestation(62), attestation(63)])
    } else {
        TestImage::of(MediaTypes::Oci, platform)
    };
    source.push("e2e/sleeper", "1", &image).await.unwrap();
    let source_ref = format!("{}/e2e/sleeper:1", source.host());

    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = sleeper(&ns, "sleeper", &source_ref);
    deployments.create(&PostParams::default(), &deployment).await.unwrap();
    eventually("the kubelet runs the source image", Duration::from_secs(120), || {
        rolled_out(&deployments, "sleeper", None)
    })
    .await;

    let source_host = source.host();
    let mut source = Some(source);
    if multi {
        // Nothing can come from the source: the backup is what the node has.
        source = None;
    }
    // The coordinator and an agent on the node's own containerd.
    let coordinator = start_coordinator(&client, &client, coordinator_config(&backup.host())).await;
    // Registries given up on after 10 s, not the agent's default 2 min: the
    // gone source of the multi-platform case is tried before the index is
    // reduced, and how long the agent retries is not what this tests.
    let registry = quick_retries(&backup.host(), Duration::from_secs(10));
    // The agent proves who it is with the token the kubelet projects into
    // a real agent pod on this node.
    let token = node.agent_token(&client).await.expect("a projected agent token");
    let link = coordinator.link_with(&node.node_name, &token);
    start_agent_on(&node.containerd_socket, K8S_NAMESPACE, &node.node_name, link, registry, 2).await;

    let repository = format!("backup/{}/e2e/sleeper", source_host.replace(':', "_"));
    let pinned_to = format!("{}/{repository}@", backup.host());
    eventually("the Deployment is patched to the backup", Duration::from_secs(120), || async {
        let now = deployments.get("sleeper").await.map_err(|e| e.to_string())?;
        let image = now.spec.template.spec.and_then(|s| s.containers[0].image.clone());
        if image.as_deref().is_some_and(|i| i.starts_with(&pinned_to)) {
            Ok(())
        } else {
            Err(format!("runs {image:?}"))
        }
    })
    .await;
    eventually("the patched Deployment rolls out", Duration::from_secs(120), || {
        rolled_out(&deployments, "sleeper", None)
    })
    .await;
    let backups: Api<ImageBackup> = Api::all(client.clone());
    let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&source_ref).unwrap());
    let status = backups.get(&name).await.unwrap().status.unwrap_or_default();
    assert_eq!((status.phase, status.node.as_deref()), (Phase::Completed, Some(node.node_name.as_str())));
    // The kubelet reported the index digest; the backup is that index, or
    // a reduced one annotated with it.
    let patched = deployments.get("sleeper").await.unwrap();
    let running = patched.spec.template.spec.and_then(|s| s.containers[0].image.clone()).unwrap();
    let digest = running.rsplit_once('@').unwrap().1.to_string();
    let stored = backup.manifest(&repository, &digest).await.unwrap().expect("the backup registry serves the digest");
    if multi {
        assert!(status.reduced, "{status:?}");
        assert_eq!(status.left_out, ["linux/arm64", "unknown/unknown (attestation)", "unknown/unknown (attestation)"]);
        let index: serde_json::Value = serde_json::from_slice(&stored.bytes).unwrap();
        assert_eq!(index["manifests"][0]["digest"], image.platforms[0].manifest.digest.as_str());
        assert_eq!(index["manifests"].as_array().unwrap().len(), 1);
        assert_eq!(index["annotations"][image_backup_oci::index::SOURCE_INDEX_ANNOTATION], image.digest());
    } else {
        assert_eq!(digest, image.digest());
    }

    // The source disappears and the node forgets the image: the next pod
    // can only come from the backup registry.
    drop(source.take());
    let mut forgotten = node.forget(image.digest()).await.unwrap();
    if digest != image.digest() {
        forgotten.extend(node.forget(&digest).await.unwrap());
    }
    assert!(forgotten.iter().any(|name| name.starts_with(&backup.host())), "{forgotten:?}");
    let store = ContainerdStore::connect(&node.containerd_socket, K8S_NAMESPACE).await.unwrap();
    let manifest = store.info(&digest).await.unwrap();
    assert!(manifest.is_none(), "the node's content store no longer holds the manifest: {manifest:?}");
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let selector = ListParams::default().labels("app=sleeper");
    let old: Vec<String> =
        pods.list(&selector).await.unwrap().items.into_iter().filter_map(|pod| pod.metadata.name).collect();
    for pod in &old {
        pods.delete(pod, &DeleteParams::default().grace_period(0)).await.unwrap();
    }
    eventually("a new pod runs, pulled from the backup", Duration::from_secs(120), || async {
        let list = pods.list(&selector).await.map_err(|e| e.to_string())?;
        let running = list.items.iter().find(|pod| {
            let name = pod.metadata.name.clone().unwrap_or_default();
            let status = pod.status.as_ref();
            let ready = status.and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first());
            !old.contains(&name)
                && pod.metadata.deletion_timestamp.is_none()
                && ready.is_some_and(|c| c.ready && c.image_id.ends_with(&digest))
        });
        running.map(|_| ()).ok_or_else(|| format!("{} pod(s), none new and ready", list.items.len()))
    })
    .await;
    let held: Vec<String> = store
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .filter(|record| record.target.digest == digest)
        .map(|record| record.name)
        .collect();
    assert!(held.iter().any(|name| name.starts_with(&backup.host())), "pulled from the backup: {held:?}");
    assert!(store.info(&digest).await.unwrap().is_some(), "the manifest is back, from the backup registry");

    deployments.delete("sleeper", &DeleteParams::default()).await.unwrap();
}
