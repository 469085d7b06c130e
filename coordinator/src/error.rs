//! The error every reconcile reports, with what was being done to which
//! object.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{action} {object}: {error}")]
    Kube { action: &'static str, object: String, error: kube::Error },
    #[error(transparent)]
    Rewrite(#[from] image_backup_core::template::RewriteError),
    #[error("the reconcile of {object} panicked: {message}")]
    Panicked { object: String, message: String },
}

/// Runs a reconcile, a panic in it turned into an error its controller
/// retries: one object that trips a bug must not stop every controller.
pub async fn contained<K, T>(
    object: &K,
    reconcile: impl std::future::Future<Output = Result<T, Error>>,
) -> Result<T, Error>
where
    K: kube::Resource,
{
    use futures::FutureExt;
    match std::panic::AssertUnwindSafe(reconcile).catch_unwind().await {
        Ok(result) => result,
        Err(panic) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            let meta = object.meta();
            let name = meta.name.clone().unwrap_or_default();
            let object = match &meta.namespace {
                Some(namespace) => format!("{namespace}/{name}"),
                None => name,
            };
            Err(Error::Panicked { object, message })
        }
    }
}

/// Wraps a kube error with what was being done to which object.
pub fn kube_err(action: &'static str, object: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let object = object.into();
    move |error| Error::Kube { action, object, error }
}
