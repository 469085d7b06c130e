//! The one next step of a job, from what its record says and what the
//! agents report: pure functions the ImageBackup reconciler performs the
//! steps of (an assignment, a registry check, a status write).

use std::time::Duration;

use super::{
    Failure, Finish, LiveJob, Outcome, Phase, Status, Success, Transition,
    plan::{self, Holdings, Part, Plan},
};

/// The limits the machine keeps to.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Failed attempts in a row after which a job is marked Stalled (a
    /// transient failure is retried for as long as it lasts), and lost
    /// copies in a row after which it fails.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles per attempt.
    pub retry_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
    /// How long an agent may be silent about a job it was given.
    pub grace: Duration,
    /// How long children of an index that no connected node holds are
    /// waited for before the backup goes without them (or fails).
    pub reduce_after: Duration,
    /// Fail rather than push a reduced index.
    pub require_complete: bool,
    /// How often a Completed backup is looked for in the registry again;
    /// zero never.
    pub verify_every: Duration,
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

/// Everything the machine looks at for one ImageBackup.
#[derive(Clone, Debug)]
pub struct Observed<'a> {
    pub generation: i64,
    pub digest: &'a str,
    pub status: &'a Status,
    /// Reports of the attempt status names, from the agent it names.
    pub live: Option<&'a LiveJob>,
    pub holder: Holder,
    /// What connected agents hold of the image (only read while Pending).
    pub holdings: Holdings,
    /// The pinned backup reference the spec and the configured location
    /// give now; `None` when the source is not a valid reference.
    pub target: Option<&'a str>,
    pub since_transition: Duration,
    /// Since the backup was last seen in the registry.
    pub since_verified: Duration,
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
    /// Look for the Completed backup in the registry again.
    Reverify,
    /// Hand the attempt to this agent, then record it.
    Assign {
        agent_id: String,
        node: String,
        attempt: u32,
        part: Part,
    },
    /// The agent says the copy is done: look in the registry, then record.
    Verify(Success),
    Record(Transition),
}

/// Backoff after `failures` failed attempts in a row: doubling per failure
/// up to `max_backoff`, less up to a fifth by a jitter fixed per job
/// (`seed`) and failure count, so that jobs failing together (a registry
/// down) do not all retry together; fixed, so that the decision and the
/// requeue agree and the machine stays pure.
pub fn backoff(limits: &Limits, failures: u32, seed: &str) -> Duration {
    use std::hash::{Hash, Hasher};
    let doubled = limits.retry_backoff.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)));
    let capped = doubled.min(limits.max_backoff.max(limits.retry_backoff));
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (seed, failures).hash(&mut hasher);
    let per_mille = 1000 - u32::try_from(hasher.finish() % 200).unwrap_or(0);
    capped.mul_f64(f64::from(per_mille) / 1000.0)
}

pub fn next(observed: &Observed<'_>, limits: &Limits) -> Next {
    let status = observed.status;
    if status.observed_generation != observed.generation {
        return Next::Record(Transition::Restart { generation: observed.generation });
    }
    match status.phase {
        // A backup made for another location (the settings changed) is
        // not the one workloads would be pointed at: copy it again.
        Phase::Completed if observed.target.is_some_and(|target| !made_for(status, target)) => {
            Next::Record(Transition::Restart { generation: observed.generation })
        }
        Phase::Completed if limits.verify_every.is_zero() => Next::Idle,
        Phase::Completed if observed.since_verified >= limits.verify_every => Next::Reverify,
        Phase::Completed => Next::After(limits.verify_every - observed.since_verified),
        Phase::Failed => Next::Idle,
        Phase::Pending => {
            // Right after a failure (a copied part clears the error, not
            // the count: a job that keeps failing where it last got to
            // still runs out of attempts).
            if status.failures > 0 && status.last_error.is_some() {
                let wait = backoff(limits, status.failures, observed.digest);
                if observed.since_transition < wait {
                    return Next::After(wait - observed.since_transition);
                }
            }
            pending(observed, limits)
        }
        Phase::Assigned | Phase::Pushing => in_flight(observed, limits),
    }
}

/// Whether a Completed backup is at `target`: the same reference, or for a
/// reduced index (a digest of its own) the same repository.
fn made_for(status: &Status, target: &str) -> bool {
    let repository = |reference: &str| reference.split_once('@').map(|(name, _)| name.to_string());
    match status.backup_reference.as_deref() {
        Some(reference) if status.reduced => repository(reference) == repository(target),
        Some(reference) => reference == target,
        None => false,
    }
}

/// The next part of a pending job, or why it waits.
pub fn pending(observed: &Observed<'_>, limits: &Limits) -> Next {
    let status = observed.status;
    let assign = |agent_id: String, node: String, part: Part| Next::Assign {
        agent_id,
        node,
        attempt: status.attempts + 1,
        part,
    };
    let (left, platforms, finisher, in_use) = match plan::next(status, &observed.holdings, observed.digest) {
        Plan::Assign { agent_id, node, part } => return assign(agent_id, node, part),
        Plan::Wait(message) => return waiting(status, message, None),
        // A backup gone from the registry that no node can copy again:
        // once nodes had the time to connect, its workloads must move back
        // to their sources before their pods next pull.
        Plan::Absent(message) if status.lost_at.is_some() => {
            let waited = observed.since_transition.min(observed.uptime);
            if waited >= limits.reduce_after {
                let error = format!("gone from the backup registry, and {message} to copy it again");
                return Next::Record(Transition::Failed { error, absent: Vec::new() });
            }
            return waiting(status, message, Some(limits.reduce_after - waited));
        }
        Plan::Absent(message) => return waiting(status, message, None),
        Plan::Nowhere { left, platforms, finisher, in_use } => (left, platforms, finisher, in_use),
    };
    let list = platforms.join(", ");
    let digest = observed.digest;
    let copied = plan::copied(status);
    // After a coordinator restart, agents get the grace to reconnect.
    let waited = observed.since_transition.min(observed.uptime);
    // Nothing to keep, or a platform a node runs would be left out: no
    // reduced index will do, so the source is tried again after each wait.
    let stuck = copied.is_empty() || !in_use.is_empty();
    let try_source = match &status.source_error {
        None => true,
        Some(_) => stuck && !limits.require_complete && waited >= limits.reduce_after,
    };
    if try_source {
        // What no node holds comes from the source, with the index.
        return match finisher {
            Some((agent_id, node)) => {
                assign(agent_id, node, Part { from_source: left, finish: Finish::Index, ..Part::default() })
            }
            None => waiting(
                status,
                format!("waiting for a free agent on a node that holds {digest} to copy {list} from the source"),
                None,
            ),
        };
    }
    let source_error = status.source_error.as_deref().unwrap_or_default();
    if waited < limits.reduce_after {
        let after = limits.reduce_after.as_secs();
        let then = if limits.require_complete {
            format!("the backup fails unless a node brings them within {after}s")
        } else if !in_use.is_empty() {
            format!(
                "{} run it on nodes that lack parts of it, so it is never backed up without them: the source is tried again in {after}s",
                in_use.join(", ")
            )
        } else if copied.is_empty() {
            format!("no platform is whole on any node: the source is tried again in {after}s")
        } else {
            format!("a reduced index goes without them unless a node brings them within {after}s")
        };
        let message = format!(
            "platforms {list} of {digest} are on no connected node and not in the source ({source_error}); {then}"
        );
        return waiting(status, message, Some(limits.reduce_after - waited));
    }
    if limits.require_complete {
        let error = format!(
            "index {digest} is incomplete: platforms {list} are on no connected node and not in the source ({source_error})"
        );
        return Next::Record(Transition::Failed { error, absent: Vec::new() });
    }
    match finisher {
        Some((agent_id, node)) => {
            let mut keep: Vec<String> = copied.into_iter().map(str::to_string).collect();
            keep.sort();
            assign(agent_id, node, Part { finish: Finish::Reduced, keep, ..Part::default() })
        }
        None => {
            let message = format!("waiting for a free agent on a node that holds {digest} to push a reduced index");
            waiting(status, message, None)
        }
    }
}

/// A pending job no agent can take now: says why, once; looks again after
/// `recheck`, if given, unless something wakes it first.
pub fn waiting(status: &Status, message: String, recheck: Option<Duration>) -> Next {
    if status.message.as_deref() != Some(message.as_str()) {
        return Next::Record(Transition::Waiting { message, recheck });
    }
    recheck.map_or(Next::Idle, Next::After)
}

fn in_flight(observed: &Observed<'_>, limits: &Limits) -> Next {
    let status = observed.status;
    let agent = status.agent.as_deref().unwrap_or("?");
    let node = status.node.as_deref().unwrap_or("?");
    if let Some(live) = observed.live {
        match &live.outcome {
            // A part of an index: recorded, and the next part planned.
            Some(Outcome::Success(success)) if success.digest.is_empty() => {
                return Next::Record(if success.pushed_manifests.is_empty() {
                    let message = format!("agent {agent} on node {node} reported a copy of nothing");
                    failed(status, limits, &Failure { message, retryable: true, ..Failure::default() }, observed.digest)
                } else {
                    Transition::Copied {
                        node: node.to_string(),
                        manifests: success.pushed_manifests.clone(),
                        from_source: success.from_source.clone(),
                    }
                });
            }
            // Only a reduced index has a digest of its own, and only an
            // attempt planned to push one may report it: the agent does not
            // choose what a backup is.
            Some(Outcome::Success(success)) if success.digest != observed.digest && !status.reducing => {
                let error = format!(
                    "agent {agent} on node {node} reported {} pushed where the plan was the source's own {}: refused",
                    success.digest, observed.digest
                );
                return Next::Record(Transition::Failed { error, absent: Vec::new() });
            }
            Some(Outcome::Success(success)) => return Next::Verify(success.clone()),
            Some(Outcome::Failure(failure)) if failure.source_failed => {
                return Next::Record(Transition::SourceFailed { error: failure.message.clone() });
            }
            Some(Outcome::Failure(failure)) => return Next::Record(failed(status, limits, failure, observed.digest)),
            Some(Outcome::Lost(reason)) => return Next::Record(lost(status, limits, reason.clone())),
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
            Next::Record(lost(status, limits, format!("agent {agent} on node {node} no longer runs the copy")))
        }
        Holder::Absent if observed.uptime < grace => Next::After(grace - observed.uptime),
        Holder::Absent => Next::Record(lost(status, limits, format!("agent {agent} on node {node} is not connected"))),
    }
}

/// A failed attempt: retried, with a backoff, whenever retrying can help;
/// marked stalled once it has failed `max_attempts` times in a row.
pub fn failed(status: &Status, limits: &Limits, failure: &Failure, digest: &str) -> Transition {
    let (error, absent) = (failure.message.clone(), failure.absent_manifests.clone());
    if !failure.retryable {
        return Transition::Failed { error, absent };
    }
    let failures = status.failures + 1;
    Transition::Retry {
        error,
        absent,
        stalled: failures >= limits.max_attempts,
        retry_in: backoff(limits, failures, digest),
    }
}

/// The agent went away mid-copy: another takes it, unless copies were lost
/// `max_attempts` times in a row, which says the copy is what stops agents.
pub fn lost(status: &Status, limits: &Limits, error: String) -> Transition {
    let failures = status.failures + 1;
    if failures >= limits.max_attempts {
        let error = format!("{error}; the copy was lost {failures} times in a row, so it is not tried again");
        return Transition::Failed { error, absent: Vec::new() };
    }
    Transition::Lost { error }
}
