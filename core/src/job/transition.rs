//! Each step's change to a job's record: [`Transition::apply`].

use std::time::Duration;

use jiff::Timestamp;

use super::{
    Condition, Finish, Phase, PlatformCopy, Status,
    plan::{self, Child, Part},
};

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

/// Records where each child of `manifests` came from: the source for
/// those in `from_source`, else `node`.
fn mark_copied(status: &mut Status, manifests: &[String], from_source: &[String], node: &str) {
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
fn set_stalled(status: &mut Status, message: Option<String>, now: Timestamp) {
    let since = status.conditions.iter().find(|c| c.type_ == STALLED).map(|c| c.last_transition_time);
    status.conditions.retain(|c| c.type_ != STALLED);
    if let Some(message) = message {
        status.conditions.push(Condition {
            type_: STALLED.into(),
            status: "True".into(),
            reason: "RetryingTransientFailure".into(),
            message,
            // When it started stalling, not its latest attempt.
            last_transition_time: since.unwrap_or(now),
            observed_generation: Some(status.observed_generation),
        });
    }
}

// === impl Transition ===

impl Transition {
    /// The status after this transition.
    pub fn apply(&self, status: &Status, now: Timestamp) -> Status {
        let mut next = status.clone();
        let moved = |next: &mut Status, phase: Phase| {
            if next.phase != phase {
                next.last_transition_time = Some(now);
            }
            next.phase = phase;
        };
        match self {
            Transition::Restart { generation } => {
                next =
                    Status { observed_generation: *generation, last_transition_time: Some(now), ..Status::default() };
            }
            Transition::Waiting { message, .. } => {
                moved(&mut next, Phase::Pending);
                next.message = Some(message.clone());
            }
            Transition::Assigned { agent_id, node, attempt, children, part } => {
                moved(&mut next, Phase::Assigned);
                next.last_transition_time = Some(now);
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
                next.progress = Some(crate::progress_summary(*bytes_done, *bytes_total));
            }
            Transition::Copied { node, manifests, from_source } => {
                moved(&mut next, Phase::Pending);
                next.last_transition_time = Some(now);
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
                next.last_verified = Some(now);
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
                next.last_transition_time = Some(now);
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
                next.last_transition_time = Some(now);
                next.source_error = Some(error.clone());
                next.last_error = Some(error.clone());
                next.message = Some("the source cannot provide what no node holds".into());
            }
            Transition::Lost { error } => {
                moved(&mut next, Phase::Pending);
                next.last_transition_time = Some(now);
                next.last_error = Some(error.clone());
                next.failures += 1;
                next.message = Some("the copy moves to another agent".into());
            }
            Transition::Verified => next.last_verified = Some(now),
            Transition::Missing { error } => {
                // A new series of attempts, as for a new digest; what the
                // workloads were told stays.
                next = Status {
                    observed_generation: status.observed_generation,
                    last_transition_time: Some(now),
                    lost_at: Some(now),
                    backup_reference: status.backup_reference.clone(),
                    last_error: Some(error.clone()),
                    message: Some("gone from the backup registry; copying it again".into()),
                    workloads: status.workloads.clone(),
                    ..Status::default()
                };
            }
        }
        next
    }
}
