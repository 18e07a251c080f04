//! The control API as one typed request enum: every method of the status socket and its
//! parameters, parsed at the boundary with unknown fields refused.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::Deserialize;

use super::jsonrpc::{Call, INVALID_PARAMS, METHOD_NOT_FOUND, RpcError};
use crate::{
    audit::AuditQuery,
    config::Mode,
    sessions::model::{SessionId, SessionState},
};

/// Every method, with whether it changes anything (admin) or only reads.
pub const METHODS: &[(&str, bool)] = &[
    ("status", false),
    ("sessions.list", false),
    ("sessions.get", false),
    ("sessions.terminate", true),
    ("flows.list", false),
    ("whois", false),
    ("audit.query", false),
    ("audit.subscribe", false),
    ("policy.reload", true),
    ("policy.check", false),
    ("policy.explain", false),
    ("datapath.mode", false),
];

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "method", content = "params", deny_unknown_fields)]
pub enum Request {
    #[serde(rename = "status")]
    Status(Empty),
    #[serde(rename = "sessions.list")]
    SessionsList(SessionFilter),
    #[serde(rename = "sessions.get")]
    SessionsGet(SessionRef),
    #[serde(rename = "sessions.terminate")]
    SessionsTerminate(Terminate),
    #[serde(rename = "flows.list")]
    FlowsList(FlowFilter),
    #[serde(rename = "whois")]
    Whois(Whois),
    #[serde(rename = "audit.query")]
    AuditQuery(AuditQuery),
    #[serde(rename = "audit.subscribe")]
    AuditSubscribe(AuditFilter),
    #[serde(rename = "policy.reload")]
    PolicyReload(Empty),
    #[serde(rename = "policy.check")]
    PolicyCheck(PolicyCheck),
    #[serde(rename = "policy.explain")]
    PolicyExplain(Explain),
    #[serde(rename = "datapath.mode")]
    DatapathMode(DatapathMode),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFilter {
    pub state: Option<SessionState>,
    /// Email (case-insensitive) or subject.
    pub user: Option<String>,
    pub resource: Option<String>,
    pub source: Option<IpAddr>,
    /// Only active and dormant sessions.
    #[serde(default)]
    pub live: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRef {
    pub id: SessionId,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminate {
    /// These sessions…
    #[serde(default)]
    pub ids: Vec<SessionId>,
    /// …or every live session of this user.
    pub user: Option<String>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowFilter {
    pub session: Option<SessionId>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whois {
    /// Either end of the flow may be given first.
    pub a: SocketAddr,
    pub b: SocketAddr,
    #[serde(default)]
    pub protocol: Proto,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    pub session: Option<SessionId>,
    pub user: Option<String>,
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheck {
    /// A candidate policy directory; the agent's own when absent.
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Explain {
    /// Whose identity: a live session's user (email or subject)…
    pub user: Option<String>,
    /// …or a session.
    pub session: Option<SessionId>,
    /// The resource to explain; all of them when absent.
    pub resource: Option<String>,
    /// A candidate policy directory: say which live sessions it would sever.
    pub candidate: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathMode {
    /// Set this mode (admin); absent: only report the current one.
    pub mode: Option<Mode>,
}

impl Request {
    /// Parses a call into a request: an unknown method and bad parameters get the JSON-RPC
    /// errors that say which.
    ///
    /// # Errors
    /// `METHOD_NOT_FOUND` (listing the methods) or `INVALID_PARAMS` (with serde's message).
    pub fn parse(call: &Call) -> Result<Self, RpcError> {
        if !METHODS.iter().any(|(m, _)| *m == call.method) {
            let known: Vec<&str> = METHODS.iter().map(|(m, _)| *m).collect();
            return Err(RpcError {
                code: METHOD_NOT_FOUND,
                message: format!(
                    "unknown method {:?}: the methods are {}",
                    call.method,
                    known.join(", ")
                ),
                data: None,
            });
        }
        let params = match &call.params {
            serde_json::Value::Null => serde_json::json!({}),
            p => p.clone(),
        };
        let envelope = serde_json::json!({ "method": call.method, "params": params });
        serde_json::from_value(envelope).map_err(|e| RpcError {
            code: INVALID_PARAMS,
            message: format!("invalid params for {}: {e}", call.method),
            data: None,
        })
    }

    /// Whether the method changes the agent's state (needs admin access).
    pub fn mutates(&self) -> bool {
        match self {
            Self::SessionsTerminate(_) | Self::PolicyReload(_) => true,
            Self::DatapathMode(m) => m.mode.is_some(),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn call(method: &str, params: serde_json::Value) -> Call {
        Call {
            id: json!(1),
            method: method.into(),
            params,
        }
    }

    #[test]
    fn methods_parse_into_typed_requests() {
        assert_eq!(
            Request::parse(&call("status", serde_json::Value::Null)).unwrap(),
            Request::Status(Empty {})
        );
        let r = Request::parse(&call(
            "sessions.terminate",
            json!({"ids": ["00000000000000ff"], "reason": "left the company"}),
        ))
        .unwrap();
        assert_eq!(
            r,
            Request::SessionsTerminate(Terminate {
                ids: vec![SessionId(0xff)],
                user: None,
                reason: Some("left the company".into()),
            })
        );
        assert!(r.mutates());
        let r = Request::parse(&call("datapath.mode", json!({}))).unwrap();
        assert!(!r.mutates());
        let r = Request::parse(&call("datapath.mode", json!({"mode": "monitor"}))).unwrap();
        assert!(r.mutates());
        let r = Request::parse(&call(
            "whois",
            json!({"a": "10.0.0.7:51514", "b": "10.0.0.2:22"}),
        ))
        .unwrap();
        assert!(matches!(
            r,
            Request::Whois(Whois {
                protocol: Proto::Tcp,
                ..
            })
        ));
    }

    #[test]
    fn unknown_methods_and_bad_params_say_what_is_wrong() {
        let e = Request::parse(&call("sessions.nuke", json!({}))).unwrap_err();
        assert_eq!(e.code, METHOD_NOT_FOUND);
        assert!(e.message.contains("sessions.terminate"), "{}", e.message);
        let e = Request::parse(&call("sessions.get", json!({"id": "zz"}))).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert!(e.message.contains("not a session id"), "{}", e.message);
        let e = Request::parse(&call("sessions.list", json!({"colour": "red"}))).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
        assert!(e.message.contains("colour"), "{}", e.message);
        let e = Request::parse(&call("sessions.get", json!([1, 2]))).unwrap_err();
        assert_eq!(e.code, INVALID_PARAMS);
    }
}
