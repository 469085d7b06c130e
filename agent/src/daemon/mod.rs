//! Daemon mode: the agent keeps one session with the coordinator, tells it
//! which images this node's containerd holds (and keeps that current from
//! containerd's events), heartbeats, and runs the copies it is assigned with
//! the push engine, a bounded number at once. Jobs outlive sessions: a
//! coordinator restart does not stop a push, and its result is delivered on
//! the next session.
//!
//! Here the agent and its reconnecting loop; `session` opens and serves one
//! session, `inventory` tells what the node holds, `jobs` runs the copies.

mod inventory;
mod jobs;
mod session;

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use image_backup_proto::v1::{AgentMessage, agent_message};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    containerd::ContainerdStore,
    guard::Guard,
    link::{CoordinatorLink, LinkError},
    push::Pusher,
    store::{ContentStore, StoreError},
};
use jobs::{RunningJob, StopJobsOnDrop};

pub use session::node_platform;

#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// How to reach the coordinator.
    pub coordinator: CoordinatorLink,
    /// Kubernetes node this agent runs on.
    pub node_name: String,
    /// Stable identity of this agent (its pod name).
    pub agent_id: String,
    /// Copies run at once.
    pub max_jobs: u32,
    /// Longest wait between reconnection attempts.
    pub reconnect_max: Duration,
    /// How often progress of running jobs is reported.
    pub progress_interval: Duration,
    /// A copy still running after this long is stopped and reported failed.
    pub job_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("coordinator {endpoint} refused the session: {status}")]
    Refused { endpoint: String, status: Box<tonic::Status> },
    #[error("session with coordinator {endpoint} broke: {status}")]
    Broken { endpoint: String, status: Box<tonic::Status> },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// The node agent in daemon mode. Cheap to share; all state is behind locks.
pub struct Agent<S = ContainerdStore> {
    config: DaemonConfig,
    pusher: Pusher<S>,
    /// What no assignment can make this agent do.
    guard: Guard,
    jobs: Mutex<HashMap<String, RunningJob>>,
    /// Sender of the current session, if one is up.
    session: Mutex<Option<mpsc::Sender<AgentMessage>>>,
    /// Results finished while no session was up, delivered on the next one.
    undelivered: Mutex<Vec<AgentMessage>>,
}

// === impl Agent ===

impl<S: ContentStore> Agent<S> {
    pub fn new(config: DaemonConfig, pusher: Pusher<S>, guard: Guard) -> Arc<Self> {
        Arc::new(Self {
            config,
            pusher,
            guard,
            jobs: Mutex::default(),
            session: Mutex::default(),
            undelivered: Mutex::default(),
        })
    }

    /// Runs sessions until `shutdown` resolves, reconnecting with jittered
    /// exponential backoff after each failure. A session is renewed before
    /// its token expires by opening the next one first, so no job is lost.
    pub async fn run(self: Arc<Self>, shutdown: impl std::future::Future<Output = ()>) {
        // Jobs outlive sessions, not the agent: however `run` ends, even
        // dropped mid-way, no copy goes on pushing behind its back.
        let _jobs = StopJobsOnDrop(&self.jobs);
        let _pods = AbortOnDrop(vec![tokio::spawn({
            let agent = self.clone();
            async move { agent.guard.follow().await }
        })]);
        let mut shutdown = std::pin::pin!(shutdown);
        let mut backoff = Duration::from_millis(200);
        loop {
            let opened = tokio::select! {
                () = &mut shutdown => {
                    info!("shutting down");
                    return;
                }
                opened = self.clone().open() => opened,
            };
            match opened {
                Ok(mut session) => {
                    backoff = Duration::from_millis(200);
                    loop {
                        let renew = session.renew_in;
                        let step = tokio::select! {
                            () = &mut shutdown => {
                                info!("shutting down");
                                return;
                            }
                            ended = self.serve(&mut session) => Step::Ended(ended),
                            () = sleep_or_never(renew) => Step::Renew,
                        };
                        match step {
                            Step::Ended(Ok(())) => {
                                info!("coordinator closed the session; reconnecting");
                                break;
                            }
                            Step::Ended(Err(e)) => {
                                warn!(error = %e, retry_in = ?backoff, "coordinator session failed");
                                break;
                            }
                            // The next session registers before this one
                            // goes: the coordinator swaps them.
                            Step::Renew => match self.clone().open().await {
                                Ok(next) => {
                                    session = next;
                                    info!("session renewed with the current token");
                                }
                                Err(e) => {
                                    warn!(error = %e, "renewing the session failed; trying again in 30s");
                                    session.renew_in = Some(Duration::from_secs(30));
                                }
                            },
                        }
                    }
                }
                Err(e) => warn!(error = %e, retry_in = ?backoff, "coordinator session failed"),
            }
            let jitter = Duration::from_millis(rand::random::<u64>() % (backoff.as_millis() as u64 / 2 + 1));
            tokio::select! {
                () = &mut shutdown => return,
                () = tokio::time::sleep(backoff + jitter) => {}
            }
            backoff = (backoff * 2).min(self.config.reconnect_max);
        }
    }
}

/// What ended a wait on a session.
enum Step {
    Ended(Result<(), SessionError>),
    Renew,
}

async fn sleep_or_never(wait: Option<Duration>) {
    match wait {
        Some(wait) => tokio::time::sleep(wait).await,
        None => std::future::pending().await,
    }
}

/// Aborts its tasks when dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

fn message(message: agent_message::Message) -> AgentMessage {
    AgentMessage { message: Some(message) }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
