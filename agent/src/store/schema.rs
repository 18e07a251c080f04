//! The layout of the state file: its redb tables, the meta keys, and how rows are encoded.

use std::{fmt::Display, path::Path};

use redb::TableDefinition;
use serde::{Serialize, de::DeserializeOwned};

use super::StoreError;

/// Bumped when a table or row format changes incompatibly. An agent refuses a file whose
/// version is newer than this rather than misreading it.
pub const SCHEMA_VERSION: u32 = 1;

/// `SessionId.0` → JSON of `Session`.
pub(super) const SESSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("sessions");
/// `SessionId.0` → JSON of `RevocationRecord`.
pub(super) const REVOCATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("revocations");
/// Audit seq → JSON of `AuditEvent` (whose `seq` equals the key).
pub(super) const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Small named values; see the `META_*` keys.
pub(super) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

/// `u32` little endian: the `SCHEMA_VERSION` that wrote the file.
pub(super) const META_SCHEMA_VERSION: &str = "schema_version";
/// `u64` little endian: the seq the next audit event gets. Kept next to the log (rather than
/// derived from its last key) so that a log whose tail went missing is detected, not refilled.
pub(super) const META_NEXT_AUDIT_SEQ: &str = "next_audit_seq";

pub(super) fn encode<T: Serialize>(
    path: &Path,
    table: &'static str,
    what: impl Display,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        path: path.to_owned(),
        table,
        what: what.to_string(),
        source,
    })
}

pub(super) fn decode<T: DeserializeOwned>(
    path: &Path,
    table: &'static str,
    key: impl Display,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Decode {
        path: path.to_owned(),
        table,
        key: key.to_string(),
        detail: e.to_string(),
    })
}

pub(super) fn decode_u32(bytes: &[u8]) -> Option<u32> {
    bytes.try_into().ok().map(u32::from_le_bytes)
}

pub(super) fn decode_u64(bytes: &[u8]) -> Option<u64> {
    bytes.try_into().ok().map(u64::from_le_bytes)
}
