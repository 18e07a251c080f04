//! The web console's browser tests' machinery: a Playwright script under tests/console/
//! driving the system's Chromium, talking to the Rust test in lines, and processes killed
//! when the test ends.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

/// Where the browser tests leave their screenshots: `target/screenshots`, or the
/// documentation's own `docs/img` with `FLOWWARDEN_SCREENSHOTS=docs` (to refresh the pictures
/// the docs show). Tests never rewrite tracked files unless asked to.
///
/// # Panics
/// The directory cannot be created.
pub fn screenshots() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dir = if std::env::var("FLOWWARDEN_SCREENSHOTS").is_ok_and(|v| v == "docs") {
        root.join("docs/img")
    } else {
        root.join("target/screenshots")
    };
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// A process killed when the test ends, however it ends.
pub struct Killed(pub Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `flowwarden console --config <config>`, its log in `log`.
///
/// # Panics
/// It cannot be started.
pub fn start_console(config: &Path, log: &Path) -> Killed {
    Killed(
        Command::new(crate::agent_proc::agent_bin())
            .args(["console", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(log).expect("the console's log"))
            .spawn()
            .expect("starting flowwarden console"),
    )
}

/// A browser script (tests/console/<script>), talking in lines.
pub struct Browser {
    _child: Killed,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Browser {
    /// Starts `script` with CONSOLE_URL, CHROMIUM, SHOTS and `env` set.
    ///
    /// # Panics
    /// No Chromium, or python3 cannot start.
    pub fn start(script: &str, url: &str, shots: &Path, env: &[(&str, &str)]) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("console")
            .join(script);
        let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
        assert!(
            Path::new(&chromium).exists(),
            "no Chromium at {chromium}: run `cargo xtask setup` (Debian package chromium)"
        );
        let mut child = Command::new("python3")
            .arg(&script)
            .env("CONSOLE_URL", url)
            .env("CHROMIUM", &chromium)
            .env("SHOTS", shots)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting python3 (run `cargo xtask setup` for Playwright)");
        let stdin = child.stdin.take().unwrap();
        let out = child.stdout.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self {
            _child: Killed(child),
            stdin,
            lines,
        }
    }

    /// Waits for `want` from the script; its `FAIL` line is the test's failure.
    ///
    /// # Panics
    /// The script says something else, or nothing within 3 minutes.
    pub fn expect(&self, want: &str, console_log: &Path) {
        let line = self
            .lines
            .recv_timeout(Duration::from_secs(180))
            .unwrap_or_else(|e| {
                panic!("the browser script said nothing while we waited for {want}: {e}")
            });
        assert_eq!(
            line,
            want,
            "the browser script failed; console log:\n{}",
            std::fs::read_to_string(console_log).unwrap_or_default()
        );
    }

    /// Sends a line to the script.
    ///
    /// # Panics
    /// The script is gone.
    pub fn tell(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
        self.stdin.flush().unwrap();
    }
}
