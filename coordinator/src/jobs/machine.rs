//! The ImageBackup state machine, as pure functions: from what the status
//! records and what the agents report, the one next step; and each step's
//! change to the status. The reconciler performs the step (an assignment, a
//! registry check, a status write); nothing here does I/O.

use std::time::Duration;

use image_backup_crds::{ImageBackupStatus, Phase, PlatformCopy};
use image_backup_proto::v1::{Finish, JobFailure, JobSuccess};
use k8s_openapi::{
    apimachinery::pkg::apis::meta::v1::{Condition, Time},
    jiff::Timestamp,
};

use super::{
    live::{LiveJob, Outcome},
    plan::{self, Child, Holdings, Part, Plan},
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
    pub status: &'a ImageBackupStatus,
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
    /// No agent can take the job now; says why, and when to look again
    /// if nothing else changes.
    Waiting {
        message: String,
        recheck: Option<Duration>,
    },
    Assigned {
        agent_id: String,
        node: String,
        attempt: u32,
        /// For an index: its children, kept in status with their copies.
        children: Vec<Child>,
        part: Part,
    },
    Progress {
        bytes_done: u64,
        bytes_total: u64,
    },
    /// Part of an index is in the backup registry; the next part follows.
    Copied {
        node: String,
        manifests: Vec<String>,
        /// Those of `manifests` read from the source registry.
        from_source: Vec<String>,
    },
    Completed {
        reference: String,
        bytes: u64,
        node: String,
        /// Children of an index this last part copied.
        manifests: Vec<String>,
        from_source: Vec<String>,
        /// The backup is a reduced index.
        reduced: bool,
        /// Referrers copied from the source, and why not all, if so.
        referrers: Vec<String>,
        referrers_error: Option<String>,
    },
    /// What no node holds could not come from the source registry.
    SourceFailed {
        error: String,
    },
    /// The attempt failed, and retrying can help; another follows after
    /// `retry_in`. `absent` are children the backup registry turned out
    /// not to hold. `stalled` once it has failed `max_attempts` times in a
    /// row: it still retries, under a condition people see.
    Retry {
        error: String,
        absent: Vec<String>,
        stalled: bool,
        retry_in: Duration,
    },
    /// Retrying cannot help (refused, a digest mismatch), or the copy was
    /// lost too many times in a row.
    Failed {
        error: String,
        absent: Vec<String>,
    },
    /// The agent went away mid-copy; another takes it.
    Lost {
        error: String,
    },
    /// A Completed backup is still in the registry.
    Verified,
    /// A Completed backup is gone from the registry: copied again from the
    /// start.
    Missing {
        error: String,
    },
}

/// The condition a job that keeps failing is marked with.
pub const STALLED: &str = "Stalled";

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
fn made_for(status: &ImageBackupStatus, target: &str) -> bool {
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
pub fn waiting(status: &ImageBackupStatus, message: String, recheck: Option<Duration>) -> Next {
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
                    failed(
                        status,
                        limits,
                        &JobFailure { message, retryable: true, ..JobFailure::default() },
                        observed.digest,
                    )
                } else {
                    Transition::Copied {
                        node: node.to_string(),
                        manifests: success.pushed_manifests.iter().map(|m| m.digest.clone()).collect(),
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
pub fn failed(status: &ImageBackupStatus, limits: &Limits, failure: &JobFailure, digest: &str) -> Transition {
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
pub fn lost(status: &ImageBackupStatus, limits: &Limits, error: String) -> Transition {
    let failures = status.failures + 1;
    if failures >= limits.max_attempts {
        let error = format!("{error}; the copy was lost {failures} times in a row, so it is not tried again");
        return Transition::Failed { error, absent: Vec::new() };
    }
    Transition::Lost { error }
}

/// Records where each child of `manifests` came from: the source for
/// those in `from_source`, else `node`.
fn mark_copied(status: &mut ImageBackupStatus, manifests: &[String], from_source: &[String], node: &str) {
    for platform in status.platforms.iter_mut().filter(|p| manifests.contains(&p.digest)) {
        let from = if from_source.contains(&platform.digest) { "source".to_string() } else { format!("node/{node}") };
        platform.copied_from = Some(from);
    }
}

fn platform_label(platform: &PlatformCopy) -> String {
    plan::platform_label(&Child {
        platform: platform.platform.clone(),
        digest: platform.digest.clone(),
        attestation: platform.attestation,
    })
}

/// `linux/amd64, linux/arm64`: the platforms of these children.
fn platforms_of(manifests: &[String], platforms: &[PlatformCopy]) -> String {
    let names: Vec<String> = platforms.iter().filter(|p| manifests.contains(&p.digest)).map(platform_label).collect();
    if names.is_empty() { format!("{} manifest(s)", manifests.len()) } else { names.join(", ") }
}

/// What an assignment does, in words.
fn describe(part: &Part, platforms: &[PlatformCopy]) -> String {
    let children = platforms_of(&part.manifests, platforms);
    if !part.from_source.is_empty() {
        let sourced = platforms_of(&part.from_source, platforms);
        return match part.manifests.is_empty() {
            true => format!("copying {sourced} from the source, then the index,"),
            false => format!("copying {children}, {sourced} from the source, then the index,"),
        };
    }
    match (part.finish, part.manifests.is_empty()) {
        (Finish::Whole, _) => "copying".into(),
        (Finish::None, _) => format!("copying {children}"),
        (Finish::Index, true) => "pushing the index".into(),
        (Finish::Index, false) => format!("copying {children} and the index"),
        (Finish::Reduced, _) => "pushing a reduced index".into(),
    }
}

/// Marks the job stalled with `message`, or clears the mark (`None`).
fn set_stalled(status: &mut ImageBackupStatus, message: Option<String>, now: Timestamp) {
    let since = status.conditions.iter().find(|c| c.type_ == STALLED).map(|c| c.last_transition_time.clone());
    status.conditions.retain(|c| c.type_ != STALLED);
    if let Some(message) = message {
        status.conditions.push(Condition {
            type_: STALLED.into(),
            status: "True".into(),
            reason: "RetryingTransientFailure".into(),
            message,
            // When it started stalling, not its latest attempt.
            last_transition_time: since.unwrap_or(Time(now)),
            observed_generation: Some(status.observed_generation),
        });
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
            Transition::Waiting { message, .. } => {
                moved(&mut next, Phase::Pending);
                next.message = Some(message.clone());
            }
            Transition::Assigned { agent_id, node, attempt, children, part } => {
                moved(&mut next, Phase::Assigned);
                next.last_transition_time = Some(Time(now));
                next.agent = Some(agent_id.clone());
                next.node = Some(node.clone());
                next.attempts = *attempt;
                next.reducing = part.finish == Finish::Reduced;
                next.bytes_done = 0;
                next.bytes_total = 0;
                next.progress = None;
                if !children.is_empty() {
                    next.platforms = children
                        .iter()
                        .map(|c| PlatformCopy {
                            platform: c.platform.clone(),
                            digest: c.digest.clone(),
                            attestation: c.attestation,
                            copied_from: status
                                .platforms
                                .iter()
                                .find(|p| p.digest == c.digest)
                                .and_then(|p| p.copied_from.clone()),
                        })
                        .collect();
                }
                next.message = Some(format!("{} on node {node} (attempt {attempt})", describe(part, &next.platforms)));
            }
            Transition::Progress { bytes_done, bytes_total } => {
                moved(&mut next, Phase::Pushing);
                next.bytes_done = *bytes_done;
                next.bytes_total = *bytes_total;
                next.progress = Some(image_backup_proto::progress_summary(*bytes_done, *bytes_total));
            }
            Transition::Copied { node, manifests, from_source } => {
                moved(&mut next, Phase::Pending);
                next.last_transition_time = Some(Time(now));
                mark_copied(&mut next, manifests, from_source, node);
                next.last_error = None;
                set_stalled(&mut next, None, now);
                next.message = Some(format!("copied {} from node {node}", platforms_of(manifests, &next.platforms)));
            }
            Transition::Completed {
                reference,
                bytes,
                node,
                manifests,
                from_source,
                reduced,
                referrers,
                referrers_error,
            } => {
                moved(&mut next, Phase::Completed);
                next.last_verified = Some(Time(now));
                next.lost_at = None;
                next.backup_reference = Some(reference.clone());
                next.bytes_done = next.bytes_total.max(*bytes);
                next.bytes_total = next.bytes_done;
                next.progress = Some("100%".into());
                next.failures = 0;
                next.last_error = None;
                set_stalled(&mut next, None, now);
                mark_copied(&mut next, manifests, from_source, node);
                next.reduced = *reduced;
                next.referrers = referrers.clone();
                next.referrers_error = referrers_error.clone();
                next.left_out.clear();
                for platform in &mut next.platforms {
                    if platform.copied_from.is_some() {
                        continue;
                    }
                    if *reduced {
                        next.left_out.push(platform_label(platform));
                    } else {
                        // An exact index is accepted only with every child
                        // there: this one was in the backup registry already.
                        platform.copied_from = Some("registry".into());
                    }
                }
                next.message =
                    reduced.then(|| format!("reduced index: {} left out (on no node)", next.left_out.join(", ")));
            }
            Transition::Retry { error, absent, .. } | Transition::Failed { error, absent } => {
                let phase = if matches!(self, Transition::Retry { .. }) { Phase::Pending } else { Phase::Failed };
                moved(&mut next, phase);
                next.last_transition_time = Some(Time(now));
                next.last_error = Some(error.clone());
                next.failures += 1;
                for platform in next.platforms.iter_mut().filter(|p| absent.contains(&p.digest)) {
                    platform.copied_from = None;
                }
                next.message = None;
                if let Transition::Retry { stalled, retry_in, .. } = self {
                    let retry_in = humantime::format_duration(Duration::from_secs(retry_in.as_secs().max(1)));
                    let message = if *stalled {
                        let stalled =
                            format!("{} attempts in a row failed; retrying in {retry_in}: {error}", next.failures);
                        set_stalled(&mut next, Some(stalled.clone()), now);
                        stalled
                    } else {
                        format!("attempt {} failed; retrying in {retry_in}", next.attempts)
                    };
                    next.message = Some(message);
                }
            }
            Transition::SourceFailed { error } => {
                moved(&mut next, Phase::Pending);
                next.last_transition_time = Some(Time(now));
                next.source_error = Some(error.clone());
                next.last_error = Some(error.clone());
                next.message = Some("the source cannot provide what no node holds".into());
            }
            Transition::Lost { error } => {
                moved(&mut next, Phase::Pending);
                next.last_transition_time = Some(Time(now));
                next.last_error = Some(error.clone());
                next.failures += 1;
                next.message = Some("the copy moves to another agent".into());
            }
            Transition::Verified => next.last_verified = Some(Time(now)),
            Transition::Missing { error } => {
                // A new series of attempts, as for a new digest; what the
                // workloads were told stays.
                next = ImageBackupStatus {
                    observed_generation: status.observed_generation,
                    last_transition_time: Some(Time(now)),
                    lost_at: Some(Time(now)),
                    backup_reference: status.backup_reference.clone(),
                    last_error: Some(error.clone()),
                    message: Some("gone from the backup registry; copying it again".into()),
                    workloads: status.workloads.clone(),
                    ..ImageBackupStatus::default()
                };
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::plan::Holding;
    use image_backup_proto::v1::PlatformManifest;

    const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn limits() -> Limits {
        Limits {
            max_attempts: 3,
            retry_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(60),
            grace: Duration::from_secs(30),
            reduce_after: Duration::from_secs(60),
            require_complete: false,
            verify_every: Duration::from_secs(3600),
        }
    }

    fn status(phase: Phase, attempts: u32) -> ImageBackupStatus {
        ImageBackupStatus {
            phase,
            attempts,
            failures: attempts.saturating_sub(1),
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
            holdings: Holdings::default(),
            target: Some("r@sha256:x"),
            since_transition: Duration::from_secs(1),
            since_verified: Duration::ZERO,
            since_report: None,
            uptime: Duration::from_secs(3600),
        }
    }

    fn holding(agent: &str, free: bool, children: &[&str]) -> Holding {
        Holding {
            agent_id: agent.into(),
            node: format!("node-{agent}"),
            free,
            root: true,
            children: children.iter().map(|c| c.to_string()).collect(),
            platform: "linux/amd64".into(),
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
        o.holdings =
            Holdings { children: vec![], agents: vec![holding("agent-a", false, &[]), holding("agent-b", true, &[])] };
        let assigned =
            Next::Assign { agent_id: "agent-b".into(), node: "node-agent-b".into(), attempt: 1, part: Part::default() };
        assert_eq!(next(&o, &limits()), assigned);
        o.holdings.agents.pop();
        let Next::Record(Transition::Waiting { message, .. }) = next(&o, &limits()) else { panic!() };
        assert!(message.starts_with("waiting for a free agent"), "{message}");
        o.holdings = Holdings::default();
        let Next::Record(Transition::Waiting { message, .. }) = next(&o, &limits()) else { panic!() };
        assert!(message.starts_with("no connected agent runs on a node that holds"), "{message}");
        let recorded = ImageBackupStatus { message: Some(message), ..pending.clone() };
        assert_eq!(next(&observed(&recorded, None), &limits()), Next::Idle, "the same reason is not written again");
    }

    #[test]
    fn a_completed_backup_is_looked_for_again_on_schedule() {
        let done = ImageBackupStatus { backup_reference: Some("r@sha256:x".into()), ..status(Phase::Completed, 1) };
        let o = Observed { since_verified: Duration::from_secs(600), ..observed(&done, None) };
        assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(3000)));
        let o = Observed { since_verified: Duration::from_secs(3600), ..observed(&done, None) };
        assert_eq!(next(&o, &limits()), Next::Reverify);
        let never = Limits { verify_every: Duration::ZERO, ..limits() };
        assert_eq!(next(&o, &never), Next::Idle);
        let now = Timestamp::now();
        assert_eq!(Transition::Verified.apply(&done, now).last_verified, Some(Time(now)));
    }

    #[test]
    fn a_lost_backup_is_copied_again_or_fails_when_no_node_holds_it() {
        let done = ImageBackupStatus { backup_reference: Some("r@sha256:x".into()), ..status(Phase::Completed, 1) };
        let lost = Transition::Missing { error: "gone".into() }.apply(&done, Timestamp::now());
        assert_eq!((lost.phase, lost.attempts, lost.lost_at.is_some()), (Phase::Pending, 0, true));
        assert_eq!(lost.backup_reference, done.backup_reference, "workloads pinned to it are found by it");
        // A node holds it: copied again.
        let mut o = observed(&lost, None);
        o.holdings = Holdings { children: vec![], agents: vec![holding("agent-a", true, &[])] };
        assert!(matches!(next(&o, &limits()), Next::Assign { .. }));
        // None does: nodes get the time to connect, then it fails.
        o.holdings = Holdings::default();
        let Next::Record(Transition::Waiting { recheck, .. }) = next(&o, &limits()) else { panic!() };
        assert_eq!(recheck, Some(Duration::from_secs(59)));
        o.since_transition = Duration::from_secs(60);
        let Next::Record(Transition::Failed { error, .. }) = next(&o, &limits()) else { panic!() };
        assert!(error.contains("gone from the backup registry"), "{error}");
        let completed = Transition::Completed {
            reference: "r@sha256:x".into(),
            bytes: 0,
            node: "node-a".into(),
            manifests: vec![],
            from_source: vec![],
            reduced: false,
            referrers: vec![],
            referrers_error: None,
        };
        assert_eq!(completed.apply(&lost, Timestamp::now()).lost_at, None);
    }

    #[test]
    fn backoff_doubles_to_its_cap_less_a_jitter_fixed_per_job() {
        let l = limits();
        let secs = |failures| backoff(&l, failures, DIGEST).as_secs_f64();
        for (failures, full) in [(1, 10.0), (2, 20.0), (3, 40.0), (4, 60.0), (30, 60.0)] {
            let wait = secs(failures);
            assert!(wait <= full && wait > full * 0.8, "{failures} failure(s): {wait} s, not within 80-100% of {full}");
        }
        assert_eq!(backoff(&l, 3, DIGEST), backoff(&l, 3, DIGEST), "the decision and the requeue agree");
        let spread: std::collections::HashSet<_> = (0..20).map(|i| backoff(&l, 3, &format!("sha256:{i}"))).collect();
        assert!(spread.len() > 10, "jobs that failed together retry apart: {spread:?}");
    }

    #[test]
    fn a_transient_failure_is_retried_for_as_long_as_it_lasts_stalled_after_the_limit() {
        let retried = ImageBackupStatus { failures: 2, last_error: Some("500".into()), ..status(Phase::Pending, 2) };
        let o = Observed { since_transition: Duration::from_secs(5), ..observed(&retried, None) };
        let wait = backoff(&limits(), 2, DIGEST);
        assert_eq!(next(&o, &limits()), Next::After(wait - Duration::from_secs(5)), "the backoff after attempt 2");

        let failure = JobFailure { message: "registry said 500".into(), retryable: true, ..JobFailure::default() };
        let first = failed(&status(Phase::Pushing, 1), &limits(), &failure, DIGEST);
        assert!(matches!(first, Transition::Retry { stalled: false, .. }));
        let after = first.apply(&status(Phase::Pushing, 1), Timestamp::now());
        assert_eq!(after.phase, Phase::Pending);
        assert!(after.conditions.is_empty());
        assert!(after.message.as_deref().is_some_and(|m| m.starts_with("attempt 1 failed; retrying in")));

        // Past the limit: still retried, never Failed, and marked Stalled
        // with the reason; the mark stays dated from when it began.
        let mut pushing = status(Phase::Pushing, 40);
        for _ in 0..2 {
            let retry = failed(&pushing, &limits(), &failure, DIGEST);
            let Transition::Retry { stalled: true, retry_in, .. } = retry else { panic!("{retry:?}") };
            assert!(retry_in <= limits().max_backoff, "capped: {retry_in:?}");
            let since = pushing.conditions.first().map(|c| c.last_transition_time.clone());
            pushing = retry.apply(&pushing, Timestamp::now());
            assert_eq!(pushing.phase, Phase::Pending);
            let stalled = &pushing.conditions[0];
            assert_eq!((stalled.type_.as_str(), stalled.status.as_str()), (STALLED, "True"));
            assert!(stalled.message.contains("registry said 500"), "{}", stalled.message);
            if let Some(since) = since {
                assert_eq!(stalled.last_transition_time, since);
            }
            pushing.phase = Phase::Pushing;
        }
        // It heals: the mark goes with the first success.
        let copied = Transition::Copied { node: "node-a".into(), manifests: vec![], from_source: vec![] };
        assert!(copied.apply(&pushing, Timestamp::now()).conditions.is_empty());

        // What retrying cannot heal fails at once.
        let refused = JobFailure { retryable: false, ..failure };
        assert!(matches!(failed(&status(Phase::Pushing, 1), &limits(), &refused, DIGEST), Transition::Failed { .. }));
    }

    #[test]
    fn a_copy_lost_too_many_times_in_a_row_fails() {
        let mut pushing = status(Phase::Pushing, 1);
        pushing.failures = 1;
        let lost_once = live(Some(Outcome::Lost("agent gone".into())));
        assert_eq!(
            next(&observed(&pushing, Some(&lost_once)), &limits()),
            Next::Record(Transition::Lost { error: "agent gone".into() })
        );
        pushing.failures = 2;
        let Next::Record(Transition::Failed { error, .. }) = next(&observed(&pushing, Some(&lost_once)), &limits())
        else {
            panic!("the third loss in a row ends it")
        };
        assert!(error.contains("lost 3 times in a row"), "{error}");
        let absent =
            Observed { holder: Holder::Absent, since_transition: Duration::from_secs(60), ..observed(&pushing, None) };
        assert!(matches!(next(&absent, &limits()), Next::Record(Transition::Failed { .. })), "an agent gone too");
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
        let pushed = JobSuccess { digest: DIGEST.into(), ..JobSuccess::default() };
        let success = live(Some(Outcome::Success(pushed)));
        assert!(matches!(next(&observed(&pushing, Some(&success)), &limits()), Next::Verify(_)));
        let nothing = live(Some(Outcome::Success(JobSuccess::default())));
        let Next::Record(Transition::Retry { error, .. }) = next(&observed(&pushing, Some(&nothing)), &limits()) else {
            panic!("a copy of nothing is a failed attempt")
        };
        assert!(error.contains("nothing"), "{error}");
        let lost = live(Some(Outcome::Lost("gone".into())));
        assert_eq!(
            next(&observed(&pushing, Some(&lost)), &limits()),
            Next::Record(Transition::Lost { error: "gone".into() })
        );
    }

    #[test]
    fn a_digest_of_its_own_is_accepted_for_verification_only_from_a_planned_reduced_index() {
        let pushing = ImageBackupStatus { platforms: index_status(&["a"]).platforms, ..status(Phase::Pushing, 2) };
        let forged = JobSuccess { digest: "sha256:forged".into(), ..JobSuccess::default() };
        let report = live(Some(Outcome::Success(forged.clone())));
        let Next::Record(Transition::Failed { error, .. }) = next(&observed(&pushing, Some(&report)), &limits()) else {
            panic!("a digest of the agent's choosing is refused")
        };
        assert!(error.contains("sha256:forged") && error.contains("refused"), "{error}");

        let whole = Part { finish: Finish::Index, ..Part::default() };
        let reduce = Part { finish: Finish::Reduced, keep: vec!["a".into()], ..Part::default() };
        let assigned = |part: Part| Transition::Assigned {
            agent_id: "agent-a".into(),
            node: "node-a".into(),
            attempt: 3,
            children: vec![],
            part,
        };
        let planned = assigned(reduce).apply(&pushing, Timestamp::now());
        assert!(planned.reducing);
        assert_eq!(next(&observed(&planned, Some(&report)), &limits()), Next::Verify(forged));
        assert!(!assigned(whole).apply(&planned, Timestamp::now()).reducing, "the next attempt plans anew");
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
        let verified_later = Next::After(Duration::from_secs(3600));
        assert_eq!(next(&observed(&done, None), &limits()), verified_later);
        let reduced =
            ImageBackupStatus { reduced: true, backup_reference: Some("r@sha256:reduced".into()), ..done.clone() };
        assert_eq!(next(&observed(&reduced, None), &limits()), verified_later, "a reduced index has its own digest");
    }

    #[test]
    fn a_recent_report_extends_the_grace() {
        let pushing = status(Phase::Pushing, 1);
        let o = Observed {
            holder: Holder::NotRunning,
            since_transition: Duration::from_secs(300),
            since_verified: Duration::ZERO,
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
        let done = Transition::Completed {
            reference: "r@sha256:x".into(),
            bytes: 200,
            node: "node-a".into(),
            manifests: vec![],
            from_source: vec![],
            reduced: false,
            referrers: vec!["sha256-x.sig".into()],
            referrers_error: None,
        }
        .apply(&pushing, Timestamp::now());
        assert_eq!(done.phase, Phase::Completed);
        assert_eq!(done.referrers, ["sha256-x.sig"]);
        assert_eq!((done.last_error, done.backup_reference.as_deref()), (None, Some("r@sha256:x")));
        assert_eq!((done.bytes_done, done.bytes_total), (300, 300));
    }

    fn index_status(copied: &[&str]) -> ImageBackupStatus {
        let platform = |(name, digest, attestation): (&str, &str, bool)| PlatformCopy {
            platform: name.into(),
            digest: digest.into(),
            attestation,
            copied_from: copied.contains(&digest).then(|| "node/node-a".into()),
        };
        ImageBackupStatus {
            platforms: [("linux/amd64", "a", false), ("linux/arm64", "b", false), ("unknown/unknown", "att", true)]
                .into_iter()
                .map(platform)
                .collect(),
            ..status(Phase::Pending, 1)
        }
    }

    fn index_holdings(agents: Vec<Holding>) -> Holdings {
        let child = |platform: &str, digest: &str| Child {
            platform: platform.into(),
            digest: digest.into(),
            attestation: platform == "unknown/unknown",
        };
        Holdings {
            children: vec![child("linux/amd64", "a"), child("linux/arm64", "b"), child("unknown/unknown", "att")],
            agents,
        }
    }

    #[test]
    fn a_part_copied_is_recorded_and_the_next_part_follows_at_once() {
        let pushing = ImageBackupStatus { phase: Phase::Pushing, failures: 1, ..index_status(&[]) };
        let manifest = PlatformManifest { digest: "a".into(), ..PlatformManifest::default() };
        let success = JobSuccess { pushed_manifests: vec![manifest], ..JobSuccess::default() };
        let report = live(Some(Outcome::Success(success)));
        let Next::Record(copied) = next(&observed(&pushing, Some(&report)), &limits()) else { panic!() };
        assert_eq!(
            copied,
            Transition::Copied { node: "node-a".into(), manifests: vec!["a".into()], from_source: vec![] }
        );
        let after = copied.apply(&pushing, Timestamp::now());
        assert_eq!(
            (after.phase, after.failures, after.last_error.as_deref()),
            (Phase::Pending, 1, None),
            "no backoff after a copied part"
        );
        assert_eq!(after.platforms[0].copied_from.as_deref(), Some("node/node-a"));
        assert_eq!(after.message.as_deref(), Some("copied linux/amd64 from node node-a"));
        let mut o = observed(&after, None);
        o.holdings = index_holdings(vec![holding("agent-b", true, &["b"])]);
        let Next::Assign { agent_id, part, .. } = next(&o, &limits()) else { panic!() };
        assert_eq!((agent_id.as_str(), part.manifests), ("agent-b", vec!["b".to_string()]));
    }

    #[test]
    fn platforms_on_no_node_come_from_the_source_with_the_index() {
        let pending = index_status(&["a", "b"]);
        let mut o = observed(&pending, None);
        o.holdings = index_holdings(vec![holding("agent-a", true, &["a"])]);
        let Next::Assign { agent_id, part, .. } = next(&o, &limits()) else { panic!() };
        assert_eq!(agent_id, "agent-a");
        assert_eq!((&part.from_source[..], part.finish), (&["att".to_string()][..], Finish::Index));
        let assigned = Transition::Assigned { agent_id, node: "node-a".into(), attempt: 2, children: vec![], part };
        let message = assigned.apply(&pending, Timestamp::now()).message.unwrap_or_default();
        assert!(message.contains("unknown/unknown (attestation) from the source"), "{message}");

        let copy = JobSuccess { digest: DIGEST.into(), from_source: vec!["att".into()], ..JobSuccess::default() };
        let done = Transition::Completed {
            reference: "r@sha256:x".into(),
            bytes: 1,
            node: "node-a".into(),
            manifests: vec!["att".into()],
            from_source: copy.from_source,
            reduced: false,
            referrers: vec![],
            referrers_error: None,
        }
        .apply(&pending, Timestamp::now());
        let from: Vec<_> = done.platforms.iter().map(|p| p.copied_from.as_deref().unwrap_or_default()).collect();
        assert_eq!(from, ["node/node-a", "node/node-a", "source"]);

        let source_down = JobFailure { message: "GET refused".into(), source_failed: true, ..JobFailure::default() };
        let pushing = ImageBackupStatus { phase: Phase::Pushing, ..pending };
        let report = live(Some(Outcome::Failure(source_down)));
        let Next::Record(failed) = next(&observed(&pushing, Some(&report)), &limits()) else { panic!() };
        assert_eq!(failed, Transition::SourceFailed { error: "GET refused".into() });
        let after = failed.apply(&pushing, Timestamp::now());
        assert_eq!((after.phase, after.source_error.as_deref()), (Phase::Pending, Some("GET refused")));
    }

    #[test]
    fn platforms_on_no_node_nor_in_the_source_are_waited_for_then_left_out_of_a_reduced_index() {
        let pending = ImageBackupStatus { source_error: Some("unreachable".into()), ..index_status(&["a", "b"]) };
        let mut o = observed(&pending, None);
        o.holdings = index_holdings(vec![holding("agent-a", true, &["a"])]);
        o.since_transition = Duration::from_secs(20);
        let Next::Record(Transition::Waiting { message, recheck }) = next(&o, &limits()) else { panic!() };
        assert!(message.contains("unknown/unknown (attestation)") && message.contains("reduced index"), "{message}");
        assert_eq!(recheck, Some(Duration::from_secs(40)));
        o.since_transition = Duration::from_secs(61);
        let Next::Assign { part, .. } = next(&o, &limits()) else { panic!() };
        assert_eq!((part.finish, part.keep), (Finish::Reduced, vec!["a".to_string(), "b".to_string()]));

        let complete = Limits { require_complete: true, ..limits() };
        let Next::Record(Transition::Failed { error, .. }) = next(&o, &complete) else { panic!() };
        assert!(error.contains("incomplete") && error.contains("unknown/unknown"), "{error}");

        let done = Transition::Completed {
            reference: "r@sha256:reduced".into(),
            bytes: 1,
            node: "node-a".into(),
            manifests: vec![],
            from_source: vec![],
            reduced: true,
            referrers: vec![],
            referrers_error: None,
        }
        .apply(&pending, Timestamp::now());
        assert!(done.reduced);
        assert_eq!(done.left_out, ["unknown/unknown (attestation)"]);
        assert!(done.message.as_deref().is_some_and(|m| m.starts_with("reduced index")));
    }

    #[test]
    fn an_index_the_registry_lost_children_of_copies_them_again() {
        let pushing = ImageBackupStatus { phase: Phase::Pushing, ..index_status(&["a", "b"]) };
        let failure = JobFailure { retryable: true, absent_manifests: vec!["b".into()], ..JobFailure::default() };
        let retry = failed(&pushing, &limits(), &failure, DIGEST);
        let after = retry.apply(&pushing, Timestamp::now());
        assert_eq!(after.platforms[1].copied_from, None);
        assert_eq!(after.platforms[0].copied_from.as_deref(), Some("node/node-a"));
    }

    #[test]
    fn a_platform_a_node_runs_is_never_left_out_and_the_source_is_tried_again() {
        // node-a runs linux/arm64 here but holds only its index: its layers
        // were discarded once unpacked, and the source failed once.
        let pending = ImageBackupStatus { source_error: Some("refused".into()), ..index_status(&["a"]) };
        let mut arm64 = holding("agent-a", true, &["a"]);
        arm64.platform = "linux/arm64".into();
        let mut o = observed(&pending, None);
        o.holdings = index_holdings(vec![arm64]);
        o.since_transition = Duration::from_secs(20);
        let Next::Record(Transition::Waiting { message, recheck }) = next(&o, &limits()) else { panic!() };
        assert!(message.contains("never backed up without them"), "{message}");
        assert_eq!(recheck, Some(Duration::from_secs(40)));
        o.since_transition = Duration::from_secs(61);
        let Next::Assign { part, .. } = next(&o, &limits()) else { panic!("the source again, not a reduced index") };
        assert_eq!((part.finish, part.from_source.len()), (Finish::Index, 2));
    }
}
