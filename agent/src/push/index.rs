//! An index pushed as planned: the children this node holds whole, those
//! no node holds from the source, then the index itself once the target
//! has every child it names, or a reduced index of the children the
//! cluster holds when some exist nowhere.

use std::collections::HashSet;

use bytes::Bytes;
use image_backup_oci::{ImageRef, index::Child};
use tracing::info;

use super::{
    IndexPlan, Job, ManifestContent, Origin, PlannedFinish, PlatformManifest, PushError, Pushed, to_descriptor,
};
use crate::store::{ContentStore, Descriptor};

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

// === impl Job ===

impl<S: ContentStore> Job<'_, S> {
    pub(super) async fn push_index(
        &self,
        root: Descriptor,
        bytes: Bytes,
        plan: IndexPlan,
        target: &ImageRef,
    ) -> Result<Pushed, PushError> {
        let IndexPlan { children, from_node, from_source: sourced, finish } = plan;
        // A registry may accept an index whose children it lacks: the tag
        // naming the index proves nothing until each child is seen there.
        if finish == PlannedFinish::Index
            && self.already_there(&root, target).await?
            && self.require_in_target(&root, children.iter(), &[]).await.is_ok()
        {
            self.digest_tag(&root, bytes).await?;
            let manifests = from_node.iter().map(|(c, _)| c).chain(&sourced).map(platform_manifest).collect();
            return Ok(Pushed { root: Some(root), manifests, ..Pushed::default() });
        }
        let mut pushed = self.push_children(&from_node, Origin::Node).await?;
        let from_source = match &self.source {
            Some(source) if !sourced.is_empty() => {
                info!(children = sourced.len(), source = %source.reference, "copying what no node holds from the source");
                let mut manifests = Vec::new();
                for child in &sourced {
                    let descriptor = to_descriptor(&child.descriptor);
                    let bytes = source.manifest(&descriptor).await?;
                    manifests.push((child.clone(), self.manifest_content(descriptor, bytes)?));
                }
                let copied = self.push_children(&manifests, Origin::Source(source)).await?;
                pushed.extend(copied.iter().cloned());
                copied.into_iter().map(|m| m.digest).collect()
            }
            _ => Vec::new(),
        };
        match finish {
            PlannedFinish::None => Ok(Pushed { root: None, manifests: pushed, from_source, ..Pushed::default() }),
            PlannedFinish::Index => {
                self.require_in_target(&root, children.iter(), &pushed).await?;
                self.put_manifest(&root, &bytes).await?;
                self.tag_and_verify(&root, bytes, target).await?;
                Ok(Pushed { root: Some(root), manifests: pushed, from_source, ..Pushed::default() })
            }
            PlannedFinish::Reduced { descriptor, bytes: reduced, kept } => {
                self.require_in_target(&root, kept.iter(), &pushed).await?;
                info!(source_index = %root.digest, reduced = %descriptor.digest, kept = kept.len(), "pushing a reduced index");
                self.put_manifest(&descriptor, &reduced).await?;
                self.tag_and_verify(&descriptor, reduced, target).await?;
                Ok(Pushed { root: Some(descriptor), manifests: pushed, from_source, ..Pushed::default() })
            }
        }
    }

    /// Pushes the children's blobs (each once, however many children share
    /// it), then the children's manifests.
    async fn push_children(
        &self,
        children: &[(Child, ManifestContent)],
        origin: Origin<'_>,
    ) -> Result<Vec<PlatformManifest>, PushError> {
        if origin == Origin::Node {
            for (_, manifest) in children {
                self.protect(&manifest.descriptor.digest).await?;
            }
        }
        let mut seen = HashSet::new();
        let blobs: Vec<_> = children
            .iter()
            .flat_map(|(_, m)| m.blobs.iter().cloned())
            .filter(|b| seen.insert(b.descriptor.digest.clone()))
            .collect();
        self.push_blobs(&blobs, origin).await?;
        let mut pushed = Vec::new();
        for (child, manifest) in children {
            self.put_manifest(&manifest.descriptor, &manifest.bytes).await?;
            pushed.push(platform_manifest(child));
        }
        Ok(pushed)
    }
}

pub(super) fn platform_manifest(child: &Child) -> PlatformManifest {
    PlatformManifest { platform: child.platform.clone(), digest: child.digest().to_string() }
}
