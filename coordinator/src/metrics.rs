//! Prometheus metrics: reconciles per kind (count, failures, duration), jobs
//! by phase, agents, status writes, patches and pushed bytes.

use std::{sync::Arc, time::Instant};

use image_backup_crds::{ImageBackup, Phase};
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::Store;
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use image_backup_core::job::Transition;

use crate::agents::AgentHub;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabel {
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TransitionLabel {
    pub transition: String,
}

/// Label values known up front: their series are exported at zero from the
/// start, because one that first appears at 1 is invisible to `increase()`
/// (the first workload restored would never alert), and absent series
/// cannot be told from a typo in a rule.
const KINDS: [&str; 3] = ["Deployment", "DaemonSet", "ImageBackup"];
const PATCH_OUTCOMES: [&str; 12] = [
    "rewritten",
    "changed_meanwhile",
    "waiting_for_slot",
    "report_only",
    "not_pullable",
    "private_refused",
    "opted_out",
    "managed",
    // Held, for the hold's reason.
    "rollout_failed",
    "reverted",
    "restored",
    "backup_lost",
];
const RESTORE_OUTCOMES: [&str; 2] = ["rollout_failed", "backup_lost"];
const VERIFICATION_OUTCOMES: [&str; 3] = ["present", "missing", "error"];

/// A reason as Events spell it (`NotPullable`), as outcome labels do
/// (`not_pullable`).
pub fn snake_case(reason: &str) -> String {
    let mut outcome = String::with_capacity(reason.len() + 4);
    for (i, c) in reason.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            outcome.push('_');
        }
        outcome.push(c.to_ascii_lowercase());
    }
    outcome
}

pub struct Metrics {
    registry: Registry,
    reconciles: Family<KindLabel, Counter>,
    reconcile_failures: Family<KindLabel, Counter>,
    reconcile_seconds: Family<KindLabel, Histogram>,
    jobs: Family<PhaseLabel, Gauge>,
    oldest_unfinished: Gauge,
    stalled: Gauge,
    agents: Gauge,
    status_writes: Family<TransitionLabel, Counter>,
    bytes_pushed: Counter,
    push_seconds: Histogram,
    patches: Family<OutcomeLabel, Counter>,
    restores: Family<OutcomeLabel, Counter>,
    verifications: Family<OutcomeLabel, Counter>,
    deleted_unused: Counter,
    pruned: Counter,
    kube_requests: Family<RequestLabel, Counter>,
}

/// Observes a reconcile's duration when dropped.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    kind: &'static str,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        let label = KindLabel { kind: self.kind.into() };
        self.metrics.reconcile_seconds.get_or_create(&label).observe(self.start.elapsed().as_secs_f64());
    }
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("image_backup");
        let reconciles = Family::<KindLabel, Counter>::default();
        registry.register("reconciles", "Reconciles by kind", reconciles.clone());
        let reconcile_failures = Family::<KindLabel, Counter>::default();
        registry.register(
            "reconcile_failures",
            "Reconciles that ended in an error, by kind",
            reconcile_failures.clone(),
        );
        let reconcile_seconds = Family::<KindLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0])
        });
        registry.register("reconcile_duration_seconds", "Duration of reconciles, by kind", reconcile_seconds.clone());
        let jobs = Family::<PhaseLabel, Gauge>::default();
        registry.register("jobs", "ImageBackups by phase", jobs.clone());
        let oldest_unfinished = Gauge::default();
        registry.register(
            "oldest_unfinished_backup_seconds",
            "Age of the oldest ImageBackup still Pending, Assigned or Pushing (0 when none)",
            oldest_unfinished.clone(),
        );
        let stalled = Gauge::default();
        registry.register(
            "stalled_jobs",
            "ImageBackups retrying a transient failure past the attempt limit (condition Stalled)",
            stalled.clone(),
        );
        let agents = Gauge::default();
        registry.register("connected_agents", "Agents with a live session", agents.clone());
        let status_writes = Family::<TransitionLabel, Counter>::default();
        registry.register("status_writes", "ImageBackup status writes, by transition", status_writes.clone());
        let bytes_pushed = Counter::default();
        registry.register("pushed_bytes", "Bytes agents uploaded to the backup registry", bytes_pushed.clone());
        let push_seconds = Histogram::new([0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0]);
        registry.register("push_duration_seconds", "Duration of successful copies", push_seconds.clone());
        let patches = Family::<OutcomeLabel, Counter>::default();
        registry.register("workload_patches", "Workload patches to backup references, by outcome", patches.clone());
        let restores = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "workloads_restored",
            "Workloads the coordinator moved back to their original images, by reason",
            restores.clone(),
        );
        let verifications = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "backup_verifications",
            "Completed backups looked for in the registry again, by outcome (present, missing, error)",
            verifications.clone(),
        );
        let deleted_unused = Counter::default();
        registry.register(
            "unused_imagebackups_deleted",
            "ImageBackups deleted after no workload used them for the grace period",
            deleted_unused.clone(),
        );
        let pruned = Counter::default();
        registry.register(
            "pruned_manifests",
            "Backup manifests deleted from the registry with their unused ImageBackup (--prune)",
            pruned.clone(),
        );
        let kube_requests = Family::<RequestLabel, Counter>::default();
        registry.register("kube_requests", "Requests to the Kubernetes API, by verb", kube_requests.clone());
        let kind = |kind: &str| KindLabel { kind: kind.into() };
        let outcome = |outcome: &str| OutcomeLabel { outcome: outcome.into() };
        for name in KINDS {
            let _ = reconciles.get_or_create(&kind(name));
            let _ = reconcile_failures.get_or_create(&kind(name));
            let _ = reconcile_seconds.get_or_create(&kind(name));
        }
        for name in PATCH_OUTCOMES {
            let _ = patches.get_or_create(&outcome(name));
        }
        for name in RESTORE_OUTCOMES {
            let _ = restores.get_or_create(&outcome(name));
        }
        for name in VERIFICATION_OUTCOMES {
            let _ = verifications.get_or_create(&outcome(name));
        }
        Arc::new(Self {
            registry,
            reconciles,
            reconcile_failures,
            reconcile_seconds,
            jobs,
            oldest_unfinished,
            stalled,
            agents,
            status_writes,
            bytes_pushed,
            push_seconds,
            patches,
            restores,
            verifications,
            deleted_unused,
            pruned,
            kube_requests,
        })
    }

    /// A client for `config` whose every request is counted.
    pub fn counted_client(self: &Arc<Self>, config: kube::Config) -> Result<kube::Client, kube::Error> {
        let metrics = self.clone();
        let count = tower::util::MapRequestLayer::new(move |request: http::Request<kube::client::Body>| {
            let watch = request.uri().query().is_some_and(|q| q.split('&').any(|p| p == "watch=true"));
            let verb = if watch { "WATCH".to_string() } else { request.method().to_string() };
            metrics.kube_requests.get_or_create(&RequestLabel { verb }).inc();
            request
        });
        Ok(kube::client::ClientBuilder::try_from(config)?.with_layer(&count).build())
    }

    /// Counts a reconcile of `kind` and times it until the guard drops.
    pub fn reconcile_started(&self, kind: &'static str) -> ReconcileTimer<'_> {
        debug_assert!(KINDS.contains(&kind), "{kind} is in KINDS");
        self.reconciles.get_or_create(&KindLabel { kind: kind.into() }).inc();
        ReconcileTimer { metrics: self, kind, start: Instant::now() }
    }

    pub fn reconcile_failed(&self, kind: &str) {
        debug_assert!(KINDS.contains(&kind), "{kind} is in KINDS");
        self.reconcile_failures.get_or_create(&KindLabel { kind: kind.into() }).inc();
    }

    pub fn status_written(&self, transition: &Transition) {
        let name = match transition {
            Transition::Restart { .. } => "restart",
            Transition::Waiting { .. } => "waiting",
            Transition::Assigned { .. } => "assigned",
            Transition::Progress { .. } => "progress",
            Transition::Copied { .. } => "copied",
            Transition::SourceFailed { .. } => "source_failed",
            Transition::Completed { .. } => "completed",
            Transition::Retry { .. } => "retry",
            Transition::Failed { .. } => "failed",
            Transition::Lost { .. } => "lost",
            Transition::Verified => "verified",
            Transition::Missing { .. } => "missing",
        };
        self.status_writes.get_or_create(&TransitionLabel { transition: name.into() }).inc();
    }

    pub fn pushed(&self, bytes: u64, seconds: f64) {
        self.bytes_pushed.inc_by(bytes);
        self.push_seconds.observe(seconds);
    }

    pub fn patched(&self, outcome: &str) {
        debug_assert!(PATCH_OUTCOMES.contains(&outcome), "{outcome} is in PATCH_OUTCOMES");
        self.patches.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
    }

    pub fn pruned(&self) {
        self.pruned.inc();
    }

    pub fn deleted_unused(&self) {
        self.deleted_unused.inc();
    }

    pub fn verified(&self, outcome: &str) {
        debug_assert!(VERIFICATION_OUTCOMES.contains(&outcome), "{outcome} is in VERIFICATION_OUTCOMES");
        self.verifications.get_or_create(&OutcomeLabel { outcome: outcome.into() }).inc();
    }

    /// A workload moved back to its original images, for a reason as
    /// Events name it (`RolloutFailed`: outcome `rollout_failed`).
    pub fn restored(&self, reason: &str) {
        let outcome = snake_case(reason);
        debug_assert!(RESTORE_OUTCOMES.contains(&outcome.as_str()), "{outcome} is in RESTORE_OUTCOMES");
        self.restores.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// The exposition text, with the gauges read from the hub and the
    /// ImageBackup store now.
    pub fn render(&self, hub: &AgentHub, backups: &Store<ImageBackup>) -> String {
        self.agents.set(i64::try_from(hub.count()).unwrap_or(i64::MAX));
        let state = backups.state();
        let mut counts = [0i64; 5];
        for backup in &state {
            counts[phase_index(phase_of(backup))] += 1;
        }
        self.oldest_unfinished.set(oldest_unfinished(&state, Timestamp::now()));
        let stalled = state.iter().filter(|b| is_stalled(b)).count();
        self.stalled.set(i64::try_from(stalled).unwrap_or(i64::MAX));
        for (phase, count) in ["Pending", "Assigned", "Pushing", "Completed", "Failed"].into_iter().zip(counts) {
            self.jobs.get_or_create(&PhaseLabel { phase: phase.into() }).set(count);
        }
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}

fn is_stalled(backup: &ImageBackup) -> bool {
    let conditions = backup.status.iter().flat_map(|s| &s.conditions);
    conditions.into_iter().any(|c| c.type_ == image_backup_core::job::STALLED && c.status == "True")
}

fn phase_of(backup: &ImageBackup) -> Phase {
    backup.status.as_ref().map(|s| s.phase).unwrap_or_default()
}

/// Seconds since the oldest ImageBackup not yet Completed or Failed was
/// made, 0 when none: a gauge of waits, not a count of waiting backups,
/// since an alert on the count would fire on any busy cluster where some
/// copy always runs.
fn oldest_unfinished(backups: &[Arc<ImageBackup>], now: Timestamp) -> i64 {
    backups
        .iter()
        .filter(|b| !matches!(phase_of(b), Phase::Completed | Phase::Failed))
        .filter_map(|b| b.metadata.creation_timestamp.as_ref())
        .map(|created| (now.as_second() - created.0.as_second()).max(0))
        .max()
        .unwrap_or(0)
}

fn phase_index(phase: Phase) -> usize {
    match phase {
        Phase::Pending => 0,
        Phase::Assigned => 1,
        Phase::Pushing => 2,
        Phase::Completed => 3,
        Phase::Failed => 4,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use image_backup_crds::{ImageBackup, ImageBackupSpec, ImageBackupStatus, Phase};
    use k8s_openapi::{
        apimachinery::pkg::apis::meta::v1::Time,
        jiff::{SignedDuration, Timestamp},
    };

    #[test]
    fn the_oldest_unfinished_backup_is_timed_from_its_creation() {
        let now: Timestamp = "2026-11-27T12:00:00Z".parse().unwrap();
        let backup = |minutes_ago: i64, phase: Phase| {
            let spec = ImageBackupSpec { source: "docker.io/library/nginx:1.25".into(), digest: "sha256:0".into() };
            let mut backup = ImageBackup::new("b", spec);
            let created = now.checked_sub(SignedDuration::from_mins(minutes_ago)).unwrap();
            backup.metadata.creation_timestamp = Some(Time(created));
            backup.status = Some(ImageBackupStatus { phase, ..Default::default() });
            Arc::new(backup)
        };
        assert_eq!(super::oldest_unfinished(&[], now), 0);
        let finished = [backup(300, Phase::Completed), backup(200, Phase::Failed)];
        assert_eq!(super::oldest_unfinished(&finished, now), 0, "finished backups wait for nothing");
        let waiting =
            [finished[0].clone(), backup(30, Phase::Pending), backup(90, Phase::Pushing), backup(5, Phase::Assigned)];
        assert_eq!(super::oldest_unfinished(&waiting, now), 90 * 60);
    }

    #[test]
    fn outcomes_are_snake_case() {
        assert_eq!(super::snake_case("NotPullable"), "not_pullable");
        assert_eq!(super::snake_case("rewritten"), "rewritten");
    }
}
