//! The digests a workload's pods run, from `imageID` in their statuses. One
//! pod list per workload generation: the answer is kept until the spec
//! changes, so the many wake-ups of a workload cost no API request.

use std::{
    collections::{BTreeSet, HashMap},
    sync::{Arc, Mutex},
};

use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::ListParams, core::Selector};

use super::{usage::WorkloadKey, workload::Workload};
use crate::context::{Error, kube_err};

/// Container name to the digest its pods run.
pub type Digests = Arc<HashMap<String, String>>;

#[derive(Default)]
pub struct DigestCache(Mutex<HashMap<WorkloadKey, (i64, Digests)>>);

// === impl DigestCache ===

impl DigestCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkloadKey, (i64, Digests)>> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The digests of `containers` in the workload's pods; listed once per
    /// generation, and kept only when every container has one.
    pub async fn get(
        &self,
        client: &Client,
        workload: &Workload,
        containers: &BTreeSet<String>,
    ) -> Result<Digests, Error> {
        let key = workload.key();
        let generation = workload.metadata().generation.unwrap_or(0);
        if let Some((cached, digests)) = self.lock().get(&key)
            && *cached == generation
        {
            return Ok(digests.clone());
        }
        let digests = Arc::new(running_digests(client, workload).await?);
        if containers.iter().all(|c| digests.contains_key(c)) {
            self.lock().insert(key, (generation, digests.clone()));
        }
        Ok(digests)
    }

    pub fn forget(&self, workload: &WorkloadKey) {
        self.lock().remove(workload);
    }
}

/// Lists the workload's own pods (through its selector) and reads the
/// digest each container runs. Terminating pods are left out: they may
/// still run what the workload ran before.
async fn running_digests(client: &Client, workload: &Workload) -> Result<HashMap<String, String>, Error> {
    let Ok(selector) = Selector::try_from(workload.selector().clone()) else {
        return Ok(HashMap::new());
    };
    if selector.selects_all() {
        // An empty selector would list every pod of the namespace.
        return Ok(HashMap::new());
    }
    let pods = Api::<Pod>::namespaced(client.clone(), workload.namespace())
        .list(&ListParams::default().labels_from(&selector))
        .await
        .map_err(kube_err("listing pods of", workload.key().to_string()))?;
    let mut digests = HashMap::new();
    for pod in pods.into_iter().filter(|pod| pod.metadata.deletion_timestamp.is_none()) {
        let Some(status) = pod.status else { continue };
        for container in
            status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten())
        {
            let digest = container.image_id.rsplit_once('@').map(|(_, d)| d.to_string());
            if let Some(digest) = digest.filter(|d| d.starts_with("sha256:")) {
                digests.entry(container.name.clone()).or_insert(digest);
            }
        }
    }
    Ok(digests)
}
