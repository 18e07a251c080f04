//! The status socket as a file: its directory, mode and group, a stale socket left by a dead
//! agent, and its removal when serving stops.

use std::{
    io,
    os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
};

use tokio::net::UnixListener;

use super::SocketOptions;

const SOCKET_MODE: u32 = 0o660;
const DIR_MODE: u32 = 0o750;

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("the socket path {} has no file name", path.display())]
    BadPath { path: PathBuf },
    #[error("creating the socket directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("setting mode {mode:o} and group {gid:?} on {}: {source}", path.display())]
    Permissions {
        path: PathBuf,
        mode: u32,
        gid: Option<u32>,
        #[source]
        source: io::Error,
    },
    #[error("{} exists and is not a socket; refusing to replace it", path.display())]
    NotASocket { path: PathBuf },
    #[error("another agent is already serving on {}", path.display())]
    AlreadyServing { path: PathBuf },
    #[error("checking whether {} is a stale socket: {source}", path.display())]
    Probe {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("removing the stale socket {}: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("binding the status socket {}: {source}", path.display())]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates the socket's directory if needed (mode 0750, group `read_group`), clears a stale
/// socket left by an agent that died, and binds the socket with mode 0660 and group
/// `read_group`. An existing directory is left as it is (it may be shared, like `/tmp`).
///
/// # Errors
///
/// [`SocketError::AlreadyServing`] when an agent answers on the path, and errors naming the
/// path for everything the filesystem refuses.
///
/// # Panics
///
/// Outside a Tokio runtime.
pub fn bind(opts: &SocketOptions) -> Result<UnixListener, SocketError> {
    let path = &opts.path;
    let Some(name) = path.file_name() else {
        return Err(SocketError::BadPath { path: path.clone() });
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    ensure_dir(dir, opts.read_group)?;
    clear_stale(path)?;

    // Bound under a temporary name and renamed into place once its mode and group are right,
    // so that the socket is never reachable with whatever the umask allowed.
    let tmp = dir.join(format!(
        ".{}.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let bind_err = |source| SocketError::Bind {
        path: path.clone(),
        source,
    };
    remove_if_present(&tmp).map_err(bind_err)?;
    let listener = std::os::unix::net::UnixListener::bind(&tmp).map_err(bind_err)?;
    let placed = set_mode_and_group(&tmp, SOCKET_MODE, opts.read_group)
        .and_then(|()| std::fs::rename(&tmp, path).map_err(bind_err))
        .and_then(|()| listener.set_nonblocking(true).map_err(bind_err))
        .and_then(|()| UnixListener::from_std(listener).map_err(bind_err));
    if placed.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    placed
}

fn ensure_dir(dir: &Path, group: Option<u32>) -> Result<(), SocketError> {
    let create_err = |source| SocketError::CreateDir {
        path: dir.to_owned(),
        source,
    };
    match std::fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => {
            warn_if_unreachable(dir, &meta, group);
            Ok(())
        }
        Ok(_) => Err(create_err(io::Error::from(io::ErrorKind::NotADirectory))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).map_err(create_err)?;
            }
            match std::fs::DirBuilder::new().mode(DIR_MODE).create(dir) {
                // Another process made it between the check and here: theirs to configure.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
                other => other.map_err(create_err)?,
            }
            // The umask may have taken bits away; set exactly what is meant.
            set_mode_and_group(dir, DIR_MODE, group)
        }
        Err(e) => Err(create_err(e)),
    }
}

fn warn_if_unreachable(dir: &Path, meta: &std::fs::Metadata, group: Option<u32>) {
    let mode = meta.permissions().mode();
    let others_enter = mode & 0o001 != 0;
    let group_enters = group.is_some_and(|g| meta.gid() == g && mode & 0o010 != 0);
    if group.is_some() && !others_enter && !group_enters {
        tracing::warn!(
            dir = %dir.display(),
            mode = format!("{:o}", mode & 0o7777),
            dir_gid = meta.gid(),
            read_gid = group,
            "members of the read group cannot reach the status socket through its directory"
        );
    }
}

fn set_mode_and_group(path: &Path, mode: u32, gid: Option<u32>) -> Result<(), SocketError> {
    let err = |source| SocketError::Permissions {
        path: path.to_owned(),
        mode,
        gid,
        source,
    };
    if gid.is_some() {
        std::os::unix::fs::chown(path, None, gid).map_err(err)?;
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)
}

/// Removes `path` if it is a socket nobody answers on; refuses anything else.
fn clear_stale(path: &Path) -> Result<(), SocketError> {
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(SocketError::Probe {
                path: path.to_owned(),
                source,
            });
        }
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(SocketError::NotASocket {
                path: path.to_owned(),
            });
        }
        Ok(_) => {}
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(SocketError::AlreadyServing {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
            tracing::info!(path = %path.display(), "removing a stale status socket");
            remove_if_present(path).map_err(|source| SocketError::RemoveStale {
                path: path.to_owned(),
                source,
            })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SocketError::Probe {
            path: path.to_owned(),
            source,
        }),
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Removes the socket file when serving stops, unless another agent has replaced it since.
pub(super) struct SocketFile {
    path: PathBuf,
    identity: Option<(u64, u64)>,
}

impl SocketFile {
    pub(super) fn record(path: &Path) -> Self {
        let identity = std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        Self {
            path: path.to_owned(),
            identity,
        }
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let now = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if now.is_some() && now == self.identity {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}
