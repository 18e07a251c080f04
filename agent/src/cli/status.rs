//! `flowwarden status`: the agent's mode, sessions, flow table, policy and drops.

use super::{
    output,
    socket::{SocketArg, fail},
    table,
};
use crate::api::{answers::ModeName, views::StatusView};

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[arg(long)]
    pub json: bool,
}

pub fn run(socket: &SocketArg, args: &StatusArgs) -> anyhow::Result<()> {
    let s = socket.connect()?.status().map_err(fail)?;
    if args.json {
        return output::json(&s);
    }
    output::text(&render(&s))
}

fn render(s: &StatusView) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    // Writing into a String cannot fail.
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    line(format!(
        "flowwarden {}  up {}  mode {}",
        s.version,
        table::duration_ms(s.uptime_ms),
        s.mode
    ));
    line(format!("interfaces   {}", s.interfaces.join(", ")));
    for i in &s.ingress {
        line(format!(
            "ingress      {}: {} ({}): {}",
            i.interface, i.hook, i.how, i.why
        ));
    }
    line(format!(
        "sessions     {} active, {} dormant, {} expired, {} terminated",
        s.sessions.active, s.sessions.dormant, s.sessions.expired, s.sessions.terminated
    ));
    line(format!(
        "flows        {} of {} ({:.1}% full)",
        s.flows.count,
        s.flows.capacity,
        s.flows.fill_ratio * 100.0
    ));
    line(format!(
        "policy       {} ({} files, {} resources, {} rules)",
        s.policy.dir, s.policy.files, s.policy.resources, s.policy.rules
    ));
    line(format!(
        "admission    {}  sha256:{}",
        s.admission.listen, s.admission.fingerprint
    ));
    let counts = |m: &std::collections::BTreeMap<String, u64>| {
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    line(format!("drops        {}", counts(&s.drops)));
    line(format!(
        "locks        {} in force, {} expired, {} denied tokens, {} cut-offs",
        s.locks.locks, s.locks.expired_locks, s.locks.denied_tokens, s.locks.cutoffs
    ));
    for issuer in &s.issuers {
        line(format!("issuer       {}", issuer.summary(s.now_ms / 1000)));
    }
    if s.mode == ModeName::Monitor {
        line(format!("would drop   {}", counts(&s.would_drop)));
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn monitor_mode_shows_what_would_be_dropped() {
        let mut v = json!({"version":"0.1.0","uptime_ms":7_500_000,"now_ms":1,"mode":"enforce",
            "interfaces":["eth0"],"pin_dir":"/p","admission":{"listen":"0.0.0.0:7443","fingerprint":"ab"},
            "sessions":{"active":3,"dormant":1,"expired":0,"terminated":2},
            "flows":{"count":7,"capacity":1000,"fill_ratio":0.007},
            "policy":{"dir":"/d","files":1,"resources":2,"rules":2,"fingerprint":"f"},
            "drops":{"no_grant":41},"would_drop":{"no_grant":5},"flows_opened":19,"events_lost":0});
        let shown = render(&serde_json::from_value(v.clone()).unwrap());
        assert!(
            shown.starts_with("flowwarden 0.1.0  up 2h5m  mode enforce\n"),
            "{shown}"
        );
        assert!(
            shown.contains("\nflows        7 of 1000 (0.7% full)\n"),
            "{shown}"
        );
        assert!(!shown.contains("would drop"), "{shown}");
        v["mode"] = json!("monitor");
        let shown = render(&serde_json::from_value(v).unwrap());
        assert!(shown.ends_with("would drop   no_grant 5\n"), "{shown}");
    }
}
