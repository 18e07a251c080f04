//! The commands that talk to a running agent over its status socket: status, sessions, flows,
//! whois, audit, policy and datapath mode. Every read has `--json`.

use std::path::PathBuf;

use anyhow::bail;
use serde_json::{Value, json};

use super::table::{self, ago, alert, bytes, until};
use crate::{
    api::{
        client::{ClientError, RpcClient},
        views::{FlowView, SessionView, StatusView},
    },
    audit::event::AuditEvent,
    sessions::model::{EndCause, SessionState, now_ms},
};

/// Where the CLI looks for the agent unless told otherwise.
pub const DEFAULT_SOCKET: &str = "/run/flowwarden/agent.sock";

/// Exit codes beyond 0 (success), 1 (failure) and 2 (usage), so scripts can tell causes apart.
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_PERMISSION: u8 = 4;
pub const EXIT_UNREACHABLE: u8 = 5;

#[derive(Debug, clap::Args)]
pub struct SocketArg {
    /// The agent's status socket.
    #[arg(long, env = "FLOWWARDEN_SOCKET", default_value = DEFAULT_SOCKET, global = true)]
    pub socket: PathBuf,
}

#[derive(Debug, clap::Subcommand)]
pub enum SessionsCommand {
    /// Who, from where, to what, since when, state, bytes.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        source: Option<String>,
        /// Only active and dormant sessions.
        #[arg(long)]
        live: bool,
        #[arg(long)]
        json: bool,
    },
    /// Full identity (claims, device posture), flows and counters of one session.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Sever sessions now and force a new login.
    Terminate {
        ids: Vec<String>,
        /// Every live session of this user (email or subject).
        #[arg(long, conflicts_with = "ids")]
        user: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, clap::Subcommand)]
pub enum PolicyCommand {
    /// Re-read the policy directory now (the agent also follows edits by itself).
    Reload {
        #[arg(long)]
        json: bool,
    },
    /// Validate the agent's policy directory, or a candidate one, without applying it.
    Check {
        #[arg(long)]
        dir: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Which rule allows a user a resource, or why none does; with --candidate, which live
    /// sessions a new policy would sever.
    Explain {
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        resource: Option<String>,
        #[arg(long)]
        candidate: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
}

/// A CLI failure with the exit code it deserves.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

fn connect(socket: &SocketArg) -> anyhow::Result<RpcClient> {
    RpcClient::connect(&socket.socket).map_err(fail)
}

/// Maps client errors to messages and exit codes.
fn fail(e: ClientError) -> anyhow::Error {
    let code = match &e {
        ClientError::Rpc { code, .. } if *code == crate::api::jsonrpc::NOT_FOUND => EXIT_NOT_FOUND,
        ClientError::Rpc { code, .. } if *code == crate::api::jsonrpc::PERMISSION_DENIED => {
            EXIT_PERMISSION
        }
        ClientError::Rpc { .. } => 1,
        _ => {
            if e.to_string().contains("permission denied") {
                EXIT_PERMISSION
            } else {
                EXIT_UNREACHABLE
            }
        }
    };
    Failure {
        message: e.to_string(),
        code,
    }
    .into()
}

fn call(socket: &SocketArg, method: &str, params: Value) -> anyhow::Result<Value> {
    connect(socket)?.call(method, params).map_err(fail)
}

fn print_json(v: &Value) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub fn status(socket: &SocketArg, json_out: bool) -> anyhow::Result<()> {
    let v = call(socket, "status", json!({}))?;
    if json_out {
        return print_json(&v);
    }
    let s: StatusView = serde_json::from_value(v)?;
    println!(
        "flowwarden {}  up {}  mode {}",
        s.version,
        table::duration_ms(s.uptime_ms),
        s.mode
    );
    println!("interfaces   {}", s.interfaces.join(", "));
    for i in &s.ingress {
        println!(
            "ingress      {}: {} ({}): {}",
            i.interface, i.hook, i.how, i.why
        );
    }
    println!(
        "sessions     {} active, {} dormant, {} expired, {} terminated",
        s.sessions.active, s.sessions.dormant, s.sessions.expired, s.sessions.terminated
    );
    println!(
        "flows        {} of {} ({:.1}% full)",
        s.flows.count,
        s.flows.capacity,
        s.flows.fill_ratio * 100.0
    );
    println!(
        "policy       {} ({} files, {} resources, {} rules)",
        s.policy.dir, s.policy.files, s.policy.resources, s.policy.rules
    );
    println!(
        "admission    {}  sha256:{}",
        s.admission.listen, s.admission.fingerprint
    );
    let drops: Vec<String> = s.drops.iter().map(|(k, v)| format!("{k} {v}")).collect();
    println!("drops        {}", drops.join(", "));
    if s.mode == "monitor" {
        let would: Vec<String> = s
            .would_drop
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        println!("would drop   {}", would.join(", "));
    }
    Ok(())
}

pub fn sessions(socket: &SocketArg, command: SessionsCommand) -> anyhow::Result<()> {
    match command {
        SessionsCommand::List {
            state,
            user,
            resource,
            source,
            live,
            json: json_out,
        } => {
            let mut params = json!({ "live": live });
            for (k, v) in [
                ("state", state),
                ("user", user),
                ("resource", resource),
                ("source", source),
            ] {
                if let Some(v) = v {
                    params[k] = json!(v);
                }
            }
            let v = call(socket, "sessions.list", params)?;
            if json_out {
                return print_json(&v);
            }
            let list: Vec<SessionView> = serde_json::from_value(v)?;
            let now = now_ms();
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
            );
            Ok(())
        }
        SessionsCommand::Show { id, json: json_out } => {
            let v = call(socket, "sessions.get", json!({ "id": id }))?;
            if json_out {
                return print_json(&v);
            }
            show_session(&serde_json::from_value(v)?);
            Ok(())
        }
        SessionsCommand::Terminate {
            ids,
            user,
            reason,
            json: json_out,
        } => {
            if ids.is_empty() && user.is_none() {
                bail!("say which sessions: give session ids, or --user EMAIL");
            }
            let mut params = json!({});
            if !ids.is_empty() {
                params["ids"] = json!(ids);
            }
            if let Some(u) = user {
                params["user"] = json!(u);
            }
            if let Some(r) = reason {
                params["reason"] = json!(r);
            }
            let v = call(socket, "sessions.terminate", params)?;
            if json_out {
                return print_json(&v);
            }
            let list = v["terminated"].as_array().cloned().unwrap_or_default();
            if list.is_empty() {
                println!("no live session matched: nothing terminated");
            }
            for t in list {
                println!(
                    "terminated {} ({} from {}): its flows are severed",
                    t["id"].as_str().unwrap_or("?"),
                    t["user"].as_str().unwrap_or("?"),
                    t["source"].as_str().unwrap_or("?")
                );
            }
            Ok(())
        }
    }
}

fn state_cell(state: SessionState) -> String {
    match state {
        SessionState::Terminated | SessionState::Expired => alert(state.as_str()),
        s => s.as_str().to_owned(),
    }
}

fn show_session(s: &SessionView) {
    print!("{}", render_session(s, now_ms()));
    if let Some(flows) = &s.flows {
        println!("flows");
        print_flows(flows);
    }
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

fn print_flows(flows: &[FlowView]) {
    let rows: Vec<Vec<String>> = flows
        .iter()
        .map(|f| {
            vec![
                f.session.clone(),
                f.user.clone().unwrap_or_else(|| "?".into()),
                f.resource.clone().unwrap_or_else(|| "?".into()),
                format!("{} {} → {}", f.protocol, f.source, f.destination),
                format!("{} pkts / {}", f.rx_packets, bytes(f.rx_bytes)),
                format!("{} pkts / {}", f.tx_packets, bytes(f.tx_bytes)),
                table::duration_ms(f.idle_ms),
                if f.revoked {
                    alert("revoked")
                } else {
                    "live".into()
                },
            ]
        })
        .collect();
    table::print(
        &[
            "SESSION", "USER", "RESOURCE", "FLOW", "IN", "OUT", "IDLE", "STATE",
        ],
        &rows,
    );
}

pub fn flows(socket: &SocketArg, session: Option<String>, json_out: bool) -> anyhow::Result<()> {
    let params = match session {
        Some(s) => json!({ "session": s }),
        None => json!({}),
    };
    let v = call(socket, "flows.list", params)?;
    if json_out {
        return print_json(&v);
    }
    print_flows(&serde_json::from_value::<Vec<FlowView>>(v)?);
    Ok(())
}

pub fn whois(
    socket: &SocketArg,
    a: &str,
    b: &str,
    udp: bool,
    json_out: bool,
) -> anyhow::Result<()> {
    let v = call(
        socket,
        "whois",
        json!({ "a": a, "b": b, "protocol": if udp { "udp" } else { "tcp" } }),
    )?;
    if json_out {
        return print_json(&v);
    }
    let flow: FlowView = serde_json::from_value(v["flow"].clone())?;
    println!(
        "{} {} → {}: session {} ({})",
        flow.protocol,
        flow.source,
        flow.destination,
        flow.session,
        flow.resource.as_deref().unwrap_or("?")
    );
    match serde_json::from_value::<Option<SessionView>>(v["session"].clone())? {
        Some(s) => show_session(&s),
        None => println!("the session is no longer known to the agent"),
    }
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Keep printing events as they happen.
    #[arg(long)]
    pub follow: bool,
    /// Only events newer than this: a duration ("10m", "2h", "1d").
    #[arg(long)]
    pub since: Option<String>,
    #[arg(long)]
    pub after_seq: Option<u64>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub session: Option<String>,
    #[arg(long)]
    pub kind: Option<String>,
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

pub fn audit(socket: &SocketArg, a: AuditArgs) -> anyhow::Result<()> {
    let mut params = json!({});
    if let Some(s) = &a.since {
        let ms = parse_ago(s)?;
        params["since_ms"] = json!(now_ms().saturating_sub(ms));
    }
    for (k, v) in [
        ("user", &a.user),
        ("session", &a.session),
        ("kind", &a.kind),
    ] {
        if let Some(v) = v {
            params[k] = json!(v);
        }
    }
    let mut query = params.clone();
    if let Some(n) = a.after_seq {
        query["after_seq"] = json!(n);
    }
    if let Some(n) = a.limit {
        query["limit"] = json!(n);
    }
    let mut client = connect(socket)?;
    let events: Vec<AuditEvent> =
        serde_json::from_value(client.call("audit.query", query).map_err(fail)?)?;
    for e in &events {
        print_event(e, a.json)?;
    }
    if !a.follow {
        return Ok(());
    }
    let mut filter = json!({});
    for (k, v) in [
        ("user", &a.user),
        ("session", &a.session),
        ("kind", &a.kind),
    ] {
        if let Some(v) = v {
            filter[k] = json!(v);
        }
    }
    let last = events.last().map_or(0, |e| e.seq);
    let (_, stream) = client.subscribe("audit.subscribe", filter).map_err(fail)?;
    for item in stream {
        let (method, params) = item.map_err(fail)?;
        if method == "audit.event" {
            let e: AuditEvent = serde_json::from_value(params)?;
            if e.seq > last {
                print_event(&e, a.json)?;
            }
        } else if method == "audit.lagged" {
            eprintln!("(missed events: run `flowwarden audit --after-seq N` to catch up)");
        }
    }
    Ok(())
}

fn print_event(e: &AuditEvent, json_out: bool) -> anyhow::Result<()> {
    if json_out {
        println!("{}", serde_json::to_string(e)?);
        return Ok(());
    }
    let kind = serde_json::to_value(&e.kind)?;
    let extra: Vec<String> = kind
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| *k != "kind")
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_owned)))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{:>6} {} {:<28} {:<24} {:<16} {:<16} {}{}",
        e.seq,
        e.at_ms,
        e.kind.name(),
        e.user.as_deref().unwrap_or("-"),
        e.source.map_or("-".into(), |s| s.to_string()),
        e.session.map_or("-".into(), |s| s.to_string()),
        e.detail,
        if extra.is_empty() {
            String::new()
        } else {
            format!(" [{}]", extra.join(" "))
        }
    );
    Ok(())
}

/// "90s", "10m", "2h", "1d" → milliseconds.
fn parse_ago(s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let (num, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = num
        .parse()
        .map_err(|_| anyhow::anyhow!("{s:?} is not a duration: use e.g. 90s, 10m, 2h, 1d"))?;
    let unit_ms = match unit {
        "s" => 1_000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => bail!("{s:?} is not a duration: use e.g. 90s, 10m, 2h, 1d"),
    };
    Ok(n * unit_ms)
}

pub fn policy(socket: &SocketArg, command: PolicyCommand) -> anyhow::Result<()> {
    match command {
        PolicyCommand::Reload { json: json_out } => {
            let v = call(socket, "policy.reload", json!({}))?;
            if json_out {
                return print_json(&v);
            }
            if v["changed"].as_bool() == Some(true) {
                let o = &v["outcome"];
                println!(
                    "policy reloaded: {} live sessions re-evaluated, {} grants removed, {} flows severed, {} sessions terminated",
                    o["evaluated"],
                    o["grants_removed"],
                    o["flows_severed"],
                    o["sessions_terminated"]
                );
            } else {
                println!("policy unchanged");
            }
            Ok(())
        }
        PolicyCommand::Check {
            dir,
            json: json_out,
        } => {
            let params = match dir {
                Some(d) => json!({ "dir": std::fs::canonicalize(&d).unwrap_or(d) }),
                None => json!({}),
            };
            let v = call(socket, "policy.check", params)?;
            if json_out {
                return print_json(&v);
            }
            println!(
                "{}: ok ({} files, {} resources, {} rules)",
                v["dir"].as_str().unwrap_or("?"),
                v["files"],
                v["resources"],
                v["rules"]
            );
            Ok(())
        }
        PolicyCommand::Explain {
            user,
            session,
            resource,
            candidate,
            json: json_out,
        } => {
            let mut params = json!({});
            for (k, v) in [("user", user), ("session", session), ("resource", resource)] {
                if let Some(v) = v {
                    params[k] = json!(v);
                }
            }
            if let Some(c) = candidate {
                params["candidate"] = json!(std::fs::canonicalize(&c).unwrap_or(c));
            }
            let v = call(socket, "policy.explain", params)?;
            if json_out {
                return print_json(&v);
            }
            if let Some(affected) = v["affected"].as_array() {
                if affected.is_empty() {
                    println!("the candidate policy severs no live session");
                }
                for a in affected {
                    println!(
                        "session {} ({} from {}) would lose {}{}",
                        a["session"].as_str().unwrap_or("?"),
                        a["user"].as_str().unwrap_or("?"),
                        a["source"].as_str().unwrap_or("?"),
                        a["removed"],
                        if a["terminated"].as_bool() == Some(true) {
                            " and be terminated"
                        } else {
                            ""
                        }
                    );
                }
                return Ok(());
            }
            println!(
                "{} (session {}):",
                v["user"].as_str().unwrap_or("?"),
                v["session"].as_str().unwrap_or("?")
            );
            for e in v["explanations"].as_array().cloned().unwrap_or_default() {
                let allowed = e["allowed"].as_bool() == Some(true);
                println!(
                    "  {}: {}",
                    e["resource"].as_str().unwrap_or("?"),
                    if allowed {
                        format!("allowed by rule {}", e["rule"].as_str().unwrap_or("?"))
                    } else {
                        "denied".into()
                    }
                );
                for r in e["reasons"].as_array().cloned().unwrap_or_default() {
                    println!("    {}", r.as_str().unwrap_or(""));
                }
            }
            Ok(())
        }
    }
}

pub fn datapath_mode(
    socket: &SocketArg,
    mode: Option<String>,
    json_out: bool,
) -> anyhow::Result<()> {
    let params = match mode {
        Some(m) => json!({ "mode": m }),
        None => json!({}),
    };
    let v = call(socket, "datapath.mode", params)?;
    if json_out {
        return print_json(&v);
    }
    println!("datapath mode: {}", v["mode"].as_str().unwrap_or("?"));
    Ok(())
}

#[cfg(test)]
mod tests {
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
    fn durations_for_since() {
        assert_eq!(parse_ago("90s").unwrap(), 90_000);
        assert_eq!(parse_ago("2h").unwrap(), 7_200_000);
        assert!(parse_ago("2 weeks").is_err());
        assert!(parse_ago("h").is_err());
    }
}
