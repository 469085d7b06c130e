//! `image-backup-coordinator restore`: the way back. Every workload the
//! coordinator moved to backups records its original images; this moves one
//! workload, a namespace's or the cluster's back to them, with the same
//! guarded patch the coordinator uses to undo a failed rollout, and holds
//! them there so a running coordinator does not move them again.

use std::fmt::Write as _;

use image_backup_oci::BackupTarget;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use kube::{Api, Client, api::ListParams};

use image_backup_core::template::{HoldReason, ORIGINAL_IMAGES_ANNOTATION, restore_patch};

use crate::{
    cli::RestoreArgs,
    workloads::workload::{Patched, Workload},
};

/// A workload changed meanwhile is read again this often before it is
/// reported as not restored.
const ATTEMPTS: usize = 3;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("name a workload as deployment/NAME or daemonset/NAME, not {0:?}")]
    Workload(String),
    #[error("name a workload's --namespace, or restore --all")]
    Scope,
    #[error("{action}: {error}")]
    Kube { action: String, error: kube::Error },
    #[error("{0} workload(s) could not be restored (see above)")]
    Incomplete(usize),
}

/// What the command did, a line per workload.
#[derive(Debug, Default)]
pub struct Report {
    pub lines: String,
    pub restored: usize,
    pub failed: usize,
}

/// Restores what `args` names; `Incomplete` when some workload changed on
/// every attempt or failed to patch.
pub async fn restore(client: Client, args: &RestoreArgs) -> Result<Report, RestoreError> {
    let backup = BackupTarget { registry: args.backup_registry.clone(), prefix: args.backup_prefix.clone() };
    let workloads = match (&args.workload, &args.namespace, args.all) {
        (_, _, true) => moved(&client, None).await?,
        (Some(workload), Some(namespace), _) => vec![one(&client, namespace, workload).await?],
        (None, Some(namespace), _) => moved(&client, Some(namespace)).await?,
        (_, None, false) => return Err(RestoreError::Scope),
    };
    let mut report = Report::default();
    for workload in workloads {
        restore_one(&client, &backup, workload, args.dry_run, &mut report).await;
    }
    if report.failed > 0 {
        print!("{}", report.lines);
        return Err(RestoreError::Incomplete(report.failed));
    }
    Ok(report)
}

async fn restore_one(
    client: &Client,
    backup: &BackupTarget,
    mut workload: Workload,
    dry_run: bool,
    report: &mut Report,
) {
    let key = workload.key();
    for _ in 0..ATTEMPTS {
        let restore = match restore_patch(
            &workload.template(),
            |image| backup.holds_reference(image),
            HoldReason::Restored,
            "restored by image-backup-coordinator restore",
        ) {
            Ok(Some(restore)) => restore,
            Ok(None) => {
                let _ = writeln!(report.lines, "{key}: runs no backup of {}; unchanged", backup.registry);
                return;
            }
            Err(e) => {
                let _ = writeln!(report.lines, "{key}: {e}");
                report.failed += 1;
                return;
            }
        };
        if dry_run {
            let _ = writeln!(report.lines, "{key}: would move {}", restore.moves.join(", "));
            return;
        }
        match workload.patch(client, restore.patch).await {
            Ok(Patched::Applied) => {
                let _ = writeln!(report.lines, "{key}: moved {}", restore.moves.join(", "));
                report.restored += 1;
                return;
            }
            Ok(Patched::Changed) => match reread(client, &workload).await {
                Ok(Some(fresh)) => workload = fresh,
                Ok(None) => {
                    let _ = writeln!(report.lines, "{key}: deleted meanwhile");
                    return;
                }
                Err(e) => {
                    let _ = writeln!(report.lines, "{key}: {e}");
                    report.failed += 1;
                    return;
                }
            },
            Err(e) => {
                let _ = writeln!(report.lines, "{key}: patch refused: {e}");
                report.failed += 1;
                return;
            }
        }
    }
    let _ = writeln!(report.lines, "{key}: changed on every attempt; not restored");
    report.failed += 1;
}

/// Every Deployment and DaemonSet (of `namespace`, or all) that records
/// original images.
async fn moved(client: &Client, namespace: Option<&str>) -> Result<Vec<Workload>, RestoreError> {
    fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
    {
        match namespace {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let kube_err = |what: &str| {
        let action = format!("listing {what}");
        move |error| RestoreError::Kube { action, error }
    };
    let params = ListParams::default();
    let deployments = api::<Deployment>(client, namespace).list(&params).await.map_err(kube_err("Deployments"))?;
    let daemonsets = api::<DaemonSet>(client, namespace).list(&params).await.map_err(kube_err("DaemonSets"))?;
    let all = deployments.items.into_iter().map(Workload::Deployment);
    let all = all.chain(daemonsets.items.into_iter().map(Workload::DaemonSet));
    Ok(all
        .filter(|w| w.metadata().annotations.as_ref().is_some_and(|a| a.contains_key(ORIGINAL_IMAGES_ANNOTATION)))
        .collect())
}

async fn one(client: &Client, namespace: &str, workload: &str) -> Result<Workload, RestoreError> {
    let (kind, name) = workload.split_once('/').ok_or_else(|| RestoreError::Workload(workload.into()))?;
    let action = format!("reading {workload} in {namespace}");
    let to_err = |error| RestoreError::Kube { action, error };
    match kind.to_ascii_lowercase().as_str() {
        "deployment" | "deployments" | "deploy" => Api::<Deployment>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map(Workload::Deployment)
            .map_err(to_err),
        "daemonset" | "daemonsets" | "ds" => Api::<DaemonSet>::namespaced(client.clone(), namespace)
            .get(name)
            .await
            .map(Workload::DaemonSet)
            .map_err(to_err),
        _ => Err(RestoreError::Workload(workload.into())),
    }
}

async fn reread(client: &Client, workload: &Workload) -> Result<Option<Workload>, kube::Error> {
    let ns = workload.namespace();
    Ok(match workload {
        Workload::Deployment(_) => {
            Api::<Deployment>::namespaced(client.clone(), ns).get_opt(workload.name()).await?.map(Workload::Deployment)
        }
        Workload::DaemonSet(_) => {
            Api::<DaemonSet>::namespaced(client.clone(), ns).get_opt(workload.name()).await?.map(Workload::DaemonSet)
        }
    })
}
