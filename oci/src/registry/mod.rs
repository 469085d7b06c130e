//! A client for the OCI distribution API, just the part a pusher needs:
//! HEAD, cross-repository mount, monolithic streaming upload, manifest PUT.
//!
//! Written here rather than taken from oci-client because the push engine
//! needs what that crate does not offer together: blob bodies streamed from
//! containerd with their digest checked on the way (no whole-layer buffers),
//! mount attempts that fall back to an upload in the same session, uploads
//! restarted from the source on a dropped connection, and errors that name
//! the registry, repository, blob and last status.

mod auth;
pub mod body;
mod config;
pub mod docker_config;

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::{
    RequestBuilder, Response, StatusCode,
    header::{ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HeaderMap, LOCATION, RETRY_AFTER},
};
use tracing::warn;

pub use auth::Credentials;
pub use config::{RegistryConfig, RetryPolicy};

use auth::Auth;

/// Every manifest media type the engine pushes; sent as `Accept` so the
/// registry answers HEAD with the stored manifest's own digest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Deadline of every registry call but a blob's body.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

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

    fn retry_after(&self) -> Option<Duration> {
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

/// What a cross-repository mount attempt did.
#[derive(Debug)]
pub enum MountOutcome {
    Mounted,
    /// The registry would not mount and opened an upload session instead.
    UploadStarted(String),
}

/// One registry host, shared by every push to it: the HTTP connection pool,
/// the credentials and the bearer tokens obtained for it.
#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    host: String,
    base: String,
    /// Where credentials may go: the registry's own scheme, host and port.
    origin: reqwest::Url,
    /// Hosts reached over plain HTTP (for upload locations elsewhere).
    insecure: Vec<String>,
    http: reqwest::Client,
    auth: Auth,
    retry: RetryPolicy,
    /// Asks tokens for pull access only: a source registry, or a client
    /// that only verifies.
    pull_only: bool,
}

/// A request description that can be built again for every attempt.
struct Call<'a> {
    operation: &'static str,
    repository: &'a str,
    object: &'a str,
    /// Repositories the request needs pull access to besides `repository`.
    extra_pull: Option<&'a str>,
}

impl Registry {
    /// `host` is the registry as written in references (`host:port`).
    pub fn new(host: &str, config: &RegistryConfig) -> Result<Self, RegistryError> {
        let credentials = config
            .credentials_for(host)
            .map_err(|detail| RegistryError::Config { registry: host.to_string(), detail })?;
        Self::build(host, config, credentials, false)
    }

    /// A client that only reads from `host`, with `credentials` when given
    /// (a workload's pull secret), else the configured ones, else none.
    pub fn reader(
        host: &str,
        config: &RegistryConfig,
        credentials: Option<Credentials>,
    ) -> Result<Self, RegistryError> {
        let credentials = match credentials {
            Some(credentials) => Some(credentials),
            None => config
                .credentials_for(host)
                .map_err(|detail| RegistryError::Config { registry: host.to_string(), detail })?,
        };
        Self::build(host, config, credentials, true)
    }

    fn build(
        host: &str,
        config: &RegistryConfig,
        credentials: Option<Credentials>,
        pull_only: bool,
    ) -> Result<Self, RegistryError> {
        let insecure = config.is_insecure(host);
        let scheme = if insecure { "http" } else { "https" };
        let http = config
            .http_client(insecure)
            .map_err(|detail| RegistryError::Config { registry: host.to_string(), detail })?;
        let base = format!("{scheme}://{host}");
        let origin = reqwest::Url::parse(&base)
            .map_err(|e| RegistryError::Config { registry: host.to_string(), detail: format!("not a host: {e}") })?;
        Ok(Self {
            inner: Arc::new(Inner {
                host: host.to_string(),
                base,
                origin,
                insecure: config.insecure_hosts.clone(),
                auth: Auth::new(host, http.clone(), credentials, config.insecure_hosts.clone()),
                http,
                retry: config.retry.clone(),
                pull_only,
            }),
        })
    }

    pub fn host(&self) -> &str {
        &self.inner.host
    }

    /// Whether the repository holds the blob.
    pub async fn blob_exists(&self, repository: &str, digest: &str) -> Result<bool, RegistryError> {
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.inner.base);
        let call = Call { operation: "HEAD blob", repository, object: digest, extra_pull: None };
        self.retrying(&call, || async {
            let response = self.send(&call, || self.inner.http.head(&url)).await?;
            match response.status() {
                StatusCode::OK => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// The OCI 1.1 referrers of `digest` (an image index listing them), or
    /// `None` when the registry does not serve the referrers API.
    pub async fn referrers(&self, repository: &str, digest: &str) -> Result<Option<Bytes>, RegistryError> {
        let url = format!("{}/v2/{repository}/referrers/{digest}", self.inner.base);
        let call = Call { operation: "GET referrers", repository, object: digest, extra_pull: None };
        self.retrying(&call, || async {
            let accept = "application/vnd.oci.image.index.v1+json";
            let response = self.send(&call, || self.inner.http.get(&url).header(ACCEPT, accept)).await?;
            match response.status() {
                StatusCode::OK => Ok(Some(self.read_manifest(&call, response).await?)),
                StatusCode::NOT_FOUND => Ok(None),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// A blob's bytes as they arrive. The caller checks the digest: a
    /// registry may redirect to storage elsewhere, and bytes are only as
    /// good as their hash.
    pub async fn blob(
        &self,
        repository: &str,
        digest: &str,
    ) -> Result<futures::stream::BoxStream<'static, Result<Bytes, RegistryError>>, RegistryError> {
        use futures::{StreamExt as _, TryStreamExt as _};
        let url = format!("{}/v2/{repository}/blobs/{digest}", self.inner.base);
        let call = Call { operation: "GET blob", repository, object: digest, extra_pull: None };
        let response = self
            .retrying(&call, || async {
                let response = self.send(&call, || self.inner.http.get(&url)).await?;
                match response.status() {
                    StatusCode::OK => Ok(response),
                    _ => Err(self.unexpected(&call, response).await),
                }
            })
            .await?;
        let this = self.clone();
        let (repository, digest) = (repository.to_string(), digest.to_string());
        Ok(response
            .bytes_stream()
            .map_err(move |e| {
                let call = Call { operation: "GET blob", repository: &repository, object: &digest, extra_pull: None };
                this.transport_error(&call, e)
            })
            .boxed())
    }

    /// Asks the registry to mount a blob from another of its repositories.
    pub async fn mount_blob(&self, repository: &str, digest: &str, from: &str) -> Result<MountOutcome, RegistryError> {
        let url = format!("{}/v2/{repository}/blobs/uploads/?mount={digest}&from={from}", self.inner.base);
        let call = Call { operation: "mount blob", repository, object: digest, extra_pull: Some(from) };
        self.retrying(&call, || async {
            let response = self.send(&call, || self.inner.http.post(&url).header(CONTENT_LENGTH, 0)).await?;
            match response.status() {
                StatusCode::CREATED => Ok(MountOutcome::Mounted),
                StatusCode::ACCEPTED => Ok(MountOutcome::UploadStarted(self.location(&call, &response)?)),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// Opens an upload session; returns its location.
    pub async fn start_upload(&self, repository: &str, digest: &str) -> Result<String, RegistryError> {
        let url = format!("{}/v2/{repository}/blobs/uploads/", self.inner.base);
        let call = Call { operation: "start upload", repository, object: digest, extra_pull: None };
        self.retrying(&call, || async {
            let response = self.send(&call, || self.inner.http.post(&url).header(CONTENT_LENGTH, 0)).await?;
            match response.status() {
                StatusCode::ACCEPTED => self.location(&call, &response),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// Completes an upload session with the whole blob in one streamed PUT.
    /// Not retried here: a failed body cannot be replayed, so the caller
    /// restarts the blob from its source.
    pub async fn finish_upload(
        &self,
        repository: &str,
        location: &str,
        digest: &str,
        size: u64,
        body: reqwest::Body,
    ) -> Result<(), RegistryError> {
        let separator = if location.contains('?') { '&' } else { '?' };
        let url = format!("{location}{separator}digest={digest}");
        let call = Call { operation: "upload blob", repository, object: digest, extra_pull: None };
        let mut body = Some(body);
        let response = self
            .send(&call, || {
                let request = self
                    .inner
                    .http
                    .put(&url)
                    .header(CONTENT_TYPE, "application/octet-stream")
                    .header(CONTENT_LENGTH, size);
                match body.take() {
                    Some(body) => request.body(body),
                    // A challenge after the body was spent: the upload is
                    // restarted by the caller with fresh credentials.
                    None => request,
                }
            })
            .await?;
        match response.status() {
            StatusCode::CREATED => Ok(()),
            _ => Err(self.unexpected(&call, response).await),
        }
    }

    /// Stores a manifest under a digest or tag, byte for byte.
    pub async fn put_manifest(
        &self,
        repository: &str,
        reference: &str,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.inner.base);
        let call = Call { operation: "PUT manifest", repository, object: reference, extra_pull: None };
        self.retrying(&call, || async {
            let response = self
                .send(&call, || self.inner.http.put(&url).header(CONTENT_TYPE, media_type).body(bytes.clone()))
                .await?;
            match response.status() {
                StatusCode::CREATED | StatusCode::OK => Ok(()),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// Deletes a manifest by digest, and with it the tags that name it;
    /// `false` when the registry did not hold it. A registry that does not
    /// allow deletes answers 405, an error.
    pub async fn delete_manifest(&self, repository: &str, digest: &str) -> Result<bool, RegistryError> {
        let url = format!("{}/v2/{repository}/manifests/{digest}", self.inner.base);
        let call = Call { operation: DELETE_MANIFEST, repository, object: digest, extra_pull: None };
        self.retrying(&call, || async {
            let response = self.send(&call, || self.inner.http.delete(&url)).await?;
            match response.status() {
                StatusCode::ACCEPTED | StatusCode::OK | StatusCode::NO_CONTENT => Ok(true),
                StatusCode::NOT_FOUND => Ok(false),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// The digest the registry reports for a manifest, or `None` when absent.
    pub async fn manifest_digest(&self, repository: &str, reference: &str) -> Result<Option<String>, RegistryError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.inner.base);
        let call = Call { operation: "HEAD manifest", repository, object: reference, extra_pull: None };
        self.retrying(&call, || async {
            let response = self.send(&call, || self.inner.http.head(&url).header(ACCEPT, MANIFEST_ACCEPT)).await?;
            match response.status() {
                // Registries need not send the header; a manifest asked
                // for by digest and found is that digest.
                StatusCode::OK => Ok(response
                    .headers()
                    .get("docker-content-digest")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| reference.starts_with("sha256:").then(|| reference.to_string()))),
                StatusCode::NOT_FOUND => Ok(None),
                _ => Err(self.unexpected(&call, response).await),
            }
        })
        .await
    }

    /// A manifest's media type and bytes, or `None` when absent. The
    /// bytes are checked against `reference` when it is a sha256 digest (the
    /// only kind references here carry), so a registry cannot hand over
    /// other content under it.
    pub async fn manifest(&self, repository: &str, reference: &str) -> Result<Option<(String, Bytes)>, RegistryError> {
        let url = format!("{}/v2/{repository}/manifests/{reference}", self.inner.base);
        let call = Call { operation: "GET manifest", repository, object: reference, extra_pull: None };
        self.retrying(&call, || async {
            let response = self.send(&call, || self.inner.http.get(&url).header(ACCEPT, MANIFEST_ACCEPT)).await?;
            match response.status() {
                StatusCode::OK => {}
                StatusCode::NOT_FOUND => return Ok(None),
                _ => return Err(self.unexpected(&call, response).await),
            }
            let media_type =
                response.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
            let bytes = self.read_manifest(&call, response).await?;
            if reference.starts_with("sha256:") {
                let actual = crate::media::sha256_digest(&bytes);
                if actual != reference {
                    let detail = format!("served content with digest {actual}");
                    return Err(self.request_error(&call, None, detail, None));
                }
            }
            Ok(Some((media_type, bytes)))
        })
        .await
    }

    /// Runs `attempt` until it succeeds, fails for good, or the retry budget
    /// is spent; 5xx, 429 and dropped connections are retried with jittered
    /// exponential backoff, honouring Retry-After.
    async fn retrying<T, F, Fut>(&self, call: &Call<'_>, attempt: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        retry_with_policy(&self.inner.retry, call.operation, call.object, attempt).await
    }

    /// Sends a request with the credentials the registry asked for, answering
    /// one authentication challenge.
    async fn send(
        &self,
        call: &Call<'_>,
        mut build: impl FnMut() -> RequestBuilder,
    ) -> Result<Response, RegistryError> {
        let scope = match call.operation {
            // Token services grant deletes on an action of their own.
            DELETE_MANIFEST => format!("repository:{}:delete", call.repository),
            _ => scope(call.repository, call.extra_pull, self.inner.pull_only),
        };
        let response = self.execute(call, build(), &scope).await?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response.headers().get(reqwest::header::WWW_AUTHENTICATE).cloned();
        self.inner.auth.answer(challenge.as_ref(), &scope).await.map_err(|detail| RegistryError::Unauthorized {
            registry: self.inner.host.clone(),
            repository: call.repository.to_string(),
            scope: scope.clone(),
            detail,
        })?;
        let response = self.execute(call, build(), &scope).await?;
        if response.status() == StatusCode::UNAUTHORIZED || response.status() == StatusCode::FORBIDDEN {
            let detail = error_body(response).await;
            return Err(RegistryError::Unauthorized {
                registry: self.inner.host.clone(),
                repository: call.repository.to_string(),
                scope,
                detail: format!("credentials refused: {detail}"),
            });
        }
        Ok(response)
    }

    /// Sends one request. Credentials go only to the registry's own origin:
    /// an upload `Location` elsewhere (storage behind the registry, or a
    /// registry that lies) gets the bytes, never the credentials. Every
    /// call but a blob's body has a deadline; those are bounded by the
    /// connection's read timeout and the job's deadline.
    async fn execute(&self, call: &Call<'_>, builder: RequestBuilder, scope: &str) -> Result<Response, RegistryError> {
        let mut request = builder.build().map_err(|e| self.transport_error(call, e))?;
        if request.url().origin() == self.inner.origin.origin()
            && let Some(value) = self.inner.auth.authorization(scope).await
        {
            request.headers_mut().insert(AUTHORIZATION, value);
        }
        if !matches!(call.operation, "GET blob" | "upload blob") {
            *request.timeout_mut() = Some(CALL_TIMEOUT);
        }
        self.inner.http.execute(request).await.map_err(|e| self.transport_error(call, e))
    }

    /// A manifest-sized body, refused past [`body::MAX_MANIFEST`].
    async fn read_manifest(&self, call: &Call<'_>, response: Response) -> Result<Bytes, RegistryError> {
        body::read_limited(response, body::MAX_MANIFEST).await.map_err(|e| match e {
            body::BodyError::Transport(e) => self.transport_error(call, e),
            too_large => self.request_error(call, None, too_large.to_string(), None),
        })
    }

    fn location(&self, call: &Call<'_>, response: &Response) -> Result<String, RegistryError> {
        let location = response.headers().get(LOCATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
            self.request_error(call, Some(response.status()), "reply has no Location header".into(), None)
        })?;
        // Locations may be relative to the registry's base URL.
        if !(location.starts_with("http://") || location.starts_with("https://")) {
            return Ok(format!("{}{location}", self.inner.base));
        }
        // Bytes go over plain HTTP only to hosts listed insecure.
        let url = reqwest::Url::parse(location).map_err(|e| {
            self.request_error(call, Some(response.status()), format!("Location {location:?} is not a URL: {e}"), None)
        })?;
        let authority = format!(
            "{}{}",
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default()
        );
        if url.scheme() == "http"
            && url.origin() != self.inner.origin.origin()
            && !self.inner.insecure.contains(&authority)
        {
            let detail =
                format!("upload Location {location} is plain http on {authority}, which is not listed insecure");
            return Err(self.request_error(call, Some(response.status()), detail, None));
        }
        Ok(location.to_string())
    }

    async fn unexpected(&self, call: &Call<'_>, response: Response) -> RegistryError {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let detail = error_body(response).await;
        self.request_error(call, Some(status), format!("{status}: {detail}"), retry_after)
    }

    fn transport_error(&self, call: &Call<'_>, error: reqwest::Error) -> RegistryError {
        let detail = error_chain(&error);
        // A certificate the client does not trust will not start trusting it
        // on the next attempt; everything else on the wire may be transient.
        let retryable = !detail.contains("certificate");
        RegistryError::Request(Box::new(RequestFailure {
            registry: self.inner.host.clone(),
            repository: call.repository.to_string(),
            operation: call.operation,
            object: call.object.to_string(),
            status: error.status().map(|s| s.as_u16()),
            detail,
            retryable,
            retry_after: None,
        }))
    }

    fn request_error(
        &self,
        call: &Call<'_>,
        status: Option<StatusCode>,
        detail: String,
        retry_after: Option<Duration>,
    ) -> RegistryError {
        let retryable = status.is_some_and(|s| s.is_server_error() || s == StatusCode::TOO_MANY_REQUESTS);
        RegistryError::Request(Box::new(RequestFailure {
            registry: self.inner.host.clone(),
            repository: call.repository.to_string(),
            operation: call.operation,
            object: call.object.to_string(),
            status: status.map(|s| s.as_u16()),
            detail,
            retryable,
            retry_after,
        }))
    }

    /// Wraps an error raised outside an HTTP exchange (a source that failed
    /// mid-body) so the retry loop can tell whether to try again.
    pub fn body_error(&self, repository: &str, digest: &str, detail: String, retryable: bool) -> RegistryError {
        RegistryError::Request(Box::new(RequestFailure {
            registry: self.inner.host.clone(),
            repository: repository.to_string(),
            operation: "upload blob",
            object: digest.to_string(),
            status: None,
            detail,
            retryable,
            retry_after: None,
        }))
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.inner.retry
    }
}

/// The retry loop shared by every registry call and by whole-blob uploads.
pub async fn retry_with_policy<T, F, Fut>(
    policy: &RetryPolicy,
    operation: &str,
    object: &str,
    mut attempt: F,
) -> Result<T, RegistryError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, RegistryError>>,
{
    let started = Instant::now();
    let attempts = AtomicU32::new(0);
    let backoff = ExponentialBuilder::default()
        .with_jitter()
        .with_min_delay(policy.min_delay)
        .with_max_delay(policy.max_delay)
        .with_total_delay(Some(policy.max_elapsed))
        .without_max_times();
    let result = (|| {
        attempts.fetch_add(1, Ordering::Relaxed);
        attempt()
    })
    .retry(backoff)
    .when(RegistryError::retryable)
    .adjust(|error, delay| delay.map(|d| error.retry_after().map_or(d, |ra| ra.min(policy.max_elapsed))))
    .notify(|error, delay| warn!(%operation, %object, ?delay, %error, "registry call failed, retrying"))
    .await;
    let attempts = attempts.load(Ordering::Relaxed);
    result.map_err(|last| {
        if attempts > 1 && last.retryable() {
            RegistryError::GaveUp { attempts, elapsed: started.elapsed(), last: Box::new(last) }
        } else {
            last
        }
    })
}

const DELETE_MANIFEST: &str = "DELETE manifest";

fn scope(repository: &str, extra_pull: Option<&str>, pull_only: bool) -> String {
    let actions = if pull_only { "pull" } else { "pull,push" };
    match extra_pull {
        Some(from) => format!("repository:{repository}:{actions} repository:{from}:pull"),
        None => format!("repository:{repository}:{actions}"),
    }
}

fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?;
    if let Ok(seconds) = value.trim().parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

/// The registry's error body, shortened; distribution puts its error codes
/// (`BLOB_UNKNOWN`, `MANIFEST_BLOB_UNKNOWN`, ...) there.
async fn error_body(response: Response) -> String {
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

    #[test]
    fn mount_scope_asks_pull_on_the_source_repository() {
        assert_eq!(scope("a/b", Some("c/d"), false), "repository:a/b:pull,push repository:c/d:pull");
        assert_eq!(scope("a/b", None, true), "repository:a/b:pull");
    }

    #[tokio::test]
    async fn gives_up_after_the_budget_with_the_last_error() {
        let policy = RetryPolicy {
            min_delay: Duration::from_millis(1),
            max_delay: Duration::from_millis(5),
            max_elapsed: Duration::from_millis(30),
        };
        let err = retry_with_policy(&policy, "HEAD blob", "sha256:x", || async {
            Err::<(), _>(RegistryError::Request(Box::new(RequestFailure {
                registry: "r".into(),
                repository: "repo".into(),
                operation: "HEAD blob",
                object: "sha256:x".into(),
                status: Some(503),
                detail: "503 Service Unavailable".into(),
                retryable: true,
                retry_after: None,
            })))
        })
        .await
        .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("gave up after") && text.contains("503") && text.contains("repo"), "{text}");
    }
}
