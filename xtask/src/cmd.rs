//! Small helpers for running child processes with readable errors.

use std::{
    ffi::OsStr,
    os::unix::process::ExitStatusExt as _,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
};

use anyhow::{Context as _, Result, bail};

/// Exit code of a process ended by Ctrl-C (128 + SIGINT), which xtask passes on.
pub const EXIT_INTERRUPTED: u8 = 130;

/// A child process that did not exit successfully.
#[derive(Debug)]
pub struct Failed {
    pub shown: String,
    pub status: ExitStatus,
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "`{}` failed ({})", self.shown, self.status)
    }
}

impl std::error::Error for Failed {}

impl Failed {
    /// Ended by Ctrl-C: killed by SIGINT, or exited with 130 after cleaning up (the demo).
    pub fn interrupted(&self) -> bool {
        self.status.code() == Some(i32::from(EXIT_INTERRUPTED))
            || self.status.signal() == Some(libc::SIGINT)
    }
}

/// The exit code for an error of a task: 130 when a child was interrupted (so that shells
/// and CI see an interruption, not a failure), 1 otherwise.
pub fn exit_code(error: &anyhow::Error) -> u8 {
    match error.chain().find_map(|e| e.downcast_ref::<Failed>()) {
        Some(failed) if failed.interrupted() => EXIT_INTERRUPTED,
        _ => 1,
    }
}

/// The workspace root: xtask lives one level below it, and every command runs from there so
/// relative paths (target/, policies/) mean the same thing whatever the caller's directory.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask's manifest directory has a parent")
        .to_path_buf()
}

/// A `cargo` command for the workspace, run from the workspace root.
///
/// Plain `cargo` resolves through rustup to the default (stable) toolchain, which is what
/// builds the user-space crates; `+nightly` is added by callers that need it.
pub fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("cargo");
    cmd.args(args).current_dir(workspace_root());
    cmd
}

/// Renders a command the way a user would type it, for banners and error messages.
pub fn display(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || c == '\'') {
            format!("'{}'", a.replace('\'', r"'\''"))
        } else {
            a.into_owned()
        }
    }));
    parts.join(" ")
}

/// Runs a command with inherited stdio (so cargo's progress and test output stream live) and
/// fails if it does not exit successfully.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = display(cmd);
    let mut child = cmd
        .stdin(Stdio::inherit())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("could not start `{shown}` (is it installed and on PATH?)"))?;
    // Ctrl-C reaches the child too (same process group). Ignore it here, after the spawn so
    // the child keeps the default, so that xtask waits for the child to finish cleaning up
    // (the demo removes its namespaces and pins) instead of returning the prompt first.
    // SAFETY: signal(2) with SIG_IGN/SIG_DFL installs no handler code of ours.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_IGN) };
    let status = child.wait();
    // SAFETY: as above.
    unsafe { libc::signal(libc::SIGINT, libc::SIG_DFL) };
    let status = status.with_context(|| format!("waiting for `{shown}`"))?;
    if !status.success() {
        return Err(Failed { shown, status }.into());
    }
    Ok(())
}

/// Test counts summed from cargo's `test result:` lines.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tally {
    pub passed: u64,
    pub failed: u64,
}

impl Tally {
    /// Adds the counts of one `test result: ok. 3 passed; 0 failed; ...` line.
    pub fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split(';') {
            let mut words = part.split_whitespace().rev();
            let (Some(what), Some(n)) = (words.next(), words.next()) else {
                continue;
            };
            let Ok(n) = n.parse::<u64>() else { continue };
            match what {
                "passed" => self.passed += n,
                "failed" => self.failed += n,
                _ => {}
            }
        }
    }
}

/// Like [`run`], but echoes stdout line by line while adding up cargo's test counts.
pub fn run_counting(cmd: &mut Command, tally: &mut Tally) -> Result<()> {
    use std::io::{BufRead as _, BufReader};
    let shown = display(cmd);
    let mut child = cmd
        .stdin(Stdio::inherit())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("could not start `{shown}` (is it installed and on PATH?)"))?;
    let stdout = child.stdout.take().expect("piped stdout");
    for line in BufReader::new(stdout)
        .lines()
        .map_while(std::result::Result::ok)
    {
        println!("{line}");
        tally.add_line(&line);
    }
    let status = child
        .wait()
        .with_context(|| format!("waiting for `{shown}`"))?;
    if !status.success() {
        return Err(Failed { shown, status }.into());
    }
    Ok(())
}

/// Runs a command quietly and returns its stdout; on failure the error carries its stderr.
pub fn output(cmd: &mut Command) -> Result<String> {
    let shown = display(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("could not start `{shown}` (is it installed and on PATH?)"))?;
    if !out.status.success() {
        bail!(
            "`{shown}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether this process runs as root: /proc/self is owned by the effective uid, which avoids
/// pulling in libc just for geteuid().
pub fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt as _;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Prints a numbered banner before a long step so its output is easy to find in CI logs.
pub fn banner(step: usize, total: usize, what: &str, cmd: &Command) {
    println!();
    println!("==> [{step}/{total}] {what}: {}", display(cmd));
}

#[cfg(test)]
mod exit_tests {
    use super::*;

    fn run_sh(script: &str) -> anyhow::Error {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        run(&mut cmd).expect_err("the script fails")
    }

    #[test]
    fn an_interrupted_child_makes_xtask_exit_130() {
        // The demo cleans up after Ctrl-C and exits with 130.
        let e = run_sh("exit 130").context("demo step");
        assert_eq!(exit_code(&e), 130, "{e:#}");
        // A child killed by SIGINT outright.
        let e = run_sh("kill -INT $$");
        assert_eq!(exit_code(&e), 130, "{e:#}");
    }

    #[test]
    fn other_failures_exit_1() {
        assert_eq!(exit_code(&run_sh("exit 3")), 1);
        assert_eq!(exit_code(&anyhow::anyhow!("no such bench")), 1);
    }
}

#[cfg(test)]
mod tally_tests {
    use super::Tally;

    #[test]
    fn sums_cargo_test_result_lines() {
        let mut t = Tally::default();
        t.add_line("test result: ok. 3 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out");
        t.add_line("test result: FAILED. 9 passed; 1 failed; 0 ignored; 0 measured");
        t.add_line("running 3 tests");
        assert_eq!(
            t,
            Tally {
                passed: 12,
                failed: 1
            }
        );
    }
}
