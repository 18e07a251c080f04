//! The command line: clap commands, each a thin call into the library or the agent's status
//! socket. Errors say what to do; exit codes tell causes apart.

mod audit;
mod config;
mod console;
mod datapath;
mod dev;
mod dev_ssf;
mod dev_ssf_serve;
mod fleet;
mod flows;
mod lock;
mod login;
mod output;
mod policy;
mod sessions;
mod signals;
mod socket;
mod status;
mod table;
mod whois;

use std::{path::PathBuf, process::ExitCode};

use clap::{CommandFactory as _, Parser, Subcommand};

use crate::config::DEFAULT_CONFIG_PATH;
use socket::SocketArg;

#[derive(Debug, Parser)]
#[command(
    name = "flowwarden",
    version,
    about = "Identity-aware flow enforcement agent",
    after_help = "Exit codes: 0 success, 1 failure, 2 usage, 3 not found, 4 permission denied, \
                  5 agent unreachable. With --json, an error is one JSON object on standard \
                  error, {\"error\":{\"message\":…,\"exit_code\":N}}, with the same exit code. \
                  Output cut short by its reader (| head) ends quietly with exit code 0."
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
    Status(status::StatusArgs),
    /// List, inspect and terminate sessions.
    Sessions {
        #[command(subcommand)]
        command: sessions::SessionsCommand,
    },
    /// Flows the kernel holds, with their owners and counters.
    Flows {
        #[command(subcommand)]
        command: flows::FlowsCommand,
    },
    /// Which identity owns a flow: `whois 10.0.0.7:51514 10.0.0.2:22`.
    Whois(whois::WhoisArgs),
    /// The audit log: every decision, who, what, when, from where.
    Audit(audit::AuditArgs),
    /// Check, reload and explain policy.
    Policy {
        #[command(subcommand)]
        command: policy::PolicyCommand,
    },
    /// Inspect, switch or remove the kernel datapath.
    Datapath {
        #[command(subcommand)]
        command: datapath::DatapathCommand,
    },
    /// Check a config file and its policies without starting anything.
    Config {
        #[command(subcommand)]
        command: config::ConfigCommand,
    },
    /// Present a token to an agent and open a session for this host.
    Login(login::LoginArgs),
    /// Serve the web console: live sessions, terminate, audit and policy in a browser.
    Console(console::ConsoleArgs),
    /// Development tools: a stand-in identity provider for demos and tests.
    Dev {
        #[command(subcommand)]
        command: dev::DevCommand,
    },
    /// The fleet over NATS JetStream: hosts, sessions, terminations and policy everywhere.
    Fleet(fleet::FleetArgs),
    /// Locks that keep a user, group, device, source, session or token out.
    Lock {
        #[command(subcommand)]
        command: lock::LockCommand,
    },
    /// Shared Signals (SSF) streams from identity providers.
    Signals {
        #[command(subcommand)]
        command: signals::SignalsCommand,
    },
    /// Print shell completions.
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff), for packaging.
    #[command(hide = true)]
    Man,
}

impl Command {
    /// Whether the command was asked for JSON, so that its errors are JSON too.
    fn json(&self) -> bool {
        match self {
            Self::Status(a) => a.json,
            Self::Sessions { command } => command.json(),
            Self::Flows { command } => command.json(),
            Self::Whois(a) => a.json,
            Self::Audit(a) => a.json,
            Self::Policy { command } => command.json(),
            Self::Datapath { command } => command.json(),
            Self::Login(a) => a.json,
            Self::Fleet(a) => a.json(),
            Self::Lock { command } => command.json(),
            Self::Signals { command } => command.json(),
            Self::Agent { .. }
            | Self::Console(_)
            | Self::Config { .. }
            | Self::Dev { .. }
            | Self::Completions { .. }
            | Self::Man => false,
        }
    }
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
    let json = cli.command.json();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let Some(code) = output::exit_code(&e) else {
                return ExitCode::SUCCESS;
            };
            let message = output::message(&e);
            if json {
                eprintln!("{}", output::error_json(&message, code));
            } else {
                eprintln!("error: {message}");
            }
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
        // The NATS client (fleet commands) logs every connection at info.
        return (EnvFilter::new("info,async_nats=warn"), None);
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
        Command::Status(args) => status::run(socket, &args),
        Command::Sessions { command } => sessions::run(socket, command),
        Command::Flows { command } => flows::run(socket, command),
        Command::Whois(args) => whois::run(socket, &args),
        Command::Audit(args) => audit::run(socket, &args),
        Command::Policy { command } => policy::run(socket, command),
        Command::Datapath { command } => datapath::run(socket, command),
        Command::Config { command } => config::run(command),
        Command::Login(args) => login::run(args),
        Command::Console(args) => console::run(&args),
        Command::Dev { command } => dev::run(command),
        Command::Fleet(args) => fleet::run(args),
        Command::Lock { command } => lock::run(socket, command),
        Command::Signals { command } => signals::run(socket, command),
        Command::Man => {
            let mut roff = Vec::new();
            clap_mangen::Man::new(command()).render(&mut roff)?;
            output::bytes(&roff)
        }
        Command::Completions { shell } => {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command(), "flowwarden", &mut script);
            output::bytes(&script)
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
