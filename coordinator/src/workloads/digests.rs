//! The digests a workload's pods run, from `imageID` in their statuses.
//!
//! Pods are listed per namespace, not per workload: after a start every
//! workload of a namespace is reconciled at once, and one list serves them
//! all. A listing serves a workload only if it was taken after the watch
//! first showed the workload rolled out at its generation, so digests never
//! come from the pods of an earlier rollout.

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::ListParams,
    core::{Selector, SelectorExt},
};

use super::{usage::WorkloadKey, workload::Workload};
use crate::context::{Error, kube_err};

/// Pods per page when listing a namespace.
const PAGE: u32 = 500;

/// How long a namespace's listing is kept after its last use.
const LISTING_KEPT: std::time::Duration = std::time::Duration::from_secs(300);

/// Container name to the digest its pods run.
pub type Digests = HashMap<String, String>;

/// What is kept of a pod: its labels and the digest of each container.
struct PodDigests {
    labels: BTreeMap<String, String>,
    digests: Digests,
}

struct Listing {
    at: Instant,
    pods: Vec<PodDigests>,
}

/// A namespace's last listing, locked while it is being replaced.
type NamespaceSlot = Arc<tokio::sync::Mutex<Option<Arc<Listing>>>>;

#[derive(Default)]
pub struct DigestCache {
    /// The last listing of each namespace, behind a lock per namespace so
    /// that concurrent reconciles wait for one list instead of each making
    /// their own.
    namespaces: Mutex<HashMap<String, (Instant, NamespaceSlot)>>,
    /// When the watch first showed each workload rolled out at its
    /// generation.
    rolled_out: Mutex<HashMap<WorkloadKey, (i64, Instant)>>,
}

// === impl DigestCache ===

impl DigestCache {
    /// Notes a workload as its watch delivers it: when it was first seen
    /// rolled out at `generation`.
    pub fn observed(&self, workload: WorkloadKey, generation: i64, rolled_out: bool) {
        let mut seen = self.rolled_out.lock();
        if !rolled_out {
            seen.remove(&workload);
            return;
        }
        let entry = seen.entry(workload).or_insert((generation, Instant::now()));
        if entry.0 != generation {
            *entry = (generation, Instant::now());
        }
    }

    /// The digests the workload's pods run, from a listing of its namespace
    /// taken after its rollout was seen complete.
    pub async fn get(&self, client: &Client, workload: &Workload) -> Result<Digests, Error> {
        let Ok(selector) = Selector::try_from(workload.selector().clone()) else { return Ok(Digests::new()) };
        if selector.selects_all() {
            // Every pod of the namespace would match: not this workload's.
            return Ok(Digests::new());
        }
        let generation = workload.metadata().generation.unwrap_or(0);
        let since = *self.rolled_out.lock().entry(workload.key()).or_insert((generation, Instant::now()));
        let since = since.1;
        let slot = {
            let mut namespaces = self.namespaces.lock();
            // A listing serves the burst of reconciles it was made for;
            // later rollouts need a new one anyway.
            namespaces.retain(|_, (used, _)| used.elapsed() < LISTING_KEPT);
            let (used, slot) = namespaces
                .entry(workload.namespace().to_string())
                .or_insert_with(|| (Instant::now(), NamespaceSlot::default()));
            *used = Instant::now();
            slot.clone()
        };
        let listing = {
            let mut slot = slot.lock().await;
            match slot.as_ref() {
                Some(listing) if listing.at >= since => listing.clone(),
                _ => {
                    let fresh = Arc::new(list(client, workload.namespace()).await?);
                    *slot = Some(fresh.clone());
                    fresh
                }
            }
        };
        let mut digests = Digests::new();
        for pod in listing.pods.iter().filter(|pod| selector.matches(&pod.labels)) {
            for (container, digest) in &pod.digests {
                digests.entry(container.clone()).or_insert_with(|| digest.clone());
            }
        }
        Ok(digests)
    }

    pub fn forget(&self, workload: &WorkloadKey) {
        self.rolled_out.lock().remove(workload);
    }
}

/// Lists a namespace's pods, page by page, keeping only what digests need.
/// Terminating pods are left out: they may still run what a workload ran
/// before its rollout.
async fn list(client: &Client, namespace: &str) -> Result<Listing, Error> {
    let at = Instant::now();
    let api = Api::<Pod>::namespaced(client.clone(), namespace);
    let mut pods = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await.map_err(kube_err("listing pods in namespace", namespace))?;
        let next = page.metadata.continue_.clone().filter(|token| !token.is_empty());
        pods.extend(page.items.into_iter().filter_map(digests_of));
        match next {
            Some(token) => params = params.continue_token(&token),
            None => break,
        }
    }
    Ok(Listing { at, pods })
}

fn digests_of(pod: Pod) -> Option<PodDigests> {
    if pod.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let status = pod.status?;
    let mut digests = Digests::new();
    for container in status.init_container_statuses.iter().flatten().chain(status.container_statuses.iter().flatten()) {
        // `repo@sha256:...`: the repository part may name another
        // repository holding the same content; the digest is what counts.
        let digest = container.image_id.rsplit_once('@').map(|(_, d)| d);
        if let Some(digest) = digest.filter(|d| d.starts_with("sha256:")) {
            digests.insert(container.name.clone(), digest.to_string());
        }
    }
    Some(PodDigests { labels: pod.metadata.labels.unwrap_or_default(), digests })
}
