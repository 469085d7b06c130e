//! The target side of a push: whether the target holds an image already,
//! manifests put byte for byte, and the tags, which go last and are
//! checked, so a tag never names an image whose parts are not all there.

use bytes::Bytes;
use tracing::{debug, info};

use image_backup_oci::{ImageRef, digest_tag, index::Child};

use super::{Job, PlatformManifest, PushError, index::platform_manifest};
use crate::store::{ContentStore, Descriptor};

// === impl Job ===

impl<S: ContentStore> Job<'_, S> {
    /// Whether the target reference already names this digest. A registry
    /// only accepts a manifest whose blobs (and, for an index, children) it
    /// holds, so then the whole image is there.
    pub(super) async fn already_there(&self, root: &Descriptor, target: &ImageRef) -> Result<bool, PushError> {
        let reference = target.tag().unwrap_or(&root.digest);
        let there = self.registry.manifest_digest(self.repository, reference).await?.as_deref() == Some(&root.digest);
        if there {
            info!(%reference, "target already holds the image");
        }
        Ok(there)
    }

    /// Puts the root under its tag, then checks the registry serves it. The
    /// tag goes last: a tag never names an image whose parts are not all in
    /// the registry.
    pub(super) async fn tag_and_verify(
        &self,
        root: &Descriptor,
        bytes: Bytes,
        target: &ImageRef,
    ) -> Result<(), PushError> {
        let reference = target.tag().unwrap_or(&root.digest);
        if let Some(tag) = target.tag() {
            self.registry.put_manifest(self.repository, tag, &root.media_type, bytes.clone()).await?;
        }
        self.digest_tag(root, bytes).await?;
        let got = self.registry.manifest_digest(self.repository, reference).await?;
        if got.as_deref() != Some(root.digest.as_str()) {
            return Err(PushError::Verify { reference: target.to_string(), expected: root.digest.clone(), got });
        }
        Ok(())
    }

    /// Tags the root with its [`digest_tag`] too, unless it is already: a
    /// registry with immutable tags refuses even the same digest again.
    pub(super) async fn digest_tag(&self, root: &Descriptor, bytes: Bytes) -> Result<(), PushError> {
        let tag = digest_tag(&root.digest);
        if self.registry.manifest_digest(self.repository, &tag).await?.as_deref() == Some(root.digest.as_str()) {
            return Ok(());
        }
        self.registry.put_manifest(self.repository, &tag, &root.media_type, bytes).await?;
        Ok(())
    }

    pub(super) async fn put_manifest(&self, descriptor: &Descriptor, bytes: &Bytes) -> Result<(), PushError> {
        debug!(digest = %descriptor.digest, "putting manifest");
        self.registry.put_manifest(self.repository, &descriptor.digest, &descriptor.media_type, bytes.clone()).await?;
        Ok(())
    }

    /// A registry refuses an index with unknown children: each child not
    /// pushed now must be there from an earlier push (another node's).
    pub(super) async fn require_in_target<'c>(
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
