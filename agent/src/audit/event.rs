//! Audit events: every decision the agent makes, with a monotonic sequence number assigned
//! by the store. Never carries a bearer token.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::sessions::model::{SessionId, SessionState};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AuditKind {
    AgentStarted,
    AgentStopped,
    SessionAdmitted,
    /// `reason`: the specific rejection (expired, wrong_audience, bad_signature, …).
    AdmissionRejected {
        reason: String,
    },
    /// Policy allowed nothing, or the identity's device does not meet requirements.
    AdmissionDenied {
        reason: String,
    },
    SessionReconnected,
    ReconnectRejected {
        reason: String,
    },
    StateChanged {
        from: SessionState,
        to: SessionState,
    },
    SessionTerminated {
        by: String,
        reason: String,
    },
    SessionExpired {
        reason: String,
    },
    /// A grant the session no longer has (policy change); its flows were severed.
    GrantRemoved {
        reason: String,
    },
    FlowOpened,
    FlowDenied {
        reason: String,
    },
    FlowIdle,
    FirstDropAfterTermination,
    PolicyReloaded {
        files: usize,
        resources: usize,
        rules: usize,
    },
    PolicyRejected {
        error: String,
    },
    DatapathModeChanged {
        mode: String,
    },
    /// A signed fleet command applied (`command`: its id; `key`: the admin key that signed it;
    /// `method`: the control method or `fleet.policy`; `outcome`: what it did).
    FleetCommandApplied {
        command: String,
        key: String,
        method: String,
        outcome: String,
    },
    /// A message on the fleet's control stream refused: unsigned, forged, replayed, … .
    FleetCommandRefused {
        command: String,
        reason: String,
    },
    /// An administrator added a lock (`crate::locks`); `target` as `lock show` prints it.
    LockAdded {
        lock: String,
        target: String,
    },
    LockRemoved {
        lock: String,
    },
    /// A lock's TTL ran out: it no longer refuses anything, and stays listed as expired.
    LockExpired {
        lock: String,
    },
    /// A Shared Signals SET was accepted (acted on, or acknowledged and ignored).
    SignalReceived {
        jti: String,
        iss: String,
        event: String,
        subject: String,
        outcome: String,
    },
    /// A SET was refused with an RFC 8935 error; nothing was changed.
    SignalRefused {
        err: String,
    },
    /// The web console refused a change: `by` who was signed in, `action` what they tried.
    ConsoleRefused {
        by: String,
        action: String,
        reason: String,
    },
}

impl AuditKind {
    /// The `kind` tag as it appears in JSON, for filters.
    pub fn name(&self) -> &'static str {
        match self {
            Self::AgentStarted => "agent_started",
            Self::AgentStopped => "agent_stopped",
            Self::SessionAdmitted => "session_admitted",
            Self::AdmissionRejected { .. } => "admission_rejected",
            Self::AdmissionDenied { .. } => "admission_denied",
            Self::SessionReconnected => "session_reconnected",
            Self::ReconnectRejected { .. } => "reconnect_rejected",
            Self::StateChanged { .. } => "state_changed",
            Self::SessionTerminated { .. } => "session_terminated",
            Self::SessionExpired { .. } => "session_expired",
            Self::GrantRemoved { .. } => "grant_removed",
            Self::FlowOpened => "flow_opened",
            Self::FlowDenied { .. } => "flow_denied",
            Self::FlowIdle => "flow_idle",
            Self::FirstDropAfterTermination => "first_drop_after_termination",
            Self::PolicyReloaded { .. } => "policy_reloaded",
            Self::PolicyRejected { .. } => "policy_rejected",
            Self::DatapathModeChanged { .. } => "datapath_mode_changed",
            Self::FleetCommandApplied { .. } => "fleet_command_applied",
            Self::FleetCommandRefused { .. } => "fleet_command_refused",
            Self::LockAdded { .. } => "lock_added",
            Self::LockRemoved { .. } => "lock_removed",
            Self::LockExpired { .. } => "lock_expired",
            Self::SignalReceived { .. } => "signal_received",
            Self::SignalRefused { .. } => "signal_refused",
            Self::ConsoleRefused { .. } => "console_refused",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Assigned by the store when the event is committed; 0 before.
    pub seq: u64,
    /// Unix milliseconds.
    pub at_ms: u64,
    #[serde(flatten)]
    pub kind: AuditKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// Free text for people: what happened, in a sentence.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
}

impl AuditEvent {
    /// An event of `kind` now, with nothing else filled in.
    pub fn new(kind: AuditKind) -> Self {
        Self {
            seq: 0,
            at_ms: crate::sessions::model::now_ms(),
            kind,
            session: None,
            user: None,
            source: None,
            resource: None,
            detail: String::new(),
        }
    }
}
