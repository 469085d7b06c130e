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
mod error;
mod exchange;

use std::sync::Arc;

use bytes::Bytes;
use reqwest::{
    StatusCode,
    header::{ACCEPT, CONTENT_LENGTH, CONTENT_TYPE},
};

pub use auth::Credentials;
pub use config::{RegistryConfig, RetryPolicy};
pub use error::{RegistryError, RequestFailure};
pub use exchange::retry_with_policy;

use auth::Auth;
use exchange::{Call, DELETE_MANIFEST};

/// Every manifest media type the engine pushes; sent as `Accept` so the
/// registry answers HEAD with the stored manifest's own digest.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.docker.distribution.manifest.v2+json";

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
