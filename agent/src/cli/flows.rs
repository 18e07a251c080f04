//! `flowwarden flows`: the flows the kernel holds, with their owners and counters.

use super::{
    output,
    socket::{SocketArg, fail},
    table::{self, alert, bytes},
};
use crate::{api::views::FlowView, sessions::model::SessionId};

#[derive(Debug, clap::Subcommand)]
pub enum FlowsCommand {
    /// Every flow, or those of one session.
    List {
        #[arg(long)]
        session: Option<SessionId>,
        #[arg(long)]
        json: bool,
    },
}

impl FlowsCommand {
    pub fn json(&self) -> bool {
        let Self::List { json, .. } = self;
        *json
    }
}

pub fn run(socket: &SocketArg, command: FlowsCommand) -> anyhow::Result<()> {
    let FlowsCommand::List { session, json } = command;
    let flows = socket.connect()?.flows_list(session).map_err(fail)?;
    if json {
        return output::json(&flows);
    }
    print_flows(&flows)
}

/// The flow table of `flows list` and `sessions show`.
pub(super) fn print_flows(flows: &[FlowView]) -> anyhow::Result<()> {
    let rows: Vec<Vec<String>> = flows.iter().map(row).collect();
    table::print(
        &[
            "SESSION", "USER", "RESOURCE", "FLOW", "IN", "OUT", "IDLE", "STATE",
        ],
        &rows,
    )
}

fn row(f: &FlowView) -> Vec<String> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flow_row_names_its_owner_ends_and_state() {
        let f: FlowView = serde_json::from_value(serde_json::json!({
            "session": "5e55100000000001", "resource": "ssh", "protocol": "tcp",
            "source": "10.0.0.7:51514", "destination": "10.0.0.2:22", "rx_packets": 420,
            "rx_bytes": 61234, "tx_packets": 388, "tx_bytes": 90412, "age_ms": 95000,
            "idle_ms": 40, "revoked": false}))
        .unwrap();
        assert_eq!(
            row(&f),
            [
                "5e55100000000001",
                "?",
                "ssh",
                "tcp 10.0.0.7:51514 → 10.0.0.2:22",
                "420 pkts / 59.8 KiB",
                "388 pkts / 88.3 KiB",
                "0s",
                "live"
            ]
        );
    }
}
