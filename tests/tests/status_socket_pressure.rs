//! A read-only user with 300 idle connections to a real agent's status socket cannot lock
//! root out: the user is capped per uid with a specific error, root still reads, lists and
//! terminates, the CLI exits "busy" for the capped user, and the agent warns.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::{net::UnixStream, process::CommandExt as _},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use flowwarden_tests::{
    agent_proc::agent_bin,
    privileged::require_root,
    stack::{Stack, TokenSpec},
};
use serde_json::{Value, json};

const POLICY: &str = flowwarden_tests::stack::ECHO_POLICY;

/// What the agent allows one uid without admin access (`DEFAULT_MAX_PER_UID`).
const PER_UID: usize = 32;
/// The crowd of the report: more than the agent's 256 shared slots.
const CROWD: usize = 300;
/// The CLI's exit code for a busy agent.
const EXIT_BUSY: i32 = 6;

/// A throwaway user in a throwaway read group, removed on drop.
struct Reader {
    user: String,
    group: String,
    uid: u32,
    gid: u32,
    read_gid: u32,
}

impl Reader {
    fn new(user: &str, group: &str) -> Self {
        let quiet = |c: &mut Command| c.stderr(Stdio::null()).status();
        let _ = quiet(Command::new("userdel").arg(user));
        let _ = quiet(Command::new("groupdel").arg(group));
        assert!(
            Command::new("groupadd")
                .arg(group)
                .status()
                .unwrap()
                .success()
        );
        assert!(
            Command::new("useradd")
                .args(["-M", "-s", "/usr/sbin/nologin", "-G", group, user])
                .status()
                .unwrap()
                .success(),
            "useradd {user}"
        );
        let number = |args: &[&str]| -> u32 {
            let out = Command::new(args[0]).args(&args[1..]).output().unwrap();
            let text = String::from_utf8(out.stdout).unwrap();
            let field = text
                .trim()
                .rsplit(':')
                .next()
                .unwrap_or_default()
                .to_owned();
            let field = if args[0] == "getent" {
                text.trim().split(':').nth(2).unwrap_or_default().to_owned()
            } else {
                field
            };
            field
                .parse()
                .unwrap_or_else(|e| panic!("{args:?}: {e}: {text:?}"))
        };
        Self {
            uid: number(&["id", "-u", user]),
            gid: number(&["id", "-g", user]),
            read_gid: number(&["getent", "group", group]),
            user: user.into(),
            group: group.into(),
        }
    }

    /// `flowwarden --socket SOCKET <args>` as this user: (exit code, output).
    fn flowwarden(&self, socket: &Path, args: &[&str]) -> (i32, String) {
        let out = Command::new("runuser")
            .args(["-u", &self.user, "--"])
            .arg(agent_bin())
            .arg("--socket")
            .arg(socket)
            .args(args)
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code().unwrap_or(-1), text)
    }

    /// Opens `n` connections to `socket` as this user, in a child process that holds them
    /// without sending a byte until it is dropped.
    fn hold(&self, socket: &Path, n: usize) -> Holder {
        let (uid, gid, groups) = (self.uid, self.gid, vec![self.read_gid]);
        let mut cmd = Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "hold_connections_child", "--nocapture"])
            .env("FW_HOLD_SOCKET", socket)
            .env("FW_HOLD_COUNT", n.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        // SAFETY: between fork and exec the closure only makes three system calls on memory
        // allocated before the fork (`groups`), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting the holder");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut holder = Holder {
            child,
            stdin: Some(stdin),
            stdout,
        };
        holder.expect_line("HOLD-OPEN");
        holder
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| c.stderr(Stdio::null()).status();
        let _ = quiet(Command::new("userdel").arg(&self.user));
        let _ = quiet(Command::new("groupdel").arg(&self.group));
    }
}

/// The child process holding the connections.
struct Holder {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Holder {
    fn expect_line(&mut self, prefix: &str) -> String {
        loop {
            let mut line = String::new();
            let n = self.stdout.read_line(&mut line).unwrap();
            assert!(n > 0, "the holder ended before printing {prefix}");
            if let Some(rest) = line.trim_end().split_once(prefix) {
                return rest.1.to_owned();
            }
        }
    }

    /// What the holder's connections have seen so far.
    fn report(&mut self) -> Value {
        let stdin = self.stdin.as_mut().unwrap();
        stdin.write_all(b"report\n").unwrap();
        stdin.flush().unwrap();
        serde_json::from_str(&self.expect_line("HOLD-RESULT:")).unwrap()
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        drop(self.stdin.take());
        let _ = self.child.wait();
    }
}

/// Not a test on its own: the body of the child `Reader::hold` starts as the reader. Each
/// report says how many connections are open and silent, how many were refused (with the
/// first refusal), and how many were closed without a word.
#[test]
fn hold_connections_child() {
    let Some(socket) = std::env::var_os("FW_HOLD_SOCKET") else {
        return;
    };
    let n: usize = std::env::var("FW_HOLD_COUNT").unwrap().parse().unwrap();
    let connections: Vec<UnixStream> = (0..n)
        .map(|i| UnixStream::connect(&socket).unwrap_or_else(|e| panic!("connection {i}: {e}")))
        .collect();
    for c in &connections {
        c.set_nonblocking(true).unwrap();
    }
    println!("HOLD-OPEN");
    let mut said: Vec<Option<String>> = vec![None; n];
    let mut closed = vec![false; n];
    for _ in std::io::stdin().lock().lines() {
        let mut open = 0;
        for (i, mut c) in connections.iter().enumerate() {
            let mut buf = [0u8; 4096];
            loop {
                match c.read(&mut buf) {
                    Ok(0) => closed[i] = true,
                    Ok(got) => {
                        let text = said[i].get_or_insert_with(String::new);
                        text.push_str(&String::from_utf8_lossy(&buf[..got]));
                        continue;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => closed[i] = true,
                }
                break;
            }
            if !closed[i] && said[i].is_none() {
                open += 1;
            }
        }
        let refused: Vec<&String> = said.iter().flatten().collect();
        let report = json!({
            "open": open,
            "refused": refused.len(),
            "closed_silently": (0..n).filter(|&i| closed[i] && said[i].is_none()).count(),
            "first_refusal": refused.first().and_then(|l| serde_json::from_str::<Value>(l.trim()).ok()),
        });
        println!("HOLD-RESULT:{report}");
    }
}

#[test]
fn a_reader_with_hundreds_of_idle_connections_cannot_lock_root_out() {
    if !require_root("a_reader_with_hundreds_of_idle_connections_cannot_lock_root_out") {
        return;
    }
    let pid = std::process::id();
    let (read_group, admin_group) = (format!("fwpr{pid}"), format!("fwpa{pid}"));
    let reader = Reader::new(&format!("fwpress{pid}"), &read_group);
    let stack = Stack::start_with(
        "press",
        POLICY,
        "",
        &format!("admin_group = \"{admin_group}\"\nread_group = \"{read_group}\"\n"),
    );
    let token = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &stack.scratch.dir.join("alice"));
    assert!(ok, "{out}");
    let id = stack.ctl_json(&["sessions", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The agent's state directory is root's; the socket's directory must let the group in.
    std::fs::set_permissions(
        &stack.scratch.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let sock = &stack.socket;

    let mut crowd = reader.hold(sock, CROWD);
    // Root's calls are accepted after every connection of the crowd (the listen queue is
    // first come, first served), so the crowd's refusals are all written by then.
    let status = stack.ctl_json(&["status"]);
    assert!(status["version"].is_string(), "{status}");
    let listed = stack.ctl_json(&["sessions", "list"]);
    assert_eq!(listed[0]["id"], json!(id), "{listed}");
    let (ok, out) = stack.ctl(&["sessions", "terminate", &id, "--reason", "crowd test"]);
    assert!(ok, "root could not terminate past the crowd: {out}");
    assert_eq!(
        stack.ctl_json(&["sessions", "show", &id])["state"],
        "terminated"
    );

    let seen = crowd.report();
    assert_eq!(
        (seen["open"].as_u64(), seen["refused"].as_u64()),
        (Some(PER_UID as u64), Some((CROWD - PER_UID) as u64)),
        "the reader should hold exactly its cap, the rest refused: {seen}"
    );
    let refusal = &seen["first_refusal"]["error"];
    assert_eq!(refusal["code"], json!(-32005), "{seen}");
    assert_eq!(
        refusal["message"],
        json!(format!(
            "too many connections from uid {}: at most {PER_UID} at once per user; close some \
             and try again",
            reader.uid
        )),
        "{seen}"
    );
    assert_eq!(
        refusal["data"],
        json!({ "limit": "per_uid", "uid": reader.uid, "max": PER_UID })
    );

    // The same user's CLI is told why, with the busy exit code; other readers are not hit.
    let (code, out) = reader.flowwarden(sock, &["status"]);
    assert_eq!(code, EXIT_BUSY, "{out}");
    assert!(out.contains("too many connections from uid"), "{out}");

    stack.wait_until(Duration::from_secs(10), "a pressure warning", || {
        stack.agent().log().lines().any(|l| {
            l.contains("WARN")
                && l.contains("status socket under pressure: refused a connection")
                && l.contains(&format!("uid={}", reader.uid))
        })
    });
    // Rate-limited: hundreds of refusals, a handful of lines.
    let warnings = stack
        .agent()
        .count_in_log("status socket under pressure: refused a connection");
    assert!(
        (1..=3).contains(&warnings),
        "{warnings} warning lines for {} refusals",
        CROWD - PER_UID
    );
    drop(crowd);
    // The agent sees the crowd's connections close shortly after, not at once.
    stack.wait_until(
        Duration::from_secs(10),
        "the reader reading again once its connections are gone",
        || reader.flowwarden(sock, &["status"]).0 == 0,
    );
}
