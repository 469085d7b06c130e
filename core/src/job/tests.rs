//! The machine's rules, one test per rule.

use std::time::{Duration, Instant};

use jiff::Timestamp;

use super::{
    plan::{Child, Holding, Holdings, Part},
    *,
};

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

fn status(phase: Phase, attempts: u32) -> Status {
    Status {
        phase,
        attempts,
        failures: attempts.saturating_sub(1),
        observed_generation: 1,
        agent: Some("agent-a".into()),
        node: Some("node-a".into()),
        ..Status::default()
    }
}

fn observed<'a>(status: &'a Status, live: Option<&'a LiveJob>) -> Observed<'a> {
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
        updated: Instant::now(),
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
    let recorded = Status { message: Some(message), ..pending.clone() };
    assert_eq!(next(&observed(&recorded, None), &limits()), Next::Idle, "the same reason is not written again");
}

#[test]
fn a_completed_backup_is_looked_for_again_on_schedule() {
    let done = Status { backup_reference: Some("r@sha256:x".into()), ..status(Phase::Completed, 1) };
    let o = Observed { since_verified: Duration::from_secs(600), ..observed(&done, None) };
    assert_eq!(next(&o, &limits()), Next::After(Duration::from_secs(3000)));
    let o = Observed { since_verified: Duration::from_secs(3600), ..observed(&done, None) };
    assert_eq!(next(&o, &limits()), Next::Reverify);
    let never = Limits { verify_every: Duration::ZERO, ..limits() };
    assert_eq!(next(&o, &never), Next::Idle);
    let now = Timestamp::now();
    assert_eq!(Transition::Verified.apply(&done, now).last_verified, Some(now));
}

#[test]
fn a_lost_backup_is_copied_again_or_fails_when_no_node_holds_it() {
    let done = Status { backup_reference: Some("r@sha256:x".into()), ..status(Phase::Completed, 1) };
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
    let retried = Status { failures: 2, last_error: Some("500".into()), ..status(Phase::Pending, 2) };
    let o = Observed { since_transition: Duration::from_secs(5), ..observed(&retried, None) };
    let wait = backoff(&limits(), 2, DIGEST);
    assert_eq!(next(&o, &limits()), Next::After(wait - Duration::from_secs(5)), "the backoff after attempt 2");

    let failure = Failure { message: "registry said 500".into(), retryable: true, ..Failure::default() };
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
        let since = pushing.conditions.first().map(|c| c.last_transition_time);
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
    let refused = Failure { retryable: false, ..failure };
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
    let Next::Record(Transition::Failed { error, .. }) = next(&observed(&pushing, Some(&lost_once)), &limits()) else {
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
    let pushed = Success { digest: DIGEST.into(), ..Success::default() };
    let success = live(Some(Outcome::Success(pushed)));
    assert!(matches!(next(&observed(&pushing, Some(&success)), &limits()), Next::Verify(_)));
    let nothing = live(Some(Outcome::Success(Success::default())));
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
    let pushing = Status { platforms: index_status(&["a"]).platforms, ..status(Phase::Pushing, 2) };
    let forged = Success { digest: "sha256:forged".into(), ..Success::default() };
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
    let reduced = Status { reduced: true, backup_reference: Some("r@sha256:reduced".into()), ..done.clone() };
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

fn index_status(copied: &[&str]) -> Status {
    let platform = |(name, digest, attestation): (&str, &str, bool)| PlatformCopy {
        platform: name.into(),
        digest: digest.into(),
        attestation,
        copied_from: copied.contains(&digest).then(|| "node/node-a".into()),
    };
    Status {
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
    let pushing = Status { phase: Phase::Pushing, failures: 1, ..index_status(&[]) };
    let success = Success { pushed_manifests: vec!["a".into()], ..Success::default() };
    let report = live(Some(Outcome::Success(success)));
    let Next::Record(copied) = next(&observed(&pushing, Some(&report)), &limits()) else { panic!() };
    assert_eq!(copied, Transition::Copied { node: "node-a".into(), manifests: vec!["a".into()], from_source: vec![] });
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

    let copy = Success { digest: DIGEST.into(), from_source: vec!["att".into()], ..Success::default() };
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

    let source_down = Failure { message: "GET refused".into(), source_failed: true, ..Failure::default() };
    let pushing = Status { phase: Phase::Pushing, ..pending };
    let report = live(Some(Outcome::Failure(source_down)));
    let Next::Record(failed) = next(&observed(&pushing, Some(&report)), &limits()) else { panic!() };
    assert_eq!(failed, Transition::SourceFailed { error: "GET refused".into() });
    let after = failed.apply(&pushing, Timestamp::now());
    assert_eq!((after.phase, after.source_error.as_deref()), (Phase::Pending, Some("GET refused")));
}

#[test]
fn platforms_on_no_node_nor_in_the_source_are_waited_for_then_left_out_of_a_reduced_index() {
    let pending = Status { source_error: Some("unreachable".into()), ..index_status(&["a", "b"]) };
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
    let pushing = Status { phase: Phase::Pushing, ..index_status(&["a", "b"]) };
    let failure = Failure { retryable: true, absent_manifests: vec!["b".into()], ..Failure::default() };
    let retry = failed(&pushing, &limits(), &failure, DIGEST);
    let after = retry.apply(&pushing, Timestamp::now());
    assert_eq!(after.platforms[1].copied_from, None);
    assert_eq!(after.platforms[0].copied_from.as_deref(), Some("node/node-a"));
}

#[test]
fn a_platform_a_node_runs_is_never_left_out_and_the_source_is_tried_again() {
    // node-a runs linux/arm64 here but holds only its index: its layers
    // were discarded once unpacked, and the source failed once.
    let pending = Status { source_error: Some("refused".into()), ..index_status(&["a"]) };
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
