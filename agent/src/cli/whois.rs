//! `flowwarden whois A B`: which identity owns the flow between two ends.

use std::net::SocketAddr;

use super::{
    output::{self, outln},
    sessions::show_session,
    socket::{SocketArg, fail},
};
use crate::api::request::{Proto, Whois};

#[derive(Debug, clap::Args)]
pub struct WhoisArgs {
    /// One end of the flow, ADDRESS:PORT (either end may come first).
    pub a: SocketAddr,
    /// The other end.
    pub b: SocketAddr,
    #[arg(long)]
    pub udp: bool,
    #[arg(long)]
    pub json: bool,
}

pub fn run(socket: &SocketArg, args: &WhoisArgs) -> anyhow::Result<()> {
    let w = socket
        .connect()?
        .whois(&Whois {
            a: args.a,
            b: args.b,
            protocol: if args.udp { Proto::Udp } else { Proto::Tcp },
        })
        .map_err(fail)?;
    if args.json {
        return output::json(&w);
    }
    let flow = &w.flow;
    outln!(
        "{} {} → {}: session {} ({})",
        flow.protocol,
        flow.source,
        flow.destination,
        flow.session,
        flow.resource.as_deref().unwrap_or("?")
    )?;
    match &w.session {
        Some(s) => show_session(s),
        None => outln!("the session is no longer known to the agent"),
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: WhoisArgs,
    }

    #[test]
    fn ends_are_socket_addresses() {
        let Cli { args } = Cli::try_parse_from(["x", "10.0.0.7:51514", "[fd00::2]:22"]).unwrap();
        assert_eq!(args.a, "10.0.0.7:51514".parse().unwrap());
        assert_eq!(args.b.port(), 22);
        assert!(Cli::try_parse_from(["x", "10.0.0.7", "10.0.0.2:22"]).is_err());
    }
}
