//! The loop when things go wrong: a backup registry down for a while (waited
//! out) or refusing by policy (a failure), an agent lost in the middle of a
//! copy, and report-only mode.

use std::time::Duration;

use image_backup_coordinator::config::CoordinatorConfig;
use image_backup_crds::{ImageBackup, Phase};
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, Placement, Workloads, agent_client, cluster, coordinator_client, coordinator_config, eventually,
        metric, prepare, quick_retries,
    },
    init_tracing, on_both_api_servers,
    run::{Coordinator, start_agent, start_coordinator},
};
use k8s_openapi::api::events::v1::Event;
use kube::Api;
use serde_json::json;

const SOURCE: &str = "quay.io/team/web:3";

/// The coordinator, as its ServiceAccount on a real API server, giving up
/// on the registry quickly.
async fn start(
    kind: ApiServerKind,
    client: &kube::Client,
    backup_host: &str,
    report_only: bool,
    max_attempts: u32,
) -> Coordinator {
    let config = CoordinatorConfig {
        registry: quick_retries(backup_host, Duration::from_secs(2)),
        report_only,
        max_attempts,
        retry_backoff: Duration::from_millis(200),
        max_retry_backoff: Duration::from_secs(1),
        ..coordinator_config(backup_host)
    };
    start_coordinator(client, &coordinator_client(kind, client).await, config)
        .await
        .with_agents_client(agent_client(kind, client).await)
}

async fn the_backup(backups: &Api<ImageBackup>) -> Result<ImageBackup, String> {
    let list = backups.list(&Default::default()).await.map_err(|e| e.to_string())?;
    list.items.into_iter().find(|b| b.spec.source == SOURCE).ok_or_else(|| "no ImageBackup yet".to_string())
}

/// A workload on node-a running SOURCE, an agent there, and the coordinator
/// (giving up on a job after `max_attempts`), with the backup registry
/// behind a proxy with `faults`.
struct Scene {
    _cluster: image_backup_tests::cluster::ClusterGuard,
    client: kube::Client,
    w: Workloads,
    image: TestImage,
    _registry: Registry,
    proxy: Proxy,
    _node: Containerd,
    coordinator: Coordinator,
}

impl Scene {
    async fn new(kind: ApiServerKind, faults: Faults, max_attempts: u32) -> Option<Self> {
        init_tracing();
        let (cluster, client) = cluster(kind).await?;
        prepare(&client, &["shop", "image-backup"]).await;
        let registry = Registry::start(RegistryAuth::None).await.unwrap();
        let proxy = Proxy::start(&registry.host(), faults).await.unwrap();
        let node = Containerd::start().await.unwrap();
        let image = TestImage::single(MediaTypes::Oci, &[256 << 10], 41);
        image.import(&node, SOURCE, &[], &[]).await.unwrap();
        let w = Workloads { client: client.clone() };
        let spec = [("web", SOURCE, image.digest(), false)];
        w.deploy("Deployment", "shop", "web", json!({}), &spec, Placement { nodes: &["node-a"], ready: true }).await;
        let coordinator = start(kind, &client, &proxy.host(), false, max_attempts).await;
        start_agent(&node, "node-a", &coordinator, quick_retries(&proxy.host(), Duration::from_millis(300))).await;
        Some(Self { _cluster: cluster, client, w, image, _registry: registry, proxy, _node: node, coordinator })
    }

    async fn backup(&self) -> Result<ImageBackup, String> {
        the_backup(&Api::all(self.client.clone())).await
    }

    /// Notes of BackupFailed events on the ImageBackup.
    async fn failed_events(&self, name: &str) -> Result<Vec<String>, String> {
        let events =
            Api::<Event>::all(self.client.clone()).list(&Default::default()).await.map_err(|e| e.to_string())?;
        Ok(events
            .items
            .into_iter()
            .filter(|e| e.reason.as_deref() == Some("BackupFailed"))
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter_map(|e| e.note)
            .collect())
    }
}

on_both_api_servers!(outage: a_registry_outage_is_waited_out_on_the_emulator, a_registry_outage_is_waited_out_on_a_real_api_server);

/// A backup registry that answers 503 to everything, for as long as it
/// takes: the job retries past its attempt limit under a Stalled condition
/// saying why, never fails, and completes once the registry is back, with
/// no one touching it.
async fn outage(kind: ApiServerKind) {
    let down = Faults { unavailable_every: Some(1), ..Faults::default() };
    let Some(s) = Scene::new(kind, down, 2).await else { return };
    eventually("the job is stalled, still retrying", Duration::from_secs(60), || async {
        let status = s.backup().await?.status.unwrap_or_default();
        let stalled = status.conditions.iter().find(|c| c.type_ == "Stalled" && c.status == "True");
        match stalled {
            Some(c) if status.failures >= 4 && c.message.contains("503") && c.message.contains("retrying in") => Ok(()),
            _ => Err(format!("{:?} after {} failure(s): {:?}", status.phase, status.failures, status.conditions)),
        }
    })
    .await;
    let backup = s.backup().await.unwrap();
    let status = backup.status.clone().unwrap_or_default();
    assert_ne!(status.phase, Phase::Failed, "an outage is no reason to give up");
    assert!(status.attempts > 2, "past the attempt limit: {}", status.attempts);
    let name = backup.metadata.name.clone().unwrap();
    assert_eq!(s.failed_events(&name).await.unwrap(), Vec::<String>::new());
    assert_eq!(s.w.images("Deployment", "shop", "web").await, (vec![SOURCE.to_string()], None));
    let stalled = || metric(&s.coordinator.metrics_url, "image_backup_stalled_jobs");
    assert_eq!(stalled().await, Ok(1.0), "the alert's series");

    // The registry is back: the copy completes, the mark goes, the workload
    // moves to its backup.
    s.proxy.set_faults(Faults::default());
    let pinned = format!("{}/backup/quay.io/team/web@{}", s.proxy.host(), s.image.digest());
    eventually("the workload runs its backup", Duration::from_secs(60), || async {
        let (images, _) = s.w.images("Deployment", "shop", "web").await;
        if images == [pinned.clone()] { Ok(()) } else { Err(format!("{images:?}")) }
    })
    .await;
    let status = s.backup().await.unwrap().status.unwrap_or_default();
    assert_eq!(status.phase, Phase::Completed);
    assert!(status.conditions.iter().all(|c| c.type_ != "Stalled"), "{:?}", status.conditions);
    assert_eq!(stalled().await, Ok(0.0));
}

on_both_api_servers!(refusing_registry: a_refusing_registry_fails_the_job_on_the_emulator, a_refusing_registry_fails_the_job_on_a_real_api_server);

/// A registry whose policy refuses the push (403) fails the job at once,
/// with the reason and an Event, and the workload stays as it is.
async fn refusing_registry(kind: ApiServerKind) {
    let refusing = Faults { refuse_uploads: true, ..Faults::default() };
    let Some(s) = Scene::new(kind, refusing, 5).await else { return };
    eventually("the job fails for good", Duration::from_secs(60), || async {
        let status = s.backup().await?.status.unwrap_or_default();
        if status.phase == Phase::Failed {
            Ok(())
        } else {
            Err(format!("{:?} after {} attempt(s)", status.phase, status.attempts))
        }
    })
    .await;
    let backup = s.backup().await.unwrap();
    let status = backup.status.clone().unwrap();
    assert_eq!(status.attempts, 1, "a refusal is not retried");
    let error = status.last_error.unwrap_or_default();
    assert!(error.contains("403") && error.contains(&s.proxy.host()), "the reason is in the status: {error}");
    assert!(status.backup_reference.is_none());

    // An Event says so where `kubectl describe` looks.
    let name = backup.metadata.name.clone().unwrap();
    eventually("a BackupFailed event", Duration::from_secs(10), || async {
        let notes = s.failed_events(&name).await?;
        if notes.iter().any(|n| n.contains("403")) { Ok(()) } else { Err(format!("{notes:?}")) }
    })
    .await;

    // No workload is ever patched to an image the backup registry lacks.
    assert_eq!(s.w.images("Deployment", "shop", "web").await, (vec![SOURCE.to_string()], None));
}

on_both_api_servers!(lost_agent: a_lost_agent_loses_its_job_on_the_emulator, a_lost_agent_loses_its_job_on_a_real_api_server);

/// A lost agent loses its job to another node; report-only leaves the
/// workload as it is.
async fn lost_agent(kind: ApiServerKind) {
    init_tracing();
    let Some((_cluster, client)) = cluster(kind).await else { return };
    prepare(&client, &["shop", "image-backup"]).await;
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    // Down at first, so the copy on node-a is still retrying when its agent
    // goes away.
    let proxy =
        Proxy::start(&registry.host(), Faults { unavailable_every: Some(1), ..Faults::default() }).await.unwrap();
    let (node_a, node_b) = (Containerd::start().await.unwrap(), Containerd::start().await.unwrap());
    let image = TestImage::single(MediaTypes::Oci, &[256 << 10, 128 << 10], 42);
    image.import(&node_a, SOURCE, &[], &[]).await.unwrap();
    image.import(&node_b, SOURCE, &[], &[]).await.unwrap();
    let w = Workloads { client: client.clone() };
    w.deploy(
        "Deployment",
        "shop",
        "web",
        json!({}),
        &[("web", SOURCE, image.digest(), false)],
        Placement { nodes: &["node-a", "node-b"], ready: true },
    )
    .await;

    let coordinator = start(kind, &client, &proxy.host(), true, 5).await;
    let metrics_url = coordinator.metrics_url.clone();
    let backups: Api<ImageBackup> = Api::all(client.clone());
    eventually("the job waits for an agent, saying so", Duration::from_secs(30), || async {
        let status = the_backup(&backups).await?.status.unwrap_or_default();
        let message = status.message.unwrap_or_default();
        let waiting = status.phase == Phase::Pending && message.contains("no connected agent");
        if waiting { Ok(()) } else { Err(format!("{:?}: {message}", status.phase)) }
    })
    .await;
    let agent_a =
        start_agent(&node_a, "node-a", &coordinator, quick_retries(&proxy.host(), Duration::from_secs(60))).await;
    let backups: Api<ImageBackup> = Api::all(client.clone());
    eventually("node-a copies", Duration::from_secs(30), || async {
        let status = the_backup(&backups).await?.status.unwrap_or_default();
        let busy = matches!(status.phase, Phase::Assigned | Phase::Pushing) && status.node.as_deref() == Some("node-a");
        if busy { Ok(()) } else { Err(format!("{:?} on {:?}", status.phase, status.node)) }
    })
    .await;

    // node-a's agent disappears mid-copy; node-b's is there and the registry
    // is back.
    start_agent(&node_b, "node-b", &coordinator, quick_retries(&proxy.host(), Duration::from_secs(60))).await;
    agent_a.abort();
    proxy.set_faults(Faults::default());

    eventually("node-b completes the copy", Duration::from_secs(60), || async {
        let status = the_backup(&backups).await?.status.unwrap_or_default();
        let done = status.phase == Phase::Completed && status.node.as_deref() == Some("node-b");
        if done { Ok(()) } else { Err(format!("{:?} on {:?}: {:?}", status.phase, status.node, status.last_error)) }
    })
    .await;
    let status = the_backup(&backups).await.unwrap().status.unwrap();
    assert!(status.attempts >= 2, "a second attempt, on another node");
    let pinned = format!("{}/backup/quay.io/team/web@{}", proxy.host(), image.digest());
    assert_eq!(status.backup_reference.as_deref(), Some(pinned.as_str()));
    assert_eq!(
        registry.manifest("backup/quay.io/team/web", "3").await.unwrap().expect("tagged").digest,
        image.digest()
    );

    // Report-only: everything but the patch. The coordinator got as far as
    // the patch, left it out, and says so on the ImageBackup.
    eventually("the patch left out", Duration::from_secs(30), || async {
        metric(&metrics_url, "image_backup_workload_patches_total{outcome=\"report_only\"}").await.map(|_| ())
    })
    .await;
    assert_eq!(w.images("Deployment", "shop", "web").await, (vec![SOURCE.to_string()], None));
    eventually("the ImageBackup names the workload it would move", Duration::from_secs(30), || async {
        let status = the_backup(&backups).await?.status.unwrap_or_default();
        let noted = status.workloads.iter().any(|n| n.workload == "Deployment/shop/web" && n.reason == "ReportOnly");
        if noted { Ok(()) } else { Err(format!("{:?}", status.workloads)) }
    })
    .await;
}
