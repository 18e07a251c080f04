//! What locks, token denials and per-user cut-offs are: their targets, records and the
//! refusals they make. Parsed and checked at the boundary; stored as is.

use std::{fmt, net::IpAddr, str::FromStr};

use ipnet::IpNet;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::LocksError;
use crate::sessions::model::SessionId;

/// The longest text accepted for a user, group, device, issuer or subject in a target.
pub const MAX_NAME_BYTES: usize = 1024;
/// The longest reason an administrator may give.
pub const MAX_REASON_BYTES: usize = 1024;
/// The longest TTL a lock may have (ten years): beyond that, say "until removed".
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;

/// A random 64-bit lock id, shown as `lk-` and 16 lowercase hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LockId(pub u64);

impl LockId {
    pub fn random() -> Self {
        Self(SessionId::random().0)
    }
}

impl fmt::Display for LockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "lk-{:016x}", self.0)
    }
}

impl FromStr for LockId {
    type Err = LocksError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let hex = t.strip_prefix("lk-").unwrap_or(t);
        if hex.is_empty() || hex.len() > 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(LocksError::BadLockId(s.to_owned()));
        }
        u64::from_str_radix(hex, 16)
            .map(Self)
            .map_err(|_| LocksError::BadLockId(s.to_owned()))
    }
}

impl Serialize for LockId {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for LockId {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a lock holds out: exactly one of these.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum LockTarget {
    /// A user by email (case-insensitive) or subject, as `sessions terminate --user` names one.
    User(String),
    /// One identity of one issuer: `iss` and `sub` exactly.
    Subject { iss: String, sub: String },
    /// Every identity whose groups claim has this group, at admission and re-evaluation.
    Group(String),
    /// The device id the policy reads from the token's device claim.
    Device(String),
    /// Every admission from this prefix (a bare address is a /32 or /128).
    Source(String),
    /// One session: its reconnects.
    Session(SessionId),
    /// One token: the lowercase hex SHA-256 `sessions show` prints as `token_sha256`.
    Token(String),
}

impl LockTarget {
    /// The target checked and in its one canonical spelling (lowercase user and token,
    /// a prefix with its host bits clear), or the reason it is refused.
    ///
    /// # Errors
    /// [`LocksError::BadTarget`] saying what is wrong and how to write it.
    pub fn canonical(&self) -> Result<Self, LocksError> {
        let bad = |what: String| LocksError::BadTarget(what);
        Ok(match self {
            Self::User(u) => Self::User(name("user", u)?.to_lowercase()),
            Self::Subject { iss, sub } => Self::Subject {
                iss: name("subject issuer", iss)?.to_owned(),
                sub: name("subject", sub)?.to_owned(),
            },
            Self::Group(g) => Self::Group(name("group", g)?.to_owned()),
            Self::Device(d) => Self::Device(name("device", d)?.to_owned()),
            Self::Source(p) => Self::Source(parse_prefix(p)?.to_string()),
            Self::Session(id) if id.0 == 0 => {
                return Err(bad("session 0000000000000000 cannot exist".into()));
            }
            Self::Session(id) => Self::Session(*id),
            Self::Token(t) => {
                let hex = t.trim().strip_prefix("sha256:").unwrap_or(t.trim());
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad(format!(
                        "token {t:?} is not a SHA-256 fingerprint: give the 64 hex digits \
                         `sessions show` prints as token_sha256"
                    )));
                }
                Self::Token(hex.to_ascii_lowercase())
            }
        })
    }

    /// The kind of target, as the CLI flag names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::User(_) => "user",
            Self::Subject { .. } => "subject",
            Self::Group(_) => "group",
            Self::Device(_) => "device",
            Self::Source(_) => "source",
            Self::Session(_) => "session",
            Self::Token(_) => "token",
        }
    }
}

impl fmt::Display for LockTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::User(u) => write!(f, "user {u}"),
            Self::Subject { iss, sub } => write!(f, "subject {iss} {sub}"),
            Self::Group(g) => write!(f, "group {g}"),
            Self::Device(d) => write!(f, "device {d}"),
            Self::Source(p) => write!(f, "source {p}"),
            Self::Session(id) => write!(f, "session {id}"),
            Self::Token(t) => write!(f, "token {t}"),
        }
    }
}

fn name<'a>(what: &str, value: &'a str) -> Result<&'a str, LocksError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(LocksError::BadTarget(format!("the {what} is empty")));
    }
    if v.len() > MAX_NAME_BYTES {
        return Err(LocksError::BadTarget(format!(
            "the {what} is {} bytes long; at most {MAX_NAME_BYTES}",
            v.len()
        )));
    }
    if v.chars().any(char::is_control) {
        return Err(LocksError::BadTarget(format!(
            "the {what} {v:?} has control characters"
        )));
    }
    Ok(v)
}

/// A source prefix: `10.0.0.0/24`, `2001:db8::/32`, or one address. Host bits must be clear
/// (a typo such as `10.0.0.5/8` is refused rather than silently widened), and `/0` is refused:
/// it would lock every source out.
///
/// # Errors
/// [`LocksError::BadTarget`].
pub fn parse_prefix(text: &str) -> Result<IpNet, LocksError> {
    let t = text.trim();
    let net = match t.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => match t.parse::<IpAddr>() {
            Ok(ip) => IpNet::from(ip),
            Err(_) => {
                return Err(LocksError::BadTarget(format!(
                    "source {text:?} is not an address or prefix: write e.g. 10.0.0.7, \
                     10.0.0.0/24 or 2001:db8::/32"
                )));
            }
        },
    };
    if net.prefix_len() == 0 {
        return Err(LocksError::BadTarget(format!(
            "source {text:?} is every address: a lock must name a narrower prefix"
        )));
    }
    if net.trunc() != net {
        return Err(LocksError::BadTarget(format!(
            "source {text:?} has host bits set: did you mean {}?",
            net.trunc()
        )));
    }
    Ok(net)
}

/// A lock as stored and listed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lock {
    pub id: LockId,
    pub target: LockTarget,
    /// The administrator's words; shown to the refused client only when `show_reason`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default)]
    pub show_reason: bool,
    /// Who added it (`uid 0`).
    pub by: String,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    /// Unix milliseconds; absent: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at_ms: Option<u64>,
    /// Set by the sweep once the expiry was audited (Unix milliseconds); the lock is kept,
    /// listed as expired, until the retention window passes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expired_at_ms: Option<u64>,
}

impl Lock {
    /// Whether it refuses anything at `now_ms`: decided by the clock, not by the sweep, so a
    /// lock whose TTL ran out lets the user back in at once.
    pub fn holds(&self, now_ms: u64) -> bool {
        self.expires_at_ms.is_none_or(|at| now_ms < at)
    }

    pub fn state(&self, now_ms: u64) -> LockState {
        if self.holds(now_ms) {
            LockState::Active
        } else {
            LockState::Expired
        }
    }

    /// What the refused client is told.
    pub fn client_message(&self) -> String {
        match (&self.reason, self.show_reason) {
            (Some(r), true) => format!("access is locked by {}: {r}", self.id),
            _ => format!(
                "access is locked by {}; ask an administrator of this host",
                self.id
            ),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LockState {
    Active,
    Expired,
}

/// A denied token: refused at admission until it could no longer verify anyway.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Denial {
    /// [`crate::identity::Identity::denial_key`]: never the token itself.
    pub key: String,
    pub user: String,
    /// The session whose termination denied it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<SessionId>,
    pub by: String,
    pub reason: String,
    pub at_ms: u64,
    /// The token's `exp` plus the largest verification leeway, Unix milliseconds: past it the
    /// token is refused as expired, and the denial is pruned.
    pub until_ms: u64,
}

/// A per-user cut-off: tokens of `iss`+`sub` issued at or before `cutoff_secs` are refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cutoff {
    pub iss: String,
    pub sub: String,
    pub user: String,
    /// Seconds since the epoch: a token's `iat` must be after it.
    pub cutoff_secs: u64,
    pub by: String,
    pub reason: String,
    pub at_ms: u64,
}

/// Why an admission or reconnect was refused, as the client, the audit log and the metrics
/// see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// `token_revoked`, `issued_before_cutoff`, `locked` or `locks_unavailable`.
    pub code: &'static str,
    pub lock: Option<LockId>,
    /// For the audit log and operators: names the lock, its target and reason.
    pub detail: String,
    /// For the client: the admin's reason only when the lock says so.
    pub client_message: String,
}
