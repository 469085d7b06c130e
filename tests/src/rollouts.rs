//! What the deployment and daemonset controllers write when a rollout
//! completes, for API servers that run none (the emulator, the real API
//! server alone): a workload the harness deployed as rolled out, then
//! patched, is rolled out again at its new generation. On the real node the
//! real controllers do it, and pods really run.

use futures::StreamExt;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::Node,
};
use kube::{
    Api, Client, Resource,
    api::{ListParams, Patch, PatchParams},
    runtime::{WatchStreamExt, watcher},
};
use serde::de::DeserializeOwned;
use serde_json::json;

/// Stops the simulated controllers when dropped.
pub struct RolloutController(Vec<tokio::task::JoinHandle<()>>);

impl Drop for RolloutController {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Starts the simulated controllers on `client`'s cluster unless it has
/// nodes (and so the real controllers).
pub async fn start(client: &Client) -> Option<RolloutController> {
    let nodes = Api::<Node>::all(client.clone()).list(&ListParams::default().limit(1)).await;
    if nodes.is_ok_and(|list| !list.items.is_empty()) {
        return None;
    }
    Some(RolloutController(vec![
        tokio::spawn(complete::<Deployment>(client.clone(), |d| {
            (d.metadata.generation, d.status.as_ref().and_then(|s| s.observed_generation))
        })),
        tokio::spawn(complete::<DaemonSet>(client.clone(), |d| {
            (d.metadata.generation, d.status.as_ref().and_then(|s| s.observed_generation))
        })),
    ]))
}

/// How long a simulated rollout takes: long enough that rollouts started
/// together overlap, as real ones do.
const ROLLOUT_TAKES: std::time::Duration = std::time::Duration::from_secs(1);

/// A workload labelled so never rolls out again: its controller never
/// observes a new generation, as when it cannot make the new pods (quota,
/// scheduling), which the pods do not show.
pub const STUCK_LABEL: &str = "test.k8slab.io/rollout-stuck";

/// Moves `observedGeneration` up to the generation of every workload that
/// had been rolled out before, [`ROLLOUT_TAKES`] after it changed; the
/// replica counts stay as they were.
async fn complete<K>(client: Client, generations: fn(&K) -> (Option<i64>, Option<i64>))
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    K: Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let stream = watcher(Api::<K>::all(client.clone()), watcher::Config::default()).default_backoff().applied_objects();
    let mut stream = std::pin::pin!(stream);
    while let Some(object) = stream.next().await {
        let Ok(object) = object else { continue };
        let (Some(generation), Some(observed)) = generations(&object) else { continue };
        if observed == 0 || generation <= observed {
            continue;
        }
        let meta = object.meta();
        if meta.labels.as_ref().is_some_and(|labels| labels.contains_key(STUCK_LABEL)) {
            continue;
        }
        let (Some(ns), Some(name)) = (meta.namespace.as_deref(), meta.name.as_deref()) else { continue };
        let (api, name) = (Api::<K>::namespaced(client.clone(), ns), name.to_string());
        tokio::spawn(async move {
            tokio::time::sleep(ROLLOUT_TAKES).await;
            let status = Patch::Merge(json!({ "status": { "observedGeneration": generation } }));
            let _ = api.patch_status(&name, &PatchParams::default(), &status).await;
        });
    }
}
