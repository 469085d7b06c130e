//! Rollouts to backups that fail on a real node, and are undone: the kubelet
//! of the one-node cluster `.ci/run` starts really pulls, really fails and
//! reports ErrImagePull / ImagePullBackOff as a production node does.
//!
//! Needs the real one-node cluster that `.ci/run` starts (KUBECONFIG,
//! K8S_NODE_NAME, K8S_CONTAINERD_SOCKET, K8S_CERTS_D); skipped without it.

use std::time::Duration;

use image_backup_coordinator::config::CoordinatorConfig;
use image_backup_core::template::{HOLD_ANNOTATION, Hold, HoldReason, ORIGINAL_IMAGES_ANNOTATION};
use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::registry::RegistryConfig;
use image_backup_tests::{
    Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{coordinator_config, eventually, metric},
    node::{K8S_NAMESPACE, RealNode, image_of, rolled_out, runnable_image, scene, sleeper},
    run::{Coordinator, start_agent_on, start_coordinator},
};
use k8s_openapi::api::{apps::v1::Deployment, core::v1::Pod, events::v1::Event};
use kube::{
    Api, Client,
    api::{DeleteParams, ListParams, PostParams},
};

const WAIT: Duration = Duration::from_secs(120);

/// A backup registry that serves manifests but refuses layers to the
/// node's (anonymous) pulls: the coordinator finds the backup, patches the
/// Deployment, the new pod cannot pull it, and the coordinator moves the
/// Deployment back to its source image, where the old pod still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_whose_pods_cannot_pull_the_backup_is_undone() {
    let Some((node, client, ns)) = scene().await else { return };
    let source = Registry::start(RegistryAuth::None).await.unwrap();
    let backup = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy = Proxy::start(&backup.host(), Faults::default()).await.unwrap();
    node.trust_plain_http(&source.host()).unwrap();
    node.trust_plain_http(&proxy.host()).unwrap();

    // A runnable image of its own, in the source.
    let image = TestImage::of(MediaTypes::Oci, runnable_image());
    source.push("e2e/undo", "1", &image).await.unwrap();
    let source_ref = format!("{}/e2e/undo:1", source.host());
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let deployment = sleeper(&ns, "undo", &source_ref);
    deployments.create(&PostParams::default(), &deployment).await.unwrap();
    eventually("the kubelet runs the source image", WAIT, || rolled_out(&deployments, "undo", Some(&source_ref))).await;

    // Backed up first (report-only), while the node holds the image.
    let config = coordinator_config(&proxy.host());
    let registry = RegistryConfig { insecure_hosts: vec![proxy.host()], ..RegistryConfig::default() };
    let (first, agent) =
        start(&node, &client, CoordinatorConfig { report_only: true, ..config.clone() }, &registry).await;
    let backups: Api<ImageBackup> = Api::all(client.clone());
    let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&source_ref).unwrap());
    eventually("the image is backed up", WAIT, || async {
        let phase = backups.get_opt(&name).await.map_err(|e| e.to_string())?.and_then(|b| b.status).map(|s| s.phase);
        if phase == Some(Phase::Completed) { Ok(()) } else { Err(format!("{phase:?}")) }
    })
    .await;
    first.stop().await;
    agent.abort();

    // The node forgets the image, so a new pod must fetch it, and the
    // backup registry stops serving layers to pulls.
    node.forget(image.digest()).await.unwrap();
    proxy.set_faults(Faults { refuse_blob_reads: true, ..Faults::default() });
    let (coordinator, _agent) = start(&node, &client, config, &registry).await;

    eventually("the rollout to the backup fails and is undone", WAIT, || async {
        let hold = hold(&deployments).await;
        match hold {
            Some(hold) if hold.reason == HoldReason::RolloutFailed => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert!(proxy.faults() > 0, "the kubelet's pull of the backup was refused");
    let hold = hold(&deployments).await.unwrap();
    assert!(
        ["ErrImagePull", "ImagePullBackOff"].iter().any(|reason| hold.message.contains(reason)),
        "{}",
        hold.message
    );
    let now = deployments.get("undo").await.unwrap();
    assert_eq!(image_of(&now), source_ref, "moved back to the source image exactly");
    let annotations = now.metadata.annotations.unwrap_or_default();
    assert!(!annotations.contains_key(ORIGINAL_IMAGES_ANNOTATION), "{annotations:?}");
    assert!(annotations.contains_key(HOLD_ANNOTATION));

    // Where people look: an Event on the Deployment, a note on the
    // ImageBackup, a metric.
    let events: Api<Event> = Api::namespaced(client.clone(), &ns);
    let reasons: Vec<String> =
        events.list(&ListParams::default()).await.unwrap().items.into_iter().filter_map(|e| e.reason).collect();
    assert!(reasons.contains(&"RolloutFailed".to_string()), "{reasons:?}");
    eventually("the ImageBackup notes the failed rollout", WAIT, || async {
        let status = backups.get(&name).await.map_err(|e| e.to_string())?.status.unwrap_or_default();
        let noted = status
            .workloads
            .iter()
            .any(|n| n.workload == format!("Deployment/{ns}/undo") && n.reason == "RolloutFailed");
        if noted { Ok(()) } else { Err(format!("{:?}", status.workloads)) }
    })
    .await;
    let restored =
        metric(&coordinator.metrics_url, "image_backup_workloads_restored_total{outcome=\"rollout_failed\"}").await;
    assert_eq!(restored, Ok(1.0));

    // The source pod runs on, ready, and the workload is not moved again.
    eventually("the Deployment is rolled out on its source image", WAIT, || {
        rolled_out(&deployments, "undo", Some(&source_ref))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = pods.list(&ListParams::default().labels("app=undo")).await.unwrap();
    let ready = running.items.iter().filter(|pod| {
        let statuses = pod.status.as_ref().and_then(|s| s.container_statuses.clone()).unwrap_or_default();
        pod.metadata.deletion_timestamp.is_none() && statuses.iter().any(|c| c.ready && c.image == source_ref)
    });
    assert_eq!(ready.count(), 1, "the source pod runs on");
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert_eq!(image_of(&deployments.get("undo").await.unwrap()), source_ref, "held on the source");

    deployments.delete("undo", &DeleteParams::default()).await.unwrap();
    coordinator.stop().await;
}

/// A coordinator with `config` and an agent on the node's containerd.
async fn start(
    node: &RealNode,
    client: &Client,
    config: CoordinatorConfig,
    registry: &RegistryConfig,
) -> (Coordinator, tokio::task::JoinHandle<()>) {
    let coordinator = start_coordinator(client, client, config).await;
    let token = node.agent_token(client).await.expect("a projected agent token");
    let link = coordinator.link_with(&node.node_name, &token);
    let agent =
        start_agent_on(&node.containerd_socket, K8S_NAMESPACE, &node.node_name, link, registry.clone(), 2).await;
    (coordinator, agent)
}

async fn hold(deployments: &Api<Deployment>) -> Option<Hold> {
    let now = deployments.get("undo").await.ok()?;
    let text = now.metadata.annotations?.get(HOLD_ANNOTATION)?.clone();
    serde_json::from_str(&text).ok()
}
