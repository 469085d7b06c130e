//! Whether a workload's pods will be able to pull its backups, checked
//! before the patch that would make them: a backup registry that needs
//! credentials the pods lack would leave every new pod in ImagePullBackOff.
//! The pods pull as the kubelet does: anonymously, or with the pull secrets
//! of their spec and their ServiceAccount. Failing those, the pull Secret
//! the install names (`--backup-pull-secret`) is added to the workload, if
//! its namespace has it, or a copy is made there when `--copy-pull-secret`
//! allows.

use image_backup_oci::{
    ImageRef,
    registry::{Credentials, Registry, RegistryConfig, RegistryError, RetryPolicy},
};
use k8s_openapi::{ByteString, api::core::v1::Secret, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{Api, api::PostParams};
use std::time::Duration;
use tracing::{debug, info};

use super::workload::Workload;
use crate::{
    MANAGER,
    error::{Error, kube_err},
    pull_secrets::{self, DOCKER_CONFIG_JSON},
    workloads::context::Context,
};

/// How the pods will pull the backups.
#[derive(Debug, PartialEq, Eq)]
pub enum Access {
    /// Anonymously, or with a pull secret they use already.
    AsIs,
    /// With this pull Secret of their namespace, added to the pod spec.
    AddSecret(String),
}

#[derive(Debug)]
pub enum Verdict {
    Pullable(Access),
    /// They could not: why, for the user.
    Refused(String),
    /// The registry could not say now (it is down, say).
    Unknown(String),
}

/// Whether pulls with `registry`'s credentials get every one of `backups`
/// (pinned references in the backup registry): `Ok(false)` for a refusal
/// or a manifest not served.
async fn serves(registry: &Registry, backups: &[ImageRef]) -> Result<bool, RegistryError> {
    for backup in backups {
        let Some(digest) = backup.digest() else { continue };
        match registry.manifest_digest(backup.repository(), digest).await {
            Ok(Some(found)) if found == digest => {}
            Ok(_) => return Ok(false),
            Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    Ok(true)
}

/// Whether the pods of `workload` could pull `sources` (the images a rollout
/// would move them back to) now: anonymously, or with the pull secrets of
/// their spec and ServiceAccount; else why not. A source registry that does
/// not answer counts as not pullable: it is gone, which is when a backup
/// matters most.
pub async fn sources(ctx: &Context, workload: &Workload, sources: &[ImageRef]) -> Result<Result<(), String>, Error> {
    // A look, not a copy: a registry that does not answer within seconds
    // is as good as gone for pods that would pull from it now.
    let retry = RetryPolicy {
        min_delay: Duration::from_millis(200),
        max_delay: Duration::from_secs(2),
        max_elapsed: Duration::from_secs(5),
    };
    let config = RegistryConfig { retry, ..ctx.config.registry.clone() };
    let mut secrets = None;
    for source in sources {
        let reference = source.digest().or(source.tag()).unwrap_or("latest");
        let host = source.registry();
        let served = |registry: Registry| async move {
            match registry.manifest_digest(source.repository(), reference).await {
                Ok(Some(_)) => Ok(true),
                Ok(None) => Ok(false),
                Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => Ok(false),
                Err(e) => Err(e.to_string()),
            }
        };
        let anonymous = match pull_secrets::anonymous_or(host, &config, None) {
            Ok(registry) => registry,
            Err(e) => return Ok(Err(format!("{source} cannot be pulled: {e}"))),
        };
        match served(anonymous).await {
            Ok(true) => continue,
            Ok(false) => {}
            Err(e) => return Ok(Err(format!("{source} cannot be pulled: {e}"))),
        }
        if secrets.is_none() {
            let read = if ctx.config.read_pull_secrets { pod_secret_objects(ctx, workload).await? } else { Vec::new() };
            secrets = Some(read);
        }
        let mut pulled = false;
        for secret in secrets.iter().flatten() {
            let Some(credentials) = pull_secrets::credentials(secret, host) else { continue };
            let Ok(registry) = pull_secrets::anonymous_or(host, &config, Some(credentials)) else { continue };
            if served(registry).await == Ok(true) {
                pulled = true;
                break;
            }
        }
        if !pulled {
            return Ok(Err(format!("{source} is refused to anonymous pulls and to the pods' pull secrets")));
        }
    }
    Ok(Ok(()))
}

/// The sources among `sources` that the pods of `workload` may need a pull
/// secret for: with `--read-pull-secrets`, those a pull secret the pods use
/// has credentials for; without, all of them as soon as the pods use any
/// pull secret (which registry it is for is not read).
pub async fn private_sources<'a>(
    ctx: &Context,
    workload: &Workload,
    sources: &'a [ImageRef],
) -> Result<Vec<&'a ImageRef>, Error> {
    let names = pod_secrets(ctx, workload).await?;
    if names.is_empty() {
        return Ok(Vec::new());
    }
    if !ctx.config.read_pull_secrets {
        return Ok(sources.iter().collect());
    }
    let secrets = secret_objects(ctx, workload.namespace(), names).await?;
    Ok(sources
        .iter()
        .filter(|source| secrets.iter().any(|s| pull_secrets::credentials(s, source.registry()).is_some()))
        .collect())
}

/// The pull secrets the pods of `workload` use that exist.
async fn pod_secret_objects(ctx: &Context, workload: &Workload) -> Result<Vec<Secret>, Error> {
    let names = pod_secrets(ctx, workload).await?;
    secret_objects(ctx, workload.namespace(), names).await
}

/// The Secrets among `names` in `namespace` that exist.
async fn secret_objects(ctx: &Context, namespace: &str, names: Vec<String>) -> Result<Vec<Secret>, Error> {
    pull_secrets::read(&ctx.client, namespace, names)
        .await
        .map_err(kube_err("reading pull secrets", namespace.to_string()))
}

/// A reader of the backup registry with `credentials`, or none.
pub fn reader(ctx: &Context, credentials: Option<Credentials>) -> Result<Registry, RegistryError> {
    pull_secrets::anonymous_or(&ctx.config.backup.registry, &ctx.config.registry, credentials)
}

/// Checks that the pods of `workload` can pull `backups`.
pub async fn check(ctx: &Context, workload: &Workload, backups: &[ImageRef]) -> Result<Verdict, Error> {
    let host = &ctx.config.backup.registry;
    let unknown = |e: RegistryError| Verdict::Unknown(e.to_string());
    if ctx.open_backups.all(backups) {
        return Ok(Verdict::Pullable(Access::AsIs));
    }
    match serves(&ctx.anonymous, backups).await {
        Ok(true) => {
            ctx.open_backups.insert(backups);
            return Ok(Verdict::Pullable(Access::AsIs));
        }
        Ok(false) => {}
        Err(e) => return Ok(unknown(e)),
    }
    let namespace = workload.namespace();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let tried = if ctx.config.read_pull_secrets { pod_secrets(ctx, workload).await? } else { Vec::new() };
    for name in &tried {
        let secret =
            secrets.get_opt(name).await.map_err(kube_err("reading pull secret", format!("{namespace}/{name}")))?;
        let Some(credentials) = secret.as_ref().and_then(|s| pull_secrets::credentials(s, host)) else { continue };
        match reader(ctx, Some(credentials)) {
            Ok(registry) => match serves(&registry, backups).await {
                Ok(true) => {
                    debug!(secret = %name, "the pods pull the backups with their own pull secret");
                    return Ok(Verdict::Pullable(Access::AsIs));
                }
                Ok(false) => {}
                Err(e) => return Ok(unknown(e)),
            },
            Err(e) => return Ok(unknown(e)),
        }
    }
    let pods_use = match (ctx.config.read_pull_secrets, tried.is_empty()) {
        (false, _) => "pull secrets (not read: --read-pull-secrets is off)".to_string(),
        (true, true) => "no pull secret".to_string(),
        (true, false) => format!("pull secrets {}", tried.join(", ")),
    };
    let refused =
        format!("the backup registry {host} refuses the backups to anonymous pulls and to the {pods_use} the pods use");
    let Some(install) = &ctx.config.backup_pull_secret else {
        return Ok(Verdict::Refused(format!("{refused}; name a pull Secret for it with --backup-pull-secret")));
    };
    let own: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.config.namespace);
    let own_secret = own
        .get_opt(install)
        .await
        .map_err(kube_err("reading the backup pull secret", format!("{}/{install}", ctx.config.namespace)))?;
    let Some(credentials) = own_secret.as_ref().and_then(|s| pull_secrets::credentials(s, host)) else {
        return Ok(Verdict::Refused(format!(
            "{refused}, and Secret {}/{install} holds no credentials for {host}",
            ctx.config.namespace
        )));
    };
    match reader(ctx, Some(credentials)) {
        Ok(registry) => match serves(&registry, backups).await {
            Ok(true) => {}
            Ok(false) => {
                return Ok(Verdict::Refused(format!(
                    "{refused}, and to Secret {}/{install} as well",
                    ctx.config.namespace
                )));
            }
            Err(e) => return Ok(unknown(e)),
        },
        Err(e) => return Ok(unknown(e)),
    }
    // Without reading Secrets, whether the namespace has one is learnt
    // only by copying it there (an existing one is kept).
    if ctx.config.read_pull_secrets
        && secrets
            .get_opt(install)
            .await
            .map_err(kube_err("reading pull secret", format!("{namespace}/{install}")))?
            .is_some()
    {
        return Ok(Verdict::Pullable(Access::AddSecret(install.clone())));
    }
    if !ctx.config.copy_pull_secret && !ctx.config.read_pull_secrets {
        return Ok(Verdict::Refused(format!(
            "{refused}; Secret {}/{install} can, but whether namespace {namespace} has a Secret {install} is not read (--read-pull-secrets) and copying it there is off (--copy-pull-secret)",
            ctx.config.namespace
        )));
    }
    if !ctx.config.copy_pull_secret {
        return Ok(Verdict::Refused(format!(
            "{refused}; Secret {}/{install} can, but namespace {namespace} has no Secret {install} and copying it there is off (--copy-pull-secret)",
            ctx.config.namespace
        )));
    }
    let source = own_secret.unwrap_or_default();
    copy(ctx, &source, namespace, install).await?;
    Ok(Verdict::Pullable(Access::AddSecret(install.clone())))
}

/// The names of the pull secrets the workload's pods use.
async fn pod_secrets(ctx: &Context, workload: &Workload) -> Result<Vec<String>, Error> {
    let Some(spec) = workload.pod_spec() else { return Ok(Vec::new()) };
    pull_secrets::names(&ctx.client, workload.namespace(), spec)
        .await
        .map_err(kube_err("reading the pull secrets of", workload.key().to_string()))
}

/// Copies the install's pull secret into `namespace`: its data as is, so
/// that it stays a pull secret the kubelet reads, labelled as ours.
async fn copy(ctx: &Context, source: &Secret, namespace: &str, name: &str) -> Result<(), Error> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(namespace.to_string()),
            labels: Some([("app.kubernetes.io/managed-by".to_string(), MANAGER.to_string())].into()),
            annotations: Some(
                [("backup.k8slab.io/copied-from".to_string(), format!("{}/{name}", ctx.config.namespace))].into(),
            ),
            ..ObjectMeta::default()
        },
        type_: source.type_.clone(),
        data: source.data.clone().or_else(|| Some([(DOCKER_CONFIG_JSON.to_string(), ByteString(Vec::new()))].into())),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let params = PostParams { field_manager: Some(MANAGER.into()), ..PostParams::default() };
    match api.create(&params, &secret).await {
        Ok(_) => {
            info!(%namespace, secret = %name, "copied the backup pull secret into the workload's namespace");
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        Err(e) => Err(kube_err("copying the backup pull secret", format!("{namespace}/{name}"))(e)),
    }
}
