//! The one list of status-socket methods: each with its typed parameters, its typed answer
//! and the access it needs. The server parses and authorises with it, the client calls with
//! it, and a test holds `docs/status-socket.md` to it.

use serde::{Deserialize as _, Serialize, de::DeserializeOwned};

use super::{
    answers::{
        CheckView, ExplainView, ModeView, Recorded, ReloadView, Subscribed, TerminateView,
        WhoisView,
    },
    jsonrpc::{Call, INVALID_PARAMS, METHOD_NOT_FOUND, RpcError},
    peer::Access,
    request as p,
    views::{FlowView, SessionView, StatusView},
};
use crate::audit::event::AuditEvent;
use crate::locks::wire as lk;

/// Who may call a method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessRule {
    /// Readers and administrators.
    Read,
    /// Administrators only: the method changes the agent's state.
    Admin,
    /// A read, unless the call sets something (the named parameter): then admin.
    ReadAdminToChange,
}

impl AccessRule {
    /// How `docs/status-socket.md` names the rule in a method's heading.
    pub fn doc_label(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Admin => "admin",
            Self::ReadAdminToChange => "read; admin to change",
        }
    }
}

/// One method of the status socket.
pub trait Method {
    /// The method name on the wire.
    const NAME: &'static str;
    const ACCESS: AccessRule;
    /// Whether the answer is followed by a stream of notifications on the same connection.
    const STREAMS: bool = false;
    type Params: Serialize + DeserializeOwned;
    type Result: Serialize + DeserializeOwned;

    /// The access this very call needs. Only [`AccessRule::ReadAdminToChange`] methods look
    /// at their parameters, through [`Self::changes`].
    fn access(params: &Self::Params) -> Access {
        match Self::ACCESS {
            AccessRule::Read => Access::Read,
            AccessRule::Admin => Access::Admin,
            AccessRule::ReadAdminToChange if Self::changes(params) => Access::Admin,
            AccessRule::ReadAdminToChange => Access::Read,
        }
    }

    /// Whether these parameters ask for a change.
    fn changes(_params: &Self::Params) -> bool {
        false
    }
}

/// A method as the list holds it, without its types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MethodInfo {
    pub name: &'static str,
    pub access: AccessRule,
    pub streams: bool,
}

const fn info<M: Method>() -> MethodInfo {
    MethodInfo {
        name: M::NAME,
        access: M::ACCESS,
        streams: M::STREAMS,
    }
}

macro_rules! method {
    ($(#[$doc:meta])* $ty:ident, $name:literal, $access:ident, $params:ty => $result:ty $(, streams = $s:literal)?) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub struct $ty;
        impl Method for $ty {
            const NAME: &'static str = $name;
            const ACCESS: AccessRule = AccessRule::$access;
            $(const STREAMS: bool = $s;)?
            type Params = $params;
            type Result = $result;
        }
    };
}

method!(
    /// The agent's mode, sessions by state, flow table fill, policy and drop counters.
    Status, "status", Read, p::Empty => StatusView);
method!(
    /// Sessions, newest first, filtered.
    SessionsList, "sessions.list", Read, p::SessionFilter => Vec<SessionView>);
method!(
    /// One session in full: claims, token fingerprint, flows.
    SessionsGet, "sessions.get", Read, p::SessionRef => SessionView);
method!(
    /// Sever sessions now.
    SessionsTerminate, "sessions.terminate", Admin, p::Terminate => TerminateView);
method!(
    /// The flows the kernel holds.
    FlowsList, "flows.list", Read, p::FlowFilter => Vec<FlowView>);
method!(
    /// Which session owns a flow.
    Whois, "whois", Read, p::Whois => WhoisView);
method!(
    /// Audit events, in ascending sequence order.
    AuditQuery, "audit.query", Read, crate::audit::AuditQuery => Vec<AuditEvent>);
method!(
    /// Every new audit event, as `audit.event` notifications.
    AuditSubscribe, "audit.subscribe", Read, p::AuditFilter => Subscribed, streams = true);
method!(
    /// Re-read the policy directory and re-evaluate every live session.
    PolicyReload, "policy.reload", Admin, p::Empty => ReloadView);
method!(
    /// Validate a policy directory without applying it.
    PolicyCheck, "policy.check", Read, p::PolicyCheck => CheckView);
method!(
    /// Why an identity reaches a resource or not; what a candidate policy would cut.
    PolicyExplain, "policy.explain", Read, p::Explain => ExplainView);
method!(
    /// Record a change the web console refused (an audit event, `console_refused`).
    ConsoleRefused, "console.refused", Admin, p::ConsoleRefusal => Recorded);

method!(
    /// Add a lock: refuse what it matches from now on, and end every live session it matches.
    LockAdd, "lock.add", Admin, crate::locks::NewLock => lk::LockAddedView);
method!(
    /// Every lock, the expired ones included (listed as expired).
    LockList, "lock.list", Read, lk::LockFilter => Vec<lk::LockView>);
method!(
    /// One lock.
    LockShow, "lock.show", Read, lk::LockRef => lk::LockView);
method!(
    /// Remove a lock: what it refused is admitted again.
    LockRemove, "lock.remove", Admin, lk::LockRef => lk::LockRemovedView);
method!(
    /// Each Shared Signals stream: transmitter, delivery, last event, counts, errors.
    SignalsStatus, "signals.status", Read, p::Empty => crate::signals::SignalsStatus);

/// Report the datapath mode, or switch it (which needs admin).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatapathMode;

impl Method for DatapathMode {
    const NAME: &'static str = "datapath.mode";
    const ACCESS: AccessRule = AccessRule::ReadAdminToChange;
    type Params = p::DatapathMode;
    type Result = ModeView;

    fn changes(params: &p::DatapathMode) -> bool {
        params.mode.is_some()
    }
}

/// Generates, from one list, the typed request enum, the method table and the parser, so
/// that the three cannot drift apart.
macro_rules! requests {
    ($($ty:ident),* $(,)?) => {
        /// A parsed call: the method and its typed parameters.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Request {
            $($ty(<$ty as Method>::Params),)*
        }

        /// Every method, in the order the docs and error messages list them.
        pub const METHODS: &[MethodInfo] = &[$(info::<$ty>(),)*];

        impl Request {
            /// Parses a call into a request: an unknown method and bad parameters get the
            /// JSON-RPC errors that say which.
            ///
            /// # Errors
            /// `METHOD_NOT_FOUND` (listing the methods) or `INVALID_PARAMS` (with serde's
            /// message).
            pub fn parse(call: &Call) -> Result<Self, RpcError> {
                $(if call.method == $ty::NAME {
                    return params::<$ty>(call).map(Self::$ty);
                })*
                Err(unknown_method(&call.method))
            }

            /// The method's name on the wire.
            pub fn method(&self) -> &'static str {
                match self {
                    $(Self::$ty(_) => $ty::NAME,)*
                }
            }

            /// The access this call needs.
            pub fn access(&self) -> Access {
                match self {
                    $(Self::$ty(p) => $ty::access(p),)*
                }
            }
        }
    };
}

requests!(
    Status,
    SessionsList,
    SessionsGet,
    SessionsTerminate,
    FlowsList,
    Whois,
    AuditQuery,
    AuditSubscribe,
    PolicyReload,
    PolicyCheck,
    PolicyExplain,
    DatapathMode,
    LockAdd,
    LockList,
    LockShow,
    LockRemove,
    SignalsStatus,
    ConsoleRefused,
);

/// The method named so, if there is one.
pub fn find(name: &str) -> Option<&'static MethodInfo> {
    METHODS.iter().find(|m| m.name == name)
}

/// Whether `name` streams; unknown methods do not.
pub fn streams(name: &str) -> bool {
    find(name).is_some_and(|m| m.streams)
}

fn params<M: Method>(call: &Call) -> Result<M::Params, RpcError> {
    let parsed = match &call.params {
        serde_json::Value::Null => serde_json::from_value(serde_json::json!({})),
        p => M::Params::deserialize(p),
    };
    parsed.map_err(|e| {
        RpcError::new(
            INVALID_PARAMS,
            format!("invalid params for {}: {e}", M::NAME),
        )
    })
}

fn unknown_method(method: &str) -> RpcError {
    let known: Vec<&str> = METHODS.iter().map(|m| m.name).collect();
    RpcError::new(
        METHOD_NOT_FOUND,
        format!(
            "unknown method {method:?}: the methods are {}",
            known.join(", ")
        ),
    )
}

#[cfg(test)]
mod tests;
