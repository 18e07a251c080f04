//! The command line: clap commands, each a thin call into the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_PIN_DIR};

#[derive(Debug, Parser)]
#[command(
    name = "flowwarden",
    version,
    about = "Identity-aware flow enforcement agent"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the agent daemon.
    Agent {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Inspect or remove the kernel datapath.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
    /// Check a config file and its policies without starting anything.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Debug, Subcommand)]
enum DatapathCommand {
    /// Detach the programs and remove every pinned map and link. Enforcement stops.
    Detach {
        #[arg(long, default_value = DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the config and every policy file it points to.
    Check {
        #[arg(long, default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FLOWWARDEN_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Agent { config } => crate::agent::run(&config),
        Command::Datapath {
            command: DatapathCommand::Detach { pin_dir },
        } => {
            let removed = crate::datapath::detach_all(&pin_dir)?;
            if removed.is_empty() {
                println!(
                    "nothing pinned under {}: nothing to detach",
                    pin_dir.display()
                );
            } else {
                for path in &removed {
                    println!("removed {}", path.display());
                }
                println!("datapath detached: traffic to resources is no longer enforced");
            }
            Ok(())
        }
        Command::Config {
            command: ConfigCommand::Check { config },
        } => {
            let c = Config::load(&config)?;
            let resources = crate::policy::load_resources(&c.policy.dir)?;
            println!(
                "{}: ok ({} resources from {})",
                config.display(),
                resources.resources.len(),
                c.policy.dir.display()
            );
            for r in &resources.resources {
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
                println!("  {} = {}/{}", r.name, r.protocol, ports.join(","));
            }
            Ok(())
        }
    }
}
