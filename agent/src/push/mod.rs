//! The push engine: copies one image, or the part of an index a node
//! holds, from the node's content store to a registry. A push is planned
//! from the store alone (`plan`), then carried out: blobs first (several at
//! once, each skipped, mounted or streamed with its digest checked), then
//! manifests byte for byte, then the tag, then a check that the registry
//! serves the tag with the expected digest.

mod blob;
mod index;
mod plan;
mod referrers;
mod source;
mod target;
#[cfg(test)]
mod tests;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::FutureExt;
use oci_spec::image::ImageManifest;
use tracing::{Instrument, info, info_span, warn};

use image_backup_oci::{
    ImageRef,
    index::IndexError,
    media::{PlatformName, media_type_of, sha256_digest},
    registry::{Registry, RegistryConfig, RegistryError},
};

pub use index::{Finish, IndexContent, Scope};
pub use plan::{IndexPlan, ManifestContent, Plan, PlanKind, PlannedBlob, PlannedFinish};
pub use referrers::Referrers;
pub use source::SourceAccess;

use crate::{
    containerd::ContainerdStore,
    progress::Progress,
    store::{ContentStore, Descriptor, ImageRecord, Lease, StoreError},
};
use source::{Origin, SourceRepo};

/// A child manifest of an index and its platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformManifest {
    pub platform: PlatformName,
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("reading {what} from containerd: {error}")]
    Store { what: String, error: StoreError },
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("blob {expected} read from {origin} has digest {actual}")]
    DigestMismatch { expected: String, actual: String, origin: String },
    #[error("blob {digest} from {origin} is {actual} bytes, its descriptor says {expected}")]
    SizeMismatch { digest: String, expected: u64, actual: u64, origin: String },
    #[error("manifest {digest} ({media_type}) cannot be read: {detail}")]
    Manifest { digest: String, media_type: String, detail: String },
    #[error(
        "index {digest} cannot be finished: the backup registry lacks {}; pushed {} platform manifest(s), no index and no tag",
        list_platforms(missing), pushed.len()
    )]
    IncompleteIndex { digest: String, missing: Vec<PlatformManifest>, pushed: Vec<PlatformManifest> },
    #[error("manifest {digest} is not a child of index {index}")]
    NotInIndex { index: String, digest: String },
    #[error("manifest {} of index {index} is not whole in this node's containerd", manifest.digest)]
    NotHeld { index: String, manifest: PlatformManifest },
    #[error("reducing index {digest}: {error}")]
    Reduce { digest: String, error: IndexError },
    #[error("reading the source {reference}: {error}")]
    Source { reference: String, error: RegistryError },
    #[error("the source {reference} serves {digest} as {actual} bytes, its index says {expected}")]
    SourceSize { reference: String, digest: String, expected: u64, actual: u64 },
    #[error("registry {reference} reports digest {got:?} after the push, expected {expected}")]
    Verify { reference: String, expected: String, got: Option<String> },
}

fn list_platforms(list: &[PlatformManifest]) -> String {
    list.iter().map(|p| format!("{} ({})", p.platform, p.digest)).collect::<Vec<_>>().join(", ")
}

impl PushError {
    /// Whether another attempt could succeed without anyone changing
    /// anything (a registry outage, not a corrupt blob or refused login).
    pub fn retryable(&self) -> bool {
        match self {
            PushError::Registry(RegistryError::GaveUp { .. })
            | PushError::Source { error: RegistryError::GaveUp { .. }, .. } => true,
            PushError::Registry(e) | PushError::Source { error: e, .. } => e.retryable(),
            PushError::Store { error: StoreError::Call { .. }, .. } => true,
            // The plan was made from an inventory or a registry that changed
            // since: the coordinator plans again.
            PushError::IncompleteIndex { .. } | PushError::NotHeld { .. } => true,
            _ => false,
        }
    }
}

/// What a finished push did.
#[derive(Clone, Debug)]
pub struct PushReport {
    /// The target reference pinned by digest (`host/repo@sha256:...`);
    /// `None` when the push copied children of an index but not the index.
    pub pinned: Option<String>,
    pub digest: Option<String>,
    /// For an index: the children now in the target.
    pub manifests: Vec<PlatformManifest>,
    /// Those of `manifests` copied from the source registry.
    pub from_source: Vec<String>,
    /// The image's signatures and other referrers copied from the source.
    pub referrers: Referrers,
    pub bytes_total: u64,
    pub bytes_uploaded: u64,
    pub blobs_uploaded: u32,
    pub blobs_mounted: u32,
    pub blobs_existing: u32,
    pub duration: Duration,
}

#[derive(Clone, Debug)]
pub struct PushOptions {
    /// Blobs streamed at once.
    pub parallel_blobs: usize,
    /// How long the containerd lease outlives a push that died without
    /// releasing it.
    pub lease_expiry: Duration,
}

impl Default for PushOptions {
    fn default() -> Self {
        Self { parallel_blobs: 4, lease_expiry: Duration::from_secs(3600) }
    }
}

/// Copies images from a node's content store to registries. Cheap to
/// clone; clones share connections, tokens and the mount-source memory.
#[derive(Clone)]
pub struct Pusher<S = ContainerdStore> {
    store: S,
    config: RegistryConfig,
    options: PushOptions,
    registries: Arc<Mutex<HashMap<String, Registry>>>,
}

// === impl Pusher ===

impl<S: ContentStore> Pusher<S> {
    pub fn new(store: S, config: RegistryConfig, options: PushOptions) -> Self {
        Self { store, config, options, registries: Arc::default() }
    }

    pub fn store(&self) -> &S {
        &self.store
    }

    fn registry(&self, host: &str) -> Result<Registry, RegistryError> {
        let mut registries = self.registries.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(registry) = registries.get(host) {
            return Ok(registry.clone());
        }
        let registry = Registry::new(host, &self.config)?;
        registries.insert(host.to_string(), registry.clone());
        Ok(registry)
    }

    /// The image record the node holds for `source` (see
    /// [`ContentStore::resolve`]: only its own records count).
    pub async fn resolve(&self, source: &ImageRef) -> Result<ImageRecord, PushError> {
        self.store.resolve(source).await.map_err(|e| PushError::Store { what: format!("image {source}"), error: e })
    }

    /// Copies `scope` of `source` (as the node's store holds it, and what
    /// the scope names from the source registry) to `target`, then, as
    /// `access` asks, the image's referrers from the source. Never reports
    /// an image pushed before the registry serves the target with its
    /// digest. Boxed so that the future is checked `Send` here, where its
    /// lifetimes are concrete, and the daemon can spawn it.
    pub fn push<'a>(
        &'a self,
        source: &'a ImageRef,
        target: &'a ImageRef,
        scope: &'a Scope,
        access: SourceAccess,
        progress: Arc<Progress>,
    ) -> futures::future::BoxFuture<'a, Result<PushReport, PushError>> {
        let span = info_span!("push", source = %source, target = %target);
        async move {
            let started = Instant::now();
            let record = self.resolve(source).await?;
            info!(digest = %record.target.digest, media_type = %record.target.media_type, "resolved image in containerd");
            let lease = self
                .store
                .lease(self.options.lease_expiry)
                .await
                .map_err(|e| PushError::Store { what: "a lease".into(), error: e })?;
            let registry = self.registry(target.registry())?;
            let children_from_source = matches!(scope, Scope::Part { from_source, .. } if !from_source.is_empty());
            let mut unreadable = None;
            let source_repo = if children_from_source || access.referrers {
                match SourceRepo::new(source, &self.config, access.credentials) {
                    Ok(repo) => Some(repo),
                    Err(error) if children_from_source => {
                        return Err(PushError::Source { reference: source.to_string(), error });
                    }
                    // Referrers are a bonus: the image is pushed without.
                    Err(error) => {
                        unreadable = Some(format!("reading the source {source}: {error}"));
                        None
                    }
                }
            } else {
                None
            };
            let job = Job {
                pusher: self,
                registry,
                repository: target.repository(),
                source: source_repo,
                lease: &lease,
                progress,
            };
            let mut result = match self.plan(&record.target, scope, &lease).await {
                Ok(plan) => job.carry_out(plan, target).await,
                Err(e) => Err(e),
            };
            // Referrers name the source digest: a reduced index has another.
            if let Ok(pushed) = &mut result
                && access.referrers
                && pushed.root.as_ref().is_some_and(|root| root.digest == record.target.digest)
            {
                pushed.referrers = match unreadable {
                    Some(error) => Referrers { copied: Vec::new(), error: Some(error) },
                    None => job.copy_referrers(&record.target.digest).await,
                };
            }
            let snapshot = job.progress.snapshot();
            drop(job);
            if let Err(e) = lease.release().await {
                warn!(error = %e, "could not release containerd lease; it expires on its own");
            }
            let pushed = result?;
            let report = PushReport {
                pinned: pushed.root.as_ref().map(|root| target.pinned(&root.digest)),
                digest: pushed.root.map(|root| root.digest),
                manifests: pushed.manifests,
                from_source: pushed.from_source,
                referrers: pushed.referrers,
                bytes_total: snapshot.bytes_total,
                bytes_uploaded: snapshot.bytes_uploaded,
                blobs_uploaded: snapshot.blobs_uploaded,
                blobs_mounted: snapshot.blobs_mounted,
                blobs_existing: snapshot.blobs_existing,
                duration: started.elapsed(),
            };
            info!(pinned = ?report.pinned, manifests = report.manifests.len(), uploaded = report.bytes_uploaded, elapsed = ?report.duration, "push complete");
            Ok(report)
        }
        .instrument(span)
        .boxed()
    }

    /// The error for a blob the node lacks and the push cannot get
    /// elsewhere.
    pub(crate) fn missing_blob(&self, digest: &str) -> PushError {
        let namespace = self.store.namespace().to_string();
        let error = StoreError::BlobNotFound { digest: digest.to_string(), namespace };
        PushError::Store { what: format!("blob {digest}"), error }
    }
}

/// One push in progress: a plan being carried out.
struct Job<'a, S: ContentStore> {
    pusher: &'a Pusher<S>,
    registry: Registry,
    repository: &'a str,
    /// Where the children no node holds come from, when the scope names
    /// any, and the referrers.
    source: Option<SourceRepo>,
    /// Takes what is pushed from the node, before it is read.
    lease: &'a S::Lease,
    progress: Arc<Progress>,
}

/// What one push put in the target.
#[derive(Default)]
struct Pushed {
    /// The image or index, when pushed and tagged.
    root: Option<Descriptor>,
    manifests: Vec<PlatformManifest>,
    /// Digests of `manifests` copied from the source.
    from_source: Vec<String>,
    referrers: Referrers,
}

// === impl Job ===

impl<S: ContentStore> Job<'_, S> {
    async fn carry_out(&self, plan: Plan, target: &ImageRef) -> Result<Pushed, PushError> {
        let Plan { root, bytes, kind } = plan;
        let manifest = match kind {
            PlanKind::Index(index) => return self.push_index(root, bytes, index, target).await,
            PlanKind::Image(manifest) => manifest,
        };
        if self.already_there(&root, target).await? {
            self.digest_tag(&root, bytes).await?;
        } else {
            self.push_blobs(&manifest.blobs, Origin::Node).await?;
            self.put_manifest(&manifest.descriptor, &manifest.bytes).await?;
            self.tag_and_verify(&root, bytes, target).await?;
        }
        Ok(Pushed { root: Some(root), ..Pushed::default() })
    }

    async fn protect(&self, digest: &str) -> Result<(), PushError> {
        plan::protect(self.lease, digest).await
    }

    /// A manifest from the source registry, with its blobs to copy from
    /// there.
    fn manifest_content(&self, descriptor: Descriptor, bytes: Bytes) -> Result<ManifestContent, PushError> {
        let blobs = manifest_blobs(&descriptor, &bytes)?
            .into_iter()
            .map(|descriptor| PlannedBlob { descriptor, held: None })
            .collect();
        let descriptor = Descriptor { media_type: effective_media_type(&descriptor, &bytes), ..descriptor };
        Ok(ManifestContent { descriptor, bytes, blobs })
    }
}

/// The blobs of an image manifest: its config and its distributable layers.
fn manifest_blobs(descriptor: &Descriptor, bytes: &[u8]) -> Result<Vec<Descriptor>, PushError> {
    let manifest: ImageManifest = serde_json::from_slice(bytes).map_err(|e| PushError::Manifest {
        digest: descriptor.digest.clone(),
        media_type: descriptor.media_type.clone(),
        detail: e.to_string(),
    })?;
    let mut blobs = vec![to_descriptor(manifest.config())];
    // Foreign layers (with `urls`) are not distributable: registries fetch
    // them from their URLs, and nodes may not hold them.
    blobs.extend(manifest.layers().iter().filter(|l| l.urls().as_ref().is_none_or(Vec::is_empty)).map(to_descriptor));
    Ok(blobs)
}

fn to_descriptor(d: &oci_spec::image::Descriptor) -> Descriptor {
    Descriptor { media_type: d.media_type().to_string(), digest: d.digest().to_string(), size: d.size() }
}

/// containerd records the media type it resolved; a bare digest reference
/// may leave it empty.
fn effective_media_type(descriptor: &Descriptor, bytes: &[u8]) -> String {
    media_type_of(&descriptor.media_type, bytes)
}

fn check_digest(expected: &str, size: u64, bytes: &[u8]) -> Result<(), PushError> {
    if bytes.len() as u64 != size {
        return Err(PushError::SizeMismatch {
            digest: expected.into(),
            expected: size,
            actual: bytes.len() as u64,
            origin: Origin::Node.to_string(),
        });
    }
    let actual = sha256_digest(bytes);
    if actual != expected {
        return Err(PushError::DigestMismatch { expected: expected.into(), actual, origin: Origin::Node.to_string() });
    }
    Ok(())
}
