//! `flowwarden audit`: the audit log, queried and then, with `--follow`, streamed.

use anyhow::Context as _;

use super::{
    output::{self, outln},
    socket::{SocketArg, fail},
};
use crate::{
    api::{calls::AuditItem, request::AuditFilter},
    audit::{AuditQuery, event::AuditEvent},
    policy::parse_duration,
    sessions::model::{SessionId, now_ms},
};

#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// Keep printing events as they happen.
    #[arg(long)]
    pub follow: bool,
    /// Only events newer than this: a duration ("90s", "10m", "2h", "1d", "1h30m").
    #[arg(long, value_parser = since_ms)]
    pub since: Option<u64>,
    #[arg(long)]
    pub after_seq: Option<u64>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long)]
    pub session: Option<SessionId>,
    #[arg(long)]
    pub kind: Option<String>,
    /// At most this many events (the agent refuses more than 10,000: page with --after-seq).
    #[arg(long)]
    pub limit: Option<usize>,
    #[arg(long)]
    pub json: bool,
}

/// A `--since` duration in milliseconds.
fn since_ms(text: &str) -> Result<u64, String> {
    parse_duration(text)
        .map(|secs| secs.saturating_mul(1000))
        .ok_or_else(|| format!("{text:?} is not a duration: use e.g. 90s, 10m, 2h, 1d or 1h30m"))
}

pub fn run(socket: &SocketArg, a: &AuditArgs) -> anyhow::Result<()> {
    let query = AuditQuery {
        after_seq: a.after_seq,
        since_ms: a.since.map(|ago| now_ms().saturating_sub(ago)),
        session: a.session,
        user: a.user.clone(),
        kind: a.kind.clone(),
        limit: a.limit,
    };
    let mut client = socket.connect()?;
    let events = client.audit_query(&query).map_err(fail)?;
    for e in &events {
        print_event(e, a.json)?;
    }
    if !a.follow {
        return Ok(());
    }
    let filter = AuditFilter {
        session: a.session,
        user: a.user.clone(),
        kind: a.kind.clone(),
    };
    let last = events.last().map_or(0, |e| e.seq);
    for item in client.audit_subscribe(&filter).map_err(fail)? {
        match item.map_err(fail)? {
            AuditItem::Event(e) if e.seq > last => print_event(&e, a.json)?,
            AuditItem::Event(_) => {}
            AuditItem::Lagged(_) => {
                eprintln!("(missed events: run `flowwarden audit --after-seq N` to catch up)");
            }
        }
    }
    Ok(())
}

fn print_event(e: &AuditEvent, json: bool) -> anyhow::Result<()> {
    if json {
        return output::json_line(e);
    }
    outln!("{}", render_event(e)?)
}

fn render_event(e: &AuditEvent) -> anyhow::Result<String> {
    // The kind's own fields, whatever the kind: as its JSON names them.
    let kind = serde_json::to_value(&e.kind).context("encoding an audit event")?;
    let extra: Vec<String> = kind
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| *k != "kind")
                .map(|(k, v)| format!("{k}={}", v.as_str().map_or(v.to_string(), str::to_owned)))
                .collect()
        })
        .unwrap_or_default();
    Ok(format!(
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
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn since_takes_the_durations_policy_files_take() {
        assert_eq!(since_ms("90s"), Ok(90_000));
        assert_eq!(since_ms("2h"), Ok(7_200_000));
        assert_eq!(since_ms("1h30m"), Ok(5_400_000));
        assert!(since_ms("2 weeks").is_err());
        assert!(since_ms("h").is_err());
    }

    #[test]
    fn an_event_line_carries_its_kind_fields() {
        let e: AuditEvent = serde_json::from_value(serde_json::json!({"seq": 118,
            "at_ms": 1_795_312_001_234_u64, "kind": "session_terminated", "by": "uid 0",
            "reason": "left", "session": "5e55100000000001", "user": "alice@corp.example",
            "source": "10.0.0.7", "detail": "left"}))
        .unwrap();
        let line = render_event(&e).unwrap();
        assert!(
            line.starts_with("   118 1795312001234 session_terminated"),
            "{line}"
        );
        assert!(line.ends_with("left [by=uid 0 reason=left]"), "{line}");
    }
}
