//! Signatures and other referrers of an image, copied from the source after
//! the image itself: OCI 1.1 referrers (through the referrers API, else its
//! `sha256-<hex>` tag fallback) and cosign's `sha256-<hex>.sig`, `.att` and
//! `.sbom` tags. The backup keeps the source digest, so `cosign verify`
//! against the backup checks the same signatures.

use bytes::Bytes;
use image_backup_oci::media::{is_index, media_type_of};
use oci_spec::image::ImageIndex;
use tracing::{debug, info, warn};

use super::{Job, Origin, PushError, SourceRepo, to_descriptor};
use crate::store::{ContentStore, Descriptor};

/// The tags cosign files signatures, attestations and SBOMs under.
const COSIGN_SUFFIXES: [&str; 3] = ["sig", "att", "sbom"];

/// What was copied, and why the rest was not.
#[derive(Clone, Debug, Default)]
pub struct Referrers {
    /// Digests of referrer manifests and the tags copied.
    pub copied: Vec<String>,
    pub error: Option<String>,
}

// === impl Job ===

impl<S: ContentStore> Job<'_, S> {
    /// Copies what refers to `digest` in the source. Never fails the push:
    /// a source that cannot be read leaves the reason in the result.
    pub(super) async fn copy_referrers(&self, digest: &str) -> Referrers {
        let Some(source) = &self.source else { return Referrers::default() };
        let mut copied = Vec::new();
        let result = self.copy_all(source, digest, &mut copied).await;
        if !copied.is_empty() {
            info!(count = copied.len(), "copied the image's signatures and referrers from the source");
        }
        let error = result.err().map(|e| {
            warn!(error = %e, "the image's referrers could not all be copied from the source");
            e.to_string()
        });
        Referrers { copied, error }
    }

    async fn copy_all(&self, source: &SourceRepo, digest: &str, copied: &mut Vec<String>) -> Result<(), PushError> {
        let failed = |error| PushError::Source { reference: source.reference.clone(), error };
        let fallback = format!("sha256-{}", digest.trim_start_matches("sha256:"));
        // The first call has no retries: a source that is gone costs one
        // refused connection, not a backoff, and the image is backed up.
        let listing = match source.probe.referrers(&source.repository, digest).await.map_err(failed)? {
            Some(listing) => Some((oci_index_media_type(), listing)),
            None => source.registry.manifest(&source.repository, &fallback).await.map_err(failed)?,
        };
        if let Some((media_type, listing)) = listing {
            let index: ImageIndex = serde_json::from_slice(&listing).map_err(|e| PushError::Manifest {
                digest: fallback.clone(),
                media_type: media_type.clone(),
                detail: e.to_string(),
            })?;
            for referrer in index.manifests() {
                let descriptor = to_descriptor(referrer);
                if is_index(&descriptor.media_type) {
                    // Not something cosign or oras writes; the rest still go.
                    warn!(digest = %descriptor.digest, "a referrer that is an index is not copied");
                    continue;
                }
                self.copy_manifest(source, &descriptor).await?;
                copied.push(descriptor.digest);
            }
            // A registry without the referrers API (the usual backup
            // registry) is read through the tag, as clients do.
            if !index.manifests().is_empty() {
                self.registry.put_manifest(self.repository, &fallback, &media_type, listing).await?;
                copied.push(fallback.clone());
            }
        }
        for suffix in COSIGN_SUFFIXES {
            let tag = format!("{fallback}.{suffix}");
            // HEAD first: a GET counts against Docker Hub's pull limit.
            if source.registry.manifest_digest(&source.repository, &tag).await.map_err(failed)?.is_none() {
                continue;
            }
            let Some((declared, bytes)) = source.registry.manifest(&source.repository, &tag).await.map_err(failed)?
            else {
                continue;
            };
            // The served Content-Type may carry parameters, or be missing.
            let declared = declared.split(';').next().unwrap_or_default().trim();
            let media_type = media_type_of(declared, &bytes);
            let descriptor = Descriptor { media_type: media_type.clone(), digest: tag.clone(), size: 0 };
            let manifest = self.manifest_content(descriptor, bytes.clone())?;
            self.push_blobs(&manifest.blobs, Origin::Source(source)).await?;
            self.registry.put_manifest(self.repository, &tag, &media_type, bytes).await?;
            copied.push(tag);
        }
        debug!(?copied, "referrers done");
        Ok(())
    }

    /// One referrer manifest and its blobs, by digest.
    async fn copy_manifest(&self, source: &SourceRepo, descriptor: &Descriptor) -> Result<(), PushError> {
        let bytes: Bytes = source.manifest(descriptor).await?;
        let manifest = self.manifest_content(descriptor.clone(), bytes)?;
        self.push_blobs(&manifest.blobs, Origin::Source(source)).await?;
        self.put_manifest(&manifest.descriptor, &manifest.bytes).await
    }
}

fn oci_index_media_type() -> String {
    oci_spec::image::MediaType::ImageIndex.to_string()
}
