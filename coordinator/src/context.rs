//! What the controllers share; each one's own state is in its context.

use parking_lot::Mutex;
use std::{collections::HashMap, sync::Arc};

use image_backup_crds::ImageBackup;
use image_backup_oci::registry::{Registry, RegistryError};
use k8s_openapi::{
    api::{core::v1::ObjectReference, events::v1::Event as K8sEvent},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client, ResourceExt,
    api::PostParams,
    runtime::{events::EventType, reflector::Store},
};
use tracing::warn;

use crate::{
    MANAGER, backups::notes::Notes, config::CoordinatorConfig, jobs::JobWaker, metrics::Metrics,
    workloads::usage::Usage,
};

/// What the controllers share: the cluster, the settings, the backup
/// registry, and the stores one controller writes and the others read.
/// Each controller's own state is in its context (`workloads::Context`,
/// `backups::Context`), which derefs to this.
pub struct Shared {
    pub client: Client,
    pub config: CoordinatorConfig,
    pub metrics: Arc<Metrics>,
    /// The ImageBackups as the shared reflector sees them.
    pub backups: Store<ImageBackup>,
    /// The ImageBackup reconciler's last writes (it writes, workloads read).
    pub written: Written,
    /// Which workload uses which backup (workloads write, the rest read).
    pub usage: Arc<Usage>,
    /// The backup registry, read only: the coordinator verifies.
    pub registry: Registry,
    /// What workload reconciles have to say on ImageBackups (workloads
    /// queue, the ImageBackup reconciler writes them).
    pub notes: Notes,
    /// Has the ImageBackup reconciler look at a job again (a note queued, a
    /// prune mark due).
    pub backup_waker: JobWaker,
    /// Failed reconciles in a row, per object: their retry delays.
    pub failures: crate::backoff::FailureBackoff,
    /// Down once this coordinator stepped down: nothing that acts on the
    /// cluster, the agents or the registry goes ahead then.
    pub fence: crate::leader::Fence,
}

// === impl Shared ===

impl Shared {
    pub fn new(
        client: Client,
        config: CoordinatorConfig,
        backups: Store<ImageBackup>,
        usage: Arc<Usage>,
        metrics: Arc<Metrics>,
        backup_waker: JobWaker,
        fence: crate::leader::Fence,
    ) -> Result<Arc<Self>, RegistryError> {
        let registry = Registry::reader(&config.backup.registry, &config.registry, None)?;
        Ok(Arc::new(Self {
            client,
            config,
            metrics,
            backups,
            written: Written::default(),
            usage,
            registry,
            notes: Notes::default(),
            backup_waker,
            failures: Default::default(),
            fence,
        }))
    }

    pub fn backup_api(&self) -> Api<ImageBackup> {
        Api::all(self.client.clone())
    }

    /// Records an Event; failing to is logged, never fatal. Written here
    /// rather than with kube's `Recorder`, which keeps every event it sent
    /// (for series of repeats) and scans them all on each publish: with one
    /// event per patched workload that was tens of megabytes at thousands of
    /// workloads, for repeats that do not happen.
    pub async fn event(&self, object: &ObjectReference, type_: EventType, reason: &str, note: String) {
        let now = Timestamp::now();
        let namespace = object.namespace.clone().unwrap_or_else(|| "default".into());
        let name = object.name.as_deref().unwrap_or(MANAGER);
        let event = K8sEvent {
            metadata: ObjectMeta {
                name: Some(format!("{name}.{:x}", now.as_nanosecond())),
                namespace: Some(namespace.clone()),
                ..ObjectMeta::default()
            },
            event_time: Some(MicroTime(now)),
            action: Some(reason.into()),
            reason: Some(reason.into()),
            note: Some(note),
            regarding: Some(object.clone()),
            reporting_controller: Some(MANAGER.into()),
            reporting_instance: Some(MANAGER.into()),
            type_: Some(match type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            ..K8sEvent::default()
        };
        let api = Api::<K8sEvent>::namespaced(self.client.clone(), &namespace);
        if let Err(e) = api.create(&PostParams::default(), &event).await {
            warn!(reason, error = %e, "could not record an event");
        }
    }
}

/// The ImageBackups this coordinator wrote last. The reflector store sees a
/// write only when its watch event arrives; until then, deciding from the
/// store would act on the status before the write (assign twice, say).
#[derive(Default)]
pub struct Written(Mutex<HashMap<String, Arc<ImageBackup>>>);

impl Written {
    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Arc<ImageBackup>>> {
        self.0.lock()
    }

    pub fn remember(&self, object: Arc<ImageBackup>) {
        self.lock().insert(object.name_any(), object);
    }

    /// The newer of `seen` and what was written; once the store caught
    /// up, the write is dropped. For the ImageBackup reconciler, the writer.
    pub fn freshest(&self, seen: Arc<ImageBackup>) -> Arc<ImageBackup> {
        let mut written = self.lock();
        let Some(mine) = written.get(&seen.name_any()) else { return seen };
        if newer(mine, &seen) {
            return mine.clone();
        }
        written.remove(&seen.name_any());
        seen
    }

    /// The newer of `seen` and what was written, for the other readers:
    /// nothing is dropped, the writer does that.
    pub fn newest(&self, seen: Arc<ImageBackup>) -> Arc<ImageBackup> {
        match self.lock().get(&seen.name_any()) {
            Some(mine) if newer(mine, &seen) => mine.clone(),
            _ => seen,
        }
    }

    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// Whether `written` is newer than `seen`. resourceVersions are opaque to
/// clients, but every API server in use numbers them from etcd's revision;
/// when one does not parse, the store wins.
fn newer(written: &ImageBackup, seen: &ImageBackup) -> bool {
    let version = |o: &ImageBackup| o.resource_version().and_then(|v| v.parse::<u64>().ok());
    matches!((version(written), version(seen)), (Some(own), Some(store)) if own > store)
}

#[cfg(test)]
mod tests {
    use image_backup_crds::ImageBackupSpec;

    use super::*;

    fn at(version: &str) -> Arc<ImageBackup> {
        let spec = ImageBackupSpec { source: "docker.io/library/nginx:1.25".into(), digest: "sha256:00".into() };
        let mut backup = ImageBackup::new("nginx", spec);
        backup.metadata.resource_version = Some(version.into());
        Arc::new(backup)
    }

    #[test]
    fn a_write_stands_until_the_store_catches_up_and_only_the_writer_drops_it() {
        let written = Written::default();
        written.remember(at("12"));
        // Readers see the write over an older store, and leave it there.
        assert_eq!(written.newest(at("11")).resource_version().as_deref(), Some("12"));
        assert_eq!(written.newest(at("11")).resource_version().as_deref(), Some("12"));
        assert_eq!(written.freshest(at("11")).resource_version().as_deref(), Some("12"));
        // The store caught up: the writer drops its copy.
        assert_eq!(written.freshest(at("12")).resource_version().as_deref(), Some("12"));
        assert_eq!(written.newest(at("9")).resource_version().as_deref(), Some("9"), "nothing remembered now");
        // A version that does not parse: the store wins.
        written.remember(at("12"));
        assert_eq!(written.newest(at("opaque")).resource_version().as_deref(), Some("opaque"));
    }
}
