//! What the coordinator knows of this node's images: the full inventory a
//! session opens with, then each image containerd adds or removes, and each
//! that comes into use or goes out of it as the node's pods change.

use std::{collections::HashMap, sync::Arc};

use futures::StreamExt;
use image_backup_oci::media::PlatformName;
use image_backup_proto::v1::{
    AgentMessage, Inventory, InventoryImage, Platform as ProtoPlatform, PlatformManifest as ProtoPlatformManifest,
    agent_message,
};
use tokio::sync::mpsc;
use tracing::warn;

use super::{Agent, message};
use crate::store::{ContentStore, ImageEvent, ImageRecord, StoreError};

// === impl Agent ===

impl<S: ContentStore> Agent<S> {
    pub(super) async fn full_inventory(&self) -> Result<Inventory, StoreError> {
        let mut added = Vec::new();
        for record in self.pusher.store().list_images().await? {
            added.push(self.inventory_image(record).await);
        }
        Ok(Inventory { full: true, added, removed: Vec::new() })
    }

    /// An image as the coordinator needs to know it; for an index, which
    /// platform manifests this node actually holds.
    async fn inventory_image(&self, record: ImageRecord) -> InventoryImage {
        let (mut manifests, mut present_manifests) = (Vec::new(), Vec::new());
        match self.pusher.index_content(&record.target).await {
            Ok(Some(index)) => {
                for (child, whole) in index.children {
                    let manifest = ProtoPlatformManifest {
                        platform: Some(to_proto_platform(&child.platform)),
                        digest: child.digest().to_string(),
                        attestation: child.attestation,
                    };
                    if whole {
                        present_manifests.push(manifest.clone());
                    }
                    manifests.push(manifest);
                }
            }
            Ok(None) => {}
            Err(e) => warn!(image = %record.name, error = %e, "could not read the image's index"),
        }
        InventoryImage {
            in_use: self.guard.in_use().runs(&record.target.digest),
            name: record.name,
            digest: record.target.digest,
            media_type: record.target.media_type,
            present_manifests,
            manifests,
        }
    }

    /// Keeps the coordinator's view of this node's images current.
    pub(super) async fn follow_images(self: Arc<Self>, tx: mpsc::Sender<AgentMessage>) {
        let events = match self.pusher.store().image_events().await {
            Ok(events) => events,
            Err(e) => {
                warn!(error = %e, "cannot follow containerd's image events; the inventory refreshes only per session");
                return;
            }
        };
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            let inventory = match event {
                Ok(ImageEvent::Upserted(name)) => match self.pusher.store().image(&name).await {
                    Ok(Some(record)) => {
                        Inventory { full: false, added: vec![self.inventory_image(record).await], removed: Vec::new() }
                    }
                    Ok(None) => Inventory { full: false, added: Vec::new(), removed: vec![name] },
                    Err(e) => {
                        warn!(image = %name, error = %e, "could not read a new image");
                        continue;
                    }
                },
                Ok(ImageEvent::Deleted(name)) => Inventory { full: false, added: Vec::new(), removed: vec![name] },
                Err(e) => {
                    warn!(error = %e, "containerd's event stream failed");
                    return;
                }
            };
            if tx.send(message(agent_message::Message::Inventory(inventory))).await.is_err() {
                return;
            }
        }
    }

    /// Tells the coordinator which images came into use on this node, or
    /// went out of it, as its pods change.
    pub(super) async fn follow_use(
        self: Arc<Self>,
        tx: mpsc::Sender<AgentMessage>,
        mut sent: HashMap<String, bool>,
        mut changes: tokio::sync::watch::Receiver<u64>,
    ) {
        loop {
            let Ok(records) = self.pusher.store().list_images().await else { return };
            let mut changed = Vec::new();
            for record in records {
                let in_use = self.guard.in_use().runs(&record.target.digest);
                // An image listed since (by follow_images) was told as it
                // was then; telling it again is harmless, missing a change not.
                if sent.insert(record.name.clone(), in_use).unwrap_or(false) != in_use {
                    changed.push(self.inventory_image(record).await);
                }
            }
            if !changed.is_empty() {
                let inventory = Inventory { full: false, added: changed, removed: Vec::new() };
                if tx.send(message(agent_message::Message::Inventory(inventory))).await.is_err() {
                    return;
                }
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }
}

pub(super) fn to_proto_platform(p: &PlatformName) -> ProtoPlatform {
    let (os, architecture, variant) = p.parts();
    ProtoPlatform { os: os.into(), architecture: architecture.into(), variant: variant.into() }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use image_backup_oci::{BackupTarget, registry::RegistryConfig};
    use image_backup_proto::v1::agent_message::Message;

    use super::*;
    use crate::{
        daemon::DaemonConfig,
        guard::Guard,
        link::CoordinatorLink,
        push::{PushOptions, Pusher},
        store::{memory::MemoryStore, sample::SampleImage},
    };

    fn agent(store: &MemoryStore) -> Arc<Agent<MemoryStore>> {
        let config = DaemonConfig {
            coordinator: CoordinatorLink::new("http://127.0.0.1:1".into(), None, None).unwrap(),
            node_name: "node-a".into(),
            agent_id: "agent-a".into(),
            max_jobs: 1,
            reconnect_max: Duration::from_secs(1),
            progress_interval: Duration::from_secs(1),
            job_timeout: Duration::from_secs(60),
        };
        let backup = BackupTarget { registry: "backup.example.com".into(), prefix: "mirror".into() };
        let pusher = Pusher::new(store.clone(), RegistryConfig::default(), PushOptions::default());
        Agent::new(config, pusher, Guard::new(backup, "node-a", None))
    }

    fn inventory(message: AgentMessage) -> Inventory {
        match message.message {
            Some(Message::Inventory(inventory)) => inventory,
            other => panic!("expected an inventory, got {other:?}"),
        }
    }

    fn names(images: &[InventoryImage]) -> Vec<&str> {
        images.iter().map(|i| i.name.as_str()).collect()
    }

    #[tokio::test]
    async fn the_inventory_names_every_platform_of_an_index_and_those_the_node_holds_whole() {
        let multi = SampleImage::multi_platform(&[1024], &["amd64", "arm64", "s390x"], 1);
        let single = SampleImage::single(&[1024], 2);
        let store = MemoryStore::default();
        // arm64's layer went after unpacking: its manifest alone is here.
        store.import(
            &multi,
            "docker.io/library/multi:3",
            &["amd64", "arm64"],
            &[multi.platform("arm64").layers[0].digest()],
        );
        store.import(&single, "docker.io/library/single:1", &[], &[]);

        let inventory = agent(&store).full_inventory().await.unwrap();
        assert!(inventory.full && inventory.removed.is_empty());
        assert_eq!(names(&inventory.added), ["docker.io/library/multi:3", "docker.io/library/single:1"]);
        let (index, image) = (&inventory.added[0], &inventory.added[1]);
        assert_eq!(
            (index.digest.as_str(), index.media_type.as_str()),
            (multi.digest(), multi.root().media_type.as_str())
        );
        let listed = |manifests: &[ProtoPlatformManifest]| {
            manifests
                .iter()
                .map(|m| {
                    let platform = m.platform.clone().unwrap_or_default();
                    (format!("{}/{}", platform.os, platform.architecture), m.digest.clone())
                })
                .collect::<Vec<_>>()
        };
        let platform = |arch: &str| (format!("linux/{arch}"), multi.platform(arch).manifest.digest().to_string());
        assert_eq!(listed(&index.manifests), [platform("amd64"), platform("arm64"), platform("s390x")]);
        assert_eq!(listed(&index.present_manifests), [platform("amd64")]);
        assert_eq!(image.digest, single.digest());
        assert!(image.manifests.is_empty() && image.present_manifests.is_empty(), "a single image has no children");
        assert!(!index.in_use && !image.in_use, "no pod of this node runs them");
    }

    #[tokio::test]
    async fn images_the_store_adds_and_removes_are_told_as_they_come() {
        let image = SampleImage::single(&[1024], 3);
        let store = MemoryStore::default();
        let (tx, mut rx) = mpsc::channel(8);
        let follow = tokio::spawn(agent(&store).follow_images(tx));
        while store.followers() == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }

        store.import(&image, "docker.io/library/app:1", &[], &[]);
        let added = inventory(rx.recv().await.unwrap());
        assert!(!added.full && added.removed.is_empty());
        assert_eq!(names(&added.added), ["docker.io/library/app:1"]);
        assert_eq!(added.added[0].digest, image.digest());

        store.remove_image("docker.io/library/app:1");
        let removed = inventory(rx.recv().await.unwrap());
        assert!(!removed.full && removed.added.is_empty());
        assert_eq!(removed.removed, ["docker.io/library/app:1"]);
        follow.abort();
    }
}
