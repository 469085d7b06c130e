//! The source registry, for what a push copies from there: children of an
//! index that no node holds, blobs a node lacks, and referrers.

use std::time::Duration;

use bytes::Bytes;

use image_backup_oci::{
    ImageRef,
    registry::{Credentials, Registry, RegistryConfig, RegistryError, RetryPolicy},
};

use super::PushError;
use crate::store::Descriptor;

/// How a push may use the source registry.
#[derive(Clone, Debug, Default)]
pub struct SourceAccess {
    /// Credentials the workload's pods pull with; else the configured ones.
    pub credentials: Option<Credentials>,
    /// Copy the image's signatures and other referrers after it.
    pub referrers: bool,
}

/// The source registry's repository of the image.
pub(super) struct SourceRepo {
    pub(super) registry: Registry,
    /// The same registry without retries, for a first look that must not
    /// hold a push when the source is gone.
    pub(super) probe: Registry,
    pub(super) repository: String,
    /// The source reference, for errors.
    pub(super) reference: String,
}

/// Where a blob or manifest is read from.
#[derive(Clone, Copy)]
pub(super) enum Origin<'a> {
    /// The node's content store.
    Node,
    /// The source registry, for what no node holds.
    Source(&'a SourceRepo),
}

// === impl SourceRepo ===

impl SourceRepo {
    pub(super) fn new(
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

    /// A child manifest from the source registry; the registry client
    /// checks its digest, the index its size.
    pub(super) async fn manifest(&self, descriptor: &Descriptor) -> Result<Bytes, PushError> {
        let failed = |error| PushError::Source { reference: self.reference.clone(), error };
        let fetched = self.registry.manifest(&self.repository, &descriptor.digest).await.map_err(failed)?;
        let Some((_, bytes)) = fetched else {
            let detail = format!("manifest {} is not there", descriptor.digest);
            return Err(failed(self.registry.body_error(&self.repository, &descriptor.digest, detail, false)));
        };
        if bytes.len() as u64 != descriptor.size {
            return Err(PushError::SourceSize {
                reference: self.reference.clone(),
                digest: descriptor.digest.clone(),
                expected: descriptor.size,
                actual: bytes.len() as u64,
            });
        }
        Ok(bytes)
    }
}

// === impl Origin ===

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
