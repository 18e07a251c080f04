//! Crash consistency of the whole agent: ≥ 100 SIGKILLs at seeded random moments in the middle
//! of admissions, terminations and policy reloads, each followed by a restart and the checks of
//! `flowwarden_tests::crash` (nothing acknowledged lost, nothing half-present, a sound store, a
//! kernel that matches it, `status` answered after each start).

use flowwarden_tests::{
    crash::{self, Options},
    privileged::require_root,
};

/// Kills in the middle of operations; kills during a start come on top.
const KILLS: usize = 100;

#[test]
fn sigkill_at_random_moments_loses_nothing_acknowledged() {
    if !require_root("sigkill_at_random_moments_loses_nothing_acknowledged") {
        return;
    }
    let report = crash::run(&Options::new("crash", KILLS));
    println!(
        "{}",
        serde_json::to_string_pretty(&report).expect("the report encodes")
    );
    let c = &report.counts;
    // A harness that acknowledged nothing would pass by checking nothing.
    assert!(
        c.admissions_acked >= KILLS as u64 / 2
            && c.terminations_acked > 0
            && c.reloads_acked > 0
            && c.audit_records_seen > 0
            && c.locks_acked > 0,
        "the driver got too little acknowledged to prove anything: {c:?}"
    );
    assert!(
        c.admissions_unanswered + c.terminate_calls_unanswered + c.reloads_unanswered > 0,
        "no kill caught an operation in flight: {c:?}"
    );
    assert_eq!(report.kills, KILLS);
    assert!(
        report.is_clean(),
        "seed {}: lost {:?}, {} violations:\n{}",
        report.seed,
        report.lost,
        report.violation_count,
        report.violations.join("\n")
    );
    assert_eq!(
        report.status_after_start.samples, KILLS,
        "every restart answered status"
    );
}
