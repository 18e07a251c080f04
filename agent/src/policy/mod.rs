//! Policy files: the protected resources and the rules that grant them to identities, loaded
//! and validated as one policy (line-accurate errors), evaluated, explained and reloaded.

mod duration;
mod evaluate;
mod explain;
mod file;
mod resource;
mod rules;
mod watch;

use std::{
    hash::Hasher,
    path::{Path, PathBuf},
};

pub use duration::{format_duration, parse_duration};
pub use evaluate::{Applicable, DEFAULT_SETTINGS, Decision};
pub use explain::Explanation;
pub use resource::{Protocol, Resource, ResourceTable, load_resources, parse_resources};
pub use rules::{ClaimRequirement, DeviceFailure, DeviceRequirements, Rule, SessionOverrides};
pub use watch::{PolicyHandle, Reload, WatchGuard, watch};

use file::Source;

#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("cannot read policy directory {path}: {source}")]
    ReadDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read policy file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// `location` is `file:line` when the line is known.
    #[error("{location}: {field}: {problem}")]
    Invalid {
        location: String,
        field: String,
        problem: String,
    },
    /// A reload found `dir` unreadable or invalid; the policy with `in_force` (its
    /// fingerprint) keeps being enforced.
    #[error("{error}; the last good policy ({in_force}) stays in force")]
    Rejected {
        dir: PathBuf,
        in_force: String,
        error: Box<PolicyError>,
    },
}

/// Every resource and rule of the policy directory, validated and indexed for evaluation.
#[derive(Debug, Clone)]
pub struct Policy {
    pub resources: ResourceTable,
    /// In file order, then in order within each file: the first granting rule names a grant.
    pub rules: Vec<Rule>,
    pub files: Vec<PathBuf>,
    /// 16 hex digits over the files' names and contents: equal policies, equal fingerprints.
    pub fingerprint: String,
    who: evaluate::WhoIndex,
}

/// Reads and validates every `*.toml` file of `dir` in name order. An empty directory is a
/// valid policy that grants nothing.
///
/// # Errors
/// The directory (its path is in the error) or a file cannot be read, or a file is invalid.
pub fn load_policy(dir: &Path) -> Result<Policy, PolicyError> {
    let files = read_files(dir)?;
    parse_policy(files.iter().map(|(p, t)| (p.as_path(), t.as_str())))
}

/// Parses and validates several policy files taken together, in the order given: resources
/// may be granted by rules of any file.
///
/// # Errors
/// The first problem found, as `file:line: field: problem`.
pub fn parse_policy<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Policy, PolicyError> {
    let sources: Vec<Source<'a>> = files
        .into_iter()
        .map(|(path, text)| Source { path, text })
        .collect();
    let mut parsed = Vec::with_capacity(sources.len());
    for src in &sources {
        parsed.push((*src, src.parse()?));
    }
    let (resource_defs, rule_defs): (Vec<_>, Vec<_>) = parsed
        .into_iter()
        .map(|(src, f)| ((src, f.resource), (src, f.rule)))
        .unzip();
    let resources = resource::compile_resources(resource_defs)?;
    let rules = rules::compile_rules(rule_defs, &resources)?;
    let who = evaluate::WhoIndex::build(&rules);
    Ok(Policy {
        resources,
        rules,
        files: sources.iter().map(|s| s.path.to_owned()).collect(),
        fingerprint: fingerprint(sources.iter().map(|s| (s.path, s.text))),
        who,
    })
}

impl Policy {
    pub fn rule(&self, name: &str) -> Option<&Rule> {
        self.rules.iter().find(|r| r.name == name)
    }
}

/// The policy files of `dir`: `*.toml`, sorted by name. Names starting with `.` are skipped:
/// editors keep lock and swap files there (`.#example.toml`), and a half-written file must
/// not be read as policy.
fn policy_paths(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|source| PolicyError::ReadDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PolicyError::ReadDir {
            path: dir.to_owned(),
            source,
        })?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !name.starts_with('.') && name.ends_with(".toml") {
            paths.push(entry.path());
        }
    }
    paths.sort();
    Ok(paths)
}

fn read_files(dir: &Path) -> Result<Vec<(PathBuf, String)>, PolicyError> {
    policy_paths(dir)?
        .into_iter()
        .map(|path| match std::fs::read_to_string(&path) {
            Ok(text) => Ok((path, text)),
            Err(source) => Err(PolicyError::ReadFile { path, source }),
        })
        .collect()
}

/// FNV-1a (64 bits) over the files sorted by file name: stable across runs and builds (unlike
/// std's hasher), and independent of how the directory was spelled.
fn fingerprint<'a>(files: impl IntoIterator<Item = (&'a Path, &'a str)>) -> String {
    let mut files: Vec<(&[u8], &str)> = files
        .into_iter()
        .map(|(path, text)| {
            let name = path.file_name().unwrap_or(path.as_os_str());
            (name.as_encoded_bytes(), text)
        })
        .collect();
    files.sort();
    let mut h = Fnv64::default();
    for (name, text) in files {
        // Lengths first, so that moving bytes from one file or name to the next changes it.
        h.write(&(name.len() as u64).to_le_bytes());
        h.write(name);
        h.write(&(text.len() as u64).to_le_bytes());
        h.write(text.as_bytes());
    }
    format!("{:016x}", h.finish())
}

/// FNV-1a, 64 bits: the fingerprint, and the hasher of the evaluation index (short keys,
/// from verified tokens and the operator's own files).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv64 {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
pub(crate) mod testdir {
    //! Throwaway policy directories for tests, removed on drop.

    use std::{
        path::{Path, PathBuf},
        sync::atomic::{AtomicU32, Ordering},
    };

    pub struct TestDir(pub PathBuf);

    impl TestDir {
        pub fn new() -> Self {
            static NEXT: AtomicU32 = AtomicU32::new(0);
            let dir = std::env::temp_dir().join(format!(
                "fw-policy-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).expect("creating a test directory");
            Self(dir)
        }

        pub fn path(&self) -> &Path {
            &self.0
        }

        pub fn write(&self, name: &str, text: &str) {
            std::fs::write(self.0.join(name), text).expect("writing a test policy file");
        }
    }

    impl Drop for TestDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

#[cfg(test)]
mod tests;
