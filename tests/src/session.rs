//! An agent session opened by hand over the coordinator's real gRPC port,
//! as a rogue or a real agent could: what tests of trust and integrity
//! send where a real agent would send what it is told.

use std::time::Duration;

use image_backup_proto::v1::{
    AgentMessage, CoordinatorMessage, Heartbeat, Register, agent_message, agent_service_client::AgentServiceClient,
    coordinator_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming, transport::Channel};

use crate::run::with_token;

pub struct Session {
    tx: mpsc::Sender<AgentMessage>,
    replies: Streaming<CoordinatorMessage>,
}

impl Session {
    /// Opens a session as the agent of `node` presenting `token`; the agent
    /// is known as `agent-<node>`.
    pub async fn open(channel: &Channel, token: Option<&str>, node: &str) -> Result<Session, Status> {
        let (tx, rx) = mpsc::channel(16);
        let register = Register {
            node_name: node.into(),
            agent_id: "whoever".into(),
            max_concurrent_jobs: 2,
            ..Default::default()
        };
        tx.send(message(agent_message::Message::Register(register))).await.expect("queued");
        let request = match token {
            Some(token) => with_token(ReceiverStream::new(rx), token),
            None => tonic::Request::new(ReceiverStream::new(rx)),
        };
        let replies = AgentServiceClient::new(channel.clone()).session(request).await?.into_inner();
        Ok(Session { tx, replies })
    }

    pub async fn send(&self, m: agent_message::Message) {
        self.tx.send(message(m)).await.expect("the session is open");
    }

    /// A sender for messages from elsewhere (heartbeats beside the replies).
    pub fn sender(&self) -> mpsc::Sender<AgentMessage> {
        self.tx.clone()
    }

    /// Sends a heartbeat every `period`, as a live agent does, until the
    /// session ends or the task is aborted.
    pub fn heartbeats(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let beats = self.sender();
        tokio::spawn(async move {
            loop {
                let beat = Heartbeat { sent_at: Some(std::time::SystemTime::now().into()), running_job_ids: vec![] };
                if beats.send(message(agent_message::Message::Heartbeat(beat))).await.is_err() {
                    break;
                }
                tokio::time::sleep(period).await;
            }
        })
    }

    /// The next message from the coordinator, waiting up to `timeout`.
    pub async fn next_within(&mut self, timeout: Duration) -> Option<coordinator_message::Message> {
        tokio::time::timeout(timeout, self.replies.message())
            .await
            .expect("the coordinator answers")
            .ok()
            .flatten()
            .and_then(|m| m.message)
    }

    /// The next message from the coordinator.
    pub async fn next(&mut self) -> Option<coordinator_message::Message> {
        self.next_within(Duration::from_secs(10)).await
    }
}

pub fn message(message: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(message) }
}
