//! `flowwarden config check`: validate a config file and the policies it points to, without
//! starting anything.

use std::path::PathBuf;

use super::output::outln;
use crate::config::{Config, DEFAULT_CONFIG_PATH};

#[derive(Debug, clap::Subcommand)]
pub enum ConfigCommand {
    /// Validate the config and every policy file it points to.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

pub fn run(command: ConfigCommand) -> anyhow::Result<()> {
    let ConfigCommand::Check { config } = command;
    let c = Config::load(&config)?;
    c.auth.validate()?;
    // What the agent checks at start, checked here too: a mistake surfaces before a restart.
    c.signals
        .validate()
        .map_err(|e| anyhow::anyhow!("{}: [signals]: {e}", config.display()))?;
    if let Some(fleet) = &c.fleet {
        fleet
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: [fleet]: {e}", config.display()))?;
    }
    // What `flowwarden console` checks at start: [console.fleet] always (it is a mistake
    // without [fleet]), the rest once the console is configured at all ([console.oidc]).
    let base = config
        .parent()
        .map_or_else(|| PathBuf::from("."), std::path::Path::to_path_buf);
    c.console
        .fleet_link(c.fleet.as_ref(), &base)
        .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    if let Some(key) = c.console.fleet_admin_key(&base) {
        crate::fleet::keys::AdminKey::load(&key).map_err(|e| {
            anyhow::anyhow!("{}: console.fleet.admin_key_file: {e}", config.display())
        })?;
    }
    if c.console.oidc.is_some() {
        c.console
            .checked(&base)
            .map_err(|e| anyhow::anyhow!("{}: {e}", config.display()))?;
    }
    let policy = crate::policy::load_policy(&c.policy.dir)?;
    outln!(
        "{}: ok ({} issuers; {} resources and {} rules from {})",
        config.display(),
        c.auth.issuers.len(),
        policy.resources.resources.len(),
        policy.rules.len(),
        c.policy.dir.display()
    )?;
    for r in &policy.resources.resources {
        let ports: Vec<String> = r
            .ports
            .iter()
            .map(|&(l, h)| {
                if l == h {
                    l.to_string()
                } else {
                    format!("{l}-{h}")
                }
            })
            .collect();
        outln!("  resource {} = {}/{}", r.name, r.protocol, ports.join(","))?;
    }
    Ok(())
}
