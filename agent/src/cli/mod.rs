//! The command line: clap commands, each a thin call into the library or the agent's status
//! socket. Errors say what to do; exit codes tell causes apart.

mod control;
mod dev;
mod login;
mod table;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::config::{Config, DEFAULT_CONFIG_PATH, DEFAULT_PIN_DIR};
use control::{AuditArgs, PolicyCommand, SessionsCommand, SocketArg};

#[derive(Debug, Parser)]
#[command(
    name = "flowwarden",
    version,
    about = "Identity-aware flow enforcement agent",
    after_help = "Exit codes: 0 success, 1 failure, 2 usage, 3 not found, 4 permission denied, 5 agent unreachable."
)]
pub struct Cli {
    #[command(flatten)]
    socket: SocketArg,
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
    /// The agent's state: mode, sessions, flow table, policy, drops.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// List, inspect and terminate sessions.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Flows the kernel holds, with their owners and counters.
    Flows {
        #[command(subcommand)]
        command: FlowsCommand,
    },
    /// Which identity owns a flow: `whois 10.0.0.7:51514 10.0.0.2:22`.
    Whois {
        a: String,
        b: String,
        #[arg(long)]
        udp: bool,
        #[arg(long)]
        json: bool,
    },
    /// The audit log: every decision, who, what, when, from where.
    Audit(AuditArgs),
    /// Check, reload and explain policy.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Inspect, switch or remove the kernel datapath.
    Datapath {
        #[command(subcommand)]
        command: DatapathCommand,
    },
    /// Check a config file and its policies without starting anything.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Present a token to an agent and open a session for this host.
    Login(login::LoginArgs),
    /// Development tools: a stand-in identity provider for demos and tests.
    Dev {
        #[command(subcommand)]
        command: dev::DevCommand,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), for packaging.
    #[command(hide = true)]
    Man,
}

#[derive(Debug, Subcommand)]
enum FlowsCommand {
    List {
        #[arg(long)]
        session: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DatapathCommand {
    /// Show the mode, or switch it: `enforce` drops, `monitor` only counts what it would drop.
    Mode {
        mode: Option<String>,
        #[arg(long)]
        json: bool,
    },
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

/// The clap command tree, for man pages and completions.
pub fn command() -> clap::Command {
    Cli::command()
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let (filter, bad_filter) = log_filter(std::env::var_os("FLOWWARDEN_LOG"));
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .with_env_filter(filter)
        .init();
    if let Some(why) = bad_filter {
        tracing::warn!("{why}");
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Causes whose text the message already carries are not repeated.
            let mut message = e.to_string();
            for cause in e.chain().skip(1) {
                let c = cause.to_string();
                if !message.contains(&c) {
                    message.push_str(": ");
                    message.push_str(&c);
                }
            }
            eprintln!("error: {message}");
            let code = e.downcast_ref::<control::Failure>().map_or(1, |f| f.code);
            ExitCode::from(code)
        }
    }
}

/// The log filter from `FLOWWARDEN_LOG`, or `info`; with why the variable was not used when it
/// was set but unusable, so that a typo does not silently log at the wrong level.
fn log_filter(
    value: Option<std::ffi::OsString>,
) -> (tracing_subscriber::EnvFilter, Option<String>) {
    use tracing_subscriber::EnvFilter;
    let Some(value) = value else {
        return (EnvFilter::new("info"), None);
    };
    let parsed = match value.to_str() {
        Some(text) => EnvFilter::try_new(text).map_err(|e| format!("{text:?}: {e}")),
        None => Err(format!("{value:?} is not UTF-8")),
    };
    match parsed {
        Ok(filter) => (filter, None),
        Err(why) => (
            EnvFilter::new("info"),
            Some(format!(
                "FLOWWARDEN_LOG {why}; logging at info. Use a level (error, warn, info, debug, \
                 trace) or directives such as info,flowwarden::auth=debug"
            )),
        ),
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let socket = &cli.socket;
    match cli.command {
        Command::Agent { config } => crate::agent::run(&config),
        Command::Status { json } => control::status(socket, json),
        Command::Sessions { command } => control::sessions(socket, command),
        Command::Flows {
            command: FlowsCommand::List { session, json },
        } => control::flows(socket, session, json),
        Command::Whois { a, b, udp, json } => control::whois(socket, &a, &b, udp, json),
        Command::Audit(args) => control::audit(socket, args),
        Command::Policy { command } => control::policy(socket, command),
        Command::Datapath {
            command: DatapathCommand::Mode { mode, json },
        } => control::datapath_mode(socket, mode, json),
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
            c.auth.validate()?;
            let policy = crate::policy::load_policy(&c.policy.dir)?;
            println!(
                "{}: ok ({} issuers; {} resources and {} rules from {})",
                config.display(),
                c.auth.issuers.len(),
                policy.resources.resources.len(),
                policy.rules.len(),
                c.policy.dir.display()
            );
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
                println!("  resource {} = {}/{}", r.name, r.protocol, ports.join(","));
            }
            Ok(())
        }
        Command::Login(args) => login::run(args),
        Command::Dev { command } => dev::run(command),
        Command::Man => {
            clap_mangen::Man::new(command()).render(&mut std::io::stdout())?;
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut command(), "flowwarden", &mut std::io::stdout());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;

    #[test]
    fn a_bad_log_filter_is_reported_not_ignored() {
        for good in [None, Some("debug"), Some("info,flowwarden::auth=debug")] {
            let (_, why) = log_filter(good.map(Into::into));
            assert_eq!(why, None, "{good:?}");
        }
        let (filter, why) = log_filter(Some("info,flowwarden=loud".into()));
        let why = why.expect("an unknown level is reported");
        assert!(
            why.contains("\"info,flowwarden=loud\"") && why.contains("logging at info"),
            "{why}"
        );
        assert_eq!(filter.to_string(), "info");
    }
}
