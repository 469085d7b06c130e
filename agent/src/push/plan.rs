//! What a push copies, decided from the node's content store alone: the
//! manifests and blobs that go from this node, the children of an index
//! that come from the source, and how an index ends. No registry is asked
//! anything until the plan is carried out, so every rule here is tested
//! against an in-memory store.
//!
//! Planning only reads. The lease takes the root before it is read, and
//! each blob when it is pushed: a lease is a write (a transaction synced to
//! disk) in containerd, and an image the target holds already pushes no
//! blob, so its second push stays a few reads and two HEADs.

use std::collections::HashSet;

use bytes::Bytes;
use image_backup_oci::{
    index::{self, Child},
    media::{is_index, sha256_digest},
};

use super::{
    Finish, IndexContent, PushError, Pusher, Scope, check_digest, effective_media_type, index::platform_manifest,
    manifest_blobs, to_descriptor,
};
use crate::store::{BlobInfo, ContentStore, Descriptor, Lease};

/// A push decided from the node's content store.
#[derive(Clone, Debug)]
pub struct Plan {
    /// The image's root as the store records it, with the media type its
    /// bytes declare when the record has none.
    pub root: Descriptor,
    /// The root's bytes, pushed byte for byte.
    pub bytes: Bytes,
    pub kind: PlanKind,
}

#[derive(Clone, Debug)]
pub enum PlanKind {
    /// A single-platform image, whatever the scope: its blobs, its
    /// manifest, then the tag.
    Image(ManifestContent),
    Index(IndexPlan),
}

/// An index's part in one push.
#[derive(Clone, Debug)]
pub struct IndexPlan {
    /// Every child the index names.
    pub children: Vec<Child>,
    /// Children this node holds whole, pushed from here.
    pub from_node: Vec<(Child, ManifestContent)>,
    /// Children no node holds, copied from the source registry.
    pub from_source: Vec<Child>,
    pub finish: PlannedFinish,
}

/// How an index push ends.
#[derive(Clone, Debug, PartialEq)]
pub enum PlannedFinish {
    /// With the children; another push finishes the index.
    None,
    /// With the index, byte for byte, once every child is in the target.
    Index,
    /// With a reduced index of the `kept` children, once they are in the
    /// target.
    Reduced { descriptor: Descriptor, bytes: Bytes, kept: Vec<Child> },
}

/// A manifest and the blobs it references.
#[derive(Clone, Debug)]
pub struct ManifestContent {
    pub descriptor: Descriptor,
    pub bytes: Bytes,
    pub blobs: Vec<PlannedBlob>,
}

/// A blob to push, with what the node's store knows of it.
#[derive(Clone, Debug, PartialEq)]
pub struct PlannedBlob {
    pub descriptor: Descriptor,
    /// `None` when the node lacks the blob (containerd skips fetching a
    /// layer whose snapshot exists, and may discard layers once unpacked)
    /// or when it comes from the source registry. A blob of the node's that
    /// the target lacks then comes from the source, if the push may read
    /// it, else the push fails.
    pub held: Option<BlobInfo>,
}

// === impl Plan ===

impl Plan {
    /// The blobs the plan pushes from this node, each once, manifests'
    /// blobs in the order the manifests list them.
    pub fn node_blobs(&self) -> Vec<&PlannedBlob> {
        let manifests: Vec<&ManifestContent> = match &self.kind {
            PlanKind::Image(manifest) => vec![manifest],
            PlanKind::Index(index) => index.from_node.iter().map(|(_, manifest)| manifest).collect(),
        };
        let mut seen = HashSet::new();
        manifests.into_iter().flat_map(|m| &m.blobs).filter(|b| seen.insert(&b.descriptor.digest)).collect()
    }

    /// The blobs of the node's manifests that the node lacks.
    pub fn missing(&self) -> Vec<&Descriptor> {
        self.node_blobs().into_iter().filter(|b| b.held.is_none()).map(|b| &b.descriptor).collect()
    }
}

// === impl Pusher ===

impl<S: ContentStore> Pusher<S> {
    /// Plans a push of `scope` of the image whose root is `root`, which
    /// `lease` holds from now on.
    pub async fn plan(&self, root: &Descriptor, scope: &Scope, lease: &S::Lease) -> Result<Plan, PushError> {
        let bytes = self.read_manifest(root, Some(lease)).await?;
        let root = Descriptor { media_type: effective_media_type(root, &bytes), ..root.clone() };
        if !is_index(&root.media_type) {
            let mut blobs = Vec::new();
            for descriptor in manifest_blobs(&root, &bytes)? {
                let held = self.info(&descriptor.digest).await?;
                blobs.push(PlannedBlob { descriptor, held });
            }
            let manifest = ManifestContent { descriptor: root.clone(), bytes: bytes.clone(), blobs };
            return Ok(Plan { root, bytes, kind: PlanKind::Image(manifest) });
        }
        let children = children_of(&root, &bytes)?;
        let child = |digest: &String| {
            children
                .iter()
                .find(|c| c.digest() == digest)
                .ok_or_else(|| PushError::NotInIndex { index: root.digest.clone(), digest: digest.clone() })
        };
        let mut from_node = Vec::new();
        let (from_source, finish) = match scope {
            Scope::Whole => {
                for child in &children {
                    if let Some(manifest) = self.whole(&to_descriptor(&child.descriptor)).await? {
                        from_node.push((child.clone(), manifest));
                    }
                }
                (Vec::new(), &Finish::Index)
            }
            Scope::Part { manifests, from_source, finish } => {
                for digest in manifests {
                    let child = child(digest)?;
                    let Some(manifest) = self.whole(&to_descriptor(&child.descriptor)).await? else {
                        let manifest = platform_manifest(child);
                        return Err(PushError::NotHeld { index: root.digest.clone(), manifest });
                    };
                    from_node.push((child.clone(), manifest));
                }
                let sourced = from_source.iter().map(|d| child(d).cloned()).collect::<Result<Vec<_>, _>>()?;
                (sourced, finish)
            }
        };
        let finish = match finish {
            Finish::None => PlannedFinish::None,
            Finish::Index => PlannedFinish::Index,
            Finish::Reduced { keep } => {
                // What this push copies stays in the index too.
                let pushed = from_node.iter().map(|(c, _)| c).chain(&from_source).map(Child::digest);
                let keep: HashSet<&str> = keep.iter().map(String::as_str).chain(pushed).collect();
                reduced(&root, &bytes, &children, &keep)?
            }
        };
        Ok(Plan { root, bytes, kind: PlanKind::Index(IndexPlan { children, from_node, from_source, finish }) })
    }

    /// For an index, its children and which of them this node holds whole;
    /// `None` for a single-platform image. A kubelet pull keeps only its
    /// own platform, and containerd skips fetching a layer whose snapshot
    /// exists, so a child's manifest alone does not make it whole.
    pub async fn index_content(&self, root: &Descriptor) -> Result<Option<IndexContent>, PushError> {
        if !root.media_type.is_empty() && !is_index(&root.media_type) {
            return Ok(None);
        }
        let bytes = self.read_manifest(root, None).await?;
        if !is_index(&effective_media_type(root, &bytes)) {
            return Ok(None);
        }
        let mut children = Vec::new();
        for child in children_of(root, &bytes)? {
            let whole = self.whole(&to_descriptor(&child.descriptor)).await?.is_some();
            children.push((child, whole));
        }
        Ok(Some(IndexContent { children }))
    }

    /// A child manifest and its blobs when the node holds them all; `None`
    /// when it lacks any, or the manifest is not an image's (a nested
    /// index, or something else no kubelet runs).
    async fn whole(&self, manifest: &Descriptor) -> Result<Option<ManifestContent>, PushError> {
        if self.info(&manifest.digest).await?.is_none() {
            return Ok(None);
        }
        let bytes = self.read_manifest(manifest, None).await?;
        let Ok(descriptors) = manifest_blobs(manifest, &bytes) else { return Ok(None) };
        let mut blobs = Vec::new();
        for descriptor in descriptors {
            let Some(info) = self.info(&descriptor.digest).await? else { return Ok(None) };
            blobs.push(PlannedBlob { descriptor, held: Some(info) });
        }
        let descriptor = Descriptor { media_type: effective_media_type(manifest, &bytes), ..manifest.clone() };
        Ok(Some(ManifestContent { descriptor, bytes, blobs }))
    }

    async fn info(&self, digest: &str) -> Result<Option<BlobInfo>, PushError> {
        self.store.info(digest).await.map_err(|error| PushError::Store { what: format!("blob {digest}"), error })
    }

    /// A manifest's bytes from the node, size and digest checked, held by
    /// the lease first when one is given.
    async fn read_manifest(&self, descriptor: &Descriptor, lease: Option<&S::Lease>) -> Result<Bytes, PushError> {
        if let Some(lease) = lease {
            protect(lease, &descriptor.digest).await?;
        }
        let bytes = self
            .store
            .read_all(&descriptor.digest, descriptor.size)
            .await
            .map_err(|error| PushError::Store { what: format!("manifest {}", descriptor.digest), error })?;
        check_digest(&descriptor.digest, descriptor.size, &bytes)?;
        Ok(bytes)
    }
}

pub(super) async fn protect(lease: &impl Lease, digest: &str) -> Result<(), PushError> {
    lease.protect(digest).await.map_err(|e| PushError::Store { what: format!("a lease on {digest}"), error: e })
}

/// The index with only the `keep` children, as its own manifest.
fn reduced(
    root: &Descriptor,
    bytes: &[u8],
    children: &[Child],
    keep: &HashSet<&str>,
) -> Result<PlannedFinish, PushError> {
    let reduced = index::reduced(bytes, &root.digest, keep)
        .map_err(|error| PushError::Reduce { digest: root.digest.clone(), error })?;
    let descriptor =
        Descriptor { media_type: root.media_type.clone(), digest: sha256_digest(&reduced), size: reduced.len() as u64 };
    let kept = children.iter().filter(|c| keep.contains(c.digest())).cloned().collect();
    Ok(PlannedFinish::Reduced { descriptor, bytes: reduced.into(), kept })
}

fn children_of(index: &Descriptor, bytes: &[u8]) -> Result<Vec<Child>, PushError> {
    index::children(bytes).map_err(|e| PushError::Manifest {
        digest: index.digest.clone(),
        media_type: index.media_type.clone(),
        detail: e.to_string(),
    })
}
