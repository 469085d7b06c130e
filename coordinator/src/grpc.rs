//! The coordinator's view of backup jobs for people and tools: JobService
//! (ListJobs, GetJob, ListAgents, WatchJobs) over the ImageBackup objects
//! the controller sees, plus gRPC health and server reflection so grpcurl
//! needs no .proto file. Jobs are read from the ImageBackup reflector
//! store the controller uses, so a deleted ImageBackup is gone here too.

use std::{pin::Pin, sync::Arc};

use futures::Stream;
use image_backup_crds::{ImageBackup, Phase};
use image_backup_oci::media::PlatformName;
use image_backup_proto::v1::{
    Agent as ProtoAgent, GetJobRequest, Job, JobEvent, JobPhase, JobPlatform, ListAgentsRequest, ListAgentsResponse,
    ListJobsRequest, ListJobsResponse, WatchJobsRequest, job_event, job_service_server::JobService,
};
use kube::{ResourceExt, runtime::reflector::Store};
use tokio::sync::broadcast;
use tonic::{Request, Response, Status};

use crate::{
    agents::{AgentHub, AgentSessions},
    relist::Change,
    trust::readers::Readers,
    workloads::usage::Usage,
};

/// Largest agent message: a full inventory of a node with thousands of
/// images fits; anything larger is refused before it is read.
pub const MAX_AGENT_MESSAGE: usize = 16 << 20;
/// Largest JobService request (a few filters).
const MAX_READ_REQUEST: usize = 64 << 10;

/// Changes of ImageBackups for WatchJobs, fed from the ImageBackup watch
/// (deletions included, which a reconciler never sees).
pub struct JobFeed {
    changes: broadcast::Sender<JobEvent>,
    usage: Arc<Usage>,
}

// === impl JobFeed ===

impl JobFeed {
    pub fn new(usage: Arc<Usage>) -> Arc<Self> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Self { changes, usage })
    }

    /// Publishes what the ImageBackup watch changed.
    pub fn publish(&self, change: &Change<'_, ImageBackup, String>) {
        // Every status write passes here: build nothing nobody watches.
        if self.changes.receiver_count() == 0 {
            return;
        }
        let event = match change {
            Change::Added(backup) => {
                JobEvent { r#type: job_event::Type::Added as i32, job: Some(to_job(backup, &self.usage)) }
            }
            Change::Modified(backup) => {
                JobEvent { r#type: job_event::Type::Modified as i32, job: Some(to_job(backup, &self.usage)) }
            }
            Change::Deleted(_, Some(backup)) => {
                JobEvent { r#type: job_event::Type::Deleted as i32, job: Some(to_job(backup, &self.usage)) }
            }
            // Gone while the watch was away: only its name is left.
            Change::Deleted(name, None) => JobEvent {
                r#type: job_event::Type::Deleted as i32,
                job: Some(Job { name: name.clone(), ..Job::default() }),
            },
        };
        // No subscriber is not an error.
        let _ = self.changes.send(event);
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

fn timestamp(time: &k8s_openapi::jiff::Timestamp) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: time.as_second(), nanos: time.subsec_nanosecond() }
}

fn to_job(backup: &ImageBackup, usage: &Usage) -> Job {
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
        workloads: usage.workloads_of(&backup.name_any()).iter().map(ToString::to_string).collect(),
        created_at: backup.metadata.creation_timestamp.as_ref().map(|t| timestamp(&t.0)),
        updated_at: status.last_transition_time.as_ref().map(|t| timestamp(&t.0)),
        missing_platforms: status
            .platforms
            .iter()
            .filter(|p| p.copied_from.is_none())
            .map(|p| {
                let name = PlatformName::parse(&p.platform);
                let (os, architecture, variant) = name.parts();
                image_backup_proto::v1::Platform {
                    os: os.into(),
                    architecture: architecture.into(),
                    variant: variant.into(),
                }
            })
            .collect(),
        platforms: status
            .platforms
            .iter()
            .map(|p| JobPlatform {
                platform: p.platform.clone(),
                digest: p.digest.clone(),
                attestation: p.attestation,
                copied_from: p.copied_from.clone().unwrap_or_default(),
            })
            .collect(),
        reduced: status.reduced,
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

/// JobService over the ImageBackup store, the agent hub and the usage
/// index.
#[derive(Clone)]
pub struct Jobs {
    pub backups: Store<ImageBackup>,
    pub feed: Arc<JobFeed>,
    pub agents: Arc<AgentHub>,
    /// Who may call: every method checks first.
    pub readers: Arc<Readers>,
}

impl Jobs {
    fn jobs(&self) -> Vec<Job> {
        let mut jobs: Vec<Job> = self.backups.state().iter().map(|b| to_job(b, &self.feed.usage)).collect();
        jobs.sort_by(|a, b| a.name.cmp(&b.name));
        jobs
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl JobService for Jobs {
    async fn list_jobs(&self, request: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        self.readers.check(request.metadata()).await?;
        let filter = request.into_inner();
        let jobs = self
            .jobs()
            .into_iter()
            .filter(|job| matches(job, &filter.phases, &filter.node, &filter.source_contains))
            .collect();
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        self.readers.check(request.metadata()).await?;
        let wanted = request.into_inner().name;
        if wanted.is_empty() {
            return Err(Status::invalid_argument("name is required: an ImageBackup name or a source reference"));
        }
        // A source reference is normalized the way ImageBackups record it.
        let by_source = image_backup_oci::ImageRef::parse(&wanted).ok().map(|r| image_backup_crds::name_for(&r));
        [Some(wanted.clone()), by_source]
            .into_iter()
            .flatten()
            .find_map(|name| self.backups.get(&kube::runtime::reflector::ObjectRef::new(&name)))
            .map(|backup| Response::new(to_job(&backup, &self.feed.usage)))
            .ok_or_else(|| Status::not_found(format!("no backup job named or for {wanted:?}")))
    }

    async fn list_agents(&self, request: Request<ListAgentsRequest>) -> Result<Response<ListAgentsResponse>, Status> {
        self.readers.check(request.metadata()).await?;
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
        self.readers.check(request.metadata()).await?;
        // Asked again as the stream goes on: a caller whose token expired
        // or whose access was taken away stops getting jobs.
        let (readers, metadata) = (self.readers.clone(), request.metadata().clone());
        let phases = request.into_inner().phases;
        // Subscribe before the snapshot so no change falls between them.
        let mut changes = self.feed.changes.subscribe();
        let snapshot = self.jobs();
        let stream = async_stream::stream! {
            for job in snapshot {
                if phases.is_empty() || phases.contains(&job.phase) {
                    yield Ok(JobEvent { r#type: job_event::Type::Added as i32, job: Some(job) });
                }
            }
            let mut recheck = tokio::time::interval_at(
                tokio::time::Instant::now() + readers.recheck_every(),
                readers.recheck_every(),
            );
            loop {
                let received = tokio::select! {
                    received = changes.recv() => received,
                    _ = recheck.tick() => match readers.check(&metadata).await {
                        Ok(()) => continue,
                        Err(status) => {
                            yield Err(status);
                            break;
                        }
                    },
                };
                match received {
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
    jobs: Jobs,
    sessions: AgentSessions,
) -> Result<tonic::service::Routes, tonic_reflection::server::Error> {
    use image_backup_proto::v1::{agent_service_server::AgentServiceServer, job_service_server::JobServiceServer};
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobServiceServer<Jobs>>().await;
    health.set_serving::<AgentServiceServer<AgentSessions>>().await;
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
        .add_service(AgentServiceServer::new(sessions).max_decoding_message_size(MAX_AGENT_MESSAGE))
        .add_service(JobServiceServer::new(jobs).max_decoding_message_size(MAX_READ_REQUEST));
    Ok(routes)
}
