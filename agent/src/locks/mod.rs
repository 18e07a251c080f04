//! Termination that sticks: identity locks, token denial and per-user cut-offs. A terminated
//! user must authenticate again at the identity provider; a locked user, group, device,
//! source, session or token stays out until the lock is removed or its TTL runs out.
//!
//! The index ([`Locks`]) is held by [`Sessions`](crate::sessions::Sessions) and checked under
//! the session table's lock at every admission and reconnect, so a lock added concurrently
//! with an admission either refuses it or finds (and ends) the session it made.
//!
//! Entry points (stable: other rooms build on them), all on `Sessions` (reachable from the
//! API core as `core.sessions`):
//! - [`Sessions::locks`](crate::sessions::Sessions::locks) → [`Locks`]: `list`, `get`,
//!   `counts`, `check` (the admission check), `cutoff`, `lock_matching_session`.
//! - `Sessions::add_lock(NewLock, by)` → [`LockAdded`]: records the lock and ends every live
//!   session it matches at once (kernel revocation first, sockets destroyed, durable).
//! - `Sessions::remove_lock(LockId, by)` → the removed [`Lock`].
//! - `Sessions::set_cutoff(CutoffRequest, by)` → [`CutoffSet`]: tokens of `iss`+`sub`
//!   issued at or before the time are refused; the subject's sessions on such tokens end.
//! - `Sessions::deny_session_token(SessionId, by, reason)` → the [`Denial`] recorded.
//! - `Sessions::terminate_matching(&LockTarget, TerminateOptions, by, reason)` and
//!   `Sessions::terminate_sessions(&Target, TerminateOptions, by, reason)` → [`Terminated`]:
//!   termination that denies the sessions' tokens and/or sets cut-offs.
//! - `Sessions::enforce_locks(by)`: ends live sessions a lock now matches (after a policy
//!   re-evaluation or an identity change, e.g. new groups).
//! - `Sessions::sweep_locks(&LocksConfig)` and [`sweep_loop`]: expiry (audited, kept listed)
//!   and pruning.
//!
//! The typed status-socket requests are `lock.add`, `lock.list`, `lock.show`, `lock.remove`
//! and the `allow_relogin` / `cutoff` parameters of `sessions.terminate`.

mod actions;
mod index;
pub mod model;
mod sweep;
#[cfg(test)]
mod tests;
pub mod wire;

use std::{net::IpAddr, sync::RwLock};

pub use actions::{
    CutoffRequest, CutoffSet, LockAdded, NewLock, Sticking, TerminateOptions, Terminated,
};
use index::{Index, Subject};
pub use model::{Cutoff, Denial, Lock, LockId, LockState, LockTarget, Refusal};
use serde::{Deserialize, Serialize};
pub use sweep::{LockSweep, sweep_loop};

use crate::{
    identity::Identity,
    sessions::model::{Session, SessionId, now_ms},
    store::{LockRecords, Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum LocksError {
    #[error("invalid lock target: {0}")]
    BadTarget(String),
    #[error("{0:?} is not a lock id: expected lk- and 1 to 16 hex digits")]
    BadLockId(String),
    #[error("invalid TTL: {0}")]
    BadTtl(String),
    #[error("invalid reason: {0}")]
    BadReason(String),
    #[error("no lock {0}")]
    NotFound(LockId),
    #[error("no session {0}")]
    NoSession(SessionId),
    #[error("{0}")]
    Conflict(String),
    #[error("the lock state could not be read at start ({0}); every admission is refused")]
    Unavailable(String),
    #[error("the state store failed; the lock change was not recorded: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Sessions(#[from] crate::sessions::SessionError),
}

/// How many locks, denied tokens and cut-offs are in force, for `status`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockCounts {
    /// Locks that refuse now.
    pub locks: usize,
    /// Locks past their TTL, still listed until the retention window passes.
    pub expired_locks: usize,
    pub denied_tokens: usize,
    pub cutoffs: usize,
}

/// The index of locks, denials and cut-offs (see the module header).
pub struct Locks {
    index: RwLock<Index>,
    /// Set when the stored records could not be read: fail closed, refuse everyone.
    broken: Option<String>,
}

impl Locks {
    /// An empty index (a new store, or tests).
    pub fn empty() -> Self {
        Self {
            index: RwLock::new(Index::with_capacity()),
            broken: None,
        }
    }

    /// The index as the store holds it. A store whose records cannot be read gives an index
    /// that refuses every admission (`locks_unavailable`) rather than one that forgot a lock;
    /// the agent also stops its start on [`Locks::health`].
    pub fn load(store: &Store) -> Self {
        match store.lock_records() {
            Ok(records) => Self::from_records(records),
            Err(e) => {
                tracing::error!(error = %e, "cannot read the locks from the store: refusing every admission");
                Self {
                    index: RwLock::new(Index::default()),
                    broken: Some(e.to_string()),
                }
            }
        }
    }

    pub fn from_records(records: LockRecords) -> Self {
        let mut index = Index::with_capacity();
        for l in records.locks {
            index.insert_lock(l);
        }
        for d in records.denials {
            index.insert_denial(d);
        }
        for c in records.cutoffs {
            index.insert_cutoff(c);
        }
        Self {
            index: RwLock::new(index),
            broken: None,
        }
    }

    /// Adds records to the index as they are (no session is ended, nothing is written): for
    /// records already durable, such as a bulk restore, and for benches.
    pub fn restore(&self, records: LockRecords) {
        let mut index = self.write();
        for l in records.locks {
            index.insert_lock(l);
        }
        for d in records.denials {
            index.insert_denial(d);
        }
        for c in records.cutoffs {
            index.insert_cutoff(c);
        }
    }

    /// # Errors
    /// [`LocksError::Unavailable`] when the stored locks could not be read.
    pub fn health(&self) -> Result<(), LocksError> {
        match &self.broken {
            Some(e) => Err(LocksError::Unavailable(e.clone())),
            None => Ok(()),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Index> {
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Why `identity` from `source` (reconnecting `session`, if any) may not be admitted now:
    /// a denied token, a cut-off, a lock. `None`: nothing here refuses it.
    pub fn check(
        &self,
        identity: &Identity,
        source: IpAddr,
        session: Option<SessionId>,
    ) -> Option<Refusal> {
        if let Some(e) = &self.broken {
            return Some(Refusal {
                code: "locks_unavailable",
                lock: None,
                detail: format!("the lock state could not be read at start: {e}"),
                client_message: "the agent cannot check its locks; ask an administrator".into(),
            });
        }
        self.read().refusal(
            &Subject {
                identity,
                source,
                session,
            },
            now_ms(),
        )
    }

    /// The lock in force that matches a live session (its identity, source and id).
    pub fn lock_matching_session(&self, s: &Session) -> Option<Lock> {
        self.read()
            .matching_lock(
                &Subject {
                    identity: &s.identity,
                    source: s.source,
                    session: Some(s.id),
                },
                now_ms(),
            )
            .cloned()
    }

    /// The lock in force that refuses `identity` logging in from `source`.
    pub fn lock_matching(&self, identity: &Identity, source: IpAddr) -> Option<Lock> {
        self.read()
            .matching_lock(
                &Subject {
                    identity,
                    source,
                    session: None,
                },
                now_ms(),
            )
            .cloned()
    }

    /// What would refuse a new login of `identity` from `source` (a new token, so a denial of
    /// an old one does not count), in words: for `policy explain`.
    pub fn would_refuse(&self, identity: &Identity, source: IpAddr) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(e) = &self.broken {
            out.push(format!("the lock state could not be read at start: {e}"));
        }
        if let Some(l) = self.lock_matching(identity, source) {
            out.push(format!(
                "locked by {} ({}){}: refused `locked`",
                l.id,
                l.target,
                l.reason.map(|r| format!(", {r}")).unwrap_or_default()
            ));
        }
        if let Some(c) = self.cutoff(&identity.issuer, &identity.subject) {
            out.push(format!(
                "cut-off at {} (set by {}: {}): tokens issued at or before it, or without iat,                  are refused `issued_before_cutoff`",
                c.cutoff_secs, c.by, c.reason
            ));
        }
        out
    }

    /// Every lock, oldest first, the expired ones included.
    pub fn list(&self) -> Vec<Lock> {
        let mut all: Vec<Lock> = self.read().locks.values().cloned().collect();
        all.sort_by_key(|l| (l.created_at_ms, l.id));
        all
    }

    pub fn get(&self, id: LockId) -> Option<Lock> {
        self.read().locks.get(&id).cloned()
    }

    /// The cut-off of `iss`+`sub`, if one is in force.
    pub fn cutoff(&self, iss: &str, sub: &str) -> Option<Cutoff> {
        self.read().cutoff(iss, sub).cloned()
    }

    /// Whether the token with this denial key is denied now.
    pub fn is_denied(&self, denial_key: &str) -> bool {
        self.read()
            .denials
            .get(denial_key)
            .is_some_and(|d| now_ms() < d.until_ms)
    }

    pub fn counts(&self) -> LockCounts {
        let now = now_ms();
        let index = self.read();
        let active = index.locks.values().filter(|l| l.holds(now)).count();
        LockCounts {
            locks: active,
            expired_locks: index.locks.len() - active,
            denied_tokens: index.denials.len(),
            cutoffs: index.cutoff_count(),
        }
    }
}

/// The `[locks]` section of the agent's config: how long records that can no longer refuse
/// anything are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LocksConfig {
    /// The longest lifetime (`exp` − `iat`) of a token any configured issuer mints: a cut-off
    /// is kept this long, past which every token it refused has expired anyway.
    pub max_token_lifetime_secs: u64,
    /// How long an expired lock stays listed (as expired) before it is pruned.
    pub expired_retention_secs: u64,
}

impl Default for LocksConfig {
    fn default() -> Self {
        Self {
            max_token_lifetime_secs: 7 * 24 * 3600,
            expired_retention_secs: 30 * 24 * 3600,
        }
    }
}
