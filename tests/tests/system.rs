//! The whole loop on real containerd (two nodes, an agent each), real
//! registries and an API server (the emulator, or a real one from
//! IMAGE_BACKUP_TEST_KUBECONFIG): ready workloads -> ImageBackups -> agents
//! -> verified backups -> workloads patched to pinned backup references.
//!
//! There is no kubelet or controller-manager: the test writes the Pods and
//! the workload statuses those would write, with the digests containerd
//! holds.

use std::{collections::BTreeMap, time::Duration};

use image_backup_agent::{
    containerd::{ContentStore, ReadPath},
    daemon::{Agent, DaemonConfig},
    push::{PushOptions, Pusher},
    registry::RegistryConfig,
};
use image_backup_coordinator::{
    config::CoordinatorConfig, naming::BackupTarget, rewrite::ORIGINAL_IMAGES_ANNOTATION, run::run,
    workload::Exclusions,
};
use image_backup_crds::{ImageBackup, Phase};
use image_backup_proto::v1::{ListJobsRequest, job_service_client::JobServiceClient};
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage, apiserver::ApiServer,
    containerd::NAMESPACE, init_tracing,
};
use k8s_openapi::{
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{Namespace, Pod},
    },
    apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

const MB: usize = 1 << 20;

/// The API server under test: a real one when a kubeconfig is given,
/// otherwise the in-process emulator (kept alive by the returned handle).
async fn cluster() -> (Option<ApiServer>, Client) {
    if let Ok(path) = std::env::var("IMAGE_BACKUP_TEST_KUBECONFIG") {
        let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("read IMAGE_BACKUP_TEST_KUBECONFIG");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.unwrap();
        return (None, Client::try_from(config).unwrap());
    }
    let server = ApiServer::start().await.unwrap();
    let client = server.client().await.unwrap();
    (Some(server), client)
}

async fn create<K>(api: &Api<K>, object: Value) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let object: K = serde_json::from_value(object).unwrap();
    match api.create(&PostParams::default(), &object).await {
        Ok(created) => created,
        Err(kube::Error::Api(s)) if s.code == 409 => api.get(&object.meta().name.clone().unwrap()).await.unwrap(),
        Err(e) => panic!("create {:?}: {e}", object.meta().name),
    }
}

struct Workloads {
    client: Client,
}

/// A container of a test workload: name, image, the digest its pods run,
/// and whether it is an init container.
type Spec<'a> = (&'a str, &'a str, &'a str, bool);

/// Where a test workload runs and how far its rollout is.
struct Placement<'a> {
    nodes: &'a [&'a str],
    ready: bool,
}

impl Workloads {
    /// A workload whose pods run `containers` ([name, image, digest]) on
    /// `nodes`; `ready` writes the rolled-out status a controller would.
    async fn deploy(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        labels: Value,
        containers: &[Spec<'_>],
        at: Placement<'_>,
    ) {
        let Placement { nodes, ready } = at;
        let (init, app): (Vec<_>, Vec<_>) = containers.iter().partition(|c| c.3);
        let spec_of =
            |list: &[&Spec<'_>]| list.iter().map(|c| json!({ "name": c.0, "image": c.1 })).collect::<Vec<_>>();
        let mut pod_spec = json!({ "containers": spec_of(&app) });
        if !init.is_empty() {
            pod_spec["initContainers"] = json!(spec_of(&init));
        }
        let object = json!({
            "apiVersion": "apps/v1", "kind": kind,
            "metadata": { "name": name, "namespace": ns, "labels": labels },
            "spec": {
                "replicas": if kind == "Deployment" { json!(nodes.len()) } else { Value::Null },
                "selector": { "matchLabels": { "app": name } },
                "template": { "metadata": { "labels": { "app": name } }, "spec": pod_spec },
            },
        });
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), ns);
        for (i, node) in nodes.iter().enumerate() {
            let pod = create(
                &pods,
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": format!("{name}-{i}"), "namespace": ns, "labels": { "app": name } },
                    "spec": { "nodeName": node, "containers": spec_of(&app) },
                }),
            )
            .await;
            let statuses = |list: &[&Spec<'_>]| {
                list.iter()
                    .map(|c| {
                        let repo = c.1.rsplit_once(':').map_or(c.1, |(r, _)| r);
                        json!({ "name": c.0, "image": c.1, "imageID": format!("{repo}@{}", c.2), "ready": true, "restartCount": 0 })
                    })
                    .collect::<Vec<_>>()
            };
            let status = json!({ "status": { "phase": "Running", "containerStatuses": statuses(&app), "initContainerStatuses": statuses(&init) } });
            pods.patch_status(&pod.metadata.name.unwrap(), &PatchParams::default(), &Patch::Merge(status))
                .await
                .unwrap();
        }
        let n = nodes.len();
        match kind {
            "Deployment" => {
                let api: Api<Deployment> = Api::namespaced(self.client.clone(), ns);
                let created = create(&api, object).await;
                if ready {
                    let generation = created.metadata.generation.unwrap_or(1);
                    let status = json!({ "status": { "observedGeneration": generation, "replicas": n, "updatedReplicas": n, "readyReplicas": n, "availableReplicas": n } });
                    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
                }
            }
            _ => {
                let api: Api<DaemonSet> = Api::namespaced(self.client.clone(), ns);
                let created = create(&api, object).await;
                if ready {
                    let generation = created.metadata.generation.unwrap_or(1);
                    let status = json!({ "status": { "observedGeneration": generation, "desiredNumberScheduled": n, "currentNumberScheduled": n, "numberMisscheduled": 0, "numberReady": n, "numberAvailable": n, "updatedNumberScheduled": n } });
                    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
                }
            }
        }
    }

    async fn images(&self, kind: &str, ns: &str, name: &str) -> (Vec<String>, Option<String>) {
        let value: Value = match kind {
            "Deployment" => {
                serde_json::to_value(Api::<Deployment>::namespaced(self.client.clone(), ns).get(name).await.unwrap())
                    .unwrap()
            }
            _ => serde_json::to_value(Api::<DaemonSet>::namespaced(self.client.clone(), ns).get(name).await.unwrap())
                .unwrap(),
        };
        let spec = &value["spec"]["template"]["spec"];
        let images = ["initContainers", "containers"]
            .iter()
            .flat_map(|list| spec[list].as_array().cloned().unwrap_or_default())
            .map(|c| c["image"].as_str().unwrap_or_default().to_string())
            .collect();
        let annotation = value["metadata"]["annotations"][ORIGINAL_IMAGES_ANNOTATION].as_str().map(str::to_string);
        (images, annotation)
    }
}

async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) if tokio::time::Instant::now() > deadline => {
                panic!("{what}: still not true after {timeout:?}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_workloads_end_up_on_verified_pinned_backups() {
    init_tracing();
    let (_server, client) = cluster().await;
    let crd: CustomResourceDefinition = serde_yaml::from_str(&image_backup_crds::crd_yaml().unwrap()).unwrap();
    create(&Api::<CustomResourceDefinition>::all(client.clone()), serde_json::to_value(crd).unwrap()).await;
    let backups: Api<ImageBackup> = Api::all(client.clone());
    eventually("CRD served", Duration::from_secs(10), || async {
        backups.list(&Default::default()).await.map(|_| ()).map_err(|e| e.to_string())
    })
    .await;
    for ns in ["shop", "ops", "kube-system", "image-backup"] {
        create(
            &Api::<Namespace>::all(client.clone()),
            json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": ns } }),
        )
        .await;
    }

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
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let grpc = listener.local_addr().unwrap();
    let metrics_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics_url = format!("http://{}/metrics", metrics_listener.local_addr().unwrap());
    tokio::spawn(run(
        client.clone(),
        config,
        listener,
        metrics_listener,
        "coordinator-0".into(),
        std::future::pending(),
    ));
    for (node, containerd) in [("node-a", &node_a), ("node-b", &node_b)] {
        let store =
            ContentStore::connect(&containerd.socket(), NAMESPACE).await.unwrap().with_read_path(ReadPath::Auto).await;
        let pusher = Pusher::new(
            store,
            RegistryConfig { insecure_hosts: vec![backup_host.clone()], ..RegistryConfig::default() },
            PushOptions::default(),
        );
        let agent = Agent::new(
            DaemonConfig {
                coordinator: format!("http://{grpc}"),
                node_name: node.into(),
                agent_id: format!("agent-{node}"),
                max_jobs: 2,
                reconnect_max: Duration::from_secs(1),
                progress_interval: Duration::from_millis(200),
            },
            pusher,
        );
        tokio::spawn(agent.run(std::future::pending()));
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
    let shared = all.iter().find(|b| b.spec.source == web_ref).unwrap();
    assert_eq!(shared.status.as_ref().unwrap().workloads, ["DaemonSet/ops/logger", "Deployment/shop/web"]);
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

    // Metrics tell the same story.
    let metrics = reqwest::get(&metrics_url).await.unwrap().text().await.unwrap();
    for line in [
        "image_backup_jobs{phase=\"Completed\"} 3",
        "image_backup_connected_agents 2",
        "image_backup_workload_patches_total{outcome=\"rewritten\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }

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
