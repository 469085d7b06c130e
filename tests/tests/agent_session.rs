//! The agent daemon against the coordinator's session service over real
//! gRPC, with real containerd and a real registry: registration, inventory,
//! an assignment that lands in the registry, and a coordinator restart.

use std::{sync::Arc, time::Duration};

use apiserver_emulator::ApiServer;
use image_backup_agent::{guard::Guard, link::CoordinatorLink};
use image_backup_coordinator::{
    agents::{AgentHub, AgentSessions},
    jobs::LiveJobs,
    trust::agents::AgentAuthenticator,
};
use image_backup_core::job::Outcome;
use image_backup_oci::BackupTarget;
use image_backup_oci::registry::RegistryConfig;
use image_backup_proto::v1::{Assignment, agent_service_server::AgentServiceServer};
use image_backup_tests::{
    Containerd, MediaTypes, Registry, RegistryAuth, TestImage,
    cluster::{Placement, Workloads, coordinator_config, eventually, prepare},
    containerd::NAMESPACE,
    identity::{agent_token, write_token},
    init_tracing,
    run::{AgentLink, start_agent_on},
};
use kube::Client;
use serde_json::json;
use tokio::sync::oneshot;

const MB: usize = 1 << 20;

/// Serves the coordinator's AgentService on `addr` until `stop` fires,
/// checking agents' tokens with `client`'s API server.
async fn serve(hub: Arc<AgentHub>, client: Client, listener: tokio::net::TcpListener, stop: oneshot::Receiver<()>) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let config = coordinator_config("unused:5000");
    let auth = Arc::new(AgentAuthenticator::new(client, config.agents));
    tonic::transport::Server::builder()
        .add_service(AgentServiceServer::new(AgentSessions::new(hub, auth)))
        .serve_with_incoming_shutdown(incoming, async {
            let _ = stop.await;
        })
        .await
        .expect("serve AgentService");
}

/// What the agents reported of `job` so far, once it has ended.
async fn outcome(jobs: &LiveJobs, job: &str) -> Outcome {
    let mut ended = None;
    eventually(&format!("{job} ends"), Duration::from_secs(30), || {
        ended = jobs.get(job).and_then(|live| live.outcome);
        std::future::ready(ended.is_some().then_some(()).ok_or_else(|| format!("{:?}", jobs.get(job))))
    })
    .await;
    ended.expect("checked above")
}

/// Waits until the hub knows a node that holds `digest`.
async fn held(hub: &AgentHub, digest: &str) {
    eventually(&format!("an agent holds {digest}"), Duration::from_secs(30), || {
        let free = hub.holdings(digest).agents.iter().any(|h| h.free && h.root);
        std::future::ready(free.then_some(()).ok_or_else(|| format!("{:?}", hub.agents())))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_assigned_copy_lands_in_the_registry_and_the_agent_survives_a_coordinator_restart() {
    init_tracing();
    let containerd = Containerd::start().await.unwrap();
    let registry = Registry::start(RegistryAuth::None).await.unwrap();
    let image = TestImage::single(MediaTypes::Oci, &[2 * MB, MB], 21);
    image.import(&containerd, "docker.io/library/web:2", &[], &[]).await.unwrap();

    let api = ApiServer::start().await.unwrap();
    let client = api.client().await.unwrap();
    prepare(&client, &["apps"]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let jobs = Arc::new(LiveJobs::new().0);
    let hub = AgentHub::new("coordinator-a", Duration::from_secs(1), jobs.clone());
    let (stop, stopped) = oneshot::channel();
    let server = tokio::spawn(serve(hub.clone(), client.clone(), listener, stopped));
    let registry_config = RegistryConfig { insecure_hosts: vec![registry.host()], ..RegistryConfig::default() };
    // In plain text: this test serves the bare AgentService.
    let files = Arc::new(tempfile::tempdir().unwrap());
    let token = write_token(files.path(), "node-a", &agent_token(&client, "node-a").await);
    let backup = BackupTarget { registry: registry.host(), prefix: "mirror".into() };
    let guard = Guard::new(backup, "node-a", Some(client.clone()));
    let link = CoordinatorLink::new(format!("http://{addr}"), None, Some(token)).unwrap();
    let link = AgentLink { link, files, guard };
    // The node's pod that runs the image (the agent copies nothing else).
    let at = Placement { nodes: &["node-a"], ready: true };
    let spec = [("web", "docker.io/library/web:2", image.digest(), false)];
    Workloads { client: client.clone() }.deploy("Deployment", "apps", "web", json!({}), &spec, at).await;
    let _agent = start_agent_on(&containerd.socket(), NAMESPACE, "node-a", link, registry_config, 2).await;

    held(&hub, image.digest()).await;
    let agents = hub.agents();
    assert_eq!(agents.len(), 1);
    assert_eq!((agents[0].node_name.as_str(), agents[0].max_jobs), ("node-a", 2));
    let holdings = hub.holdings(image.digest());
    let holders: Vec<(&str, &str)> = holdings.agents.iter().map(|h| (h.agent_id.as_str(), h.node.as_str())).collect();
    assert_eq!(holders, [("agent-node-a", "node-a")]);
    let nobody = hub.holdings("sha256:0000000000000000000000000000000000000000000000000000000000000000");
    assert!(nobody.agents.is_empty());

    let target = format!("{}/mirror/docker.io/library/web:2", registry.host());
    hub.assign(
        "agent-node-a",
        Assignment {
            job_id: "job-1".into(),
            source: "docker.io/library/web:2".into(),
            digest: image.digest().into(),
            target: target.clone(),
            attempt: 1,
            ..Assignment::default()
        },
    )
    .unwrap();
    match outcome(&jobs, "job-1").await {
        Outcome::Success(success) => {
            assert_eq!(success.digest, image.digest());
            assert_eq!(
                success.pinned_reference,
                format!("{}/mirror/docker.io/library/web@{}", registry.host(), image.digest())
            );
        }
        other => panic!("expected success, got {other:?}"),
    }
    let served =
        registry.manifest("mirror/docker.io/library/web", "2").await.unwrap().expect("manifest in the registry");
    assert_eq!(served.digest, image.digest());

    // The inventory follows containerd: an image the kubelet pulls now is
    // listed moments later, though offered for copies only once a pod of
    // the node runs it.
    let pulled = TestImage::single(MediaTypes::Oci, &[64 << 10], 22);
    let before = hub.agents().first().map_or(0, |a| a.images);
    pulled.import(&containerd, "docker.io/library/new:1", &[], &[]).await.unwrap();
    eventually("the new image is listed", Duration::from_secs(30), || {
        let listed = hub.agents().first().is_some_and(|a| a.images > before);
        std::future::ready(if listed { Ok(()) } else { Err(format!("{:?}", hub.agents())) })
    })
    .await;
    assert!(hub.holdings(pulled.digest()).agents.is_empty(), "no pod of the node runs it yet");

    // An assignment for an image no pod of the node runs, or to a place
    // other than the backup location, is refused with a clear, final error.
    let refusals = [
        (
            "job-2",
            "docker.io/library/new:1",
            pulled.digest(),
            format!("{}/mirror/docker.io/library/new:1", registry.host()),
        ),
        ("job-4", "docker.io/library/web:2", image.digest(), format!("{}/elsewhere/web:2", registry.host())),
    ];
    for (job, source, digest, target) in refusals {
        let assignment = Assignment {
            job_id: job.into(),
            source: source.into(),
            digest: digest.into(),
            target,
            attempt: 1,
            ..Assignment::default()
        };
        hub.assign("agent-node-a", assignment).unwrap();
        match outcome(&jobs, job).await {
            Outcome::Failure(failure) => {
                assert!(failure.message.starts_with("refused: "), "{}", failure.message);
                assert!(!failure.retryable);
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(registry.manifest("mirror/docker.io/library/new", "1").await.unwrap().is_none(), "nothing was pushed");
    let spec = [("new", "docker.io/library/new:1", pulled.digest(), false)];
    let at = Placement { nodes: &["node-a"], ready: true };
    Workloads { client: client.clone() }.deploy("Deployment", "apps", "new", json!({}), &spec, at).await;
    held(&hub, pulled.digest()).await;

    // An agent silent past the heartbeat deadline is dropped with the jobs
    // it was running, for the controller to move elsewhere.
    hub.assign(
        "agent-node-a",
        Assignment {
            job_id: "job-3".into(),
            source: "docker.io/library/web:2".into(),
            digest: image.digest().into(),
            target,
            attempt: 1,
            ..Assignment::default()
        },
    )
    .unwrap();
    assert_eq!(hub.expire(Duration::ZERO), 1);
    match outcome(&jobs, "job-3").await {
        Outcome::Lost(why) => assert!(why.contains("agent-node-a on node node-a"), "{why}"),
        other => panic!("expected the job lost with its agent, got {other:?}"),
    }
    assert!(hub.agents().is_empty());
    assert_eq!(hub.holdings(image.digest()), Default::default());

    // The coordinator goes away and comes back on the same address: the
    // agent reconnects and registers again with its inventory.
    hub.close_sessions();
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), server).await.expect("coordinator stops").unwrap();
    let hub = AgentHub::new("coordinator-b", Duration::from_secs(1), Arc::new(LiveJobs::new().0));
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let (_stop, stopped) = oneshot::channel();
    tokio::spawn(serve(hub.clone(), client, listener, stopped));
    held(&hub, image.digest()).await;
}
