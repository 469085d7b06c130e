//! An index: the children this node holds whole, and the index itself once
//! the target has every child it names, or a reduced index of the children
//! the cluster holds when some exist nowhere.

use std::collections::HashSet;

use bytes::Bytes;
use image_backup_oci::{
    ImageRef,
    index::{self, Child},
    media::sha256_digest,
};
use tracing::{debug, info};

use super::{Job, Origin, PlatformManifest, PushError, Pushed, Pusher, check_digest, manifest_blobs, to_descriptor};
use crate::containerd::Descriptor;

/// What part of an image one push copies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// The whole image. For an index: every child this node holds, then the
    /// index, which needs the other children in the target already.
    #[default]
    Whole,
    /// Part of an index, as the coordinator plans it across nodes:
    /// children from this node, children no node holds from the source
    /// registry, then the finish.
    Part { manifests: Vec<String>, from_source: Vec<String>, finish: Finish },
}

/// What an index push ends with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Finish {
    /// Only the children; another push finishes the index.
    None,
    /// The index, byte for byte.
    Index,
    /// An index of only these children (and those pushed now), annotated
    /// with the source index and the platforms left out.
    Reduced { keep: Vec<String> },
}

/// An index as this node's containerd holds it: each child, and whether
/// its whole content (manifest, config, layers) is here.
#[derive(Clone, Debug)]
pub struct IndexContent {
    pub children: Vec<(Child, bool)>,
}

// === impl Pusher ===

impl Pusher {
    /// For an index, its children and which of them this node holds whole;
    /// `None` for a single-platform image. A kubelet pull keeps only its
    /// own platform, and containerd skips fetching a layer whose snapshot
    /// exists, so a child's manifest alone does not make it whole.
    pub async fn index_content(&self, root: &Descriptor) -> Result<Option<IndexContent>, PushError> {
        if !root.media_type.is_empty() && !image_backup_oci::media::is_index(&root.media_type) {
            return Ok(None);
        }
        let bytes = self.read_manifest(root).await?;
        if !image_backup_oci::media::is_index(&super::effective_media_type(root, &bytes)) {
            return Ok(None);
        }
        let mut children = Vec::new();
        for child in children_of(root, &bytes)? {
            let whole = self.holds_whole(&to_descriptor(&child.descriptor)).await?;
            children.push((child, whole));
        }
        Ok(Some(IndexContent { children }))
    }

    async fn holds_whole(&self, manifest: &Descriptor) -> Result<bool, PushError> {
        let store = self.store();
        let containerd = |error| PushError::Containerd { what: format!("manifest {}", manifest.digest), error };
        if store.info(&manifest.digest).await.map_err(containerd)?.is_none() {
            return Ok(false);
        }
        let bytes = self.read_manifest(manifest).await?;
        let Ok(blobs) = manifest_blobs(manifest, &bytes) else {
            // A nested index or something else no kubelet runs.
            return Ok(false);
        };
        for blob in blobs {
            if store.info(&blob.digest).await.map_err(containerd)?.is_none() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// A manifest's bytes from containerd, size and digest checked.
    pub(super) async fn read_manifest(&self, descriptor: &Descriptor) -> Result<Bytes, PushError> {
        let bytes = self
            .store()
            .read_all(&descriptor.digest, descriptor.size)
            .await
            .map_err(|error| PushError::Containerd { what: format!("manifest {}", descriptor.digest), error })?;
        check_digest(&descriptor.digest, descriptor.size, &bytes)?;
        Ok(bytes)
    }
}

// === impl Job ===

impl Job<'_> {
    pub(super) async fn push_index(
        &self,
        root: Descriptor,
        bytes: Bytes,
        target: &ImageRef,
        scope: &Scope,
    ) -> Result<Pushed, PushError> {
        let children = children_of(&root, &bytes)?;
        let child = |digest: &String| {
            children
                .iter()
                .find(|c| c.digest() == digest)
                .ok_or_else(|| PushError::NotInIndex { index: root.digest.clone(), digest: digest.clone() })
        };
        let (wanted, sourced, finish) = match scope {
            Scope::Whole => {
                let mut held = Vec::new();
                for child in &children {
                    if self.pusher.holds_whole(&to_descriptor(&child.descriptor)).await? {
                        held.push(child);
                    }
                }
                (held, Vec::new(), &Finish::Index)
            }
            Scope::Part { manifests, from_source, finish } => {
                let mut wanted = Vec::new();
                for digest in manifests {
                    let child = child(digest)?;
                    if !self.pusher.holds_whole(&to_descriptor(&child.descriptor)).await? {
                        let manifest = platform_manifest(child);
                        return Err(PushError::NotHeld { index: root.digest.clone(), manifest });
                    }
                    wanted.push(child);
                }
                let sourced = from_source.iter().map(child).collect::<Result<Vec<_>, _>>()?;
                (wanted, sourced, finish)
            }
        };
        // A registry may accept an index whose children it lacks: the tag
        // naming the index proves nothing until each child is seen there.
        if *finish == Finish::Index
            && self.already_there(&root, target).await?
            && self.require_in_target(&root, children.iter(), &[]).await.is_ok()
        {
            self.digest_tag(&root, bytes).await?;
            let manifests = wanted.iter().chain(&sourced).map(|c| platform_manifest(c)).collect();
            return Ok(Pushed { root: Some(root), manifests, ..Pushed::default() });
        }
        let mut pushed = self.push_children(&wanted, Origin::Node).await?;
        let from_source = match &self.source {
            Some(source) if !sourced.is_empty() => {
                info!(children = sourced.len(), source = %source.reference, "copying what no node holds from the source");
                let copied = self.push_children(&sourced, Origin::Source(source)).await?;
                pushed.extend(copied.iter().cloned());
                copied.into_iter().map(|m| m.digest).collect()
            }
            _ => Vec::new(),
        };
        match finish {
            Finish::None => Ok(Pushed { root: None, manifests: pushed, from_source, ..Pushed::default() }),
            Finish::Index => {
                self.require_in_target(&root, children.iter(), &pushed).await?;
                self.put_manifest(&root, &bytes).await?;
                self.tag_and_verify(&root, bytes, target).await?;
                Ok(Pushed { root: Some(root), manifests: pushed, from_source, ..Pushed::default() })
            }
            Finish::Reduced { keep } => {
                let keep: HashSet<&str> =
                    keep.iter().map(String::as_str).chain(pushed.iter().map(|m| m.digest.as_str())).collect();
                let reduced = index::reduced(&bytes, &root.digest, &keep)
                    .map_err(|error| PushError::Reduce { digest: root.digest.clone(), error })?;
                let kept = children.iter().filter(|c| keep.contains(c.digest()));
                self.require_in_target(&root, kept, &pushed).await?;
                let digest = sha256_digest(&reduced);
                let descriptor = Descriptor { media_type: root.media_type.clone(), digest, size: reduced.len() as u64 };
                info!(source_index = %root.digest, reduced = %descriptor.digest, kept = keep.len(), "pushing a reduced index");
                let reduced = Bytes::from(reduced);
                self.put_manifest(&descriptor, &reduced).await?;
                self.tag_and_verify(&descriptor, reduced, target).await?;
                Ok(Pushed { root: Some(descriptor), manifests: pushed, from_source, ..Pushed::default() })
            }
        }
    }

    /// Pushes the children's blobs (each once, however many children share
    /// it), then the children's manifests.
    async fn push_children(&self, children: &[&Child], origin: Origin<'_>) -> Result<Vec<PlatformManifest>, PushError> {
        let mut manifests = Vec::new();
        for child in children {
            let descriptor = to_descriptor(&child.descriptor);
            let bytes = match origin {
                Origin::Node => self.read_manifest(&descriptor).await?,
                Origin::Source(source) => source_manifest(source, &descriptor).await?,
            };
            manifests.push((child, self.manifest_content(descriptor, bytes)?));
        }
        let mut seen = HashSet::new();
        let blobs: Vec<Descriptor> = manifests
            .iter()
            .flat_map(|(_, m)| m.blobs.iter().cloned())
            .filter(|b| seen.insert(b.digest.clone()))
            .collect();
        self.push_blobs(&blobs, origin).await?;
        let mut pushed = Vec::new();
        for (child, manifest) in &manifests {
            self.put_manifest(&manifest.descriptor, &manifest.bytes).await?;
            pushed.push(platform_manifest(child));
        }
        Ok(pushed)
    }

    /// A registry refuses an index with unknown children: each child not
    /// pushed now must be there from an earlier push (another node's).
    async fn require_in_target<'c>(
        &self,
        root: &Descriptor,
        children: impl Iterator<Item = &'c Child>,
        pushed: &[PlatformManifest],
    ) -> Result<(), PushError> {
        let mut missing = Vec::new();
        for child in children.filter(|c| !pushed.iter().any(|p| p.digest == c.digest())) {
            let there = self.registry.manifest_digest(self.repository, child.digest()).await?;
            if there.as_deref() != Some(child.digest()) {
                missing.push(platform_manifest(child));
            } else {
                debug!(digest = %child.digest(), platform = %child.platform, "child already in the target");
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(PushError::IncompleteIndex { digest: root.digest.clone(), missing, pushed: pushed.to_vec() })
        }
    }
}

/// A child manifest from the source registry; the registry client checks
/// its digest, the index its size.
pub(super) async fn source_manifest(source: &super::SourceRepo, descriptor: &Descriptor) -> Result<Bytes, PushError> {
    let failed = |error| PushError::Source { reference: source.reference.clone(), error };
    let fetched = source.registry.manifest(&source.repository, &descriptor.digest).await.map_err(failed)?;
    let Some((_, bytes)) = fetched else {
        let detail = format!("manifest {} is not there", descriptor.digest);
        return Err(failed(source.registry.body_error(&source.repository, &descriptor.digest, detail, false)));
    };
    if bytes.len() as u64 != descriptor.size {
        return Err(PushError::SourceSize {
            reference: source.reference.clone(),
            digest: descriptor.digest.clone(),
            expected: descriptor.size,
            actual: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

fn children_of(index: &Descriptor, bytes: &[u8]) -> Result<Vec<Child>, PushError> {
    index::children(bytes).map_err(|e| PushError::Manifest {
        digest: index.digest.clone(),
        media_type: index.media_type.clone(),
        detail: e.to_string(),
    })
}

fn platform_manifest(child: &Child) -> PlatformManifest {
    PlatformManifest { platform: child.platform.clone(), digest: child.digest().to_string() }
}
