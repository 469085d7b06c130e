//! Multi-platform images as real clusters hold them: each node's containerd
//! keeps the index and only its own platform (as a kubelet pull leaves it);
//! the source registry holds the whole index, or is gone. On real
//! containerd (one per simulated node), real registries and an API server
//! (the emulator, and a real one when IMAGE_BACKUP_TEST_KUBECONFIG gives
//! it). The tests write the Pods a kubelet would, with the index digest as
//! `imageID`.

use std::time::Duration;

use base64::Engine as _;
use image_backup_coordinator::config::CoordinatorConfig;
use image_backup_crds::{ImageBackup, ImageBackupStatus, Phase};
use image_backup_oci::{
    index::{LEFT_OUT_ANNOTATION, SOURCE_INDEX_ANNOTATION, SOURCE_INDEX_BYTES_ANNOTATION},
    registry::{RegistryConfig, RetryPolicy},
};
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, ClusterGuard, Placement, Workloads, agent_client, cluster, coordinator_client,
        coordinator_config, eventually, prepare,
    },
    image::PlatformImage,
    init_tracing, on_both_api_servers,
    run::{Coordinator, start_agent, start_coordinator},
};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use serde_json::json;

/// Where the source registry stands.
enum Source {
    /// Stopped before the backup.
    Gone,
    /// Plain HTTP, anonymous, behind a counting proxy.
    Open,
    /// TLS and Basic auth: only the pods' pull secret opens it.
    Private,
}

const PULL_PASSWORD: &str = "pull-s3cret";

const KB: usize = 1 << 10;
const MB: usize = 1 << 20;

/// An amd64 node and an arm64 node, an agent on each, a backup registry
/// behind a counting proxy, and a source registry behind one too, or only
/// a name.
struct Setup {
    kind: ApiServerKind,
    _cluster: ClusterGuard,
    client: Client,
    w: Workloads,
    src: String,
    source: Option<(Registry, Option<Proxy>)>,
    amd64: Containerd,
    arm64: Containerd,
    backup_registry: Registry,
    proxy: Proxy,
}

impl Setup {
    async fn new(kind: ApiServerKind, source: Source) -> Option<Self> {
        init_tracing();
        let (cluster, client) = cluster(kind).await?;
        prepare(&client, &["shop", "image-backup"]).await;
        let (src, source) = match source {
            Source::Gone => (Registry::start(RegistryAuth::None).await.unwrap().host(), None),
            Source::Open => {
                let registry = Registry::start(RegistryAuth::None).await.unwrap();
                let proxy = Proxy::start(&registry.host(), Faults::default()).await.unwrap();
                (proxy.host(), Some((registry, Some(proxy))))
            }
            Source::Private => {
                let auth = RegistryAuth::TlsBasic { username: "puller".into(), password: PULL_PASSWORD.into() };
                let registry = Registry::start(auth).await.unwrap();
                (registry.host(), Some((registry, None)))
            }
        };
        let backup_registry = Registry::start(RegistryAuth::None).await.unwrap();
        let proxy = Proxy::start(&backup_registry.host(), Faults::default()).await.unwrap();
        Some(Self {
            kind,
            _cluster: cluster,
            w: Workloads { client: client.clone() },
            client,
            src,
            source,
            amd64: Containerd::start().await.unwrap(),
            arm64: Containerd::start().await.unwrap(),
            backup_registry,
            proxy,
        })
    }

    fn config(&self) -> CoordinatorConfig {
        coordinator_config(&self.proxy.host())
    }

    /// The coordinator and an agent on each node.
    async fn start(&self, config: CoordinatorConfig) -> Coordinator {
        let client = coordinator_client(self.kind, &self.client).await;
        let coordinator = start_coordinator(&self.client, &client, config)
            .await
            .with_agents_client(agent_client(self.kind, &self.client).await);
        // Quick retries: a source that is gone is given up on in a second.
        let private = self.source.as_ref().is_some_and(|(_, proxy)| proxy.is_none());
        let registry = RegistryConfig {
            insecure_hosts: if private { vec![self.proxy.host()] } else { vec![self.proxy.host(), self.src.clone()] },
            ca_bundle: self.source.as_ref().filter(|_| private).map(|(registry, _)| registry.ca_path()),
            retry: RetryPolicy {
                min_delay: Duration::from_millis(20),
                max_delay: Duration::from_millis(200),
                max_elapsed: Duration::from_secs(1),
            },
            ..RegistryConfig::default()
        };
        for (node, containerd) in [("node-amd64", &self.amd64), ("node-arm64", &self.arm64)] {
            start_agent(containerd, node, &coordinator, registry.clone()).await;
        }
        coordinator
    }

    /// Pulls `image` as the kubelets of both nodes would: the index and
    /// each node's own platform.
    async fn pull(&self, image: &TestImage, reference: &str) {
        image.import(&self.amd64, reference, &["amd64"], &[]).await.unwrap();
        image.import(&self.arm64, reference, &["arm64"], &[]).await.unwrap();
    }

    /// A DaemonSet on both nodes running `reference`.
    async fn daemonset(&self, name: &str, reference: &str, image: &TestImage) {
        let spec = [("app", reference, image.digest(), false)];
        let placement = Placement { nodes: &["node-amd64", "node-arm64"], ready: true };
        self.w.deploy("DaemonSet", "shop", name, json!({}), &spec, placement).await;
    }

    /// The backup repository of `reference` in the backup registry.
    fn repository(&self, reference: &str) -> String {
        let (name, _) = reference.rsplit_once(':').unwrap();
        format!("backup/{}", name.replacen(&self.src, &self.src.replace(':', "_"), 1))
    }

    async fn status(&self, reference: &str) -> ImageBackupStatus {
        let backups: Api<ImageBackup> = Api::all(self.client.clone());
        let all = backups.list(&Default::default()).await.unwrap().items;
        let backup = all.into_iter().find(|b| b.spec.source == reference);
        backup.and_then(|b| b.status).unwrap_or_default()
    }

    /// Waits until the DaemonSet runs `image` (a pinned reference).
    async fn runs(&self, name: &str, image: &str) {
        eventually(&format!("{name} runs {image}"), Duration::from_secs(60), || async {
            let (now, _) = self.w.images("DaemonSet", "shop", name).await;
            if now == [image] { Ok(()) } else { Err(format!("DaemonSet shop/{name} runs {now:?}")) }
        })
        .await;
    }

    /// Every blob and the manifest of `platform` are in the backup
    /// repository, byte for byte.
    async fn holds_platform(&self, repository: &str, platform: &PlatformImage) {
        for blob in platform.layers.iter().chain([&platform.config]) {
            let got = self.backup_registry.blob(repository, &blob.digest).await.unwrap();
            assert_eq!(got.as_deref(), Some(&blob.data[..]), "{repository} holds blob {}", blob.digest);
        }
        let manifest = self.backup_registry.manifest(repository, &platform.manifest.digest).await.unwrap();
        assert_eq!(manifest.expect("platform manifest").bytes, platform.manifest.data);
    }

    async fn events(&self, reason: &str) -> Vec<String> {
        self.events_in("shop", reason).await
    }

    /// Events of `reason` in `namespace` (those of cluster-scoped objects,
    /// ImageBackups, are in `default`).
    async fn events_in(&self, namespace: &str, reason: &str) -> Vec<String> {
        let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(self.client.clone(), namespace);
        let list = events.list(&Default::default()).await.unwrap().items;
        list.into_iter().filter(|e| e.reason.as_deref() == Some(reason)).filter_map(|e| e.note).collect()
    }
}

async fn mixed_cluster(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Gone).await else { return };
    let image = TestImage::multi_platform(MediaTypes::Oci, &[MB, 300 * KB], &["amd64", "arm64"], 41);
    let reference = format!("{}/library/web:1", s.src);
    s.pull(&image, &reference).await;
    s.daemonset("web", &reference, &image).await;
    s.start(s.config()).await;

    // The backup is the source index itself: same bytes, same digest,
    // gathered from the two nodes, each giving its own platform.
    let repository = s.repository(&reference);
    s.runs("web", &format!("{}/{repository}@{}", s.proxy.host(), image.digest())).await;
    let index = s.backup_registry.manifest(&repository, image.digest()).await.unwrap().expect("the index");
    assert_eq!(index.bytes, image.index.as_ref().unwrap().data);
    let tagged = s.backup_registry.manifest(&repository, "1").await.unwrap().expect("the tag");
    assert_eq!(tagged.digest, image.digest());
    for arch in ["amd64", "arm64"] {
        s.holds_platform(&repository, image.platform(arch)).await;
    }

    let status = s.status(&reference).await;
    assert_eq!((status.phase, status.reduced), (Phase::Completed, false));
    let from: Vec<(&str, Option<&str>)> =
        status.platforms.iter().map(|p| (p.platform.as_str(), p.copied_from.as_deref())).collect();
    assert_eq!(from, [("linux/amd64", Some("node/node-amd64")), ("linux/arm64", Some("node/node-arm64"))]);
    assert!(s.events("ReducedBackup").await.is_empty());
}
on_both_api_servers!(mixed_cluster: an_index_is_gathered_from_the_nodes_of_each_platform_on_the_emulator, an_index_is_gathered_from_the_nodes_of_each_platform_on_a_real_api_server);

async fn reduced(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Gone).await else { return };
    // buildx's attestation entries are in the index; no containerd pulls
    // them, and the source is gone.
    let image = TestImage::buildx(MediaTypes::Oci, MB, &[300 * KB], &["amd64", "arm64"], 42);
    let reference = format!("{}/team/api:2", s.src);
    s.pull(&image, &reference).await;
    s.daemonset("api", &reference, &image).await;
    s.start(s.config()).await;

    let repository = s.repository(&reference);
    eventually("the api DaemonSet runs a backup", Duration::from_secs(60), || async {
        let (now, _) = s.w.images("DaemonSet", "shop", "api").await;
        match now.first() {
            Some(image) if image.starts_with(&s.proxy.host()) => Ok(()),
            _ => Err(format!("api runs {now:?}")),
        }
    })
    .await;
    let pinned = s.w.images("DaemonSet", "shop", "api").await.0.remove(0);

    // Pinned to a reduced index: the two platforms the nodes hold, byte
    // for byte, annotated with the source index and what it left out.
    let (name, digest) = pinned.split_once('@').unwrap();
    assert_eq!(name, format!("{}/{repository}", s.proxy.host()));
    assert_ne!(digest, image.digest());
    let index = s.backup_registry.manifest(&repository, digest).await.unwrap().expect("the reduced index");
    let index: serde_json::Value = serde_json::from_slice(&index.bytes).unwrap();
    let children: Vec<&str> =
        index["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    let platforms: Vec<&str> = image.platforms.iter().map(|p| p.manifest.digest.as_str()).collect();
    assert_eq!(children, platforms);
    assert_eq!(index["annotations"][SOURCE_INDEX_ANNOTATION], image.digest());
    // It carries its proof: the source index's own bytes.
    let carried = index["annotations"][SOURCE_INDEX_BYTES_ANNOTATION].as_str().unwrap_or_default();
    let carried = base64::engine::general_purpose::STANDARD.decode(carried).unwrap();
    assert_eq!(carried, image.index.as_ref().unwrap().data);
    assert_eq!(
        index["annotations"][LEFT_OUT_ANNOTATION],
        "unknown/unknown (attestation),unknown/unknown (attestation)"
    );
    for platform in &image.platforms {
        s.holds_platform(&repository, platform).await;
    }
    // The base layer both platforms share went up once: base, one own
    // layer and a config per platform.
    assert_eq!(s.proxy.uploads(), 5);

    let status = s.status(&reference).await;
    assert_eq!((status.phase, status.reduced), (Phase::Completed, true));
    assert_eq!(status.backup_reference.as_deref(), Some(pinned.as_str()));
    assert_eq!(status.left_out, ["unknown/unknown (attestation)", "unknown/unknown (attestation)"]);
    assert!(status.source_error.is_some_and(|e| e.contains(&s.src)), "the source was tried first");
    // The Event follows the patch the test saw first.
    eventually("a ReducedBackup Event names what was left out", Duration::from_secs(30), || async {
        let notes = s.events("ReducedBackup").await;
        let named = notes.iter().any(|n| n.contains(&reference) && n.contains("unknown/unknown"));
        if named { Ok(()) } else { Err(format!("{notes:?}")) }
    })
    .await;
}
on_both_api_servers!(reduced: platforms_no_node_holds_are_left_out_of_a_reduced_index_on_the_emulator, platforms_no_node_holds_are_left_out_of_a_reduced_index_on_a_real_api_server);

async fn forged_reference(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Gone).await else { return };
    let image = TestImage::buildx(MediaTypes::Oci, 200 * KB, &[100 * KB], &["amd64", "arm64"], 44);
    let reference = format!("{}/team/forged:1", s.src);
    s.pull(&image, &reference).await;
    s.daemonset("forged", &reference, &image).await;
    // Backed up without patching, then the status is rewritten by someone
    // else: it names another manifest of the same backup repository.
    let first = s.start(CoordinatorConfig { report_only: true, ..s.config() }).await;
    eventually("the reduced backup completes", Duration::from_secs(60), || async {
        let status = s.status(&reference).await;
        if status.phase == Phase::Completed && status.reduced { Ok(()) } else { Err(format!("{status:?}")) }
    })
    .await;
    first.stop().await;
    let backups: Api<ImageBackup> = Api::all(s.client.clone());
    let mut backup = backups.list(&Default::default()).await.unwrap().items.remove(0);
    let real = backup.status.as_ref().and_then(|st| st.backup_reference.clone()).unwrap();
    let repository = s.repository(&reference);
    let other = format!("{}/{repository}@{}", s.proxy.host(), image.platforms[0].manifest.digest);
    backup.status.as_mut().unwrap().backup_reference = Some(other.clone());
    let name = backup.metadata.name.clone().unwrap();
    backups.replace_status(&name, &Default::default(), &backup).await.unwrap();

    // A coordinator that patches: it does not follow the forged reference,
    // and says so where people look.
    let client = coordinator_client(s.kind, &s.client).await;
    let _second = start_coordinator(&s.client, &client, s.config()).await;
    eventually("an UnverifiedBackup event", Duration::from_secs(30), || async {
        let notes = s.events_in("default", "UnverifiedBackup").await;
        if notes.iter().any(|n| n.contains(&other)) { Ok(()) } else { Err(format!("{notes:?}")) }
    })
    .await;
    assert_eq!(
        s.w.images("DaemonSet", "shop", "forged").await.0,
        std::slice::from_ref(&reference),
        "still on its source"
    );

    // The true reference, which the registry confirms, is followed.
    let mut backup = backups.get(&name).await.unwrap();
    backup.status.as_mut().unwrap().backup_reference = Some(real.clone());
    backups.replace_status(&name, &Default::default(), &backup).await.unwrap();
    s.runs("forged", &real).await;
}
on_both_api_servers!(forged_reference: a_forged_reduced_reference_is_not_followed_on_the_emulator, a_forged_reduced_reference_is_not_followed_on_a_real_api_server);

async fn complete_required(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Gone).await else { return };
    let image = TestImage::buildx(MediaTypes::Oci, 200 * KB, &[100 * KB], &["amd64", "arm64"], 43);
    let reference = format!("{}/team/strict:1", s.src);
    s.pull(&image, &reference).await;
    s.daemonset("strict", &reference, &image).await;
    s.start(CoordinatorConfig { require_complete_index: true, ..s.config() }).await;

    eventually("the backup fails", Duration::from_secs(60), || async {
        let status = s.status(&reference).await;
        if status.phase == Phase::Failed { Ok(()) } else { Err(format!("{status:?}")) }
    })
    .await;
    let last = s.status(&reference).await;
    let error = last.last_error.unwrap_or_default();
    assert!(error.contains("incomplete") && error.contains("unknown/unknown (attestation)"), "{error}");
    // What the nodes held is in the registry; no index, no tag, and the
    // workload still runs its source.
    let repository = s.repository(&reference);
    assert!(s.backup_registry.manifest(&repository, image.digest()).await.unwrap().is_none());
    assert!(s.backup_registry.tags(&repository).await.unwrap().is_empty());
    let (now, annotation) = s.w.images("DaemonSet", "shop", "strict").await;
    assert_eq!((now, annotation), (vec![reference.clone()], None));
}
on_both_api_servers!(complete_required: a_required_complete_index_fails_naming_what_is_missing_on_the_emulator, a_required_complete_index_fails_naming_what_is_missing_on_a_real_api_server);

async fn from_source(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Open).await else { return };
    let image = TestImage::buildx(MediaTypes::Oci, MB, &[300 * KB], &["amd64", "arm64"], 44);
    let reference = format!("{}/team/api:3", s.src);
    let (source, source_proxy) = s.source.as_ref().unwrap();
    let source_proxy = source_proxy.as_ref().unwrap();
    source.push("team/api", "3", &image).await.unwrap();
    // A cosign signature, and an OCI 1.1 artifact through the referrers
    // tag fallback (the distribution registry has no referrers API).
    let index = image.index.as_ref().unwrap();
    let fallback = format!("sha256-{}", image.digest().trim_start_matches("sha256:"));
    let signature = PlatformImage::artifact(index, "application/vnd.dev.cosign.simplesigning.v1+json", 71);
    let sbom = PlatformImage::artifact(index, "application/spdx+json", 72);
    let artifact = |p: &PlatformImage| TestImage {
        media: MediaTypes::Oci,
        platforms: vec![p.clone()],
        attestations: Vec::new(),
        index: None,
    };
    source.push("team/api", &format!("{fallback}.sig"), &artifact(&signature)).await.unwrap();
    source.push("team/api", &sbom.manifest.digest, &artifact(&sbom)).await.unwrap();
    let referrers = PlatformImage::referrers_index(&[(&sbom, "application/spdx+json")]);
    source.put_manifest("team/api", &fallback, &referrers).await.unwrap();
    s.pull(&image, &reference).await;
    s.daemonset("api", &reference, &image).await;
    s.start(s.config()).await;

    // The attestations no node holds come from the source: the backup is
    // the source index, byte for byte.
    let repository = s.repository(&reference);
    s.runs("api", &format!("{}/{repository}@{}", s.proxy.host(), image.digest())).await;
    let index = s.backup_registry.manifest(&repository, image.digest()).await.unwrap().expect("the index");
    assert_eq!(index.bytes, image.index.as_ref().unwrap().data);
    for platform in image.platforms.iter().chain(&image.attestations) {
        s.holds_platform(&repository, platform).await;
    }
    let status = s.status(&reference).await;
    assert_eq!((status.phase, status.reduced, status.source_error), (Phase::Completed, false, None));
    let from: Vec<&str> = status.platforms.iter().map(|p| p.copied_from.as_deref().unwrap_or_default()).collect();
    assert_eq!(from, ["node/node-amd64", "node/node-arm64", "source", "source"]);

    // Signatures and referrers came along, byte for byte, under the tags
    // cosign and OCI clients look up.
    for (reference, bytes) in [
        (format!("{fallback}.sig"), &signature.manifest.data),
        (fallback.clone(), &referrers.data),
        (sbom.manifest.digest.clone(), &sbom.manifest.data),
    ] {
        let served = s.backup_registry.manifest(&repository, &reference).await.unwrap();
        assert_eq!(served.map(|m| m.bytes).as_ref(), Some(bytes), "{reference} in the backup");
    }
    for blob in signature.layers.iter().chain(&sbom.layers) {
        assert!(s.backup_registry.blob(&repository, &blob.digest).await.unwrap().is_some());
    }
    let mut copied = status.referrers.clone();
    copied.sort();
    let mut expected = vec![fallback.clone(), format!("{fallback}.sig"), sbom.manifest.digest.clone()];
    expected.sort();
    assert_eq!((copied, status.referrers_error.clone()), (expected, None));

    // Nothing a node holds was read from the source again.
    let held: Vec<&str> = image
        .platforms
        .iter()
        .flat_map(|p| p.layers.iter().chain([&p.config, &p.manifest]))
        .map(|b| b.digest.as_str())
        .collect();
    let reads = source_proxy.reads();
    assert!(!reads.is_empty(), "the attestations were read from the source");
    assert!(reads.iter().all(|r| !held.contains(&r.as_str())), "read from the source: {reads:?}");
}
on_both_api_servers!(from_source: what_no_node_holds_comes_from_the_source_on_the_emulator, what_no_node_holds_comes_from_the_source_on_a_real_api_server);

async fn private_source(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Private).await else { return };
    let image = TestImage::buildx(MediaTypes::Oci, 200 * KB, &[100 * KB], &["amd64", "arm64"], 45);
    let reference = format!("{}/team/private:1", s.src);
    let (source, _) = s.source.as_ref().unwrap();
    source.push("team/private", "1", &image).await.unwrap();
    s.pull(&image, &reference).await;
    // The pods pull with their ServiceAccount's pull secret.
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("puller:{PULL_PASSWORD}"));
    let config = json!({ "auths": { s.src.clone(): { "auth": auth } } }).to_string();
    let secrets: Api<Secret> = Api::namespaced(s.client.clone(), "shop");
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/dockerconfigjson",
        "metadata": { "name": "source-pull", "namespace": "shop" },
        "stringData": { ".dockerconfigjson": config },
    });
    // Applied: a real server kept from an earlier run has one for another port.
    secrets
        .patch("source-pull", &PatchParams::apply("image-backup-tests").force(), &Patch::Apply(&secret))
        .await
        .unwrap();
    let accounts: Api<ServiceAccount> = Api::namespaced(s.client.clone(), "shop");
    let pull = json!({ "imagePullSecrets": [{ "name": "source-pull" }] });
    accounts.patch("default", &PatchParams::default(), &Patch::Merge(pull)).await.unwrap();
    s.daemonset("private", &reference, &image).await;
    s.start(s.config()).await;

    let repository = s.repository(&reference);
    s.runs("private", &format!("{}/{repository}@{}", s.proxy.host(), image.digest())).await;
    let status = s.status(&reference).await;
    let from: Vec<&str> = status.platforms.iter().map(|p| p.copied_from.as_deref().unwrap_or_default()).collect();
    assert_eq!(from, ["node/node-amd64", "node/node-arm64", "source", "source"]);
    for attestation in &image.attestations {
        s.holds_platform(&repository, attestation).await;
    }
    // The credentials came with the job, to its agent alone: no Secret
    // holds a copy, they are nowhere in the status, and agents read no
    // Secret (on a real API server, their RBAC refuses them the
    // coordinator's CA key).
    let own: Api<Secret> = Api::namespaced(s.client.clone(), "image-backup");
    let copies = own.list(&Default::default()).await.unwrap().items;
    assert!(copies.iter().all(|secret| !secret.metadata.name.as_deref().unwrap_or_default().starts_with("pull-")));
    let written = serde_json::to_string(&status).unwrap();
    assert!(!written.contains(PULL_PASSWORD) && !written.contains(&auth), "{written}");
    if s.kind == ApiServerKind::Real {
        let agents: Api<Secret> = Api::namespaced(agent_client(s.kind, &s.client).await, "image-backup");
        let refused = agents.get_opt("image-backup-ca").await.unwrap_err();
        assert!(matches!(&refused, kube::Error::Api(status) if status.code == 403), "{refused}");
    }
}
on_both_api_servers!(private_source: a_private_source_is_read_with_the_pods_pull_secret_on_the_emulator, a_private_source_is_read_with_the_pods_pull_secret_on_a_real_api_server);

async fn missing_layer(kind: ApiServerKind) {
    let Some(s) = Setup::new(kind, Source::Open).await else { return };
    // containerd skipped a layer whose snapshot it had (or discarded it
    // once unpacked): the nodes hold the image but not that layer.
    let image = TestImage::single(MediaTypes::Oci, &[300 * KB, 200 * KB], 46);
    let reference = format!("{}/team/thin:1", s.src);
    let (source, source_proxy) = s.source.as_ref().unwrap();
    source.push("team/thin", "1", &image).await.unwrap();
    let lacking = image.platforms[0].layers[0].digest.clone();
    for node in [&s.amd64, &s.arm64] {
        image.import(node, &reference, &[], &[&lacking]).await.unwrap();
    }
    s.daemonset("thin", &reference, &image).await;
    s.start(s.config()).await;

    let repository = s.repository(&reference);
    s.runs("thin", &format!("{}/{repository}@{}", s.proxy.host(), image.digest())).await;
    s.holds_platform(&repository, &image.platforms[0]).await;
    // Only what the nodes lack was read from the source.
    let reads = source_proxy.as_ref().unwrap().reads();
    assert_eq!(reads, [lacking], "read from the source");
}
on_both_api_servers!(missing_layer: a_layer_no_node_holds_comes_from_the_source_on_the_emulator, a_layer_no_node_holds_comes_from_the_source_on_a_real_api_server);
