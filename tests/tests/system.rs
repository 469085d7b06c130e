//! The whole loop on real containerd (two nodes, an agent each), real
//! registries and an API server (the emulator, or a real one from
//! IMAGE_BACKUP_TEST_KUBECONFIG): ready workloads -> ImageBackups -> agents
//! -> verified backups -> workloads patched to pinned backup references.
//!
//! There is no kubelet or controller-manager: the test writes the Pods and
//! the workload statuses those would write, with the digests containerd
//! holds.

use std::{collections::BTreeMap, time::Duration};

use image_backup_coordinator::{config::CoordinatorConfig, workloads::workload::Exclusions};
use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::BackupTarget;
use image_backup_oci::registry::RegistryConfig;
use image_backup_proto::v1::{GetJobRequest, ListJobsRequest, job_service_client::JobServiceClient};
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{Placement, Workloads, cluster, eventually, prepare, start_agent, start_coordinator},
    init_tracing,
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde_json::json;

const MB: usize = 1 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_workloads_end_up_on_verified_pinned_backups() {
    init_tracing();
    let (_server, client) = cluster().await;
    prepare(&client, &["shop", "ops", "kube-system", "image-backup"]).await;
    let backups: Api<ImageBackup> = Api::all(client.clone());

    // The source registry is only a name here: it is gone before the
    // backups run, and they still succeed, from the nodes' content.
    let source = Registry::start(RegistryAuth::None).await.unwrap();
    let src = source.host();
    drop(source);
    let backup_registry = Registry::start(RegistryAuth::None).await.unwrap();
    let proxy = Proxy::start(&backup_registry.host(), Faults::default()).await.unwrap();
    let node_a = Containerd::start().await.unwrap();
    let node_b = Containerd::start().await.unwrap();
    let web = TestImage::single(MediaTypes::Oci, &[MB, 300 << 10], 31);
    let migrate = TestImage::single(MediaTypes::Docker, &[200 << 10], 32);
    let api = TestImage::single(MediaTypes::Oci, &[MB], 33);
    let late = TestImage::single(MediaTypes::Oci, &[100 << 10], 34);
    let (web_ref, migrate_ref, api_ref, late_ref) = (
        format!("{src}/library/web:1"),
        format!("{src}/tools/migrate:7"),
        format!("{src}/team/api:2"),
        format!("{src}/team/late:1"),
    );
    web.import(&node_a, &web_ref, &[], &[]).await.unwrap();
    web.import(&node_b, &web_ref, &[], &[]).await.unwrap();
    migrate.import(&node_a, &migrate_ref, &[], &[]).await.unwrap();
    api.import(&node_b, &api_ref, &[], &[]).await.unwrap();
    late.import(&node_b, &late_ref, &[], &[]).await.unwrap();

    let backup_host = proxy.host();
    let mirrored_image = format!("{backup_host}/backup/already/there:1");
    let w = Workloads { client: client.clone() };
    w.deploy(
        "Deployment",
        "shop",
        "web",
        json!({}),
        &[("migrate", &migrate_ref, migrate.digest(), true), ("web", &web_ref, web.digest(), false)],
        Placement { nodes: &["node-a"], ready: true },
    )
    .await;
    w.deploy(
        "DaemonSet",
        "ops",
        "logger",
        json!({}),
        &[("web", &web_ref, web.digest(), false)],
        Placement { nodes: &["node-a", "node-b"], ready: true },
    )
    .await;
    w.deploy(
        "Deployment",
        "shop",
        "api",
        json!({}),
        &[("api", &api_ref, api.digest(), false)],
        Placement { nodes: &["node-b"], ready: true },
    )
    .await;
    w.deploy(
        "Deployment",
        "shop",
        "mirrored",
        json!({}),
        &[("m", &mirrored_image, "sha256:0000000000000000000000000000000000000000000000000000000000000000", false)],
        Placement { nodes: &["node-a"], ready: true },
    )
    .await;
    w.deploy(
        "Deployment",
        "kube-system",
        "system",
        json!({}),
        &[("web", &web_ref, web.digest(), false)],
        Placement { nodes: &["node-a"], ready: true },
    )
    .await;
    w.deploy(
        "Deployment",
        "shop",
        "skipped",
        json!({ "backup.k8slab.io/skip": "true" }),
        &[("api", &api_ref, api.digest(), false)],
        Placement { nodes: &["node-b"], ready: true },
    )
    .await;
    w.deploy(
        "Deployment",
        "shop",
        "late",
        json!({}),
        &[("late", &late_ref, late.digest(), false)],
        Placement { nodes: &["node-b"], ready: false },
    )
    .await;

    let config = CoordinatorConfig {
        backup: BackupTarget { registry: backup_host.clone(), prefix: "backup".into() },
        registry: RegistryConfig { insecure_hosts: vec![backup_host.clone()], ..RegistryConfig::default() },
        exclusions: Exclusions::new(Vec::new(), "image-backup"),
        report_only: false,
        max_attempts: 3,
        retry_backoff: Duration::from_millis(500),
        heartbeat_deadline: Duration::from_secs(10),
    };
    let (grpc, metrics_url) = start_coordinator(&client, config).await;
    let agent_registry = RegistryConfig { insecure_hosts: vec![backup_host.clone()], ..RegistryConfig::default() };
    for (node, containerd) in [("node-a", &node_a), ("node-b", &node_b)] {
        start_agent(containerd, node, grpc, agent_registry.clone()).await;
    }

    let expected: BTreeMap<&str, (&TestImage, &str)> = BTreeMap::from([
        (web_ref.as_str(), (&web, "web")),
        (migrate_ref.as_str(), (&migrate, "migrate")),
        (api_ref.as_str(), (&api, "api")),
    ]);
    let pinned = |image: &TestImage, reference: &str| {
        let (name, _) = reference.rsplit_once(':').unwrap();
        format!("{backup_host}/backup/{}@{}", name.replacen(&src, &src.replace(':', "_"), 1), image.digest())
    };
    eventually("web, logger and api run their backups", Duration::from_secs(90), || async {
        for (kind, ns, name, images) in [
            ("Deployment", "shop", "web", vec![pinned(&migrate, &migrate_ref), pinned(&web, &web_ref)]),
            ("DaemonSet", "ops", "logger", vec![pinned(&web, &web_ref)]),
            ("Deployment", "shop", "api", vec![pinned(&api, &api_ref)]),
        ] {
            let (now, annotation) = w.images(kind, ns, name).await;
            if now != images || annotation.is_none() {
                return Err(format!("{kind} {ns}/{name} runs {now:?}"));
            }
        }
        Ok(())
    })
    .await;

    // Every ImageBackup is Completed, pinned, and the registry serves the
    // digest the pods ran.
    let all = backups.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 3, "{:?}", all.iter().map(|b| &b.spec.source).collect::<Vec<_>>());
    for backup in &all {
        let (image, _) = expected[backup.spec.source.as_str()];
        let status = backup.status.clone().unwrap();
        assert_eq!(status.phase, Phase::Completed, "{}", backup.spec.source);
        assert_eq!(status.backup_reference.as_deref(), Some(pinned(image, &backup.spec.source).as_str()));
        let (repository, _) =
            status.backup_reference.as_deref().unwrap().split_once('/').unwrap().1.split_once('@').unwrap();
        let served = backup_registry.manifest(repository, image.digest()).await.unwrap().expect("served by digest");
        assert_eq!(served.digest, image.digest());
    }
    // Each distinct image was copied once: one upload per distinct blob.
    let blobs: usize = [&web, &migrate, &api].iter().map(|i| i.platforms[0].layers.len() + 1).sum();
    assert_eq!(proxy.uploads(), blobs as u64);

    // Left alone: kube-system, skipped, already a backup, not ready.
    assert_eq!(w.images("Deployment", "kube-system", "system").await, (vec![web_ref.clone()], None));
    assert_eq!(w.images("Deployment", "shop", "skipped").await, (vec![api_ref.clone()], None));
    assert_eq!(w.images("Deployment", "shop", "mirrored").await, (vec![mirrored_image.clone()], None));
    assert_eq!(w.images("Deployment", "shop", "late").await, (vec![late_ref.clone()], None));

    // JobService lists the jobs.
    let mut jobs = JobServiceClient::connect(format!("http://{grpc}")).await.unwrap();
    let listed = jobs.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(listed.len(), 3);
    // ... and which workloads use an image.
    let shared = jobs.get_job(GetJobRequest { name: web_ref.clone() }).await.unwrap().into_inner();
    assert_eq!(shared.workloads, ["DaemonSet/ops/logger", "Deployment/shop/web"]);

    // The rewrite is an Event on the workload.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(client.clone(), "shop");
    let rewritten: Vec<_> = events
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some("WorkloadRewritten"))
        .filter_map(|e| e.regarding.and_then(|r| r.name))
        .collect();
    assert!(rewritten.contains(&"web".to_string()) && rewritten.contains(&"api".to_string()), "{rewritten:?}");

    // Metrics tell the same story.
    let metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
    for line in [
        "image_backup_jobs{phase=\"Completed\"} 3",
        "image_backup_connected_agents 2",
        "image_backup_workload_patches_total{outcome=\"rewritten\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

    // The tag moves: a new workload runs web:1 with other content. The
    // ImageBackup follows the digest its pods run, and web keeps the copy
    // it was pinned to.
    let web_next = TestImage::single(MediaTypes::Oci, &[200 << 10], 35);
    web_next.import(&node_b, &web_ref, &[], &[]).await.unwrap();
    w.deploy(
        "Deployment",
        "shop",
        "web-next",
        json!({}),
        &[("web", &web_ref, web_next.digest(), false)],
        Placement { nodes: &["node-b"], ready: true },
    )
    .await;
    eventually("web-next runs the new digest's backup", Duration::from_secs(60), || async {
        let (now, _) = w.images("Deployment", "shop", "web-next").await;
        if now == [pinned(&web_next, &web_ref)] { Ok(()) } else { Err(format!("{now:?}")) }
    })
    .await;
    assert_eq!(w.images("Deployment", "shop", "web").await.0, [pinned(&migrate, &migrate_ref), pinned(&web, &web_ref)]);
    let old =
        backup_registry.manifest(&format!("backup/{}/library/web", src.replace(':', "_")), web.digest()).await.unwrap();
    assert!(old.is_some(), "the old digest stays in the registry for the workloads pinned to it");

    // The late workload becomes ready and is handled then.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), "shop");
    let generation = deployments.get("late").await.unwrap().metadata.generation.unwrap_or(1);
    let status = json!({ "status": { "observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1 } });
    deployments.patch_status("late", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    eventually("late runs its backup", Duration::from_secs(60), || async {
        let (now, _) = w.images("Deployment", "shop", "late").await;
        if now == [pinned(&late, &late_ref)] { Ok(()) } else { Err(format!("{now:?}")) }
    })
    .await;
}
