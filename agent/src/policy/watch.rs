//! Reload: the policy in force behind an atomic swap, explicit reloads, and a polling watcher
//! that notices edits. An invalid policy never replaces the last good one.

use std::{
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError, RwLock, mpsc},
    thread::JoinHandle,
    time::{Duration, SystemTime},
};

use super::{Fnv64, Policy, PolicyError, fingerprint, parse_policy, policy_paths, read_files};

/// The policy in force for one directory. Readers take an `Arc` and keep a consistent policy
/// for as long as they hold it, whatever reloads happen meanwhile.
#[derive(Debug)]
pub struct PolicyHandle {
    dir: PathBuf,
    current: RwLock<Arc<Policy>>,
    /// One reload at a time, so that an older read of the files never replaces a newer one.
    reloading: Mutex<()>,
}

/// What a reload did.
#[derive(Debug, Clone)]
pub enum Reload {
    /// The files say what the policy in force says.
    Unchanged,
    /// The new policy is in force.
    Changed(Arc<Policy>),
}

impl PolicyHandle {
    /// Loads the policy of `dir`, which must be valid: there is no last good policy yet.
    ///
    /// # Errors
    /// As [`super::load_policy`].
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, PolicyError> {
        let dir = dir.into();
        let policy = super::load_policy(&dir)?;
        Ok(Self {
            dir,
            current: RwLock::new(Arc::new(policy)),
            reloading: Mutex::new(()),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn current(&self) -> Arc<Policy> {
        // A panic elsewhere while holding the lock cannot leave a half-swapped Arc behind.
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the directory again and puts its policy in force if it differs and is valid.
    ///
    /// # Errors
    /// [`PolicyError::Rejected`]: the directory is unreadable or invalid; the policy in force
    /// stays.
    pub fn reload(&self) -> Result<Reload, PolicyError> {
        let files = read_files(&self.dir).map_err(|e| self.rejected(e))?;
        let fp = fingerprint(files.iter().map(|(p, t)| (p.as_path(), t.as_str())));
        self.install(&files, &fp)
    }

    /// Parses `files` (whose fingerprint is `fp`) and swaps them in unless they are what is in
    /// force already.
    fn install(&self, files: &[(PathBuf, String)], fp: &str) -> Result<Reload, PolicyError> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.current().fingerprint == fp {
            return Ok(Reload::Unchanged);
        }
        let policy = parse_policy(files.iter().map(|(p, t)| (p.as_path(), t.as_str())))
            .map_err(|e| self.rejected(e))?;
        let policy = Arc::new(policy);
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&policy);
        Ok(Reload::Changed(policy))
    }

    fn rejected(&self, error: PolicyError) -> PolicyError {
        PolicyError::Rejected {
            dir: self.dir.clone(),
            in_force: self.current().fingerprint.clone(),
            error: Box::new(error),
        }
    }
}

/// Stops the watcher when dropped (after the poll under way, if any).
#[derive(Debug)]
pub struct WatchGuard {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for WatchGuard {
    fn drop(&mut self) {
        // Dropping the sender wakes the thread at once.
        self.stop.take();
        if let Some(thread) = self.thread.take()
            && thread.thread().id() != std::thread::current().id()
        {
            let _ = thread.join();
        }
    }
}

/// Polls the handle's directory every `interval` and reloads when files change, are added or
/// are removed, once the change has held for one interval (so within about two intervals).
/// `on_change` gets each new policy once it is in force, and each invalid state once (not on
/// every poll); the last good policy stays in force meanwhile.
///
/// # Panics
/// If the OS cannot start a thread.
pub fn watch(
    handle: Arc<PolicyHandle>,
    interval: Duration,
    on_change: impl Fn(Result<Arc<Policy>, PolicyError>) + Send + 'static,
) -> WatchGuard {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("policy-watch".into())
        .spawn(move || {
            let mut watcher = Watcher::default();
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(interval) {
                watcher.poll(&handle, &on_change);
            }
        })
        .expect("the OS starts the policy watcher thread");
    WatchGuard {
        stop: Some(stop),
        thread: Some(thread),
    }
}

#[derive(Default)]
struct Watcher {
    /// Names and metadata of the files at the last look at their contents. `None` forces a
    /// look (the first poll, which also catches edits made between the handle's load and the
    /// watcher's start).
    seen: Option<u64>,
    /// A new state (content fingerprint, or read error) seen once and not acted on yet.
    pending: Option<String>,
    /// The bad state reported last, to report each one once.
    reported: Option<String>,
}

/// What the directory holds: its files and their fingerprint, or why it cannot be read.
type Observed = Result<(Vec<(PathBuf, String)>, String), PolicyError>;

impl Watcher {
    /// A new state is acted on when two polls in a row see it: a file being rewritten in
    /// place is empty or half-written for a moment, and an empty file is a valid policy that
    /// would end every session.
    fn poll(
        &mut self,
        handle: &PolicyHandle,
        on_change: &impl Fn(Result<Arc<Policy>, PolicyError>),
    ) {
        let Some(observed) = self.look(handle.dir()) else {
            return;
        };
        let key = match &observed {
            Ok((_, fp)) if *fp == handle.current().fingerprint => {
                self.pending = None;
                self.reported = None;
                return;
            }
            Ok((_, fp)) => fp.clone(),
            Err(e) => e.to_string(),
        };
        if self.reported.as_ref() == Some(&key) {
            self.pending = None;
            return;
        }
        if self.pending.as_ref() != Some(&key) {
            self.pending = Some(key);
            return;
        }
        self.pending = None;
        let installed = observed.and_then(|(files, fp)| handle.install(&files, &fp));
        match installed {
            Ok(Reload::Unchanged) => self.reported = None,
            Ok(Reload::Changed(policy)) => {
                self.reported = None;
                on_change(Ok(policy));
            }
            Err(e) => {
                self.reported = Some(key);
                on_change(Err(match e {
                    e @ PolicyError::Rejected { .. } => e,
                    e => handle.rejected(e),
                }));
            }
        }
    }

    /// The directory's state, or `None` when its metadata says nothing changed.
    fn look(&mut self, dir: &Path) -> Option<Observed> {
        let stat = match stat_fingerprint(dir) {
            Ok(stat) => stat,
            Err(e) => {
                self.seen = None;
                return Some(Err(e));
            }
        };
        // A file written within the timestamp granularity may change again without its
        // metadata showing it: while any is that recent, contents are read on every poll.
        if self.seen == Some(stat.hash) && !stat.racy && self.pending.is_none() {
            return None;
        }
        self.seen = Some(stat.hash);
        match read_files(dir) {
            Ok(files) => {
                let fp = fingerprint(files.iter().map(|(p, t)| (p.as_path(), t.as_str())));
                Some(Ok((files, fp)))
            }
            Err(e) => {
                self.seen = None;
                Some(Err(e))
            }
        }
    }
}

struct Stat {
    hash: u64,
    racy: bool,
}

/// Names, sizes, inodes and change times of the policy files: cheap, and any edit, rename
/// over, addition or removal changes it. `ctime` catches tools that restore `mtime`.
fn stat_fingerprint(dir: &Path) -> Result<Stat, PolicyError> {
    use std::hash::Hasher;

    const RACY: Duration = Duration::from_secs(2);
    let now = SystemTime::now();
    let mut h = Fnv64::default();
    let mut racy = false;
    for path in policy_paths(dir)? {
        let meta = std::fs::metadata(&path).map_err(|source| PolicyError::ReadFile {
            path: path.clone(),
            source,
        })?;
        h.write(path.as_os_str().as_encoded_bytes());
        for n in [
            meta.len(),
            meta.ino(),
            meta.mtime() as u64,
            meta.mtime_nsec() as u64,
            meta.ctime() as u64,
            meta.ctime_nsec() as u64,
        ] {
            h.write(&n.to_le_bytes());
        }
        let changed =
            std::time::UNIX_EPOCH + Duration::new(meta.ctime().max(meta.mtime()).max(0) as u64, 0);
        racy |= now.duration_since(changed).map_or(true, |age| age < RACY);
    }
    Ok(Stat {
        hash: h.finish(),
        racy,
    })
}

#[cfg(test)]
mod tests;
