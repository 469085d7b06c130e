//! AgentService: one gRPC session per agent. The first message registers
//! the agent; every later one goes to the hub.

use std::{
    collections::{HashMap, HashSet},
    pin::Pin,
    sync::{Arc, atomic::Ordering},
    time::{Instant, SystemTime},
};

use futures::Stream;
use image_backup_proto::v1::{
    AgentMessage, CoordinatorMessage, Registered, agent_message, agent_service_server::AgentService,
    coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::{StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming};
use tracing::{Instrument, debug, info, info_span};

use super::{Agent, AgentHub};

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
            info!(agent = %agent_id, "agent reconnected; its previous session is replaced");
            // Jobs of the old session the new one does not list are over
            // or lost: their reconciles look at them again.
            for job in previous.running.iter().filter(|job| !running.contains(*job)) {
                hub.jobs.wake(job);
            }
        }
        info!(agent = %agent_id, %node, "agent connected");
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
