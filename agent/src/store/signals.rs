//! The signals receiver's durable state: each SET seen (by issuer and `jti`, kept for the
//! `iat` window so a replay is recognised), the signals applied to each session, the device
//! posture identity providers reported, and each polled stream's unacknowledged `jti`s.

use redb::{ReadableTable, TableDefinition, WriteTransaction};
use serde::{Deserialize, Serialize};

use super::{
    Store, StoreError, db_error,
    schema::{decode, encode},
};
use crate::sessions::model::SessionId;

/// `iss` NUL `jti` → JSON of [`SeenSet`].
const SEEN: TableDefinition<&str, &[u8]> = TableDefinition::new("signal_seen");
/// `SessionId.0` → JSON of `Vec<AppliedSignal>`.
const APPLIED: TableDefinition<u64, &[u8]> = TableDefinition::new("signal_applied");
/// Device id → JSON of [`DevicePosture`].
const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("signal_devices");
/// Transmitter issuer → JSON of [`PollState`].
const POLL: TableDefinition<&str, &[u8]> = TableDefinition::new("signal_poll");

/// A SET the agent has acted on (or ignored), kept until its `jti` can no longer come back
/// inside the `iat` window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenSet {
    pub received_at_ms: u64,
    /// Past this a SET with the same `jti` is refused for its `iat` anyway.
    pub forget_after_ms: u64,
    pub event_type: String,
    pub outcome: String,
}

/// A signal as `sessions show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedSignal {
    pub at_ms: u64,
    pub iss: String,
    pub jti: String,
    /// The event type's short name (`session-revoked`, `device-compliance-change`, …).
    pub event: String,
    /// What it did to this session (`terminated`, `posture_updated`, `claims_updated`, …).
    pub outcome: String,
}

/// A device's compliance as an identity provider last reported it; new logins from the
/// device are evaluated with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DevicePosture {
    pub compliant: bool,
    pub at_ms: u64,
    pub iss: String,
    pub jti: String,
}

/// A polled stream's position: the `jti`s acted on and durable here, not yet acknowledged
/// to the transmitter. They are sent with the next poll, after a restart too.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PollState {
    pub pending_acks: Vec<String>,
    /// `jti` → (err, description) to report with the next poll.
    #[serde(default)]
    pub pending_errors: Vec<(String, String, String)>,
}

/// A change to the signals tables, applied with the rest of its commit.
#[derive(Debug, Clone, PartialEq)]
pub enum SignalWrite {
    Seen {
        iss: String,
        jti: String,
        record: SeenSet,
    },
    /// Forget SETs whose window has passed (`forget_after_ms` before this).
    ForgetSeenBefore(u64),
    Applied {
        session: SessionId,
        signal: AppliedSignal,
    },
    Device {
        id: String,
        posture: DevicePosture,
    },
    Poll {
        transmitter: String,
        state: PollState,
    },
}

fn seen_key(iss: &str, jti: &str) -> String {
    format!("{iss}\u{0}{jti}")
}

/// Applies one signals write inside the writer's transaction.
pub(super) fn apply(
    path: &std::path::Path,
    txn: &WriteTransaction,
    write: &SignalWrite,
) -> Result<(), StoreError> {
    match write {
        SignalWrite::Seen { iss, jti, record } => {
            let mut t = txn
                .open_table(SEEN)
                .map_err(db_error(path, "open the signal_seen table"))?;
            let bytes = encode(path, "signal_seen", format!("SET {jti}"), record)?;
            t.insert(seen_key(iss, jti).as_str(), bytes.as_slice())
                .map_err(db_error(path, "record a SET"))?;
        }
        SignalWrite::ForgetSeenBefore(before) => {
            let mut t = txn
                .open_table(SEEN)
                .map_err(db_error(path, "open the signal_seen table"))?;
            t.retain(|_, v| {
                serde_json::from_slice::<SeenSet>(v).is_ok_and(|s| s.forget_after_ms >= *before)
            })
            .map_err(db_error(path, "prune the signal_seen table"))?;
        }
        SignalWrite::Applied { session, signal } => {
            let mut t = txn
                .open_table(APPLIED)
                .map_err(db_error(path, "open the signal_applied table"))?;
            let mut list: Vec<AppliedSignal> = match t
                .get(session.0)
                .map_err(db_error(path, "read the signal_applied table"))?
            {
                Some(v) => decode(path, "signal_applied", session, v.value())?,
                None => Vec::new(),
            };
            list.push(signal.clone());
            let bytes = encode(path, "signal_applied", session, &list)?;
            t.insert(session.0, bytes.as_slice())
                .map_err(db_error(path, "record an applied signal"))?;
        }
        SignalWrite::Device { id, posture } => {
            let mut t = txn
                .open_table(DEVICES)
                .map_err(db_error(path, "open the signal_devices table"))?;
            let bytes = encode(path, "signal_devices", id, posture)?;
            t.insert(id.as_str(), bytes.as_slice())
                .map_err(db_error(path, "record a device posture"))?;
        }
        SignalWrite::Poll { transmitter, state } => {
            let mut t = txn
                .open_table(POLL)
                .map_err(db_error(path, "open the signal_poll table"))?;
            let bytes = encode(path, "signal_poll", transmitter, state)?;
            t.insert(transmitter.as_str(), bytes.as_slice())
                .map_err(db_error(path, "record a poll position"))?;
        }
    }
    Ok(())
}

impl Store {
    /// Every SET seen and not yet forgotten: (`iss`, `jti`, record).
    pub fn signals_seen(&self) -> Result<Vec<(String, String, SeenSet)>, StoreError> {
        self.read(|path, txn| {
            let t = match txn.open_table(SEEN) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error(path, "open the signal_seen table")(e)),
            };
            let rows = t
                .iter()
                .map_err(db_error(path, "read the signal_seen table"))?;
            rows.map(|row| {
                let (k, v) = row.map_err(db_error(path, "read the signal_seen table"))?;
                let key = k.value();
                let (iss, jti) = key.split_once('\u{0}').unwrap_or((key, ""));
                Ok((
                    iss.to_owned(),
                    jti.to_owned(),
                    decode(path, "signal_seen", key, v.value())?,
                ))
            })
            .collect()
        })
    }

    /// The signals applied to a session, oldest first.
    pub fn signals_applied(&self, session: SessionId) -> Result<Vec<AppliedSignal>, StoreError> {
        self.read(|path, txn| {
            let t = match txn.open_table(APPLIED) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error(path, "open the signal_applied table")(e)),
            };
            match t
                .get(session.0)
                .map_err(db_error(path, "read the signal_applied table"))?
            {
                Some(v) => decode(path, "signal_applied", session, v.value()),
                None => Ok(Vec::new()),
            }
        })
    }

    /// Every device posture identity providers reported.
    pub fn signal_devices(&self) -> Result<Vec<(String, DevicePosture)>, StoreError> {
        self.read(|path, txn| {
            let t = match txn.open_table(DEVICES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error(path, "open the signal_devices table")(e)),
            };
            let rows = t
                .iter()
                .map_err(db_error(path, "read the signal_devices table"))?;
            rows.map(|row| {
                let (k, v) = row.map_err(db_error(path, "read the signal_devices table"))?;
                Ok((
                    k.value().to_owned(),
                    decode(path, "signal_devices", k.value(), v.value())?,
                ))
            })
            .collect()
        })
    }

    /// A polled stream's position (empty when it never polled).
    pub fn poll_state(&self, transmitter: &str) -> Result<PollState, StoreError> {
        self.read(|path, txn| {
            let t = match txn.open_table(POLL) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(PollState::default()),
                Err(e) => return Err(db_error(path, "open the signal_poll table")(e)),
            };
            match t
                .get(transmitter)
                .map_err(db_error(path, "read the signal_poll table"))?
            {
                Some(v) => decode(path, "signal_poll", transmitter, v.value()),
                None => Ok(PollState::default()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Write;

    #[test]
    fn signals_survive_a_reopen_and_old_sets_are_forgotten() {
        let dir = std::env::temp_dir().join(format!("fw-signals-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state.redb");
        let seen = |forget| SeenSet {
            received_at_ms: 1,
            forget_after_ms: forget,
            event_type: "session-revoked".into(),
            outcome: "applied".into(),
        };
        {
            let store = Store::open(&path).expect("open");
            assert!(store.signals_seen().expect("empty").is_empty());
            let applied = AppliedSignal {
                at_ms: 5,
                iss: "https://tx".into(),
                jti: "j1".into(),
                event: "session-revoked".into(),
                outcome: "terminated".into(),
            };
            store
                .commit(vec![
                    Write::Signal(SignalWrite::Seen {
                        iss: "https://tx".into(),
                        jti: "j1".into(),
                        record: seen(100),
                    }),
                    Write::Signal(SignalWrite::Seen {
                        iss: "https://tx".into(),
                        jti: "j2".into(),
                        record: seen(10),
                    }),
                    Write::Signal(SignalWrite::Applied {
                        session: SessionId(7),
                        signal: applied.clone(),
                    }),
                    Write::Signal(SignalWrite::Applied {
                        session: SessionId(7),
                        signal: applied,
                    }),
                    Write::Signal(SignalWrite::Poll {
                        transmitter: "https://tx".into(),
                        state: PollState {
                            pending_acks: vec!["j1".into()],
                            pending_errors: Vec::new(),
                        },
                    }),
                    Write::Signal(SignalWrite::ForgetSeenBefore(50)),
                ])
                .expect("commit");
            store.close();
        }
        let store = Store::open(&path).expect("reopen");
        let seen_now = store.signals_seen().expect("read");
        assert_eq!(seen_now.len(), 1, "j2's window passed: {seen_now:?}");
        assert_eq!(
            (seen_now[0].0.as_str(), seen_now[0].1.as_str()),
            ("https://tx", "j1")
        );
        assert_eq!(store.signals_applied(SessionId(7)).expect("read").len(), 2);
        assert!(
            store
                .signals_applied(SessionId(8))
                .expect("read")
                .is_empty()
        );
        assert_eq!(
            store.poll_state("https://tx").expect("read").pending_acks,
            ["j1"]
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
