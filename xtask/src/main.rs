//! flowwarden's task runner, invoked as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! It depends on no workspace crate so that it builds on a fresh machine, before the eBPF
//! toolchain that `setup` installs exists.

mod cmd;
mod fuzz;
mod install;
mod run;
mod setup;

use std::{ffi::OsString, process::ExitCode};

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(bin_name = "cargo xtask", about = "flowwarden development tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing to build and test (rust-src, bpf-linker, Debian packages, bpffs).
    Setup,
    /// Run setup, build the workspace, then unit tests, the privileged integration tests and a
    /// short fuzz pass.
    Test {
        /// Only run tests whose name contains this string (in both test runs).
        #[arg(long, value_name = "NAME")]
        filter: Option<String>,
    },
    /// Run setup, then a benchmark; results go to target/bench/<name>.json.
    Bench {
        /// Which benchmark to run: datapath, admission, policy, revoke, scale, flood,
        /// throughput (iperf3 over veth at each ingress mode) or console (the web console's
        /// first screen with 100,000 sessions).
        name: String,
        /// Forwarded to the benchmark as `--repeat N`.
        #[arg(long, value_name = "N")]
        repeat: Option<u32>,
        /// Forwarded to the benchmark as `--runs N`.
        #[arg(long, value_name = "N")]
        runs: Option<u32>,
        /// Further arguments for the benchmark itself, after `--` (e.g. `revoke -- --idle
        /// default`).
        #[arg(last = true)]
        args: Vec<OsString>,
    },
    /// Run setup, then the crash-consistency soak: SIGKILLs of a real agent at random moments
    /// of admissions, terminations and reloads, 100 per fresh stack; counts go to
    /// target/bench/soak.json (rewritten after every 100).
    Soak {
        /// Kills in the middle of operations (kills during restarts come on top).
        #[arg(long, value_name = "N", default_value_t = 1000)]
        kills: u32,
    },
    /// Run setup, then the demo; further arguments go to the demo.
    Demo {
        /// Arguments for the demo binary.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Build the cargo-fuzz targets (fuzz/) and run each for a while; figures go to
    /// target/bench/fuzz.json, and any crash fails the command.
    Fuzz {
        /// How long each target runs.
        #[arg(long, value_name = "N", default_value_t = 60)]
        seconds: u32,
        /// Only this target (repeatable): token, jsonrpc, policy or admission.
        #[arg(long = "target", value_name = "T")]
        targets: Vec<String>,
    },
    /// Lint the user-space crates (stable) and the eBPF crate (nightly, BPF target).
    Clippy,
    /// Build a release binary and install it with its man page, completions, systemd unit,
    /// reference config (kept if present) and documentation.
    Install {
        /// Staging root for packaging; `/` installs for real.
        #[arg(long, default_value = "/")]
        destdir: std::path::PathBuf,
        #[arg(long, default_value = "/usr/local")]
        prefix: std::path::PathBuf,
        #[arg(long, default_value = "/etc/flowwarden")]
        etc: std::path::PathBuf,
        #[arg(long, default_value = "/etc/systemd/system")]
        unit_dir: std::path::PathBuf,
        /// Install this binary instead of building a release one.
        #[arg(long)]
        binary: Option<std::path::PathBuf>,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Task::Setup => setup::setup(),
        Task::Test { filter } => run::test(filter.as_deref()),
        Task::Bench {
            name,
            repeat,
            runs,
            args,
        } => run::bench(&name, repeat, runs, &args),
        Task::Soak { kills } => run::soak(kills),
        Task::Demo { args } => run::demo(&args),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(&fuzz::FuzzArgs {
            seconds,
            targets: &targets,
        }),
        Task::Clippy => run::clippy(),
        Task::Install {
            destdir,
            prefix,
            etc,
            unit_dir,
            binary,
        } => install::install(&install::InstallArgs {
            destdir,
            prefix,
            etc,
            unit_dir,
            binary,
        }),
    };
    // Print the error chain ourselves: returning it from main would also dump a backtrace
    // whenever RUST_BACKTRACE is set, burying the actionable message.
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = cmd::exit_code(&e);
            if code == cmd::EXIT_INTERRUPTED {
                // The child has said what it cleaned up; this was no failure to report.
                eprintln!("xtask: interrupted");
            } else {
                eprintln!("error: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}
