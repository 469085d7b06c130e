//! AgentService: one gRPC session per agent. The call's token says which
//! agent pod it is (see [`crate::trust::agents`]); the first message
//! registers it for its node; every later one goes to the hub. A session
//! lasts as long as its token: an agent renews by opening the next session
//! before the token expires, which replaces this one without losing a job.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{Duration, Instant, SystemTime},
};

use futures::Stream;
use image_backup_proto::v1::{
    AgentMessage, CoordinatorMessage, Registered, agent_message, agent_service_server::AgentService,
    coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span, warn};

use super::{Agent, AgentHub};
use crate::trust::{agents::AgentAuthenticator, bearer};

/// How long a new session may take to register.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Jobs an agent may say it runs when it registers; more is not an agent.
const MAX_RUNNING_AT_REGISTER: usize = 1024;

/// Agents connected at once (Kubernetes supports 5,000 nodes); beyond, a
/// session is refused rather than grow the hub without end.
const MAX_AGENTS: usize = 10_000;

/// Slack on a token's expiry, for clocks that differ a little.
const EXPIRY_SLACK: Duration = Duration::from_secs(30);

/// The gRPC face of the hub.
#[derive(Clone)]
pub struct AgentSessions {
    hub: Arc<AgentHub>,
    auth: Arc<AgentAuthenticator>,
}

// === impl AgentSessions ===

impl AgentSessions {
    pub fn new(hub: Arc<AgentHub>, auth: Arc<AgentAuthenticator>) -> Self {
        Self { hub, auth }
    }
}

type SessionStream = Pin<Box<dyn Stream<Item = Result<CoordinatorMessage, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl AgentService for AgentSessions {
    type SessionStream = SessionStream;

    async fn session(&self, request: Request<Streaming<AgentMessage>>) -> Result<Response<SessionStream>, Status> {
        let peer = request.remote_addr().map_or_else(|| "unknown".to_string(), |addr| addr.to_string());
        let token = bearer(request.metadata()).map(str::to_string);
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(REGISTER_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Register within 10s of the session's start"))?;
        let mut register = match first? {
            Some(AgentMessage { message: Some(agent_message::Message::Register(register)) }) => register,
            _ => return Err(Status::invalid_argument("the first message of a session must be Register")),
        };
        if register.node_name.is_empty() {
            return Err(Status::invalid_argument("Register needs node_name"));
        }
        let identity = match self.auth.authenticate(token.as_deref(), &register.node_name).await {
            Ok(identity) => identity,
            Err(refusal) => {
                warn!(%peer, node = %register.node_name, error = %refusal, "agent session refused");
                return Err(refusal.status());
            }
        };
        // The pod is the agent: a name it gives itself counts for nothing.
        let agent_id = identity.pod.clone();
        register.agent_id = agent_id.clone();
        register.running_job_ids.truncate(MAX_RUNNING_AT_REGISTER);
        let hub = self.hub.clone();
        {
            let agents = hub.lock();
            if agents.len() >= MAX_AGENTS && !agents.contains_key(&agent_id) {
                warn!(%peer, agent = %agent_id, "agent session refused: {MAX_AGENTS} agents are connected");
                return Err(Status::resource_exhausted(format!("{MAX_AGENTS} agents are connected already")));
            }
        }
        let session = hub.sessions.fetch_add(1, Ordering::Relaxed) + 1;
        let node = identity.node.clone();
        let (tx, rx) = mpsc::channel(256);
        let registered = Registered {
            heartbeat_interval_seconds: u32::try_from(hub.heartbeat_interval.as_secs()).unwrap_or(10).max(1),
            coordinator_id: hub.coordinator_id.clone(),
        };
        let _ =
            tx.try_send(Ok(CoordinatorMessage { message: Some(coordinator_message::Message::Registered(registered)) }));
        let now = SystemTime::now();
        let running: HashSet<String> = register.running_job_ids.iter().cloned().collect();
        let replaced = hub.lock().insert(
            agent_id.clone(),
            Agent {
                session,
                running: running.clone(),
                assigned_at: HashMap::new(),
                register,
                connected_at: now,
                last_heartbeat: Instant::now(),
                last_heartbeat_wall: now,
                images: HashMap::new(),
                tx,
            },
        );
        if let Some(previous) = replaced {
            info!(agent = %agent_id, "agent renewed its session");
            // Jobs of the old session the new one does not list are over
            // or lost: their reconciles look at them again.
            for job in previous.running.iter().filter(|job| !running.contains(*job)) {
                hub.backup_waker.wake(job);
            }
        } else {
            info!(agent = %agent_id, %node, %peer, "agent connected");
        }
        let expires = identity.expires.map(|at| at.duration_since(now).unwrap_or_default() + EXPIRY_SLACK);
        let span = info_span!("agent_session", agent = %agent_id, %node);
        tokio::spawn(
            async move {
                let expired = async {
                    match expires {
                        Some(left) => tokio::time::sleep(left).await,
                        None => std::future::pending().await,
                    }
                };
                tokio::pin!(expired);
                loop {
                    tokio::select! {
                        message = inbound.next() => match message {
                            Some(Ok(AgentMessage { message: Some(message) })) => hub.handle(&agent_id, session, message),
                            Some(Ok(AgentMessage { message: None })) => {}
                            Some(Err(status)) => {
                                debug!(%status, "agent stream failed");
                                break;
                            }
                            None => break,
                        },
                        () = &mut expired => {
                            info!("the agent's token expired without a renewed session; closing it");
                            break;
                        }
                    }
                }
                hub.disconnect(&agent_id, session);
            }
            .instrument(span),
        );
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
