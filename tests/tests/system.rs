//! The whole loop on real containerd (two nodes, an agent each), real
//! registries and an API server (the emulator, and a real one when
//! IMAGE_BACKUP_TEST_KUBECONFIG gives it): ready workloads -> ImageBackups
//! -> agents -> verified backups -> workloads patched to pinned backup
//! references. Each scenario runs on its own, so one failure hides no other.
//!
//! There is no kubelet or controller-manager: the tests write the Pods and
//! the workload statuses those would write, with the digests containerd
//! holds (what a kubelet decides is tested on a real node, in real_node.rs).

use std::time::Duration;

use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::{digest_tag, registry::RegistryConfig};
use image_backup_proto::v1::{GetJobRequest, ListJobsRequest, job_service_client::JobServiceClient};
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, ClusterGuard, Placement, Workloads, agent_client, cluster, coordinator_client,
        coordinator_config, eventually, metric, prepare, quick_retries,
    },
    containerd::NAMESPACE,
    init_tracing, on_both_api_servers,
    run::{Coordinator, reader_token, start_agent, start_agent_on, start_coordinator, with_token},
};
use k8s_openapi::api::apps::v1::Deployment;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;

const MB: usize = 1 << 20;

/// Two nodes, a backup registry behind a counting proxy, and a source
/// registry that is only a name: it is gone before the backups run, and
/// they still succeed, from the nodes' content.
struct Setup {
    kind: ApiServerKind,
    _cluster: ClusterGuard,
    client: Client,
    w: Workloads,
    src: String,
    node_a: Containerd,
    node_b: Containerd,
    backup_registry: Registry,
    proxy: Proxy,
}

impl Setup {
    async fn new(kind: ApiServerKind, namespaces: &[&str]) -> Option<Self> {
        init_tracing();
        let (cluster, client) = cluster(kind).await?;
        prepare(&client, namespaces).await;
        let source = Registry::start(RegistryAuth::None).await.unwrap();
        let src = source.host();
        drop(source);
        let backup_registry = Registry::start(RegistryAuth::None).await.unwrap();
        let proxy = Proxy::start(&backup_registry.host(), Faults::default()).await.unwrap();
        Some(Self {
            kind,
            _cluster: cluster,
            w: Workloads { client: client.clone() },
            client,
            src,
            node_a: Containerd::start().await.unwrap(),
            node_b: Containerd::start().await.unwrap(),
            backup_registry,
            proxy,
        })
    }

    fn backup_host(&self) -> String {
        self.proxy.host()
    }

    fn registry_config(&self) -> RegistryConfig {
        RegistryConfig { insecure_hosts: vec![self.backup_host()], ..RegistryConfig::default() }
    }

    async fn start_coordinator(&self) -> Coordinator {
        let client = coordinator_client(self.kind, &self.client).await;
        start_coordinator(&self.client, &client, coordinator_config(&self.backup_host()))
            .await
            .with_agents_client(agent_client(self.kind, &self.client).await)
    }

    /// The coordinator and an agent on each node.
    async fn start(&self) -> Coordinator {
        let coordinator = self.start_coordinator().await;
        for (node, containerd) in [("node-a", &self.node_a), ("node-b", &self.node_b)] {
            start_agent(containerd, node, &coordinator, self.registry_config()).await;
        }
        coordinator
    }

    /// `SRC/<path>` for an image of the source registry.
    fn source(&self, path: &str) -> String {
        format!("{}/{path}", self.src)
    }

    /// The pinned backup reference of `reference` at the image's digest.
    fn pinned(&self, image: &TestImage, reference: &str) -> String {
        let (name, _) = reference.rsplit_once(':').unwrap();
        let path = name.replacen(&self.src, &self.src.replace(':', "_"), 1);
        format!("{}/backup/{path}@{}", self.backup_host(), image.digest())
    }

    async fn deploy(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        containers: &[(&str, &str, &TestImage, bool)],
        nodes: &[&str],
    ) {
        let specs: Vec<_> = containers.iter().map(|(c, r, i, init)| (*c, *r, i.digest(), *init)).collect();
        self.w.deploy(kind, ns, name, json!({}), &specs, Placement { nodes, ready: true }).await;
    }

    /// Waits until each workload runs exactly `images`.
    async fn runs(&self, what: &str, expected: &[(&str, &str, &str, Vec<String>)]) {
        eventually(what, Duration::from_secs(90), || async {
            for (kind, ns, name, images) in expected {
                let (now, annotation) = self.w.images(kind, ns, name).await;
                if now != *images || annotation.is_none() {
                    return Err(format!("{kind} {ns}/{name} runs {now:?}"));
                }
            }
            Ok(())
        })
        .await;
    }
}

async fn whole_loop(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, &["shop", "ops", "image-backup"]).await else { return };
    let web = TestImage::single(MediaTypes::Oci, &[MB, 300 << 10], 31);
    let migrate = TestImage::single(MediaTypes::Docker, &[200 << 10], 32);
    let api = TestImage::single(MediaTypes::Oci, &[MB], 33);
    let (web_ref, migrate_ref, api_ref) =
        (s.source("library/web:1"), s.source("tools/migrate:7"), s.source("team/api:2"));
    web.import(&s.node_a, &web_ref, &[], &[]).await.unwrap();
    web.import(&s.node_b, &web_ref, &[], &[]).await.unwrap();
    migrate.import(&s.node_a, &migrate_ref, &[], &[]).await.unwrap();
    api.import(&s.node_b, &api_ref, &[], &[]).await.unwrap();
    s.deploy(
        "Deployment",
        "shop",
        "web",
        &[("migrate", &migrate_ref, &migrate, true), ("web", &web_ref, &web, false)],
        &["node-a"],
    )
    .await;
    s.deploy("DaemonSet", "ops", "logger", &[("web", &web_ref, &web, false)], &["node-a", "node-b"]).await;
    s.deploy("Deployment", "shop", "api", &[("api", &api_ref, &api, false)], &["node-b"]).await;
    let coordinator = s.start().await;
    let metrics_url = coordinator.metrics_url.clone();

    s.runs(
        "web, logger and api run their backups",
        &[
            ("Deployment", "shop", "web", vec![s.pinned(&migrate, &migrate_ref), s.pinned(&web, &web_ref)]),
            ("DaemonSet", "ops", "logger", vec![s.pinned(&web, &web_ref)]),
            ("Deployment", "shop", "api", vec![s.pinned(&api, &api_ref)]),
        ],
    )
    .await;

    // Every ImageBackup is Completed, pinned, and the registry serves the
    // digest the pods ran.
    let backups: Api<ImageBackup> = Api::all(s.client.clone());
    let all = backups.list(&Default::default()).await.unwrap().items;
    assert_eq!(all.len(), 3, "{:?}", all.iter().map(|b| &b.spec.source).collect::<Vec<_>>());
    for (image, reference) in [(&web, &web_ref), (&migrate, &migrate_ref), (&api, &api_ref)] {
        let backup = all.iter().find(|b| &b.spec.source == reference).expect("an ImageBackup per image");
        let status = backup.status.clone().unwrap();
        assert_eq!(status.phase, Phase::Completed, "{reference}");
        assert_eq!(status.backup_reference, Some(s.pinned(image, reference)));
        let pinned = s.pinned(image, reference);
        let (repository, _) = pinned.split_once('/').unwrap().1.split_once('@').unwrap();
        let served = s.backup_registry.manifest(repository, image.digest()).await.unwrap();
        assert_eq!(served.expect("served by digest").digest, image.digest());
    }
    // Each distinct image was copied once: one upload per distinct blob.
    let blobs: usize = [&web, &migrate, &api].iter().map(|i| i.platforms[0].layers.len() + 1).sum();
    assert_eq!(s.proxy.uploads(), blobs as u64);

    // JobService lists the jobs and says which workloads use an image.
    // As a person with the job reader role reads them.
    let token = reader_token(&s.client).await;
    let mut jobs = JobServiceClient::new(coordinator.channel().await);
    let list = || {
        let mut jobs = jobs.clone();
        let request = with_token(ListJobsRequest::default(), &token);
        async move { jobs.list_jobs(request).await.map(|r| r.into_inner().jobs).map_err(|e| e.to_string()) }
    };
    eventually("the reader's RBAC takes effect", Duration::from_secs(30), || async { list().await.map(|_| ()) }).await;
    let listed = list().await.unwrap();
    assert_eq!(listed.len(), 3);
    let shared = jobs.get_job(with_token(GetJobRequest { name: web_ref.clone() }, &token)).await.unwrap().into_inner();
    assert_eq!(shared.workloads, ["DaemonSet/ops/logger", "Deployment/shop/web"]);

    // The rewrite is an Event on the workload.
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(s.client.clone(), "shop");
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
        "image_backup_status_writes_total{transition=\"completed\"} 3",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line} in\n{metrics}");
    }
    let reconciles = metric(&metrics_url, "image_backup_reconciles_total{kind=\"Deployment\"}").await.unwrap();
    assert!(reconciles >= 2.0, "each Deployment reconciled, then patched: {reconciles}");
}
on_both_api_servers!(whole_loop: the_whole_loop_on_the_emulator, the_whole_loop_on_a_real_api_server);

async fn left_alone(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, &["shop", "kube-system", "image-backup"]).await else { return };
    let web = TestImage::single(MediaTypes::Oci, &[300 << 10], 41);
    let api = TestImage::single(MediaTypes::Oci, &[200 << 10], 42);
    let late = TestImage::single(MediaTypes::Oci, &[100 << 10], 43);
    let (web_ref, api_ref, late_ref) = (s.source("library/web:1"), s.source("team/api:2"), s.source("team/late:1"));
    web.import(&s.node_a, &web_ref, &[], &[]).await.unwrap();
    api.import(&s.node_b, &api_ref, &[], &[]).await.unwrap();
    late.import(&s.node_b, &late_ref, &[], &[]).await.unwrap();
    let mirrored = format!("{}/backup/already/there:1", s.backup_host());
    s.deploy("Deployment", "shop", "web", &[("web", &web_ref, &web, false)], &["node-a"]).await;
    s.deploy("Deployment", "kube-system", "system", &[("web", &web_ref, &web, false)], &["node-a"]).await;
    let skip = json!({ "backup.k8slab.io/skip": "true" });
    let api_spec = [("api", api_ref.as_str(), api.digest(), false)];
    s.w.deploy("Deployment", "shop", "skipped", skip, &api_spec, Placement { nodes: &["node-b"], ready: true }).await;
    let zero = "sha256:0000000000000000000000000000000000000000000000000000000000000000";
    let mirrored_spec = [("m", mirrored.as_str(), zero, false)];
    s.w.deploy(
        "Deployment",
        "shop",
        "mirrored",
        json!({}),
        &mirrored_spec,
        Placement { nodes: &["node-a"], ready: true },
    )
    .await;
    let late_spec = [("late", late_ref.as_str(), late.digest(), false)];
    s.w.deploy("Deployment", "shop", "late", json!({}), &late_spec, Placement { nodes: &["node-b"], ready: false })
        .await;
    let metrics_url = s.start().await.metrics_url;

    // web is patched, and the coordinator has reconciled more often than
    // there are Deployments: it looked at the others too.
    s.runs("web runs its backup", &[("Deployment", "shop", "web", vec![s.pinned(&web, &web_ref)])]).await;
    eventually("every Deployment reconciled", Duration::from_secs(10), || async {
        let reconciles = metric(&metrics_url, "image_backup_reconciles_total{kind=\"Deployment\"}").await?;
        if reconciles >= 6.0 { Ok(()) } else { Err(format!("{reconciles} reconciles")) }
    })
    .await;
    let untouched = || async {
        assert_eq!(s.w.images("Deployment", "kube-system", "system").await, (vec![web_ref.clone()], None));
        assert_eq!(s.w.images("Deployment", "shop", "skipped").await, (vec![api_ref.clone()], None));
        assert_eq!(s.w.images("Deployment", "shop", "mirrored").await, (vec![mirrored.clone()], None));
    };
    untouched().await;
    assert_eq!(s.w.images("Deployment", "shop", "late").await, (vec![late_ref.clone()], None));
    let backups: Api<ImageBackup> = Api::all(s.client.clone());
    let sources = || async {
        let mut sources: Vec<String> =
            backups.list(&Default::default()).await.unwrap().items.into_iter().map(|b| b.spec.source).collect();
        sources.sort();
        sources
    };
    assert_eq!(
        sources().await,
        std::slice::from_ref(&web_ref),
        "nothing is backed up for skipped, mirrored or unready workloads"
    );

    // The late workload becomes ready and is handled then.
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), "shop");
    let generation = deployments.get("late").await.unwrap().metadata.generation.unwrap_or(1);
    let status = json!({ "status": { "observedGeneration": generation, "replicas": 1, "updatedReplicas": 1, "readyReplicas": 1, "availableReplicas": 1 } });
    deployments.patch_status("late", &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    s.runs("late runs its backup once ready", &[("Deployment", "shop", "late", vec![s.pinned(&late, &late_ref)])])
        .await;
    // Long after the first look, the others are still left alone.
    untouched().await;
    let mut expected = [web_ref.clone(), late_ref.clone()];
    expected.sort();
    assert_eq!(sources().await, expected);
}
on_both_api_servers!(left_alone: excluded_and_unready_workloads_are_left_alone_on_the_emulator, excluded_and_unready_workloads_are_left_alone_on_a_real_api_server);

async fn moved_tag(kind: ApiServerKind) {
    let Some(mut s) = Setup::new(kind, &["shop", "image-backup"]).await else { return };
    let web = TestImage::single(MediaTypes::Oci, &[300 << 10], 51);
    let web_ref = s.source("library/web:1");
    web.import(&s.node_a, &web_ref, &[], &[]).await.unwrap();
    s.deploy("Deployment", "shop", "web", &[("web", &web_ref, &web, false)], &["node-a"]).await;
    s.start().await;
    s.runs("web runs its backup", &[("Deployment", "shop", "web", vec![s.pinned(&web, &web_ref)])]).await;

    // The tag moves: a new workload runs web:1 with other content. The
    // ImageBackup follows the digest its pods run, and web keeps the copy
    // it was pinned to.
    let next = TestImage::single(MediaTypes::Oci, &[200 << 10], 52);
    next.import(&s.node_b, &web_ref, &[], &[]).await.unwrap();
    s.deploy("Deployment", "shop", "web-next", &[("web", &web_ref, &next, false)], &["node-b"]).await;
    s.runs(
        "web-next runs the new digest's backup",
        &[("Deployment", "shop", "web-next", vec![s.pinned(&next, &web_ref)])],
    )
    .await;
    assert_eq!(s.w.images("Deployment", "shop", "web").await.0, [s.pinned(&web, &web_ref)]);
    let repository = format!("backup/{}/library/web", s.src.replace(':', "_"));
    for (image, what) in [(&web, "the old digest, for the workloads pinned to it"), (&next, "the new digest")] {
        let served = s.backup_registry.manifest(&repository, image.digest()).await.unwrap();
        assert_eq!(served.map(|m| m.digest).as_deref(), Some(image.digest()), "{what}");
    }
    // The one ImageBackup of web:1 now stands for the new digest.
    let backups: Api<ImageBackup> = Api::all(s.client.clone());
    let items = backups.list(&Default::default()).await.unwrap().items;
    let [backup] = items.as_slice() else { panic!("one ImageBackup per source: {items:?}") };
    let status = backup.status.clone().unwrap_or_default();
    assert_eq!((backup.spec.digest.as_str(), status.phase), (next.digest(), Phase::Completed));
    assert_eq!(status.backup_reference, Some(s.pinned(&next, &web_ref)));

    // The backup tag `1` names the new digest now; each digest also has a
    // tag of its own that nothing moves, so a registry's cleanup of
    // untagged manifests keeps what web is pinned to.
    let tags = s.backup_registry.tags(&repository).await.unwrap();
    for image in [&web, &next] {
        assert!(tags.contains(&digest_tag(image.digest())), "{tags:?}");
    }
    // A control whose tag moved the same way, with no digest tag: the
    // cleanup really deletes what it leaves untagged.
    let (old, new) =
        (TestImage::single(MediaTypes::Oci, &[8 << 10], 53), TestImage::single(MediaTypes::Oci, &[8 << 10], 54));
    s.backup_registry.push("control/app", "1", &old).await.unwrap();
    s.backup_registry.push("control/app", "1", &new).await.unwrap();
    let report = s.backup_registry.collect_untagged().unwrap();
    assert!(s.backup_registry.manifest("control/app", old.digest()).await.unwrap().is_none(), "{report}");
    assert!(s.backup_registry.manifest("control/app", new.digest()).await.unwrap().is_some());
    for image in [&web, &next] {
        let served = s.backup_registry.manifest(&repository, image.digest()).await.unwrap();
        assert_eq!(served.map(|m| m.digest).as_deref(), Some(image.digest()), "kept by its digest tag");
        let platform = &image.platforms[0];
        for blob in std::iter::once(&platform.config).chain(&platform.layers) {
            let bytes = s.backup_registry.blob(&repository, &blob.digest).await.unwrap();
            assert_eq!(bytes.as_deref(), Some(&blob.data[..]), "blob {}", blob.digest);
        }
    }
}
on_both_api_servers!(moved_tag: a_moved_tag_is_copied_again_on_the_emulator, a_moved_tag_is_copied_again_on_a_real_api_server);

async fn old_revision(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, &["shop", "image-backup"]).await else { return };
    // The tag moved and both workloads rolled out: pods of the old
    // revision linger, some terminating, some not yet, running the old
    // content. Their selector matches them all.
    let (before, now) =
        (TestImage::single(MediaTypes::Oci, &[200 << 10], 55), TestImage::single(MediaTypes::Oci, &[300 << 10], 56));
    let web_ref = s.source("library/web:1");
    before.import(&s.node_a, &s.source("library/web:0"), &[], &[]).await.unwrap();
    now.import(&s.node_a, &web_ref, &[], &[]).await.unwrap();
    now.import(&s.node_b, &web_ref, &[], &[]).await.unwrap();
    for (kind, name) in [("Deployment", "web"), ("DaemonSet", "web-agent")] {
        s.deploy(kind, "shop", name, &[("web", &web_ref, &now, false)], &["node-b"]).await;
        let old = [("web", web_ref.as_str(), before.digest(), false)];
        s.w.old_revision(kind, "shop", name, &old, &["node-a"], false).await;
        s.w.old_revision(kind, "shop", name, &old, &["node-a"], true).await;
    }
    s.start().await;

    let pinned = vec![s.pinned(&now, &web_ref)];
    s.runs(
        "both run the backup of what their current revision runs",
        &[("Deployment", "shop", "web", pinned.clone()), ("DaemonSet", "shop", "web-agent", pinned)],
    )
    .await;
    let backups: Api<ImageBackup> = Api::all(s.client.clone());
    let items = backups.list(&Default::default()).await.unwrap().items;
    let [backup] = items.as_slice() else { panic!("one ImageBackup: {items:?}") };
    assert_eq!(backup.spec.digest, now.digest(), "never the old revision's digest");
}
on_both_api_servers!(old_revision: only_pods_of_the_current_revision_give_the_digest_on_the_emulator, only_pods_of_the_current_revision_give_the_digest_on_a_real_api_server);

async fn busy_agent(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, &["shop", "image-backup"]).await else { return };
    let images: Vec<(TestImage, String)> = (0..3)
        .map(|i| (TestImage::single(MediaTypes::Oci, &[100 << 10], 60 + i), s.source(&format!("team/app-{i}:1"))))
        .collect();
    for (i, (image, reference)) in images.iter().enumerate() {
        image.import(&s.node_a, reference, &[], &[]).await.unwrap();
        s.deploy("Deployment", "shop", &format!("app-{i}"), &[("app", reference, image, false)], &["node-a"]).await;
    }
    // The registry is down, so the agent's one slot stays taken.
    s.proxy.set_faults(Faults { unavailable_every: Some(1), ..Faults::default() });
    let coordinator = s.start_coordinator().await;
    let registry = quick_retries(&s.backup_host(), Duration::from_secs(60));
    start_agent_on(&s.node_a.socket(), NAMESPACE, "node-a", coordinator.link("node-a").await, registry, 1).await;

    let backups: Api<ImageBackup> = Api::all(s.client.clone());
    // One job copies, the others wait for the agent, saying so.
    let settled = || async {
        let all = backups.list(&Default::default()).await.map_err(|e| e.to_string())?.items;
        let copying: Vec<&ImageBackup> = all
            .iter()
            .filter(|b| b.status.as_ref().is_some_and(|st| matches!(st.phase, Phase::Assigned | Phase::Pushing)))
            .collect();
        let waiting = all
            .iter()
            .filter_map(|b| b.status.as_ref())
            .filter(|st| {
                st.phase == Phase::Pending
                    && st.message.as_deref().is_some_and(|m| m.starts_with("waiting for a free agent"))
            })
            .count();
        match copying.as_slice() {
            [one] if waiting == 2 => Ok(one.metadata.clone()),
            _ => Err(format!(
                "{} copying, {waiting} waiting: {:?}",
                copying.len(),
                all.iter().map(|b| &b.status).collect::<Vec<_>>()
            )),
        }
    };
    eventually("one job copies, the others wait for the agent, saying so", Duration::from_secs(30), || async {
        settled().await.map(|_| ())
    })
    .await;

    // The copying ImageBackup is deleted: its copy stops, its slot goes to
    // a job at once, and its workload asks for the image again.
    let deleted = settled().await.unwrap();
    let name = deleted.name.clone().unwrap_or_default();
    backups.delete(&name, &Default::default()).await.unwrap();
    eventually("the deleted job is back and the agent busy again", Duration::from_secs(30), || async {
        settled().await?;
        let again = backups.get_opt(&name).await.map_err(|e| e.to_string())?;
        match again {
            Some(again) if again.metadata.uid != deleted.uid => Ok(()),
            _ => Err(format!("{name} not made again yet")),
        }
    })
    .await;

    // The registry comes back: each freed slot goes to a waiting job.
    s.proxy.set_faults(Faults::default());
    let expected: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, (image, reference))| ("Deployment", "shop", format!("app-{i}"), vec![s.pinned(image, reference)]))
        .collect();
    let expected: Vec<_> =
        expected.iter().map(|(k, ns, name, images)| (*k, *ns, name.as_str(), images.clone())).collect();
    s.runs("every app runs its backup", &expected).await;
}
on_both_api_servers!(busy_agent: a_busy_agent_takes_waiting_jobs_as_slots_free_on_the_emulator, a_busy_agent_takes_waiting_jobs_as_slots_free_on_a_real_api_server);
