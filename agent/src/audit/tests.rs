//! Tests of the audit log: the live feed's order and catch-up, and query filters.

use std::thread;

use tokio::sync::broadcast::error::TryRecvError;

use super::{event::AuditKind, *};
use crate::{
    sessions::model::SessionId,
    store::{
        AUDIT_FEED_CAPACITY, RevocationRecord, Store,
        testing::{TempDir, event, session},
    },
};

fn audit(dir: &TempDir) -> Audit {
    Audit::new(Store::open(&dir.state_file()).expect("open the store"))
}

fn drain(feed: &mut broadcast::Receiver<AuditEvent>) -> Vec<AuditEvent> {
    let mut events = Vec::new();
    loop {
        match feed.try_recv() {
            Ok(event) => events.push(event),
            Err(TryRecvError::Empty) => return events,
            Err(e) => panic!("feed: {e:?}"),
        }
    }
}

#[test]
fn subscribers_see_every_commit_once_in_seq_order() {
    let dir = TempDir::new("feed");
    let audit = audit(&dir);
    let mut feed = audit.subscribe();
    let workers: Vec<_> = (0..4u64)
        .map(|t| {
            let audit = audit.clone();
            thread::spawn(move || {
                for i in 0..50u64 {
                    let id = t << 32 | (i + 1);
                    if i % 2 == 0 {
                        let events = vec![
                            event(AuditKind::FlowOpened, Some(id), None),
                            event(AuditKind::FlowIdle, Some(id), None),
                        ];
                        let recorded = audit.record(events).expect("record");
                        assert_eq!(recorded[1].seq, recorded[0].seq + 1);
                    } else {
                        // A session change and its audit event, committed together, reach the
                        // feed without a separate publish.
                        audit
                            .store()
                            .commit(vec![
                                Write::PutSession(session(id, "alice@corp.example").into()),
                                Write::Audit(event(AuditKind::SessionAdmitted, Some(id), None)),
                            ])
                            .expect("commit");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let seen: Vec<u64> = drain(&mut feed).iter().map(|e| e.seq).collect();
    assert_eq!(seen, (1..=300).collect::<Vec<_>>());
    assert_eq!(audit.store().last_audit_seq().expect("read"), 300);
}

#[tokio::test]
async fn record_async_commits_then_feeds() {
    let dir = TempDir::new("async");
    let audit = audit(&dir);
    let mut feed = audit.subscribe();
    let recorded = audit
        .record_async(vec![event(AuditKind::AgentStarted, None, None)])
        .await
        .expect("record");
    assert_eq!(recorded[0].seq, 1);
    assert_eq!(feed.recv().await.expect("feed"), recorded[0]);
    assert_eq!(
        audit.query(&AuditQuery::default()).expect("query"),
        recorded
    );
}

#[test]
fn a_lagging_subscriber_catches_up_by_seq() {
    let dir = TempDir::new("lag");
    let audit = audit(&dir);
    let mut feed = audit.subscribe();
    let total = AUDIT_FEED_CAPACITY as u64 + 100;
    let events = (0..total)
        .map(|_| event(AuditKind::FlowOpened, None, None))
        .collect();
    audit.record(events).expect("record");

    // What a follower does: on Lagged, re-read the log after the last seq it handled, then go
    // on with the feed, skipping what the re-read already covered.
    let mut handled = 0;
    let mut missed = 0;
    loop {
        match feed.try_recv() {
            Ok(event) if event.seq <= handled => {}
            Ok(event) => {
                assert_eq!(event.seq, handled + 1, "the feed skipped an event");
                handled = event.seq;
            }
            Err(TryRecvError::Lagged(n)) => {
                missed += n;
                let q = AuditQuery {
                    after_seq: Some(handled),
                    limit: Some(n as usize),
                    ..AuditQuery::default()
                };
                for event in audit.query(&q).expect("query") {
                    assert_eq!(event.seq, handled + 1, "the re-read skipped an event");
                    handled = event.seq;
                }
            }
            Err(TryRecvError::Empty) => break,
            Err(e) => panic!("feed: {e:?}"),
        }
    }
    assert_eq!(missed, 100);
    assert_eq!(handled, total);
    // The feed ends when the store closes.
    drop(audit);
    assert!(matches!(feed.try_recv(), Err(TryRecvError::Closed)));
}

#[test]
fn query_filters_and_limits() {
    let dir = TempDir::new("query");
    let audit = audit(&dir);
    let mut events = Vec::new();
    for i in 0..30u64 {
        let (kind, user) = match i % 3 {
            0 => (AuditKind::SessionAdmitted, Some("Alice@Corp.example")),
            1 => (AuditKind::FlowOpened, Some("bob@corp.example")),
            _ => (
                AuditKind::SessionTerminated {
                    by: "uid 0".into(),
                    reason: "test".into(),
                },
                None,
            ),
        };
        let mut e = event(kind, Some(1 + i % 2), user);
        e.at_ms = 1_000 + i * 10;
        events.push(e);
    }
    let all = audit.record(events).expect("record");
    audit
        .store()
        .commit(vec![Write::PutRevocation(
            SessionId(1),
            RevocationRecord {
                at_ms: 1,
                by: "uid 0".into(),
                reason: "test".into(),
                end: None,
            },
        )])
        .expect("commit");
    let seqs = |q: AuditQuery| -> Vec<u64> {
        audit
            .query(&q)
            .expect("query")
            .iter()
            .map(|e| e.seq)
            .collect()
    };

    assert_eq!(seqs(AuditQuery::default()), (1..=30).collect::<Vec<_>>());
    let newest = AuditQuery {
        limit: Some(3),
        ..AuditQuery::default()
    };
    assert_eq!(
        seqs(newest.clone()),
        [28, 29, 30],
        "newest first, returned ascending"
    );
    let after = AuditQuery {
        after_seq: Some(10),
        ..newest.clone()
    };
    assert_eq!(seqs(after), [11, 12, 13], "oldest after the seq");
    let since = AuditQuery {
        since_ms: Some(1_250),
        ..AuditQuery::default()
    };
    assert_eq!(seqs(since), (26..=30).collect::<Vec<_>>());
    let session = AuditQuery {
        session: Some(SessionId(2)),
        limit: Some(2),
        ..AuditQuery::default()
    };
    assert_eq!(seqs(session), [28, 30]);
    let user = AuditQuery {
        user: Some("alice@corp.EXAMPLE".into()),
        ..AuditQuery::default()
    };
    assert_eq!(seqs(user), (1..=30).step_by(3).collect::<Vec<_>>());
    let kind = AuditQuery {
        kind: Some("session_terminated".into()),
        since_ms: Some(1_200),
        ..AuditQuery::default()
    };
    assert_eq!(seqs(kind), [21, 24, 27, 30]);
    let unknown = AuditQuery {
        kind: Some("no_such_kind".into()),
        ..AuditQuery::default()
    };
    assert!(seqs(unknown).is_empty());
    let none = AuditQuery {
        limit: Some(0),
        ..AuditQuery::default()
    };
    assert!(seqs(none).is_empty());
    assert_eq!(audit.query(&AuditQuery::default()).expect("query"), all);

    let huge = AuditQuery {
        limit: Some(1_000_000),
        ..AuditQuery::default()
    };
    assert_eq!(huge.effective_limit(), MAX_QUERY_LIMIT);
    assert_eq!(AuditQuery::default().effective_limit(), DEFAULT_QUERY_LIMIT);
}

#[test]
fn queries_parse_strictly() {
    let q: AuditQuery = serde_json::from_str(
        r#"{"after_seq": 5, "session": "00000000000000ab", "kind": "flow_opened", "limit": 10}"#,
    )
    .expect("a valid query");
    assert_eq!(q.session, Some(SessionId(0xab)));
    assert_eq!((q.after_seq, q.limit), (Some(5), Some(10)));
    for bad in [
        r#"{"sesion": "00000000000000ab"}"#,
        r#"{"session": 171}"#,
        r#"{"limit": -1}"#,
    ] {
        assert!(
            serde_json::from_str::<AuditQuery>(bad).is_err(),
            "accepted {bad}"
        );
    }
}
