//! The push engine: copies one image, or the part of an index a node
//! holds, from containerd's content store to a registry. Blobs first
//! (several at once, each skipped, mounted or streamed with its digest
//! checked), then manifests byte for byte, then the tag, then a check that
//! the registry serves the tag with the expected digest.

mod blob;
mod index;
mod referrers;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::Bytes;
use futures::FutureExt;
use oci_spec::image::ImageManifest;
use tracing::{Instrument, debug, info, info_span, warn};

use image_backup_oci::{
    ImageRef, digest_tag,
    index::IndexError,
    media::{PlatformName, is_index, media_type_of, sha256_digest},
    registry::{Credentials, Registry, RegistryConfig, RegistryError, RetryPolicy},
};

pub use index::{Finish, IndexContent, Scope};
pub use referrers::Referrers;

use crate::{
    containerd::{ContainerdError, ContentStore, Descriptor, Lease},
    progress::Progress,
};

/// A child manifest of an index and its platform.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlatformManifest {
    pub platform: PlatformName,
    pub digest: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("reading {what} from containerd: {error}")]
    Containerd { what: String, error: ContainerdError },
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
            PushError::Containerd { error: ContainerdError::Call { .. }, .. } => true,
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

/// Copies images from one containerd namespace to registries. Cheap to
/// clone; clones share connections, tokens and the mount-source memory.
#[derive(Clone)]
pub struct Pusher {
    store: ContentStore,
    config: RegistryConfig,
    options: PushOptions,
    registries: Arc<Mutex<HashMap<String, Registry>>>,
}

impl Pusher {
    pub fn new(store: ContentStore, config: RegistryConfig, options: PushOptions) -> Self {
        Self { store, config, options, registries: Arc::default() }
    }

    pub fn store(&self) -> &ContentStore {
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

    /// Copies `scope` of `source` (as containerd holds it, and what the
    /// scope names from the source registry) to `target`, then, as `access`
    /// asks, the image's referrers from the source. Never reports an image
    /// pushed before the registry serves the target with its digest. Boxed
    /// so that the future is checked `Send` here, where its lifetimes are
    /// concrete, and the daemon can spawn it.
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
            let record = self
                .store
                .resolve(source)
                .await
                .map_err(|e| PushError::Containerd { what: format!("image {source}"), error: e })?;
            info!(digest = %record.target.digest, media_type = %record.target.media_type, "resolved image in containerd");
            let lease = self
                .store
                .lease(self.options.lease_expiry)
                .await
                .map_err(|e| PushError::Containerd { what: "a lease".into(), error: e })?;
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
            let mut result = job.push_root(&record.target, target, scope).await;
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
}

/// One push in progress.
struct Job<'a> {
    pusher: &'a Pusher,
    registry: Registry,
    repository: &'a str,
    /// Where the children no node holds come from, when the scope names any.
    source: Option<SourceRepo>,
    lease: &'a Lease,
    progress: Arc<Progress>,
}

/// How a push may use the source registry.
#[derive(Clone, Debug, Default)]
pub struct SourceAccess {
    /// Credentials the workload's pods pull with; else the configured ones.
    pub credentials: Option<Credentials>,
    /// Copy the image's signatures and other referrers after it.
    pub referrers: bool,
}

/// The source registry's repository of the image.
struct SourceRepo {
    registry: Registry,
    /// The same registry without retries, for a first look that must not
    /// hold a push when the source is gone.
    probe: Registry,
    repository: String,
    /// The source reference, for errors.
    reference: String,
}

impl SourceRepo {
    fn new(
        source: &ImageRef,
        config: &RegistryConfig,
        credentials: Option<Credentials>,
    ) -> Result<Self, RegistryError> {
        let once = RegistryConfig {
            retry: RetryPolicy { max_elapsed: Duration::ZERO, ..config.retry.clone() },
            ..config.clone()
        };
        // Docker Hub's API is not at the name references use.
        let host = source.api_host();
        Ok(Self {
            registry: Registry::reader(host, config, credentials.clone())?,
            probe: Registry::reader(host, &once, credentials)?,
            repository: source.repository().to_string(),
            reference: source.to_string(),
        })
    }
}

/// Where a blob or manifest is read from.
#[derive(Clone, Copy)]
enum Origin<'a> {
    /// The node's content store.
    Node,
    /// The source registry, for what no node holds.
    Source(&'a SourceRepo),
}

impl std::fmt::Display for Origin<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Origin::Node => f.write_str("containerd (the content store is corrupt)"),
            Origin::Source(source) => write!(f, "the source {}", source.reference),
        }
    }
}

impl PartialEq for Origin<'_> {
    fn eq(&self, other: &Self) -> bool {
        matches!((self, other), (Origin::Node, Origin::Node) | (Origin::Source(_), Origin::Source(_)))
    }
}

/// A manifest and the blobs it references, read from containerd.
struct ManifestContent {
    descriptor: Descriptor,
    bytes: Bytes,
    blobs: Vec<Descriptor>,
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

impl Job<'_> {
    async fn push_root(&self, root: &Descriptor, target: &ImageRef, scope: &Scope) -> Result<Pushed, PushError> {
        let bytes = self.read_manifest(root).await?;
        let root = Descriptor { media_type: effective_media_type(root, &bytes), ..root.clone() };
        if is_index(&root.media_type) {
            return self.push_index(root, bytes, target, scope).await;
        }
        if self.already_there(&root, target).await? {
            self.digest_tag(&root, bytes).await?;
        } else {
            let manifest = self.manifest_content(root.clone(), bytes.clone())?;
            self.push_blobs(&manifest.blobs, Origin::Node).await?;
            self.put_manifest(&manifest.descriptor, &manifest.bytes).await?;
            self.tag_and_verify(&root, bytes, target).await?;
        }
        Ok(Pushed { root: Some(root), ..Pushed::default() })
    }

    /// Whether the target reference already names this digest. A registry
    /// only accepts a manifest whose blobs (and, for an index, children) it
    /// holds, so then the whole image is there.
    async fn already_there(&self, root: &Descriptor, target: &ImageRef) -> Result<bool, PushError> {
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
    async fn tag_and_verify(&self, root: &Descriptor, bytes: Bytes, target: &ImageRef) -> Result<(), PushError> {
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
    async fn digest_tag(&self, root: &Descriptor, bytes: Bytes) -> Result<(), PushError> {
        let tag = digest_tag(&root.digest);
        if self.registry.manifest_digest(self.repository, &tag).await?.as_deref() == Some(root.digest.as_str()) {
            return Ok(());
        }
        self.registry.put_manifest(self.repository, &tag, &root.media_type, bytes).await?;
        Ok(())
    }

    /// A manifest's bytes, held by the job's lease first.
    async fn read_manifest(&self, descriptor: &Descriptor) -> Result<Bytes, PushError> {
        self.protect(&descriptor.digest).await?;
        self.pusher.read_manifest(descriptor).await
    }

    fn manifest_content(&self, descriptor: Descriptor, bytes: Bytes) -> Result<ManifestContent, PushError> {
        let blobs = manifest_blobs(&descriptor, &bytes)?;
        let descriptor = Descriptor { media_type: effective_media_type(&descriptor, &bytes), ..descriptor };
        Ok(ManifestContent { descriptor, bytes, blobs })
    }

    async fn put_manifest(&self, descriptor: &Descriptor, bytes: &Bytes) -> Result<(), PushError> {
        debug!(digest = %descriptor.digest, "putting manifest");
        self.registry.put_manifest(self.repository, &descriptor.digest, &descriptor.media_type, bytes.clone()).await?;
        Ok(())
    }

    async fn protect(&self, digest: &str) -> Result<(), PushError> {
        self.lease
            .protect(digest)
            .await
            .map_err(|e| PushError::Containerd { what: format!("a lease on {digest}"), error: e })
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
