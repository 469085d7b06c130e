//! The ImageBackup state machine, as pure functions: from what the status
//! records and what the agents report, the one next step; and each step's
//! change to the status. The reconciler performs the step (an assignment, a
//! registry check, a status write); nothing here does I/O.

use std::time::Duration;

use image_backup_crds::{ImageBackupStatus, Phase};
use image_backup_proto::v1::{JobFailure, JobSuccess};
use k8s_openapi::{apimachinery::pkg::apis::meta::v1::Time, jiff::Timestamp};

use super::live::{LiveJob, Outcome};

/// The limits the machine keeps to.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Attempts before a job stays Failed.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt.
    pub retry_backoff: Duration,
    /// How long an agent may be silent about a job it was given.
    pub grace: Duration,
}

/// Where the agent that status names stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Holder {
    /// Connected and running the job.
    Running,
    /// Connected, but its own list of jobs lacks this one.
    NotRunning,
    /// Not connected.
    Absent,
}

/// A free agent on a node that holds the digest, and how many such agents
/// are busy.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Holders {
    pub free: Option<(String, String)>,
    pub busy: usize,
}

/// Everything the machine looks at for one ImageBackup.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub generation: i64,
    pub digest: &'a str,
    pub status: &'a ImageBackupStatus,
    /// Reports of the attempt status names, from the agent it names.
    pub live: Option<&'a LiveJob>,
    pub holder: Holder,
    pub holders: Holders,
    /// The pinned backup reference the spec and the configured location
    /// give now; `None` when the source is not a valid reference.
    pub target: Option<&'a str>,
    pub since_transition: Duration,
    /// Since the agent last reported on the job, if it did.
    pub since_report: Option<Duration>,
    /// How long this coordinator has run: after a restart, agents get the
    /// grace to reconnect before their jobs count as lost.
    pub uptime: Duration,
}

/// The one next step.
#[derive(Clone, Debug, PartialEq)]
pub enum Next {
    /// Nothing until something changes.
    Idle,
    /// Look again after this long.
    After(Duration),
    /// Hand the attempt to this agent, then record it.
    Assign {
        agent_id: String,
        node: String,
        attempt: u32,
    },
    /// The agent says the copy is done: look in the registry, then record.
    Verify(JobSuccess),
    Record(Transition),
}

/// A change of status, typed; [`Transition::apply`] writes it.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// A new spec generation (the digest moved): start over.
    Restart {
        generation: i64,
    },
    /// No agent can take the job now; says why.
    Waiting {
        message: String,
    },
    Assigned {
        agent_id: String,
        node: String,
        attempt: u32,
    },
    Progress {
        bytes_done: u64,
        bytes_total: u64,
    },
    Completed {
        reference: String,
        bytes: u64,
    },
    /// The attempt failed; another follows after the backoff.
    Retry {
        error: String,
        missing: Vec<String>,
    },
    /// No attempt is left, or none could succeed.
    Failed {
        error: String,
        missing: Vec<String>,
    },
    /// The agent went away mid-copy; another takes it.
    Lost {
        error: String,
    },
}

/// Backoff before attempt `attempts + 1`, doubling per failed attempt.
pub fn backoff(limits: &Limits, attempts: u32) -> Duration {
    limits.retry_backoff.saturating_mul(2u32.saturating_pow(attempts.saturating_sub(1).min(10)))
}

pub fn next(observed: &Observed<'_>, limits: &Limits) -> Next {
    let status = observed.status;
    if status.observed_generation != observed.generation {
        return Next::Record(Transition::Restart { generation: observed.generation });
    }
    match status.phase {
        // A backup made for another location (the settings changed) is
        // not the one workloads would be pointed at: copy it again.
        Phase::Completed if observed.target.is_some() && status.backup_reference.as_deref() != observed.target => {
            Next::Record(Transition::Restart { generation: observed.generation })
        }
        Phase::Completed | Phase::Failed => Next::Idle,
        Phase::Pending => {
            if status.attempts > 0 {
                let wait = backoff(limits, status.attempts);
                if observed.since_transition < wait {
                    return Next::After(wait - observed.since_transition);
                }
            }
            match &observed.holders.free {
                Some((agent_id, node)) => {
                    Next::Assign { agent_id: agent_id.clone(), node: node.clone(), attempt: status.attempts + 1 }
                }
                None => waiting(status, &observed.holders, observed.digest),
            }
        }
        Phase::Assigned | Phase::Pushing => in_flight(observed, limits),
    }
}

/// A pending job no agent can take now: says why, once.
pub fn waiting(status: &ImageBackupStatus, holders: &Holders, digest: &str) -> Next {
    let message = if holders.busy > 0 {
        format!("waiting for a free agent: the {} agent(s) on nodes that hold {digest} are busy", holders.busy)
    } else {
        format!("no connected agent runs on a node that holds {digest}")
    };
    if status.message.as_deref() == Some(message.as_str()) {
        Next::Idle
    } else {
        Next::Record(Transition::Waiting { message })
    }
}

fn in_flight(observed: &Observed<'_>, limits: &Limits) -> Next {
    let status = observed.status;
    let agent = status.agent.as_deref().unwrap_or("?");
    let node = status.node.as_deref().unwrap_or("?");
    if let Some(live) = observed.live {
        match &live.outcome {
            Some(Outcome::Success(success)) => return Next::Verify(success.clone()),
            Some(Outcome::Failure(failure)) => return Next::Record(failed(status, limits, failure)),
            Some(Outcome::Lost(reason)) => return Next::Record(Transition::Lost { error: reason.clone() }),
            None if live.bytes_total > 0
                && (status.phase != Phase::Pushing
                    || (live.bytes_done, live.bytes_total) != (status.bytes_done, status.bytes_total)) =>
            {
                return Next::Record(Transition::Progress {
                    bytes_done: live.bytes_done,
                    bytes_total: live.bytes_total,
                });
            }
            None => {}
        }
    }
    let grace = limits.grace;
    let quiet = observed.since_report.map_or(observed.since_transition, |r| r.min(observed.since_transition));
    match observed.holder {
        // Reports and slot changes wake the job; the look after the grace
        // is a safety net for a wake-up that never comes.
        Holder::Running => Next::After(grace),
        // A result may still be on its way: give it the grace.
        Holder::NotRunning if quiet < grace => Next::After(grace - quiet),
        Holder::NotRunning => {
            Next::Record(Transition::Lost { error: format!("agent {agent} on node {node} no longer runs the copy") })
        }
        Holder::Absent if observed.uptime < grace => Next::After(grace - observed.uptime),
        Holder::Absent => {
            Next::Record(Transition::Lost { error: format!("agent {agent} on node {node} is not connected") })
        }
    }
}

/// A failed attempt: retried while attempts remain and retrying can help.
pub fn failed(status: &ImageBackupStatus, limits: &Limits, failure: &JobFailure) -> Transition {
    let missing = failure
        .missing_platforms
        .iter()
        .map(|p| image_backup_oci::media::PlatformName::from((&*p.os, &*p.architecture, &*p.variant)).to_string())
        .collect();
    let error = failure.message.clone();
    if failure.retryable && status.attempts < limits.max_attempts {
        Transition::Retry { error, missing }
    } else {
        Transition::Failed { error, missing }
    }
}

// === impl Transition ===

impl Transition {
    /// The status after this transition.
    pub fn apply(&self, status: &ImageBackupStatus, now: Timestamp) -> ImageBackupStatus {
        let mut next = status.clone();
        let moved = |next: &mut ImageBackupStatus, phase: Phase| {
            if next.phase != phase {
                next.last_transition_time = Some(Time(now));
            }
            next.phase = phase;
        };
        match self {
            Transition::Restart { generation } => {
                next = ImageBackupStatus {
                    observed_generation: *generation,
                    last_transition_time: Some(Time(now)),
                    ..ImageBackupStatus::default()
                };
            }
            Transition::Waiting { message } => {
                moved(&mut next, Phase::Pending);
                next.message = Some(message.clone());
            }
            Transition::Assigned { agent_id, node, attempt } => {
                moved(&mut next, Phase::Assigned);
                next.last_transition_time = Some(Time(now));
                next.agent = Some(agent_id.clone());
                next.node = Some(node.clone());
                next.attempts = *attempt;
                next.bytes_done = 0;
                next.bytes_total = 0;
                next.progress = None;
                next.message = Some(format!("copying on node {node} (attempt {attempt})"));
                next.missing_platforms.clear();
            }
            Transition::Progress { bytes_done, bytes_total } => {
                moved(&mut next, Phase::Pushing);
                next.bytes_done = *bytes_done;
                next.bytes_total = *bytes_total;
                next.progress = Some(image_backup_proto::progress_summary(*bytes_done, *bytes_total));
            }
            Transition::Completed { reference, bytes } => {
                moved(&mut next, Phase::Completed);
                next.backup_reference = Some(reference.clone());
                next.bytes_done = next.bytes_total.max(*bytes);
                next.bytes_total = next.bytes_done;
                next.progress = Some("100%".into());
                next.last_error = None;
                next.message = None;
                next.missing_platforms.clear();
            }
            Transition::Retry { error, missing } | Transition::Failed { error, missing } => {
                let phase = if matches!(self, Transition::Retry { .. }) { Phase::Pending } else { Phase::Failed };
                moved(&mut next, phase);
                next.last_transition_time = Some(Time(now));
                next.last_error = Some(error.clone());
                next.missing_platforms = missing.clone();
                next.message = (phase == Phase::Pending).then(|| format!("retrying after attempt {}", next.attempts));
            }
            Transition::Lost { error } => {
                moved(&mut next, Phase::Pending);
                next.last_transition_time = Some(Time(now));
                next.last_error = Some(error.clone());
                next.message = Some("the copy moves to another agent".into());
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn limits() -> Limits {
        Limits { max_attempts: 3, retry_backoff: Duration::from_secs(10), grace: Duration::from_secs(30) }
    }

    fn status(phase: Phase, attempts: u32) -> ImageBackupStatus {
        ImageBackupStatus {
            phase,
            attempts,
            observed_generation: 1,
            agent: Some("agent-a".into()),
            node: Some("node-a".into()),
            ..ImageBackupStatus::default()
        }
    }

    fn observed<'a>(status: &'a ImageBackupStatus, live: Option<&'a LiveJob>) -> Observed<'a> {
        Observed {
            generation: 1,
            digest: DIGEST,
            status,
            live,
            holder: Holder::Running,
            holders: Holders::default(),
            target: Some("r@sha256:x"),
            since_transition: Duration::from_secs(1),
            since_report: None,
            uptime: Duration::from_secs(3600),
        }
    }

    fn live(outcome: Option<Outcome>) -> LiveJob {
        LiveJob {
            attempt: 1,
            digest: DIGEST.into(),
            agent_id: "agent-a".into(),
            bytes_done: 0,
            bytes_total: 0,
            outcome,
            updated: std::time::Instant::now(),
        }
    }

    #[test]
    fn a_new_generation_starts_over() {
        let done = status(Phase::Completed, 2);
        let o = Observed { generation: 2, ..observed(&done, None) };
        assert_eq!(next(&o, &limits()), Next::Record(Transition::Restart { generation: 2 }));
        let fresh = Transition::Restart { generation: 2 }.apply(&done, Timestamp::now());
        assert_eq!((fresh.phase, fresh.attempts, fresh.observed_generation), (Phase::Pending, 0, 2));
        assert_eq!(fresh.backup_reference, None);
    }

    #[test]
    fn pending_goes_to_a_free_holder_and_says_why_it_waits_otherwise() {
        let pending = status(Phase::Pending, 0);
        let mut o = observed(&pending, None);
        o.holders = Holders { free: Some(("agent-b".into(), "node-b".into())), busy: 1 };
        assert_eq!(next(&o, &limits()), Next::Assign { agent_id: "agent-b".into(), node: "node-b".into(), attempt: 1 });
        o.holders = Holders { free: None, busy: 2 };
        let Next::Record(Transition::Waiting { message }) = next(&o, &limits()) else { panic!() };
        assert!(message.starts_with("waiting for a free agent"), "{message}");
        o.holders = Holders::default();
        let Next::Record(Transition::Waiting { message }) = next(&o, &limits()) else { panic!() };
        assert!(message.starts_with("no connected agent runs on a node that holds"), "{message}");
        let recorded = ImageBackupStatus { message: Some(message), ..pending.clone() };
        assert_eq!(next(&observed(&recorded, None), &limits()), Next::Idle, "the same reason is not written again");
    }

    #[test]
    fn a_failed_attempt_backs_off_doubling_then_stays_failed() {
        let retried = status(Phase::Pending, 2);
        let o = Observed { since_transition: Duration::from_secs(5), ..observed(&retried, None) };
        assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(15)), "20 s backoff after attempt 2");
        let failure = JobFailure { message: "registry said 500".into(), retryable: true, ..JobFailure::default() };
        assert!(matches!(failed(&status(Phase::Pushing, 2), &limits(), &failure), Transition::Retry { .. }));
        assert!(matches!(failed(&status(Phase::Pushing, 3), &limits(), &failure), Transition::Failed { .. }));
        let refused = JobFailure { retryable: false, ..failure };
        assert!(matches!(failed(&status(Phase::Pushing, 1), &limits(), &refused), Transition::Failed { .. }));
    }

    #[test]
    fn reports_become_progress_verification_or_failure() {
        let pushing = status(Phase::Assigned, 1);
        let mut report = live(None);
        report.bytes_done = 50;
        report.bytes_total = 100;
        assert_eq!(
            next(&observed(&pushing, Some(&report)), &limits()),
            Next::Record(Transition::Progress { bytes_done: 50, bytes_total: 100 })
        );
        let shown = Transition::Progress { bytes_done: 50, bytes_total: 100 }.apply(&pushing, Timestamp::now());
        assert_eq!(shown.progress.as_deref(), Some("50% 0.0/0.0 MB"));
        let unchanged = next(&observed(&shown, Some(&report)), &limits());
        assert_eq!(unchanged, Next::After(limits().grace), "same progress is not written again");
        let success = live(Some(Outcome::Success(JobSuccess::default())));
        assert!(matches!(next(&observed(&pushing, Some(&success)), &limits()), Next::Verify(_)));
        let lost = live(Some(Outcome::Lost("gone".into())));
        assert_eq!(
            next(&observed(&pushing, Some(&lost)), &limits()),
            Next::Record(Transition::Lost { error: "gone".into() })
        );
    }

    #[test]
    fn an_agent_that_forgot_the_job_or_went_away_loses_it_after_the_grace() {
        let assigned = status(Phase::Assigned, 1);
        let mut o = observed(&assigned, None);
        assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(30)), "looked at again after the grace");
        o.holder = Holder::NotRunning;
        assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(29)));
        o.since_transition = Duration::from_secs(31);
        assert!(matches!(next(&o, &limits()), Next::Record(Transition::Lost { .. })));
        o.holder = Holder::Absent;
        o.uptime = Duration::from_secs(10);
        assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(20)), "a restarted coordinator waits");
    }

    #[test]
    fn a_backup_made_for_another_location_is_made_again() {
        let mut done = status(Phase::Completed, 1);
        done.backup_reference = Some("old.registry/r@sha256:x".into());
        assert_eq!(next(&observed(&done, None), &limits()), Next::Record(Transition::Restart { generation: 1 }));
        done.backup_reference = Some("r@sha256:x".into());
        assert_eq!(next(&observed(&done, None), &limits()), Next::Idle);
    }

    #[test]
    fn a_recent_report_extends_the_grace() {
        let pushing = status(Phase::Pushing, 1);
        let o = Observed {
            holder: Holder::NotRunning,
            since_transition: Duration::from_secs(300),
            since_report: Some(Duration::from_secs(10)),
            ..observed(&pushing, None)
        };
        assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(20)));
    }

    #[test]
    fn completion_clears_errors_and_keeps_the_reference() {
        let mut pushing = status(Phase::Pushing, 2);
        pushing.last_error = Some("earlier failure".into());
        pushing.bytes_total = 300;
        let done =
            Transition::Completed { reference: "r@sha256:x".into(), bytes: 200 }.apply(&pushing, Timestamp::now());
        assert_eq!(done.phase, Phase::Completed);
        assert_eq!((done.last_error, done.backup_reference.as_deref()), (None, Some("r@sha256:x")));
        assert_eq!((done.bytes_done, done.bytes_total), (300, 300));
    }
}
