//! Opening the state file: creating it safely when absent, and refusing, without changing a
//! byte of it, a file that is not a sound flowwarden store.

use std::{
    any::Any,
    fs::{self, DirBuilder, File, OpenOptions, TryLockError},
    io,
    os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt},
    panic::{self, AssertUnwindSafe},
    path::{Path, PathBuf},
    sync::atomic::{AtomicBool, Ordering},
};

use redb::{Builder, Database, DatabaseError, ReadableTable, StorageError, TableError};
use serde::de::DeserializeOwned;

use super::{
    RevocationRecord, StoreError, db_error,
    overlay::DryRunFile,
    schema::{
        AUDIT, META, META_NEXT_AUDIT_SEQ, META_SCHEMA_VERSION, REVOCATIONS, SCHEMA_VERSION,
        SESSIONS, decode_u32, decode_u64,
    },
};
use crate::sessions::model::Session;

/// redb's page cache. Its default (1 GiB) is sized for a database server, not for an agent whose
/// hot state is a few thousand sessions. The pages it does not hold are read back from the
/// kernel's page cache (a `pread`, microseconds). With 100,000 sessions (bench scale and bench
/// signals, one quiet afternoon, with 1,000,000 flows): 64 MiB kept 260 MiB resident and took
/// 3,200–3,500 pushed SETs a second; 48 MiB, 245 MiB and 2,700/s; 32 MiB, 230 MiB and 2,500/s.
/// With the flow index holding every flow too, 32 MiB left 256.7 MiB resident against a 256 MiB
/// target; 28 MiB keeps the memory target and the signal rate's (2,000/s) (BENCHMARKS.md).
const CACHE_BYTES: usize = 28 * 1024 * 1024;

pub(super) struct Opened {
    pub(super) db: Database,
    pub(super) next_audit_seq: u64,
}

pub(super) fn open(path: &Path) -> Result<Opened, StoreError> {
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let created_dirs = create_dirs(dir)?;
    let exists = path
        .try_exists()
        .map_err(io_error("look for the state file", path))?;
    if !exists && let Some(created) = create(path, dir, &created_dirs)? {
        return Ok(created);
    }
    // Also when another process created it between the two calls: open theirs.
    open_existing(path)
}

/// Creates `dir` and its missing ancestors, private to root, and returns the ones it created.
fn create_dirs(dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
    let missing: Vec<PathBuf> = dir
        .ancestors()
        .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
        .map(Path::to_owned)
        .collect();
    if !missing.is_empty() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io_error("create the state directory", dir))?;
    }
    Ok(missing)
}

/// Builds a complete, empty store under a staging name, then links it into place, so that a
/// crash mid-way never leaves a half-made file under the real name (which would be refused).
/// `None` when a file appeared under the real name meanwhile.
fn create(path: &Path, dir: &Path, created_dirs: &[PathBuf]) -> Result<Option<Opened>, StoreError> {
    let staging = staging_path(path)?;
    // Left by a crash during an earlier creation. Removing it loses nothing: it is a half-made
    // store, or a second name of the real file (if the crash came right after the link).
    match fs::remove_file(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("remove the leftover", &staging)(e)),
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&staging)
        .map_err(io_error("create", &staging))?;
    let db = builder(path, false)
        .create_file(file)
        .map_err(db_error(&staging, "create a database"))?;
    // Unlike rename, a hard link never replaces a file that another process just created.
    let linked = initialise(&staging, &db).map(|()| fs::hard_link(&staging, path));
    if let Err(e) = fs::remove_file(&staging) {
        tracing::warn!(path = %staging.display(), error = %e, "cannot remove the staging file");
    }
    match linked? {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(None),
        Err(e) => return Err(io_error("link the new state file as", path)(e)),
    }
    // The new name is durable only once its directory is, and a new directory only once its
    // parent is: until then a power loss could forget the store and all it acknowledged.
    let parents = created_dirs.iter().filter_map(|d| d.parent()).map(|p| {
        if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        }
    });
    for dir in std::iter::once(dir).chain(parents) {
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_error("sync the directory", dir))?;
    }
    tracing::info!(path = %path.display(), "created an empty state file");
    Ok(Some(Opened {
        db,
        next_audit_seq: 1,
    }))
}

fn initialise(path: &Path, db: &Database) -> Result<(), StoreError> {
    let action = "create the tables";
    let txn = db.begin_write().map_err(db_error(path, action))?;
    {
        txn.open_table(SESSIONS).map_err(db_error(path, action))?;
        txn.open_table(REVOCATIONS)
            .map_err(db_error(path, action))?;
        txn.open_table(AUDIT).map_err(db_error(path, action))?;
        let mut meta = txn.open_table(META).map_err(db_error(path, action))?;
        meta.insert(META_SCHEMA_VERSION, SCHEMA_VERSION.to_le_bytes().as_slice())
            .map_err(db_error(path, action))?;
        meta.insert(META_NEXT_AUDIT_SEQ, 1u64.to_le_bytes().as_slice())
            .map_err(db_error(path, action))?;
    }
    txn.commit().map_err(db_error(path, action))
}

/// Rehearses the open on an in-memory copy-on-write view first: redb writes while it opens
/// (crash repair, header flags) and panics on some damaged files, and a file we refuse must come
/// out byte for byte as it went in. Only a file that passes is then opened for real.
fn open_existing(path: &Path) -> Result<Opened, StoreError> {
    let file = File::open(path).map_err(|e| corrupt(path, format!("cannot read it: {e}")))?;
    let meta = file
        .metadata()
        .map_err(|e| corrupt(path, format!("cannot read it: {e}")))?;
    if meta.is_dir() {
        return Err(corrupt(path, "it is a directory".into()));
    }
    if meta.len() == 0 {
        // The store is never empty once created (see `create`), so this is damage, not a start.
        return Err(corrupt(path, "it is empty".into()));
    }
    if meta.mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), mode = format!("{:o}", meta.mode() & 0o777),
            "the state file is readable by others; it holds reconnect seeds: chmod 600 it");
    }
    // Kept until the rehearsal is over so that no other agent writes under it.
    match file.try_lock() {
        Ok(()) => {}
        Err(TryLockError::WouldBlock) => {
            return Err(StoreError::Locked {
                path: path.to_owned(),
            });
        }
        Err(TryLockError::Error(e)) => return Err(io_error("lock", path)(e)),
    }
    let dry = DryRunFile::new(file).map_err(|e| corrupt(path, format!("cannot read it: {e}")))?;
    let rehearsal = engine_open(path, || builder(path, false).create_with_backend(dry))?;
    validate(path, &rehearsal, Rows::Decode)?;
    drop(rehearsal);

    let db = engine_open(path, || builder(path, true).open(path))?;
    // The rows were just decoded from these same bytes; the meta checks are cheap and yield
    // the next seq.
    let next_audit_seq = validate(path, &db, Rows::Skip)?;
    Ok(Opened { db, next_audit_seq })
}

fn builder(path: &Path, announce_repair: bool) -> Builder {
    let mut builder = Builder::new();
    builder.set_cache_size(CACHE_BYTES);
    // redb 3 reads only the v3 format: files made now will not need a migration then.
    builder.create_with_file_format_v3(true);
    if announce_repair {
        let path = path.to_owned();
        let announced = AtomicBool::new(false);
        builder.set_repair_callback(move |_| {
            if !announced.swap(true, Ordering::Relaxed) {
                tracing::warn!(path = %path.display(),
                    "the state file was not closed cleanly (crash or power loss); repairing it");
            }
        });
    }
    builder
}

/// Runs a redb open, turning its refusals (and its panics on damaged files) into ours.
fn engine_open(
    path: &Path,
    open: impl FnOnce() -> Result<Database, DatabaseError>,
) -> Result<Database, StoreError> {
    match panic::catch_unwind(AssertUnwindSafe(open)) {
        Ok(Ok(db)) => Ok(db),
        Ok(Err(DatabaseError::DatabaseAlreadyOpen)) => Err(StoreError::Locked {
            path: path.to_owned(),
        }),
        Ok(Err(DatabaseError::Storage(StorageError::Io(e))))
            if e.kind() == io::ErrorKind::InvalidData =>
        {
            Err(corrupt(
                path,
                "it is not a redb database, or its header is damaged".into(),
            ))
        }
        Ok(Err(e)) => Err(corrupt(
            path,
            format!("the database engine cannot open it: {e}"),
        )),
        Err(panic) => Err(corrupt(
            path,
            format!(
                "the database engine cannot open it ({}); it is probably truncated or damaged",
                panic_message(panic.as_ref())
            ),
        )),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rows {
    Decode,
    Skip,
}

/// Checks that `db` is a flowwarden store this agent understands, and with `Rows::Decode` that
/// its sessions and revocations all decode (the agent needs every one of them to resume).
/// Returns the next audit seq.
fn validate(path: &Path, db: &Database, rows: Rows) -> Result<u64, StoreError> {
    let unreadable = |what: &str, e: &dyn std::fmt::Display| {
        corrupt(path, format!("cannot read its {what}: {e}"))
    };
    let txn = db.begin_read().map_err(|e| unreadable("contents", &e))?;
    let meta = match txn.open_table(META) {
        Ok(meta) => meta,
        Err(TableError::TableDoesNotExist(_)) => {
            return Err(corrupt(
                path,
                "it is a redb database without flowwarden's meta table, not a flowwarden state \
                 file"
                    .into(),
            ));
        }
        Err(e) => return Err(unreadable("meta table", &e)),
    };
    let value = |key: &str| -> Result<Option<Vec<u8>>, StoreError> {
        let row = meta.get(key).map_err(|e| unreadable("meta table", &e))?;
        Ok(row.map(|v| v.value().to_vec()))
    };
    let version = value(META_SCHEMA_VERSION)?
        .ok_or_else(|| corrupt(path, "its meta table has no schema version".into()))?;
    let version = decode_u32(&version)
        .ok_or_else(|| corrupt(path, "its schema version is not a 4-byte integer".into()))?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.to_owned(),
            found: version,
            supported: SCHEMA_VERSION,
        });
    }
    if version != SCHEMA_VERSION {
        return Err(corrupt(
            path,
            format!("its schema version {version} is unknown"),
        ));
    }
    let next_seq = value(META_NEXT_AUDIT_SEQ)?
        .ok_or_else(|| corrupt(path, "its meta table has no next audit seq".into()))?;
    let next_seq = decode_u64(&next_seq)
        .ok_or_else(|| corrupt(path, "its next audit seq is not an 8-byte integer".into()))?;

    if rows == Rows::Decode {
        check_rows::<Session>(path, &txn, SESSIONS, "sessions")?;
        check_rows::<RevocationRecord>(path, &txn, REVOCATIONS, "revocations")?;
    }

    let audit = txn
        .open_table(AUDIT)
        .map_err(|e| unreadable("audit table", &e))?;
    let last = audit.last().map_err(|e| unreadable("audit table", &e))?;
    let last = last.map_or(0, |(key, _)| key.value());
    if last.checked_add(1) != Some(next_seq) {
        return Err(corrupt(
            path,
            format!(
                "its audit log ends at seq {last} but its meta table says the next seq is \
                 {next_seq}: the log was cut short or altered"
            ),
        ));
    }
    Ok(next_seq)
}

fn check_rows<T: DeserializeOwned>(
    path: &Path,
    txn: &redb::ReadTransaction,
    definition: redb::TableDefinition<u64, &[u8]>,
    table: &str,
) -> Result<(), StoreError> {
    let unreadable =
        |e: &dyn std::fmt::Display| corrupt(path, format!("cannot read its {table} table: {e}"));
    let rows = txn.open_table(definition).map_err(|e| unreadable(&e))?;
    for row in rows.iter().map_err(|e| unreadable(&e))? {
        let (key, value) = row.map_err(|e| unreadable(&e))?;
        if let Err(e) = serde_json::from_slice::<T>(value.value()) {
            return Err(corrupt(
                path,
                format!(
                    "row {:016x} of its {table} table does not decode: {e}",
                    key.value()
                ),
            ));
        }
    }
    Ok(())
}

fn staging_path(path: &Path) -> Result<PathBuf, StoreError> {
    let Some(name) = path.file_name() else {
        return Err(io_error("create", path)(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the state path names no file",
        )));
    };
    let mut name = name.to_os_string();
    name.push(".creating");
    Ok(path.with_file_name(name))
}

fn corrupt(path: &Path, detail: String) -> StoreError {
    StoreError::Corrupt {
        path: path.to_owned(),
        detail,
    }
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> StoreError {
    let path = path.to_owned();
    move |source| StoreError::Io {
        action,
        path,
        source,
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("it panicked")
}
