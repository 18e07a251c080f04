//! `flowwarden console`: serves the web console for the agent a config file describes,
//! through that agent's status socket.

use std::{net::SocketAddr, path::PathBuf};

use anyhow::Context as _;

use crate::{config::Config, config::DEFAULT_CONFIG_PATH, console};

#[derive(Debug, clap::Args)]
pub struct ConsoleArgs {
    /// The agent's config: its `[console]` table, status socket and state directory.
    #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
    pub config: PathBuf,
    /// Listen here instead of `[console] listen` (loopback: plain HTTP; beyond: TLS).
    #[arg(long)]
    pub listen: Option<SocketAddr>,
}

pub fn run(args: &ConsoleArgs) -> anyhow::Result<()> {
    let config =
        Config::load(&args.config).with_context(|| format!("reading {}", args.config.display()))?;
    let mut cfg = config.console.clone();
    if let Some(listen) = args.listen {
        cfg.listen = listen;
    }
    let base = args
        .config
        .parent()
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    console::run(
        &cfg,
        config.fleet.as_ref(),
        &base,
        config.api.socket.clone(),
        &config.state.dir,
    )?;
    Ok(())
}
