//! What every reconcile shares.

use parking_lot::Mutex;
use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

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
    MANAGER,
    agents::AgentHub,
    backups::notes::Notes,
    config::CoordinatorConfig,
    jobs::{JobWaker, LiveJobs},
    metrics::Metrics,
    workloads::{digests::DigestCache, rollout::Rollouts, usage::Usage, wakers::Wakers},
};

/// Shared by the reconcilers of every kind.
pub struct Context {
    pub client: Client,
    pub config: CoordinatorConfig,
    pub hub: Arc<AgentHub>,
    /// What agents reported, until the ImageBackup reconciler records it.
    pub jobs: Arc<LiveJobs>,
    /// Has the ImageBackup reconciler look at a job again (a note queued, a
    /// prune mark due).
    pub backup_waker: JobWaker,
    /// The ImageBackups as the controller's reflector sees them.
    pub backups: Store<ImageBackup>,
    pub written: Written,
    pub creating: Creating,
    pub usage: Arc<Usage>,
    pub digests: DigestCache,
    pub registry: Registry,
    /// The backup registry as a pod without credentials reads it.
    pub anonymous: Registry,
    pub open_backups: crate::workloads::open_backups::OpenBackups,
    pub metrics: Arc<Metrics>,
    /// What workload reconciles have to say on ImageBackups.
    pub notes: Notes,
    /// Rollouts to backups in flight, cluster wide.
    pub rollouts: Rollouts,
    pub wakers: Wakers,
    /// Unused ImageBackups are looked after (see `backups::unused`).
    pub sweeping: std::sync::atomic::AtomicBool,
    /// Every watched store has listed its objects once.
    pub synced: std::sync::atomic::AtomicBool,
    /// Failed reconciles in a row, per object: their retry delays.
    pub failures: crate::backoff::FailureBackoff,
    /// Down once this coordinator stepped down: nothing that acts on the
    /// cluster, the agents or the registry goes ahead then.
    pub fence: crate::leader::Fence,
}

// === impl Context ===

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        config: CoordinatorConfig,
        hub: Arc<AgentHub>,
        jobs: Arc<LiveJobs>,
        backups: Store<ImageBackup>,
        usage: Arc<Usage>,
        metrics: Arc<Metrics>,
        wakers: Wakers,
        fence: crate::leader::Fence,
    ) -> Result<Arc<Self>, RegistryError> {
        // The coordinator only verifies: pull access is all it asks for.
        let registry = Registry::reader(&config.backup.registry, &config.registry, None)?;
        let anonymous = crate::pull_secrets::anonymous_or(&config.backup.registry, &config.registry, None)?;
        let rollouts = Rollouts::new(config.max_rollouts, Box::new(wakers.clone()));
        Ok(Arc::new(Self {
            client,
            config,
            hub,
            backup_waker: jobs.waker(),
            jobs,
            backups,
            written: Written::default(),
            creating: Creating::default(),
            usage,
            digests: DigestCache::default(),
            registry,
            anonymous,
            open_backups: Default::default(),
            metrics,
            notes: Notes::default(),
            rollouts,
            wakers,
            sweeping: Default::default(),
            synced: Default::default(),
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

    /// The newer of `seen` and what was written. resourceVersions are
    /// opaque to clients, but every API server in use numbers them from
    /// etcd's revision; when one does not parse, the store wins.
    pub fn freshest(&self, seen: Arc<ImageBackup>) -> Arc<ImageBackup> {
        let mut written = self.lock();
        let Some(mine) = written.get(&seen.name_any()) else { return seen };
        let version = |o: &ImageBackup| o.resource_version().and_then(|v| v.parse::<u64>().ok());
        match (version(&seen), version(mine)) {
            (Some(store), Some(own)) if own > store => mine.clone(),
            _ => {
                // The store caught up: nothing to remember any more.
                written.remove(&seen.name_any());
                seen
            }
        }
    }

    pub fn forget(&self, name: &str) {
        self.lock().remove(name);
    }
}

/// ImageBackups this coordinator is creating, so that workloads sharing an
/// image make one create between them. An entry lapses once the store
/// should long have shown the object, so one deleted later is made again.
#[derive(Default)]
pub struct Creating(Mutex<HashMap<String, Instant>>);

/// Longer than a watch event takes to reach the store.
const CREATE_SETTLE: Duration = Duration::from_secs(30);

impl Creating {
    /// Whether the caller should create `name` now.
    pub fn begin(&self, name: &str) -> bool {
        let mut creating = self.0.lock();
        creating.retain(|_, at| at.elapsed() < CREATE_SETTLE);
        match creating.entry(name.to_string()) {
            std::collections::hash_map::Entry::Occupied(_) => false,
            std::collections::hash_map::Entry::Vacant(entry) => {
                entry.insert(Instant::now());
                true
            }
        }
    }

    /// The create failed: the next workload tries again.
    pub fn failed(&self, name: &str) {
        self.0.lock().remove(name);
    }
}
