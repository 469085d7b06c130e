//! A node's content store, as the push engine and the daemon use it: image
//! records by name, blobs by digest (their info, their bytes), a lease that
//! keeps what a push reads from garbage collection, and the labels that
//! remember where a blob was pushed. containerd is the store of a real node
//! ([`crate::containerd`]); [`memory`] holds made-up nodes for tests.
//!
//! The rules that do not depend on the store (which records may answer for
//! a source, how distribution-source labels grow) are here, once.

pub mod memory;
pub mod sample;

use std::{collections::HashMap, future::Future, time::Duration};

use bytes::Bytes;
use futures::{Stream, TryStreamExt};
use tonic::Status;

use image_backup_oci::ImageRef;

/// Prefix of the labels containerd records where a blob can be found in a
/// registry (`containerd.io/distribution.source.<host>=<repo>,<repo>`); the
/// same labels drive containerd's own cross-repository mounts.
pub const DISTRIBUTION_SOURCE_LABEL: &str = "containerd.io/distribution.source.";

/// containerd refuses labels whose key and value exceed 4 KiB together.
const LABEL_LIMIT: usize = 4000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("connecting to containerd at {path}: {error}")]
    Connect { path: String, error: tonic::transport::Error },
    #[error("invalid containerd namespace {0:?}")]
    Namespace(String),
    #[error("image {reference} not found in containerd namespace {namespace}")]
    ImageNotFound { reference: String, namespace: String },
    #[error("blob {digest} is not in containerd's content store (namespace {namespace})")]
    BlobNotFound { digest: String, namespace: String },
    #[error("containerd {call} for {subject}: {status}")]
    Call { call: &'static str, subject: String, status: Box<Status> },
    #[error("reading containerd content file {path}: {error}")]
    File { path: String, error: std::io::Error },
    #[error("containerd returned {got} bytes of {digest} at offset {offset}, expected {expected}")]
    ShortRead { digest: String, offset: u64, got: u64, expected: u64 },
}

/// A descriptor as containerd and the OCI spec give it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
}

/// A change to the store's image records.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageEvent {
    Upserted(String),
    Deleted(String),
}

/// An image record: a name and the manifest or index it points at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageRecord {
    pub name: String,
    pub target: Descriptor,
}

/// What the store knows of a blob it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlobInfo {
    pub size: u64,
    pub labels: HashMap<String, String>,
}

/// The operations a push and the daemon need from a node's content store.
/// Used through generics (`Pusher<S>`, `Agent<S>`), so that the blob path
/// is dispatched statically; the futures are `Send` because the daemon
/// spawns pushes and its session tasks.
pub trait ContentStore: Clone + Send + Sync + 'static {
    type Lease: Lease;

    /// The namespace the store reads, for errors.
    fn namespace(&self) -> &str;

    /// One image record by name, if the store has it.
    fn image(&self, name: &str) -> impl Future<Output = Result<Option<ImageRecord>, StoreError>> + Send;

    /// Every image record.
    fn list_images(&self) -> impl Future<Output = Result<Vec<ImageRecord>, StoreError>> + Send;

    /// Image records created, updated and deleted from now on.
    fn image_events(
        &self,
    ) -> impl Future<Output = Result<impl Stream<Item = Result<ImageEvent, StoreError>> + Send + 'static, StoreError>> + Send;

    /// Size and labels of a blob, or `None` when the store does not hold it.
    fn info(&self, digest: &str) -> impl Future<Output = Result<Option<BlobInfo>, StoreError>> + Send;

    /// Streams `size` bytes of a blob; fails when the store holds another
    /// number of bytes under the digest. The bytes are not checked against
    /// the digest: the reader does that.
    fn read(&self, digest: &str, size: u64) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static;

    /// Holds a lease until it is released (or expires after `expire`, if
    /// the process died without releasing it).
    fn lease(&self, expire: Duration) -> impl Future<Output = Result<Self::Lease, StoreError>> + Send;

    /// Records that `repository` on `host` holds the blob, next to the
    /// repositories in `existing` (the label as [`ContentStore::info`] gave
    /// it), so that later pushes can mount from there.
    fn add_distribution_source(
        &self,
        digest: &str,
        host: &str,
        repository: &str,
        existing: Option<&str>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Reads a whole blob into memory; for manifests and configs only.
    fn read_all(&self, digest: &str, size: u64) -> impl Future<Output = Result<Bytes, StoreError>> + Send {
        let stream = self.read(digest, size);
        async move {
            let mut buf = Vec::with_capacity(usize::try_from(size).unwrap_or(0));
            let mut stream = std::pin::pin!(stream);
            while let Some(chunk) = stream.try_next().await? {
                buf.extend_from_slice(&chunk);
            }
            Ok(buf.into())
        }
    }

    /// Finds the image the kubelet ran under `reference`. The CRI plugin
    /// records a pulled image under its tag and under `name@digest`; only
    /// those records count, never another repository's with the same
    /// digest: an agent publishes only what its node pulled as the source
    /// it was asked for, so no assignment can make it publish an image
    /// another tenant pulled, under this source's name.
    fn resolve(&self, reference: &ImageRef) -> impl Future<Output = Result<ImageRecord, StoreError>> + Send {
        let names = record_names(reference);
        let wanted = reference.digest().map(str::to_string);
        let reference = reference.to_string();
        async move {
            for name in names {
                if let Some(record) = self.image(&name).await?
                    && wanted.as_deref().is_none_or(|d| d == record.target.digest)
                {
                    return Ok(record);
                }
            }
            Err(StoreError::ImageNotFound { reference, namespace: self.namespace().to_string() })
        }
    }
}

/// A lease protecting the blobs added to it from garbage collection.
pub trait Lease: Send + Sync + 'static {
    fn id(&self) -> &str;

    /// Adds a blob to the lease; the store keeps it while the lease lives.
    fn protect(&self, digest: &str) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Ends the lease.
    fn release(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The record names that may answer for `reference`, in the order asked:
/// the reference as given, then its `name@digest` form.
pub fn record_names(reference: &ImageRef) -> Vec<String> {
    let given = reference.to_string();
    let other = match reference.digest() {
        Some(digest) => Some(reference.pinned(digest)),
        None => reference.tagged_name(),
    };
    let other = other.filter(|other| *other != given);
    std::iter::once(given).chain(other).collect()
}

/// The distribution-source label after `repository` joined the
/// repositories of `existing`: `None` when it is there already. The oldest
/// repositories go first when the label would outgrow what containerd takes.
pub fn distribution_sources(key: &str, existing: Option<&str>, repository: &str) -> Option<String> {
    let mut repos: Vec<&str> = existing.map(|e| e.split(',').collect()).unwrap_or_default();
    if repos.contains(&repository) {
        return None;
    }
    repos.push(repository);
    while key.len() + repos.join(",").len() > LABEL_LIMIT && repos.len() > 1 {
        repos.remove(0);
    }
    Some(repos.join(","))
}

/// The label key of `host`'s distribution sources.
pub fn distribution_source_key(host: &str) -> String {
    format!("{DISTRIBUTION_SOURCE_LABEL}{host}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_is_answered_by_its_own_records_only() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let cases: [(&str, &[&str]); 4] = [
            ("nginx:1.25", &["docker.io/library/nginx:1.25"]),
            ("docker.io/library/nginx", &["docker.io/library/nginx:latest"]),
            (&format!("nginx@{digest}"), &[&format!("docker.io/library/nginx@{digest}")]),
            (
                &format!("ghcr.io/org/app:1@{digest}"),
                &[&format!("ghcr.io/org/app:1@{digest}"), &format!("ghcr.io/org/app@{digest}")],
            ),
        ];
        for (reference, names) in cases {
            let reference = ImageRef::parse(reference).unwrap();
            assert_eq!(record_names(&reference), names.to_vec(), "{reference}");
        }
    }

    #[test]
    fn distribution_sources_grow_once_and_stay_under_the_label_limit() {
        let key = distribution_source_key("backup.example.com");
        let long = "r".repeat(1500);
        let full = format!("{long}1,{long}2");
        let cases: [(Option<&str>, &str, Option<String>); 4] = [
            (None, "mirror/app", Some("mirror/app".into())),
            (Some("a/b"), "mirror/app", Some("a/b,mirror/app".into())),
            (Some("a/b,mirror/app"), "mirror/app", None),
            // The oldest goes: the newest repositories are the likeliest to
            // still hold the blob.
            (Some(&full), &format!("{long}3"), Some(format!("{long}2,{long}3"))),
        ];
        for (existing, repository, expected) in cases {
            let got = distribution_sources(&key, existing, repository);
            assert_eq!(got, expected, "{existing:?} + {repository}");
            assert!(got.is_none_or(|label| key.len() + label.len() <= LABEL_LIMIT));
        }
    }
}
