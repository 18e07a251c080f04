//! Which audit events a reader wants: the filters of `flowwarden audit` and of the status
//! socket's audit query, parsed strictly at the boundary.

use serde::{Deserialize, Serialize};

use super::event::AuditEvent;
use crate::sessions::model::SessionId;

/// Events a query returns when it names no limit.
pub const DEFAULT_QUERY_LIMIT: usize = 1000;
/// The most events one query returns, whatever it asks: bounds the memory and time one request
/// may take. A larger `limit` is lowered to this; page with `after_seq` for more.
pub const MAX_QUERY_LIMIT: usize = 10_000;

/// Every filter is optional and they all must match.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    /// Only events with a larger seq; also switches to oldest-first (see [`super::Audit::query`]).
    pub after_seq: Option<u64>,
    /// Only events at or after this time, Unix milliseconds.
    pub since_ms: Option<u64>,
    pub session: Option<SessionId>,
    /// The user as the event names it (`Identity::user`: the email, else the subject), compared
    /// case-insensitively as emails are.
    pub user: Option<String>,
    /// An `AuditKind` name, as in the event's JSON `kind` (`session_terminated`, …).
    pub kind: Option<String>,
    /// At most this many events: [`DEFAULT_QUERY_LIMIT`] when absent, never more than
    /// [`MAX_QUERY_LIMIT`].
    pub limit: Option<usize>,
}

impl AuditQuery {
    pub fn effective_limit(&self) -> usize {
        self.limit
            .unwrap_or(DEFAULT_QUERY_LIMIT)
            .min(MAX_QUERY_LIMIT)
    }

    /// Whether `event` passes every filter except `after_seq` and `limit`, which shape the scan.
    pub fn matches(&self, event: &AuditEvent) -> bool {
        self.since_ms.is_none_or(|since| event.at_ms >= since)
            && self.session.is_none_or(|id| event.session == Some(id))
            && self.user.as_deref().is_none_or(|user| {
                event
                    .user
                    .as_deref()
                    .is_some_and(|u| u.eq_ignore_ascii_case(user))
            })
            && self
                .kind
                .as_deref()
                .is_none_or(|kind| event.kind.name() == kind)
    }
}
