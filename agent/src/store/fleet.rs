//! The fleet's durable state in the agent's own store: which control commands were applied
//! (by command id, so that a redelivery or a replay is never applied twice) and the stream
//! positions the agent resumes from. Written in the same transaction as the command's audit
//! record, so that "applied" and "recorded" cannot part.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, Write, db_error};

/// Key → JSON value. Keys: `applied/<command id>` ([`AppliedRecord`]),
/// `position/<stream>` (`u64`), `policy/version` (`u64`), and [`SIGNAL_OUTBOX`]`<id>` (a SET
/// accepted here, not yet stored by the fleet's signals stream).
pub(super) const FLEET: TableDefinition<&str, &[u8]> = TableDefinition::new("fleet");

/// The position of the control stream: the stream sequence of the last command handled.
pub const CONTROL_POSITION: &str = "position/control";
/// The seq of the last audit event published to the fleet's events stream.
pub const EVENTS_POSITION: &str = "position/events";
/// The version of the last policy bundle put in force.
pub const POLICY_VERSION: &str = "policy/version";

/// The prefix of the SETs waiting to be published to the fleet's signals stream.
pub const SIGNAL_OUTBOX: &str = "signal-out/";

/// One applied command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedRecord {
    /// The control stream's sequence number it came with (0: from the snapshot).
    pub seq: u64,
    pub at_ms: u64,
    /// What applying it did, in a sentence (or the error it met).
    pub outcome: String,
}

fn applied_key(command: &str) -> String {
    format!("applied/{command}")
}

/// A write of a fleet value, for [`Store::commit`] together with its audit event.
pub fn put<T: Serialize>(key: &str, value: &T) -> Write {
    // Our own plain records always serialise.
    Write::Fleet {
        key: key.to_owned(),
        value: serde_json::to_vec(value).unwrap_or_default(),
    }
}

/// The write that removes a fleet value.
pub fn remove(key: &str) -> Write {
    Write::FleetRemove {
        key: key.to_owned(),
    }
}

/// The write that marks `command` applied.
pub fn applied(command: &str, record: &AppliedRecord) -> Write {
    put(&applied_key(command), record)
}

impl Store {
    /// A fleet value, if it was ever written.
    ///
    /// # Errors
    /// The file cannot be read or the value does not decode.
    pub fn fleet_value<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        self.read(|path, txn| {
            let table = match txn.open_table(FLEET) {
                Ok(t) => t,
                // A state file from before the fleet, or a host that never joined one.
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(db_error(path, "open the fleet table")(e)),
            };
            let row = table
                .get(key)
                .map_err(db_error(path, "read the fleet table"))?;
            row.map(|v| {
                serde_json::from_slice(v.value()).map_err(|e| StoreError::Decode {
                    path: path.to_owned(),
                    table: "fleet",
                    key: key.to_owned(),
                    detail: e.to_string(),
                })
            })
            .transpose()
        })
    }

    /// The record of an applied command.
    ///
    /// # Errors
    /// As [`Store::fleet_value`].
    pub fn fleet_applied(&self, command: &str) -> Result<Option<AppliedRecord>, StoreError> {
        self.fleet_value(&applied_key(command))
    }

    /// Every fleet value whose key starts with `prefix`, in key order, as stored (raw bytes).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn fleet_values_under(&self, prefix: &str) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.read(|path, txn| {
            let table = match txn.open_table(FLEET) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(db_error(path, "open the fleet table")(e)),
            };
            let mut out = Vec::new();
            for row in table
                .range(prefix..)
                .map_err(db_error(path, "read the fleet table"))?
            {
                let (k, v) = row.map_err(db_error(path, "read the fleet table"))?;
                if !k.value().starts_with(prefix) {
                    break;
                }
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    /// How many commands were ever applied.
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn fleet_applied_count(&self) -> Result<usize, StoreError> {
        self.read(|path, txn| {
            let table = match txn.open_table(FLEET) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(e) => return Err(db_error(path, "open the fleet table")(e)),
            };
            let rows = table
                .range("applied/".."applied0")
                .map_err(db_error(path, "read the fleet table"))?;
            Ok(rows.count())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn applied_commands_and_positions_survive_a_reopen() {
        let dir = std::env::temp_dir().join(format!("fw-store-fleet-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("state.redb");
        let store = Store::open(&path).unwrap();
        assert_eq!(store.fleet_value::<u64>(CONTROL_POSITION).unwrap(), None);
        assert_eq!(store.fleet_applied("c1").unwrap(), None);
        let record = AppliedRecord {
            seq: 7,
            at_ms: 1,
            outcome: "terminated 2 sessions".into(),
        };
        store
            .commit(vec![applied("c1", &record), put(CONTROL_POSITION, &7u64)])
            .unwrap();
        store.close();
        drop(store);
        let store = Store::open(&path).unwrap();
        assert_eq!(store.fleet_applied("c1").unwrap(), Some(record));
        assert_eq!(store.fleet_value::<u64>(CONTROL_POSITION).unwrap(), Some(7));
        assert_eq!(store.fleet_applied_count().unwrap(), 1);
        store
            .commit(vec![
                put(&format!("{SIGNAL_OUTBOX}b"), &"set-b"),
                put(&format!("{SIGNAL_OUTBOX}a"), &"set-a"),
                put("signal-outz", &"not under the prefix"),
            ])
            .unwrap();
        let under: Vec<String> = store
            .fleet_values_under(SIGNAL_OUTBOX)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(under, ["signal-out/a", "signal-out/b"]);
        store
            .commit(vec![remove(&format!("{SIGNAL_OUTBOX}a")), remove("absent")])
            .unwrap();
        assert_eq!(store.fleet_values_under(SIGNAL_OUTBOX).unwrap().len(), 1);
        drop(store);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
