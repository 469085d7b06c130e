//! The coordinator's view of backup jobs for people and tools: JobService
//! (ListJobs, GetJob, ListAgents, WatchJobs) over the ImageBackup objects
//! the controller sees, plus gRPC health and server reflection so grpcurl
//! needs no .proto file. The API server stays the source of truth; the
//! board mirrors what the controller last read or wrote.

use std::{collections::BTreeMap, pin::Pin, sync::Arc};

use futures::Stream;
use image_backup_crds::{ImageBackup, Phase};
use image_backup_proto::v1::{
    Agent as ProtoAgent, GetJobRequest, Job, JobEvent, JobPhase, ListAgentsRequest, ListAgentsResponse,
    ListJobsRequest, ListJobsResponse, WatchJobsRequest, job_event, job_service_server::JobService,
};
use tokio::sync::{RwLock, broadcast};
use tonic::{Request, Response, Status};

use crate::agents::AgentHub;

/// Every job the controller knows, and a feed of their changes.
pub struct JobBoard {
    jobs: RwLock<BTreeMap<String, Job>>,
    changes: broadcast::Sender<JobEvent>,
}

impl JobBoard {
    pub fn new() -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Self { jobs: RwLock::default(), changes })
    }

    /// Records the current state of an ImageBackup.
    pub async fn upsert(&self, backup: &ImageBackup) {
        let job = to_job(backup);
        let mut jobs = self.jobs.write().await;
        let kind = match jobs.insert(job.name.clone(), job.clone()) {
            Some(previous) if previous == job => return,
            Some(_) => job_event::Type::Modified,
            None => job_event::Type::Added,
        };
        let _ = self.changes.send(JobEvent { r#type: kind as i32, job: Some(job) });
    }

    pub async fn remove(&self, name: &str) {
        if let Some(job) = self.jobs.write().await.remove(name) {
            let _ = self.changes.send(JobEvent { r#type: job_event::Type::Deleted as i32, job: Some(job) });
        }
    }

    pub async fn jobs(&self) -> Vec<Job> {
        self.jobs.read().await.values().cloned().collect()
    }
}

/// The ImageBackup phase as the gRPC enum.
pub fn proto_phase(phase: Phase) -> JobPhase {
    match phase {
        Phase::Pending => JobPhase::Pending,
        Phase::Assigned => JobPhase::Assigned,
        Phase::Pushing => JobPhase::Pushing,
        Phase::Completed => JobPhase::Completed,
        Phase::Failed => JobPhase::Failed,
    }
}

/// The phase name as ImageBackup statuses spell it.
pub fn phase_name(phase: i32) -> &'static str {
    match JobPhase::try_from(phase) {
        Ok(JobPhase::Pending) => "Pending",
        Ok(JobPhase::Assigned) => "Assigned",
        Ok(JobPhase::Pushing) => "Pushing",
        Ok(JobPhase::Completed) => "Completed",
        Ok(JobPhase::Failed) => "Failed",
        _ => "Unknown",
    }
}

fn timestamp(time: &k8s_openapi::jiff::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.as_second(), nanos: time.subsec_nanosecond() }
}

fn to_job(backup: &ImageBackup) -> Job {
    let status = backup.status.clone().unwrap_or_default();
    Job {
        name: backup.metadata.name.clone().unwrap_or_default(),
        source: backup.spec.source.clone(),
        digest: backup.spec.digest.clone(),
        phase: proto_phase(status.phase) as i32,
        node: status.node.unwrap_or_default(),
        agent_id: status.agent.unwrap_or_default(),
        attempt: status.attempts,
        bytes_done: status.bytes_done,
        bytes_total: status.bytes_total,
        backup_reference: status.backup_reference.unwrap_or_default(),
        last_error: status.last_error.unwrap_or_default(),
        workloads: status.workloads,
        created_at: backup.metadata.creation_timestamp.as_ref().map(|t| timestamp(&t.0)),
        updated_at: status.last_transition_time.as_ref().map(|t| timestamp(&t.0)),
        missing_platforms: status
            .missing_platforms
            .iter()
            .map(|p| {
                let mut parts = p.splitn(3, '/');
                image_backup_proto::v1::Platform {
                    os: parts.next().unwrap_or_default().into(),
                    architecture: parts.next().unwrap_or_default().into(),
                    variant: parts.next().unwrap_or_default().into(),
                }
            })
            .collect(),
    }
}

fn matches(job: &Job, phases: &[i32], node: &str, source_contains: &str) -> bool {
    (phases.is_empty() || phases.contains(&job.phase))
        && (node.is_empty() || job.node == node)
        && (source_contains.is_empty() || job.source.contains(source_contains))
}

fn system_time(time: std::time::SystemTime) -> prost_types::Timestamp {
    time.into()
}

/// JobService over the board and the agent hub.
#[derive(Clone)]
pub struct Jobs {
    pub board: Arc<JobBoard>,
    pub agents: Arc<AgentHub>,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let filter = request.into_inner();
        let jobs = self
            .board
            .jobs()
            .await
            .into_iter()
            .filter(|job| matches(job, &filter.phases, &filter.node, &filter.source_contains))
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let wanted = request.into_inner().name;
        if wanted.is_empty() {
            return Err(Status::invalid_argument("name is required: an ImageBackup name or a source reference"));
        }
        // A source reference is normalized the way ImageBackups record it.
        let as_source = image_backup_oci::ImageRef::parse(&wanted).ok().map(|r| r.to_string());
        let jobs = self.board.jobs.read().await;
        jobs.get(&wanted)
            .or_else(|| jobs.values().find(|job| Some(&job.source) == as_source.as_ref() || job.source == wanted))
            .cloned()
            .map(Response::new)
            .ok_or_else(|| Status::not_found(format!("no backup job named or for {wanted:?}")))
    }

    async fn list_agents(&self, _: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        let agents = self
            .agents
            .agents()
            .into_iter()
            .map(|a| ProtoAgent {
                agent_id: a.agent_id,
                node_name: a.node_name,
                version: a.version,
                platform: a.platform,
                connected_at: Some(system_time(a.connected_at)),
                last_heartbeat: Some(system_time(a.last_heartbeat)),
                running_job_ids: a.running_jobs,
                max_concurrent_jobs: a.max_jobs,
                images: u32::try_from(a.images).unwrap_or(u32::MAX),
            })
            .collect();
        Ok(Response::new(ListAgentsResponse { agents }))
    }

    type WatchJobsStream = WatchStream;

    /// The current jobs as ADDED, then every change, until the client goes.
    async fn watch_jobs(&self, request: Request<WatchJobsRequest>) -> Result<Response<WatchStream>, Status> {
        let phases = request.into_inner().phases;
        // Subscribe before the snapshot so no change falls between them.
        let mut changes = self.board.changes.subscribe();
        let snapshot = self.board.jobs().await;
        let stream = async_stream::stream! {
            for job in snapshot {
                if phases.is_empty() || phases.contains(&job.phase) {
                    yield Ok(JobEvent { r#type: job_event::Type::Added as i32, job: Some(job) });
                }
            }
            loop {
                match changes.recv().await {
                    Ok(event) => {
                        let phase = event.job.as_ref().map_or(0, |j| j.phase);
                        if phases.is_empty() || phases.contains(&phase) {
                            yield Ok(event);
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        yield Err(Status::data_loss(format!("watcher fell {missed} changes behind; watch again")));
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Every gRPC service of the coordinator on one router: AgentService,
/// JobService, grpc.health.v1 and server reflection (v1 and v1alpha, as
/// grpcurl versions differ in which they ask).
pub async fn grpc_routes(
    board: Arc<JobBoard>,
    agents: Arc<AgentHub>,
) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    use image_backup_proto::v1::{agent_service_server::AgentServiceServer, job_service_server::JobServiceServer};
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<Jobs>>().await;
    health.set_serving::<AgentServiceServer<crate::agents::AgentSessions>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(image_backup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(image_backup_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    let mut routes = tonic::service::Routes::new(health_service);
    routes = routes
        .add_service(reflection)
        .add_service(reflection_alpha)
        .add_service(AgentServiceServer::new(crate::agents::AgentSessions(agents.clone())))
        .add_service(JobServiceServer::new(Jobs { board, agents }));
    Ok(routes)
}
