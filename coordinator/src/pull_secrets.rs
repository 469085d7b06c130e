//! The pull secrets a workload's pods use, found as the kubelet finds
//! them (the pod spec's `imagePullSecrets`, then its ServiceAccount's), and
//! read as the kubelet reads them (`image_backup_oci::registry::docker_config`).
//! Both the check that pods can pull a backup or a source and the source
//! credentials of a copy go through here.

use image_backup_oci::registry::{Credentials, Registry, RegistryConfig, RegistryError, docker_config};
use k8s_openapi::api::core::v1::{PodSpec, Secret, ServiceAccount};
use kube::{Api, Client};

/// Where a kubelet looks for registry credentials in a pull secret.
pub const DOCKER_CONFIG_JSON: &str = ".dockerconfigjson";
const DOCKER_CFG: &str = ".dockercfg";

/// The names of the pull secrets pods of `spec` in `namespace` use: the
/// spec's, then their ServiceAccount's.
pub async fn names(client: &Client, namespace: &str, spec: &PodSpec) -> Result<Vec<String>, kube::Error> {
    let mut names: Vec<String> = spec.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect();
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    let accounts: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    if let Some(account) = accounts.get_opt(account).await? {
        names.extend(account.image_pull_secrets.iter().flatten().map(|r| r.name.clone()));
    }
    names.dedup();
    Ok(names)
}

/// Those of the Secrets `names` in `namespace` that exist, in order.
pub async fn read(client: &Client, namespace: &str, names: Vec<String>) -> Result<Vec<Secret>, kube::Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut found = Vec::new();
    for name in names {
        found.extend(api.get_opt(&name).await?);
    }
    Ok(found)
}

/// The docker config a pull secret holds, in either format.
fn docker_config_of(secret: &Secret) -> Option<Vec<u8>> {
    let data = secret.data.as_ref()?;
    docker_config::from_pull_secret(
        data.get(DOCKER_CONFIG_JSON).map(|b| b.0.as_slice()),
        data.get(DOCKER_CFG).map(|b| b.0.as_slice()),
    )
}

/// Credentials for `host` in a pull secret, if it has some.
pub fn credentials(secret: &Secret, host: &str) -> Option<Credentials> {
    docker_config::credentials(&docker_config_of(secret)?, host).ok().flatten()
}

/// A docker config with only the entry for `host` of a pull secret, and
/// only its credential fields, if it has one.
pub fn only(secret: &Secret, host: &str) -> Option<Vec<u8>> {
    docker_config::only(&docker_config_of(secret)?, host)
}

/// A reader of `host` with `credentials`, or none: never the coordinator's
/// own credentials, which the pods do not have.
pub fn anonymous_or(
    host: &str,
    config: &RegistryConfig,
    credentials: Option<Credentials>,
) -> Result<Registry, RegistryError> {
    let config = RegistryConfig { docker_config: None, ..config.clone() };
    Registry::reader(host, &config, credentials)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::ByteString;
    use serde_json::json;

    use super::*;

    fn secret(key: &str, value: serde_json::Value) -> Secret {
        Secret {
            data: Some([(key.to_string(), ByteString(value.to_string().into_bytes()))].into()),
            ..Secret::default()
        }
    }

    #[test]
    fn reads_both_pull_secret_formats() {
        let auth = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, "puller:s3cret");
        let json = secret(DOCKER_CONFIG_JSON, json!({ "auths": { "backup.example:5000": { "auth": auth } } }));
        let Some(Credentials::Basic { username, .. }) = credentials(&json, "backup.example:5000") else { panic!() };
        assert_eq!(username, "puller");
        let legacy = secret(DOCKER_CFG, json!({ "https://backup.example:5000": { "auth": auth, "email": "x@y" } }));
        assert!(credentials(&legacy, "backup.example:5000").is_some());
        let only = only(&legacy, "backup.example:5000").unwrap();
        let only: serde_json::Value = serde_json::from_slice(&only).unwrap();
        assert_eq!(only, json!({ "auths": { "backup.example:5000": { "auth": auth } } }));
        assert!(credentials(&json, "other.example").is_none());
    }
}
