//! What agents report about the jobs they run, held in memory until the
//! ImageBackup reconciler has written it to status. Agent sessions only
//! record here and wake the reconciler; they never write to the API
//! server, so one writer decides every status change.

use parking_lot::Mutex;
use std::{
    collections::{BTreeSet, HashMap},
    time::Instant,
};

use image_backup_core::job::{Failure, LiveJob, Outcome};
use image_backup_proto::v1::{JobProgress, JobResult, job_result};
use tokio::sync::mpsc;

/// Where a report of `job` is recorded: the attempt known here, or, for a
/// job not known (the coordinator restarted), a new entry the reconciler
/// checks against status.
fn report_to<'a>(
    jobs: &'a mut HashMap<String, LiveJob>,
    job: &str,
    attempt: u32,
    digest: &str,
    agent_id: &str,
) -> &'a mut LiveJob {
    jobs.entry(job.to_string()).or_insert_with(|| LiveJob::new(attempt, digest, agent_id))
}

/// Has the ImageBackup reconciler look at a job again, by name: what
/// anyone who has something for a job (a report, a note, a prune mark)
/// holds, apart from the reports themselves.
#[derive(Clone)]
pub struct JobWaker(mpsc::UnboundedSender<String>);

// === impl JobWaker ===

impl JobWaker {
    /// A waker and the receiving end the reconciler listens on.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (wake, woken) = mpsc::unbounded_channel();
        (Self(wake), woken)
    }

    pub fn wake(&self, job: &str) {
        // The receiver lives as long as the coordinator runs.
        let _ = self.0.send(job.to_string());
    }
}

/// Every job with an unrecorded report, and the jobs waiting for an agent;
/// a report wakes its job.
pub struct LiveJobs {
    jobs: Mutex<HashMap<String, LiveJob>>,
    waiting: Mutex<BTreeSet<String>>,
    waker: JobWaker,
}

// === impl LiveJobs ===

impl LiveJobs {
    /// The table and the receiving end of the wake-ups.
    pub fn new() -> (Self, mpsc::UnboundedReceiver<String>) {
        let (waker, woken) = JobWaker::new();
        (Self { jobs: Mutex::default(), waiting: Mutex::default(), waker }, woken)
    }

    /// What wakes jobs for reasons other than their reports.
    pub fn waker(&self) -> JobWaker {
        self.waker.clone()
    }

    fn jobs(&self) -> parking_lot::MutexGuard<'_, HashMap<String, LiveJob>> {
        self.jobs.lock()
    }

    fn waiting(&self) -> parking_lot::MutexGuard<'_, BTreeSet<String>> {
        self.waiting.lock()
    }

    fn wake(&self, job: &str) {
        self.waker.wake(job);
    }

    pub fn get(&self, job: &str) -> Option<LiveJob> {
        self.jobs().get(job).cloned()
    }

    /// Whether the attempt of `job` known here is `agent_id`'s.
    pub fn held_by(&self, job: &str, agent_id: &str) -> bool {
        self.jobs().get(job).is_some_and(|live| live.agent_id == agent_id)
    }

    /// A new attempt was handed to an agent: earlier reports no longer count.
    pub fn assigned(&self, job: &str, attempt: u32, digest: &str, agent_id: &str) {
        self.waiting().remove(job);
        self.jobs().insert(job.into(), LiveJob::new(attempt, digest, agent_id));
    }

    /// Records a progress report. A report of another attempt than the one
    /// known is dropped; one for a job not known here (the coordinator
    /// restarted) is kept for the reconciler to check against status.
    pub fn progress(&self, agent_id: &str, report: &JobProgress) -> bool {
        let accepted = {
            let mut jobs = self.jobs();
            let live = report_to(&mut jobs, &report.job_id, report.attempt, &report.digest, agent_id);
            let current = live.is(report.attempt, &report.digest, agent_id) && live.outcome.is_none();
            if current {
                live.bytes_done = report.bytes_done;
                live.bytes_total = report.bytes_total;
                live.updated = Instant::now();
            }
            current
        };
        if accepted {
            self.wake(&report.job_id);
        }
        accepted
    }

    /// Records how an attempt ended, under the same rule as progress.
    pub fn result(&self, agent_id: &str, result: &JobResult) -> bool {
        let outcome = match &result.outcome {
            Some(job_result::Outcome::Success(success)) => Outcome::Success(success.into()),
            Some(job_result::Outcome::Failure(failure)) => Outcome::Failure(failure.into()),
            None => Outcome::Failure(Failure {
                message: format!("agent {agent_id} sent a result without an outcome"),
                retryable: true,
                ..Failure::default()
            }),
        };
        let accepted = {
            let mut jobs = self.jobs();
            let live = report_to(&mut jobs, &result.job_id, result.attempt, &result.digest, agent_id);
            let current = live.is(result.attempt, &result.digest, agent_id);
            if current {
                live.outcome = Some(outcome);
                live.updated = Instant::now();
            }
            current
        };
        if accepted {
            self.wake(&result.job_id);
        }
        accepted
    }

    /// An agent is gone: its unfinished jobs are lost.
    pub fn agent_lost(&self, agent_id: &str, reason: &str) {
        let lost: Vec<String> = {
            let mut jobs = self.jobs();
            jobs.iter_mut()
                .filter(|(_, live)| live.agent_id == agent_id && live.outcome.is_none())
                .map(|(name, live)| {
                    live.outcome = Some(Outcome::Lost(reason.into()));
                    name.clone()
                })
                .collect()
        };
        for job in lost {
            self.wake(&job);
        }
    }

    /// One attempt could not be delivered to its agent.
    pub fn lose(&self, job: &str, attempt: u32, reason: &str) {
        let lost = {
            let mut jobs = self.jobs();
            match jobs.get_mut(job) {
                Some(live) if live.attempt == attempt && live.outcome.is_none() => {
                    live.outcome = Some(Outcome::Lost(reason.into()));
                    true
                }
                _ => false,
            }
        };
        if lost {
            self.wake(job);
        }
    }

    /// The reconciler recorded `attempt` in status; its reports are done.
    pub fn recorded(&self, job: &str, attempt: u32) {
        let mut jobs = self.jobs();
        if jobs.get(job).is_some_and(|live| live.attempt == attempt && live.outcome.is_some()) {
            jobs.remove(job);
        }
    }

    /// Drops everything about a job (deleted, or reports that status
    /// proved stale).
    pub fn forget(&self, job: &str) {
        self.jobs().remove(job);
        self.waiting().remove(job);
    }

    /// The job waits for an agent with a free slot on a node that holds it.
    pub fn wait_for_agent(&self, job: &str) {
        self.waiting().insert(job.into());
    }

    /// A slot freed or the nodes' images changed: every waiting job looks
    /// again, at once (the assignment itself is what decides who gets it).
    pub fn wake_waiting(&self) {
        let waiting: Vec<String> = self.waiting().iter().cloned().collect();
        for job in waiting {
            self.wake(&job);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image_backup_proto::v1::JobSuccess;

    fn progress(job: &str, attempt: u32, done: u64) -> JobProgress {
        JobProgress {
            job_id: job.into(),
            bytes_done: done,
            bytes_total: 100,
            attempt,
            digest: "sha256:1".into(),
            ..JobProgress::default()
        }
    }

    #[test]
    fn reports_of_another_attempt_or_agent_are_dropped() {
        let (jobs, mut woken) = LiveJobs::new();
        jobs.assigned("a", 2, "sha256:1", "agent-1");
        assert!(!jobs.progress("agent-1", &progress("a", 1, 50)), "older attempt");
        assert!(!jobs.progress("agent-2", &progress("a", 2, 50)), "another agent");
        let old_digest = JobProgress { digest: "sha256:0".into(), ..progress("a", 2, 50) };
        assert!(!jobs.progress("agent-1", &old_digest), "the same attempt number of the digest before");
        assert!(woken.try_recv().is_err(), "nothing woken by a dropped report");
        assert!(jobs.progress("agent-1", &progress("a", 2, 50)));
        assert_eq!(woken.try_recv().unwrap(), "a");
        assert_eq!(jobs.get("a").unwrap().bytes_done, 50);
    }

    #[test]
    fn a_result_ends_the_attempt_and_late_progress_cannot_reopen_it() {
        let (jobs, _woken) = LiveJobs::new();
        jobs.assigned("a", 1, "sha256:1", "agent-1");
        let result = JobResult {
            job_id: "a".into(),
            attempt: 1,
            digest: "sha256:1".into(),
            outcome: Some(job_result::Outcome::Success(JobSuccess::default())),
        };
        assert!(jobs.result("agent-1", &result));
        assert!(!jobs.progress("agent-1", &progress("a", 1, 10)), "progress after the result");
        assert!(matches!(jobs.get("a").unwrap().outcome, Some(Outcome::Success(_))));
        jobs.recorded("a", 1);
        assert!(jobs.get("a").is_none());
    }

    #[test]
    fn a_lost_agent_loses_only_its_unfinished_jobs() {
        let (jobs, mut woken) = LiveJobs::new();
        jobs.assigned("a", 1, "sha256:1", "agent-1");
        jobs.assigned("b", 1, "sha256:1", "agent-2");
        jobs.agent_lost("agent-1", "agent agent-1 on node node-1 disconnected");
        assert_eq!(woken.try_recv().unwrap(), "a");
        assert!(woken.try_recv().is_err());
        assert!(matches!(jobs.get("a").unwrap().outcome, Some(Outcome::Lost(_))));
        assert_eq!(jobs.get("b").unwrap().outcome, None);
    }

    #[test]
    fn waiting_jobs_are_woken_together_until_assigned() {
        let (jobs, mut woken) = LiveJobs::new();
        jobs.wait_for_agent("a");
        jobs.wait_for_agent("b");
        jobs.wake_waiting();
        assert_eq!([woken.try_recv().unwrap(), woken.try_recv().unwrap()], ["a", "b"]);
        jobs.assigned("a", 1, "sha256:1", "agent-1");
        jobs.wake_waiting();
        assert_eq!(woken.try_recv().unwrap(), "b");
        assert!(woken.try_recv().is_err());
    }
}
