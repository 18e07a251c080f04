//! `flowwarden lock`: add, list, show and remove locks that keep a user, group, device,
//! source, session or token out until removed or expired.

use anyhow::bail;

use super::{
    output::{self, outln},
    socket::{SocketArg, fail},
    table::{self, ago, alert, until},
};
use crate::{
    locks::{
        LockId, LockState, LockTarget, NewLock,
        wire::{LockFilter, LockView},
    },
    policy::parse_duration,
    sessions::model::{SessionId, now_ms},
};

/// Exactly one target.
#[derive(Debug, Clone, clap::Args)]
#[group(required = true, multiple = false)]
pub struct TargetArgs {
    /// A user: email (case-insensitive) or subject.
    #[arg(long, value_name = "EMAIL")]
    user: Option<String>,
    /// One identity: issuer and subject, exactly.
    #[arg(long, num_args = 2, value_names = ["ISS", "SUB"])]
    subject: Option<Vec<String>>,
    /// Everyone in this group (the token's groups claim).
    #[arg(long, value_name = "G")]
    group: Option<String>,
    /// This device id (the device claim the policy reads).
    #[arg(long, value_name = "ID")]
    device: Option<String>,
    /// Every admission from this address or prefix (e.g. 10.0.0.0/24).
    #[arg(long, value_name = "PREFIX")]
    source: Option<String>,
    /// One session (and its reconnects).
    #[arg(long, value_name = "ID")]
    session: Option<SessionId>,
    /// One token, by the SHA-256 `sessions show` prints.
    #[arg(long, value_name = "SHA256")]
    token: Option<String>,
}

impl TargetArgs {
    pub(super) fn target(self) -> anyhow::Result<LockTarget> {
        Ok(match self {
            Self { user: Some(u), .. } => LockTarget::User(u),
            Self {
                subject: Some(s), ..
            } => match <[String; 2]>::try_from(s) {
                Ok([iss, sub]) => LockTarget::Subject { iss, sub },
                Err(_) => bail!("--subject takes two values: ISS SUB"),
            },
            Self { group: Some(g), .. } => LockTarget::Group(g),
            Self {
                device: Some(d), ..
            } => LockTarget::Device(d),
            Self {
                source: Some(p), ..
            } => LockTarget::Source(p),
            Self {
                session: Some(id), ..
            } => LockTarget::Session(id),
            Self { token: Some(t), .. } => LockTarget::Token(t),
            _ => bail!(
                "say what to lock: one of --user, --subject, --group, --device, --source, --session, --token"
            ),
        })
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum LockCommand {
    /// Lock a target out: its live sessions end now, its logins are refused `locked`.
    Add {
        #[command(flatten)]
        target: TargetArgs,
        /// How long the lock holds (e.g. 90s, 15m, 2h, 7d); until removed when absent.
        #[arg(long, value_parser = parse_ttl)]
        ttl: Option<u64>,
        /// Why, for the audit log and `lock show`.
        #[arg(long)]
        reason: Option<String>,
        /// Also show the reason to the refused client (it always sees the lock id).
        #[arg(long, requires = "reason")]
        show_reason: bool,
        #[arg(long)]
        json: bool,
    },
    /// Every lock, expired ones included (listed as expired).
    List {
        /// Only locks in force.
        #[arg(long)]
        active: bool,
        #[arg(long)]
        json: bool,
    },
    /// One lock.
    Show {
        id: LockId,
        #[arg(long)]
        json: bool,
    },
    /// Remove a lock: what it refused may log in again.
    Remove {
        id: LockId,
        #[arg(long)]
        json: bool,
    },
}

pub(super) fn parse_ttl(text: &str) -> Result<u64, String> {
    match parse_duration(text) {
        Some(0) => Err("a TTL of 0 would expire at once: give e.g. 15m or 2h".into()),
        Some(secs) => Ok(secs),
        None => Err(format!(
            "{text:?} is not a duration: write e.g. 90s, 15m, 2h, 7d or 1h30m"
        )),
    }
}

impl LockCommand {
    pub fn json(&self) -> bool {
        match self {
            Self::Add { json, .. }
            | Self::List { json, .. }
            | Self::Show { json, .. }
            | Self::Remove { json, .. } => *json,
        }
    }
}

pub fn run(socket: &SocketArg, command: LockCommand) -> anyhow::Result<()> {
    match command {
        LockCommand::Add {
            target,
            ttl,
            reason,
            show_reason,
            json,
        } => {
            let new = NewLock {
                target: target.target()?,
                ttl_secs: ttl,
                reason,
                show_reason,
                on_behalf_of: None,
            };
            let added = socket.connect()?.lock_add(&new).map_err(fail)?;
            if json {
                return output::json(&added);
            }
            outln!("added {} on {}", added.lock.id, added.lock.target)?;
            outln!(
                "ended {} live session(s), {} flow(s) cut",
                added.sessions_cut,
                added.flows_cut
            )?;
            for t in &added.terminated {
                outln!("  {} ({} from {})", t.id, t.user, t.source)?;
            }
            Ok(())
        }
        LockCommand::List { active, json } => {
            let list = socket
                .connect()?
                .lock_list(&LockFilter { active })
                .map_err(fail)?;
            if json {
                return output::json(&list);
            }
            print_list(&list, now_ms())
        }
        LockCommand::Show { id, json } => {
            let l = socket.connect()?.lock_show(id).map_err(fail)?;
            if json {
                return output::json(&l);
            }
            show(&l, now_ms())
        }
        LockCommand::Remove { id, json } => {
            let removed = socket.connect()?.lock_remove(id).map_err(fail)?;
            if json {
                return output::json(&removed);
            }
            outln!(
                "removed {} on {}",
                removed.removed.id,
                removed.removed.target
            )
        }
    }
}

fn state_cell(l: &LockView) -> String {
    match l.state {
        LockState::Active => alert("active"),
        LockState::Expired => "expired".into(),
    }
}

fn expiry(l: &LockView, now: u64) -> String {
    match (l.state, l.expires_at_ms) {
        (_, None) => "until removed".into(),
        (LockState::Active, Some(at)) => until(at, now),
        (LockState::Expired, Some(at)) => format!("{} ago", ago(at, now)),
    }
}

fn row(l: &LockView, now: u64) -> Vec<String> {
    vec![
        l.id.to_string(),
        l.target.to_string(),
        state_cell(l),
        expiry(l, now),
        l.by.clone(),
        l.reason.clone().unwrap_or_default(),
    ]
}

fn print_list(list: &[LockView], now: u64) -> anyhow::Result<()> {
    if list.is_empty() {
        return outln!("no locks");
    }
    let rows: Vec<Vec<String>> = list.iter().map(|l| row(l, now)).collect();
    table::print(
        &["LOCK", "TARGET", "STATE", "EXPIRES", "BY", "REASON"],
        &rows,
    )
}

fn show(l: &LockView, now: u64) -> anyhow::Result<()> {
    outln!("lock      {}", l.id)?;
    outln!("target    {}", l.target)?;
    outln!("state     {}", state_cell(l))?;
    outln!("added     {} ago by {}", ago(l.created_at_ms, now), l.by)?;
    outln!("expires   {}", expiry(l, now))?;
    if let Some(r) = &l.reason {
        let shown = if l.show_reason {
            "shown to refused clients"
        } else {
            "not shown to clients"
        };
        outln!("reason    {r} ({shown})")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        c: LockCommand,
    }

    fn target(args: &[&str]) -> LockTarget {
        let mut all = vec!["x", "add"];
        all.extend(args);
        let Cli {
            c: LockCommand::Add { target, .. },
        } = Cli::try_parse_from(all).unwrap()
        else {
            panic!("not add")
        };
        target.target().unwrap()
    }

    #[test]
    fn each_target_flag_reads_into_its_target() {
        assert_eq!(target(&["--user", "a@b"]), LockTarget::User("a@b".into()));
        assert_eq!(
            target(&["--subject", "https://idp", "s1"]),
            LockTarget::Subject {
                iss: "https://idp".into(),
                sub: "s1".into()
            }
        );
        assert_eq!(target(&["--group", "g"]), LockTarget::Group("g".into()));
        assert_eq!(target(&["--device", "d"]), LockTarget::Device("d".into()));
        assert_eq!(
            target(&["--source", "10.0.0.0/8"]),
            LockTarget::Source("10.0.0.0/8".into())
        );
        assert_eq!(
            target(&["--session", "ff"]),
            LockTarget::Session(SessionId(0xff))
        );
        assert_eq!(target(&["--token", "ab"]), LockTarget::Token("ab".into()));
    }

    #[test]
    fn one_target_exactly_and_a_real_ttl() {
        let err = |args: &[&str]| {
            let mut all = vec!["x"];
            all.extend(args);
            Cli::try_parse_from(all).unwrap_err().to_string()
        };
        assert!(err(&["add"]).contains("required"));
        assert!(err(&["add", "--user", "a", "--group", "g"]).contains("cannot be used with"));
        assert!(err(&["add", "--user", "a", "--ttl", "soon"]).contains("not a duration"));
        assert!(err(&["add", "--user", "a", "--ttl", "0s"]).contains("expire at once"));
        assert!(err(&["add", "--user", "a", "--show-reason"]).contains("--reason"));
        assert!(err(&["show", "lk-zz"]).contains("not a lock id"));
        let Cli {
            c: LockCommand::Add { ttl, .. },
        } = Cli::try_parse_from(["x", "add", "--user", "a", "--ttl", "2h"]).unwrap()
        else {
            panic!()
        };
        assert_eq!(ttl, Some(7200));
    }
}
