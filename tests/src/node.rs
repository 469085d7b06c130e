//! A real one-node Kubernetes cluster handed to the tests through the
//! environment (`.ci/run` starts one when it can; tests that need it skip
//! when it is not there): its API server, its kubelet's containerd, and the
//! registry settings that containerd reads at every pull.

use std::path::PathBuf;

use anyhow::Context;
use containerd_client::{
    services::v1::{DeleteImageRequest, ListImagesRequest, images_client::ImagesClient},
    tonic::Request,
};

/// The kubelet's containerd namespace.
pub const K8S_NAMESPACE: &str = "k8s.io";

pub struct RealNode {
    pub kubeconfig: PathBuf,
    pub node_name: String,
    pub containerd_socket: PathBuf,
    /// containerd's content directory, as containerd reports it.
    pub content_dir: PathBuf,
    certs_d: PathBuf,
    /// The cluster's state directory: the kubelet's pod volumes are under it.
    cluster_dir: PathBuf,
    pause_image: String,
}

impl RealNode {
    /// The cluster from `KUBECONFIG`, `K8S_NODE_NAME`, `K8S_CONTAINERD_SOCKET`,
    /// `K8S_CONTAINERD_CONTENT_DIR`, `K8S_CERTS_D`, `K8S_CLUSTER_DIR` and
    /// `K8S_PAUSE_IMAGE`, as the cluster script's `env` prints them; `None`
    /// when any is unset.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(Self {
            kubeconfig: var("KUBECONFIG")?.into(),
            node_name: var("K8S_NODE_NAME")?,
            containerd_socket: var("K8S_CONTAINERD_SOCKET")?.into(),
            content_dir: var("K8S_CONTAINERD_CONTENT_DIR")?.into(),
            certs_d: var("K8S_CERTS_D")?.into(),
            cluster_dir: var("K8S_CLUSTER_DIR")?.into(),
            pause_image: var("K8S_PAUSE_IMAGE")?,
        })
    }

    /// Runs an agent pod (the pause image, as the agent's ServiceAccount)
    /// with the projected token an agent DaemonSet mounts, and returns that
    /// token as the kubelet wrote it into the pod's volume.
    pub async fn agent_token(&self, client: &kube::Client) -> anyhow::Result<String> {
        use crate::identity::{AGENT_ACCOUNT, pod};
        let name = format!("agent-{}", self.node_name);
        let created = pod(client, &name, AGENT_ACCOUNT, &self.node_name, &self.pause_image, true).await;
        let uid = created.metadata.uid.context("a pod uid")?;
        // The kubelet writes it to a tmpfs in the node's own mount
        // namespace, as on a node: out of the host's sight.
        let path =
            self.cluster_dir.join("kubelet/pods").join(uid).join("volumes/kubernetes.io~projected/agent-token/token");
        let namespace = format!("--mount={}", self.cluster_dir.join("run/ns/mnt").display());
        let read = || {
            let out = std::process::Command::new("nsenter").arg(&namespace).arg("cat").arg(&path).output();
            match out {
                Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).trim().to_string()),
                Ok(out) => Err(String::from_utf8_lossy(&out.stderr).into_owned()),
                Err(e) => Err(format!("nsenter: {e}")),
            }
        };
        let projected =
            || std::future::ready(read().and_then(|t| if t.is_empty() { Err("empty".into()) } else { Ok(()) }));
        crate::cluster::eventually(
            "the kubelet projects the agent's token",
            std::time::Duration::from_secs(60),
            projected,
        )
        .await;
        read().map_err(anyhow::Error::msg)
    }

    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        Ok(kube::Client::try_from(crate::kube_config(&self.kubeconfig).await?)?)
    }

    /// Lets the node's containerd pull from a plain-HTTP registry on
    /// loopback (it reads `hosts.toml` at every pull).
    pub fn trust_plain_http(&self, host: &str) -> anyhow::Result<()> {
        let dir = self.certs_d.join(host);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let toml =
            format!("server = \"http://{host}\"\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n");
        std::fs::write(dir.join("hosts.toml"), toml)?;
        Ok(())
    }

    /// Removes every image record of the node whose target is `digest`, so
    /// that containerd's garbage collection takes the content once no
    /// container uses it: the node has forgotten the image.
    pub async fn forget(&self, digest: &str) -> anyhow::Result<Vec<String>> {
        let channel = containerd_client::connect(&self.containerd_socket)
            .await
            .with_context(|| format!("connecting to {}", self.containerd_socket.display()))?;
        let mut images = ImagesClient::new(channel);
        let filter = format!("target.digest=={digest}");
        let request = ListImagesRequest { filters: vec![filter] };
        let listed = images.list(in_namespace(request)).await?.into_inner().images;
        let names: Vec<String> = listed.into_iter().map(|image| image.name).collect();
        for name in &names {
            let request = DeleteImageRequest { name: name.clone(), sync: true, target: None };
            images.delete(in_namespace(request)).await.with_context(|| format!("deleting {name}"))?;
        }
        Ok(names)
    }
}

fn in_namespace<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert("containerd-namespace", K8S_NAMESPACE.parse().expect("static namespace"));
    request
}

/// The real node, a client for its cluster and a fresh test namespace, with
/// no ImageBackup left from an earlier test; `None` (and a line saying the
/// test is skipped) without a real node. One test at a time per node.
pub async fn scene() -> Option<(RealNode, kube::Client, String)> {
    let Some(node) = RealNode::from_env() else {
        eprintln!("skipped: no real node (what the cluster script's env prints: KUBECONFIG, K8S_NODE_NAME, ... unset)");
        return None;
    };
    crate::init_tracing();
    let client = node.client().await.expect("a client for the real cluster");
    let ns = format!("e2e-{:x}", rand::random::<u32>());
    crate::cluster::prepare(&client, &[&ns]).await;
    stop_installed(&client).await;
    forget_backups(&client).await;
    Some((node, client, ns))
}

/// Stops a coordinator and agents that `tests/tests/install.rs` installed
/// and could not remove (a killed run): they would take over this test's
/// workloads.
async fn stop_installed(client: &kube::Client) {
    use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
    use kube::api::DeleteParams;
    let deployments: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), "image-backup");
    let daemonsets: kube::Api<DaemonSet> = kube::Api::namespaced(client.clone(), "image-backup");
    // Foreground: the objects stay until their pods are gone.
    let params = DeleteParams::foreground();
    let name = "image-backup-coordinator";
    let coordinator = deployments.delete(name, &params).await.is_ok();
    let agent = daemonsets.delete("image-backup-agent", &params).await.is_ok();
    if !(coordinator || agent) {
        return;
    }
    crate::cluster::eventually(
        "the installed coordinator and agents stopped",
        std::time::Duration::from_secs(120),
        || async {
            let left = deployments.get_opt(name).await.map_err(|e| e.to_string())?.is_some()
                || daemonsets.get_opt("image-backup-agent").await.map_err(|e| e.to_string())?.is_some();
            if left { Err("still there".to_string()) } else { Ok(()) }
        },
    )
    .await;
}

/// A runnable single-platform image of its own: busybox, and a file that
/// makes every run's layer new (containerd skips fetching a layer whose
/// snapshot it already has, so a layer an earlier run pulled and then
/// forgot would be missing from the content store, and could not be copied
/// from it).
pub fn runnable_image() -> crate::image::PlatformImage {
    let busybox = std::fs::read("/bin/busybox").expect("/bin/busybox (Debian busybox-static, tests/setup installs it)");
    let run_id = format!("{:x}", rand::random::<u64>());
    let files: [(&str, &[u8], u32); 2] = [("bin/busybox", &busybox, 0o755), ("etc/run-id", run_id.as_bytes(), 0o644)];
    crate::image::PlatformImage::runnable(&files, &["/bin/busybox", "sleep", "3600"]).expect("a runnable image")
}

/// A Deployment of one pod that sleeps in `image`, stopped at once.
pub fn sleeper(ns: &str, name: &str, image: &str) -> k8s_openapi::api::apps::v1::Deployment {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name, "namespace": ns },
        "spec": {
            "replicas": 1,
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{ "name": name, "image": image, "command": ["/bin/busybox", "sleep", "3600"] }],
                },
            },
        },
    }))
    .expect("a Deployment")
}

/// The image of a Deployment's first container.
pub fn image_of(deployment: &k8s_openapi::api::apps::v1::Deployment) -> String {
    let spec = deployment.spec.template.spec.as_ref();
    spec.and_then(|s| s.containers[0].image.clone()).unwrap_or_default()
}

/// Whether the one-replica Deployment `name` is rolled out, running
/// `image` when given, as its controller reports it.
pub async fn rolled_out(
    deployments: &kube::Api<k8s_openapi::api::apps::v1::Deployment>,
    name: &str,
    image: Option<&str>,
) -> Result<(), String> {
    let d = deployments.get(name).await.map_err(|e| e.to_string())?;
    let generation = d.metadata.generation.unwrap_or(0);
    let runs = image_of(&d);
    let s = d.status.unwrap_or_default();
    let done = s.observed_generation.unwrap_or(0) >= generation
        && s.updated_replicas == Some(1)
        && s.available_replicas == Some(1)
        && s.replicas == Some(1);
    if done && image.is_none_or(|image| image == runs) { Ok(()) } else { Err(format!("runs {runs}: {s:?}")) }
}

/// Deletes every ImageBackup of the (throwaway) cluster: a coordinator
/// works on every one, and an earlier test's, made for another backup
/// registry, would be copied again beside the test's own, taking agent
/// slots and retrying a source long gone.
pub async fn forget_backups(client: &kube::Client) {
    use kube::api::{DeleteParams, ListParams};
    let backups: kube::Api<image_backup_crds::ImageBackup> = kube::Api::all(client.clone());
    let all = ListParams::default();
    backups.delete_collection(&DeleteParams::default(), &all).await.expect("delete ImageBackups");
    crate::cluster::eventually("every ImageBackup gone", std::time::Duration::from_secs(10), || async {
        let left = backups.list_metadata(&all).await.map_err(|e| e.to_string())?.items.len();
        if left == 0 { Ok(()) } else { Err(format!("{left} left")) }
    })
    .await;
}
