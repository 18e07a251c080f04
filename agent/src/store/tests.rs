//! Tests of committing and reading: round trips, atomicity, seq allocation, closing.

use std::{path::Path, sync::atomic::Ordering, thread};

use super::{
    testing::{TempDir, event, session},
    *,
};
use crate::{audit::event::AuditKind, sessions::model::SessionState};

/// Opens the store, waiting out a lock still held for a moment by a child of another test.
///
/// Tests that spawn processes run alongside: between its fork and its exec, a child holds a
/// copy of every descriptor of this process, the locked state file's too, and with it the
/// lock of a store a test just closed. A lock never released still fails after 5 s.
pub(super) fn open(path: &Path) -> Store {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        match Store::open(path) {
            Ok(store) => return store,
            Err(StoreError::Locked { .. }) if std::time::Instant::now() < deadline => {
                thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => panic!("open {}: {e}", path.display()),
        }
    }
}

pub(super) fn revocation(by: &str) -> RevocationRecord {
    RevocationRecord {
        at_ms: 1_700_000_100_000,
        by: by.into(),
        reason: "left the company".into(),
        end: None,
    }
}

#[test]
fn every_write_kind_round_trips_and_survives_reopen() {
    let dir = TempDir::new("roundtrip");
    let path = dir.state_file();
    let store = open(&path);
    let (a, b) = (
        session(0xa, "alice@corp.example"),
        session(0xb, "bob@corp.example"),
    );
    let committed = store
        .commit(vec![
            Write::PutSession(a.clone().into()),
            Write::PutSession(b.clone().into()),
            Write::PutRevocation(b.id, revocation("uid 0")),
            Write::Audit(event(
                AuditKind::SessionAdmitted,
                Some(0xa),
                Some("alice@corp.example"),
            )),
            Write::Audit(event(AuditKind::FlowOpened, Some(0xa), None)),
        ])
        .expect("commit");
    assert_eq!(committed.iter().map(|e| e.seq).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(committed[0].kind, AuditKind::SessionAdmitted);
    assert_eq!(store.session(a.id).expect("read"), Some(a.clone()));
    assert_eq!(store.session(SessionId(0xc)).expect("read"), None);
    assert_eq!(store.sessions().expect("read"), [a.clone(), b.clone()]);
    assert_eq!(
        store.revocations().expect("read"),
        [(b.id, revocation("uid 0"))]
    );
    assert_eq!(store.audit_range(0, 10).expect("read"), committed);
    assert_eq!(store.audit_range(1, 10).expect("read"), committed[1..]);
    assert_eq!(store.audit_range(0, 1).expect("read"), committed[..1]);
    assert_eq!(store.last_audit_seq().expect("read"), 2);

    let mut a2 = a.clone();
    a2.state = SessionState::Dormant;
    store
        .commit(vec![
            Write::PutSession(a2.clone().into()),
            Write::DeleteSession(b.id),
            Write::DeleteRevocation(b.id),
            Write::DeleteSession(SessionId(0xdead)),
        ])
        .expect("commit");
    assert_eq!(store.sessions().expect("read"), [a2.clone()]);
    assert!(store.revocations().expect("read").is_empty());
    store
        .commit(vec![Write::PutRevocation(a.id, revocation("idp"))])
        .expect("commit");
    drop(store);

    let store = open(&path);
    assert_eq!(store.sessions().expect("read"), [a2]);
    assert_eq!(
        store.revocations().expect("read"),
        [(a.id, revocation("idp"))]
    );
    assert_eq!(store.audit_range(0, 10).expect("read"), committed);
    let next = store
        .commit(vec![Write::Audit(event(
            AuditKind::AgentStarted,
            None,
            None,
        ))])
        .expect("commit");
    assert_eq!(next[0].seq, 3, "seqs continue after a reopen");
    assert!(store.check_integrity().expect("check").is_healthy());
}

#[test]
fn a_failing_write_leaves_nothing_of_its_commit() {
    let dir = TempDir::new("atomic");
    let store = open(&dir.state_file());
    store
        .commit(vec![Write::Audit(event(
            AuditKind::AgentStarted,
            None,
            None,
        ))])
        .expect("commit");
    store.hooks().fail_session.store(0xbad, Ordering::Relaxed);

    let err = store
        .commit(vec![
            Write::PutSession(session(0xa, "alice@corp.example").into()),
            Write::PutRevocation(SessionId(0xa), revocation("uid 0")),
            Write::Audit(event(AuditKind::SessionAdmitted, Some(0xa), None)),
            Write::PutSession(session(0xbad, "mallory@corp.example").into()),
        ])
        .expect_err("the injected failure must fail the commit");
    assert!(
        matches!(&err, StoreError::Encode { table: "sessions", what, .. } if what == "session 0000000000000bad"),
        "{err:?}"
    );
    assert!(store.sessions().expect("read").is_empty());
    assert!(store.revocations().expect("read").is_empty());
    assert_eq!(store.last_audit_seq().expect("read"), 1);

    // Other commits that share the failing one's group still go through, gap-free.
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || {
                for i in 0..50u64 {
                    let writes = if i % 10 == 0 {
                        vec![
                            Write::Audit(event(AuditKind::FlowOpened, None, None)),
                            Write::PutSession(session(0xbad, "mallory@corp.example").into()),
                        ]
                    } else {
                        vec![
                            Write::PutSession(session(t << 32 | (i + 1), "x@corp.example").into()),
                            Write::Audit(event(AuditKind::FlowOpened, None, None)),
                        ]
                    };
                    assert_eq!(store.commit(writes).is_ok(), i % 10 != 0);
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    assert_eq!(store.sessions().expect("read").len(), 4 * 45);
    assert_eq!(store.last_audit_seq().expect("read"), 1 + 4 * 45);
    let report = store.check_integrity().expect("check");
    assert!(report.is_healthy(), "{report:?}");
}

#[test]
fn seqs_are_gap_free_across_concurrent_committers_and_reopen() {
    const THREADS: u64 = 8;
    const COMMITS: u64 = 200;
    let dir = TempDir::new("seqs");
    let path = dir.state_file();
    let store = open(&path);
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let store = store.clone();
            thread::spawn(move || {
                let mut seqs = Vec::new();
                for i in 0..COMMITS {
                    // Every other commit carries two events, which must get adjacent seqs.
                    let n = 1 + i % 2;
                    let writes = (0..n)
                        .map(|_| Write::Audit(event(AuditKind::FlowOpened, Some(t + 1), None)))
                        .collect();
                    let committed = store.commit(writes).expect("commit");
                    let got: Vec<u64> = committed.iter().map(|e| e.seq).collect();
                    assert_eq!(got.len() as u64, n);
                    assert!(
                        got.windows(2).all(|w| w[1] == w[0] + 1),
                        "one commit: {got:?}"
                    );
                    assert!(
                        seqs.last().is_none_or(|&last| got[0] > last),
                        "order in a thread"
                    );
                    seqs.extend(got);
                }
                seqs
            })
        })
        .collect();
    let mut all: Vec<u64> = workers
        .into_iter()
        .flat_map(|w| w.join().expect("worker"))
        .collect();
    all.sort_unstable();
    let total = THREADS * COMMITS * 3 / 2;
    assert_eq!(
        all,
        (1..=total).collect::<Vec<_>>(),
        "every seq exactly once"
    );
    let transactions = store.hooks().transactions.load(Ordering::Relaxed);
    eprintln!(
        "{} commits shared {transactions} transactions",
        THREADS * COMMITS
    );
    let stored: Vec<u64> = store
        .audit_range(0, usize::MAX)
        .expect("read")
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(stored, (1..=total).collect::<Vec<_>>());
    drop(store);

    let store = open(&path);
    assert_eq!(store.last_audit_seq().expect("read"), total);
    let next = store
        .commit(vec![Write::Audit(event(
            AuditKind::AgentStarted,
            None,
            None,
        ))])
        .expect("commit");
    assert_eq!(next[0].seq, total + 1);
    assert!(store.check_integrity().expect("check").is_healthy());
}

#[test]
fn close_finishes_queued_work_then_refuses_writes() {
    let dir = TempDir::new("close");
    let store = open(&dir.state_file());
    let pending: Vec<_> = (0..20)
        .map(|_| store.submit(vec![Write::Audit(event(AuditKind::FlowIdle, None, None))]))
        .collect();
    store.close();
    for answer in pending {
        answer
            .blocking_recv()
            .expect("answered")
            .expect("queued before close, so committed");
    }
    let err = store
        .commit(vec![Write::Audit(event(AuditKind::FlowIdle, None, None))])
        .expect_err("closed");
    assert!(matches!(err, StoreError::Closed { .. }), "{err:?}");
    assert_eq!(store.last_audit_seq().expect("reads still work"), 20);
}

#[tokio::test]
async fn submit_answers_async_callers() {
    let dir = TempDir::new("submit");
    let store = open(&dir.state_file());
    let (first, second) = tokio::join!(
        store.submit(vec![Write::Audit(event(
            AuditKind::AgentStarted,
            None,
            None
        ))]),
        store.submit(vec![Write::PutSession(
            session(1, "alice@corp.example").into()
        )]),
    );
    assert_eq!(first.expect("answered").expect("committed")[0].seq, 1);
    assert!(second.expect("answered").expect("committed").is_empty());
    assert!(
        store
            .submit(Vec::new())
            .await
            .expect("answered")
            .expect("ok")
            .is_empty()
    );
    assert_eq!(store.sessions().expect("read").len(), 1);
}

/// What the crash harness (tests/src/crash.rs) caught: a policy change copied a live session,
/// a termination ended it and was acknowledged, then the policy change's older copy committed
/// behind it and the stored session was live again, its acknowledged end lost.
#[test]
fn a_late_live_record_never_revives_a_revoked_session() {
    let dir = TempDir::new("late-live");
    let path = dir.state_file();
    let store = open(&path);
    let end = |s: &Session| super::testing::terminated(s, "left the company");
    let a = session(0xa, "alice@corp.example");
    store
        .commit(vec![Write::PutSession(a.clone().into())])
        .expect("admit");
    let a_ended = end(&a);
    store
        .commit(vec![
            Write::PutSession(a_ended.clone().into()),
            Write::PutRevocation(a.id, revocation("uid 0")),
        ])
        .expect("terminate");
    let mut stale = a.clone();
    stale.grants.clear();
    let committed = store
        .commit(vec![
            Write::PutSession(stale.into()),
            Write::Audit(event(
                AuditKind::GrantRemoved {
                    reason: "policy change".into(),
                },
                Some(0xa),
                Some("alice@corp.example"),
            )),
        ])
        .expect("the late commit succeeds");
    assert_eq!(committed.len(), 1, "the rest of the late commit is kept");
    assert_eq!(store.session(a.id).expect("read"), Some(a_ended.clone()));

    // The same order inside one transaction (one group commit).
    let b = session(0xb, "bob@corp.example");
    let b_ended = end(&b);
    store
        .commit(vec![
            Write::PutSession(b.clone().into()),
            Write::PutSession(b_ended.clone().into()),
            Write::PutRevocation(b.id, revocation("uid 0")),
            Write::PutSession(b.clone().into()),
        ])
        .expect("commit");
    assert_eq!(store.session(b.id).expect("read"), Some(b_ended.clone()));

    // A live session without a revocation is updated as always.
    let mut c = session(0xc, "carol@corp.example");
    store
        .commit(vec![Write::PutSession(c.clone().into())])
        .expect("admit");
    c.state = SessionState::Dormant;
    store
        .commit(vec![Write::PutSession(c.clone().into())])
        .expect("update");
    assert_eq!(store.session(c.id).expect("read"), Some(c.clone()));

    drop(store);
    let store = open(&path);
    assert_eq!(store.sessions().expect("read"), [a_ended, b_ended, c]);
    assert!(store.check_integrity().expect("check").is_healthy());
}

/// A termination commits only the revocation record holding the end: the session's row still
/// says live, and every read (and so every restart) sees the session ended. A fuller ended row
/// written later wins; a live row arriving after the revocation never revives it.
#[test]
fn a_session_ended_by_its_revocation_record_reads_ended_and_stays_so() {
    use crate::sessions::model::{EndCause, SessionEnd};

    let dir = TempDir::new("recorded-end");
    let path = dir.state_file();
    let store = open(&path);
    let a = session(0xa, "alice@corp.example");
    assert!(a.is_live());
    store
        .commit(vec![Write::PutSession(a.clone().into())])
        .expect("commit");
    let end = SessionEnd {
        at_ms: 1_700_000_200_000,
        cause: EndCause::IdentityEvent {
            reason: "session-revoked (SET 1)".into(),
        },
    };
    let record = RevocationRecord {
        end: Some(RecordedEnd {
            state: SessionState::Terminated,
            end: end.clone(),
        }),
        ..revocation("signal https://idp")
    };
    store
        .commit(vec![
            Write::PutRevocation(a.id, record),
            // A live record of the session queued behind its end (a sweep, a reconnect).
            Write::PutSession(a.clone().into()),
        ])
        .expect("commit");
    let mut ended = a.clone();
    ended.state = SessionState::Terminated;
    ended.updated_at_ms = end.at_ms;
    ended.ended = Some(end);
    assert_eq!(store.session(a.id).expect("read"), Some(ended.clone()));
    assert_eq!(store.sessions().expect("read"), [ended.clone()]);
    drop(store);
    let store = open(&path);
    assert_eq!(
        store.sessions().expect("read"),
        [ended.clone()],
        "after a restart too"
    );

    // What the crash harness caught: an admission entered in the table, a `terminate
    // --cutoff` ended it there and its revocation committed first, then the admission's own
    // first record (acknowledged to the client) committed behind it. It is stored, ended.
    let c = session(0xc, "carol@corp.example");
    let record = RevocationRecord {
        end: Some(RecordedEnd {
            state: SessionState::Terminated,
            end: ended.ended.clone().expect("ended"),
        }),
        ..revocation("uid 0")
    };
    store
        .commit(vec![Write::PutRevocation(c.id, record.clone())])
        .expect("the termination commits first");
    store
        .commit(vec![Write::PutSession(c.clone().into())])
        .expect("the admission commits behind it");
    let mut c_ended = c.clone();
    record.end.as_ref().expect("end").apply(&mut c_ended);
    assert!(!c_ended.is_live());
    assert_eq!(store.session(c.id).expect("read"), Some(c_ended.clone()));
    // The same order inside one transaction (one group commit).
    let d = session(0xd, "dave@corp.example");
    store
        .commit(vec![
            Write::PutRevocation(d.id, record.clone()),
            Write::PutSession(d.clone().into()),
        ])
        .expect("commit");
    let mut d_ended = d.clone();
    record.end.as_ref().expect("end").apply(&mut d_ended);
    assert_eq!(store.session(d.id).expect("read"), Some(d_ended.clone()));
    drop(store);
    let store = open(&path);
    assert_eq!(
        store.sessions().expect("read").len(),
        3,
        "alice, carol and dave after a restart"
    );
    assert_eq!(store.session(c.id).expect("read"), Some(c_ended));
    assert_eq!(store.session(d.id).expect("read"), Some(d_ended));

    // A record without an end (written before ends were recorded) leaves the row as it is.
    let b = session(0xb, "bob@corp.example");
    store
        .commit(vec![
            Write::PutSession(b.clone().into()),
            Write::PutRevocation(b.id, revocation("uid 0")),
        ])
        .expect("commit");
    assert_eq!(store.session(b.id).expect("read"), Some(b));
}
