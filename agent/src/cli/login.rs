//! `flowwarden login`: present an identity provider token (or a reconnect token) to an agent,
//! and keep the session and its reconnect seed in the user's cache directory (mode 0600).

use std::{
    io::{IsTerminal as _, Read as _},
    os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::{
    output::{self, outln},
    table::duration_ms,
};
use crate::{
    admission::{
        client::{Client, Trust, normalize_fingerprint},
        wire::{AdmissionResponse, GrantedResource},
    },
    auth::reconnect,
    sessions::model::{SessionId, now_ms},
};

/// Tokens are read from at most this many bytes (the agent refuses more than 16 KiB).
const MAX_TOKEN_READ: u64 = 64 * 1024;

#[derive(Debug, clap::Args)]
pub struct LoginArgs {
    /// The agent's admission endpoint, HOST:PORT.
    #[arg(long)]
    pub agent: String,
    /// Read the token from this file.
    #[arg(long, conflicts_with_all = ["token_env", "reconnect"])]
    pub token_file: Option<PathBuf>,
    /// Read the token from this environment variable.
    #[arg(long, conflicts_with = "reconnect")]
    pub token_env: Option<String>,
    /// Trust the agent's certificate by this SHA-256 fingerprint (printed by the agent).
    #[arg(long, conflicts_with = "ca_file")]
    pub fingerprint: Option<String>,
    /// Trust the agent's certificate through this CA bundle (PEM).
    #[arg(long)]
    pub ca_file: Option<PathBuf>,
    /// Re-admit the cached session with a reconnect token instead of an IdP token.
    #[arg(long)]
    pub reconnect: bool,
    /// Print the agent's answer as JSON (without the reconnect seed, which stays in the cache
    /// file); errors too are JSON then, on standard error.
    #[arg(long)]
    pub json: bool,
}

/// What the client keeps between `login` and `login --reconnect`.
#[derive(Debug, Serialize, Deserialize)]
struct Cached {
    agent: String,
    session: String,
    user: String,
    source: String,
    expires_at_ms: u64,
    grants: Vec<String>,
    fingerprint: Option<String>,
    ca_file: Option<PathBuf>,
    reconnect_seed: Option<String>,
    reconnect_counter: u64,
}

pub fn run(args: LoginArgs) -> anyhow::Result<()> {
    let path = cache_path(&args.agent)?;
    if args.reconnect {
        return reconnect_cached(&args, &path);
    }
    let trust = trust(&args)?;
    let token = read_token(&args)?;
    let client = Client::new(&args.agent, &trust)?;
    let answer = client.login(&token)?;
    let cached = Cached {
        agent: args.agent.clone(),
        session: answer.session.clone(),
        user: answer.user.clone(),
        source: answer.source.clone(),
        expires_at_ms: answer.expires_at_ms,
        grants: answer.grants.iter().map(|g| g.resource.clone()).collect(),
        fingerprint: args.fingerprint.clone(),
        ca_file: args.ca_file.clone(),
        reconnect_seed: answer.reconnect.as_ref().map(|r| r.seed.clone()),
        reconnect_counter: 0,
    };
    save(&path, &cached)?;
    report(&answer, args.json, &path)
}

fn trust(args: &LoginArgs) -> anyhow::Result<Trust> {
    match (&args.fingerprint, &args.ca_file) {
        (Some(fp), None) => Ok(Trust::Fingerprint(normalize_fingerprint(fp)?)),
        (None, Some(ca)) => Ok(Trust::CaFile(ca.clone())),
        _ => bail!(
            "say how to trust the agent: --fingerprint SHA256 (the agent logs it at start) \
             or --ca-file PEM"
        ),
    }
}

fn read_token(args: &LoginArgs) -> anyhow::Result<String> {
    let raw = if let Some(file) = &args.token_file {
        let mut s = String::new();
        std::fs::File::open(file)
            .with_context(|| format!("opening the token file {}", file.display()))?
            .take(MAX_TOKEN_READ)
            .read_to_string(&mut s)
            .with_context(|| format!("reading the token file {}", file.display()))?;
        s
    } else if let Some(var) = &args.token_env {
        std::env::var(var).with_context(|| format!("environment variable {var} is not set"))?
    } else if !std::io::stdin().is_terminal() {
        let mut s = String::new();
        std::io::stdin()
            .take(MAX_TOKEN_READ)
            .read_to_string(&mut s)
            .context("reading the token from standard input")?;
        s
    } else {
        bail!("no token: use --token-file FILE, --token-env VAR, or pipe it on standard input");
    };
    let token = raw.trim().to_owned();
    if token.is_empty() {
        bail!("the token is empty");
    }
    Ok(token)
}

fn reconnect_cached(args: &LoginArgs, path: &Path) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "no cached session for {} at {}: log in with a token first",
            args.agent,
            path.display()
        )
    })?;
    let mut cached: Cached =
        serde_json::from_str(&text).with_context(|| format!("reading {}", path.display()))?;
    let Some(seed) = cached.reconnect_seed.clone() else {
        bail!(
            "session {} was admitted without reconnect: log in again",
            cached.session
        );
    };
    let trust = match (
        &args.fingerprint,
        &args.ca_file,
        &cached.fingerprint,
        &cached.ca_file,
    ) {
        (Some(fp), _, _, _) | (None, None, Some(fp), _) => {
            Trust::Fingerprint(normalize_fingerprint(fp)?)
        }
        (None, Some(ca), _, _) | (None, None, None, Some(ca)) => Trust::CaFile(ca.clone()),
        _ => bail!("the cached session has no trust setting: pass --fingerprint or --ca-file"),
    };
    let session: SessionId = cached.session.parse()?;
    // The counter only needs to grow: milliseconds keep it growing across copies of the cache.
    let counter = (cached.reconnect_counter + 1).max(now_ms());
    let token = reconnect::mint(&seed, session, counter, now_ms() / 1000)?;
    let answer = Client::new(&args.agent, &trust)?.reconnect(&token)?;
    cached.reconnect_counter = counter;
    cached.source = answer.source.clone();
    save(path, &cached)?;
    report(&answer, args.json, path)
}

/// What `login --json` prints: the agent's answer without the reconnect seed, which is a
/// credential and stays in the cache file alone.
#[derive(Debug, Serialize)]
struct Report<'a> {
    session: &'a str,
    user: &'a str,
    source: &'a str,
    expires_at_ms: u64,
    grants: &'a [GrantedResource],
    /// Present when the session may reconnect.
    #[serde(skip_serializing_if = "Option::is_none")]
    reconnect: Option<ReconnectReport>,
    /// The cache file that holds the session (and the seed).
    saved_to: &'a Path,
}

#[derive(Debug, Serialize)]
struct ReconnectReport {
    token_lifetime_secs: u64,
}

impl<'a> Report<'a> {
    fn of(answer: &'a AdmissionResponse, path: &'a Path) -> Self {
        Self {
            session: &answer.session,
            user: &answer.user,
            source: &answer.source,
            expires_at_ms: answer.expires_at_ms,
            grants: &answer.grants,
            reconnect: answer.reconnect.as_ref().map(|r| ReconnectReport {
                token_lifetime_secs: r.token_lifetime_secs,
            }),
            saved_to: path,
        }
    }
}

fn report(answer: &AdmissionResponse, json: bool, path: &Path) -> anyhow::Result<()> {
    if json {
        return output::json(&Report::of(answer, path));
    }
    let grants: Vec<String> = answer
        .grants
        .iter()
        .map(|g| format!("{} (rule {})", g.resource, g.rule))
        .collect();
    outln!(
        "session {} for {} from {}",
        answer.session,
        answer.user,
        answer.source
    )?;
    outln!("granted: {}", grants.join(", "))?;
    outln!(
        "expires in {}{}",
        duration_ms(answer.expires_at_ms.saturating_sub(now_ms())),
        if answer.reconnect.is_some() {
            "; reconnect enabled"
        } else {
            ""
        }
    )?;
    outln!("saved to {}", path.display())
}

/// `$XDG_CACHE_HOME/flowwarden/sessions/<agent>.json`, or under `~/.cache`.
fn cache_path(agent: &str) -> anyhow::Result<PathBuf> {
    let base = match std::env::var_os("XDG_CACHE_HOME") {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(
            std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?,
        )
        .join(".cache"),
    };
    let name: String = agent
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Ok(base
        .join("flowwarden")
        .join("sessions")
        .join(format!("{name}.json")))
}

fn save(path: &Path, cached: &Cached) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let tmp = path.with_extension("json.tmp");
    {
        use std::io::Write as _;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("writing {}", tmp.display()))?;
        f.write_all(serde_json::to_string_pretty(cached)?.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::wire::ReconnectMaterial;

    #[test]
    fn the_json_report_never_carries_the_reconnect_seed() {
        let seed = "5eed".repeat(16);
        let answer = AdmissionResponse {
            session: "5e55100000000001".into(),
            user: "alice@corp.example".into(),
            source: "10.0.0.7".into(),
            expires_at_ms: 1,
            grants: vec![GrantedResource {
                resource: "ssh".into(),
                rule: "ops-ssh".into(),
            }],
            reconnect: Some(ReconnectMaterial {
                seed: seed.clone(),
                token_lifetime_secs: 60,
            }),
        };
        let text = serde_json::to_string(&Report::of(&answer, Path::new("/c/s.json"))).unwrap();
        assert!(!text.contains(&seed) && !text.contains("seed"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            v["reconnect"],
            serde_json::json!({"token_lifetime_secs": 60})
        );
        assert_eq!(
            (v["session"].as_str(), v["saved_to"].as_str()),
            (Some("5e55100000000001"), Some("/c/s.json"))
        );
    }
}
