//! What the CLI writes: lines and JSON on standard output, a reader that went away (`| head`)
//! ending the command quietly instead of a panic, and errors in words or, under `--json`, as
//! one JSON object on standard error.

use std::io::{self, Write as _};

use serde::Serialize;

/// Writes one formatted line to standard output; evaluates to `anyhow::Result<()>`, where a
/// closed pipe is [`StdoutClosed`].
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::cli::output::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;

/// Standard output was closed by its reader: the command stops without a word, since there is
/// nobody left to tell, and exits 0, since the reader chose to stop reading.
#[derive(Debug, thiserror::Error)]
#[error("standard output was closed by its reader")]
pub struct StdoutClosed;

/// A CLI failure with the exit code it deserves.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Failure {
    pub message: String,
    pub code: u8,
}

/// Exit codes beyond 0 (success), 1 (failure) and 2 (usage), so scripts can tell causes apart.
pub const EXIT_NOT_FOUND: u8 = 3;
pub const EXIT_PERMISSION: u8 = 4;
pub const EXIT_UNREACHABLE: u8 = 5;
/// The agent refused the connection for now (its connection limits); trying later can work.
pub const EXIT_BUSY: u8 = 6;

fn stdout_error(e: io::Error) -> anyhow::Error {
    if e.kind() == io::ErrorKind::BrokenPipe {
        StdoutClosed.into()
    } else {
        anyhow::Error::new(e).context("writing to standard output")
    }
}

/// One line on standard output.
///
/// # Errors
/// [`StdoutClosed`] when the reader has gone; the write error otherwise.
pub fn line(args: std::fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

/// Text as it is (it carries its own newlines).
///
/// # Errors
/// As [`line`].
pub fn text(s: &str) -> anyhow::Result<()> {
    io::stdout()
        .lock()
        .write_all(s.as_bytes())
        .map_err(stdout_error)
}

/// Bytes as they are (man pages, completions).
///
/// # Errors
/// As [`line`].
pub fn bytes(b: &[u8]) -> anyhow::Result<()> {
    io::stdout().lock().write_all(b).map_err(stdout_error)
}

/// A value as pretty JSON, the `--json` form of every read.
///
/// # Errors
/// As [`line`].
pub fn json<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    line(format_args!("{}", serde_json::to_string_pretty(v)?))
}

/// A value as one JSON line (streams).
///
/// # Errors
/// As [`line`].
pub fn json_line<T: Serialize + ?Sized>(v: &T) -> anyhow::Result<()> {
    line(format_args!("{}", serde_json::to_string(v)?))
}

/// How a failed command ends: its message, and the exit code for it.
pub fn exit_code(e: &anyhow::Error) -> Option<u8> {
    if e.downcast_ref::<StdoutClosed>().is_some() {
        return None;
    }
    Some(e.downcast_ref::<Failure>().map_or(1, |f| f.code))
}

/// The error's message with the causes whose text it does not already carry.
pub fn message(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let c = cause.to_string();
        if !message.contains(&c) {
            message.push_str(": ");
            message.push_str(&c);
        }
    }
    message
}

/// The error as `--json` prints it on standard error: `{"error": {"message", "exit_code"}}`.
pub fn error_json(message: &str, code: u8) -> String {
    serde_json::json!({ "error": { "message": message, "exit_code": code } }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_closed_stdout_is_quiet_and_failures_keep_their_code() {
        let closed = stdout_error(io::Error::from(io::ErrorKind::BrokenPipe));
        assert_eq!(exit_code(&closed), None);
        let other = stdout_error(io::Error::from(io::ErrorKind::StorageFull));
        assert_eq!(exit_code(&other), Some(1));
        let f: anyhow::Error = Failure {
            message: "no session 1".into(),
            code: EXIT_NOT_FOUND,
        }
        .into();
        assert_eq!(exit_code(&f), Some(EXIT_NOT_FOUND));
    }

    #[test]
    fn errors_under_json_are_one_object() {
        let line = error_json("permission denied: \"x\"", EXIT_PERMISSION);
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": {"message": "permission denied: \"x\"", "exit_code": 4}})
        );
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(message(&e), "outer: inner");
    }
}
