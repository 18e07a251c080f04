//! The real `flowwarden agent` process, started inside a test namespace with its own config,
//! policy and pin directory, and stopped (or killed) on purpose or on drop.

use std::{
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, OnceLock},
    time::{Duration, Instant},
};

use crate::netns::Netns;

/// The agent binary: `$FLOWWARDEN_BIN`, or the workspace's debug build, built (or found up to
/// date) once per test process so a test never runs a stale agent.
pub fn agent_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os(AGENT_BIN_ENV) {
            return PathBuf::from(bin);
        }
        let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "-p",
                "flowwarden",
                "--bin",
                "flowwarden",
            ])
            .current_dir(workspace)
            .status()
            .expect("running cargo build for the agent binary");
        assert!(status.success(), "cargo build -p flowwarden failed");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace.join("target"));
        target.join("debug").join("flowwarden")
    })
    .clone()
}

/// The environment variable naming the agent binary to run (see [`agent_bin`]).
pub const AGENT_BIN_ENV: &str = "FLOWWARDEN_BIN";

/// The release agent a benchmark measures: the one `cargo xtask bench` (or `cargo xtask soak`)
/// built and named in `$FLOWWARDEN_BIN` before starting the bench, so that [`agent_bin`] runs
/// it too. A bench builds nothing itself: a cargo build inside a measuring process would
/// compete with it, and would build with whatever profile that process was built with.
///
/// # Errors
/// `$FLOWWARDEN_BIN` is unset (the bench was not started by xtask) or names no file.
pub fn release_agent() -> anyhow::Result<PathBuf> {
    let bin = std::env::var_os(AGENT_BIN_ENV)
        .map(PathBuf::from)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "${AGENT_BIN_ENV} is not set: run benchmarks with `cargo xtask bench NAME` (or \
             `cargo xtask soak`), which builds the release agent and names it there, or set \
             {AGENT_BIN_ENV}=target/release/flowwarden after `cargo build --release -p flowwarden`"
            )
        })?;
    if !bin.is_file() {
        anyhow::bail!(
            "${AGENT_BIN_ENV} names {}, which is not a file",
            bin.display()
        );
    }
    Ok(bin)
}

/// A scratch directory for one agent's config and policies, removed on drop.
pub struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fwtest-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("policies")).expect("creating scratch dir");
        Self { dir }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What the agent under test enforces.
pub struct AgentSetup<'a> {
    pub interface: &'a str,
    pub pin_dir: &'a Path,
    /// Policy file text (resources).
    pub policy: &'a str,
    /// Extra lines for the `[datapath]` table.
    pub datapath_extra: &'a str,
}

/// Writes `agent.toml` and `policies/test.toml` into `scratch`; returns the config path.
pub fn write_config(scratch: &Scratch, setup: &AgentSetup<'_>) -> PathBuf {
    let config = scratch.dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[datapath]\ninterfaces = [\"{}\"]\npin_dir = \"{}\"\n{}\n[policy]\ndir = \"policies\"\n\n\
             [state]\ndir = \"state\"\n\n[api]\nsocket = \"agent.sock\"\n\n\
             [admission]\nlisten = \"127.0.0.1:0\"\n",
            setup.interface,
            setup.pin_dir.display(),
            setup.datapath_extra
        ),
    )
    .expect("writing agent.toml");
    std::fs::write(scratch.dir.join("policies/test.toml"), setup.policy).expect("writing policy");
    config
}

pub struct AgentProcess {
    child: Option<Child>,
    log: Arc<Mutex<Vec<String>>>,
}

impl AgentProcess {
    /// Starts `flowwarden agent --config CONFIG` in `netns` and waits until it logs "ready".
    ///
    /// # Panics
    /// The agent exits or is not ready within 30 s; the panic shows its log.
    pub fn start(netns: &Netns, config: &Path) -> Self {
        let mut agent = Self::spawn(netns, config);
        agent.wait_ready(Duration::from_secs(30));
        agent
    }

    /// Starts `flowwarden agent --config CONFIG` in `netns` and returns at once, for callers
    /// that time the start themselves or kill the agent while it is still starting.
    pub fn spawn(netns: &Netns, config: &Path) -> Self {
        let mut cmd = netns.command(agent_bin().to_str().unwrap());
        cmd.args(["agent", "--config"])
            .arg(config)
            .env("FLOWWARDEN_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawning the agent");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Self {
            child: Some(child),
            log,
        }
    }

    /// Waits until the agent logs "ready".
    ///
    /// # Panics
    /// The agent exits or is not ready within `within`; the panic shows its log.
    pub fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if self.log_contains(" ready") {
                return;
            }
            if let Some(status) = self.exit_status() {
                panic!("agent exited with {status} before ready:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready in {within:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's pid (nsenter execs it, so it is the child's), while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// How the agent exited, if it has (and was not stopped through this handle).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.as_mut()?.try_wait().ok().flatten()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn count_in_log(&self, needle: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(needle))
            .count()
    }

    /// SIGKILL: the agent gets no chance to clean up, as in a crash.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait: a graceful stop. Returns whether it exited successfully.
    pub fn stop(&mut self) -> bool {
        let Some(mut child) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status.success();
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Runs `flowwarden ARGS...` to completion in `netns` (or the host namespace with `None`);
/// returns (success, stdout + stderr).
pub fn run_cli(netns: Option<&Netns>, args: &[&str]) -> (bool, String) {
    let bin = agent_bin();
    let mut cmd = match netns {
        Some(ns) => ns.command(bin.to_str().unwrap()),
        None => Command::new(bin),
    };
    let out = cmd.args(args).output().expect("running flowwarden");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}
