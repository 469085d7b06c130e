//! What a registry call that failed says: the registry, repository and
//! object, the last status, and whether trying again may help.

use std::time::Duration;

use reqwest::{
    Response,
    header::{HeaderMap, RETRY_AFTER},
};

use super::body;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Request(Box<RequestFailure>),
    #[error("registry {registry} refused access to {repository} ({scope}): {detail}")]
    Unauthorized { registry: String, repository: String, scope: String, detail: String },
    #[error("{last} (gave up after {attempts} attempts in {elapsed:.1?})")]
    GaveUp { attempts: u32, elapsed: Duration, last: Box<RegistryError> },
    #[error("registry {registry}: {detail}")]
    Config { registry: String, detail: String },
}

/// One failed exchange with a registry, with everything needed to find it
/// in the registry's own logs.
#[derive(Debug, thiserror::Error)]
#[error("registry {registry}: {operation} {repository} {object}: {detail}")]
pub struct RequestFailure {
    pub registry: String,
    pub repository: String,
    pub operation: &'static str,
    pub object: String,
    /// HTTP status of the last reply, when there was one.
    pub status: Option<u16>,
    pub detail: String,
    pub retryable: bool,
    pub retry_after: Option<Duration>,
}

impl RegistryError {
    /// Whether the call may succeed if made again: a 5xx, a 429 or a
    /// dropped connection, not a refusal.
    pub fn retryable(&self) -> bool {
        matches!(self, RegistryError::Request(f) if f.retryable)
    }

    pub(super) fn retry_after(&self) -> Option<Duration> {
        match self {
            RegistryError::Request(f) => f.retry_after,
            _ => None,
        }
    }

    /// HTTP status of the last reply, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            RegistryError::Request(f) => f.status,
            RegistryError::GaveUp { last, .. } => last.status(),
            RegistryError::Unauthorized { .. } => Some(401),
            RegistryError::Config { .. } => None,
        }
    }
}

/// A `Retry-After` header, in seconds or as a date.
pub(super) fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// The registry's error body, shortened; distribution puts its error codes
/// (`BLOB_UNKNOWN`, `MANIFEST_BLOB_UNKNOWN`, ...) there.
pub(super) async fn error_body(response: Response) -> String {
    let text = body::read_limited(response, body::MAX_ERROR_BODY).await.unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let text = text.trim();
    if text.is_empty() {
        return "(empty body)".into();
    }
    let mut short: String = text.chars().take(512).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// reqwest's top-level message hides the cause ("error sending request");
/// the chain names it (refused, reset, unknown issuer).
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_reads_seconds() {
        let mut headers = HeaderMap::new();
        headers.insert(RETRY_AFTER, "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
    }
}
