//! The `flowwarden` binary: the agent daemon and its command line.

fn main() -> std::process::ExitCode {
    flowwarden::cli::main()
}
