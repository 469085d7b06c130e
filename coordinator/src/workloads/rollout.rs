//! Following the rollouts the coordinator starts: how far one is, judged
//! from the workload and its pods as a person running `kubectl rollout
//! status` would, and how many may be in flight at once, cluster wide.

use std::{
    collections::{BTreeSet, HashSet, VecDeque},
    time::Duration,
};

use image_backup_core::rollout::{self, PodView, Progress, Waiting};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use parking_lot::Mutex;

use super::{usage::WorkloadKey, workload::Workload};

pub use image_backup_core::rollout::Verdict;

/// Judges the rollout of `workload` to the backup references `pinned`,
/// `elapsed` after the coordinator started it (`image_backup_core::rollout`
/// decides); `pods` are those its selector matches, of any revision.
pub fn judge(
    workload: &Workload,
    pods: &[Pod],
    pinned: &BTreeSet<String>,
    elapsed: Duration,
    timeout: Duration,
) -> Verdict {
    let pods: Vec<PodView> = pods.iter().map(view).collect();
    rollout::judge(&progress(workload), &pods, pinned, elapsed, timeout)
}

/// What the workload says of its own rollout.
fn progress(workload: &Workload) -> Progress {
    let mut progress = Progress { complete: workload.rollout_complete(), deadline_exceeded: None };
    if let Workload::Deployment(d) = workload {
        let conditions = d.status.as_ref().and_then(|s| s.conditions.as_ref()).into_iter().flatten();
        progress.deadline_exceeded = conditions
            .filter(|c| c.type_.as_deref() == Some("Progressing") && c.status.as_deref() == Some("False"))
            .find(|c| c.reason.as_deref() == Some("ProgressDeadlineExceeded"))
            .map(|c| c.message.clone().unwrap_or_default());
    }
    progress
}

/// A pod as the judge looks at it.
fn view(pod: &Pod) -> PodView {
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.init_containers.iter().flatten().chain(&s.containers));
    let status = pod.status.as_ref();
    let statuses =
        [status.and_then(|s| s.init_container_statuses.as_ref()), status.and_then(|s| s.container_statuses.as_ref())];
    PodView {
        name: pod.metadata.name.clone().unwrap_or_default(),
        terminating: pod.metadata.deletion_timestamp.is_some(),
        images: containers.filter_map(|c| c.image.clone()).collect(),
        waiting: statuses
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|c: &ContainerStatus| {
                let waiting = c.state.as_ref()?.waiting.as_ref()?;
                Some(Waiting {
                    container: c.name.clone(),
                    reason: waiting.reason.clone()?,
                    message: waiting.message.clone().unwrap_or_default(),
                })
            })
            .collect(),
    }
}

/// Wakes a workload's reconcile; the workload controllers hold the other
/// ends.
pub trait Wake: Send + Sync {
    fn wake(&self, workload: &WorkloadKey);
}

/// The rollouts in flight, at most `limit` started by the coordinator at a
/// time; workloads waiting for one are woken in turn as rollouts end.
pub struct Rollouts {
    limit: usize,
    state: Mutex<Slots>,
    wake: Box<dyn Wake>,
}

#[derive(Default)]
struct Slots {
    in_flight: HashSet<WorkloadKey>,
    waiting: VecDeque<WorkloadKey>,
    queued: HashSet<WorkloadKey>,
}

/// What a reconcile did with its workload's slot, settled when it drops:
/// a slot not kept is freed for the next waiting workload.
pub struct Slot<'a> {
    rollouts: &'a Rollouts,
    key: WorkloadKey,
    outcome: Outcome,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Free,
    InFlight,
    Waiting,
}

// === impl Rollouts ===

impl Rollouts {
    pub fn new(limit: usize, wake: Box<dyn Wake>) -> Self {
        Self { limit: limit.max(1), state: Mutex::default(), wake }
    }

    /// The slot of `key` for one reconcile.
    pub fn slot(&self, key: WorkloadKey) -> Slot<'_> {
        Slot { rollouts: self, key, outcome: Outcome::Free }
    }

    pub fn in_flight(&self) -> usize {
        self.state.lock().in_flight.len()
    }

    /// A deleted workload's slot and place in line go.
    pub fn forget(&self, key: &WorkloadKey) {
        drop(self.slot(key.clone()));
    }

    fn settle(&self, key: &WorkloadKey, outcome: Outcome) {
        let woken = {
            let mut slots = self.state.lock();
            match outcome {
                Outcome::InFlight => {
                    slots.in_flight.insert(key.clone());
                    slots.unqueue(key);
                }
                Outcome::Waiting => {
                    if slots.queued.insert(key.clone()) {
                        slots.waiting.push_back(key.clone());
                    }
                }
                Outcome::Free => {
                    slots.in_flight.remove(key);
                    slots.unqueue(key);
                }
            }
            // Woken workloads leave the line; one that still finds no
            // slot joins it again at the back.
            let free = self.limit.saturating_sub(slots.in_flight.len());
            let mut woken = Vec::new();
            while woken.len() < free {
                let Some(next) = slots.waiting.pop_front() else { break };
                slots.queued.remove(&next);
                woken.push(next);
            }
            woken
        };
        for key in &woken {
            self.wake.wake(key);
        }
    }
}

impl Slots {
    fn unqueue(&mut self, key: &WorkloadKey) {
        if self.queued.remove(key) {
            self.waiting.retain(|k| k != key);
        }
    }
}

// === impl Slot ===

impl Slot<'_> {
    /// The workload's rollout is in flight (found so, or just started),
    /// whatever the limit: it holds a slot until it ends.
    pub fn keep(&mut self) {
        self.outcome = Outcome::InFlight;
    }

    /// Takes a slot to start a rollout; `false` puts the workload in line,
    /// to be woken when one frees.
    pub fn take(&mut self) -> bool {
        let mut slots = self.rollouts.state.lock();
        if slots.in_flight.contains(&self.key) || slots.in_flight.len() < self.rollouts.limit {
            // Counted at once: reconciles of other workloads run meanwhile.
            slots.in_flight.insert(self.key.clone());
            slots.unqueue(&self.key);
            self.outcome = Outcome::InFlight;
            true
        } else {
            self.outcome = Outcome::Waiting;
            false
        }
    }

    /// The rollout did not start (or ended): the slot goes.
    pub fn release(&mut self) {
        self.outcome = Outcome::Free;
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.rollouts.settle(&self.key, self.outcome);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workloads::workload::tests::deployment;
    use serde_json::json;
    use std::sync::{Arc, Mutex as StdMutex};

    const BACKUP: &str = "backup.local/mirror/docker.io/library/nginx@sha256:00";

    fn pod(name: &str, image: &str, waiting: Option<(&str, &str)>) -> Pod {
        let state = match waiting {
            Some((reason, message)) => json!({ "waiting": { "reason": reason, "message": message } }),
            None => json!({ "running": {} }),
        };
        serde_json::from_value(json!({
            "metadata": { "name": name },
            "spec": { "containers": [{ "name": "web", "image": image }] },
            "status": { "containerStatuses": [{ "name": "web", "image": image, "imageID": "", "ready": false, "restartCount": 0, "state": state }] },
        }))
        .unwrap()
    }

    fn judge_pods(pods: &[Pod], elapsed: u64) -> Verdict {
        let pinned = BTreeSet::from([BACKUP.to_string()]);
        let rolling = json!({ "observedGeneration": 3, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2 });
        judge(&deployment(rolling), pods, &pinned, Duration::from_secs(elapsed), Duration::from_secs(600))
    }

    #[test]
    fn a_new_pod_that_cannot_pull_fails_the_rollout() {
        let pods = [pod("old", "nginx:1.25", None), pod("new", BACKUP, Some(("ImagePullBackOff", "unauthorized")))];
        assert_eq!(
            judge_pods(&pods, 30),
            Verdict::Failed("pod new, container web: ImagePullBackOff: unauthorized".into())
        );
    }

    #[test]
    fn a_crash_loop_counts_only_when_the_source_pods_had_none() {
        let new = pod("new", BACKUP, Some(("CrashLoopBackOff", "back-off 10s")));
        assert!(matches!(judge_pods(&[pod("old", "nginx:1.25", None), new.clone()], 30), Verdict::Failed(_)));
        let old = pod("old", "nginx:1.25", Some(("CrashLoopBackOff", "")));
        assert_eq!(judge_pods(&[old, new], 30), Verdict::Rolling);
    }

    #[test]
    fn old_pods_failing_to_pull_are_not_the_backups_doing() {
        let pods = [pod("old", "nginx:1.25", Some(("ImagePullBackOff", ""))), pod("new", BACKUP, None)];
        assert_eq!(judge_pods(&pods, 30), Verdict::Rolling);
    }

    #[test]
    fn a_rollout_ends_done_past_its_deadline_or_timed_out() {
        let pinned = BTreeSet::from([BACKUP.to_string()]);
        let minute = Duration::from_secs(60);
        let done = json!({ "observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2 });
        assert_eq!(judge(&deployment(done), &[], &pinned, minute, minute), Verdict::Done);
        let stuck = json!({ "observedGeneration": 3, "replicas": 3, "updatedReplicas": 1, "availableReplicas": 2,
            "conditions": [{ "type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded", "message": "ReplicaSet web-2 has timed out progressing." }] });
        let Verdict::Slow(why) = judge(&deployment(stuck), &[], &pinned, minute, 10 * minute) else { panic!() };
        assert!(why.contains("progress deadline") && why.contains("timed out progressing"), "{why}");
        assert!(matches!(judge_pods(&[], 601), Verdict::Slow(why) if why.contains("10m")));
    }

    #[derive(Default)]
    struct Woken(StdMutex<Vec<String>>);
    impl Wake for Arc<Woken> {
        fn wake(&self, workload: &WorkloadKey) {
            self.0.lock().unwrap().push(workload.name.clone());
        }
    }

    fn key(name: &str) -> WorkloadKey {
        WorkloadKey { kind: "Deployment", namespace: "shop".into(), name: name.into() }
    }

    #[test]
    fn at_most_limit_rollouts_start_and_the_line_moves_as_they_end() {
        let woken = Arc::new(Woken::default());
        let rollouts = Rollouts::new(2, Box::new(woken.clone()));
        let (mut a, mut b) = (rollouts.slot(key("a")), rollouts.slot(key("b")));
        assert!(a.take() && b.take());
        assert!(!rollouts.slot(key("e")).take(), "two slots taken by reconciles still running");
        drop((a, b));
        rollouts.forget(&key("e"));
        for name in ["c", "d"] {
            assert!(!rollouts.slot(key(name)).take(), "{name} waits");
        }
        assert_eq!(rollouts.in_flight(), 2);
        {
            let mut again = rollouts.slot(key("a"));
            assert!(again.take(), "a rollout in flight keeps its slot");
        }
        // `a` ends: the first in line is woken, and only it.
        drop(rollouts.slot(key("a")));
        assert_eq!(*woken.0.lock().unwrap(), ["c"]);
        // `c` no longer needs a slot when it looks: `d` is next.
        drop(rollouts.slot(key("c")));
        assert_eq!(*woken.0.lock().unwrap(), ["c", "d"]);
        let mut slot = rollouts.slot(key("d"));
        assert!(slot.take());
        drop(slot);
        assert_eq!(rollouts.in_flight(), 2);
        rollouts.forget(&key("b"));
        rollouts.forget(&key("d"));
        assert_eq!(rollouts.in_flight(), 0);
    }
}
