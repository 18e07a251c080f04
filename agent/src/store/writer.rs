//! The one thread that writes the state file: it drains every queued commit, applies them all in
//! one write transaction, makes that durable with one fsync, then answers every caller.
//!
//! One fsync per group instead of one per commit is what lets many callers commit durably at
//! once: while a group is being synced, the next one queues up behind it.

use std::{
    path::PathBuf,
    sync::{Arc, PoisonError, RwLock, mpsc},
};

use redb::{Database, Durability, ReadableTable, Table, WriteTransaction};
use tokio::sync::{broadcast, oneshot};

use super::{
    RevocationRecord, StoreError, Write, db_error,
    schema::{AUDIT, META, META_NEXT_AUDIT_SEQ, REVOCATIONS, SESSIONS, decode, encode},
};
use crate::{audit::event::AuditEvent, sessions::model::Session};

pub(super) type Outcome = Result<Vec<AuditEvent>, StoreError>;

/// How the writer answers a caller: blocking callers wait on a std channel, async ones on a
/// oneshot (whose blocking receive would panic inside a runtime).
pub(super) enum Reply {
    Blocking(mpsc::SyncSender<Outcome>),
    Async(oneshot::Sender<Outcome>),
}

impl Reply {
    pub(super) fn send(self, outcome: Outcome) {
        // A caller that stopped waiting has nobody to tell; what it wrote stands either way.
        match self {
            Reply::Blocking(tx) => {
                let _ = tx.send(outcome);
            }
            Reply::Async(tx) => {
                let _ = tx.send(outcome);
            }
        }
    }
}

pub(super) enum Request {
    Commit {
        writes: Vec<Write>,
        reply: Reply,
    },
    /// Finish what was queued before this, then stop.
    Close,
}

struct Pending {
    writes: Vec<Write>,
    reply: Reply,
}

pub(super) struct Writer {
    pub(super) path: PathBuf,
    pub(super) db: Arc<RwLock<Database>>,
    pub(super) feed: broadcast::Sender<AuditEvent>,
    /// The seq the next audit event gets. Advanced only once a transaction has committed, so a
    /// failed one leaves no gap.
    pub(super) next_seq: u64,
    #[cfg(test)]
    pub(super) hooks: Arc<TestHooks>,
}

impl Writer {
    pub(super) fn run(mut self, requests: mpsc::Receiver<Request>) {
        // `recv` fails once every sender is gone, which `Store` never lets happen without a
        // `Close` first; stopping then is still right.
        while let Ok(first) = requests.recv() {
            // Callers answered by the last group are waking up to send their next commit; one
            // yield lets them join this group instead of waiting out a whole fsync for the next
            // (about 7 commits per transaction instead of 5 with 8 busy callers). Alone, it
            // returns at once.
            std::thread::yield_now();
            let mut group = Vec::new();
            let mut closing = false;
            let mut next = Some(first);
            while let Some(request) = next {
                match request {
                    Request::Commit { writes, reply } => group.push(Pending { writes, reply }),
                    Request::Close => {
                        closing = true;
                        break;
                    }
                }
                next = requests.try_recv().ok();
            }
            if !group.is_empty() {
                self.commit_group(group);
            }
            if closing {
                return;
            }
        }
    }

    fn commit_group(&mut self, group: Vec<Pending>) {
        match self.apply(&group) {
            Ok(committed) => {
                self.publish(&committed);
                for (pending, events) in group.into_iter().zip(committed) {
                    pending.reply.send(Ok(events));
                }
            }
            Err(e) if group.len() == 1 => {
                if let Some(pending) = group.into_iter().next() {
                    pending.reply.send(Err(e));
                }
            }
            Err(e) => {
                // Which commit failed is not worth tracking: retrying one by one costs an fsync
                // each, but only on this rare path, and each caller then gets its own answer.
                tracing::warn!(
                    path = %self.path.display(),
                    commits = group.len(),
                    error = %e,
                    "a group commit failed; retrying its commits one at a time"
                );
                for pending in group {
                    let outcome = self.apply(std::slice::from_ref(&pending)).map(|committed| {
                        self.publish(&committed);
                        committed.into_iter().flatten().collect()
                    });
                    pending.reply.send(outcome);
                }
            }
        }
    }

    /// Applies every pending commit in one durable transaction; nothing of it on error.
    fn apply(&mut self, group: &[Pending]) -> Result<Vec<Vec<AuditEvent>>, StoreError> {
        let db = self.db.read().unwrap_or_else(PoisonError::into_inner);
        let mut txn = db
            .begin_write()
            .map_err(db_error(&self.path, "begin a write transaction"))?;
        txn.set_durability(Durability::Immediate);
        let mut next_seq = self.next_seq;
        match self.apply_in(&txn, group, &mut next_seq) {
            Ok(committed) => {
                #[cfg(test)]
                let started = std::time::Instant::now();
                txn.commit()
                    .map_err(db_error(&self.path, "commit a write transaction"))?;
                self.next_seq = next_seq;
                #[cfg(test)]
                self.hooks.committed(started.elapsed());
                Ok(committed)
            }
            Err(e) => {
                if let Err(abort) = txn.abort() {
                    tracing::warn!(path = %self.path.display(), error = %abort,
                        "aborting a failed write transaction failed too");
                }
                Err(e)
            }
        }
    }

    fn apply_in(
        &self,
        txn: &WriteTransaction,
        group: &[Pending],
        next_seq: &mut u64,
    ) -> Result<Vec<Vec<AuditEvent>>, StoreError> {
        let path = self.path.as_path();
        let mut tables = Tables {
            sessions: txn
                .open_table(SESSIONS)
                .map_err(db_error(path, "open the sessions table"))?,
            revocations: txn
                .open_table(REVOCATIONS)
                .map_err(db_error(path, "open the revocations table"))?,
            audit: txn
                .open_table(AUDIT)
                .map_err(db_error(path, "open the audit table"))?,
            fleet: txn
                .open_table(super::fleet::FLEET)
                .map_err(db_error(path, "open the fleet table"))?,
            locks: txn
                .open_table(super::locks::LOCKS)
                .map_err(db_error(path, "open the locks table"))?,
        };
        let mut out = Vec::with_capacity(group.len());
        for pending in group {
            let mut committed = Vec::new();
            for write in &pending.writes {
                if let Write::Signal(w) = write {
                    super::signals::apply(path, txn, w)?;
                    continue;
                }
                if let Some(event) = self.apply_one(&mut tables, write, next_seq)? {
                    committed.push(event);
                }
            }
            out.push(committed);
        }
        if *next_seq != self.next_seq {
            let mut meta = txn
                .open_table(META)
                .map_err(db_error(path, "open the meta table"))?;
            meta.insert(META_NEXT_AUDIT_SEQ, next_seq.to_le_bytes().as_slice())
                .map_err(db_error(path, "write the next audit seq"))?;
        }
        Ok(out)
    }

    fn apply_one(
        &self,
        tables: &mut Tables<'_>,
        write: &Write,
        next_seq: &mut u64,
    ) -> Result<Option<AuditEvent>, StoreError> {
        let path = self.path.as_path();
        match write {
            Write::PutSession(session) => {
                let what = format!("session {}", session.id);
                #[cfg(test)]
                self.hooks.check(path, session.id, &what)?;
                // A revoked session stays ended. A live record of it that arrives after its
                // revocation was computed before the end (a policy change, a sweep, an admission
                // or a reconnect racing a termination) and queued behind it: writing it over
                // the stored row would lose an end written into that row, and the next start
                // would grant the session again.
                let revoked = if session.is_live() {
                    tables
                        .revocations
                        .get(session.id.0)
                        .map_err(db_error(path, "read the revocations table"))?
                        .map(|row| {
                            decode::<RevocationRecord>(path, "revocations", session.id, row.value())
                        })
                        .transpose()?
                } else {
                    None
                };
                let ended;
                let session: &Session = match &revoked {
                    None => session,
                    Some(_)
                        if tables
                            .sessions
                            .get(session.id.0)
                            .map_err(db_error(path, "read the sessions table"))?
                            .is_some() =>
                    {
                        tracing::debug!(session = %session.id,
                            "kept the stored record of a revoked session over a later live one");
                        return Ok(None);
                    }
                    // Its first record: an admission whose commit queued behind a termination
                    // that ended it (a `terminate --cutoff` racing the admission). Skipping it
                    // would lose an acknowledged admission; it is stored with its end.
                    Some(record) => {
                        let mut s = (**session).clone();
                        if let Some(end) = &record.end {
                            end.apply(&mut s);
                        }
                        ended = s;
                        &ended
                    }
                };
                let bytes = encode(path, "sessions", what, session)?;
                tables
                    .sessions
                    .insert(session.id.0, bytes.as_slice())
                    .map_err(db_error(path, "write a session"))?;
            }
            Write::DeleteSession(id) => {
                tables
                    .sessions
                    .remove(id.0)
                    .map_err(db_error(path, "delete a session"))?;
            }
            Write::PutRevocation(id, record) => {
                let bytes = encode(path, "revocations", format!("revocation of {id}"), record)?;
                tables
                    .revocations
                    .insert(id.0, bytes.as_slice())
                    .map_err(db_error(path, "write a revocation"))?;
            }
            Write::DeleteRevocation(id) => {
                tables
                    .revocations
                    .remove(id.0)
                    .map_err(db_error(path, "delete a revocation"))?;
            }
            // Applied by `apply_in`, which holds the transaction the signals tables need.
            Write::Signal(_) => {}
            Write::Audit(event) => {
                let mut event = event.clone();
                event.seq = *next_seq;
                let bytes = encode(path, "audit", format!("audit event {}", event.seq), &event)?;
                tables
                    .audit
                    .insert(event.seq, bytes.as_slice())
                    .map_err(db_error(path, "append an audit event"))?;
                *next_seq += 1;
                return Ok(Some(event));
            }
            Write::Fleet { key, value } => {
                tables
                    .fleet
                    .insert(key.as_str(), value.as_slice())
                    .map_err(db_error(path, "write the fleet table"))?;
            }
            Write::FleetRemove { key } => {
                tables
                    .fleet
                    .remove(key.as_str())
                    .map_err(db_error(path, "remove from the fleet table"))?;
            }
            Write::Locks(w) => super::locks::apply(path, &mut tables.locks, w)?,
        }
        Ok(None)
    }

    /// Feeds live subscribers, in seq order because only this thread sends.
    fn publish(&self, committed: &[Vec<AuditEvent>]) {
        for event in committed.iter().flatten() {
            // Fails only when nobody subscribes, which is fine: the log has it.
            let _ = self.feed.send(event.clone());
        }
    }
}

struct Tables<'txn> {
    sessions: Table<'txn, u64, &'static [u8]>,
    revocations: Table<'txn, u64, &'static [u8]>,
    audit: Table<'txn, u64, &'static [u8]>,
    fleet: Table<'txn, &'static str, &'static [u8]>,
    locks: Table<'txn, &'static str, &'static [u8]>,
}

/// Lets tests make a write fail inside the transaction, after other writes of the same group
/// were applied, to show that nothing of a failed commit survives.
#[cfg(test)]
#[derive(Default)]
pub(super) struct TestHooks {
    /// Putting the session with this id fails as if it could not be encoded; 0: none.
    pub(super) fail_session: std::sync::atomic::AtomicU64,
    /// Write transactions committed, to show how many commits share one.
    pub(super) transactions: std::sync::atomic::AtomicU64,
    /// Time spent in redb's commit (mostly the fsync), in nanoseconds.
    pub(super) commit_nanos: std::sync::atomic::AtomicU64,
}

#[cfg(test)]
impl TestHooks {
    fn committed(&self, took: std::time::Duration) {
        use std::sync::atomic::Ordering;
        self.transactions.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.commit_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    fn check(
        &self,
        path: &std::path::Path,
        id: crate::sessions::model::SessionId,
        what: &str,
    ) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering;
        if self.fail_session.load(Ordering::Relaxed) != id.0 {
            return Ok(());
        }
        Err(StoreError::Encode {
            path: path.to_owned(),
            table: "sessions",
            what: what.to_owned(),
            source: <serde_json::Error as serde::ser::Error>::custom("injected by a test"),
        })
    }
}
