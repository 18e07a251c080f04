//! The `flowwarden` binary: the agent daemon and its command line.

fn main() -> std::process::ExitCode {
    // Every descriptor the hard limit allows, before anything opens one: the agent budgets
    // them (admission connections get what is left after a reserve). A failure leaves the
    // soft limit as it was; the agent then budgets within that, and logs what it has.
    let _ = flowwarden::admission::raise_open_files();
    flowwarden::cli::main()
}
