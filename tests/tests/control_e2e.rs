//! The status socket of a real agent: who may read and who may change, and abuse that gets
//! a clear error while the agent keeps answering `status`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    os::unix::net::UnixStream,
    process::Command,
    time::Duration,
};

use flowwarden_tests::{
    agent_proc::agent_bin,
    privileged::require_root,
    stack::{Stack, TokenSpec},
};
use serde_json::{Value, json};

const POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["echo"]
"#;

/// A throwaway system user and groups, removed on drop.
struct TempUser {
    user: String,
    groups: Vec<String>,
}

impl TempUser {
    fn new(user: &str, groups: &[&str]) -> Self {
        let quiet = |c: &mut Command| c.stderr(std::process::Stdio::null()).status();
        let _ = quiet(Command::new("userdel").arg(user));
        for g in groups {
            let _ = quiet(Command::new("groupadd").arg(g));
        }
        let mut cmd = Command::new("useradd");
        cmd.args(["-M", "-s", "/usr/sbin/nologin"]);
        if !groups.is_empty() {
            cmd.args(["-G", &groups.join(",")]);
        }
        assert!(cmd.arg(user).status().unwrap().success(), "useradd {user}");
        Self {
            user: user.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
        }
    }

    /// `flowwarden --socket SOCKET <args>` as this user: (exit code, output).
    fn flowwarden(&self, socket: &std::path::Path, args: &[&str]) -> (i32, String) {
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
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let quiet = |c: &mut Command| c.stderr(std::process::Stdio::null()).status();
        let _ = quiet(Command::new("userdel").arg(&self.user));
        for g in &self.groups {
            let _ = quiet(Command::new("groupdel").arg(g));
        }
    }
}

#[test]
fn readers_read_admins_change_and_strangers_are_refused() {
    if !require_root("readers_read_admins_change_and_strangers_are_refused") {
        return;
    }
    let pid = std::process::id();
    let (read_group, admin_group) = (format!("fwr{pid}"), format!("fwa{pid}"));
    let reader = TempUser::new(&format!("fwread{pid}"), &[&read_group]);
    let admin = TempUser::new(&format!("fwadm{pid}"), &[&read_group, &admin_group]);
    let stranger = TempUser::new(&format!("fwnone{pid}"), &[]);
    let stack = Stack::start_with(
        "acl",
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
    let sock = &stack.socket;
    // The agent's state directory is root's; the socket's directory must let the groups in.
    std::fs::set_permissions(
        &stack.scratch.dir,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    let (code, out) = reader.flowwarden(sock, &["sessions", "list", "--json"]);
    assert_eq!(code, 0, "a reader cannot list: {out}");
    assert!(out.contains(&id), "{out}");
    let (code, out) = reader.flowwarden(sock, &["sessions", "terminate", &id]);
    assert_eq!(
        code, 4,
        "a reader must get 'permission denied' (exit 4): {out}"
    );
    assert!(
        out.contains("permission denied") && out.contains("admin"),
        "{out}"
    );
    let (code, out) = reader.flowwarden(sock, &["datapath", "mode", "monitor"]);
    assert_eq!(code, 4, "{out}");

    let (code, out) = stranger.flowwarden(sock, &["status"]);
    assert_eq!(code, 4, "a stranger must be refused (exit 4): {out}");
    assert!(
        out.contains(&read_group) || out.contains("permission denied"),
        "{out}"
    );

    let (code, out) = admin.flowwarden(
        sock,
        &["sessions", "terminate", &id, "--reason", "acl test"],
    );
    assert_eq!(code, 0, "an admin cannot terminate: {out}");
    let shown = stack.ctl_json(&["sessions", "show", &id]);
    assert_eq!(shown["state"], "terminated");
    let by = shown["ended"]["by"].as_str().unwrap();
    assert!(
        by.starts_with("uid ") && by != "uid 0",
        "the termination records its caller: {by}"
    );
}

/// Sends one raw line and reads one answer line.
fn raw(stream: &mut UnixStream, line: &[u8]) -> Value {
    stream.write_all(line).unwrap();
    stream.write_all(b"\n").unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("not JSON ({e}): {answer:?}"))
}

fn status_ok(stack: &Stack) {
    let v = stack.ctl_json(&["status"]);
    assert!(v["version"].is_string(), "status stopped answering: {v}");
}

#[test]
fn socket_abuse_gets_errors_and_the_agent_keeps_serving() {
    if !require_root("socket_abuse_gets_errors_and_the_agent_keeps_serving") {
        return;
    }
    let stack = Stack::start("abuse", POLICY, "");
    let mut s = UnixStream::connect(&stack.socket).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let cases: [(&[u8], i64, &str); 5] = [
        (b"{not json", -32700, "invalid JSON"),
        (b"[1,2]", -32600, "batch"),
        (
            br#"{"jsonrpc":"2.0","id":1,"method":"sessions.nuke"}"#,
            -32601,
            "sessions.terminate",
        ),
        (
            br#"{"jsonrpc":"2.0","id":2,"method":"sessions.get","params":{"id":"zz"}}"#,
            -32602,
            "session id",
        ),
        (
            br#"{"jsonrpc":"2.0","id":3,"method":"status","params":{"x":1}}"#,
            -32602,
            "x",
        ),
    ];
    for (line, code, hint) in cases {
        let v = raw(&mut s, line);
        assert_eq!(
            v["error"]["code"],
            code,
            "{}: {v}",
            String::from_utf8_lossy(line)
        );
        let msg = v["error"]["message"].as_str().unwrap();
        assert!(
            msg.contains(hint),
            "the error should say what was wrong ({hint}): {msg}"
        );
    }
    // The same connection still works after those errors.
    let v = raw(
        &mut s,
        json!({"jsonrpc": "2.0", "id": 9, "method": "status"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(v["id"], 9);
    assert!(v["result"]["version"].is_string(), "{v}");

    // A 2 MiB line: an error, the connection closes, the agent carries on.
    let mut big = UnixStream::connect(&stack.socket).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let line = vec![b'x'; 2 * 1024 * 1024];
    let _ = big.write_all(&line);
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(
        answer.contains("-32600") && answer.contains("exceeds"),
        "{answer:?}"
    );
    status_ok(&stack);

    // Half-closed: the pending answer still comes.
    let mut half = UnixStream::connect(&stack.socket).unwrap();
    half.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":5,\"method\":\"status\"}\n")
        .unwrap();
    half.shutdown(std::net::Shutdown::Write).unwrap();
    let mut answer = String::new();
    half.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("\"id\":5"), "{answer}");

    // Many clients at once: every one is answered or told the agent is busy.
    let socket = stack.socket.clone();
    let handles: Vec<_> = (0..300)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let Ok(mut c) = UnixStream::connect(&socket) else {
                    return false;
                };
                c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
                let v = raw(
                    &mut c,
                    json!({"jsonrpc": "2.0", "id": i, "method": "status"})
                        .to_string()
                        .as_bytes(),
                );
                v["result"]["version"].is_string()
                    || v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("too many"))
            })
        })
        .collect();
    let answered = handles
        .into_iter()
        .map(|h| h.join().unwrap())
        .filter(|&ok| ok)
        .count();
    assert_eq!(
        answered, 300,
        "some clients got neither an answer nor a busy error"
    );
    status_ok(&stack);
}
