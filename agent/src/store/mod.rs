//! The agent's durable state: sessions, revocations and the audit log in one redb file, written
//! by one group-committing writer thread.
//!
//! Every write goes through [`Store::commit`] (or [`Store::submit`] from async code). Commits
//! from all threads queue to a single writer, which applies everything queued in one write
//! transaction and makes it durable with one fsync before answering. A commit that returned
//! `Ok` is on disk; one that returned an error changed nothing. Reads run on the caller's thread
//! against the last committed state and never wait for the writer.

pub mod fleet;
mod integrity;
mod locks;
mod open;
mod overlay;
mod schema;
mod signals;
mod writer;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod open_tests;
#[cfg(test)]
pub(crate) mod testing;
#[cfg(test)]
mod tests;

use std::{
    ops::Bound,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock, mpsc},
    thread::{self, JoinHandle},
};

use redb::{Database, ReadTransaction, ReadableTable};
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, oneshot};

pub use self::locks::{LockRecords, LockWrite};
pub use self::signals::{AppliedSignal, DevicePosture, PollState, SeenSet, SignalWrite};
pub use self::{integrity::IntegrityReport, schema::SCHEMA_VERSION};
use self::{
    schema::{AUDIT, REVOCATIONS, SESSIONS, decode},
    writer::{Reply, Request, Writer},
};
use crate::{
    audit::event::AuditEvent,
    sessions::model::{Session, SessionEnd, SessionId, SessionState},
};

/// `session` with the end its revocation record holds, if it has one.
fn with_recorded_end(
    path: &Path,
    revocations: &redb::ReadOnlyTable<u64, &'static [u8]>,
    mut session: Session,
) -> Result<Session, StoreError> {
    if session.is_live()
        && let Some(row) = revocations
            .get(session.id.0)
            .map_err(db_error(path, "read the revocations table"))?
    {
        let record: RevocationRecord = decode(path, "revocations", session.id, row.value())?;
        if let Some(end) = &record.end {
            end.apply(&mut session);
        }
    }
    Ok(session)
}

/// Where the agent keeps its state unless the config says otherwise.
pub const DEFAULT_PATH: &str = "/var/lib/flowwarden/state.redb";

/// How many committed audit events the live feed holds for a subscriber that has not caught up.
/// Past that, the subscriber gets `RecvError::Lagged` and re-reads the log by seq.
pub const AUDIT_FEED_CAPACITY: usize = 4096;

/// Who revoked a session, when and why. The session id is the row's key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationRecord {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub by: String,
    pub reason: String,
    /// How the session ended, when its ending wrote this record instead of the session's
    /// whole row. The session's row then still holds it as it was while live, and reading
    /// the store applies this end to it ([`RecordedEnd::apply`]). A termination of 1,000
    /// sessions so commits 1,000 small records instead of rewriting 1,000 sessions (each a
    /// random page of a large table). Absent in records written before it existed, whose
    /// sessions' rows were rewritten ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end: Option<RecordedEnd>,
}

/// The final state and end of a session, as its revocation record holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedEnd {
    pub state: SessionState,
    pub end: SessionEnd,
}

impl RecordedEnd {
    /// Ends a session read from its row, if the row still has it live: an ended row is
    /// final (a later, fuller record of the end wins).
    pub fn apply(&self, session: &mut Session) {
        if session.is_live() {
            session.state = self.state;
            session.updated_at_ms = self.end.at_ms;
            session.ended = Some(self.end.clone());
        }
    }
}

/// One change to the state. The writes of one commit are applied in order, all or none.
#[derive(Debug, Clone, PartialEq)]
pub enum Write {
    /// Insert or replace the session with this id. Shared with the session table, not copied.
    /// A live record never replaces the record of a session with a revocation: ended is final,
    /// whatever order concurrent commits queue in.
    PutSession(std::sync::Arc<Session>),
    /// Remove the session; removing an absent one is not an error.
    DeleteSession(SessionId),
    PutRevocation(SessionId, RevocationRecord),
    DeleteRevocation(SessionId),
    /// Append to the audit log. The event's `seq` is ignored: the store assigns the next one.
    Audit(AuditEvent),
    /// Put a value in the fleet table (see [`fleet`]).
    Fleet {
        key: String,
        value: Vec<u8>,
    },
    /// Remove a value from the fleet table; removing an absent one is not an error.
    FleetRemove {
        key: String,
    },
    /// A lock, denied token or cut-off (the `locks` table).
    Locks(LockWrite),
    /// The signals receiver's state (seen SETs, applied signals, device posture, poll
    /// positions): committed with the session writes a SET caused.
    Signal(SignalWrite),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "{path} is not a usable flowwarden state file ({detail}); refusing to start. The file is \
         kept as is: restore a backup, or move it away to start with an empty store (which \
         forgets every session and revocation)"
    )]
    Corrupt { path: PathBuf, detail: String },
    #[error(
        "{path} was written with state schema version {found}, newer than version {supported} \
         that this agent understands; refusing to start. The file is kept as is: run the newer \
         agent that wrote it, or restore a backup made by this version"
    )]
    NewerSchema {
        path: PathBuf,
        found: u32,
        supported: u32,
    },
    #[error("{path} is in use by another process (is another flowwarden agent running?)")]
    Locked { path: PathBuf },
    #[error("cannot {action} in {path}: {source}")]
    Database {
        action: &'static str,
        path: PathBuf,
        /// Boxed: redb's error is large, and every result of the store carries this type.
        source: Box<redb::Error>,
    },
    #[error("cannot encode {what} for table {table} of {path}: {source}")]
    Encode {
        path: PathBuf,
        table: &'static str,
        what: String,
        source: serde_json::Error,
    },
    #[error("row {key} of table {table} in {path} does not decode: {detail}")]
    Decode {
        path: PathBuf,
        table: &'static str,
        key: String,
        detail: String,
    },
    #[error("the store {path} is closed; the write was not made")]
    Closed { path: PathBuf },
}

/// Maps any redb error to [`StoreError::Database`], saying what was being done and on which file.
fn db_error<E: Into<redb::Error>>(
    path: &Path,
    action: &'static str,
) -> impl FnOnce(E) -> StoreError {
    let path = path.to_owned();
    move |e| StoreError::Database {
        action,
        path,
        source: Box::new(e.into()),
    }
}

/// Where an audit scan starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuditScan {
    /// The oldest matching events with a seq above this one.
    After(u64),
    /// The newest matching events.
    Newest,
}

/// A handle to the open state file. Clones share the file and its writer thread, which stops
/// (after finishing what was queued) when the last clone is dropped or on [`Store::close`].
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    /// Readers and the writer share it; `check_integrity` alone takes it exclusively, because
    /// redb's own check needs the database to itself.
    db: Arc<RwLock<Database>>,
    queue: mpsc::Sender<Request>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// Fed by the writer, in seq order, as soon as events are durable.
    feed: broadcast::Sender<AuditEvent>,
    #[cfg(test)]
    hooks: Arc<writer::TestHooks>,
}

impl Store {
    /// Opens the state file at `path`, creating it (and its directory) if absent.
    ///
    /// # Errors
    ///
    /// [`StoreError::Corrupt`] for a file that cannot be read, is damaged, or is not a
    /// flowwarden state file; [`StoreError::NewerSchema`] for one written by a newer agent;
    /// [`StoreError::Locked`] if another process has it open. In all three cases the file is
    /// left exactly as it was.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let opened = open::open(path)?;
        let db = Arc::new(RwLock::new(opened.db));
        let (feed, _) = broadcast::channel(AUDIT_FEED_CAPACITY);
        let (queue, requests) = mpsc::channel();
        #[cfg(test)]
        let hooks = Arc::new(writer::TestHooks::default());
        let writer = Writer {
            path: path.to_owned(),
            db: db.clone(),
            feed: feed.clone(),
            next_seq: opened.next_audit_seq,
            #[cfg(test)]
            hooks: hooks.clone(),
        };
        let handle = thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(requests))
            .map_err(|source| StoreError::Io {
                action: "start the writer thread for",
                path: path.to_owned(),
                source,
            })?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                db,
                queue,
                writer: Mutex::new(Some(handle)),
                feed,
                #[cfg(test)]
                hooks,
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Applies `writes` in order, atomically, and returns once they are durable. The result holds
    /// the `Audit` writes as committed, with their seqs. Blocks: from async code use
    /// [`Store::submit`].
    ///
    /// # Errors
    ///
    /// Any error means nothing of `writes` was applied and no seq was used.
    pub fn commit(&self, writes: Vec<Write>) -> Result<Vec<AuditEvent>, StoreError> {
        if writes.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = mpsc::sync_channel(1);
        // A writer that is gone drops the reply unanswered, which `recv` reports below.
        let _ = self.inner.queue.send(Request::Commit {
            writes,
            reply: Reply::Blocking(reply),
        });
        answer.recv().unwrap_or_else(|_| Err(self.closed()))
    }

    /// [`Store::commit`] for async callers: await the receiver. It answers with the same result;
    /// a `RecvError` means the writer thread died and the write was not made.
    pub fn submit(
        &self,
        writes: Vec<Write>,
    ) -> oneshot::Receiver<Result<Vec<AuditEvent>, StoreError>> {
        let (reply, answer) = oneshot::channel();
        if writes.is_empty() {
            let _ = reply.send(Ok(Vec::new()));
            return answer;
        }
        let request = Request::Commit {
            writes,
            reply: Reply::Async(reply),
        };
        if let Err(mpsc::SendError(Request::Commit { reply, .. })) = self.inner.queue.send(request)
        {
            reply.send(Err(self.closed()));
        }
        answer
    }

    /// Stops the writer after it has finished every commit queued so far. Later commits fail
    /// with [`StoreError::Closed`]; reads keep working. Dropping the last clone does the same.
    pub fn close(&self) {
        self.inner.shutdown();
    }

    /// Every session, each as it stands: a session whose revocation record holds its end
    /// is read ended (see [`RevocationRecord::end`]).
    pub fn sessions(&self) -> Result<Vec<Session>, StoreError> {
        self.read(|path, txn| {
            let table = txn
                .open_table(SESSIONS)
                .map_err(db_error(path, "open the sessions table"))?;
            let revocations = txn
                .open_table(REVOCATIONS)
                .map_err(db_error(path, "open the revocations table"))?;
            let rows = table
                .iter()
                .map_err(db_error(path, "read the sessions table"))?;
            rows.map(|row| {
                let (key, value) = row.map_err(db_error(path, "read the sessions table"))?;
                let id = SessionId(key.value());
                let session = decode(path, "sessions", id, value.value())?;
                with_recorded_end(path, &revocations, session)
            })
            .collect()
        })
    }

    pub fn session(&self, id: SessionId) -> Result<Option<Session>, StoreError> {
        self.read(|path, txn| {
            let table = txn
                .open_table(SESSIONS)
                .map_err(db_error(path, "open the sessions table"))?;
            let revocations = txn
                .open_table(REVOCATIONS)
                .map_err(db_error(path, "open the revocations table"))?;
            let row = table
                .get(id.0)
                .map_err(db_error(path, "read the sessions table"))?;
            row.map(|value| {
                let session = decode(path, "sessions", id, value.value())?;
                with_recorded_end(path, &revocations, session)
            })
            .transpose()
        })
    }

    pub fn revocations(&self) -> Result<Vec<(SessionId, RevocationRecord)>, StoreError> {
        self.read(|path, txn| {
            let table = txn
                .open_table(REVOCATIONS)
                .map_err(db_error(path, "open the revocations table"))?;
            let rows = table
                .iter()
                .map_err(db_error(path, "read the revocations table"))?;
            rows.map(|row| {
                let (key, value) = row.map_err(db_error(path, "read the revocations table"))?;
                let id = SessionId(key.value());
                Ok((id, decode(path, "revocations", id, value.value())?))
            })
            .collect()
        })
    }

    /// Up to `limit` audit events with a seq above `after_seq`, oldest first.
    pub fn audit_range(&self, after_seq: u64, limit: usize) -> Result<Vec<AuditEvent>, StoreError> {
        self.scan_audit(AuditScan::After(after_seq), limit, |_| true)
    }

    /// The seq of the newest audit event; 0 when the log is empty.
    pub fn last_audit_seq(&self) -> Result<u64, StoreError> {
        self.read(|path, txn| {
            let table = txn
                .open_table(AUDIT)
                .map_err(db_error(path, "open the audit table"))?;
            let last = table
                .last()
                .map_err(db_error(path, "read the audit table"))?;
            Ok(last.map_or(0, |(key, _)| key.value()))
        })
    }

    /// Runs redb's own check (which repairs what it can), then checks that every row decodes,
    /// that audit seqs run from 1 without gaps, and that the meta table agrees. Slow on a large
    /// log, and commits wait while it runs: meant for `flowwarden status --check` and tests.
    pub fn check_integrity(&self) -> Result<IntegrityReport, StoreError> {
        let mut db = self
            .inner
            .db
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        integrity::check(&self.inner.path, &mut db)
    }

    /// Up to `limit` audit events that `keep` accepts, in ascending seq order: the oldest ones
    /// after a seq, or the newest ones.
    pub(crate) fn scan_audit(
        &self,
        scan: AuditScan,
        limit: usize,
        mut keep: impl FnMut(&AuditEvent) -> bool,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.read(|path, txn| {
            let table = txn
                .open_table(AUDIT)
                .map_err(db_error(path, "open the audit table"))?;
            let after = match scan {
                AuditScan::After(seq) => Bound::Excluded(seq),
                AuditScan::Newest => Bound::Unbounded,
            };
            let rows = table
                .range::<u64>((after, Bound::Unbounded))
                .map_err(db_error(path, "read the audit table"))?;
            let mut rows: Box<dyn Iterator<Item = _>> = match scan {
                AuditScan::After(_) => Box::new(rows),
                AuditScan::Newest => Box::new(rows.rev()),
            };
            let mut found = Vec::new();
            while found.len() < limit {
                let Some(row) = rows.next() else { break };
                let (key, value) = row.map_err(db_error(path, "read the audit table"))?;
                let event: AuditEvent = decode(path, "audit", key.value(), value.value())?;
                if keep(&event) {
                    found.push(event);
                }
            }
            if scan == AuditScan::Newest {
                found.reverse();
            }
            Ok(found)
        })
    }

    /// A receiver of every audit event committed from now on, in seq order.
    pub(crate) fn subscribe_audit(&self) -> broadcast::Receiver<AuditEvent> {
        self.inner.feed.subscribe()
    }

    pub(crate) fn closed(&self) -> StoreError {
        StoreError::Closed {
            path: self.inner.path.clone(),
        }
    }

    fn read<T>(
        &self,
        f: impl FnOnce(&Path, &ReadTransaction) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let db = self.inner.db.read().unwrap_or_else(PoisonError::into_inner);
        let txn = db
            .begin_read()
            .map_err(db_error(&self.inner.path, "begin a read transaction"))?;
        f(&self.inner.path, &txn)
    }

    #[cfg(test)]
    fn hooks(&self) -> &writer::TestHooks {
        &self.inner.hooks
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Inner {
    fn shutdown(&self) {
        let handle = self
            .writer
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(handle) = handle else { return };
        // Queued behind every commit already sent, so those are finished first.
        let _ = self.queue.send(Request::Close);
        if handle.join().is_err() {
            tracing::error!(path = %self.path.display(), "the store writer thread panicked");
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shutdown();
    }
}
