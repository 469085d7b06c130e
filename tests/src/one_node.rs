//! A scene most system tests share: an API server (the emulator, or the
//! real one when IMAGE_BACKUP_TEST_KUBECONFIG gives it), one node's real
//! containerd holding the images, a backup registry behind a counting
//! proxy, and a source registry that is only a name (gone before any copy).

use std::time::Duration;

use image_backup_coordinator::config::CoordinatorConfig;
use image_backup_core::template::{HOLD_ANNOTATION, Hold};
use image_backup_crds::ImageBackup;
use image_backup_oci::registry::RegistryConfig;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    events::v1::Event,
};
use kube::{
    Api, Client,
    api::{ListParams, Patch, PatchParams},
};
use serde_json::json;

use crate::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, ClusterGuard, Placement, Workloads, agent_client, cluster, coordinator_client, eventually,
        prepare,
    },
    init_tracing,
    run::{Coordinator, start_agent, start_coordinator},
};

/// How long a scene waits for what the coordinator does.
pub const WAIT: Duration = Duration::from_secs(60);

/// One node whose containerd holds the images, a backup registry, and a
/// source registry that is only a name.
pub struct OneNode {
    pub kind: ApiServerKind,
    _cluster: ClusterGuard,
    pub client: Client,
    pub w: Workloads,
    pub src: String,
    pub node: Containerd,
    pub backup: Registry,
    /// In front of `backup`: what agents, the coordinator and workloads use.
    pub proxy: Proxy,
}

impl OneNode {
    pub async fn new(kind: ApiServerKind, namespaces: &[&str]) -> Option<Self> {
        init_tracing();
        let (cluster, client) = cluster(kind).await?;
        prepare(&client, namespaces).await;
        let source = Registry::start(RegistryAuth::None).await.unwrap();
        let src = source.host();
        drop(source);
        let backup = Registry::start(RegistryAuth::None).await.unwrap();
        Some(Self {
            kind,
            _cluster: cluster,
            w: Workloads { client: client.clone() },
            client,
            src,
            node: Containerd::start().await.unwrap(),
            proxy: Proxy::start(&backup.host(), Faults::default()).await.unwrap(),
            backup,
        })
    }

    /// An image on the node, as `SRC/<path>`.
    pub async fn image(&self, path: &str, seed: u64) -> (String, TestImage) {
        let image = TestImage::single(MediaTypes::Oci, &[64 << 10], seed);
        let reference = format!("{}/{path}", self.src);
        image.import(&self.node, &reference, &[], &[]).await.unwrap();
        (reference, image)
    }

    pub async fn deploy(
        &self,
        kind: &str,
        ns: &str,
        name: &str,
        labels: serde_json::Value,
        image: &(String, TestImage),
    ) {
        let spec = [(name, image.0.as_str(), image.1.digest(), false)];
        self.w.deploy(kind, ns, name, labels, &spec, Placement { nodes: &["node-a"], ready: true }).await;
    }

    /// The backup registry as references name it (the proxy).
    pub fn backup_host(&self) -> String {
        self.proxy.host()
    }

    /// The backup repository of a source image.
    pub fn repository(&self, image: &(String, TestImage)) -> String {
        let (name, _) = image.0.rsplit_once(':').unwrap();
        format!("backup/{}", name.replacen(&self.src, &self.src.replace(':', "_"), 1))
    }

    /// The ImageBackup of a source image.
    pub async fn image_backup(&self, image: &(String, TestImage)) -> Option<ImageBackup> {
        let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&image.0).unwrap());
        Api::<ImageBackup>::all(self.client.clone()).get_opt(&name).await.unwrap()
    }

    pub async fn start(&self, config: CoordinatorConfig) -> Coordinator {
        let client = coordinator_client(self.kind, &self.client).await;
        let coordinator = start_coordinator(&self.client, &client, config)
            .await
            .with_agents_client(agent_client(self.kind, &self.client).await);
        let registry = RegistryConfig { insecure_hosts: vec![self.backup_host()], ..RegistryConfig::default() };
        start_agent(&self.node, "node-a", &coordinator, registry).await;
        coordinator
    }

    pub fn pinned(&self, image: &(String, TestImage)) -> String {
        let (name, _) = image.0.rsplit_once(':').unwrap();
        let path = name.replacen(&self.src, &self.src.replace(':', "_"), 1);
        format!("{}/backup/{path}@{}", self.backup_host(), image.1.digest())
    }

    pub async fn image_of(&self, kind: &str, ns: &str, name: &str) -> String {
        self.w.images(kind, ns, name).await.0.remove(0)
    }

    pub async fn runs(&self, kind: &str, ns: &str, name: &str, image: &str) {
        eventually(&format!("{kind} {ns}/{name} runs {image}"), WAIT, || async {
            let now = self.image_of(kind, ns, name).await;
            if now == image { Ok(()) } else { Err(now) }
        })
        .await;
    }

    pub async fn annotation(&self, kind: &str, ns: &str, name: &str, key: &str) -> Option<String> {
        let meta = match kind {
            "Deployment" => Api::<Deployment>::namespaced(self.client.clone(), ns).get(name).await.unwrap().metadata,
            _ => Api::<DaemonSet>::namespaced(self.client.clone(), ns).get(name).await.unwrap().metadata,
        };
        meta.annotations.and_then(|a| a.get(key).cloned())
    }

    pub async fn hold(&self, kind: &str, ns: &str, name: &str) -> Option<Hold> {
        let text = self.annotation(kind, ns, name, HOLD_ANNOTATION).await?;
        Some(serde_json::from_str(&text).unwrap())
    }

    /// The reasons of Events about a workload.
    pub async fn events(&self, ns: &str, name: &str) -> Vec<String> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), ns);
        let list = events.list(&ListParams::default()).await.unwrap();
        list.items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.reason)
            .collect()
    }

    /// Waits for an Event with `reason` about `ns/name`: the coordinator
    /// records Events after the patch or status write they explain, so a
    /// test that has just seen that write may still be ahead of the Event.
    pub async fn recorded(&self, ns: &str, name: &str, reason: &str) {
        eventually(&format!("a {reason} Event about {ns}/{name}"), WAIT, || async {
            let events = self.events(ns, name).await;
            if events.iter().any(|e| e == reason) { Ok(()) } else { Err(format!("{events:?}")) }
        })
        .await;
    }

    /// `(workload, reason)` of each note on the ImageBackup of `image`.
    pub async fn notes(&self, image: &(String, TestImage)) -> Vec<(String, String)> {
        let name = image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(&image.0).unwrap());
        let backup = Api::<ImageBackup>::all(self.client.clone()).get_opt(&name).await.unwrap();
        let notes = backup.and_then(|b| b.status).map(|s| s.workloads).unwrap_or_default();
        notes.into_iter().map(|n| (n.workload, n.reason)).collect()
    }

    /// Makes the coordinator look at a workload again.
    pub async fn touch(&self, kind: &str, ns: &str, name: &str, value: &str) {
        let patch = Patch::Merge(json!({ "metadata": { "labels": { "touched": value } } }));
        match kind {
            "Deployment" => {
                Api::<Deployment>::namespaced(self.client.clone(), ns)
                    .patch(name, &PatchParams::default(), &patch)
                    .await
                    .unwrap();
            }
            _ => {
                Api::<DaemonSet>::namespaced(self.client.clone(), ns)
                    .patch(name, &PatchParams::default(), &patch)
                    .await
                    .unwrap();
            }
        }
    }
}
