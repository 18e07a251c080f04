//! `flowwarden signals status`: each Shared Signals stream the agent receives from.

use super::{
    output,
    socket::{SocketArg, fail},
    table,
};
use crate::{sessions::model::now_ms, signals::SignalsStatus};

#[derive(Debug, clap::Subcommand)]
pub enum SignalsCommand {
    /// Each stream: transmitter, delivery, stream status, last event, counts by event type
    /// and outcome, refusals and the last error.
    Status {
        #[arg(long)]
        json: bool,
    },
}

impl SignalsCommand {
    pub fn json(&self) -> bool {
        match self {
            Self::Status { json } => *json,
        }
    }
}

pub fn run(socket: &SocketArg, command: SignalsCommand) -> anyhow::Result<()> {
    match command {
        SignalsCommand::Status { json } => {
            let s = socket.connect()?.signals_status().map_err(fail)?;
            if json {
                return output::json(&s);
            }
            output::text(&render(&s, now_ms()))
        }
    }
}

fn render(s: &SignalsStatus, now: u64) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if s.transmitters.is_empty() {
        out.push_str("no Shared Signals transmitter is configured ([[signals.transmitter]])\n");
        return out;
    }
    let mut line = |text: String| {
        let _ = writeln!(out, "{text}");
    };
    for t in &s.transmitters {
        line(format!(
            "{}  {} delivery, stream {}{}",
            t.issuer,
            t.delivery,
            t.stream_status,
            t.stream_id
                .as_deref()
                .map_or_else(String::new, |id| format!(" (id {id})"))
        ));
        line(format!("  audience     {}", t.audience));
        line(format!("  keys         {}", t.keys.summary(now / 1000)));
        let last = match (&t.last_event, t.last_event_at_ms) {
            (Some(e), Some(at)) => format!("{e}, {}", table::ago(at, now)),
            _ => "none yet".into(),
        };
        line(format!("  received     {} SETs; last {last}", t.received));
        for (what, n) in &t.counts {
            line(format!("    {n:>8}  {what}"));
        }
        if !t.refused.is_empty() {
            let refused: Vec<String> = t.refused.iter().map(|(e, n)| format!("{e} {n}")).collect();
            line(format!("  refused      {}", refused.join(", ")));
        }
        if let Some(at) = t.last_poll_at_ms {
            line(format!("  last poll    {}", table::ago(at, now)));
        }
        if let Some(at) = t.last_verified_at_ms {
            line(format!("  verified     {}", table::ago(at, now)));
        }
        if let (Some(e), Some(at)) = (&t.last_error, t.last_error_at_ms) {
            line(format!("  last error   {} ({e})", table::ago(at, now)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_transmitter_says_how_to_configure_one() {
        let shown = render(&SignalsStatus::default(), 0);
        assert!(shown.contains("[[signals.transmitter]]"), "{shown}");
    }
}
