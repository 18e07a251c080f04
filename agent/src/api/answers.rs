//! What the smaller methods answer (terminate, whois, policy, datapath mode, audit stream):
//! plain data the core fills and the client reads back, each field as documented in
//! `docs/status-socket.md`. Sessions, flows and status live in [`super::views`].

use std::{net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize};

use super::views::{FlowView, SessionView};
use crate::{
    config::Mode,
    policy::Explanation,
    sessions::{Ended, PolicyOutcome, model::SessionId},
};

/// The datapath's mode as the socket spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeName {
    /// Drop what has no grant.
    Enforce,
    /// Count what would be dropped, drop nothing.
    Monitor,
}

impl From<Mode> for ModeName {
    fn from(m: Mode) -> Self {
        match m {
            Mode::Enforce => Self::Enforce,
            Mode::Monitor => Self::Monitor,
        }
    }
}

impl From<ModeName> for Mode {
    fn from(m: ModeName) -> Self {
        match m {
            ModeName::Enforce => Self::Enforce,
            ModeName::Monitor => Self::Monitor,
        }
    }
}

impl ModeName {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Enforce => "enforce",
            Self::Monitor => "monitor",
        }
    }
}

impl std::fmt::Display for ModeName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `datapath.mode`: the mode in force after the call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModeView {
    pub mode: ModeName,
}

/// One session a `sessions.terminate` ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminatedView {
    pub id: SessionId,
    pub user: String,
    pub source: IpAddr,
}

impl From<&Ended> for TerminatedView {
    fn from(e: &Ended) -> Self {
        Self {
            id: e.id,
            user: e.user.clone(),
            source: e.source,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminateView {
    pub terminated: Vec<TerminatedView>,
    pub count: usize,
    /// Flows of the ended sessions the revocation cut.
    #[serde(default)]
    pub flows_cut: usize,
    /// Tokens now refused with `token_revoked`.
    #[serde(default)]
    pub denied_tokens: usize,
    /// Subjects now under a cut-off (`issued_before_cutoff`).
    #[serde(default)]
    pub cutoffs: usize,
}

impl TerminateView {
    pub fn of(ended: &[Ended]) -> Self {
        Self {
            terminated: ended.iter().map(TerminatedView::from).collect(),
            count: ended.len(),
            flows_cut: 0,
            denied_tokens: 0,
            cutoffs: 0,
        }
    }

    /// What a termination with token denial or cut-off did.
    pub fn of_terminated(t: &crate::locks::Terminated) -> Self {
        Self {
            flows_cut: t.flows,
            denied_tokens: t.denied,
            cutoffs: t.cutoffs.len(),
            ..Self::of(&t.ended)
        }
    }
}

/// `whois`: the flow and, while the agent still knows it, the session that owns it (`null`
/// otherwise).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WhoisView {
    pub flow: FlowView,
    pub session: Option<SessionView>,
}

/// What a policy change did to the live sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeView {
    pub evaluated: usize,
    pub grants_removed: usize,
    pub flows_severed: usize,
    pub sessions_terminated: usize,
}

impl From<PolicyOutcome> for OutcomeView {
    fn from(o: PolicyOutcome) -> Self {
        Self {
            evaluated: o.evaluated,
            grants_removed: o.grants_removed,
            flows_severed: o.flows_severed,
            sessions_terminated: o.sessions_terminated,
        }
    }
}

/// `policy.reload`: whether the files changed, and if so what re-evaluation did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadView {
    pub changed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<OutcomeView>,
}

/// `policy.check`: a directory that loaded, and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckView {
    pub ok: bool,
    pub dir: PathBuf,
    pub files: usize,
    pub resources: usize,
    pub rules: usize,
}

/// Why policy allows an identity a resource, or why not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplanationView {
    pub resource: String,
    pub allowed: bool,
    pub rule: Option<String>,
    pub reasons: Vec<String>,
}

impl From<Explanation> for ExplanationView {
    fn from(e: Explanation) -> Self {
        Self {
            resource: e.resource,
            allowed: e.allowed,
            rule: e.rule,
            reasons: e.reasons,
        }
    }
}

/// A live session a candidate policy would cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffectedView {
    pub session: SessionId,
    pub user: String,
    pub source: IpAddr,
    /// The resources it would lose.
    pub removed: Vec<String>,
    /// It would lose them all, and be terminated.
    pub terminated: bool,
}

/// `policy.explain` answers in one of two shapes, told apart by their keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ExplainView {
    /// For an identity (`user` or `session`).
    Identity {
        user: String,
        /// The session whose identity is explained; absent when the identity is that of the
        /// user's last admission the policy denied (`refused_at_ms`).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        session: Option<SessionId>,
        /// When the refused admission whose identity is explained happened (no session).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused_at_ms: Option<u64>,
        source: IpAddr,
        explanations: Vec<ExplanationView>,
        /// Locks and cut-offs that would refuse this identity's next login (see
        /// `docs/locks.md`), whatever the policy allows.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        refused_by: Vec<String>,
    },
    /// For a candidate policy directory.
    Candidate {
        candidate: PathBuf,
        affected: Vec<AffectedView>,
    },
}

/// The first answer of `audit.subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscribed {
    pub subscribed: bool,
}

/// `console.refused`: the refusal is in the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub recorded: bool,
}

/// The notification methods of the audit stream.
pub const AUDIT_EVENT: &str = "audit.event";
pub const AUDIT_LAGGED: &str = "audit.lagged";

/// `audit.lagged`: the subscriber fell this many events behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lagged {
    pub lagged: u64,
    pub hint: String,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn explain_answers_are_told_apart_by_their_keys() {
        let v = json!({"candidate": "/var/tmp/c", "affected": [{"session": "00000000000000ab",
            "user": "alice", "source": "10.0.0.7", "removed": ["ssh"], "terminated": true}]});
        let e: ExplainView = serde_json::from_value(v.clone()).unwrap();
        assert!(matches!(&e, ExplainView::Candidate { affected, .. } if affected.len() == 1));
        assert_eq!(serde_json::to_value(&e).unwrap(), v);
        let v = json!({"user": "alice", "session": "00000000000000ab", "source": "10.0.0.7",
            "explanations": [{"resource": "ssh", "allowed": false, "rule": null, "reasons": []}]});
        let e: ExplainView = serde_json::from_value(v.clone()).unwrap();
        assert!(matches!(e, ExplainView::Identity { .. }));
        assert_eq!(serde_json::to_value(&e).unwrap(), v);
    }

    #[test]
    fn an_unchanged_reload_has_no_outcome_and_modes_are_lowercase() {
        let v = ReloadView {
            changed: false,
            outcome: None,
        };
        assert_eq!(serde_json::to_value(&v).unwrap(), json!({"changed": false}));
        let m = ModeView {
            mode: ModeName::Monitor,
        };
        assert_eq!(
            serde_json::to_value(&m).unwrap(),
            json!({"mode": "monitor"})
        );
        assert_eq!(Mode::from(ModeName::from(Mode::Monitor)), Mode::Monitor);
    }
}
