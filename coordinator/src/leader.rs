//! Leader election on a coordination.k8s.io Lease, with kube-lease-manager.
//! Two coordinators run; only the one holding the Lease watches, writes,
//! assigns, patches and serves gRPC, and labels its pod so that the Service
//! sends agents and people to it (both replicas report ready). The other
//! waits to take over. A leader that loses the Lease stops (and is
//! restarted as a follower) rather than unwind every controller: what it
//! knew lives in the API server, which is where the next leader picks up
//! from.
//!
//! kube-lease-manager reports a lost Lease only once it reads another
//! holder, so a leader cut off from the API server would go on acting after
//! the follower took over. As client-go's RenewDeadline does, a leader here
//! also steps down once no renewal of its own was seen for [`renew_deadline`]
//! (two thirds of the Lease), before the Lease can expire; until then the
//! [`Fence`] it hands out stays up, and what acts on the cluster or the
//! registry checks it first.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use k8s_openapi::{api::coordination::v1::Lease, jiff::Timestamp};
use kube::{Api, Client};
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{debug, info, warn};

/// Which Lease, and how long a leader that stopped renewing keeps it.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub name: String,
    pub namespace: String,
    /// After this long without renewal another coordinator takes over.
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("leader election on Lease {namespace}/{name}: {source}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
}

/// This coordinator leads until [`Leadership::lost`] resolves.
pub struct Leadership {
    leading: watch::Receiver<bool>,
    renewer: JoinHandle<Result<kube_lease_manager::LeaseManager, LeaseManagerError>>,
    settings: LeaseSettings,
    client: Client,
    identity: String,
    fence: Fence,
}

/// Whether this coordinator may still act as the leader: down for good once
/// it stepped down. Checked right before what must never happen twice
/// (an assignment, a patch, a delete in the registry).
#[derive(Clone, Debug)]
pub struct Fence(Arc<AtomicBool>);

/// How long a leader acts on without seeing a renewal of its own Lease:
/// two thirds of the Lease, as client-go's 10 s of 15 s, so that it stops
/// before another can take over.
pub fn renew_deadline(lease: Duration) -> Duration {
    lease.mul_f64(2.0 / 3.0)
}

/// Waits until `identity` holds the Lease; `None` if `shutdown` came first.
pub async fn lead(
    client: Client,
    settings: LeaseSettings,
    identity: &str,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<Option<Leadership>, LeaderError> {
    let seconds = settings.duration.as_secs().max(2);
    let error =
        |source| LeaderError::Lease { namespace: settings.namespace.clone(), name: settings.name.clone(), source };
    let manager = LeaseManagerBuilder::new(client.clone(), &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(identity)
        .with_duration(seconds)
        // Renewed half way, so that a renewal is seen well within the
        // renew deadline (two thirds).
        .with_grace((seconds / 2).max(1))
        .with_field_manager(crate::MANAGER)
        .with_create_mode(LeaseCreateMode::AutoCreate)
        .build()
        .await
        .map_err(error)?;
    let (mut leading, renewer) = manager.watch().await;
    info!(lease = %settings.name, %identity, "waiting to lead");
    let mut shutdown = std::pin::pin!(shutdown);
    while !*leading.borrow_and_update() {
        tokio::select! {
            () = &mut shutdown => {
                drop(leading);
                let _ = renewer.await;
                return Ok(None);
            }
            changed = leading.changed() => {
                if changed.is_err() {
                    return match renewer.await {
                        Ok(Err(source)) => Err(error(source)),
                        _ => Ok(None),
                    };
                }
            }
        }
    }
    info!(lease = %settings.name, %identity, "leading");
    let fence = Fence(Arc::new(AtomicBool::new(true)));
    Ok(Some(Leadership { leading, renewer, settings, client, identity: identity.to_string(), fence }))
}

// === impl Leadership ===

impl Leadership {
    /// What acts as the leader checks first.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// Resolves when another coordinator holds the Lease now, or when no
    /// renewal of this one's was seen within the renew deadline; the fence
    /// is down by then.
    pub async fn lost(&mut self) {
        tokio::select! {
            () = held_elsewhere(&mut self.leading) => warn!(lease = %self.settings.name, "leadership lost"),
            () = renewals_stop(&self.client, &self.settings, &self.identity) => warn!(
                lease = %self.settings.name,
                deadline = ?renew_deadline(self.settings.duration),
                "no renewal of the lease seen within the renew deadline; stepping down before another can take over"
            ),
        }
        self.fence.0.store(false, Ordering::Release);
    }

    /// Gives the Lease up at once (a clean stop), so the other coordinator
    /// need not wait for it to expire.
    pub async fn release(self) {
        drop(self.leading);
        match self.renewer.await {
            Ok(Ok(_)) => info!(lease = %self.settings.name, "lease released"),
            Ok(Err(e)) => {
                warn!(lease = %self.settings.name, error = %e, "releasing the lease failed; it expires instead")
            }
            Err(e) => warn!(lease = %self.settings.name, error = %e, "the lease renewer failed"),
        }
    }
}

/// Resolves once the Lease, as read back, has not been renewed by
/// `identity` for the renew deadline: a read that fails or hangs (the
/// API server unreachable) confirms nothing.
async fn renewals_stop(client: &Client, settings: &LeaseSettings, identity: &str) {
    let deadline = renew_deadline(settings.duration);
    let every = (deadline / 4).max(Duration::from_millis(100));
    let leases: Api<Lease> = Api::namespaced(client.clone(), &settings.namespace);
    let mut renewed = Timestamp::now();
    loop {
        if let Ok(Ok(lease)) = tokio::time::timeout(every, leases.get(&settings.name)).await {
            let spec = lease.spec.unwrap_or_default();
            if spec.holder_identity.as_deref() == Some(identity)
                && let Some(time) = spec.renew_time
            {
                renewed = renewed.max(time.0);
            }
        }
        let since = Timestamp::now().duration_since(renewed).unsigned_abs();
        if since >= deadline {
            return;
        }
        debug!(?since, "lease renewal seen");
        tokio::time::sleep(every).await;
    }
}

/// Resolves when the lease manager says another coordinator holds the Lease.
async fn held_elsewhere(leading: &mut watch::Receiver<bool>) {
    loop {
        if leading.changed().await.is_err() || !*leading.borrow_and_update() {
            return;
        }
    }
}

// === impl Fence ===

impl Fence {
    /// A fence that is always up: a coordinator that leads alone (tests,
    /// `restore`).
    pub fn always() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    pub fn up(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The label the leader's pod carries; the Service selects it.
pub const ROLE_LABEL: &str = "backup.k8slab.io/role";

/// Labels this coordinator's pod with its role, so that the Service (which
/// selects the leader's pod) sends agents and people to the leader while
/// both replicas stay ready: a readiness that followed leadership would
/// leave a rolling update waiting for a new pod that cannot lead, and a
/// PodDisruptionBudget refusing to evict the leader. Outside a pod (a local
/// run, a test) there is nothing to label.
pub async fn label_role(client: &Client, namespace: &str, pod: &str, leading: bool) {
    use k8s_openapi::api::core::v1::Pod;
    use kube::api::{Api, Patch, PatchParams};
    let role = if leading { "leader" } else { "follower" };
    let patch = serde_json::json!({"metadata": {"labels": {ROLE_LABEL: role}}});
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let labelled =
        tokio::time::timeout(Duration::from_secs(10), pods.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)))
            .await;
    match labelled {
        Ok(Ok(_)) => info!(%pod, role, "pod labelled"),
        Ok(Err(kube::Error::Api(status))) if status.code == 404 => {
            tracing::debug!(%pod, "no pod of this name: not labelled");
        }
        Ok(Err(e)) => warn!(%pod, role, error = %e, "labelling the pod failed: the Service may not reach the leader"),
        Err(_) => warn!(%pod, role, "labelling the pod timed out: the Service may not reach the leader"),
    }
}
