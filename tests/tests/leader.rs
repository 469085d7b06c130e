//! Two coordinators on one API server (the emulator, and a real one when
//! given): one leads on the Lease and is the only one ready; killed in the
//! middle of a copy, the other takes over from what the API server holds,
//! the agent reaching it through a Service that follows readiness, and the
//! copy is not made twice. A leader cut off from the API server steps down
//! before the follower can take over.

use std::time::Duration;

use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::registry::RegistryConfig;
use image_backup_tests::{
    Containerd, Faults, MediaTypes, Proxy, Registry, RegistryAuth, TestImage,
    cluster::{
        ApiServerKind, Placement, Workloads, agent_client, cluster, coordinator_client, coordinator_client_through,
        coordinator_config, eventually, prepare,
    },
    identity, init_tracing, on_both_api_servers,
    run::{published_ca, start_agent, start_replica},
    service::{Endpoint, Service},
};
use k8s_openapi::api::coordination::v1::Lease;
use kube::Api;
use serde_json::json;

const SOURCE: &str = "quay.io/team/api:1";

on_both_api_servers!(a_follower_takes_over_a_copy_in_flight: takeover_on_the_emulator, takeover_on_a_real_api_server);

async fn a_follower_takes_over_a_copy_in_flight(kind: ApiServerKind) {
    init_tracing();
    let Some((_guard, admin)) = cluster(kind).await else { return };
    prepare(&admin, &["shop"]).await;
    let client = coordinator_client(kind, &admin).await;
    let backup_registry = Registry::start(RegistryAuth::None).await.unwrap();
    // Uploads wait until the test lets them go: the copy stays in flight.
    let proxy =
        Proxy::start(&backup_registry.host(), Faults { hold_uploads: true, ..Faults::default() }).await.unwrap();
    let node = Containerd::start().await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[1 << 20, 256 << 10], 81);
    image.import(&node, SOURCE, &[], &[]).await.unwrap();

    // The replicas' pods, which they label with their role (the Service
    // selects the leader's); nothing runs them here.
    for name in ["coordinator-a", "coordinator-b"] {
        identity::pod(&admin, name, "image-backup-coordinator", "node-a", "pause", false).await;
    }
    let config = coordinator_config(&proxy.host());
    let mut first = start_replica(&admin, &client, config.clone(), "coordinator-a").await;
    eventually("the first replica leads", Duration::from_secs(30), || async {
        if first.ready().await { Ok(()) } else { Err("not ready".to_string()) }
    })
    .await;
    let second = start_replica(&admin, &client, config.clone(), "coordinator-b").await;
    assert!(!second.ready().await, "a follower does not lead");
    eventually("each replica's pod says its role", Duration::from_secs(30), || async {
        let roles = (role(&admin, "coordinator-a").await, role(&admin, "coordinator-b").await);
        if roles == (Some("leader".into()), Some("follower".into())) { Ok(()) } else { Err(format!("{roles:?}")) }
    })
    .await;

    let endpoint = |replica: &image_backup_tests::run::Replica| Endpoint {
        grpc: replica.coordinator.grpc,
        readyz: replica.coordinator.metrics_url.replace("/metrics", "/readyz"),
    };
    let service = Service::start(vec![endpoint(&first), endpoint(&second)]).await.unwrap();
    let ca = published_ca(&admin, "image-backup", "image-backup-ca").await;
    let via_service =
        first.coordinator.behind(service.addr, Some(ca)).with_agents_client(agent_client(kind, &admin).await);
    let registry = RegistryConfig { insecure_hosts: vec![proxy.host()], ..RegistryConfig::default() };
    start_agent(&node, "node-a", &via_service, registry).await;
    let workloads = Workloads { client: admin.clone() };
    let at = Placement { nodes: &["node-a"], ready: true };
    workloads.deploy("Deployment", "shop", "api", json!({}), &[("api", SOURCE, image.digest(), false)], at).await;

    eventually("the copy is under way", Duration::from_secs(30), || {
        std::future::ready(if proxy.held() > 0 { Ok(()) } else { Err("no upload yet".to_string()) })
    })
    .await;
    first.kill();
    eventually("the follower leads", Duration::from_secs(30), || async {
        if second.ready().await { Ok(()) } else { Err("not ready".to_string()) }
    })
    .await;
    assert_eq!(role(&admin, "coordinator-b").await.as_deref(), Some("leader"), "the Service now selects it");
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "image-backup");
    let lease = leases.get("image-backup-coordinator").await.unwrap();
    assert_eq!(lease.spec.and_then(|s| s.holder_identity).as_deref(), Some("coordinator-b"));

    proxy.set_faults(Faults::default());
    let pinned = format!("{}/backup/quay.io/team/api@{}", proxy.host(), image.digest());
    eventually("the new leader patches the workload to the backup", Duration::from_secs(60), || async {
        let (images, _) = workloads.images("Deployment", "shop", "api").await;
        if images == [pinned.clone()] { Ok(()) } else { Err(format!("{images:?}")) }
    })
    .await;
    let backups: Api<ImageBackup> = Api::all(admin.clone());
    let backup = backups.list(&Default::default()).await.unwrap().items.into_iter().find(|b| b.spec.source == SOURCE);
    assert_eq!(backup.and_then(|b| b.status).map(|s| s.phase), Some(Phase::Completed));
    // The copy in flight was finished, not made again: each blob (two
    // layers, the config) went up once.
    assert_eq!(proxy.uploads(), 3);
    let served = backup_registry.manifest("backup/quay.io/team/api", image.digest()).await.unwrap();
    assert_eq!(served.map(|m| m.digest), Some(image.digest().to_string()));
}

/// The role label of a replica's pod.
async fn role(admin: &kube::Client, pod: &str) -> Option<String> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(admin.clone(), "image-backup");
    let pod = pods.get(pod).await.ok()?;
    pod.metadata.labels?.get(image_backup_coordinator::leader::ROLE_LABEL).cloned()
}

on_both_api_servers!(a_leader_cut_off_steps_down_before_the_follower_leads: cut_off_on_the_emulator, cut_off_on_a_real_api_server);

/// The leader's connection to the API server stops answering (its requests
/// hang, nothing is refused): it steps down within its renew deadline,
/// before its Lease can expire and the follower take over, so two
/// coordinators never act at once.
async fn a_leader_cut_off_steps_down_before_the_follower_leads(kind: ApiServerKind) {
    init_tracing();
    let Some((guard, admin)) = cluster(kind).await else { return };
    prepare(&admin, &["shop"]).await;
    let client = coordinator_client(kind, &admin).await;
    let (cut_off, proxy) = coordinator_client_through(kind, &admin, &guard).await;
    let config = coordinator_config("127.0.0.1:1");
    let first = start_replica(&admin, &cut_off, config.clone(), "coordinator-a").await;
    eventually("the first replica leads", Duration::from_secs(30), || async {
        if first.ready().await { Ok(()) } else { Err("not ready".to_string()) }
    })
    .await;
    let second = start_replica(&admin, &client, config, "coordinator-b").await;
    let leases: Api<Lease> = Api::namespaced(admin.clone(), "image-backup");
    let holder = || async {
        let lease = leases.get("image-backup-coordinator").await.unwrap();
        lease.spec.and_then(|s| s.holder_identity).unwrap_or_default()
    };
    assert_eq!(holder().await, "coordinator-a");

    proxy.stall();
    let cut = std::time::Instant::now();
    let (mut stepped_down, mut taken_over) = (None, None);
    while taken_over.is_none() && cut.elapsed() < Duration::from_secs(30) {
        if stepped_down.is_none() && !first.ready().await {
            stepped_down = Some(cut.elapsed());
        }
        if holder().await == "coordinator-b" {
            taken_over = Some(cut.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let taken_over = taken_over.expect("the follower takes the Lease over");
    let stepped_down = stepped_down.expect("the cut-off leader steps down");
    assert!(stepped_down < taken_over, "stepped down after {stepped_down:?}, taken over after {taken_over:?}");
    assert!(!first.ready().await, "and stays down");
    eventually("the follower leads", Duration::from_secs(30), || async {
        if second.ready().await { Ok(()) } else { Err("not ready".to_string()) }
    })
    .await;
}
