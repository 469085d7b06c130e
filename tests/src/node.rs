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
    certs_d: PathBuf,
}

impl RealNode {
    /// The cluster from `KUBECONFIG`, `K8S_NODE_NAME`, `K8S_CONTAINERD_SOCKET`
    /// and `K8S_CERTS_D`, as the cluster script's `env` prints them; `None`
    /// when any is unset.
    pub fn from_env() -> Option<Self> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Some(Self {
            kubeconfig: var("KUBECONFIG")?.into(),
            node_name: var("K8S_NODE_NAME")?,
            containerd_socket: var("K8S_CONTAINERD_SOCKET")?.into(),
            certs_d: var("K8S_CERTS_D")?.into(),
        })
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
