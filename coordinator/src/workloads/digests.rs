//! The digests a workload's pods run, from `imageID` in their statuses.
//!
//! Only pods of the workload's current revision count (the newest
//! ReplicaSet's `pod-template-hash`, the newest ControllerRevision's
//! `controller-revision-hash`): a selector also matches pods of an older
//! revision, which may run what the workload ran before. When pods of the
//! current revision disagree on a digest, there is none yet.
//!
//! Pods and revisions are listed per namespace, not per workload: after a
//! start every workload of a namespace is reconciled at once, and one
//! listing serves them all. A listing serves a workload only if it was taken
//! after the watch first showed the workload rolled out at its generation.

use parking_lot::Mutex;
use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
    time::Instant,
};

use k8s_openapi::api::{
    apps::v1::{ControllerRevision, ReplicaSet},
    core::v1::Pod,
};
use kube::{
    Api, Client,
    api::ListParams,
    core::{Selector, SelectorExt},
};
use serde::de::DeserializeOwned;
use tracing::debug;

use super::{usage::WorkloadKey, workload::Workload};
use crate::error::{Error, kube_err};

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

/// A revision of a workload, and the label its pods carry.
struct Revision {
    owner: String,
    number: i64,
    label: (&'static str, String),
}

struct Listing {
    at: Instant,
    pods: Vec<PodDigests>,
    revisions: Vec<Revision>,
}

/// The label of a Deployment's pods naming their ReplicaSet's template.
const POD_TEMPLATE_HASH: &str = "pod-template-hash";
/// The label of a DaemonSet's pods naming their ControllerRevision.
const CONTROLLER_REVISION_HASH: &str = "controller-revision-hash";
/// The revision number the deployment controller gives a ReplicaSet.
const REVISION_ANNOTATION: &str = "deployment.kubernetes.io/revision";

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
        let owner = workload.metadata().uid.as_deref().unwrap_or_default();
        let current = listing.revisions.iter().filter(|r| r.owner == owner).max_by_key(|r| r.number);
        let Some(Revision { label: (key, hash), .. }) = current else {
            debug!("no revision of the workload listed yet");
            return Ok(Digests::new());
        };
        let mut seen: HashMap<&str, Option<&str>> = HashMap::new();
        let pods =
            listing.pods.iter().filter(|pod| pod.labels.get(*key) == Some(hash) && selector.matches(&pod.labels));
        for pod in pods {
            for (container, digest) in &pod.digests {
                let agreed = seen.entry(container).or_insert(Some(digest));
                if *agreed != Some(digest.as_str()) {
                    *agreed = None;
                }
            }
        }
        let mut digests = Digests::new();
        for (container, digest) in seen {
            match digest {
                Some(digest) => {
                    digests.insert(container.to_string(), digest.to_string());
                }
                None => debug!(container, "pods of the current revision run different digests; waiting"),
            }
        }
        Ok(digests)
    }

    pub fn forget(&self, workload: &WorkloadKey) {
        self.rolled_out.lock().remove(workload);
    }
}

/// Lists a namespace's pods and workload revisions, page by page, keeping
/// only what digests need.
async fn list(client: &Client, namespace: &str) -> Result<Listing, Error> {
    let at = Instant::now();
    let (pods, replica_sets, controller_revisions) = tokio::try_join!(
        list_all(client, namespace, "listing pods in namespace", digests_of),
        list_all(client, namespace, "listing replicasets in namespace", replica_set_revision),
        list_all(client, namespace, "listing controllerrevisions in namespace", controller_revision),
    )?;
    Ok(Listing { at, pods, revisions: replica_sets.into_iter().chain(controller_revisions).collect() })
}

async fn list_all<K, T>(
    client: &Client,
    namespace: &str,
    what: &'static str,
    keep: fn(K) -> Option<T>,
) -> Result<Vec<T>, Error>
where
    K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api = Api::<K>::namespaced(client.clone(), namespace);
    let mut kept = Vec::new();
    let mut params = ListParams::default().limit(PAGE);
    loop {
        let page = api.list(&params).await.map_err(kube_err(what, namespace))?;
        let next = page.metadata.continue_.clone().filter(|token| !token.is_empty());
        kept.extend(page.items.into_iter().filter_map(keep));
        match next {
            Some(token) => params = params.continue_token(&token),
            None => return Ok(kept),
        }
    }
}

/// The controlling owner's UID.
fn controller_uid(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> Option<String> {
    meta.owner_references.iter().flatten().find(|o| o.controller == Some(true)).map(|o| o.uid.clone())
}

fn replica_set_revision(replica_set: ReplicaSet) -> Option<Revision> {
    let meta = replica_set.metadata;
    let number = meta.annotations.as_ref()?.get(REVISION_ANNOTATION)?.parse().ok()?;
    let hash = meta.labels.as_ref()?.get(POD_TEMPLATE_HASH)?.clone();
    Some(Revision { owner: controller_uid(&meta)?, number, label: (POD_TEMPLATE_HASH, hash) })
}

fn controller_revision(revision: ControllerRevision) -> Option<Revision> {
    let meta = revision.metadata;
    let hash = meta.labels.as_ref()?.get(CONTROLLER_REVISION_HASH)?.clone();
    Some(Revision {
        owner: controller_uid(&meta)?,
        number: revision.revision?,
        label: (CONTROLLER_REVISION_HASH, hash),
    })
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
