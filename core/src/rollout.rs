//! How far a rollout to backups is, judged as a person running `kubectl
//! rollout status` would: from what the workload says of itself and what
//! its pods show.

use std::{collections::BTreeSet, time::Duration};

/// Waiting reasons of a container whose image cannot be pulled.
const PULL_FAILURES: &[&str] =
    &["ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull", "RegistryUnavailable"];
const CRASH_LOOP: &str = "CrashLoopBackOff";

/// Where a rollout to backups is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Pods are moving; nothing has failed yet.
    Rolling,
    /// Every desired pod runs the backups and is available.
    Done,
    /// The backups do not run (a pull failure, a new crash loop): why, in
    /// words.
    Failed(String),
    /// It did not finish in time, for reasons the pods do not show (a
    /// progress deadline, the coordinator's timeout): why, in words. Moving
    /// back helps only if the source can still be pulled.
    Slow(String),
}

/// What the workload says of its own rollout.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// Every desired pod is of the current revision and available.
    pub complete: bool,
    /// Its controller gave up waiting (a Deployment's progress deadline),
    /// with the controller's words.
    pub deadline_exceeded: Option<String>,
}

/// A pod the workload's selector matches, of any revision.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodView {
    pub name: String,
    /// Being deleted: an old pod on its way out.
    pub terminating: bool,
    /// The images its spec runs, init containers included.
    pub images: Vec<String>,
    /// Its waiting containers.
    pub waiting: Vec<Waiting>,
}

/// A container that waits, and why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Waiting {
    pub container: String,
    pub reason: String,
    pub message: String,
}

/// Judges a rollout to the backup references `pinned`, `elapsed` after the
/// coordinator started it.
pub fn judge(
    progress: &Progress,
    pods: &[PodView],
    pinned: &BTreeSet<String>,
    elapsed: Duration,
    timeout: Duration,
) -> Verdict {
    if progress.complete {
        return Verdict::Done;
    }
    if let Some(message) = &progress.deadline_exceeded {
        return Verdict::Slow(format!("the Deployment exceeded its progress deadline: {message}"));
    }
    let (new, old): (Vec<&PodView>, Vec<&PodView>) =
        pods.iter().filter(|pod| !pod.terminating).partition(|pod| pod.images.iter().any(|i| pinned.contains(i)));
    // A crash loop the source images had too is not the backups' doing.
    let old_crash = old.iter().any(|pod| pod.waiting.iter().any(|w| w.reason == CRASH_LOOP));
    for pod in new {
        for w in &pod.waiting {
            if PULL_FAILURES.contains(&w.reason.as_str()) || (w.reason == CRASH_LOOP && !old_crash) {
                let message = if w.message.is_empty() { String::new() } else { format!(": {}", w.message) };
                return Verdict::Failed(format!("pod {}, container {}: {}{message}", pod.name, w.container, w.reason));
            }
        }
    }
    if elapsed > timeout {
        return Verdict::Slow(format!("the rollout did not complete within {}", humantime::format_duration(timeout)));
    }
    Verdict::Rolling
}

#[cfg(test)]
mod tests {
    use super::*;

    const BACKUP: &str = "backup.local/mirror/docker.io/library/nginx@sha256:00";
    const MINUTE: Duration = Duration::from_secs(60);

    fn pod(name: &str, image: &str, waiting: Option<&str>) -> PodView {
        PodView {
            name: name.into(),
            terminating: false,
            images: vec![image.into()],
            waiting: waiting
                .map(|reason| Waiting { container: "web".into(), reason: reason.into(), message: "m".into() })
                .into_iter()
                .collect(),
        }
    }

    #[test]
    fn verdicts() {
        let rolling = Progress::default();
        let done = Progress { complete: true, ..Progress::default() };
        let deadline = Progress { deadline_exceeded: Some("timed out progressing".into()), ..Progress::default() };
        let terminating_pull_failure = PodView { terminating: true, ..pod("going", BACKUP, Some("ErrImagePull")) };
        // (what the workload says, its pods, minutes elapsed, the verdict)
        let cases: Vec<(&Progress, Vec<PodView>, u64, Verdict)> = vec![
            (&done, vec![pod("new", BACKUP, Some("ImagePullBackOff"))], 1, Verdict::Done),
            (
                &deadline,
                vec![],
                1,
                Verdict::Slow("the Deployment exceeded its progress deadline: timed out progressing".into()),
            ),
            (
                &rolling,
                vec![pod("new", BACKUP, Some("ImagePullBackOff"))],
                1,
                Verdict::Failed("pod new, container web: ImagePullBackOff: m".into()),
            ),
            (
                &rolling,
                vec![pod("new", BACKUP, Some("ErrImageNeverPull"))],
                1,
                Verdict::Failed("pod new, container web: ErrImageNeverPull: m".into()),
            ),
            (
                &rolling,
                vec![pod("old", "nginx:1.25", None), pod("new", BACKUP, Some("CrashLoopBackOff"))],
                1,
                Verdict::Failed("pod new, container web: CrashLoopBackOff: m".into()),
            ),
            // The source crash-looped too: not the backups' doing.
            (
                &rolling,
                vec![pod("old", "nginx:1.25", Some("CrashLoopBackOff")), pod("new", BACKUP, Some("CrashLoopBackOff"))],
                1,
                Verdict::Rolling,
            ),
            // Old pods failing to pull are not the backups' doing either.
            (
                &rolling,
                vec![pod("old", "nginx:1.25", Some("ImagePullBackOff")), pod("new", BACKUP, None)],
                1,
                Verdict::Rolling,
            ),
            (&rolling, vec![terminating_pull_failure], 1, Verdict::Rolling),
            (&rolling, vec![pod("new", BACKUP, Some("ContainerCreating"))], 1, Verdict::Rolling),
            (&rolling, vec![], 11, Verdict::Slow("the rollout did not complete within 10m".into())),
        ];
        let pinned = BTreeSet::from([BACKUP.to_string()]);
        for (progress, pods, minutes, verdict) in cases {
            assert_eq!(judge(progress, &pods, &pinned, MINUTE * minutes as u32, 10 * MINUTE), verdict, "{pods:?}");
        }
    }
}
