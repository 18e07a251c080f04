//! What the agent knows about its place in the fleet: connected or not, to which server, how
//! far along the control stream, and whether it may admit (the catch-up and strict gates).
//! Shared by the fleet tasks, `status`, metrics and the admission endpoint.

use std::sync::{
    Mutex, PoisonError,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use serde::{Deserialize, Serialize};

use crate::sessions::model::now_ms;

/// The fleet part of `status`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetStatus {
    pub host: String,
    pub connected: bool,
    /// The server the client is connected to (or was last).
    pub server: String,
    /// The control stream sequence of the last command handled.
    pub control_position: u64,
    /// Control commands on the stream not yet handled (as of the last look).
    pub lag: u64,
    /// Whether this agent confirmed it has every command, and when (Unix ms; 0: never).
    pub current: bool,
    pub confirmed_at_ms: u64,
    /// Admissions wait for the first catch-up, and in strict mode for a fresh confirmation.
    pub strict: bool,
    /// Whether admissions are being refused for the fleet's sake right now, and why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admissions_held: Option<String>,
    pub commands_applied: u64,
    pub commands_refused: u64,
    /// Unix ms of the last command applied or refused (0: none yet).
    pub last_event_ms: u64,
    /// The policy bundle version in force (0: local policy only).
    pub policy_version: u64,
    pub events_published: u64,
    /// SETs this agent accepted from its transmitters and published to the fleet.
    #[serde(default)]
    pub signals_published: u64,
    /// SETs from the fleet's signals stream handed to this agent's receiver (applied,
    /// duplicates and refusals alike: its audit says which).
    #[serde(default)]
    pub signals_received: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

#[derive(Debug)]
pub struct FleetState {
    pub host: String,
    strict: bool,
    current_within_ms: u64,
    /// Until this time (Unix ms) admissions wait for the first catch-up in every mode.
    start_deadline_ms: u64,
    pub connected: AtomicBool,
    caught_up_once: AtomicBool,
    pub control_position: AtomicU64,
    pub lag: AtomicU64,
    confirmed_at_ms: AtomicU64,
    pub commands_applied: AtomicU64,
    pub commands_refused: AtomicU64,
    pub last_event_ms: AtomicU64,
    pub policy_version: AtomicU64,
    pub events_published: AtomicU64,
    pub signals_published: AtomicU64,
    pub signals_received: AtomicU64,
    pub server: Mutex<String>,
    pub last_error: Mutex<Option<String>>,
}

impl FleetState {
    pub fn new(host: String, strict: bool, current_within_secs: u64, position: u64) -> Self {
        let current_within_ms = current_within_secs * 1000;
        Self {
            host,
            strict,
            current_within_ms,
            start_deadline_ms: now_ms() + current_within_ms,
            connected: AtomicBool::new(false),
            caught_up_once: AtomicBool::new(false),
            control_position: AtomicU64::new(position),
            lag: AtomicU64::new(0),
            confirmed_at_ms: AtomicU64::new(0),
            commands_applied: AtomicU64::new(0),
            commands_refused: AtomicU64::new(0),
            last_event_ms: AtomicU64::new(0),
            policy_version: AtomicU64::new(0),
            events_published: AtomicU64::new(0),
            signals_published: AtomicU64::new(0),
            signals_received: AtomicU64::new(0),
            server: Mutex::new(String::new()),
            last_error: Mutex::new(None),
        }
    }

    /// The control loop saw nothing left to handle.
    pub fn confirm_current(&self) {
        self.lag.store(0, Ordering::Relaxed);
        self.confirmed_at_ms.store(now_ms(), Ordering::Release);
        if !self.caught_up_once.swap(true, Ordering::AcqRel) {
            tracing::info!(
                position = self.control_position.load(Ordering::Relaxed),
                "fleet: caught up with the control stream; admitting"
            );
        }
    }

    pub fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = error;
    }

    pub fn set_server(&self, server: String) {
        *self.server.lock().unwrap_or_else(PoisonError::into_inner) = server;
    }

    fn is_current(&self, now: u64) -> bool {
        let at = self.confirmed_at_ms.load(Ordering::Acquire);
        at != 0 && now.saturating_sub(at) <= self.current_within_ms
    }

    /// `Ok` when an admission may proceed; otherwise why not, for the client and the audit.
    ///
    /// An agent that was down catches up before it admits anyone. If it cannot reach the
    /// fleet, the default mode admits against the last known state once `current_within_secs`
    /// have passed since start (and says so in `status`); strict mode keeps refusing until
    /// it is confirmed current again.
    ///
    /// # Errors
    /// The reason admissions are held.
    pub fn admits(&self) -> Result<(), String> {
        let now = now_ms();
        if self.strict {
            if self.is_current(now) {
                return Ok(());
            }
            return Err(
                "strict fleet mode: this agent cannot confirm it has every fleet command (locks, \
                 terminations); try again shortly"
                    .into(),
            );
        }
        if self.caught_up_once.load(Ordering::Acquire) || now >= self.start_deadline_ms {
            return Ok(());
        }
        Err("this agent is catching up with fleet commands; try again shortly".into())
    }

    pub fn status(&self) -> FleetStatus {
        let now = now_ms();
        FleetStatus {
            host: self.host.clone(),
            connected: self.connected.load(Ordering::Relaxed),
            server: self
                .server
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            control_position: self.control_position.load(Ordering::Relaxed),
            lag: self.lag.load(Ordering::Relaxed),
            current: self.is_current(now),
            confirmed_at_ms: self.confirmed_at_ms.load(Ordering::Relaxed),
            strict: self.strict,
            admissions_held: self.admits().err(),
            commands_applied: self.commands_applied.load(Ordering::Relaxed),
            commands_refused: self.commands_refused.load(Ordering::Relaxed),
            last_event_ms: self.last_event_ms.load(Ordering::Relaxed),
            policy_version: self.policy_version.load(Ordering::Relaxed),
            events_published: self.events_published.load(Ordering::Relaxed),
            signals_published: self.signals_published.load(Ordering::Relaxed),
            signals_received: self.signals_received.load(Ordering::Relaxed),
            last_error: self
                .last_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        }
    }

    /// Prometheus lines for the fleet.
    pub fn metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let s = self.status();
        let gauges: [(&str, &str, u64); 10] = [
            (
                "flowwarden_fleet_connected",
                "1 when connected to a fleet server",
                u64::from(s.connected),
            ),
            (
                "flowwarden_fleet_current",
                "1 when confirmed to have every control command",
                u64::from(s.current),
            ),
            (
                "flowwarden_fleet_control_position",
                "control stream sequence handled",
                s.control_position,
            ),
            (
                "flowwarden_fleet_control_lag",
                "control commands not yet handled",
                s.lag,
            ),
            (
                "flowwarden_fleet_commands_applied_total",
                "fleet commands applied",
                s.commands_applied,
            ),
            (
                "flowwarden_fleet_commands_refused_total",
                "fleet commands refused (unsigned, forged, replayed)",
                s.commands_refused,
            ),
            (
                "flowwarden_fleet_policy_version",
                "policy bundle version in force",
                s.policy_version,
            ),
            (
                "flowwarden_fleet_events_published_total",
                "audit events published to the fleet",
                s.events_published,
            ),
            (
                "flowwarden_fleet_signals_published_total",
                "SETs accepted from a transmitter and published to the fleet",
                s.signals_published,
            ),
            (
                "flowwarden_fleet_signals_received_total",
                "SETs from the fleet handed to the signals receiver",
                s.signals_received,
            ),
        ];
        for (name, help, value) in gauges {
            let kind = if name.ends_with("_total") {
                "counter"
            } else {
                "gauge"
            };
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admissions_wait_for_the_first_catch_up() {
        let s = FleetState::new("h".into(), false, 60, 0);
        assert!(s.admits().is_err());
        s.confirm_current();
        assert_eq!(s.admits(), Ok(()));
        assert!(s.status().current);
    }

    #[test]
    fn the_default_mode_admits_after_the_deadline_and_says_so() {
        let s = FleetState::new("h".into(), false, 0, 0);
        assert_eq!(s.admits(), Ok(()));
        assert!(!s.status().current);
    }

    #[test]
    fn strict_mode_needs_a_fresh_confirmation() {
        let s = FleetState::new("h".into(), true, 0, 0);
        assert!(s.admits().is_err());
        let s = FleetState::new("h".into(), true, 60, 0);
        s.confirm_current();
        assert_eq!(s.admits(), Ok(()));
        assert!(s.status().admissions_held.is_none());
    }
}
