//! Which digests this node's pods run, followed with a watch of the pods
//! bound to the node (as its kubelet watches them): the inventory marks the
//! images in use, and only those are offered for copies.

use std::{collections::HashSet, sync::Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    runtime::{WatchStreamExt, reflector, watcher},
};
use tokio::sync::watch;
use tracing::warn;

/// The digests in use on this node, and a signal when they change.
pub struct NodePods {
    digests: Mutex<HashSet<String>>,
    changed: watch::Sender<u64>,
}

impl Default for NodePods {
    fn default() -> Self {
        Self { digests: Mutex::default(), changed: watch::channel(0).0 }
    }
}

impl NodePods {
    pub fn runs(&self, digest: &str) -> bool {
        self.lock().contains(digest)
    }

    /// Fires whenever the set of digests in use changes.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.digests.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Follows the pods of `node` for as long as it runs.
    pub async fn follow(&self, client: Client, node: &str) {
        let (store, writer) = reflector::store();
        let config = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let mut events = std::pin::pin!(reflector(writer, watcher(Api::<Pod>::all(client), config)).default_backoff());
        while let Some(event) = events.next().await {
            if let Err(e) = event {
                warn!(error = %e, %node, "watching the node's pods failed; retrying");
                continue;
            }
            let now: HashSet<String> = store.state().iter().flat_map(|pod| running(pod)).collect();
            let mut digests = self.lock();
            if *digests != now {
                *digests = now;
                drop(digests);
                self.changed.send_modify(|generation| *generation += 1);
            }
        }
    }
}

/// The digests a pod's containers run.
pub fn running(pod: &Pod) -> Vec<String> {
    let Some(status) = &pod.status else { return Vec::new() };
    [&status.container_statuses, &status.init_container_statuses, &status.ephemeral_container_statuses]
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|container| image_digest(&container.image_id).map(str::to_string))
        .collect()
}

/// The digest of a status `imageID` (`repo@sha256:…`, or a bare digest).
pub fn image_digest(image_id: &str) -> Option<&str> {
    let digest = image_id.rsplit_once('@').map_or(image_id, |(_, digest)| digest);
    digest.starts_with("sha256:").then_some(digest)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn image_ids_give_their_digest() {
        assert_eq!(image_digest(&format!("docker.io/library/nginx@{DIGEST}")), Some(DIGEST));
        assert_eq!(image_digest(DIGEST), Some(DIGEST));
        assert_eq!(image_digest("docker.io/library/nginx:1.25"), None);
        assert_eq!(image_digest(""), None);
    }
}
