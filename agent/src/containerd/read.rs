//! Blob bytes out of containerd: through the Content service in large read
//! windows, or straight from its content directory when this process sees
//! it. Either way the count of bytes is checked, so a short read surfaces
//! where it happens rather than as a digest mismatch later.

use std::path::PathBuf;

use bytes::Bytes;
use containerd_client::{
    services::v1::{ReadContentRequest, content_client::ContentClient},
    tonic::{self, Code},
};
use futures::{Stream, StreamExt, TryStreamExt};

use super::{ContainerdStore, call_error};
use crate::store::{ContentStore, StoreError};

/// Bytes read from a content file at once.
const DIRECT_READ_CHUNK: usize = 1 << 20;

// === impl ContainerdStore ===

impl ContainerdStore {
    /// Streams `size` bytes of a blob, from the content directory when it
    /// is readable, else in read windows through the Content service.
    pub(super) fn read_blob(
        &self,
        digest: &str,
        size: u64,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static + use<> {
        let store = self.clone();
        let digest = digest.to_string();
        if let Some(root) = &self.direct_root {
            return self.read_direct(root.clone(), digest, size).left_stream();
        }
        let window = store.window.max(1);
        let offsets = (0..size.div_ceil(window)).map(move |i| i * window);
        futures::stream::iter(offsets)
            .map(move |offset| {
                let store = store.clone();
                let digest = digest.clone();
                let len = window.min(size - offset);
                async move { store.read_window(digest, offset, len).await }
            })
            // One window at a time: a second Read in flight would fill its
            // HTTP/2 stream window while nobody consumes it, and with several
            // blobs at once those idle buffers can take the whole connection
            // window and stall every read. Within a window, flow control
            // already keeps containerd streaming ahead of the consumer.
            .then(|window| window)
            .try_flatten()
            .right_stream()
    }

    /// Streams a blob from the content directory, after containerd confirmed
    /// (Info, in this namespace) that the namespace owns it.
    fn read_direct(
        &self,
        root: PathBuf,
        digest: String,
        size: u64,
    ) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static + use<> {
        let store = self.clone();
        async_stream::try_stream! {
            let namespace = store.namespace_name.clone();
            let not_found = || StoreError::BlobNotFound { digest: digest.clone(), namespace: namespace.clone() };
            store.info(&digest).await?.ok_or_else(not_found)?;
            let (algorithm, hex) = digest.split_once(':').ok_or_else(not_found)?;
            let path = root.join("blobs").join(algorithm).join(hex);
            let file = tokio::fs::File::open(&path)
                .await
                .map_err(|error| StoreError::File { path: path.display().to_string(), error })?;
            let mut chunks = tokio_util::io::ReaderStream::with_capacity(file, DIRECT_READ_CHUNK);
            let mut got = 0u64;
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|error| StoreError::File { path: path.display().to_string(), error })?;
                got += chunk.len() as u64;
                yield chunk;
            }
            if got != size {
                Err(StoreError::ShortRead { digest: digest.clone(), offset: 0, got, expected: size })?;
            }
        }
    }

    /// One Read call for `len` bytes at `offset`, checked to deliver exactly
    /// that many: a short read would otherwise surface only as a digest
    /// mismatch far from its cause.
    async fn read_window(
        self,
        digest: String,
        offset: u64,
        len: u64,
    ) -> Result<impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static + use<>, StoreError> {
        let mut content = ContentClient::new(self.channel.clone());
        let request = ReadContentRequest {
            digest: digest.clone(),
            offset: i64::try_from(offset).unwrap_or(i64::MAX),
            size: i64::try_from(len).unwrap_or(i64::MAX),
        };
        let namespace = self.namespace_name.clone();
        let mut messages = match content.read(self.request(request)).await {
            Ok(reply) => reply.into_inner(),
            Err(status) => return Err(read_error(status, digest, namespace)),
        };
        Ok(async_stream::try_stream! {
            let mut got = 0u64;
            while let Some(message) = messages
                .message()
                .await
                .map_err(|status| read_error(status, digest.clone(), namespace.clone()))?
            {
                got += message.data.len() as u64;
                yield Bytes::from(message.data);
            }
            if got != len {
                Err(StoreError::ShortRead { digest: digest.clone(), offset, got, expected: len })?;
            }
        })
    }
}

fn read_error(status: tonic::Status, digest: String, namespace: String) -> StoreError {
    if status.code() == Code::NotFound {
        StoreError::BlobNotFound { digest, namespace }
    } else {
        call_error("Content.Read", &digest, status)
    }
}
