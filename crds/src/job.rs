//! The ImageBackup status as the core's job record, and back: every field
//! both ways, so a status read, stepped and written loses nothing.

use image_backup_core::job;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

use crate::{ImageBackupStatus, Phase, PlatformCopy, WorkloadNote};

// === impl ImageBackupStatus ===

impl From<&ImageBackupStatus> for job::Status {
    fn from(s: &ImageBackupStatus) -> Self {
        job::Status {
            phase: s.phase.into(),
            node: s.node.clone(),
            agent: s.agent.clone(),
            attempts: s.attempts,
            failures: s.failures,
            bytes_done: s.bytes_done,
            bytes_total: s.bytes_total,
            progress: s.progress.clone(),
            backup_reference: s.backup_reference.clone(),
            last_error: s.last_error.clone(),
            platforms: s.platforms.iter().map(Into::into).collect(),
            reduced: s.reduced,
            reducing: s.reducing,
            left_out: s.left_out.clone(),
            referrers: s.referrers.clone(),
            referrers_error: s.referrers_error.clone(),
            source_error: s.source_error.clone(),
            message: s.message.clone(),
            last_verified: s.last_verified.as_ref().map(|t| t.0),
            lost_at: s.lost_at.as_ref().map(|t| t.0),
            observed_generation: s.observed_generation,
            last_transition_time: s.last_transition_time.as_ref().map(|t| t.0),
            conditions: s.conditions.iter().map(condition_to_job).collect(),
            workloads: s.workloads.iter().map(Into::into).collect(),
        }
    }
}

impl From<job::Status> for ImageBackupStatus {
    fn from(s: job::Status) -> Self {
        ImageBackupStatus {
            phase: s.phase.into(),
            node: s.node,
            agent: s.agent,
            attempts: s.attempts,
            failures: s.failures,
            bytes_done: s.bytes_done,
            bytes_total: s.bytes_total,
            progress: s.progress,
            backup_reference: s.backup_reference,
            last_error: s.last_error,
            platforms: s.platforms.into_iter().map(Into::into).collect(),
            reduced: s.reduced,
            reducing: s.reducing,
            left_out: s.left_out,
            referrers: s.referrers,
            referrers_error: s.referrers_error,
            source_error: s.source_error,
            message: s.message,
            last_verified: s.last_verified.map(Time),
            lost_at: s.lost_at.map(Time),
            observed_generation: s.observed_generation,
            last_transition_time: s.last_transition_time.map(Time),
            conditions: s.conditions.into_iter().map(condition_from_job).collect(),
            workloads: s.workloads.into_iter().map(Into::into).collect(),
        }
    }
}

fn condition_to_job(c: &Condition) -> job::Condition {
    job::Condition {
        type_: c.type_.clone(),
        status: c.status.clone(),
        reason: c.reason.clone(),
        message: c.message.clone(),
        last_transition_time: c.last_transition_time.0,
        observed_generation: c.observed_generation,
    }
}

fn condition_from_job(c: job::Condition) -> Condition {
    Condition {
        type_: c.type_,
        status: c.status,
        reason: c.reason,
        message: c.message,
        last_transition_time: Time(c.last_transition_time),
        observed_generation: c.observed_generation,
    }
}

// === impl Phase ===

impl From<Phase> for job::Phase {
    fn from(phase: Phase) -> Self {
        match phase {
            Phase::Pending => job::Phase::Pending,
            Phase::Assigned => job::Phase::Assigned,
            Phase::Pushing => job::Phase::Pushing,
            Phase::Completed => job::Phase::Completed,
            Phase::Failed => job::Phase::Failed,
        }
    }
}

impl From<job::Phase> for Phase {
    fn from(phase: job::Phase) -> Self {
        match phase {
            job::Phase::Pending => Phase::Pending,
            job::Phase::Assigned => Phase::Assigned,
            job::Phase::Pushing => Phase::Pushing,
            job::Phase::Completed => Phase::Completed,
            job::Phase::Failed => Phase::Failed,
        }
    }
}

// === impl PlatformCopy ===

impl From<&PlatformCopy> for job::PlatformCopy {
    fn from(p: &PlatformCopy) -> Self {
        job::PlatformCopy {
            platform: p.platform.clone(),
            digest: p.digest.clone(),
            attestation: p.attestation,
            copied_from: p.copied_from.clone(),
        }
    }
}

impl From<job::PlatformCopy> for PlatformCopy {
    fn from(p: job::PlatformCopy) -> Self {
        PlatformCopy { platform: p.platform, digest: p.digest, attestation: p.attestation, copied_from: p.copied_from }
    }
}

// === impl WorkloadNote ===

impl From<&WorkloadNote> for job::WorkloadNote {
    fn from(n: &WorkloadNote) -> Self {
        job::WorkloadNote {
            workload: n.workload.clone(),
            reason: n.reason.clone(),
            message: n.message.clone(),
            time: n.time.as_ref().map(|t| t.0),
        }
    }
}

impl From<job::WorkloadNote> for WorkloadNote {
    fn from(n: job::WorkloadNote) -> Self {
        WorkloadNote { workload: n.workload, reason: n.reason, message: n.message, time: n.time.map(Time) }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::jiff::Timestamp;

    use super::*;

    #[test]
    fn a_status_goes_to_the_core_and_back_unchanged() {
        let now = Time(Timestamp::now());
        let status = ImageBackupStatus {
            phase: Phase::Pushing,
            node: Some("node-a".into()),
            agent: Some("agent-a".into()),
            attempts: 3,
            failures: 2,
            bytes_done: 10,
            bytes_total: 20,
            progress: Some("50%".into()),
            backup_reference: Some("r@sha256:x".into()),
            last_error: Some("e".into()),
            platforms: vec![PlatformCopy {
                platform: "linux/amd64".into(),
                digest: "sha256:a".into(),
                attestation: true,
                copied_from: Some("source".into()),
            }],
            reduced: true,
            reducing: true,
            left_out: vec!["linux/s390x".into()],
            referrers: vec!["sha256:r".into()],
            referrers_error: Some("r".into()),
            source_error: Some("s".into()),
            message: Some("m".into()),
            last_verified: Some(now.clone()),
            lost_at: Some(now.clone()),
            observed_generation: 4,
            last_transition_time: Some(now.clone()),
            conditions: vec![Condition {
                type_: "Stalled".into(),
                status: "True".into(),
                reason: "RetryingTransientFailure".into(),
                message: "m".into(),
                last_transition_time: now.clone(),
                observed_generation: Some(4),
            }],
            workloads: vec![WorkloadNote {
                workload: "Deployment/shop/web".into(),
                reason: "Managed".into(),
                message: "m".into(),
                time: Some(now),
            }],
        };
        let back: ImageBackupStatus = job::Status::from(&status).into();
        assert_eq!(back, status);
    }
}
