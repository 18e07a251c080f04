//! The audit log: every decision the agent makes, appended durably to the store, and a live feed
//! of it for `flowwarden audit --follow`.
//!
//! Events get their seq from the store as they commit, and the store's writer feeds them to
//! subscribers in seq order once they are durable: a subscriber never sees an event that a crash
//! could take back. That holds for events recorded here and for those a caller commits with
//! [`Store::commit`] next to session writes (to change a session and log it atomically); both
//! reach subscribers without further calls.

pub mod event;
mod query;

#[cfg(test)]
mod tests;

use tokio::sync::broadcast;

use self::event::AuditEvent;
pub use self::query::{AuditQuery, DEFAULT_QUERY_LIMIT, MAX_QUERY_LIMIT};
use crate::store::{AuditScan, Store, StoreError, Write};

/// The audit log and its live feed. Clones share both.
#[derive(Debug, Clone)]
pub struct Audit {
    store: Store,
}

impl Audit {
    pub fn new(store: Store) -> Audit {
        Audit { store }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Appends `events` atomically and durably, and returns them with their seqs. Blocks until
    /// the fsync; from async code use [`Audit::record_async`].
    ///
    /// # Errors
    ///
    /// Any error means none of `events` was recorded.
    pub fn record(&self, events: Vec<AuditEvent>) -> Result<Vec<AuditEvent>, StoreError> {
        self.store
            .commit(events.into_iter().map(Write::Audit).collect())
    }

    /// [`Audit::record`] without blocking the runtime.
    pub async fn record_async(
        &self,
        events: Vec<AuditEvent>,
    ) -> Result<Vec<AuditEvent>, StoreError> {
        let answer = self
            .store
            .submit(events.into_iter().map(Write::Audit).collect());
        answer.await.unwrap_or_else(|_| Err(self.store.closed()))
    }

    /// Every event committed from now on, in seq order, each exactly once.
    ///
    /// The feed holds [`AUDIT_FEED_CAPACITY`](crate::store::AUDIT_FEED_CAPACITY) events for a
    /// subscriber that falls behind; past that, `recv` returns `RecvError::Lagged` and the
    /// oldest events are gone from the feed (not from the log). A subscriber should remember the
    /// last seq it handled and, on `Lagged`, catch up with [`Audit::query`] using `after_seq`,
    /// skipping feed events at or below the last seq it has.
    pub fn subscribe(&self) -> broadcast::Receiver<AuditEvent> {
        self.store.subscribe_audit()
    }

    /// The events that match `q`, in ascending seq order.
    ///
    /// With `after_seq`, the oldest matching events after it (to page forward, or catch up a
    /// feed). Without, the newest matching ones (what an operator asking "what happened since
    /// 10:00" or "what did alice do" wants first); page back by narrowing the filters.
    pub fn query(&self, q: &AuditQuery) -> Result<Vec<AuditEvent>, StoreError> {
        let scan = match q.after_seq {
            Some(seq) => AuditScan::After(seq),
            None => AuditScan::Newest,
        };
        self.store
            .scan_audit(scan, q.effective_limit(), |e| q.matches(e))
    }
}
