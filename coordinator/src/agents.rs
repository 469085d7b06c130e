//! The coordinator's side of the agent sessions: which agents are connected,
//! on which nodes, what images their containerd holds, how busy they are,
//! and the channel to send each one assignments. This is a cache of what
//! the agents report; nothing here is durable (the ImageBackup statuses
//! are), so a restarted coordinator rebuilds it from the agents' next
//! sessions.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant, SystemTime},
};

use futures::Stream;
use image_backup_proto::v1::{
    AgentMessage, Assignment, Cancel, CoordinatorMessage, InventoryImage, JobProgress, JobResult, Platform, Register,
    Registered, agent_message, agent_service_server::AgentService, coordinator_message,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

/// What happened on an agent session, for the controllers to act on.
#[derive(Clone, Debug)]
pub enum AgentEvent {
    Connected {
        agent_id: String,
        node: String,
    },
    /// The agent's image inventory changed.
    Inventory {
        agent_id: String,
        node: String,
    },
    Progress {
        agent_id: String,
        node: String,
        progress: JobProgress,
    },
    Result {
        agent_id: String,
        node: String,
        result: JobResult,
    },
    /// The session ended or the agent missed its heartbeat deadline; its
    /// running jobs are lost unless it reconnects with them.
    Disconnected {
        agent_id: String,
        node: String,
        running_jobs: Vec<String>,
    },
}

/// A connected agent as the coordinator sees it.
#[derive(Clone, Debug)]
pub struct AgentInfo {
    pub agent_id: String,
    pub node_name: String,
    pub version: String,
    pub platform: Option<Platform>,
    pub max_jobs: u32,
    pub connected_at: SystemTime,
    pub last_heartbeat: SystemTime,
    pub running_jobs: Vec<String>,
    pub images: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum AssignError {
    #[error("agent {0} is not connected")]
    NotConnected(String),
    #[error("agent {agent_id} on {node} runs {running} of {max} jobs already")]
    Full { agent_id: String, node: String, running: usize, max: u32 },
}

struct Agent {
    session: u64,
    register: Register,
    connected_at: SystemTime,
    last_heartbeat: Instant,
    last_heartbeat_wall: SystemTime,
    running: HashSet<String>,
    /// Images by containerd name.
    images: HashMap<String, InventoryImage>,
    tx: mpsc::Sender<Result<CoordinatorMessage, Status>>,
}

impl Agent {
    /// Whether this node's containerd holds the content of `digest`: as an
    /// image's target, or as a platform manifest of an index it pulled.
    fn holds(&self, digest: &str) -> bool {
        self.images.values().any(|image| {
            if image.digest == digest {
                // An index is useful only with at least its own platform.
                !is_index(&image.media_type) || !image.present_manifests.is_empty()
            } else {
                image.present_manifests.iter().any(|m| m.digest == digest)
            }
        })
    }
}

fn is_index(media_type: &str) -> bool {
    media_type.ends_with("image.index.v1+json") || media_type.ends_with("manifest.list.v2+json")
}

/// Every connected agent. Shared by the gRPC service and the controllers.
pub struct AgentHub {
    coordinator_id: String,
    heartbeat_interval: Duration,
    agents: Mutex<HashMap<String, Agent>>,
    sessions: AtomicU64,
    events: broadcast::Sender<AgentEvent>,
}

impl AgentHub {
    pub fn new(coordinator_id: impl Into<String>, heartbeat_interval: Duration) -> Arc<Self> {
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            coordinator_id: coordinator_id.into(),
            heartbeat_interval,
            agents: Mutex::default(),
            sessions: AtomicU64::new(0),
            events,
        })
    }

    /// Session events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<AgentEvent> {
        self.events.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Agent>> {
        self.agents.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn publish(&self, event: AgentEvent) {
        // No subscriber is not an error: the controllers may not run yet.
        let _ = self.events.send(event);
    }

    pub fn agents(&self) -> Vec<AgentInfo> {
        let mut agents: Vec<AgentInfo> = self
            .lock()
            .iter()
            .map(|(agent_id, a)| AgentInfo {
                agent_id: agent_id.clone(),
                node_name: a.register.node_name.clone(),
                version: a.register.version.clone(),
                platform: a.register.platform.clone(),
                max_jobs: a.register.max_concurrent_jobs,
                connected_at: a.connected_at,
                last_heartbeat: a.last_heartbeat_wall,
                running_jobs: a.running.iter().cloned().collect(),
                images: a.images.len(),
            })
            .collect();
        agents.sort_by(|a, b| a.node_name.cmp(&b.node_name).then(a.agent_id.cmp(&b.agent_id)));
        agents
    }

    /// Agents whose node holds the content of `digest` and that have room
    /// for another job, least busy first.
    pub fn candidates(&self, digest: &str) -> Vec<AgentInfo> {
        let holders: HashSet<String> = self
            .lock()
            .iter()
            .filter(|(_, a)| a.holds(digest) && a.running.len() < a.register.max_concurrent_jobs.max(1) as usize)
            .map(|(id, _)| id.clone())
            .collect();
        let mut agents: Vec<AgentInfo> = self.agents().into_iter().filter(|a| holders.contains(&a.agent_id)).collect();
        agents.sort_by_key(|a| (a.running_jobs.len(), a.node_name.clone()));
        agents
    }

    /// Sends an assignment to an agent and counts it as running there.
    pub fn assign(&self, agent_id: &str, assignment: Assignment) -> Result<(), AssignError> {
        let mut agents = self.lock();
        let agent = agents.get_mut(agent_id).ok_or_else(|| AssignError::NotConnected(agent_id.to_string()))?;
        let max = agent.register.max_concurrent_jobs.max(1);
        if !agent.running.contains(&assignment.job_id) && agent.running.len() >= max as usize {
            return Err(AssignError::Full {
                agent_id: agent_id.into(),
                node: agent.register.node_name.clone(),
                running: agent.running.len(),
                max,
            });
        }
        let job_id = assignment.job_id.clone();
        let message = CoordinatorMessage { message: Some(coordinator_message::Message::Assignment(assignment)) };
        agent.tx.try_send(Ok(message)).map_err(|_| AssignError::NotConnected(agent_id.to_string()))?;
        agent.running.insert(job_id);
        Ok(())
    }

    /// Asks an agent to stop a job (reassigned elsewhere, or deleted).
    pub fn cancel(&self, agent_id: &str, job_id: &str, reason: &str) {
        let mut agents = self.lock();
        if let Some(agent) = agents.get_mut(agent_id) {
            agent.running.remove(job_id);
            let cancel = Cancel { job_id: job_id.into(), reason: reason.into() };
            let _ = agent
                .tx
                .try_send(Ok(CoordinatorMessage { message: Some(coordinator_message::Message::Cancel(cancel)) }));
        }
    }

    /// Drops agents that have not heartbeaten within `deadline` and reports
    /// them disconnected with their jobs; called periodically.
    pub fn expire(&self, deadline: Duration) -> usize {
        let expired: Vec<(String, Agent)> = {
            let mut agents = self.lock();
            let stale: Vec<String> = agents
                .iter()
                .filter(|(_, a)| a.last_heartbeat.elapsed() > deadline)
                .map(|(id, _)| id.clone())
                .collect();
            stale.into_iter().filter_map(|id| agents.remove(&id).map(|a| (id, a))).collect()
        };
        let count = expired.len();
        for (agent_id, agent) in expired {
            warn!(agent = %agent_id, node = %agent.register.node_name, "agent missed its heartbeat deadline");
            self.publish(AgentEvent::Disconnected {
                agent_id,
                node: agent.register.node_name,
                running_jobs: agent.running.into_iter().collect(),
            });
        }
        count
    }

    /// Ends every session, so the agents reconnect (to whichever coordinator
    /// leads next). Used when this coordinator stops or loses leadership.
    pub fn close_sessions(&self) {
        let agents: Vec<(String, Agent)> = self.lock().drain().collect();
        for (agent_id, agent) in agents {
            // Dropping the sender ends the reply stream the agent reads.
            self.publish(AgentEvent::Disconnected {
                agent_id,
                node: agent.register.node_name,
                running_jobs: agent.running.into_iter().collect(),
            });
        }
    }

    fn handle(&self, agent_id: &str, session: u64, message: agent_message::Message) {
        let mut agents = self.lock();
        let Some(agent) = agents.get_mut(agent_id).filter(|a| a.session == session) else { return };
        let node = agent.register.node_name.clone();
        agent.last_heartbeat = Instant::now();
        agent.last_heartbeat_wall = SystemTime::now();
        let event = match message {
            agent_message::Message::Register(_) => {
                debug!("repeated registration ignored");
                None
            }
            agent_message::Message::Inventory(inventory) => {
                if inventory.full {
                    agent.images.clear();
                }
                for name in inventory.removed {
                    agent.images.remove(&name);
                }
                for image in inventory.added {
                    agent.images.insert(image.name.clone(), image);
                }
                Some(AgentEvent::Inventory { agent_id: agent_id.into(), node })
            }
            agent_message::Message::Heartbeat(beat) => {
                // The agent's own list is the truth about what it runs.
                agent.running = beat.running_job_ids.into_iter().collect();
                None
            }
            agent_message::Message::Progress(progress) => {
                Some(AgentEvent::Progress { agent_id: agent_id.into(), node, progress })
            }
            agent_message::Message::Result(result) => {
                agent.running.remove(&result.job_id);
                Some(AgentEvent::Result { agent_id: agent_id.into(), node, result })
            }
        };
        drop(agents);
        if let Some(event) = event {
            self.publish(event);
        }
    }

    fn disconnect(&self, agent_id: &str, session: u64) {
        let removed = {
            let mut agents = self.lock();
            match agents.get(agent_id) {
                Some(agent) if agent.session == session => agents.remove(agent_id),
                _ => None,
            }
        };
        if let Some(agent) = removed {
            info!(agent = %agent_id, node = %agent.register.node_name, "agent disconnected");
            self.publish(AgentEvent::Disconnected {
                agent_id: agent_id.into(),
                node: agent.register.node_name,
                running_jobs: agent.running.into_iter().collect(),
            });
        }
    }
}

/// The gRPC face of the hub.
#[derive(Clone)]
pub struct AgentSessions(pub Arc<AgentHub>);

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentSessions {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let mut inbound = request.into_inner();
        let register = match inbound.message().await? {
            Some(AgentMessage { message: Some(agent_message::Message::Register(register)) }) => register,
            _ => return Err(Status::invalid_argument("the first message of a session must be Register")),
        };
        if register.node_name.is_empty() || register.agent_id.is_empty() {
            return Err(Status::invalid_argument("Register needs node_name and agent_id"));
        }
        let hub = self.0.clone();
        let session = hub.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let agent_id = register.agent_id.clone();
        let node = register.node_name.clone();
        let (tx, rx) = mpsc::channel(256);
        let registered = Registered {
            heartbeat_interval_seconds: u32::try_from(hub.heartbeat_interval.as_secs()).unwrap_or(10).max(1),
            coordinator_id: hub.coordinator_id.clone(),
        };
        let _ =
            tx.try_send(Ok(CoordinatorMessage { message: Some(coordinator_message::Message::Registered(registered)) }));
        let now = SystemTime::now();
        let replaced = hub.lock().insert(
            agent_id.clone(),
            Agent {
                session,
                running: register.running_job_ids.iter().cloned().collect(),
                register,
                connected_at: now,
                last_heartbeat: Instant::now(),
                last_heartbeat_wall: now,
                images: HashMap::new(),
                tx,
            },
        );
        if replaced.is_some() {
            info!(agent = %agent_id, "agent reconnected; its previous session is replaced");
        }
        info!(agent = %agent_id, %node, "agent connected");
        hub.publish(AgentEvent::Connected { agent_id: agent_id.clone(), node: node.clone() });
        let span = info_span!("agent_session", agent = %agent_id, %node);
        tokio::spawn(
            async move {
                loop {
                    match inbound.next().await {
                        Some(Ok(AgentMessage { message: Some(message) })) => hub.handle(&agent_id, session, message),
                        Some(Ok(AgentMessage { message: None })) => {}
                        Some(Err(status)) => {
                            debug!(%status, "agent stream failed");
                            break;
                        }
                        None => break,
                    }
                }
                hub.disconnect(&agent_id, session);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
