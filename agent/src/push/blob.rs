//! Blobs: each one skipped when the target has it, mounted from another
//! repository of the target when containerd remembers one, else streamed
//! from its origin (the node's content store, or the source registry) with
//! its size and digest checked on the way.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicU64, Ordering},
};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt, stream::BoxStream};
use sha2::{Digest as _, Sha256};
use tracing::{Instrument, debug, info, info_span, warn};

use image_backup_oci::registry::{MountOutcome, retry_with_policy};

use super::{Job, Origin, PlannedBlob, PushError};
use crate::{
    progress::BlobOutcome,
    store::{ContentStore, Descriptor, distribution_source_key},
};

/// Bytes handed to the HTTP connection at once when streaming a blob.
const UPLOAD_WRITE: usize = 1 << 20;

// === impl Job ===

impl<S: ContentStore> Job<'_, S> {
    pub(super) async fn push_blobs(&self, blobs: &[PlannedBlob], origin: Origin<'_>) -> Result<(), PushError> {
        let bytes = blobs.iter().map(|b| b.descriptor.size).sum();
        self.progress.add_planned(u32::try_from(blobs.len()).unwrap_or(u32::MAX), bytes);
        // The futures are built up front: a stream that maps borrowed
        // descriptors through a closure has a higher-ranked type that rustc
        // cannot prove `Send`, and the daemon spawns pushes on the runtime.
        let uploads: Vec<_> = blobs.iter().map(|blob| self.push_blob(blob, origin)).collect();
        futures::stream::iter(uploads)
            .buffer_unordered(self.pusher.options.parallel_blobs.max(1))
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Pushes a blob: skipped when the target has it, else mounted or
    /// streamed; one of the node's the node lacked when planning comes from
    /// the source, if the push may read it.
    async fn push_blob(&self, planned: &PlannedBlob, origin: Origin<'_>) -> Result<(), PushError> {
        let blob = &planned.descriptor;
        let span = info_span!("blob", digest = %blob.digest, size = blob.size);
        async {
            if origin == Origin::Node {
                self.protect(&blob.digest).await?;
            }
            if self.registry.blob_exists(self.repository, &blob.digest).await? {
                debug!("already in the target repository");
                self.progress.finished(BlobOutcome::Existing, blob.size, 0);
                return Ok(());
            }
            if origin != Origin::Node {
                let streamed = self.upload(blob, None, origin).await?;
                self.progress.finished(BlobOutcome::Uploaded, blob.size, streamed);
                return Ok(());
            }
            let Some(info) = &planned.held else {
                // containerd skips fetching a layer whose snapshot exists,
                // and may discard layers once unpacked: what the node lacks
                // comes from the source, when the job may read it.
                let Some(source) = &self.source else { return Err(self.pusher.missing_blob(&blob.digest)) };
                info!(source = %source.reference, "not in containerd; copying it from the source");
                let streamed = self.upload(blob, None, Origin::Source(source)).await?;
                self.progress.finished(BlobOutcome::Uploaded, blob.size, streamed);
                return Ok(());
            };
            let label_key = distribution_source_key(self.registry.host());
            let sources = info.labels.get(&label_key).cloned();
            let mut location = None;
            for from in sources.iter().flat_map(|s| s.split(',')).filter(|r| *r != self.repository).take(3) {
                match self.registry.mount_blob(self.repository, &blob.digest, from).await {
                    Ok(MountOutcome::Mounted) => {
                        debug!(from, "mounted from another repository");
                        self.progress.finished(BlobOutcome::Mounted, blob.size, 0);
                        self.remember_source(blob, sources.as_deref()).await;
                        return Ok(());
                    }
                    Ok(MountOutcome::UploadStarted(started)) => {
                        debug!(from, "registry declined the mount; uploading");
                        location = Some(started);
                        break;
                    }
                    Err(e) => debug!(from, error = %e, "mount failed; trying the next source"),
                }
            }
            let streamed = self.upload(blob, location, origin).await?;
            self.progress.finished(BlobOutcome::Uploaded, blob.size, streamed);
            self.remember_source(blob, sources.as_deref()).await;
            Ok(())
        }
        .instrument(span)
        .await
    }

    /// Streams the blob from its origin to the registry, starting over from
    /// the origin after a retryable failure. Returns the bytes counted as
    /// streamed into progress.
    async fn upload(
        &self,
        blob: &Descriptor,
        mut location: Option<String>,
        origin: Origin<'_>,
    ) -> Result<u64, PushError> {
        let failure: Arc<Mutex<Option<PushError>>> = Arc::default();
        let counted = Arc::new(AtomicU64::new(0));
        let result = retry_with_policy(self.registry.retry_policy(), "upload blob", &blob.digest, || {
            let location = location.take();
            let failure = failure.clone();
            let counted = counted.clone();
            async move {
                let location = match location {
                    Some(location) => location,
                    None => self.registry.start_upload(self.repository, &blob.digest).await?,
                };
                self.progress.rewind(counted.swap(0, Ordering::Relaxed));
                let body = self.verified_body(
                    blob,
                    self.read(blob, origin),
                    origin.to_string(),
                    failure.clone(),
                    counted.clone(),
                );
                let sent = self
                    .registry
                    .finish_upload(
                        self.repository,
                        &location,
                        &blob.digest,
                        blob.size,
                        reqwest::Body::wrap_stream(body),
                    )
                    .await;
                match (sent, failure.lock().unwrap_or_else(|p| p.into_inner()).as_ref()) {
                    // The body failed: its cause, not the broken request, is
                    // the error; it is final unless the source was busy.
                    (Err(_), Some(cause)) => Err(self.registry.body_error(
                        self.repository,
                        &blob.digest,
                        cause.to_string(),
                        cause.retryable(),
                    )),
                    (sent, _) => sent,
                }
            }
        })
        .await;
        if result.is_err()
            && let Some(cause) = failure.lock().unwrap_or_else(|p| p.into_inner()).take()
        {
            return Err(cause);
        }
        result?;
        Ok(counted.load(Ordering::Relaxed))
    }

    /// The blob's bytes from containerd, with size and sha256 checked on the
    /// way. The last chunk is withheld on a mismatch, so the registry never
    /// receives a complete body with the wrong content.
    fn verified_body(
        &self,
        blob: &Descriptor,
        source: BoxStream<'static, Result<Bytes, PushError>>,
        origin: String,
        failure: Arc<Mutex<Option<PushError>>>,
        counted: Arc<AtomicU64>,
    ) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
        let expected = blob.clone();
        let progress = self.progress.clone();
        async_stream::try_stream! {
            let mut source = std::pin::pin!(source);
            let mut hasher = Sha256::new();
            let mut seen = 0u64;
            let mut pending = bytes::BytesMut::with_capacity(UPLOAD_WRITE);
            let fail = |e: PushError| {
                let message = e.to_string();
                *failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
                std::io::Error::other(message)
            };
            while let Some(chunk) = source.next().await {
                let chunk = chunk.map_err(fail)?;
                seen += chunk.len() as u64;
                if seen > expected.size {
                    Err(fail(PushError::SizeMismatch { digest: expected.digest.clone(), expected: expected.size, actual: seen, origin: origin.clone() }))?;
                }
                hasher.update(&chunk);
                if seen == expected.size {
                    let actual = format!("sha256:{}", hex::encode(hasher.finalize_reset()));
                    if actual != expected.digest {
                        Err(fail(PushError::DigestMismatch { expected: expected.digest.clone(), actual, origin: origin.clone() }))?;
                    }
                }
                counted.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                progress.streamed(chunk.len() as u64);
                // containerd's API sends 32 KiB messages; handing the socket
                // 1 MiB writes costs a memcpy and saves the registry most of
                // its read wakeups, and the registry's CPU is what limits a
                // push. Chunks that are large already (read from the content
                // directory) pass through without the copy.
                if pending.is_empty() && chunk.len() >= UPLOAD_WRITE {
                    yield chunk;
                } else {
                    pending.extend_from_slice(&chunk);
                    if pending.len() >= UPLOAD_WRITE || seen == expected.size {
                        yield pending.split().freeze();
                    }
                }
            }
            if seen != expected.size {
                Err(fail(PushError::SizeMismatch { digest: expected.digest.clone(), expected: expected.size, actual: seen, origin }))?;
            }
        }
    }

    /// The blob's bytes from its origin, unchecked.
    fn read(&self, blob: &Descriptor, origin: Origin<'_>) -> BoxStream<'static, Result<Bytes, PushError>> {
        let digest = blob.digest.clone();
        match origin {
            Origin::Node => self
                .pusher
                .store
                .read(&blob.digest, blob.size)
                .map_err(move |error| PushError::Store { what: format!("blob {digest}"), error })
                .boxed(),
            Origin::Source(source) => {
                let (registry, repository) = (source.registry.clone(), source.repository.clone());
                let reference = source.reference.clone();
                let failed = move |error| PushError::Source { reference: reference.clone(), error };
                let failed_open = failed.clone();
                futures::stream::once(async move { registry.blob(&repository, &digest).await })
                    .map_err(failed_open)
                    .map_ok(move |stream| stream.map_err(failed.clone()))
                    .try_flatten()
                    .boxed()
            }
        }
    }

    /// Labels the blob in containerd with the repository now holding it, so
    /// the next push to another repository of this registry mounts it.
    async fn remember_source(&self, blob: &Descriptor, existing: Option<&str>) {
        if let Err(e) = self
            .pusher
            .store
            .add_distribution_source(&blob.digest, self.registry.host(), self.repository, existing)
            .await
        {
            warn!(digest = %blob.digest, error = %e, "could not record the blob's registry location in containerd");
        }
    }
}
