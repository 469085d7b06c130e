//! How soon a failed reconcile runs again: per object, doubling from
//! [`BASE`] to [`MAX`] with each failure in a row, with a jitter, and never
//! sooner than an API server answering 429 asks, as controller-runtime's
//! per-item exponential rate limiter does. A flat delay would have
//! thousands of failing objects hit a struggling API server together, again
//! and again. kube-runtime's controller takes the delay from the error
//! policy and keeps no count of its own, hence this one.

use std::{collections::HashMap, time::Duration};

use parking_lot::Mutex;

use crate::error::Error;

/// Delay after the first failure of an object.
const BASE: Duration = Duration::from_secs(1);
/// The longest delay.
const MAX: Duration = Duration::from_secs(300);

/// Failures in a row, per object key (`Kind/namespace/name`).
#[derive(Default)]
pub struct FailureBackoff(Mutex<HashMap<String, u32>>);

// === impl FailureBackoff ===

impl FailureBackoff {
    /// Counts a failure of `key`; the delay before its next reconcile.
    pub fn failed(&self, key: &str, error: &Error) -> Duration {
        let failures = {
            let mut all = self.0.lock();
            let failures = all.entry(key.to_string()).or_default();
            *failures = failures.saturating_add(1);
            *failures
        };
        delay(failures, rand::random::<f64>()).max(retry_after(error))
    }

    /// A reconcile of `key` succeeded: its next failure starts over.
    pub fn succeeded(&self, key: &str) {
        let mut all = self.0.lock();
        if !all.is_empty() {
            all.remove(key);
        }
    }
}

/// The delay after `failures` in a row, `jitter` (in [0, 1)) taking up to
/// half of it off, so objects that failed together spread out.
fn delay(failures: u32, jitter: f64) -> Duration {
    let doubled = BASE.saturating_mul(2u32.saturating_pow(failures.saturating_sub(1).min(20)));
    doubled.min(MAX).mul_f64(1.0 - jitter.clamp(0.0, 1.0) / 2.0)
}

/// What an API server that throttled the call asked for, if it did.
fn retry_after(error: &Error) -> Duration {
    match error {
        Error::Kube { error: kube::Error::Api(status), .. } if status.code == 429 => {
            let seconds = status.details.as_ref().map_or(1, |d| d.retry_after_seconds.max(1));
            Duration::from_secs(u64::from(seconds))
        }
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conflict(code: u16, retry_after_seconds: u32) -> Error {
        let status = kube::core::Status {
            code,
            details: Some(kube::core::response::StatusDetails {
                name: "x".into(),
                group: String::new(),
                kind: "Deployment".into(),
                uid: String::new(),
                causes: Vec::new(),
                retry_after_seconds,
            }),
            ..Default::default()
        };
        Error::Kube { action: "updating", object: "x".into(), error: kube::Error::Api(Box::new(status)) }
    }

    #[test]
    fn delays_double_per_failure_to_a_cap_with_up_to_half_taken_off() {
        let full: Vec<u64> = (1..=12).map(|n| delay(n, 0.0).as_secs()).collect();
        assert_eq!(full, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(delay(3, 0.999_999), Duration::from_secs(4).mul_f64(1.0 - 0.999_999 / 2.0));
        assert_eq!(delay(u32::MAX, 0.0), MAX);
    }

    #[test]
    fn each_object_counts_its_own_failures_until_it_succeeds() {
        let backoff = FailureBackoff::default();
        let other = conflict(500, 0);
        let first = backoff.failed("Deployment/shop/a", &other);
        assert!(first <= BASE && first >= BASE / 2, "{first:?}");
        let third = {
            backoff.failed("Deployment/shop/a", &other);
            backoff.failed("Deployment/shop/a", &other)
        };
        assert!(third >= Duration::from_secs(2), "{third:?}");
        let b = backoff.failed("Deployment/shop/b", &other);
        assert!(b <= BASE, "another object starts at the base: {b:?}");
        backoff.succeeded("Deployment/shop/a");
        assert!(backoff.failed("Deployment/shop/a", &other) <= BASE, "a success starts it over");
    }

    #[test]
    fn a_throttling_api_server_is_waited_for_as_long_as_it_asks() {
        let backoff = FailureBackoff::default();
        assert!(backoff.failed("a", &conflict(429, 30)) >= Duration::from_secs(30));
        assert!(backoff.failed("b", &conflict(429, 0)) >= Duration::from_secs(1), "429 without a delay: a second");
    }
}
