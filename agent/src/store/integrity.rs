//! The deep check of the state file: redb's own page and checksum check, then every row and the
//! audit log's seq chain.

use std::path::Path;

use redb::{Database, ReadableTable};
use serde::Serialize;

use super::{
    RevocationRecord, StoreError, db_error,
    schema::{
        AUDIT, META, META_NEXT_AUDIT_SEQ, META_SCHEMA_VERSION, REVOCATIONS, SCHEMA_VERSION,
        SESSIONS, decode_u32, decode_u64,
    },
};
use crate::{audit::event::AuditEvent, sessions::model::Session};

/// Past this many, problems are counted rather than listed: one broken range would otherwise
/// bury the report.
const LISTED_PROBLEMS: usize = 100;

/// What [`Store::check_integrity`](super::Store::check_integrity) found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct IntegrityReport {
    /// Whether redb found its pages and checksums sound. `false`: it found damage and repaired
    /// what it could; the rest of the report describes the result.
    pub engine_clean: bool,
    /// 0 when the meta table has none.
    pub schema_version: u32,
    pub sessions: u64,
    pub revocations: u64,
    pub audit_events: u64,
    pub last_audit_seq: u64,
    /// As the meta table says; 0 when it has none.
    pub next_audit_seq: u64,
    /// What is wrong, one sentence each; empty for a healthy store.
    pub problems: Vec<String>,
    /// Problems found beyond the listed ones.
    pub unlisted_problems: usize,
}

impl IntegrityReport {
    pub fn is_healthy(&self) -> bool {
        self.engine_clean && self.problems.is_empty()
    }

    fn problem(&mut self, problem: String) {
        if self.problems.len() < LISTED_PROBLEMS {
            self.problems.push(problem);
        } else {
            self.unlisted_problems += 1;
        }
    }
}

pub(super) fn check(path: &Path, db: &mut Database) -> Result<IntegrityReport, StoreError> {
    let engine_clean = db
        .check_integrity()
        .map_err(db_error(path, "check the database's integrity"))?;
    let mut report = IntegrityReport {
        engine_clean,
        schema_version: 0,
        sessions: 0,
        revocations: 0,
        audit_events: 0,
        last_audit_seq: 0,
        next_audit_seq: 0,
        problems: Vec::new(),
        unlisted_problems: 0,
    };
    if !engine_clean {
        report.problem("redb found damaged pages or checksums and repaired them".into());
    }
    let read_error = db_error(path, "read the tables for the integrity check");
    let txn = db.begin_read().map_err(read_error)?;
    let fail = |e: redb::Error| StoreError::Database {
        action: "read the tables for the integrity check",
        path: path.to_owned(),
        source: Box::new(e),
    };

    let meta = txn.open_table(META).map_err(|e| fail(e.into()))?;
    let meta_value = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        let row = meta.get(key).map_err(|e| fail(e.into()))?;
        Ok(row.map(|v| v.value().to_vec()))
    };
    match meta_value(META_SCHEMA_VERSION)?.map(|v| decode_u32(&v)) {
        Some(Some(version)) => report.schema_version = version,
        Some(None) => report.problem("the schema version is not a 4-byte integer".into()),
        None => report.problem("the meta table has no schema version".into()),
    }
    if report.schema_version != 0 && report.schema_version != SCHEMA_VERSION {
        report.problem(format!(
            "the schema version is {}, not {SCHEMA_VERSION}",
            report.schema_version
        ));
    }
    let next_seq = meta_value(META_NEXT_AUDIT_SEQ)?.map(|v| decode_u64(&v));
    match next_seq {
        Some(Some(next)) => report.next_audit_seq = next,
        Some(None) => report.problem("the next audit seq is not an 8-byte integer".into()),
        None => report.problem("the meta table has no next audit seq".into()),
    }

    let sessions = txn.open_table(SESSIONS).map_err(|e| fail(e.into()))?;
    for row in sessions.iter().map_err(|e| fail(e.into()))? {
        let (key, value) = row.map_err(|e| fail(e.into()))?;
        let key = key.value();
        report.sessions += 1;
        match serde_json::from_slice::<Session>(value.value()) {
            Ok(session) if session.id.0 != key => report.problem(format!(
                "sessions row {key:016x} holds session {}",
                session.id
            )),
            Ok(_) => {}
            Err(e) => report.problem(format!("sessions row {key:016x} does not decode: {e}")),
        }
    }

    let revocations = txn.open_table(REVOCATIONS).map_err(|e| fail(e.into()))?;
    for row in revocations.iter().map_err(|e| fail(e.into()))? {
        let (key, value) = row.map_err(|e| fail(e.into()))?;
        report.revocations += 1;
        if let Err(e) = serde_json::from_slice::<RevocationRecord>(value.value()) {
            let key = key.value();
            report.problem(format!("revocations row {key:016x} does not decode: {e}"));
        }
    }

    let audit = txn.open_table(AUDIT).map_err(|e| fail(e.into()))?;
    let mut expected = 1;
    for row in audit.iter().map_err(|e| fail(e.into()))? {
        let (key, value) = row.map_err(|e| fail(e.into()))?;
        let seq = key.value();
        report.audit_events += 1;
        if seq > expected {
            report.problem(format!("audit seqs {expected} to {} are missing", seq - 1));
        } else if seq < expected {
            // Only seq 0 can get here, as keys ascend.
            report.problem(format!(
                "the audit log holds seq {seq}, which is never assigned"
            ));
        }
        expected = seq.saturating_add(1);
        report.last_audit_seq = seq;
        match serde_json::from_slice::<AuditEvent>(value.value()) {
            Ok(event) if event.seq != seq => report.problem(format!(
                "audit row {seq} holds an event with seq {}",
                event.seq
            )),
            Ok(_) => {}
            Err(e) => report.problem(format!("audit row {seq} does not decode: {e}")),
        }
    }
    if report.next_audit_seq != 0 && report.next_audit_seq != report.last_audit_seq + 1 {
        report.problem(format!(
            "the meta table says the next audit seq is {}, but the log ends at {}",
            report.next_audit_seq, report.last_audit_seq
        ));
    }
    Ok(report)
}
