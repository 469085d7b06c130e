//! One session with the coordinator: registration with the jobs still
//! running, the full inventory, results kept while no session was up, then
//! heartbeats and the coordinator's messages until either side goes away.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use image_backup_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Platform as ProtoPlatform, Register, agent_message,
    agent_service_client::AgentServiceClient, coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info};

use super::{AbortOnDrop, Agent, SessionError, lock, message};
use crate::store::ContentStore;

/// Heartbeat period until the coordinator says otherwise.
const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(10);

/// An open session with the coordinator.
pub(super) struct Session {
    replies: tonic::Streaming<CoordinatorMessage>,
    heartbeat: Arc<Mutex<Duration>>,
    /// When to open the next one (the token's renewal time).
    pub(super) renew_in: Option<Duration>,
    endpoint: String,
    tx: mpsc::Sender<AgentMessage>,
    _background: AbortOnDrop,
}

// === impl Agent ===

impl<S: ContentStore> Agent<S> {
    /// Opens a session: registers, reports the inventory, and makes it the
    /// one results go to.
    pub(super) async fn open(self: Arc<Self>) -> Result<Session, SessionError> {
        let link = &self.config.coordinator;
        let token = link.token().await?;
        let channel = link.connect().await?;
        let (tx, rx) = mpsc::channel(256);
        // Registration and the full inventory are queued before the call, so
        // the coordinator never sees an anonymous session; the channel holds
        // them until the call starts reading it. Jobs with a result not yet
        // delivered count as running: their results are still to come.
        let mut running: Vec<String> = lock(&self.jobs).keys().cloned().collect();
        running.extend(lock(&self.undelivered).iter().filter_map(result_job).map(str::to_string));
        let _ = tx.send(message(agent_message::Message::Register(self.register(running)))).await;
        // Changes of what is in use from here on are told (see follow_use).
        let use_changes = self.guard.in_use().subscribe();
        let inventory = self.full_inventory().await?;
        let told: HashMap<String, bool> = inventory.added.iter().map(|i| (i.name.clone(), i.in_use)).collect();
        let _ = tx.send(message(agent_message::Message::Inventory(inventory))).await;
        let mut request = tonic::Request::new(ReceiverStream::new(rx));
        let renew_in = token.and_then(|token| {
            request.metadata_mut().insert("authorization", token.authorization);
            token.renew_in
        });
        let endpoint = link.endpoint().to_string();
        let replies = AgentServiceClient::new(channel)
            .session(request)
            .await
            .map_err(|status| SessionError::Refused { endpoint: endpoint.clone(), status: Box::new(status) })?
            .into_inner();
        *lock(&self.session) = Some(tx.clone());
        info!(coordinator = %endpoint, "session established");
        let undelivered = std::mem::take(&mut *lock(&self.undelivered));
        for result in undelivered {
            let _ = tx.send(result).await;
        }
        let heartbeat = Arc::new(Mutex::new(DEFAULT_HEARTBEAT));
        // Aborted with the session, however it ends (even dropped by a
        // shutdown): they hold the outbound stream open.
        let background = AbortOnDrop(vec![
            tokio::spawn(self.clone().heartbeats(tx.clone(), heartbeat.clone())),
            tokio::spawn(self.clone().report_progress(tx.clone())),
            tokio::spawn(self.clone().follow_images(tx.clone())),
            tokio::spawn(self.clone().follow_use(tx.clone(), told, use_changes)),
        ]);
        Ok(Session { replies, heartbeat, renew_in, endpoint, _background: background, tx })
    }

    /// Serves a session's assignments until either side goes away.
    pub(super) async fn serve(self: &Arc<Self>, session: &mut Session) -> Result<(), SessionError> {
        let result = loop {
            match session.replies.message().await {
                Ok(Some(reply)) => match reply.message {
                    Some(coordinator_message::Message::Registered(registered)) => {
                        if registered.heartbeat_interval_seconds > 0 {
                            *lock(&session.heartbeat) =
                                Duration::from_secs(registered.heartbeat_interval_seconds.into());
                        }
                        info!(coordinator_id = %registered.coordinator_id, "registered");
                    }
                    Some(coordinator_message::Message::Assignment(assignment)) => self.clone().start(assignment),
                    Some(coordinator_message::Message::Cancel(cancel)) => self.cancel(&cancel.job_id, &cancel.reason),
                    None => debug!("empty message from coordinator"),
                },
                Ok(None) => break Ok(()),
                Err(status) => {
                    break Err(SessionError::Broken { endpoint: session.endpoint.clone(), status: Box::new(status) });
                }
            }
        };
        // Results go to the next session instead of a stream nobody reads.
        let mut current = lock(&self.session);
        if current.as_ref().is_some_and(|tx| tx.same_channel(&session.tx)) {
            *current = None;
        }
        result
    }

    fn register(&self, running_job_ids: Vec<String>) -> Register {
        Register {
            node_name: self.config.node_name.clone(),
            agent_id: self.config.agent_id.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            platform: Some(node_platform()),
            max_concurrent_jobs: self.config.max_jobs,
            running_job_ids,
        }
    }

    async fn heartbeats(self: Arc<Self>, tx: mpsc::Sender<AgentMessage>, period: Arc<Mutex<Duration>>) {
        loop {
            let wait = *lock(&period);
            tokio::time::sleep(wait).await;
            let running_job_ids = lock(&self.jobs).keys().cloned().collect();
            let beat = Heartbeat { sent_at: Some(std::time::SystemTime::now().into()), running_job_ids };
            if tx.send(message(agent_message::Message::Heartbeat(beat))).await.is_err() {
                return;
            }
        }
    }
}

/// The job a queued result message is about.
fn result_job(message: &AgentMessage) -> Option<&str> {
    match &message.message {
        Some(agent_message::Message::Result(result)) => Some(&result.job_id),
        _ => None,
    }
}

/// This node's platform in OCI terms (Go's GOOS/GOARCH names).
pub fn node_platform() -> ProtoPlatform {
    let architecture = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    };
    ProtoPlatform { os: std::env::consts::OS.into(), architecture: architecture.into(), variant: String::new() }
}
