//! The `locks` table of the state file: locks, denied tokens and per-user cut-offs, one row
//! each under a prefixed key, written by the store's writer like every other change (durable
//! before it is acknowledged).

use std::path::Path;

use redb::{ReadableTable, Table, TableDefinition, TableError};

use super::{
    Store, StoreError, db_error,
    schema::{decode, encode},
};
use crate::locks::model::{Cutoff, Denial, Lock, LockId};

/// `lock/<id>`, `deny/<denial key>`, `cutoff/<JSON [iss, sub]>` → JSON of the record.
pub(super) const LOCKS: TableDefinition<&str, &[u8]> = TableDefinition::new("locks");

/// One change to the locks table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockWrite {
    PutLock(Lock),
    DeleteLock(LockId),
    PutDenial(Denial),
    DeleteDenial(String),
    PutCutoff(Cutoff),
    DeleteCutoff { iss: String, sub: String },
}

fn lock_key(id: LockId) -> String {
    format!("lock/{id}")
}

fn denial_key(key: &str) -> String {
    format!("deny/{key}")
}

fn cutoff_key(iss: &str, sub: &str) -> String {
    format!(
        "cutoff/{}",
        serde_json::Value::Array(vec![iss.into(), sub.into()])
    )
}

/// Everything the table holds, as the agent restores it at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LockRecords {
    pub locks: Vec<Lock>,
    pub denials: Vec<Denial>,
    pub cutoffs: Vec<Cutoff>,
}

pub(super) fn apply(
    path: &Path,
    table: &mut Table<'_, &'static str, &'static [u8]>,
    write: &LockWrite,
) -> Result<(), StoreError> {
    let (key, bytes) = match write {
        LockWrite::PutLock(l) => (
            lock_key(l.id),
            Some(encode(path, "locks", format!("lock {}", l.id), l)?),
        ),
        LockWrite::DeleteLock(id) => (lock_key(*id), None),
        LockWrite::PutDenial(d) => (
            denial_key(&d.key),
            Some(encode(path, "locks", "a token denial", d)?),
        ),
        LockWrite::DeleteDenial(k) => (denial_key(k), None),
        LockWrite::PutCutoff(c) => (
            cutoff_key(&c.iss, &c.sub),
            Some(encode(path, "locks", format!("cut-off of {}", c.user), c)?),
        ),
        LockWrite::DeleteCutoff { iss, sub } => (cutoff_key(iss, sub), None),
    };
    match bytes {
        Some(b) => {
            table
                .insert(key.as_str(), b.as_slice())
                .map_err(db_error(path, "write a lock record"))?;
        }
        None => {
            table
                .remove(key.as_str())
                .map_err(db_error(path, "delete a lock record"))?;
        }
    }
    Ok(())
}

impl Store {
    /// Every lock, denied token and cut-off; none in a file written before locks existed.
    ///
    /// # Errors
    /// The table cannot be read, or a row does not decode (the agent then refuses to start
    /// rather than forget a lock).
    pub fn lock_records(&self) -> Result<LockRecords, StoreError> {
        self.read(|path, txn| {
            let table = match txn.open_table(LOCKS) {
                Ok(t) => t,
                Err(TableError::TableDoesNotExist(_)) => return Ok(LockRecords::default()),
                Err(e) => return Err(db_error(path, "open the locks table")(e)),
            };
            let mut out = LockRecords::default();
            for row in table
                .iter()
                .map_err(db_error(path, "read the locks table"))?
            {
                let (key, value) = row.map_err(db_error(path, "read the locks table"))?;
                let (key, bytes) = (key.value(), value.value());
                if key.starts_with("lock/") {
                    out.locks.push(decode(path, "locks", key, bytes)?);
                } else if key.starts_with("deny/") {
                    out.denials.push(decode(path, "locks", key, bytes)?);
                } else if key.starts_with("cutoff/") {
                    out.cutoffs.push(decode(path, "locks", key, bytes)?);
                } else {
                    return Err(StoreError::Decode {
                        path: path.to_owned(),
                        table: "locks",
                        key: key.to_owned(),
                        detail: "an unknown kind of row (written by a newer agent?)".into(),
                    });
                }
            }
            Ok(out)
        })
    }
}
