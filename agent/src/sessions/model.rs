//! The session record: one successful authentication of an identity from a source address,
//! with its state, expiry, grants and how it ended. Stored as is; shown to operators as is.

use std::{fmt, net::IpAddr, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::identity::Identity;

/// A random 64-bit session id, shown and exchanged as 16 lowercase hex digits (JSON numbers
/// lose precision past 2^53).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

impl SessionId {
    /// A fresh id from the OS's CSPRNG; never zero.
    pub fn random() -> Self {
        loop {
            let mut b = [0u8; 8];
            getrandom::fill(&mut b).expect("the OS random source works");
            let id = u64::from_le_bytes(b);
            if id != 0 {
                return Self(id);
            }
        }
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a session id: expected 1 to 16 hex digits")]
pub struct BadSessionId(pub String);

impl FromStr for SessionId {
    type Err = BadSessionId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let t = t.strip_prefix("0x").unwrap_or(t);
        if t.is_empty() || t.len() > 16 {
            return Err(BadSessionId(s.to_owned()));
        }
        u64::from_str_radix(t, 16)
            .map(Self)
            .map_err(|_| BadSessionId(s.to_owned()))
    }
}

impl Serialize for SessionId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SessionId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The states of DESIGN.md. `authenticating` is transient (inside one admission) and never
/// stored; a rejected admission is an audit event, not a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionState {
    Authenticating,
    /// Admitted, with at least one live flow or recently used.
    Active,
    /// Admitted, no live flow.
    Dormant,
    /// Reached its absolute expiry or its dormant timeout. Final.
    Expired,
    /// Ended by an administrator, an identity event or a policy change. Final.
    Terminated,
}

impl SessionState {
    /// Whether the session still admits traffic (and may reconnect).
    pub fn is_live(self) -> bool {
        matches!(self, Self::Active | Self::Dormant)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Authenticating => "authenticating",
            Self::Active => "active",
            Self::Dormant => "dormant",
            Self::Expired => "expired",
            Self::Terminated => "terminated",
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One resource a session may reach, and the policy rule that allowed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionGrant {
    pub resource: String,
    /// The kernel's id of the resource (stable: derived from the name).
    pub resource_id: u32,
    pub rule: String,
}

/// Timeouts and options the policy gave the session at admission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSettings {
    /// Longest the session may live; its expiry is also never past the token's `exp`.
    pub max_duration_secs: u64,
    /// A flow unused this long is removed (dead-peer detection).
    pub idle_timeout_secs: u64,
    /// A session without flows this long expires.
    pub dormant_timeout_secs: u64,
    /// Whether the session gets a reconnect seed.
    pub reconnect: bool,
}

/// Why a session ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cause", rename_all = "snake_case")]
pub enum EndCause {
    /// Reached its absolute expiry (token `exp` or `max_duration`).
    Expired,
    /// No flow for `dormant_timeout`.
    DormantTimeout,
    /// An administrator (`by`: the caller, e.g. `uid 0`) ended it.
    Terminated { by: String, reason: String },
    /// A policy change left it nothing it may reach.
    PolicyChange { reason: String },
    /// The identity provider (or a token event) ended it.
    IdentityEvent { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEnd {
    pub at_ms: u64,
    #[serde(flatten)]
    pub cause: EndCause,
}

/// What the agent keeps to check reconnect tokens. The seed is a secret shared with the
/// client; the state file is only readable by root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconnectState {
    /// 32 random bytes, lowercase hex.
    pub seed_hex: String,
    /// Highest counter accepted so far: a token must carry a larger one (no replays).
    pub last_counter: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    pub id: SessionId,
    pub state: SessionState,
    pub identity: Identity,
    /// The address the session was admitted from (the admission connection's peer).
    pub source: IpAddr,
    /// Earlier source addresses, when a reconnect moved the session.
    #[serde(default)]
    pub previous_sources: Vec<IpAddr>,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// Unix milliseconds of the last state change or reconnect.
    pub updated_at_ms: u64,
    /// Absolute expiry, Unix milliseconds.
    pub expires_at_ms: u64,
    /// When it went dormant, Unix milliseconds.
    #[serde(default)]
    pub dormant_since_ms: Option<u64>,
    pub grants: Vec<SessionGrant>,
    pub settings: SessionSettings,
    #[serde(default)]
    pub reconnect: Option<ReconnectState>,
    #[serde(default)]
    pub ended: Option<SessionEnd>,
}

impl Session {
    pub fn is_live(&self) -> bool {
        self.state.is_live()
    }

    pub fn grants_resource(&self, resource: &str) -> bool {
        self.grants.iter().any(|g| g.resource == resource)
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_hex_both_ways() {
        let id = SessionId(0x00ab_cdef_0000_0001);
        assert_eq!(id.to_string(), "00abcdef00000001");
        assert_eq!("00abcdef00000001".parse::<SessionId>().unwrap(), id);
        assert_eq!("0xabcdef00000001".parse::<SessionId>().unwrap(), id);
        assert_eq!(serde_json::to_string(&id).unwrap(), "\"00abcdef00000001\"");
        assert_eq!(
            serde_json::from_str::<SessionId>("\"00abcdef00000001\"").unwrap(),
            id
        );
        for bad in ["", "xyz", "12345678901234567", "-1"] {
            assert!(bad.parse::<SessionId>().is_err(), "{bad:?}");
        }
        assert_ne!(SessionId::random(), SessionId::random());
    }

    #[test]
    fn live_states() {
        assert!(SessionState::Active.is_live() && SessionState::Dormant.is_live());
        assert!(!SessionState::Expired.is_live() && !SessionState::Terminated.is_live());
        assert_eq!(
            serde_json::to_string(&SessionState::Dormant).unwrap(),
            "\"dormant\""
        );
    }
}
