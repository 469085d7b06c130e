//! Credentials for reading the source registry, as the workload's pods pull:
//! the pod spec's imagePullSecrets, then its ServiceAccount's. The entry for
//! the source host alone, with its credential fields only, goes in the
//! assignment, over the authenticated TLS session, to the agent holding the
//! attempt: no agent reads a Secret, so none can read another job's
//! credentials or the coordinator's keys.

use image_backup_crds::ImageBackup;
use k8s_openapi::api::{
    apps::v1::{DaemonSet, Deployment},
    core::v1::PodSpec,
};
use kube::{Api, ResourceExt};
use tracing::{debug, info, warn};

use crate::{backups::context::Context, pull_secrets, workloads::usage::WorkloadKey};

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
            Ok(Some((secret, config))) => {
                info!(workload = %user, %secret, %host, "source credentials from the workload's pull secret");
                return Some(config);
            }
            Ok(None) => debug!(workload = %user, %host, "no pull secret of the workload names the source"),
            Err(e) => warn!(workload = %user, error = %e, "could not read the workload's pull secrets"),
        }
    }
    None
}

/// A config with the first entry for `host` in the pull secrets of
/// `user`'s pods, and the Secret it came from.
async fn entry_for(ctx: &Context, user: &WorkloadKey, host: &str) -> Result<Option<(String, Vec<u8>)>, kube::Error> {
    let Some(spec) = pod_spec(ctx, user).await? else { return Ok(None) };
    let names = pull_secrets::names(&ctx.client, &user.namespace, &spec).await?;
    for secret in pull_secrets::read(&ctx.client, &user.namespace, names).await? {
        if let Some(config) = pull_secrets::only(&secret, host) {
            return Ok(Some((format!("{}/{}", user.namespace, secret.name_any()), config)));
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
