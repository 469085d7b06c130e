//! What the agent refuses, whoever assigns it: a target other than the
//! backup reference of the source under the backup registry and prefix the
//! agent is configured with, and an image no pod of its own node runs. A
//! coordinator that was fooled (or something that got hold of its port)
//! then cannot make an agent push another tenant's private image from its
//! node's containerd, or push anything anywhere else.

use image_backup_oci::{BackupTarget, ImageRef};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, api::ListParams};

use std::sync::Arc;

use crate::node_pods::{NodePods, running};

#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("refused: target {target} is not the backup of {image} under {root}")]
    Target { image: String, target: String, root: String },
    #[error("refused: no pod on node {node} runs {digest}")]
    NotRun { node: String, digest: String },
    #[error("cannot list the pods of node {node} to check what it runs: {error}")]
    Pods { node: String, error: kube::Error },
    #[error("refused: no Kubernetes API to check which images node {node} runs")]
    NoApi { node: String },
}

impl Refusal {
    /// A refusal stands; only a failed look at the pods may pass later.
    pub fn retryable(&self) -> bool {
        matches!(self, Self::Pods { .. })
    }
}

/// The agent's limits.
pub struct Guard {
    backup: BackupTarget,
    node: String,
    client: Option<kube::Client>,
    /// The pods API; `None` outside a cluster, where nothing is pushed.
    pods: Option<Api<Pod>>,
    /// What the node's pods run, as a watch follows them.
    in_use: Arc<NodePods>,
}

impl Guard {
    pub fn new(backup: BackupTarget, node: &str, client: Option<kube::Client>) -> Self {
        let pods = client.clone().map(Api::all);
        Self { backup, node: node.to_string(), client, pods, in_use: Arc::default() }
    }

    /// The images this node's pods run, kept current by [`Guard::follow`].
    pub fn in_use(&self) -> &Arc<NodePods> {
        &self.in_use
    }

    /// Follows the node's pods, for as long as the agent runs; never
    /// resolves without an API (nothing is in use then).
    pub async fn follow(&self) {
        match &self.client {
            Some(client) => self.in_use.follow(client.clone(), &self.node).await,
            None => std::future::pending().await,
        }
    }

    /// The target must be exactly where the source's backup goes.
    pub fn check_target(&self, source: &ImageRef, target: &ImageRef) -> Result<(), Refusal> {
        let refused = || Refusal::Target {
            image: source.to_string(),
            target: target.to_string(),
            root: format!("{}/{}", self.backup.registry, self.backup.prefix.trim_matches('/')),
        };
        // A tag wins over the digest in the mapping, so pinning the source
        // changes nothing here.
        let expected = self.backup.reference_for(source).map_err(|_| refused())?;
        if expected.to_string() == target.to_string() { Ok(()) } else { Err(refused()) }
    }

    /// A pod on this node must run `digest` (its status `imageID`): as the
    /// pod watch has it, which is the usual case (only images in use are
    /// offered), else as the API server says now (the watch may not have
    /// seen a pod the coordinator did).
    pub async fn check_digest(&self, digest: &str) -> Result<(), Refusal> {
        if self.in_use.runs(digest) {
            return Ok(());
        }
        let node = self.node.clone();
        let pods = self.pods.as_ref().ok_or_else(|| Refusal::NoApi { node: node.clone() })?;
        let on_node = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = pods.list(&on_node).await.map_err(|error| Refusal::Pods { node: node.clone(), error })?;
        let runs = pods.items.iter().any(|pod| running(pod).iter().any(|d| d == digest));
        if runs { Ok(()) } else { Err(Refusal::NotRun { node, digest: digest.to_string() }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn guard() -> Guard {
        Guard::new(BackupTarget { registry: "backup.example.com".into(), prefix: "mirror".into() }, "node-a", None)
    }

    fn r(s: &str) -> ImageRef {
        ImageRef::parse(s).unwrap()
    }

    #[test]
    fn only_the_backup_reference_of_the_source_is_a_target() {
        let g = guard();
        let source = r(&format!("nginx:1.25@{DIGEST}"));
        assert!(g.check_target(&source, &r("backup.example.com/mirror/docker.io/library/nginx:1.25")).is_ok());
        for elsewhere in [
            "evil.example.com/mirror/docker.io/library/nginx:1.25",
            "backup.example.com/other/docker.io/library/nginx:1.25",
            "backup.example.com/mirror/docker.io/library/redis:1.25",
            "backup.example.com/mirror/docker.io/library/nginx:latest",
        ] {
            let refused = g.check_target(&source, &r(elsewhere)).unwrap_err();
            assert!(refused.to_string().contains("refused: target"), "{refused}");
            assert!(!refused.retryable());
        }
    }

    #[tokio::test]
    async fn without_an_api_nothing_is_pushed() {
        let refused = guard().check_digest(DIGEST).await.unwrap_err();
        assert!(matches!(refused, Refusal::NoApi { .. }), "{refused}");
    }
}
