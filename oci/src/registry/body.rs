//! Reading reply bodies with a ceiling: a registry (or a token server) that
//! answers a manifest or a token with gigabytes is refused at the limit
//! instead of being held in memory.

use bytes::{Bytes, BytesMut};
use reqwest::Response;

/// Largest manifest, index or referrers list read (containerd's limit).
pub const MAX_MANIFEST: usize = 4 << 20;
/// Largest token server reply read.
pub const MAX_TOKEN_REPLY: usize = 64 << 10;
/// Largest error body read (it is shortened for messages anyway).
pub const MAX_ERROR_BODY: usize = 16 << 10;

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("the reply is larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(transparent)]
    Transport(#[from] reqwest::Error),
}

/// The whole body of `response`, if it is at most `limit` bytes.
pub async fn read_limited(mut response: Response, limit: usize) -> Result<Bytes, BodyError> {
    if response.content_length().is_some_and(|length| length > limit as u64) {
        return Err(BodyError::TooLarge { limit });
    }
    let mut body = BytesMut::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > limit {
            return Err(BodyError::TooLarge { limit });
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body.freeze())
}
