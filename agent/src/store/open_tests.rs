//! Tests of opening the state file: creating it, refusing bad files untouched, and the integrity
//! check.

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use redb::{ReadableTable, WriteTransaction};

use super::{
    schema::{AUDIT, META, META_SCHEMA_VERSION, SESSIONS},
    testing::{TempDir, event, session},
    tests::{open, revocation},
    *,
};
use crate::audit::event::AuditKind;

/// Edits the file behind the store's back, as damage or an older tool would.
fn raw_edit(path: &Path, edit: impl FnOnce(&WriteTransaction)) {
    let db = redb::Database::open(path).expect("open the file with redb directly");
    let txn = db.begin_write().expect("begin a raw write");
    edit(&txn);
    txn.commit().expect("commit a raw write");
}

fn expect_refusal(path: &Path) -> StoreError {
    let before = fs::read(path).expect("read the file before");
    let err = Store::open(path).expect_err("the store must refuse this file");
    assert_eq!(
        fs::read(path).expect("read the file after"),
        before,
        "the file was changed"
    );
    err
}

fn assert_corrupt(err: &StoreError, path: &Path, detail_has: &str) {
    match err {
        StoreError::Corrupt { path: p, detail } => {
            assert_eq!(p, path);
            assert!(
                detail.contains(detail_has),
                "detail {detail:?} lacks {detail_has:?}"
            );
        }
        other => panic!("expected Corrupt, got {other:?}"),
    }
}

#[test]
fn a_new_store_is_private_and_leaves_no_staging_file() {
    let dir = TempDir::new("create");
    let path = dir.path().join("lib/flowwarden/state.redb");
    let store = open(&path);
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("lib/flowwarden")), 0o700);
    assert_eq!(mode(&path), 0o600);
    let names: Vec<_> = fs::read_dir(dir.path().join("lib/flowwarden"))
        .expect("list")
        .map(|e| e.expect("entry").file_name())
        .collect();
    assert_eq!(names, ["state.redb"]);
    assert_eq!(store.path(), path);
    let report = store.check_integrity().expect("check");
    assert!(report.is_healthy(), "{report:?}");
    assert_eq!(
        (report.schema_version, report.next_audit_seq),
        (SCHEMA_VERSION, 1)
    );
}

#[test]
fn garbage_and_empty_files_are_refused_untouched() {
    let dir = TempDir::new("garbage");
    let path = dir.state_file();
    fs::write(
        &path,
        b"flowwarden? no: a text file that someone copied here\n".repeat(100),
    )
    .expect("write");
    let err = expect_refusal(&path);
    assert_corrupt(&err, &path, "not a redb database");
    let message = err.to_string();
    for words in [
        path.to_str().expect("utf-8"),
        "refusing to start",
        "kept as is",
        "restore a backup",
        "forgets every session and revocation",
    ] {
        assert!(message.contains(words), "{message:?} lacks {words:?}");
    }

    fs::write(&path, b"").expect("write");
    assert_corrupt(&expect_refusal(&path), &path, "empty");
}

#[test]
fn truncated_files_are_refused_untouched() {
    let dir = TempDir::new("truncated");
    let path = dir.state_file();
    let store = open(&path);
    for i in 1..=200u64 {
        store
            .commit(vec![
                Write::PutSession(session(i, "alice@corp.example").into()),
                Write::Audit(event(AuditKind::SessionAdmitted, Some(i), None)),
            ])
            .expect("commit");
    }
    drop(store);
    let whole = fs::read(&path).expect("read");
    for keep in [whole.len() / 2, whole.len() / 10, 4096, 100] {
        fs::write(&path, &whole[..keep]).expect("truncate");
        let err = expect_refusal(&path);
        assert!(
            matches!(&err, StoreError::Corrupt { path: p, .. } if *p == path),
            "{err:?}"
        );
    }
}

#[test]
fn foreign_newer_and_cut_files_are_refused_untouched() {
    let dir = TempDir::new("foreign");
    let path = dir.state_file();
    {
        let db = redb::Database::create(&path).expect("create a foreign redb file");
        let txn = db.begin_write().expect("write");
        let other: redb::TableDefinition<&str, u64> = redb::TableDefinition::new("other");
        txn.open_table(other)
            .expect("table")
            .insert("x", 1)
            .expect("insert");
        txn.commit().expect("commit");
    }
    assert_corrupt(&expect_refusal(&path), &path, "not a flowwarden state file");
    fs::remove_file(&path).expect("remove");

    let store = open(&path);
    store
        .commit(vec![
            Write::Audit(event(AuditKind::AgentStarted, None, None)),
            Write::Audit(event(AuditKind::AgentStopped, None, None)),
        ])
        .expect("commit");
    drop(store);
    raw_edit(&path, |txn| {
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert(META_SCHEMA_VERSION, 7u32.to_le_bytes().as_slice())
            .expect("insert");
    });
    let err = expect_refusal(&path);
    assert!(
        matches!(
            &err,
            StoreError::NewerSchema {
                found: 7,
                supported: SCHEMA_VERSION,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("kept as is"), "{err}");

    raw_edit(&path, |txn| {
        let mut meta = txn.open_table(META).expect("meta");
        meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_le_bytes().as_slice())
            .expect("insert");
        txn.open_table(AUDIT)
            .expect("audit")
            .remove(2)
            .expect("remove");
    });
    assert_corrupt(&expect_refusal(&path), &path, "cut short");
}

#[test]
fn a_second_open_is_refused_while_the_first_is_open() {
    let dir = TempDir::new("locked");
    let path = dir.state_file();
    let store = open(&path);
    let err = Store::open(&path).expect_err("second open");
    assert!(
        matches!(&err, StoreError::Locked { path: p } if *p == path),
        "{err:?}"
    );
    drop(store);
    open(&path);
}

#[test]
fn integrity_check_reports_what_is_wrong() {
    let dir = TempDir::new("integrity");
    let path = dir.state_file();
    let store = open(&path);
    for i in 1..=5u64 {
        store
            .commit(vec![
                Write::PutSession(session(i, "alice@corp.example").into()),
                Write::PutRevocation(SessionId(i), revocation("uid 0")),
                Write::Audit(event(AuditKind::SessionAdmitted, Some(i), None)),
            ])
            .expect("commit");
    }
    let report = store.check_integrity().expect("check");
    assert!(report.is_healthy(), "{report:?}");
    assert_eq!(
        (
            report.sessions,
            report.revocations,
            report.audit_events,
            report.last_audit_seq
        ),
        (5, 5, 5, 5)
    );
    drop(store);

    raw_edit(&path, |txn| {
        let mut audit = txn.open_table(AUDIT).expect("audit");
        audit.remove(2).expect("remove");
        audit.insert(4, b"{not json".as_slice()).expect("insert");
        let mut sessions = txn.open_table(SESSIONS).expect("sessions");
        let moved = sessions
            .get(1)
            .expect("get")
            .expect("row 1")
            .value()
            .to_vec();
        sessions.insert(9, moved.as_slice()).expect("insert");
    });
    let store = open(&path);
    let report = store.check_integrity().expect("check");
    assert!(!report.is_healthy());
    assert_eq!(report.problems.len(), 3, "{:#?}", report.problems);
    for expected in [
        "audit seqs 2 to 2 are missing",
        "audit row 4 does not decode",
        "holds session 0000000000000001",
    ] {
        assert!(
            report.problems.iter().any(|p| p.contains(expected)),
            "no problem says {expected:?}: {:#?}",
            report.problems
        );
    }
}
