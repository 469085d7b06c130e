//! One connected agent as the hub keeps it: its session, its slots, and
//! what its node's containerd holds, from which the holdings of an image
//! across nodes are read for the plan.

use std::{
    collections::{HashMap, HashSet},
    time::{Instant, SystemTime},
};

use image_backup_core::job::plan::{Child, Holding, Holdings};
use image_backup_oci::media::{PlatformName, is_index};
use image_backup_proto::v1::{CoordinatorMessage, Inventory, InventoryImage, Register};
use tokio::sync::mpsc;
use tonic::Status;
use tracing::warn;

/// Images one node's inventory may hold here; a node with more is either
/// not a node or not one to back up from, and the rest is left out.
const MAX_IMAGES: usize = 20_000;

/// Children of one index kept from an inventory (real indexes list a few
/// dozen at most).
const MAX_CHILDREN: usize = 256;

/// A connected agent: its session, its slots, what its node holds.
pub struct Agent {
    pub session: u64,
    pub register: Register,
    pub connected_at: SystemTime,
    pub last_heartbeat: Instant,
    pub last_heartbeat_wall: SystemTime,
    pub running: HashSet<String>,
    /// When each job was handed over: a heartbeat sent before the agent
    /// read its assignment must not make the job look lost or the slot free.
    pub assigned_at: HashMap<String, Instant>,
    /// Images by containerd name.
    pub images: HashMap<String, InventoryImage>,
    pub tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
}

// === impl Agent ===

impl Agent {
    /// Whether this node's containerd holds the whole content of the image
    /// manifest `digest`, as an image its pods run: as the image's target,
    /// or as a child of an index. An agent copies nothing its node's pods
    /// do not run, so nothing else is offered to it.
    pub fn holds_whole(&self, digest: &str) -> bool {
        self.in_use().any(|image| {
            (image.digest == digest && !is_index_image(image))
                || image.present_manifests.iter().any(|m| m.digest == digest)
        })
    }

    /// The index `digest` as this node's inventory lists it, in use.
    pub fn index(&self, digest: &str) -> Option<&InventoryImage> {
        self.in_use().find(|image| image.digest == digest && is_index_image(image))
    }

    pub fn in_use(&self) -> impl Iterator<Item = &InventoryImage> {
        self.images.values().filter(|image| image.in_use)
    }

    pub fn free(&self) -> bool {
        self.running.len() < self.register.max_concurrent_jobs.max(1) as usize
    }

    /// Takes in an inventory (all of it, or what changed).
    pub fn apply(&mut self, inventory: Inventory) {
        if inventory.full {
            self.images.clear();
        }
        for name in inventory.removed {
            self.images.remove(&name);
        }
        for mut image in inventory.added {
            if self.images.len() >= MAX_IMAGES && !self.images.contains_key(&image.name) {
                warn!(image = %image.name, "the node lists more than {MAX_IMAGES} images; the rest is ignored");
                break;
            }
            image.manifests.truncate(MAX_CHILDREN);
            image.present_manifests.truncate(MAX_CHILDREN);
            self.images.insert(image.name.clone(), image);
        }
    }
}

/// containerd may record no media type for an image pulled by digest; an
/// index lists its children either way.
fn is_index_image(image: &InventoryImage) -> bool {
    !image.manifests.is_empty() || is_index(&image.media_type)
}

/// What the nodes of `agents` hold of the image `digest` (see
/// `AgentHub::holdings`).
pub fn holdings(agents: &HashMap<String, Agent>, digest: &str) -> Holdings {
    let children: Vec<Child> = agents
        .values()
        // An agent that could not read the index lists no children.
        .find_map(|a| a.index(digest).filter(|index| !index.manifests.is_empty()))
        .map(|index| {
            index
                .manifests
                .iter()
                .map(|m| Child {
                    platform: m.platform.as_ref().map_or_else(
                        || "unknown/unknown".to_string(),
                        |p| PlatformName::from((&*p.os, &*p.architecture, &*p.variant)).to_string(),
                    ),
                    digest: m.digest.clone(),
                    attestation: m.attestation,
                })
                .collect()
        })
        .unwrap_or_default();
    let mut holders: Vec<(&String, &Agent, Holding)> = agents
        .iter()
        .filter_map(|(id, agent)| {
            let root = if children.is_empty() { agent.holds_whole(digest) } else { agent.index(digest).is_some() };
            let held: Vec<String> =
                children.iter().filter(|c| agent.holds_whole(&c.digest)).map(|c| c.digest.clone()).collect();
            (root || !held.is_empty()).then(|| {
                let holding = Holding {
                    agent_id: id.clone(),
                    node: agent.register.node_name.clone(),
                    free: agent.free(),
                    root,
                    children: held,
                    platform: agent.register.platform.as_ref().map_or_else(String::new, |p| {
                        PlatformName::from((&*p.os, &*p.architecture, &*p.variant)).to_string()
                    }),
                };
                (id, agent, holding)
            })
        })
        .collect();
    holders.sort_by(|(a_id, a, _), (b_id, b, _)| {
        (a.running.len(), &a.register.node_name, a_id).cmp(&(b.running.len(), &b.register.node_name, b_id))
    });
    Holdings { children, agents: holders.into_iter().map(|(_, _, holding)| holding).collect() }
}

#[cfg(test)]
pub mod tests {
    use image_backup_proto::v1::PlatformManifest;

    use super::*;

    pub const INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

    pub fn agent(images: Vec<InventoryImage>, running: &[&str], max: u32) -> Agent {
        let (tx, _) = mpsc::channel(1);
        Agent {
            session: 1,
            register: Register { node_name: "node-a".into(), max_concurrent_jobs: max, ..Register::default() },
            connected_at: SystemTime::now(),
            last_heartbeat: Instant::now(),
            last_heartbeat_wall: SystemTime::now(),
            running: running.iter().map(|j| j.to_string()).collect(),
            assigned_at: HashMap::new(),
            images: images.into_iter().map(|i| (i.name.clone(), i)).collect(),
            tx,
        }
    }

    pub fn image(name: &str, digest: &str, media_type: &str, present: &[&str]) -> InventoryImage {
        let manifest = |d: &&str| PlatformManifest { digest: d.to_string(), ..PlatformManifest::default() };
        let children = if media_type == INDEX { vec!["sha256:amd64", "sha256:arm64"] } else { vec![] };
        InventoryImage {
            name: name.into(),
            digest: digest.into(),
            media_type: media_type.into(),
            present_manifests: present.iter().map(manifest).collect(),
            manifests: children.iter().map(manifest).collect(),
            in_use: true,
        }
    }

    #[test]
    fn holds_manifests_whole_and_indexes_with_the_children_it_has() {
        let node = agent(
            vec![image("app:1", "sha256:m", MANIFEST, &[]), image("web:1", "sha256:i", INDEX, &["sha256:amd64"])],
            &[],
            2,
        );
        assert!(node.holds_whole("sha256:m"));
        assert!(node.holds_whole("sha256:amd64"), "a platform manifest of an index it pulled");
        assert!(!node.holds_whole("sha256:arm64"), "listed by the index, not pulled");
        assert!(!node.holds_whole("sha256:i"), "an index is held as its children");
        assert!(node.index("sha256:i").is_some());
        assert!(!node.holds_whole("sha256:other"));
        let mut idle = image("old:1", "sha256:idle", MANIFEST, &[]);
        idle.in_use = false;
        let node = agent(vec![idle], &[], 2);
        assert!(!node.holds_whole("sha256:idle"), "held, but no pod of the node runs it");
    }
}
