//! What callers send: the parameters of every status-socket method, parsed at the boundary
//! with unknown fields refused, and written by the client the same way (absent stays absent).

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{Deserialize, Serialize};

use super::answers::ModeName;
use crate::sessions::model::{SessionId, SessionState};

/// Parameters of the methods that take none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Empty {}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<SessionState>,
    /// Email (case-insensitive) or subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<IpAddr>,
    /// Only active and dormant sessions.
    #[serde(default)]
    pub live: bool,
    /// A window of the sorted list (newest first): skip this many sessions…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<usize>,
    /// …and return at most this many (the console's pages; absent: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRef {
    pub id: SessionId,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terminate {
    /// These sessions…
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ids: Vec<SessionId>,
    /// …or every live session of this user.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Leave the sessions' tokens usable (by default a terminated session's token is denied
    /// until it expires, and `user` also sets a cut-off).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_relogin: bool,
    /// Also refuse every older token of the sessions' subjects (`user` always does).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cutoff: bool,
    /// The person a relaying client (the console) acts for, recorded beside the caller's uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

/// `console.refused`: a change the console refused, for the agent's audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleRefusal {
    /// Who was signed in to the console (their email or subject), or `anonymous`.
    pub by: String,
    /// What they tried: `POST /sessions/…/terminate`.
    pub action: String,
    /// Why it was refused: `read-only administrator`, `missing CSRF token`, …
    pub reason: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    #[default]
    Tcp,
    Udp,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Whois {
    /// Either end of the flow may be given first.
    pub a: SocketAddr,
    pub b: SocketAddr,
    #[serde(default)]
    pub protocol: Proto,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditFilter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCheck {
    /// A candidate policy directory; the agent's own when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Explain {
    /// Whose identity: a live session's user (email or subject)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// …or a session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    /// The resource to explain; all of them when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    /// A candidate policy directory: say which live sessions it would sever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate: Option<PathBuf>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathMode {
    /// Set this mode (admin); absent: only report the current one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<ModeName>,
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn absent_parameters_stay_absent_on_the_wire() {
        assert_eq!(
            serde_json::to_value(SessionFilter::default()).unwrap(),
            json!({"live": false})
        );
        assert_eq!(
            serde_json::to_value(DatapathMode::default()).unwrap(),
            json!({})
        );
        let t = Terminate {
            ids: vec![SessionId(0xff)],
            ..Terminate::default()
        };
        assert_eq!(
            serde_json::to_value(&t).unwrap(),
            json!({"ids": ["00000000000000ff"]})
        );
        let back: Terminate = serde_json::from_value(serde_json::to_value(&t).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e =
            serde_json::from_value::<Whois>(json!({"a": "10.0.0.7:1", "b": "10.0.0.2:22", "c": 1}))
                .unwrap_err();
        assert!(e.to_string().contains("unknown field `c`"), "{e}");
    }
}
