//! Real OpenSSH for the tests: a throwaway `sshd` in the server namespace with its own host
//! key and one authorised user key, and an `ssh` client in the client namespace.

use std::{
    io::{BufRead as _, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use crate::netns::{Netns, run_checked};

pub struct Sshd {
    pub dir: PathBuf,
    child: Child,
}

impl Sshd {
    /// Generates keys and starts `sshd -D` listening on `addr:22` inside `ns`.
    pub fn start(ns: &Netns, dir: PathBuf, addr: std::net::IpAddr) -> Self {
        std::fs::create_dir_all(&dir).unwrap();
        // sshd insists on its privilege separation directory.
        std::fs::create_dir_all("/run/sshd").unwrap();
        for key in ["host_key", "user_key"] {
            let path = dir.join(key);
            if !path.exists() {
                run_checked(
                    Command::new("ssh-keygen")
                        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                        .arg(&path),
                )
                .expect("ssh-keygen");
            }
        }
        std::fs::copy(dir.join("user_key.pub"), dir.join("authorized_keys")).unwrap();
        let config = dir.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "Port 22\nListenAddress {addr}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile {d}/sshd.pid\nPermitRootLogin prohibit-password\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPrintMotd no\nLogLevel ERROR\n",
                d = dir.display()
            ),
        )
        .unwrap();
        let child = ns
            .command("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting sshd");
        let sshd = Self { dir, child };
        // Ready when something listens on port 22 in the namespace.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !listening_on_22(ns) {
            assert!(Instant::now() < deadline, "sshd did not start listening");
            std::thread::sleep(Duration::from_millis(50));
        }
        sshd
    }

    /// An `ssh` command from `client` to root@`addr` running `remote`.
    pub fn ssh(&self, client: &Netns, addr: std::net::IpAddr, remote: &str) -> Command {
        let mut cmd = client.command("ssh");
        cmd.args(["-i"])
            .arg(self.dir.join("user_key"))
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "BatchMode=yes",
                "-o",
                "ConnectTimeout=3",
                "-o",
                "LogLevel=ERROR",
            ])
            .arg(format!("root@{addr}"))
            .arg(remote);
        cmd
    }
}

fn listening_on_22(ns: &Netns) -> bool {
    ns.command("ss")
        .args(["-Htln", "sport = :22"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false)
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `ssh` whose output lines are collected with the time they arrived.
pub struct SshSession {
    pub child: Child,
    /// (line, CLOCK_REALTIME ns when it was read).
    pub lines: Arc<Mutex<Vec<(String, u128)>>>,
    pub stderr: Arc<Mutex<String>>,
}

impl SshSession {
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting ssh");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let sink = Arc::clone(&lines);
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push((line, realtime_ns()));
            }
        });
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    pub fn line_count(&self) -> usize {
        self.lines.lock().unwrap().len()
    }

    /// Waits for the process to exit; None if it is still running after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for SshSession {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// CLOCK_REALTIME in nanoseconds: the clock `date +%s%N` prints on the server side.
pub fn realtime_ns() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}
