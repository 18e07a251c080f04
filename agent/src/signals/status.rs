//! What `flowwarden signals status` shows: each stream's transmitter, delivery, stream
//! status, last event, counts by event type and outcome, and errors.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex, PoisonError, Weak},
};

use serde::{Deserialize, Serialize};

use super::{TransmitterConfig, receiver::Receiver, set::Refused};
use crate::auth::IssuerKeyStatus;

/// One stream's counters, kept by the receiver.
#[derive(Debug, Clone)]
pub struct Stats {
    pub(crate) stream_status: String,
    received: u64,
    last_event_at_ms: Option<u64>,
    last_event: Option<String>,
    /// `event outcome` → count.
    counts: BTreeMap<String, u64>,
    /// RFC 8935 code → count of refused SETs.
    refused: BTreeMap<String, u64>,
    last_error: Option<String>,
    last_error_at_ms: Option<u64>,
    /// The `state` the agent asked a verification event to echo.
    pub(crate) verification_state: Option<String>,
    last_verified_at_ms: Option<u64>,
    pub(crate) last_poll_at_ms: Option<u64>,
    pub(crate) stream_id: Option<String>,
    /// The poll endpoint a managed stream reported.
    pub(crate) poll_endpoint: Option<String>,
}

impl Stats {
    pub(crate) fn new(_cfg: &TransmitterConfig) -> Self {
        Self {
            stream_status: "enabled".into(),
            received: 0,
            last_event_at_ms: None,
            last_event: None,
            counts: BTreeMap::new(),
            refused: BTreeMap::new(),
            last_error: None,
            last_error_at_ms: None,
            verification_state: None,
            last_verified_at_ms: None,
            last_poll_at_ms: None,
            stream_id: None,
            poll_endpoint: None,
        }
    }

    pub(crate) fn count(&mut self, event: &str, outcome: &str, now: u64) {
        self.received += 1;
        self.last_event_at_ms = Some(now);
        self.last_event = Some(event.to_owned());
        // The outcome's kind only (`not_compliant; severed web` counts as `not_compliant`).
        let kind = outcome.split(';').next().unwrap_or(outcome);
        *self.counts.entry(format!("{event} {kind}")).or_default() += 1;
    }

    pub(crate) fn refused(&mut self, refused: &Refused, now: u64) {
        *self
            .refused
            .entry(refused.err.as_str().to_owned())
            .or_default() += 1;
        self.error(
            &format!("{}: {}", refused.err.as_str(), refused.description),
            now,
        );
    }

    pub(crate) fn error(&mut self, what: &str, now: u64) {
        self.last_error = Some(what.chars().take(512).collect());
        self.last_error_at_ms = Some(now);
    }

    /// A verification event arrived: whether it echoed the state the agent asked for.
    pub(crate) fn verified(&mut self, state: Option<&str>, now: u64) -> String {
        match (&self.verification_state, state) {
            (Some(want), Some(got)) if want == got => {
                self.last_verified_at_ms = Some(now);
                "verified".into()
            }
            (None, _) => {
                // Transmitters also verify on their own schedule (SSF 8.1.4.2).
                self.last_verified_at_ms = Some(now);
                "verified_unsolicited".into()
            }
            _ => "verification_state_mismatch".into(),
        }
    }
}

/// One stream, as `signals.status` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransmitterStatus {
    pub issuer: String,
    pub audience: String,
    /// `push` or `poll`.
    pub delivery: String,
    /// `enabled`, `paused` or `disabled` (from stream-updated events or the status endpoint).
    pub stream_status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_id: Option<String>,
    /// SETs accepted (applied, ignored or replayed).
    pub received: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_event_at_ms: Option<u64>,
    /// `<event> <outcome>` → count.
    pub counts: BTreeMap<String, u64>,
    /// RFC 8935 error code → SETs refused with it.
    pub refused: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_verified_at_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_poll_at_ms: Option<u64>,
    /// The transmitter's signing keys.
    pub keys: IssuerKeyStatus,
}

/// The answer of `signals.status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignalsStatus {
    pub transmitters: Vec<TransmitterStatus>,
}

/// The receiver `signals.status` reports on; weak, so that it never keeps one alive.
static AGENT_RECEIVER: Mutex<Weak<Receiver>> = Mutex::new(Weak::new());

impl Receiver {
    /// Makes this receiver the one [`signals_status`] reports on: the agent's.
    pub fn report_status(self: &Arc<Self>) {
        *AGENT_RECEIVER
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Arc::downgrade(self);
    }

    pub fn status(&self) -> SignalsStatus {
        SignalsStatus {
            transmitters: self
                .transmitters
                .iter()
                .map(|t| {
                    let s = t
                        .stats
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .clone();
                    TransmitterStatus {
                        issuer: t.cfg.issuer.clone(),
                        audience: t.cfg.audience.clone(),
                        delivery: t.cfg.delivery.as_str().to_owned(),
                        stream_status: s.stream_status,
                        stream_id: s.stream_id,
                        received: s.received,
                        last_event: s.last_event,
                        last_event_at_ms: s.last_event_at_ms,
                        counts: s.counts,
                        refused: s.refused,
                        last_error: s.last_error,
                        last_error_at_ms: s.last_error_at_ms,
                        last_verified_at_ms: s.last_verified_at_ms,
                        last_poll_at_ms: s.last_poll_at_ms,
                        keys: t.keys.status(),
                    }
                })
                .collect(),
        }
    }
}

/// Every stream of the agent's receiver (none when no transmitter is configured).
pub fn signals_status() -> SignalsStatus {
    let receiver = AGENT_RECEIVER
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .upgrade();
    receiver.map_or_else(SignalsStatus::default, |r| r.status())
}
