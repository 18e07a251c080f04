//! Policy bundles: built from a directory by `fleet policy push` (after the same validation
//! as `policy check`), and on each agent validated again, swapped into the policy directory
//! in one atomic rename, and put in force by the same reload the status socket runs.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    sync::{Arc, atomic::Ordering},
};

use serde_json::Value;

use super::{FleetError, command::PolicyBundle, config::PolicySource, state::FleetState};
use crate::{
    api::{
        core::Core,
        jsonrpc::Call,
        peer::{Access, Peer},
        transport::{Caller, Handler as _, Reply},
    },
    store::{Write, fleet as stored},
};

/// A bundle file name: `name.toml`, nothing that could leave the directory.
fn valid_name(name: &str) -> bool {
    name.strip_suffix(".toml").is_some_and(|stem| {
        !stem.is_empty()
            && stem
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    })
}

/// Reads and validates `dir` (as `policy check` does) into a bundle of `version`.
///
/// # Errors
/// The directory is unreadable, or invalid (the policy error, with its file and line).
pub fn bundle(dir: &Path, version: u64) -> Result<PolicyBundle, FleetError> {
    crate::policy::load_policy(dir)?;
    let mut files = BTreeMap::new();
    let entries = std::fs::read_dir(dir).map_err(|source| FleetError::Read {
        what: "the policy directory",
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| FleetError::Read {
            what: "the policy directory",
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".toml") {
            continue;
        }
        if !valid_name(&name) {
            return Err(FleetError::Config(format!(
                "policy file {name:?}: bundle file names are letters, digits, - and _ with .toml"
            )));
        }
        let path = entry.path();
        let text = std::fs::read_to_string(&path).map_err(|source| FleetError::Read {
            what: "a policy file",
            path,
            source,
        })?;
        files.insert(name, text);
    }
    Ok(PolicyBundle { version, files })
}

/// Validates and (with `policy = "fleet"`) applies a bundle. Answers the outcome and the
/// writes that record the version in force.
pub async fn apply(
    core: &Arc<Core>,
    state: &FleetState,
    source: PolicySource,
    state_dir: &Path,
    bundle: &PolicyBundle,
) -> (String, Vec<Write>) {
    let in_force = state.policy_version.load(Ordering::Relaxed);
    if bundle.version <= in_force {
        return (
            format!(
                "refused: version {} is not newer than version {in_force} in force",
                bundle.version
            ),
            Vec::new(),
        );
    }
    let staging = staging_dir(state_dir, bundle.version);
    if let Err(e) = stage(&staging, bundle) {
        let _ = std::fs::remove_dir_all(&staging);
        return (format!("refused: {e}"), Vec::new());
    }
    if let Err(e) = crate::policy::load_policy(&staging) {
        let _ = std::fs::remove_dir_all(&staging);
        return (
            format!("refused: invalid policy, the policy in force stays: {e}"),
            Vec::new(),
        );
    }
    if source == PolicySource::Local {
        let _ = std::fs::remove_dir_all(&staging);
        return (
            format!(
                "valid, not applied: this host keeps its local policy (policy = \"local\"); version {}",
                bundle.version
            ),
            Vec::new(),
        );
    }
    let dir = core.policy.dir().to_owned();
    if let Err(e) = exchange(&staging, &dir) {
        let _ = std::fs::remove_dir_all(&staging);
        return (
            format!("refused: cannot swap it into {}: {e}", dir.display()),
            Vec::new(),
        );
    }
    // The old policy is now at the staging path.
    let _ = std::fs::remove_dir_all(&staging);
    let call = Call {
        id: Value::from(0),
        method: "policy.reload".into(),
        params: Value::Object(Default::default()),
    };
    let caller = Caller {
        peer: Peer {
            pid: i32::try_from(std::process::id()).unwrap_or(0),
            uid: 0,
            gid: 0,
            groups: Vec::new(),
        },
        access: Access::Admin,
    };
    let outcome = match core.handle(call, caller).await {
        Ok(Reply::Value(v)) => format!("version {} in force: {v}", bundle.version),
        Ok(_) => format!("version {} in force", bundle.version),
        Err(e) => format!(
            "version {} written, reload failed: {}",
            bundle.version, e.message
        ),
    };
    state
        .policy_version
        .store(bundle.version, Ordering::Relaxed);
    (
        outcome,
        vec![stored::put(stored::POLICY_VERSION, &bundle.version)],
    )
}

fn stage(staging: &Path, bundle: &PolicyBundle) -> Result<(), String> {
    let _ = std::fs::remove_dir_all(staging);
    std::fs::create_dir_all(staging)
        .map_err(|e| format!("cannot create {}: {e}", staging.display()))?;
    for (name, text) in &bundle.files {
        if !valid_name(name) {
            return Err(format!("file name {name:?} is not a plain name.toml"));
        }
        std::fs::write(staging.join(name), text)
            .map_err(|e| format!("cannot write {name}: {e}"))?;
    }
    Ok(())
}

/// Swaps two directories in one step (`renameat2(RENAME_EXCHANGE)`): the policy watcher
/// sees the old policy or the new one, never a mix.
fn exchange(a: &Path, b: &Path) -> Result<(), std::io::Error> {
    use std::os::unix::ffi::OsStrExt as _;
    let cstr = |p: &Path| -> Result<std::ffi::CString, std::io::Error> {
        std::ffi::CString::new(p.as_os_str().as_bytes())
            .map_err(|_| std::io::Error::other("a path with a NUL byte"))
    };
    let (ca, cb) = (cstr(a)?, cstr(b)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive the call, and
    // renameat2 does not keep them.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            ca.as_ptr(),
            libc::AT_FDCWD,
            cb.as_ptr(),
            libc::RENAME_EXCHANGE,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Where the state directory keeps a bundle while it is checked.
pub fn staging_dir(state_dir: &Path, version: u64) -> PathBuf {
    state_dir.join(format!("fleet-policy-{version}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundle_names_cannot_leave_the_directory() {
        for good in ["a.toml", "ssh-rules_2.toml"] {
            assert!(valid_name(good), "{good}");
        }
        for bad in [
            "../a.toml",
            "a/b.toml",
            ".toml",
            "a.txt",
            ".hidden.toml",
            "a b.toml",
        ] {
            assert!(!valid_name(bad), "{bad}");
        }
    }

    #[test]
    fn exchange_swaps_two_directories() {
        let root = std::env::temp_dir().join(format!("fw-exchange-{}", std::process::id()));
        let (a, b) = (root.join("a"), root.join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("new.toml"), "").unwrap();
        std::fs::write(b.join("old.toml"), "").unwrap();
        exchange(&a, &b).unwrap();
        assert!(b.join("new.toml").exists() && a.join("old.toml").exists());
        std::fs::remove_dir_all(root).unwrap();
    }
}
