//! The coordinator's gRPC port as people and tools see it: reflection lists
//! the services (what `grpcurl -plaintext HOST:PORT list` asks), health
//! answers, and JobService lists, gets and streams jobs.

use std::time::Duration;

use futures::StreamExt;
use std::sync::Arc;

use apiserver_emulator::ApiServer;
use image_backup_coordinator::{
    agents::{AgentHub, AgentSessions},
    grpc::{JobFeed, Jobs, grpc_routes},
    jobs::LiveJobs,
    relist::Seen,
    trust::{agents::AgentAuthenticator, readers::Readers},
    workloads::usage::{Usage, Use, WorkloadKey},
};
use image_backup_crds::{ImageBackup, ImageBackupSpec, ImageBackupStatus, Phase};
use image_backup_proto::v1::{
    GetJobRequest, JobPhase, ListAgentsRequest, ListJobsRequest, WatchJobsRequest, job_event,
    job_service_client::JobServiceClient,
};
use image_backup_tests::{
    cluster::{coordinator_config, prepare},
    identity::{self, agent_token},
    run::{reader_token, with_token},
};
use kube::{
    ResourceExt,
    runtime::{reflector, watcher},
};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

const NGINX: &str = "docker.io/library/nginx:1.25";
const REDIS: &str = "docker.io/library/redis:7";

fn name(source: &str) -> String {
    image_backup_crds::name_for(&image_backup_oci::ImageRef::parse(source).unwrap())
}

fn backup(source: &str, phase: Phase) -> ImageBackup {
    let mut backup = ImageBackup::new(&name(source), ImageBackupSpec { source: source.into(), digest: DIGEST.into() });
    backup.status = Some(ImageBackupStatus { phase, node: Some("node-a".into()), ..ImageBackupStatus::default() });
    backup
}

#[tokio::test]
async fn reflection_health_and_job_service() {
    let hub = AgentHub::new("coordinator-test", Duration::from_secs(10), Arc::new(LiveJobs::new().0));
    let usage = Arc::new(Usage::default());
    let web = WorkloadKey { kind: "Deployment", namespace: "shop".into(), name: "web".into() };
    usage.set(&web, [(name(NGINX), Use::Runs(DIGEST.to_string()))].into());
    let feed = JobFeed::new(usage);
    // What the ImageBackup watch would bring: each event goes to the store
    // and to the feed.
    let (store, mut writer) = reflector::store::<ImageBackup>();
    let mut seen = Seen::new(|backup: &ImageBackup| backup.name_any());
    let mut apply = |event: watcher::Event<ImageBackup>| {
        writer.apply_watcher_event(&event);
        for change in seen.observe(&event) {
            feed.publish(&change);
        }
    };
    apply(watcher::Event::Apply(backup(NGINX, Phase::Completed)));
    apply(watcher::Event::Apply(backup(REDIS, Phase::Pushing)));
    // Callers are judged by the API server's RBAC.
    let api = ApiServer::start().await.unwrap();
    let client = api.client().await.unwrap();
    prepare(&client, &[]).await;
    let readers =
        Arc::new(Readers::new(client.clone(), false, image_backup_coordinator::trust::agents::DEFAULT_AUDIENCE));
    let config = coordinator_config("unused:5000");
    let sessions = AgentSessions::new(hub.clone(), Arc::new(AgentAuthenticator::new(client.clone(), config.agents)));
    let routes =
        grpc_routes(Jobs { backups: store, feed: feed.clone(), agents: hub, readers }, sessions).await.unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();

    // grpcurl's `list`: reflection names every service.
    let mut reflection = ServerReflectionClient::new(channel.clone());
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut replies = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else { panic!("{reply:?}") };
    let mut services: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    services.sort();
    assert_eq!(
        services,
        [
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "imagebackup.v1.AgentService",
            "imagebackup.v1.JobService",
        ]
    );
    // grpcurl's `describe`: the file holding JobService resolves.
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::FileContainingSymbol("imagebackup.v1.JobService".into())),
    };
    let mut replies = reflection.server_reflection_info(futures::stream::iter([request])).await.unwrap().into_inner();
    let reply = replies.next().await.unwrap().unwrap();
    assert!(
        matches!(reply.message_response, Some(MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty())
    );

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "imagebackup.v1.JobService", "imagebackup.v1.AgentService"] {
        let status = health.check(HealthCheckRequest { service: service.into() }).await.unwrap().into_inner();
        assert_eq!(status.status, ServingStatus::Serving as i32, "{service:?}");
    }

    // Nobody reads jobs anonymously, nor with a token RBAC does not allow.
    let mut anonymous = JobServiceClient::new(channel.clone());
    let refused = anonymous.list_jobs(ListJobsRequest::default()).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(refused.message().contains("kubectl create token"), "{refused}");
    // An agent's token is for the coordinator, but RBAC lets no agent read.
    let agent = agent_token(&client, "node-a").await;
    let refused = anonymous.list_jobs(with_token(ListJobsRequest::default(), &agent)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(refused.message().contains("image-backup-agent may not inspect"), "{refused}");
    // A token for the API server itself is not for the coordinator.
    let pod = identity::pod(&client, "somebody", "somebody", "node-a", "pause", false).await;
    let other = identity::bound_token(&client, &pod, "https://kubernetes.default.svc.cluster.local").await;
    let refused = anonymous.list_jobs(with_token(ListJobsRequest::default(), &other)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(refused.message().contains("--audience image-backup.k8slab.io"), "{refused}");

    // A person bound to the job reader role reads everything.
    let token = reader_token(&client).await;
    let bearer: tonic::metadata::AsciiMetadataValue = format!("Bearer {token}").parse().unwrap();
    let mut jobs = JobServiceClient::with_interceptor(channel, move |mut request: tonic::Request<()>| {
        request.metadata_mut().insert("authorization", bearer.clone());
        Ok(request)
    });
    let all = jobs.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs;
    assert_eq!(all.iter().map(|j| j.source.as_str()).collect::<Vec<_>>(), [NGINX, REDIS]);
    let completed = jobs
        .list_jobs(ListJobsRequest { phases: vec![JobPhase::Completed as i32], ..ListJobsRequest::default() })
        .await
        .unwrap()
        .into_inner()
        .jobs;
    assert_eq!(completed.len(), 1);
    assert_eq!(completed[0].workloads, ["Deployment/shop/web"]);
    // By source, as a user would type it.
    let job = jobs.get_job(GetJobRequest { name: "redis:7".into() }).await.unwrap().into_inner();
    assert_eq!((job.name, job.phase), (name(REDIS), JobPhase::Pushing as i32));
    let missing = jobs.get_job(GetJobRequest { name: "absent".into() }).await.unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    assert!(jobs.list_agents(ListAgentsRequest {}).await.unwrap().into_inner().agents.is_empty());

    let mut watch = jobs.watch_jobs(WatchJobsRequest::default()).await.unwrap().into_inner();
    for expected in [NGINX, REDIS] {
        let event = watch.next().await.unwrap().unwrap();
        assert_eq!((event.r#type, event.job.unwrap().source.as_str()), (job_event::Type::Added as i32, expected));
    }
    apply(watcher::Event::Apply(backup(REDIS, Phase::Completed)));
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!(event.r#type, job_event::Type::Modified as i32);
    assert_eq!(event.job.unwrap().phase, JobPhase::Completed as i32);
    apply(watcher::Event::Delete(backup(NGINX, Phase::Completed)));
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((event.r#type, event.job.unwrap().source.as_str()), (job_event::Type::Deleted as i32, NGINX));

    // The watch fell behind and listed again: REDIS was deleted meanwhile,
    // and watchers hear of it although no Delete event came.
    apply(watcher::Event::Init);
    apply(watcher::Event::InitDone);
    let event = tokio::time::timeout(Duration::from_secs(5), watch.next()).await.unwrap().unwrap().unwrap();
    assert_eq!((event.r#type, event.job.unwrap().name), (job_event::Type::Deleted as i32, name(REDIS)));
    assert!(jobs.list_jobs(ListJobsRequest::default()).await.unwrap().into_inner().jobs.is_empty());
}
