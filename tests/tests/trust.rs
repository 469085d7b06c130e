//! Who may talk to the coordinator, against its real gRPC port and tokens,
//! TokenReviews and SubjectAccessReviews of the API server (the emulator,
//! and a real kube-apiserver when one is given): agents only with the token
//! bound to their own pod, for the node that pod runs on; reports only from
//! the agent holding a job's current attempt; no oversized message; JobService
//! only for callers RBAC allows; TLS only, with the published CA.

use std::{sync::Arc, time::Duration};

use image_backup_coordinator::{
    agents::{AgentHub, AgentSessions},
    grpc::MAX_AGENT_MESSAGE,
    jobs::LiveJobs,
    trust::agents::AgentAuthenticator,
};
use image_backup_core::job::Outcome;
use image_backup_proto::v1::{
    Assignment, Heartbeat, Inventory, InventoryImage, JobFailure, JobProgress, JobResult, JobSuccess, ListJobsRequest,
    agent_message, agent_service_server::AgentServiceServer, coordinator_message, job_result,
    job_service_client::JobServiceClient,
};
use image_backup_tests::{
    cluster::{ApiServerKind, ClusterGuard, cluster, coordinator_client, coordinator_config, eventually, prepare},
    identity::{self, agent_token, bound_token},
    init_tracing, on_both_api_servers,
    run::{Coordinator, reader_token, start_coordinator, with_token},
    session::{Session, message},
};
use k8s_openapi::api::core::v1::Pod;
use kube::{Api, Client, api::DeleteParams};
use tonic::{Code, Status, transport::Channel};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
/// The API server's own audience, which agent sessions must not accept.
const API_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// Opens a session as the agent of `node` presenting `token`.
async fn open(channel: &Channel, token: Option<&str>, node: &str) -> Result<Session, Status> {
    Session::open(channel, token, node).await
}

fn refused(result: Result<Session, Status>) -> Status {
    match result {
        Ok(_) => panic!("the session was accepted"),
        Err(status) => status,
    }
}

/// The API server, prepared, and the coordinator's client on it.
async fn setup(kind: ApiServerKind) -> Option<(ClusterGuard, Client, Client)> {
    init_tracing();
    let (guard, admin) = cluster(kind).await?;
    prepare(&admin, &[]).await;
    let client = coordinator_client(kind, &admin).await;
    Some((guard, admin, client))
}

on_both_api_servers!(agents_need_the_token_of_their_own_pod_on_their_own_node: agent_tokens_on_the_emulator, agent_tokens_on_a_real_api_server);

async fn agents_need_the_token_of_their_own_pod_on_their_own_node(kind: ApiServerKind) {
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let coordinator = start_coordinator(&admin, &client, coordinator_config("127.0.0.1:1")).await;
    let channel = coordinator.channel().await;

    let status = refused(open(&channel, None, "node-a").await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("no bearer token"), "{status}");

    let status = refused(open(&channel, Some("not-a-token"), "node-a").await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");

    // The agent's own pod, but a token for the API server, not for us.
    let token = agent_token(&admin, "node-a").await;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), identity::AGENT_NAMESPACE);
    let pod = pods.get("agent-node-a").await.unwrap();
    let for_the_api = bound_token(&admin, &pod, API_AUDIENCE).await;
    let status = refused(open(&channel, Some(&for_the_api), "node-a").await);
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("audience image-backup.k8slab.io"), "{status}");

    // A pod of another ServiceAccount, with our audience.
    let intruder = identity::pod(&admin, "intruder", "intruder", "node-a", "pause", false).await;
    let other = bound_token(&admin, &intruder, image_backup_coordinator::trust::agents::DEFAULT_AUDIENCE).await;
    let status = refused(open(&channel, Some(&other), "node-a").await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("system:serviceaccount:image-backup:intruder's, not the agent"), "{status}");

    // The agent of node-a speaking for node-b.
    let status = refused(open(&channel, Some(&token), "node-b").await);
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("agent pod agent-node-a runs on node node-a, not on node-b"), "{status}");

    // Its own node: registered, under the pod's name whatever it calls itself.
    let mut session = open(&channel, Some(&token), "node-a").await.expect("the agent's own session");
    assert!(matches!(session.next().await, Some(coordinator_message::Message::Registered(_))));
    drop(session);

    // The pod is gone: its token opens nothing any more.
    pods.delete("agent-node-a", &DeleteParams::default().grace_period(0)).await.unwrap();
    eventually("the deleted pod's token is refused", Duration::from_secs(30), || async {
        match open(&channel, Some(&token), "node-a").await {
            Ok(_) => Err("accepted".to_string()),
            Err(status) if matches!(status.code(), Code::Unauthenticated | Code::PermissionDenied) => Ok(()),
            Err(status) => Err(status.to_string()),
        }
    })
    .await;
}

on_both_api_servers!(job_service_reads_need_rbac: job_service_on_the_emulator, job_service_on_a_real_api_server);

async fn job_service_reads_need_rbac(kind: ApiServerKind) {
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let coordinator = start_coordinator(&admin, &client, coordinator_config("127.0.0.1:1")).await;
    let mut jobs = JobServiceClient::new(coordinator.channel().await);

    let status = jobs.list_jobs(ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    let stranger = identity::pod(&admin, "stranger", "stranger", "node-a", "pause", false).await;
    let token = bound_token(&admin, &stranger, image_backup_coordinator::trust::agents::DEFAULT_AUDIENCE).await;
    let status = jobs.list_jobs(with_token(ListJobsRequest::default(), &token)).await.unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
    assert!(status.message().contains("may not inspect imagebackups.backup.k8slab.io"), "{status}");

    let reader = reader_token(&admin).await;
    reads_once_rbac_allows(&jobs, &reader).await;
}

on_both_api_servers!(reader_tokens_are_for_our_audience_and_a_watch_ends_with_its_access: reader_audience_on_the_emulator, reader_audience_on_a_real_api_server);

/// JobService takes only tokens made for the coordinator's audience, as
/// the TokenReview's answer confirms; a WatchJobs stream asks again as it
/// goes, and ends once its caller may no longer read.
async fn reader_tokens_are_for_our_audience_and_a_watch_ends_with_its_access(kind: ApiServerKind) {
    use image_backup_coordinator::{
        grpc::{JobFeed, Jobs},
        trust::{agents::DEFAULT_AUDIENCE, readers::Readers},
        workloads::usage::Usage,
    };
    use image_backup_proto::v1::{WatchJobsRequest, job_service_server::JobServiceServer};
    use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let readers = Arc::new(Readers::with_recheck(client, false, DEFAULT_AUDIENCE, Duration::from_secs(1)));
    let hub = AgentHub::new("coordinator-test", Duration::from_secs(30), Arc::new(LiveJobs::new().0));
    let (backups, _writer) = kube::runtime::reflector::store();
    let jobs = Jobs { backups, feed: JobFeed::new(Arc::new(Usage::default())), agents: hub, readers };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(JobServiceServer::new(jobs))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
    let jobs = JobServiceClient::new(channel);

    let reader = reader_token(&admin).await;
    reads_once_rbac_allows(&jobs, &reader).await;
    // The same reader, with a token the API server takes for itself.
    let everywhere = image_backup_tests::run::reader_token_for(&admin, &[]).await;
    let status = jobs.clone().list_jobs(with_token(ListJobsRequest::default(), &everywhere)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status}");
    assert!(status.message().contains("--audience image-backup.k8slab.io"), "{status}");

    let mut watch =
        jobs.clone().watch_jobs(with_token(WatchJobsRequest::default(), &reader)).await.unwrap().into_inner();
    Api::<ClusterRoleBinding>::all(admin.clone())
        .delete("image-backup-job-reader-test", &DeleteParams::default())
        .await
        .unwrap();
    let ended = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match watch.message().await {
                Ok(Some(_)) => continue,
                other => return other,
            }
        }
    })
    .await
    .expect("the watch ends once its caller may no longer read");
    let status = ended.expect_err("it ends with the reason");
    assert_eq!(status.code(), Code::PermissionDenied, "{status}");
}

on_both_api_servers!(only_tls_with_the_published_ca_connects: tls_on_the_emulator, tls_on_a_real_api_server);

async fn only_tls_with_the_published_ca_connects(kind: ApiServerKind) {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let coordinator: Coordinator = start_coordinator(&admin, &client, coordinator_config("127.0.0.1:1")).await;
    let plain = Endpoint::from_shared(format!("http://{}", coordinator.grpc)).unwrap().connect().await.unwrap();
    let status = JobServiceClient::new(plain).list_jobs(ListJobsRequest::default()).await.unwrap_err();
    assert_ne!(status.code(), Code::Unauthenticated, "plain text never reaches JobService: {status}");

    // A CA of someone else's.
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other_ca = params.self_signed(&key).unwrap().pem();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(other_ca));
    let endpoint = Endpoint::from_shared(coordinator.url()).unwrap().tls_config(tls).unwrap();
    assert!(endpoint.connect().await.is_err(), "a certificate that does not chain to the trusted CA");

    let ca = coordinator.ca().expect("TLS").to_string();
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let endpoint = Endpoint::from_shared(coordinator.url()).unwrap().tls_config(tls).unwrap();
    let status = JobServiceClient::new(endpoint.connect().await.unwrap())
        .list_jobs(ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "over TLS, JobService answers: {status}");
}

/// Serves the bare AgentService (plain text) over `hub`, checking tokens
/// with `client`'s API server.
async fn serve(hub: Arc<AgentHub>, client: Client) -> Channel {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let auth = Arc::new(AgentAuthenticator::new(client, coordinator_config("unused:1").agents));
    let service = AgentServiceServer::new(AgentSessions::new(hub, auth)).max_decoding_message_size(MAX_AGENT_MESSAGE);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap()
}

/// Waits until `agent`'s heartbeat saying it runs `marker` was handled:
/// everything it sent before has been, too.
async fn handled_up_to(session: &Session, hub: &AgentHub, agent: &str, marker: &str) {
    let beat = Heartbeat { running_job_ids: vec![marker.into()], ..Heartbeat::default() };
    session.send(agent_message::Message::Heartbeat(beat)).await;
    eventually(&format!("{agent} reports {marker}"), Duration::from_secs(10), || {
        let seen = hub.agents().iter().any(|a| a.agent_id == agent && a.running_jobs.iter().any(|j| j == marker));
        std::future::ready(if seen { Ok(()) } else { Err(format!("{:?}", hub.agents())) })
    })
    .await;
}

fn result(job: &str, attempt: u32, outcome: job_result::Outcome) -> agent_message::Message {
    agent_message::Message::Result(JobResult {
        job_id: job.into(),
        attempt,
        digest: DIGEST.into(),
        outcome: Some(outcome),
    })
}

on_both_api_servers!(reports_count_only_from_the_agent_holding_the_current_attempt: reports_on_the_emulator, reports_on_a_real_api_server);

async fn reports_count_only_from_the_agent_holding_the_current_attempt(kind: ApiServerKind) {
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let jobs = Arc::new(LiveJobs::new().0);
    let hub = AgentHub::new("coordinator-test", Duration::from_secs(30), jobs.clone());
    let channel = serve(hub.clone(), client).await;
    let mut a = open(&channel, Some(&agent_token(&admin, "node-a").await), "node-a").await.unwrap();
    let b = open(&channel, Some(&agent_token(&admin, "node-b").await), "node-b").await.unwrap();
    assert!(matches!(a.next().await, Some(coordinator_message::Message::Registered(_))));

    let assignment = Assignment { job_id: "job-1".into(), digest: DIGEST.into(), attempt: 2, ..Assignment::default() };
    hub.assign("agent-node-a", assignment).unwrap();
    assert!(matches!(a.next().await, Some(coordinator_message::Message::Assignment(_))));

    // Another agent's word on the job counts for nothing, nor does its
    // word on a job nobody holds.
    let forged = JobSuccess { digest: DIGEST.into(), ..JobSuccess::default() };
    b.send(result("job-1", 2, job_result::Outcome::Success(forged.clone()))).await;
    b.send(result("job-9", 1, job_result::Outcome::Success(forged))).await;
    handled_up_to(&b, &hub, "agent-node-b", "marker-b").await;
    assert_eq!(jobs.get("job-1").expect("job-1 is known").outcome, None);
    assert!(jobs.get("job-9").is_none(), "a report on a job nobody holds leaves nothing behind");

    // Its holder's word on an earlier attempt neither.
    let failure = JobFailure { message: "stale".into(), ..JobFailure::default() };
    a.send(result("job-1", 1, job_result::Outcome::Failure(failure))).await;
    handled_up_to(&a, &hub, "agent-node-a", "job-1").await;
    assert_eq!(jobs.get("job-1").unwrap().outcome, None);

    // The current attempt, from its holder: progress, then the result.
    let progress = JobProgress {
        job_id: "job-1".into(),
        attempt: 2,
        digest: DIGEST.into(),
        bytes_done: 5,
        bytes_total: 10,
        ..JobProgress::default()
    };
    a.send(agent_message::Message::Progress(progress)).await;
    let failure = JobFailure { message: "the registry said no".into(), ..JobFailure::default() };
    a.send(result("job-1", 2, job_result::Outcome::Failure(failure))).await;
    eventually("the holder's result counts", Duration::from_secs(10), || {
        let live = jobs.get("job-1").unwrap();
        let done = matches!(&live.outcome, Some(Outcome::Failure(f)) if f.message == "the registry said no");
        std::future::ready(if done && live.bytes_done == 5 { Ok(()) } else { Err(format!("{live:?}")) })
    })
    .await;
}

on_both_api_servers!(an_oversized_message_ends_the_session: oversized_on_the_emulator, oversized_on_a_real_api_server);

async fn an_oversized_message_ends_the_session(kind: ApiServerKind) {
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let hub = AgentHub::new("coordinator-test", Duration::from_secs(30), Arc::new(LiveJobs::new().0));
    let channel = serve(hub.clone(), client).await;
    let mut a = open(&channel, Some(&agent_token(&admin, "node-a").await), "node-a").await.unwrap();
    assert!(matches!(a.next().await, Some(coordinator_message::Message::Registered(_))));
    assert_eq!(hub.count(), 1);
    let huge = InventoryImage { name: "x".repeat(MAX_AGENT_MESSAGE + 1), digest: DIGEST.into(), ..Default::default() };
    let inventory = Inventory { full: true, added: vec![huge], removed: vec![] };
    let _ = a.sender().send(message(agent_message::Message::Inventory(inventory))).await;
    eventually("the session ends", Duration::from_secs(10), || {
        std::future::ready(if hub.count() == 0 { Ok(()) } else { Err(format!("{:?}", hub.agents())) })
    })
    .await;
    assert!(hub.holdings(DIGEST).agents.is_empty());
}

/// Waits until `token`'s holder lists jobs: RBAC reaches the API server's
/// authorizer through its own watch.
async fn reads_once_rbac_allows(jobs: &JobServiceClient<Channel>, token: &str) {
    eventually("the reader's RBAC takes effect", Duration::from_secs(30), || {
        let mut jobs = jobs.clone();
        let request = with_token(ListJobsRequest::default(), token);
        async move { jobs.list_jobs(request).await.map(|_| ()).map_err(|e| e.to_string()) }
    })
    .await;
}

/// A CA and a certificate for 127.0.0.1 it signed: (CA PEM, chain PEM, key PEM).
fn certificate(name: &str) -> (String, String, String) {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap().signed_by(&key, &issuer).unwrap();
    (ca_pem.clone(), format!("{}{ca_pem}", leaf.pem()), key.serialize_pem())
}

fn tls_secret(name: &str, (ca, chain, key): &(String, String, String)) -> k8s_openapi::api::core::v1::Secret {
    serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
        "metadata": {"name": name},
        "stringData": {"tls.crt": chain, "tls.key": key, "ca.crt": ca},
    }))
    .unwrap()
}

/// Whether a TLS client trusting only `ca` gets an answer from JobService.
async fn answers_trusting(coordinator: &Coordinator, ca: &str) -> bool {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
    let Ok(channel) = Endpoint::from_shared(coordinator.url()).unwrap().tls_config(tls).unwrap().connect().await else {
        return false;
    };
    // Any answer of JobService's own (here: a token is needed) means the
    // handshake held.
    JobServiceClient::new(channel)
        .list_jobs(ListJobsRequest::default())
        .await
        .is_err_and(|s| s.code() == Code::Unauthenticated)
}

on_both_api_servers!(a_tls_secret_is_served_and_its_renewal_picked_up: tls_secret_on_the_emulator, tls_secret_on_a_real_api_server);

async fn a_tls_secret_is_served_and_its_renewal_picked_up(kind: ApiServerKind) {
    use image_backup_coordinator::trust::tls::{TlsSettings, TlsSource};
    use k8s_openapi::api::core::v1::{ConfigMap, Secret};
    use kube::api::{Patch, PatchParams, PostParams};
    let Some((_guard, admin, client)) = setup(kind).await else { return };
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), "image-backup");
    let config_maps: Api<ConfigMap> = Api::namespaced(admin.clone(), "image-backup");
    // What another install left is not what this one publishes.
    let _ = config_maps.delete("image-backup-ca", &DeleteParams::default()).await;
    let _ = secrets.delete("coordinator-tls", &DeleteParams::default()).await;
    let first = certificate("cert-manager CA 1");
    secrets.create(&PostParams::default(), &tls_secret("coordinator-tls", &first)).await.unwrap();

    let tls = TlsSettings {
        source: TlsSource::Secret("coordinator-tls".into()),
        ca_config_map: "image-backup-ca".into(),
        namespace: "image-backup".into(),
    };
    let config =
        image_backup_coordinator::config::CoordinatorConfig { tls: Some(tls), ..coordinator_config("127.0.0.1:1") };
    let coordinator = start_coordinator(&admin, &client, config).await;
    assert_eq!(coordinator.ca(), Some(first.0.as_str()), "the Secret's CA is published for agents");
    assert!(answers_trusting(&coordinator, &first.0).await);

    // cert-manager renews, here with a new CA: new connections get the new
    // certificate, and agents the new CA.
    let second = certificate("cert-manager CA 2");
    let patch = serde_json::json!({"stringData": {"tls.crt": second.1, "tls.key": second.2, "ca.crt": second.0}});
    secrets.patch("coordinator-tls", &PatchParams::default(), &Patch::Merge(&patch)).await.unwrap();
    eventually("the renewed certificate is served and its CA published", Duration::from_secs(30), || async {
        let published = config_maps.get("image-backup-ca").await.map_err(|e| e.to_string())?;
        let published = published.data.and_then(|d| d.get("ca.crt").cloned()).unwrap_or_default();
        if published == second.0 && answers_trusting(&coordinator, &second.0).await {
            Ok(())
        } else {
            Err("not yet".to_string())
        }
    })
    .await;
    assert!(!answers_trusting(&coordinator, &first.0).await, "the old certificate is no longer served");
}
