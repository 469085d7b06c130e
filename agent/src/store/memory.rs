//! A content store in memory: image records and blobs by digest, as a node
//! would hold them, for tests of the push engine and the daemon that need no
//! containerd. It holds what it is given and nothing else, so it plays the
//! nodes containerd makes: an index with only some platforms' manifests and
//! blobs (a kubelet pull), a record whose compressed layers are gone
//! (`discard_unpacked_layers`), content that does not hash to its digest.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use bytes::Bytes;
use futures::{Stream, StreamExt, channel::mpsc};

use image_backup_oci::media::sha256_digest;

use super::{
    BlobInfo, ContentStore, Descriptor, ImageEvent, ImageRecord, Lease, StoreError, distribution_source_key,
    distribution_sources,
};
use crate::containerd::K8S_NAMESPACE;

/// Bytes per chunk a read yields, small enough that a blob of a few dozen
/// KiB already arrives in several.
const CHUNK: usize = 16 << 10;

/// A node's content store in memory. Clones share the content.
#[derive(Clone, Debug)]
pub struct MemoryStore {
    namespace: String,
    inner: Arc<Mutex<Inner>>,
}

#[derive(Debug, Default)]
struct Inner {
    images: BTreeMap<String, Descriptor>,
    blobs: HashMap<String, Blob>,
    /// Live leases and the digests each protects, in the order protected.
    leases: BTreeMap<String, Vec<String>>,
    leases_taken: u64,
    watchers: Vec<mpsc::UnboundedSender<ImageEvent>>,
}

#[derive(Debug)]
struct Blob {
    bytes: Bytes,
    labels: HashMap<String, String>,
}

/// A lease on a [`MemoryStore`]: it records what it protects.
#[derive(Debug)]
pub struct MemoryLease {
    store: MemoryStore,
    id: String,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new(K8S_NAMESPACE)
    }
}

// === impl MemoryStore ===

impl MemoryStore {
    pub fn new(namespace: &str) -> Self {
        Self { namespace: namespace.to_string(), inner: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Holds `bytes` under their digest; returns the digest.
    pub fn add_blob(&self, bytes: impl Into<Bytes>) -> String {
        let bytes = bytes.into();
        let digest = sha256_digest(&bytes);
        self.add_blob_as(&digest, bytes);
        digest
    }

    /// Holds `bytes` under `digest`, whatever they hash to: a corrupt
    /// content store.
    pub fn add_blob_as(&self, digest: &str, bytes: impl Into<Bytes>) {
        let blob = Blob { bytes: bytes.into(), labels: HashMap::new() };
        self.lock().blobs.insert(digest.to_string(), blob);
    }

    /// Forgets a blob, as containerd does with a layer it discarded after
    /// unpacking; image records pointing at it stay. Whether it was held.
    pub fn remove_blob(&self, digest: &str) -> bool {
        self.lock().blobs.remove(digest).is_some()
    }

    pub fn holds(&self, digest: &str) -> bool {
        self.lock().blobs.contains_key(digest)
    }

    /// Creates or moves an image record, telling those following events.
    pub fn set_image(&self, name: &str, target: Descriptor) {
        let mut inner = self.lock();
        inner.images.insert(name.to_string(), target);
        inner.tell(ImageEvent::Upserted(name.to_string()));
    }

    /// Deletes an image record (not its blobs), telling those following.
    pub fn remove_image(&self, name: &str) {
        let mut inner = self.lock();
        if inner.images.remove(name).is_some() {
            inner.tell(ImageEvent::Deleted(name.to_string()));
        }
    }

    /// A blob's labels, `None` when the blob is not held.
    pub fn labels(&self, digest: &str) -> Option<HashMap<String, String>> {
        self.lock().blobs.get(digest).map(|blob| blob.labels.clone())
    }

    /// Sets a label on a held blob.
    pub fn set_label(&self, digest: &str, key: &str, value: &str) {
        if let Some(blob) = self.lock().blobs.get_mut(digest) {
            blob.labels.insert(key.to_string(), value.to_string());
        }
    }

    /// The digests the live leases protect, each once, in the order first
    /// protected.
    pub fn protected(&self) -> Vec<String> {
        let inner = self.lock();
        let mut seen = Vec::new();
        for digest in inner.leases.values().flatten() {
            if !seen.contains(digest) {
                seen.push(digest.clone());
            }
        }
        seen
    }

    /// How many follow the image events now.
    pub fn followers(&self) -> usize {
        let mut inner = self.lock();
        inner.watchers.retain(|watcher| !watcher.is_closed());
        inner.watchers.len()
    }

    /// How many leases are held now.
    pub fn live_leases(&self) -> usize {
        self.lock().leases.len()
    }

    fn not_found(&self, digest: &str) -> StoreError {
        StoreError::BlobNotFound { digest: digest.to_string(), namespace: self.namespace.clone() }
    }
}

impl Inner {
    fn tell(&mut self, event: ImageEvent) {
        self.watchers.retain(|watcher| watcher.unbounded_send(event.clone()).is_ok());
    }
}

impl ContentStore for MemoryStore {
    type Lease = MemoryLease;

    fn namespace(&self) -> &str {
        &self.namespace
    }

    async fn image(&self, name: &str) -> Result<Option<ImageRecord>, StoreError> {
        let target = self.lock().images.get(name).cloned();
        Ok(target.map(|target| ImageRecord { name: name.to_string(), target }))
    }

    async fn list_images(&self) -> Result<Vec<ImageRecord>, StoreError> {
        let inner = self.lock();
        Ok(inner
            .images
            .iter()
            .map(|(name, target)| ImageRecord { name: name.clone(), target: target.clone() })
            .collect())
    }

    async fn image_events(
        &self,
    ) -> Result<impl Stream<Item = Result<ImageEvent, StoreError>> + Send + 'static, StoreError> {
        let (tx, rx) = mpsc::unbounded();
        self.lock().watchers.push(tx);
        Ok(rx.map(Ok))
    }

    async fn info(&self, digest: &str) -> Result<Option<BlobInfo>, StoreError> {
        let inner = self.lock();
        Ok(inner.blobs.get(digest).map(|blob| BlobInfo { size: blob.bytes.len() as u64, labels: blob.labels.clone() }))
    }

    /// As containerd's content directory is read: every byte the store
    /// holds, then a short read when that is not `size`.
    fn read(&self, digest: &str, size: u64) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static {
        let held = self.lock().blobs.get(digest).map(|blob| blob.bytes.clone());
        let missing = self.not_found(digest);
        let digest = digest.to_string();
        let items: Vec<Result<Bytes, StoreError>> = match held {
            None => vec![Err(missing)],
            Some(bytes) => {
                let got = bytes.len() as u64;
                let mut items: Vec<_> = (0..bytes.len())
                    .step_by(CHUNK)
                    .map(|at| Ok(bytes.slice(at..bytes.len().min(at + CHUNK))))
                    .collect();
                if got != size {
                    items.push(Err(StoreError::ShortRead { digest, offset: 0, got, expected: size }));
                }
                items
            }
        };
        futures::stream::iter(items)
    }

    async fn lease(&self, _expire: Duration) -> Result<MemoryLease, StoreError> {
        let mut inner = self.lock();
        inner.leases_taken += 1;
        let id = format!("memory-{}", inner.leases_taken);
        inner.leases.insert(id.clone(), Vec::new());
        Ok(MemoryLease { store: self.clone(), id })
    }

    async fn add_distribution_source(
        &self,
        digest: &str,
        host: &str,
        repository: &str,
        existing: Option<&str>,
    ) -> Result<(), StoreError> {
        let key = distribution_source_key(host);
        let Some(value) = distribution_sources(&key, existing, repository) else { return Ok(()) };
        let mut inner = self.lock();
        let blob = inner.blobs.get_mut(digest).ok_or_else(|| self.not_found(digest))?;
        blob.labels.insert(key, value);
        Ok(())
    }
}

// === impl MemoryLease ===

impl Lease for MemoryLease {
    fn id(&self) -> &str {
        &self.id
    }

    async fn protect(&self, digest: &str) -> Result<(), StoreError> {
        if let Some(protected) = self.store.lock().leases.get_mut(&self.id) {
            protected.push(digest.to_string());
        }
        Ok(())
    }

    async fn release(self) -> Result<(), StoreError> {
        self.store.lock().leases.remove(&self.id);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use futures::TryStreamExt;

    use super::*;

    fn descriptor(digest: &str, size: usize) -> Descriptor {
        Descriptor { media_type: "application/octet-stream".into(), digest: digest.into(), size: size as u64 }
    }

    #[tokio::test]
    async fn blobs_read_whole_and_in_chunks_and_a_wrong_size_is_a_short_read() {
        let store = MemoryStore::default();
        let bytes: Vec<u8> = (0..40_000u32).map(|i| i as u8).collect();
        let digest = store.add_blob(bytes.clone());
        assert_eq!(store.read_all(&digest, 40_000).await.unwrap(), bytes);
        let chunks: Vec<Bytes> = store.read(&digest, 40_000).try_collect().await.unwrap();
        assert_eq!(chunks.iter().map(Bytes::len).collect::<Vec<_>>(), [CHUNK, CHUNK, 40_000 - 2 * CHUNK]);

        let err = store.read_all(&digest, 50_000).await.unwrap_err();
        assert!(matches!(err, StoreError::ShortRead { got: 40_000, expected: 50_000, .. }), "{err}");
        let err = store.read_all("sha256:00", 1).await.unwrap_err();
        assert_eq!(err.to_string(), "blob sha256:00 is not in containerd's content store (namespace k8s.io)");
    }

    #[tokio::test]
    async fn a_discarded_blob_has_no_info_and_its_record_stays() {
        let store = MemoryStore::default();
        let digest = store.add_blob(&b"layer"[..]);
        store.set_image("docker.io/library/app:1", descriptor(&digest, 5));
        assert_eq!(store.info(&digest).await.unwrap().map(|i| i.size), Some(5));
        assert!(store.remove_blob(&digest));
        assert_eq!(store.info(&digest).await.unwrap(), None);
        assert!(store.image("docker.io/library/app:1").await.unwrap().is_some());
    }

    #[tokio::test]
    async fn leases_protect_until_released() {
        let store = MemoryStore::default();
        let lease = store.lease(Duration::from_secs(60)).await.unwrap();
        lease.protect("sha256:a").await.unwrap();
        lease.protect("sha256:b").await.unwrap();
        lease.protect("sha256:a").await.unwrap();
        assert_eq!(store.protected(), ["sha256:a", "sha256:b"]);
        lease.release().await.unwrap();
        assert!(store.protected().is_empty());
        assert_eq!(store.live_leases(), 0);
    }

    #[tokio::test]
    async fn image_changes_are_told_to_followers() {
        let store = MemoryStore::default();
        let events = store.image_events().await.unwrap();
        store.set_image("a", descriptor("sha256:1", 1));
        store.remove_image("a");
        store.remove_image("never-there");
        drop(store);
        let got: Vec<ImageEvent> = events.try_collect().await.unwrap();
        assert_eq!(got, [ImageEvent::Upserted("a".into()), ImageEvent::Deleted("a".into())]);
    }

    #[tokio::test]
    async fn distribution_sources_are_labelled_on_held_blobs_only() {
        let store = MemoryStore::default();
        let digest = store.add_blob(&b"config"[..]);
        store.add_distribution_source(&digest, "backup:5000", "mirror/a", None).await.unwrap();
        let labels = store.labels(&digest).unwrap();
        store
            .add_distribution_source(&digest, "backup:5000", "mirror/b", labels.values().next().map(|s| s.as_str()))
            .await
            .unwrap();
        let key = distribution_source_key("backup:5000");
        assert_eq!(store.labels(&digest).unwrap()[&key], "mirror/a,mirror/b");
        let err = store.add_distribution_source("sha256:gone", "backup:5000", "mirror/a", None).await.unwrap_err();
        assert!(matches!(err, StoreError::BlobNotFound { .. }), "{err}");
    }
}
