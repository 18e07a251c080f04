//! `flowwarden sessions`: list, show and terminate sessions.

use std::net::IpAddr;

use anyhow::bail;

use super::{
    flows::print_flows,
    output::{self, outln},
    socket::{SocketArg, fail},
    table::{self, ago, alert, bytes, until},
};
use crate::{
    api::{
        request::{SessionFilter, Terminate},
        views::SessionView,
    },
    sessions::model::{EndCause, SessionId, SessionState, now_ms},
};

/// A session state as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateArg {
    Active,
    Dormant,
    Expired,
    Terminated,
}

impl From<StateArg> for SessionState {
    fn from(s: StateArg) -> Self {
        match s {
            StateArg::Active => Self::Active,
            StateArg::Dormant => Self::Dormant,
            StateArg::Expired => Self::Expired,
            StateArg::Terminated => Self::Terminated,
        }
    }
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// Who, from where, to what, since when, state, bytes.
    List {
        #[arg(long, value_enum)]
        state: Option<StateArg>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        source: Option<IpAddr>,
        /// Only active and dormant sessions.
        #[arg(long)]
        live: bool,
        #[arg(long)]
        json: bool,
    },
    /// Full identity (claims, device posture), flows and counters of one session.
    Show {
        id: SessionId,
        #[arg(long)]
        json: bool,
    },
    /// Sever sessions now and force a new login.
    Terminate {
        ids: Vec<SessionId>,
        /// Every live session of this user (email or subject).
        #[arg(long, conflicts_with = "ids")]
        user: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Leave the sessions' tokens usable: the user may log straight back in with them.
        #[arg(long, conflicts_with = "cutoff")]
        allow_relogin: bool,
        /// Also refuse every token of the sessions' subjects issued before now (--user
        /// always does).
        #[arg(long)]
        cutoff: bool,
        #[arg(long)]
        json: bool,
    },
}

impl SessionsCommand {
    pub fn json(&self) -> bool {
        match self {
            Self::List { json, .. } | Self::Show { json, .. } | Self::Terminate { json, .. } => {
                *json
            }
        }
    }
}

pub fn run(socket: &SocketArg, command: SessionsCommand) -> anyhow::Result<()> {
    match command {
        SessionsCommand::List {
            state,
            user,
            resource,
            source,
            live,
            json,
        } => {
            let filter = SessionFilter {
                state: state.map(Into::into),
                user,
                resource,
                source,
                live,
                ..SessionFilter::default()
            };
            let list = socket.connect()?.sessions_list(&filter).map_err(fail)?;
            if json {
                return output::json(&list);
            }
            print_list(&list, now_ms())
        }
        SessionsCommand::Show { id, json } => {
            let s = socket.connect()?.sessions_get(id).map_err(fail)?;
            if json {
                return output::json(&s);
            }
            show_session(&s)
        }
        SessionsCommand::Terminate {
            ids,
            user,
            reason,
            allow_relogin,
            cutoff,
            json,
        } => {
            if ids.is_empty() && user.is_none() {
                bail!("say which sessions: give session ids, or --user EMAIL");
            }
            let done = socket
                .connect()?
                .sessions_terminate(&Terminate {
                    ids,
                    user,
                    reason,
                    allow_relogin,
                    cutoff,
                    ..Terminate::default()
                })
                .map_err(fail)?;
            if json {
                return output::json(&done);
            }
            if done.terminated.is_empty() {
                outln!("no live session matched: nothing terminated")?;
            }
            for t in &done.terminated {
                outln!(
                    "terminated {} ({} from {}): its flows are severed",
                    t.id,
                    t.user,
                    t.source
                )?;
            }
            if done.denied_tokens > 0 {
                outln!(
                    "{} token(s) denied: logging in again needs a new token from the identity provider",
                    done.denied_tokens
                )?;
            }
            if done.cutoffs > 0 {
                outln!(
                    "{} cut-off(s) set: tokens issued before now are refused",
                    done.cutoffs
                )?;
            }
            Ok(())
        }
    }
}

fn print_list(list: &[SessionView], now: u64) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.id.clone(),
                s.user.clone(),
                s.source.to_string(),
                s.grants
                    .iter()
                    .map(|g| g.resource.as_str())
                    .collect::<Vec<_>>()
                    .join(","),
                ago(s.created_at_ms, now),
                state_cell(s.state),
                s.traffic.flows.to_string(),
                format!(
                    "{}/{}",
                    bytes(s.traffic.rx_bytes),
                    bytes(s.traffic.tx_bytes)
                ),
                if s.state.is_live() {
                    until(s.expires_at_ms, now)
                } else {
                    "-".into()
                },
            ]
        })
        .collect();
    table::print(
        &[
            "SESSION", "USER", "FROM", "TO", "SINCE", "STATE", "FLOWS", "IN/OUT", "EXPIRES",
        ],
        &rows,
    )
}

fn state_cell(state: SessionState) -> String {
    match state {
        SessionState::Terminated | SessionState::Expired => alert(state.as_str()),
        s => s.as_str().to_owned(),
    }
}

/// A session in full, then its flows: `sessions show` and `whois`.
pub(super) fn show_session(s: &SessionView) -> anyhow::Result<()> {
    output::text(&render_session(s, now_ms()))?;
    if let Some(flows) = &s.flows {
        outln!("flows")?;
        print_flows(flows)?;
    }
    Ok(())
}

/// `sessions show` without its flow table, as of `now` (Unix ms).
fn render_session(s: &SessionView, now: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing into a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!("session      {}", s.id));
    line(format!("state        {}", state_cell(s.state)));
    line(format!(
        "user         {} (sub {}, iss {})",
        s.user, s.subject, s.issuer
    ));
    line(format!("groups       {}", s.groups.join(", ")));
    let d = &s.device;
    let flag = |b: Option<bool>| b.map_or("unknown".to_owned(), |b| b.to_string());
    line(format!(
        "device       id {}, managed {}, compliant {}, os {}",
        d.id.as_deref().unwrap_or("unknown"),
        flag(d.managed),
        flag(d.compliant),
        d.os.as_deref().unwrap_or("unknown")
    ));
    line(format!("from         {}", s.source));
    line(format!(
        "since        {} ({})",
        ago(s.created_at_ms, now),
        s.created_at_ms
    ));
    // An ended session no longer expires: say when and why it ended instead.
    match &s.ended {
        Some(end) => line(format!(
            "ended        {} ({}): {}",
            ago(end.at_ms, now),
            end.at_ms,
            end_cause(&end.cause)
        )),
        None => line(format!("expires      {}", until(s.expires_at_ms, now))),
    }
    let grants: Vec<String> = s
        .grants
        .iter()
        .map(|g| format!("{} (rule {})", g.resource, g.rule))
        .collect();
    line(format!(
        "grants       {}",
        if grants.is_empty() {
            "none".into()
        } else {
            grants.join(", ")
        }
    ));
    line(format!(
        "traffic      {} flows; in {} pkts / {}, out {} pkts / {}",
        s.traffic.flows,
        s.traffic.rx_packets,
        bytes(s.traffic.rx_bytes),
        s.traffic.tx_packets,
        bytes(s.traffic.tx_bytes)
    ));
    if s.session_flow_limit_drops > 0 {
        line(format!(
            "new flows denied over its flow budget (session_flow_limit): {}",
            s.session_flow_limit_drops
        ));
    }
    if s.ended.is_some() {
        line(format!(
            "dropped after termination: {} packets, {}",
            s.dropped_after_termination.packets,
            bytes(s.dropped_after_termination.bytes)
        ));
    }
    if let Some(fp) = &s.token_sha256 {
        line(format!(
            "token        sha256:{fp} (the token itself is never kept)"
        ));
    }
    if !s.signals.is_empty() {
        line("signals".into());
        for sig in &s.signals {
            line(format!(
                "  {} {} from {} (SET {}): {}",
                ago(sig.at_ms, now),
                sig.event,
                sig.iss,
                sig.jti,
                sig.outcome
            ));
        }
    }
    if let Some(claims) = &s.claims {
        line("claims".into());
        for (k, v) in claims {
            line(format!("  {k} = {v}"));
        }
    }
    out
}

/// Why a session ended, in words.
fn end_cause(cause: &EndCause) -> String {
    let with_reason = |what: &str, reason: &str| {
        if reason.is_empty() {
            what.to_owned()
        } else {
            format!("{what}: {reason}")
        }
    };
    match cause {
        EndCause::Expired => "expired".into(),
        EndCause::DormantTimeout => "expired: no flow for its dormant timeout".into(),
        EndCause::Terminated { by, reason } => with_reason(&format!("terminated by {by}"), reason),
        EndCause::PolicyChange { reason } => with_reason("terminated by a policy change", reason),
        EndCause::IdentityEvent { reason } => {
            with_reason("terminated by an identity event", reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn view(ended: Option<Value>) -> SessionView {
        let mut v = json!({
            "id": "0e551000000000a1", "state": "active", "user": "alice@corp.example",
            "subject": "alice", "issuer": "https://idp.corp.example", "groups": ["ops"],
            "device": {}, "source": "10.0.0.7", "created_at_ms": 1_000_000,
            "updated_at_ms": 1_000_000, "expires_at_ms": 1_000_000 + 3_600_000,
            "grants": [{"resource": "ssh", "rule": "ops-ssh"}],
            "settings": {"max_duration_secs": 28800, "idle_timeout_secs": 900,
                         "dormant_timeout_secs": 3600, "reconnect": true},
            "traffic": {"flows": 0, "rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0},
            "dropped_after_termination": {"packets": 17, "bytes": 2210},
        });
        if let Some(end) = ended {
            v["state"] = json!("terminated");
            v["ended"] = end;
        }
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_live_session_shows_when_it_expires() {
        // Four minutes after its start: 56 minutes to go.
        let shown = render_session(&view(None), 1_000_000 + 240_000);
        assert!(shown.contains("\nexpires      in 56m\n"), "{shown}");
        assert!(!shown.contains("ended"), "{shown}");
        assert!(!shown.contains("dropped after termination"), "{shown}");
    }

    #[test]
    fn an_ended_session_shows_when_and_why_it_ended_not_an_expiry() {
        let end = json!({"at_ms": 1_060_000, "cause": "terminated", "by": "uid 0",
                         "reason": "lost laptop"});
        let shown = render_session(&view(Some(end)), 1_060_000 + 180_000);
        assert!(
            shown.contains("\nended        3m ago (1060000): terminated by uid 0: lost laptop\n"),
            "{shown}"
        );
        assert!(!shown.contains("expires"), "{shown}");
        assert!(
            shown.contains("\ndropped after termination: 17 packets, 2.2 KiB\n"),
            "{shown}"
        );
        for (cause, words) in [
            (json!({"cause": "expired"}), "expired"),
            (
                json!({"cause": "dormant_timeout"}),
                "expired: no flow for its dormant timeout",
            ),
            (
                json!({"cause": "policy_change", "reason": "rule ops-ssh removed"}),
                "terminated by a policy change: rule ops-ssh removed",
            ),
            (
                json!({"cause": "terminated", "by": "uid 1001", "reason": ""}),
                "terminated by uid 1001",
            ),
        ] {
            let mut end = cause;
            end["at_ms"] = json!(1_060_000);
            let shown = render_session(&view(Some(end)), 1_060_000);
            assert!(shown.contains(&format!("(1060000): {words}\n")), "{shown}");
        }
    }

    #[test]
    fn states_and_ids_parse_as_typed_arguments() {
        use clap::Parser as _;
        #[derive(Debug, clap::Parser)]
        struct Cli {
            #[command(subcommand)]
            c: SessionsCommand,
        }
        let Cli { c } =
            Cli::try_parse_from(["x", "list", "--state", "dormant", "--source", "10.0.0.7"])
                .unwrap();
        let SessionsCommand::List { state, source, .. } = c else {
            panic!("{c:?}")
        };
        assert_eq!(state.map(SessionState::from), Some(SessionState::Dormant));
        assert_eq!(source, Some("10.0.0.7".parse().unwrap()));
        assert!(Cli::try_parse_from(["x", "list", "--state", "sleepy"]).is_err());
        assert!(Cli::try_parse_from(["x", "list", "--source", "10.0.0"]).is_err());
        let Cli { c } = Cli::try_parse_from(["x", "terminate", "ab", "0x00ff"]).unwrap();
        let SessionsCommand::Terminate { ids, .. } = c else {
            panic!("{c:?}")
        };
        assert_eq!(ids, vec![SessionId(0xab), SessionId(0xff)]);
        let e = Cli::try_parse_from(["x", "show", "zz"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a session id"), "{e}");
    }
}
