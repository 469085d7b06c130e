//! Leader election on a coordination.k8s.io Lease, with kube-lease-manager.
//! Two coordinators run; only the one holding the Lease watches, writes,
//! assigns, patches and serves gRPC, and only it reports ready, so the
//! Service sends agents and people to it. The other waits to take over. A
//! leader that loses the Lease stops (and is restarted as a follower)
//! rather than unwind every controller: what it knew lives in the API
//! server, which is where the next leader picks up from.

use std::time::Duration;

use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManagerBuilder, LeaseManagerError};
use tokio::{sync::watch, task::JoinHandle};
use tracing::{info, warn};

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
    let manager = LeaseManagerBuilder::new(client, &settings.name)
        .with_namespace(&settings.namespace)
        .with_identity(identity)
        .with_duration(seconds)
        // Renewed a third of the way before it ends.
        .with_grace((seconds / 3).max(1))
        .with_field_manager(crate::context::MANAGER)
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
    Ok(Some(Leadership { leading, renewer, settings }))
}

// === impl Leadership ===

impl Leadership {
    /// Resolves when another coordinator holds the Lease now.
    pub async fn lost(&mut self) {
        loop {
            if self.leading.changed().await.is_err() || !*self.leading.borrow_and_update() {
                warn!(lease = %self.settings.name, "leadership lost");
                return;
            }
        }
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
