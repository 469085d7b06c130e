//! One exchange with a registry, made again while it may succeed: the
//! request built anew for each attempt, the one authentication challenge
//! answered, credentials sent to the registry's own origin only, and the
//! errors that say which call failed.

use std::{
    future::Future,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use reqwest::{
    RequestBuilder, Response, StatusCode,
    header::{AUTHORIZATION, LOCATION},
};
use tracing::warn;

use super::{
    Registry, RegistryError, RequestFailure, RetryPolicy, body,
    error::{error_body, error_chain, retry_after},
};

/// Deadline of every registry call but a blob's body.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A request description that can be built again for every attempt.
pub(super) struct Call<'a> {
    pub operation: &'static str,
    pub repository: &'a str,
    pub object: &'a str,
    /// Repositories the request needs pull access to besides `repository`.
    pub extra_pull: Option<&'a str>,
}

// === impl Registry ===

impl Registry {
    /// Runs `attempt` until it succeeds, fails for good, or the retry budget
    /// is spent; 5xx, 429 and dropped connections are retried with jittered
    /// exponential backoff, honouring Retry-After.
    pub(super) async fn retrying<T, F, Fut>(&self, call: &Call<'_>, attempt: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        retry_with_policy(&self.inner.retry, call.operation, call.object, attempt).await
    }

    /// Sends a request with the credentials the registry asked for, answering
    /// one authentication challenge.
    pub(super) async fn send(
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
    pub(super) async fn execute(
        &self,
        call: &Call<'_>,
        builder: RequestBuilder,
        scope: &str,
    ) -> Result<Response, RegistryError> {
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
    pub(super) async fn read_manifest(&self, call: &Call<'_>, response: Response) -> Result<Bytes, RegistryError> {
        body::read_limited(response, body::MAX_MANIFEST).await.map_err(|e| match e {
            body::BodyError::Transport(e) => self.transport_error(call, e),
            too_large => self.request_error(call, None, too_large.to_string(), None),
        })
    }

    pub(super) fn location(&self, call: &Call<'_>, response: &Response) -> Result<String, RegistryError> {
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

    pub(super) async fn unexpected(&self, call: &Call<'_>, response: Response) -> RegistryError {
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let detail = error_body(response).await;
        self.request_error(call, Some(status), format!("{status}: {detail}"), retry_after)
    }

    pub(super) fn transport_error(&self, call: &Call<'_>, error: reqwest::Error) -> RegistryError {
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

    pub(super) fn request_error(
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

pub(super) const DELETE_MANIFEST: &str = "DELETE manifest";

fn scope(repository: &str, extra_pull: Option<&str>, pull_only: bool) -> String {
    let actions = if pull_only { "pull" } else { "pull,push" };
    match extra_pull {
        Some(from) => format!("repository:{repository}:{actions} repository:{from}:pull"),
        None => format!("repository:{repository}:{actions}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
