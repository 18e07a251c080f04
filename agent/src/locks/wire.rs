//! The status-socket shapes of the lock methods: parameters (unknown fields refused) and
//! answers, as `docs/status-socket.md` documents them.

use serde::{Deserialize, Serialize};

use super::{
    LockAdded,
    model::{Lock, LockId, LockState, LockTarget},
};
use crate::{api::answers::TerminatedView, sessions::model::now_ms};

/// `lock.list` parameters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockFilter {
    /// Only the locks that refuse now (expired ones are listed otherwise).
    #[serde(default)]
    pub active: bool,
}

/// `lock.show` and `lock.remove` parameters.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockRef {
    pub id: LockId,
    /// `lock.remove` from a relaying client (the web console): the person it acts for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

/// One lock as listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockView {
    pub id: LockId,
    pub target: LockTarget,
    /// `active` or `expired`.
    pub state: LockState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub show_reason: bool,
    pub by: String,
    pub created_at_ms: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// When the sweep recorded (and audited) the expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at_ms: Option<u64>,
}

impl From<&Lock> for LockView {
    fn from(l: &Lock) -> Self {
        Self {
            id: l.id,
            target: l.target.clone(),
            state: l.state(now_ms()),
            reason: l.reason.clone(),
            show_reason: l.show_reason,
            by: l.by.clone(),
            created_at_ms: l.created_at_ms,
            expires_at_ms: l.expires_at_ms,
            expired_at_ms: l.expired_at_ms,
        }
    }
}

/// `lock.add`: the lock, and what it cut at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockAddedView {
    pub lock: LockView,
    /// The live sessions it ended.
    pub terminated: Vec<TerminatedView>,
    pub sessions_cut: usize,
    pub flows_cut: usize,
}

impl From<&LockAdded> for LockAddedView {
    fn from(a: &LockAdded) -> Self {
        Self {
            lock: LockView::from(&a.lock),
            terminated: a.ended.iter().map(TerminatedView::from).collect(),
            sessions_cut: a.ended.len(),
            flows_cut: a.flows,
        }
    }
}

/// `lock.remove`: the lock that was removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRemovedView {
    pub removed: LockView,
}

impl From<super::LocksError> for crate::api::jsonrpc::RpcError {
    fn from(e: super::LocksError) -> Self {
        use super::LocksError as E;
        use crate::api::jsonrpc::{APP_ERROR, INVALID_PARAMS, NOT_FOUND};
        let code = match &e {
            E::BadTarget(_) | E::BadLockId(_) | E::BadTtl(_) | E::BadReason(_) | E::Conflict(_) => {
                INVALID_PARAMS
            }
            E::NotFound(_) | E::NoSession(_) => NOT_FOUND,
            E::Sessions(crate::sessions::SessionError::NotFound(_)) => NOT_FOUND,
            E::Unavailable(_) | E::Store(_) | E::Sessions(_) => APP_ERROR,
        };
        Self::new(code, e.to_string())
    }
}
