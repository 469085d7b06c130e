//! How a workload is woken by something other than its own watch.

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::runtime::reflector::ObjectRef;
use tokio::sync::mpsc::UnboundedSender;

use super::{rollout, usage::WorkloadKey};

/// The workload controllers' wake-up channels, for what wakes a workload
/// besides its own watch: a freed rollout slot, a deleted ImageBackup.
#[derive(Clone)]
pub struct Wakers {
    pub deployments: UnboundedSender<ObjectRef<Deployment>>,
    pub daemonsets: UnboundedSender<ObjectRef<DaemonSet>>,
}

impl rollout::Wake for Wakers {
    fn wake(&self, workload: &WorkloadKey) {
        // The receivers live as long as the controllers.
        if workload.kind == <Deployment as k8s_openapi::Resource>::KIND {
            let _ = self.deployments.send(ObjectRef::new(&workload.name).within(&workload.namespace));
        } else {
            let _ = self.daemonsets.send(ObjectRef::new(&workload.name).within(&workload.namespace));
        }
    }
}
