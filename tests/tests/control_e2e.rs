//! The status socket of a real agent: who may read and who may change, and abuse that gets
//! a clear error while the agent keeps answering `status`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::SocketAddr,
    os::unix::net::UnixStream,
    process::{Command, Stdio},
    time::Duration,
};

use flowwarden_tests::{
    agent_proc::agent_bin,
    privileged::require_root,
    stack::{Stack, TokenSpec},
    tcp,
};
use serde_json::{Value, json};

const POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[resource]]
name = "admin-console"
protocol = "tcp"
ports = [7001]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["echo"]

[[rule]]
name = "admins"
groups = ["admins"]
resources = ["admin-console"]
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
        out.contains("permission denied") && out.contains(&format!("the {admin_group} group")),
        "the refusal names the configured admin group {admin_group}: {out}"
    );
    // Under --json the same refusal is one JSON object (on stderr), with the same exit code.
    let (code, out) = reader.flowwarden(sock, &["sessions", "terminate", &id, "--json"]);
    assert_eq!(code, 4, "{out}");
    let err: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("an error under --json is JSON ({e}): {out}"));
    assert_eq!(err["error"]["exit_code"], 4, "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains(&admin_group)),
        "{err}"
    );
    let (code, out) = reader.flowwarden(sock, &["datapath", "mode", "monitor"]);
    assert_eq!(code, 4, "{out}");

    let (code, out) = stranger.flowwarden(sock, &["status"]);
    assert_eq!(code, 4, "a stranger must be refused (exit 4): {out}");
    assert!(
        out.contains("permission denied") && out.contains(&format!("the {read_group} group")),
        "a stranger is told to join the configured read group {read_group}: {out}"
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

const STATUS_SOCKET_DOC: &str = include_str!("../../docs/status-socket.md");

/// The documented request and answer lines, in pairs (notifications left out).
fn documented_pairs() -> Vec<(Value, Value)> {
    let mut lines = Vec::new();
    let mut inside = false;
    for line in STATUS_SOCKET_DOC.lines() {
        match line.trim() {
            "```json" => inside = true,
            "```" => inside = false,
            l if inside && !l.is_empty() => lines.push(l.to_owned()),
            _ => {}
        }
    }
    let values: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    values
        .iter()
        .enumerate()
        .filter(|(_, v)| v.get("method").is_some() && v.get("id").is_some())
        .map(|(i, v)| (v.clone(), values[i + 1].clone()))
        .collect()
}

/// Keys an answer leaves out when they have no value (`skip_serializing_if`).
const OPTIONAL: &[&str] = &["idle_ms", "outcome", "email", "ended", "previous_sources"];

/// Whether a live answer has the documented shape: every documented key (but optional ones)
/// is there with the same kind of value, and an object written out in full (no `"…"` key)
/// has no key the docs do not show. Values may differ.
fn shape_errors(doc: &Value, live: &Value, at: &str, errors: &mut Vec<String>) {
    match (doc, live) {
        (Value::Null, _) | (_, Value::Null) => {}
        (Value::Object(d), Value::Object(l)) => {
            for (k, dv) in d.iter().filter(|(k, _)| *k != "…") {
                match l.get(k) {
                    Some(lv) => shape_errors(dv, lv, &format!("{at}.{k}"), errors),
                    None if OPTIONAL.contains(&k.as_str()) => {}
                    None => errors.push(format!("{at}.{k}: documented, not answered")),
                }
            }
            if !d.contains_key("…") {
                for k in l.keys().filter(|k| !d.contains_key(*k)) {
                    errors.push(format!("{at}.{k}: answered, not documented"));
                }
            }
        }
        (Value::Array(d), Value::Array(l)) => {
            if let (Some(d), Some(l)) = (d.first(), l.first()) {
                shape_errors(d, l, &format!("{at}[0]"), errors);
            }
        }
        (Value::Bool(_), Value::Bool(_))
        | (Value::Number(_), Value::Number(_))
        | (Value::String(_), Value::String(_)) => {}
        (d, l) => errors.push(format!("{at}: documented {d}, answered {l}")),
    }
}

/// Every request of docs/status-socket.md, sent as written (ids, addresses and paths swapped
/// for this agent's), gets an answer of the documented shape from a live agent.
#[test]
fn documented_examples_replay_against_a_live_agent() {
    if !require_root("documented_examples_replay_against_a_live_agent") {
        return;
    }
    let stack = Stack::start("docs-replay", POLICY, "");
    let token = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &stack.scratch.dir.join("alice"));
    assert!(ok, "{out}");
    let id = stack.ctl_json(&["sessions", "list"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // A live flow, for flows.list and whois.
    let server_end = SocketAddr::new(stack.pair.server_addr.into(), 7000);
    let listener = tcp::listen(&stack.pair.server, server_end);
    let client = tcp::connect(&stack.pair.client, server_end, Duration::from_secs(5))
        .expect("the session's flow connects");
    let _accepted = tcp::accept(&listener, Duration::from_secs(5)).expect("accepted");
    let client_end = client.local_addr().unwrap();
    // A candidate that drops the rule alice's session rests on.
    let candidate = stack.scratch.dir.join("candidate");
    std::fs::create_dir_all(&candidate).unwrap();
    std::fs::write(
        candidate.join("test.toml"),
        POLICY.replace("resources = [\"echo\"]", "resources = [\"admin-console\"]"),
    )
    .unwrap();

    // Reads first, then the changes, so that each example meets the state it shows.
    let order = [
        "status",
        "sessions.list",
        "flows.list",
        "whois",
        "policy.check",
        "policy.explain",
        "datapath.mode",
        "signals.status",
        "sessions.nuke",
        "sessions.terminate",
        "sessions.get",
        "audit.query",
        "audit.subscribe",
        "policy.reload",
        "lock.add",
        "lock.list",
        "lock.show",
        "lock.remove",
        "console.refused",
    ];
    let mut pairs = documented_pairs();
    pairs.sort_by_key(|(req, _)| {
        let m = req["method"].as_str().unwrap();
        order
            .iter()
            .position(|o| *o == m)
            .unwrap_or_else(|| panic!("no place in the replay for {m}"))
    });
    let mut conn = UnixStream::connect(&stack.socket).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut errors = Vec::new();
    // The documented lock id stands for the one lock.add answers with.
    let mut lock_id = "lk-5e551000000000a1".to_owned();
    for (request, documented) in &pairs {
        let method = request["method"].as_str().unwrap();
        let line = request
            .to_string()
            .replace("5e55100000000001", &id)
            .replace("/var/tmp/candidate", candidate.to_str().unwrap())
            .replace("10.0.0.7:51514", &client_end.to_string())
            .replace("10.0.0.2:22", &server_end.to_string())
            .replace("lk-5e551000000000a1", &lock_id);
        let answer = if method == "audit.subscribe" {
            // A subscription keeps its connection: a connection of its own.
            let mut sub = UnixStream::connect(&stack.socket).unwrap();
            sub.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            raw(&mut sub, line.as_bytes())
        } else {
            raw(&mut conn, line.as_bytes())
        };
        assert_eq!(answer["id"], request["id"], "{line} → {answer}");
        if method == "lock.add"
            && let Some(id) = answer["result"]["lock"]["id"].as_str()
        {
            lock_id = id.to_owned();
        }
        match (documented.get("error"), answer.get("error")) {
            (Some(doc), Some(live)) => assert_eq!(doc, live, "{line}"),
            (None, None) => shape_errors(
                &documented["result"],
                &answer["result"],
                method,
                &mut errors,
            ),
            _ => panic!("{line}: documented {documented}, answered {answer}"),
        }
    }
    assert!(
        errors.is_empty(),
        "the live answers differ from docs/status-socket.md:\n{}",
        errors.join("\n")
    );
    let (ok, out) = stack.ctl(&["datapath", "mode", "enforce"]);
    assert!(ok, "{out}");
}

/// Runs the CLI with its standard output a pipe whose reader is gone: (exit code, stderr).
fn into_closed_pipe(args: &[&str]) -> (Option<i32>, String) {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = Command::new(agent_bin())
        .args(args)
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `flowwarden … | head` must not panic with "failed printing to stdout": a reader that goes
/// away ends the command quietly, with exit code 0.
#[test]
fn output_into_a_closed_pipe_ends_quietly() {
    if !require_root("output_into_a_closed_pipe_ends_quietly") {
        return;
    }
    let stack = Stack::start("epipe", POLICY, "");
    let token = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &stack.scratch.dir.join("alice"));
    assert!(ok, "{out}");
    // The reconnect seed is a credential: never printed, kept in the cache file only.
    assert!(
        !out.contains("seed"),
        "login --json printed the seed: {out}"
    );
    let socket = stack.socket.to_str().unwrap();
    for args in [
        &["--socket", socket, "status"][..],
        &["--socket", socket, "sessions", "list"],
        &["--socket", socket, "sessions", "list", "--json"],
        &["--socket", socket, "audit"],
        &["completions", "bash"],
    ] {
        let (code, stderr) = into_closed_pipe(args);
        assert_eq!(
            (code, stderr.as_str()),
            (Some(0), ""),
            "flowwarden {args:?} into a closed pipe"
        );
    }
    // A limit above the documented maximum is refused, not silently lowered.
    let (ok, out) = stack.ctl(&["audit", "--limit", "20000"]);
    assert!(
        !ok && out.contains("limit 20000 is above the maximum of 10000"),
        "{out}"
    );
}
