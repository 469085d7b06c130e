//! The coordinator's side of the agent sessions: which agents are connected,
//! on which nodes, what images their containerd holds, how busy they are,
//! and the channel to send each one assignments. This is a cache of what
//! the agents report; nothing here is durable (the ImageBackup statuses
//! are), so a restarted coordinator rebuilds it from the agents' next
//! sessions.
//!
//! Reports about jobs go to [`LiveJobs`], which wakes the ImageBackup
//! reconciler; a freed slot or a changed inventory wakes the jobs that wait
//! for an agent, so a job starts the moment an agent can take it.

mod agent;
mod session;

use parking_lot::Mutex;
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::AtomicU64},
    time::{Duration, Instant, SystemTime},
};

use image_backup_proto::v1::{Assignment, Cancel, CoordinatorMessage, Platform, agent_message, coordinator_message};
use tracing::{debug, info, info_span, warn};

pub use session::AgentSessions;

use image_backup_core::job::{Holder, plan::Holdings};

use crate::jobs::{JobWaker, LiveJobs};
use agent::Agent;

/// How long an assignment counts as running before the agent's heartbeats
/// list it, at the least.
const IN_TRANSIT_MIN: Duration = Duration::from_secs(20);

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

/// Every connected agent. Shared by the gRPC service and the controllers.
pub struct AgentHub {
    coordinator_id: String,
    heartbeat_interval: Duration,
    agents: Mutex<HashMap<String, Agent>>,
    sessions: AtomicU64,
    jobs: Arc<LiveJobs>,
    /// Wakes a job whose agent finished, left or changed its session.
    backup_waker: JobWaker,
    started: Instant,
}

impl AgentHub {
    pub fn new(coordinator_id: impl Into<String>, heartbeat_interval: Duration, jobs: Arc<LiveJobs>) -> Arc<Self> {
        Arc::new(Self {
            coordinator_id: coordinator_id.into(),
            heartbeat_interval,
            agents: Mutex::default(),
            sessions: AtomicU64::new(0),
            backup_waker: jobs.waker(),
            jobs,
            started: Instant::now(),
        })
    }

    /// How long this hub has been up.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    fn lock(&self) -> parking_lot::MutexGuard<'_, HashMap<String, Agent>> {
        self.agents.lock()
    }

    pub fn count(&self) -> usize {
        self.lock().len()
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

    /// What the connected agents' nodes hold of the image `digest`: for an
    /// index, its children and which node holds which whole. Least busy
    /// agents first.
    pub fn holdings(&self, digest: &str) -> Holdings {
        agent::holdings(&self.lock(), digest)
    }

    /// Whether `agent_id` is connected and runs `job`.
    pub fn holder(&self, agent_id: &str, job: &str) -> Holder {
        match self.lock().get(agent_id) {
            Some(agent) if agent.running.contains(job) => Holder::Running,
            Some(_) => Holder::NotRunning,
            None => Holder::Absent,
        }
    }

    /// Takes a slot of `agent_id` for an attempt of `job`, before the
    /// attempt is recorded; [`AgentHub::send`] delivers it afterwards and
    /// [`AgentHub::release`] gives the slot back if recording failed.
    pub fn reserve(&self, agent_id: &str, job: &str, attempt: u32, digest: &str) -> Result<(), AssignError> {
        let mut agents = self.lock();
        let agent = agents.get_mut(agent_id).ok_or_else(|| AssignError::NotConnected(agent_id.to_string()))?;
        let max = agent.register.max_concurrent_jobs.max(1);
        if !agent.running.contains(job) && agent.running.len() >= max as usize {
            return Err(AssignError::Full {
                agent_id: agent_id.into(),
                node: agent.register.node_name.clone(),
                running: agent.running.len(),
                max,
            });
        }
        self.jobs.assigned(job, attempt, digest, agent_id);
        agent.assigned_at.insert(job.to_string(), Instant::now());
        agent.running.insert(job.to_string());
        Ok(())
    }

    /// Gives back a slot taken by [`AgentHub::reserve`].
    pub fn release(&self, agent_id: &str, job: &str) {
        if let Some(agent) = self.lock().get_mut(agent_id) {
            agent.running.remove(job);
            agent.assigned_at.remove(job);
        }
        self.jobs.forget(job);
        self.jobs.wake_waiting();
    }

    /// Delivers a reserved, recorded assignment.
    pub fn send(&self, agent_id: &str, assignment: Assignment) -> Result<(), AssignError> {
        let agents = self.lock();
        let agent = agents.get(agent_id).ok_or_else(|| AssignError::NotConnected(agent_id.to_string()))?;
        let message = CoordinatorMessage { message: Some(coordinator_message::Message::Assignment(assignment)) };
        agent.tx.try_send(Ok(message)).map_err(|_| AssignError::NotConnected(agent_id.to_string()))
    }

    /// Reserves and delivers at once (tests and tools that keep no status).
    pub fn assign(&self, agent_id: &str, assignment: Assignment) -> Result<(), AssignError> {
        self.reserve(agent_id, &assignment.job_id, assignment.attempt, &assignment.digest)?;
        let job = assignment.job_id.clone();
        self.send(agent_id, assignment).inspect_err(|_| self.release(agent_id, &job))
    }

    /// Asks an agent to stop a job (reassigned elsewhere, or deleted).
    pub fn cancel(&self, agent_id: &str, job_id: &str, reason: &str) {
        let freed = {
            let mut agents = self.lock();
            let Some(agent) = agents.get_mut(agent_id) else { return };
            let cancel = Cancel { job_id: job_id.into(), reason: reason.into() };
            let _ = agent
                .tx
                .try_send(Ok(CoordinatorMessage { message: Some(coordinator_message::Message::Cancel(cancel)) }));
            agent.assigned_at.remove(job_id);
            agent.running.remove(job_id)
        };
        if freed {
            self.jobs.wake_waiting();
        }
    }

    /// Asks whichever agent runs `job_id` to stop it (its ImageBackup was
    /// deleted).
    pub fn cancel_anywhere(&self, job_id: &str, reason: &str) {
        let agent = self.lock().iter().find(|(_, agent)| agent.running.contains(job_id)).map(|(id, _)| id.clone());
        if let Some(agent) = agent {
            self.cancel(&agent, job_id, reason);
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
            self.gone(agent_id, agent, "missed its heartbeat deadline");
        }
        count
    }

    /// Ends every session, so the agents reconnect (to whichever coordinator
    /// leads next). Used when this coordinator stops or loses leadership.
    pub fn close_sessions(&self) {
        let agents: Vec<(String, Agent)> = self.lock().drain().collect();
        for (agent_id, agent) in agents {
            // Dropping the sender ends the reply stream the agent reads.
            self.gone(agent_id, agent, "lost its session: this coordinator stopped");
        }
    }

    /// An agent left: its unfinished jobs are lost, and it is said so.
    fn gone(&self, agent_id: String, agent: Agent, why: &str) {
        let node = agent.register.node_name;
        self.jobs.agent_lost(&agent_id, &format!("agent {agent_id} on node {node} {why}"));
    }

    fn handle(&self, agent_id: &str, session: u64, message: agent_message::Message) {
        let mut agents = self.lock();
        let Some(agent) = agents.get_mut(agent_id).filter(|a| a.session == session) else { return };
        agent.last_heartbeat = Instant::now();
        agent.last_heartbeat_wall = SystemTime::now();
        let running_before = agent.running.len();
        // Jobs this message shows the agent no longer runs: their
        // reconciles decide whether they are lost.
        let mut left: Vec<String> = Vec::new();
        let inventory_changed = match message {
            agent_message::Message::Register(_) => {
                debug!("repeated registration ignored");
                false
            }
            agent_message::Message::Inventory(inventory) => {
                agent.apply(inventory);
                true
            }
            agent_message::Message::Heartbeat(beat) => {
                // The agent's own list is the truth about what it runs, but
                // for assignments it may not have read yet.
                let in_transit = (4 * self.heartbeat_interval).max(IN_TRANSIT_MIN);
                agent.assigned_at.retain(|_, at| at.elapsed() < in_transit);
                let mut running: HashSet<String> = beat.running_job_ids.into_iter().collect();
                running.extend(agent.assigned_at.keys().filter(|job| agent.running.contains(*job)).cloned());
                left.extend(agent.running.difference(&running).cloned());
                agent.running = running;
                false
            }
            agent_message::Message::Progress(progress) => {
                let _span = info_span!("report", imagebackup = %progress.job_id, attempt = progress.attempt).entered();
                if !self.holds(agent, agent_id, &progress.job_id) {
                    warn!("progress on a job this agent does not hold dropped");
                } else if !self.jobs.progress(agent_id, &progress) {
                    debug!(job = %progress.job_id, attempt = progress.attempt, "progress of a stale attempt dropped");
                }
                false
            }
            agent_message::Message::Result(result) => {
                let _span = info_span!("report", imagebackup = %result.job_id, attempt = result.attempt).entered();
                if !self.holds(agent, agent_id, &result.job_id) {
                    warn!("result of a job this agent does not hold dropped");
                    return;
                }
                agent.running.remove(&result.job_id);
                agent.assigned_at.remove(&result.job_id);
                if !self.jobs.result(agent_id, &result) {
                    info!(job = %result.job_id, attempt = result.attempt, "result of a stale attempt dropped");
                    left.push(result.job_id);
                }
                false
            }
        };
        let capacity_changed = agent.running.len() < running_before || inventory_changed;
        drop(agents);
        for job in left {
            self.backup_waker.wake(&job);
        }
        if capacity_changed {
            self.jobs.wake_waiting();
        }
    }

    /// Whether `agent` may report on `job`: it runs it (as its session
    /// said), or it holds the job's current attempt here.
    fn holds(&self, agent: &Agent, agent_id: &str, job: &str) -> bool {
        agent.running.contains(job) || self.jobs.held_by(job, agent_id)
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
            self.gone(agent_id.into(), agent, "disconnected");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use agent::tests::{INDEX, MANIFEST, agent, image};

    #[test]
    fn holdings_list_the_least_busy_first_with_what_each_holds() {
        let (jobs, _woken) = LiveJobs::new();
        let hub = AgentHub::new("test", Duration::from_secs(5), Arc::new(jobs));
        let held = || vec![image("app:1", "sha256:m", MANIFEST, &[])];
        hub.lock().insert("a".into(), agent(held(), &["j1"], 2));
        hub.lock().insert("b".into(), agent(held(), &[], 2));
        hub.lock().insert("c".into(), agent(held(), &["j2"], 1));
        let holdings = hub.holdings("sha256:m");
        let order: Vec<(&str, bool)> = holdings.agents.iter().map(|h| (h.agent_id.as_str(), h.free)).collect();
        assert_eq!(order, [("b", true), ("a", true), ("c", false)]);
        assert!(holdings.children.is_empty());
        assert!(hub.reserve("c", "j3", 1, "sha256:m").is_err(), "a full agent takes no more");
        assert!(hub.reserve("b", "j3", 1, "sha256:m").is_ok());
        assert_eq!(hub.holder("b", "j3"), Holder::Running);
        assert_eq!(hub.holder("a", "j3"), Holder::NotRunning);
        assert_eq!(hub.holder("z", "j3"), Holder::Absent);

        hub.lock().insert("d".into(), agent(vec![image("web:1", "sha256:i", INDEX, &["sha256:arm64"])], &[], 1));
        let index = hub.holdings("sha256:i");
        assert_eq!(
            index.children.iter().map(|c| c.digest.as_str()).collect::<Vec<_>>(),
            ["sha256:amd64", "sha256:arm64"]
        );
        assert_eq!(index.agents.len(), 1);
        assert_eq!((index.agents[0].root, index.agents[0].children.clone()), (true, vec!["sha256:arm64".to_string()]));
    }
}
