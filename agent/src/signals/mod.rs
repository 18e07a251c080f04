//! The `signals` room: a Shared Signals (SSF 1.0) receiver for CAEP and RISC events. An
//! identity provider's security event (a revoked session, a disabled account, a laptop that
//! fell out of compliance) becomes a revocation in the kernel within milliseconds.
//!
//! SETs arrive pushed (RFC 8935, `POST /v1/ssf/events` on the admission listener) or polled
//! (RFC 8936). Each is validated ([`set`]), de-duplicated durably by `jti`, matched against
//! live sessions ([`subject`]) and acted on ([`receiver`]); every SET is audited with its
//! `jti`, `iss`, event type, subject and outcome.

pub mod config;
pub mod dev;
pub mod events;
pub mod keys;
pub mod poll;
pub mod push;
pub mod receiver;
pub mod set;
pub mod status;
pub mod stream;
pub mod subject;

use std::path::PathBuf;

pub use config::{Delivery, SignalsConfig, SubjectMapping, TransmitterConfig};
pub use receiver::{NotAccepted, Outcome, Receipt, Receiver};
pub use status::{SignalsStatus, TransmitterStatus, signals_status};

/// The `Content-Type` of a pushed SET (RFC 8935 2).
pub const SET_MEDIA_TYPE: &str = "application/secevent+jwt";
/// Where transmitters push SETs on the admission listener.
pub const PUSH_PATH: &str = "/v1/ssf/events";

/// How a SET reached this agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Via {
    /// From its transmitter: pushed or polled on this agent's own stream.
    Transmitter,
    /// From the fleet's signals stream, on this subject (`<prefix>.signals.<host or relay>`):
    /// accepted by another agent, or published there by a relay. Checked all the same.
    Fleet { subject: String },
}

impl Via {
    /// How audit records say where a SET came from (empty for a transmitter's own stream).
    pub fn describe(&self) -> String {
        match self {
            Via::Transmitter => String::new(),
            Via::Fleet { subject } => format!("via the fleet ({subject})"),
        }
    }
}

/// The error codes of RFC 8935 2.4 and SSF 1.0 (`invalid_state`), sent as `err`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrCode {
    /// Not a SET, or its event does not conform.
    InvalidRequest,
    /// The key or algorithm is unacceptable, or the signature does not verify.
    InvalidKey,
    InvalidIssuer,
    InvalidAudience,
    /// The transmitter's credential (the `Authorization` header) is missing or wrong.
    AuthenticationFailed,
    /// The credential is good but this transmitter may not deliver this way.
    AccessDenied,
    /// The stream is paused or disabled.
    InvalidState,
}

impl ErrCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidRequest => "invalid_request",
            Self::InvalidKey => "invalid_key",
            Self::InvalidIssuer => "invalid_issuer",
            Self::InvalidAudience => "invalid_audience",
            Self::AuthenticationFailed => "authentication_failed",
            Self::AccessDenied => "access_denied",
            Self::InvalidState => "invalid_state",
        }
    }
}

/// Why the signals receiver cannot start or act.
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    #[error("{field}: {reason}")]
    Config { field: String, reason: String },
    #[error("{field}: cannot read {}: {source}", path.display())]
    Unreadable {
        field: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{field}: {} is not a usable key source: {reason}", path.display())]
    BadKeys {
        field: String,
        path: PathBuf,
        reason: String,
    },
    #[error("the state store failed; the SET was not acknowledged: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("acting on the SET failed; it was not acknowledged: {0}")]
    Session(#[from] crate::sessions::SessionError),
    #[error("making the SET's ending stick failed; it was not acknowledged: {0}")]
    Locks(#[from] crate::locks::LocksError),
    #[error("{what}: {detail}")]
    Transmitter { what: String, detail: String },
    #[error("the signals receiver stopped part way: its worker thread did not finish")]
    Interrupted,
    /// The same SET is being applied by another delivery: acknowledging this one before
    /// that one is durable could acknowledge a SET that is then never applied.
    #[error("the same SET ({jti}) is being applied by another delivery; deliver it again")]
    InFlight { jti: String },
}
