//! The source credentials of a job: a Secret of the agent's own namespace
//! that the coordinator wrote from the workload's pull secrets and that the
//! assignment names. Read here, so that no credential is ever in a gRPC
//! message.

use image_backup_oci::registry::{Credentials, docker_config_credentials};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;

#[derive(Debug, thiserror::Error)]
pub enum PullSecretError {
    #[error("no Kubernetes client to read pull secret {0} with")]
    NoClient(String),
    #[error("reading pull secret {namespace}/{name}: {error}")]
    Read { namespace: String, name: String, error: kube::Error },
    #[error("pull secret {namespace}/{name} is gone")]
    Gone { namespace: String, name: String },
    #[error("pull secret {namespace}/{name}: {detail}")]
    Invalid { namespace: String, name: String, detail: String },
}

/// Reads jobs' pull secrets from one namespace.
#[derive(Clone)]
pub struct PullSecrets {
    namespace: String,
    api: Api<Secret>,
}

impl PullSecrets {
    pub fn new(client: kube::Client, namespace: &str) -> Self {
        Self { namespace: namespace.to_string(), api: Api::namespaced(client, namespace) }
    }

    /// The credentials for `host` in the Secret `name`, if it has any.
    pub async fn credentials(&self, name: &str, host: &str) -> Result<Option<Credentials>, PullSecretError> {
        let (namespace, owned) = (self.namespace.clone(), name.to_string());
        let secret = self
            .api
            .get_opt(name)
            .await
            .map_err(|error| PullSecretError::Read { namespace: namespace.clone(), name: owned.clone(), error })?
            .ok_or_else(|| PullSecretError::Gone { namespace: namespace.clone(), name: owned.clone() })?;
        let Some(config) = secret.data.as_ref().and_then(|data| data.get(".dockerconfigjson")) else {
            return Err(PullSecretError::Invalid { namespace, name: owned, detail: "no .dockerconfigjson".into() });
        };
        docker_config_credentials(&config.0, host).map_err(|detail| PullSecretError::Invalid {
            namespace,
            name: owned,
            detail,
        })
    }
}
