//! The index and the records on their own: targets parsed, matched, refused; the store keeps
//! them across a reopen. End-to-end behaviour (sessions cut, logins refused) is in
//! tests/tests/locks*.rs against a real agent.

use std::net::IpAddr;

use super::{
    Locks,
    index::{Index, Subject},
    model::{Cutoff, Denial, Lock, LockId, LockTarget},
};
use crate::{
    identity::{Identity, test_identity},
    sessions::model::SessionId,
    store::{LockRecords, LockWrite, Store, Write, testing::TempDir},
};

fn lock(target: LockTarget, expires_at_ms: Option<u64>) -> Lock {
    Lock {
        id: LockId::random(),
        target: target.canonical().expect("a valid target"),
        reason: Some("stolen".into()),
        show_reason: false,
        by: "uid 0".into(),
        created_at_ms: 1,
        expires_at_ms,
        expired_at_ms: None,
    }
}

fn alice() -> Identity {
    let mut id = test_identity("Alice@Corp.example", &["ops", "dev"]);
    id.device.id = Some("laptop-17".into());
    id.token_sha256 = "ab".repeat(32);
    id.token_issued_at = Some(1_000);
    id
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn refused(
    index: &Index,
    id: &Identity,
    source: &str,
    session: Option<SessionId>,
) -> Option<&'static str> {
    index
        .refusal(
            &Subject {
                identity: id,
                source: ip(source),
                session,
            },
            10_000,
        )
        .map(|r| r.code)
}

#[test]
fn each_kind_of_target_matches_its_identity_and_nothing_else() {
    let a = alice();
    let mut bob = test_identity("bob@corp.example", &["sales"]);
    bob.token_sha256 = "cd".repeat(32);
    let targets = [
        LockTarget::User("alice@corp.EXAMPLE".into()),
        LockTarget::Subject {
            iss: "https://idp.test".into(),
            sub: "sub-Alice@Corp.example".into(),
        },
        LockTarget::Group("dev".into()),
        LockTarget::Device("laptop-17".into()),
        LockTarget::Source("10.1.0.0/16".into()),
        LockTarget::Session(SessionId(7)),
        LockTarget::Token("AB".repeat(32)),
    ];
    for t in targets {
        let mut index = Index::default();
        let l = lock(t.clone(), None);
        let lid = l.id;
        index.insert_lock(l);
        let session = matches!(t, LockTarget::Session(_)).then_some(SessionId(7));
        assert_eq!(
            refused(&index, &a, "10.1.2.3", session),
            Some("locked"),
            "{t} must refuse alice"
        );
        assert_eq!(
            refused(&index, &bob, "10.2.0.1", Some(SessionId(8))),
            None,
            "{t} must not refuse bob"
        );
        index.remove_lock(lid);
        assert_eq!(
            refused(&index, &a, "10.1.2.3", session),
            None,
            "{t} removed"
        );
    }
}

#[test]
fn an_expired_lock_refuses_nothing_and_the_clock_decides() {
    let mut index = Index::default();
    index.insert_lock(lock(
        LockTarget::User("alice@corp.example".into()),
        Some(10_000),
    ));
    let a = alice();
    let who = Subject {
        identity: &a,
        source: ip("10.0.0.1"),
        session: None,
    };
    assert!(index.refusal(&who, 9_999).is_some());
    assert!(index.refusal(&who, 10_000).is_none());
}

#[test]
fn denials_and_cutoffs_refuse_with_their_own_reasons() {
    let a = alice();
    let mut index = Index::default();
    index.insert_denial(Denial {
        key: a.denial_key(),
        user: "alice".into(),
        session: None,
        by: "uid 0".into(),
        reason: "r".into(),
        at_ms: 1,
        until_ms: 20_000,
    });
    assert_eq!(refused(&index, &a, "10.0.0.1", None), Some("token_revoked"));
    let mut fresh = a.clone();
    fresh.token_sha256 = "ef".repeat(32);
    fresh.token_issued_at = Some(2_000);
    fresh.claims.insert("iat".into(), serde_json::json!(2_000));
    assert_eq!(
        refused(&index, &fresh, "10.0.0.1", None),
        None,
        "a new token"
    );

    let cutoff = |at| Cutoff {
        iss: a.issuer.clone(),
        sub: a.subject.clone(),
        user: "alice".into(),
        cutoff_secs: at,
        by: "uid 0".into(),
        reason: "r".into(),
        at_ms: 1,
    };
    index.insert_cutoff(cutoff(2_000));
    assert_eq!(
        refused(&index, &fresh, "10.0.0.1", None),
        Some("issued_before_cutoff"),
        "iat equal to the cut-off is not after it"
    );
    index.insert_cutoff(cutoff(1_500));
    assert_eq!(
        refused(&index, &fresh, "10.0.0.1", None),
        Some("issued_before_cutoff"),
        "an earlier cut-off never loosens a later one"
    );
    let mut later = fresh.clone();
    later.token_issued_at = Some(2_001);
    later.claims.insert("iat".into(), serde_json::json!(2_001));
    assert_eq!(refused(&index, &later, "10.0.0.1", None), None);
    let mut no_iat = later.clone();
    no_iat.token_issued_at = None;
    assert_eq!(
        refused(&index, &no_iat, "10.0.0.1", None),
        Some("issued_before_cutoff"),
        "no iat under a cut-off fails closed"
    );
}

#[test]
fn hostile_targets_are_refused_with_what_to_write() {
    let err = |t: LockTarget| t.canonical().unwrap_err().to_string();
    assert!(err(LockTarget::Source("10.0.0.5/8".into())).contains("did you mean 10.0.0.0/8"));
    assert!(err(LockTarget::Source("0.0.0.0/0".into())).contains("every address"));
    assert!(err(LockTarget::Source("10.0.0/8".into())).contains("not an address or prefix"));
    assert!(err(LockTarget::Source("10.0.0.0/33".into())).contains("not an address or prefix"));
    assert!(err(LockTarget::User("  ".into())).contains("empty"));
    assert!(err(LockTarget::Group("a\u{0}b".into())).contains("control characters"));
    assert!(err(LockTarget::Device("x".repeat(5000))).contains("at most"));
    assert!(err(LockTarget::Token("abc".into())).contains("64 hex digits"));
    assert!(err(LockTarget::Session(SessionId(0))).contains("cannot exist"));
    assert_eq!(
        LockTarget::Source("10.0.0.7".into()).canonical().unwrap(),
        LockTarget::Source("10.0.0.7/32".into())
    );
    assert!("lk-zz".parse::<LockId>().is_err());
    let id = LockId(0xa1);
    assert_eq!(id.to_string().parse::<LockId>().unwrap(), id);
    // The wire form: one target, unknown fields refused.
    assert!(serde_json::from_str::<LockTarget>(r#"{"user":"a","group":"b"}"#).is_err());
    assert!(
        serde_json::from_str::<LockTarget>(r#"{"subject":{"iss":"i","sub":"s","x":1}}"#).is_err()
    );
}

#[test]
fn the_store_keeps_locks_denials_and_cutoffs_across_a_reopen() {
    let dir = TempDir::new("locks");
    let l = lock(LockTarget::Device("laptop-17".into()), None);
    let d = Denial {
        key: alice().denial_key(),
        user: "alice".into(),
        session: Some(SessionId(3)),
        by: "uid 0".into(),
        reason: "r".into(),
        at_ms: 1,
        until_ms: u64::MAX,
    };
    let c = Cutoff {
        iss: "https://idp.test".into(),
        sub: "weird/\"sub\"".into(),
        user: "alice".into(),
        cutoff_secs: 5,
        by: "uid 0".into(),
        reason: "r".into(),
        at_ms: 1,
    };
    {
        let store = Store::open(&dir.state_file()).unwrap();
        assert_eq!(store.lock_records().unwrap(), LockRecords::default());
        store
            .commit(vec![
                Write::Locks(LockWrite::PutLock(l.clone())),
                Write::Locks(LockWrite::PutDenial(d.clone())),
                Write::Locks(LockWrite::PutCutoff(c.clone())),
            ])
            .unwrap();
        store.close();
    }
    let store = Store::open(&dir.state_file()).unwrap();
    let records = store.lock_records().unwrap();
    assert_eq!(records.locks, vec![l.clone()]);
    assert_eq!(records.denials, vec![d]);
    assert_eq!(records.cutoffs, vec![c.clone()]);
    let locks = Locks::load(&store);
    assert!(locks.health().is_ok());
    assert_eq!(locks.counts().locks, 1);
    assert!(locks.check(&alice(), ip("10.0.0.1"), None).is_some());
    store
        .commit(vec![
            Write::Locks(LockWrite::DeleteLock(l.id)),
            Write::Locks(LockWrite::DeleteCutoff {
                iss: c.iss,
                sub: c.sub,
            }),
        ])
        .unwrap();
    let records = store.lock_records().unwrap();
    assert!(records.locks.is_empty() && records.cutoffs.is_empty());
    assert_eq!(records.denials.len(), 1);
}
