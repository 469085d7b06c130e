//! Credentials for reading the source registry, as the workload's pods pull:
//! the pod spec's imagePullSecrets, then its ServiceAccount's. The entry for
//! the source host alone, with its credential fields only, goes in the
//! assignment, over the authenticated TLS session, to the agent holding the
//! attempt: no agent reads a Secret, so none can read another job's
//! credentials or the coordinator's keys.

use std::collections::BTreeMap;

use image_backup_crds::ImageBackup;
use k8s_openapi::{
    ByteString,
    api::{
        apps::v1::{DaemonSet, Deployment},
        core::v1::{PodSpec, Secret, ServiceAccount},
    },
};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use tracing::{debug, info, warn};

use crate::{context::Context, workloads::usage::WorkloadKey};

/// Where a kubelet looks for registry credentials in a pull secret.
const DOCKER_CONFIG_JSON: &str = ".dockerconfigjson";
const DOCKER_CFG: &str = ".dockercfg";

/// Fields of a docker config entry worth copying. Anything else (a
/// `credsStore` would make a reader run a helper program) is dropped.
const ENTRY_FIELDS: [&str; 4] = ["auth", "username", "password", "identitytoken"];

/// A docker config with the entry for `host` from the pull secrets of a
/// workload that uses the image, if one has credentials for it. Reading
/// what the pods use can fail (a deleted Secret, RBAC): the copy then goes
/// on without them.
pub async fn for_source(ctx: &Context, backup: &ImageBackup, host: &str) -> Option<Vec<u8>> {
    if !ctx.config.read_pull_secrets {
        debug!(%host, "the pods' pull secrets are not read (--read-pull-secrets): the agent's own credentials, or none");
        return None;
    }
    let name = backup.name_any();
    for user in ctx.usage.workloads_of(&name) {
        match entry_for(ctx, &user, host).await {
            Ok(Some((secret, entry))) => {
                info!(workload = %user, %secret, %host, "source credentials from the workload's pull secret");
                return Some(json!({ "auths": { host: entry } }).to_string().into_bytes());
            }
            Ok(None) => debug!(workload = %user, %host, "no pull secret of the workload names the source"),
            Err(e) => warn!(workload = %user, error = %e, "could not read the workload's pull secrets"),
        }
    }
    None
}

/// The first entry for `host` in the pull secrets of `user`'s pods, and the
/// Secret it came from.
async fn entry_for(ctx: &Context, user: &WorkloadKey, host: &str) -> Result<Option<(String, Value)>, kube::Error> {
    let Some(spec) = pod_spec(ctx, user).await? else { return Ok(None) };
    let mut names: Vec<String> = spec.image_pull_secrets.iter().flatten().map(|r| r.name.clone()).collect();
    let account = spec.service_account_name.as_deref().unwrap_or("default");
    let accounts: Api<ServiceAccount> = Api::namespaced(ctx.client.clone(), &user.namespace);
    if let Some(account) = accounts.get_opt(account).await? {
        names.extend(account.image_pull_secrets.iter().flatten().map(|r| r.name.clone()));
    }
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &user.namespace);
    for name in names {
        let Some(secret) = secrets.get_opt(&name).await? else { continue };
        if let Some(entry) = secret.data.as_ref().and_then(|data| find_entry(data, host)) {
            return Ok(Some((format!("{}/{name}", user.namespace), entry)));
        }
    }
    Ok(None)
}

async fn pod_spec(ctx: &Context, user: &WorkloadKey) -> Result<Option<PodSpec>, kube::Error> {
    let client = ctx.client.clone();
    Ok(match user.kind {
        "Deployment" => Api::<Deployment>::namespaced(client, &user.namespace)
            .get_opt(&user.name)
            .await?
            .and_then(|d| d.spec.template.spec),
        _ => Api::<DaemonSet>::namespaced(client, &user.namespace)
            .get_opt(&user.name)
            .await?
            .and_then(|d| d.spec.template.spec),
    })
}

/// The entry for `host` in a pull secret's docker config, keeping only
/// the credential fields.
fn find_entry(data: &BTreeMap<String, ByteString>, host: &str) -> Option<Value> {
    // `.dockercfg` is the older format: the `auths` map alone.
    let auths = match (data.get(DOCKER_CONFIG_JSON), data.get(DOCKER_CFG)) {
        (Some(json), _) => serde_json::from_slice::<Value>(&json.0).ok()?.get("auths")?.clone(),
        (None, Some(cfg)) => serde_json::from_slice::<Value>(&cfg.0).ok()?,
        (None, None) => return None,
    };
    let auths = auths.as_object()?;
    let entry = keys_for(host).iter().find_map(|key| auths.get(key))?.as_object()?;
    let kept: serde_json::Map<String, Value> =
        entry.iter().filter(|(k, _)| ENTRY_FIELDS.contains(&k.as_str())).map(|(k, v)| (k.clone(), v.clone())).collect();
    (!kept.is_empty()).then_some(Value::Object(kept))
}

/// The keys a docker config may file `host` under, as the kubelet matches
/// them.
fn keys_for(host: &str) -> Vec<String> {
    let mut keys = vec![host.to_string(), format!("https://{host}"), format!("http://{host}")];
    if host == "docker.io" {
        keys.extend(
            ["index.docker.io", "https://index.docker.io/v1/", "registry-1.docker.io", "https://registry-1.docker.io"]
                .map(String::from),
        );
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(key: &str, json: Value) -> BTreeMap<String, ByteString> {
        [(key.to_string(), ByteString(json.to_string().into_bytes()))].into()
    }

    #[test]
    fn finds_the_host_entry_and_keeps_only_credentials() {
        let config = json!({
            "auths": {
                "https://registry.example:5000": { "auth": "dTpw", "email": "x@y" },
                "other.example": { "auth": "b3RoZXI6cA==" },
            },
            "credsStore": "evil",
        });
        let entry = find_entry(&data(DOCKER_CONFIG_JSON, config), "registry.example:5000").unwrap();
        assert_eq!(entry, json!({ "auth": "dTpw" }));
        let legacy = json!({ "index.docker.io": { "username": "u", "password": "p" } });
        let entry = find_entry(&data(DOCKER_CFG, legacy), "docker.io").unwrap();
        assert_eq!(entry, json!({ "username": "u", "password": "p" }));
        assert_eq!(find_entry(&data(DOCKER_CONFIG_JSON, json!({ "auths": {} })), "quay.io"), None);
    }
}
