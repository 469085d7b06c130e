//! The agents' reports as the core's job types, and the core's plan of a
//! part as the wire's.

use image_backup_core::job;

use crate::v1::{Finish, JobFailure, JobSuccess};

impl From<&JobSuccess> for job::Success {
    fn from(s: &JobSuccess) -> Self {
        job::Success {
            pinned_reference: s.pinned_reference.clone(),
            digest: s.digest.clone(),
            bytes_uploaded: s.bytes_uploaded,
            duration_seconds: s.duration_seconds,
            pushed_manifests: s.pushed_manifests.iter().map(|m| m.digest.clone()).collect(),
            from_source: s.from_source.clone(),
            referrers: s.referrers.clone(),
            // Empty on the wire is none.
            referrers_error: Some(s.referrers_error.clone()).filter(|e| !e.is_empty()),
        }
    }
}

impl From<&JobFailure> for job::Failure {
    fn from(f: &JobFailure) -> Self {
        job::Failure {
            message: f.message.clone(),
            retryable: f.retryable,
            absent_manifests: f.absent_manifests.clone(),
            source_failed: f.source_failed,
        }
    }
}

impl From<job::Finish> for Finish {
    fn from(finish: job::Finish) -> Self {
        match finish {
            job::Finish::Whole => Finish::Whole,
            job::Finish::None => Finish::None,
            job::Finish::Index => Finish::Index,
            job::Finish::Reduced => Finish::Reduced,
        }
    }
}

impl From<Finish> for job::Finish {
    fn from(finish: Finish) -> Self {
        match finish {
            Finish::Whole => job::Finish::Whole,
            Finish::None => job::Finish::None,
            Finish::Index => job::Finish::Index,
            Finish::Reduced => job::Finish::Reduced,
        }
    }
}
