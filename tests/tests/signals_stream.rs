//! Stream management (SSF 1.0 §8.1) against a transmitter: `flowwarden dev ssf serve`, with
//! its management API behind a bearer token. The agent finds or creates its stream, checks
//! it, asks for verification, polls it (or is pushed to), follows its status, and across a
//! `kill -9` reads the same stream again, neither losing nor re-applying an event.

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::{Path, PathBuf},
    process::Stdio,
    time::Duration,
};

use flowwarden_tests::{
    agent_proc::agent_bin,
    console::Killed,
    privileged::require_root,
    stack::{ADMISSION_PORT, AUDIENCE, ECHO_POLICY, Stack, TokenSpec, cli},
};
use serde_json::Value;

/// Where the transmitter listens, on the server namespace's loopback (plain HTTP is accepted
/// for loopback only).
const TX_PORT: u16 = 8099;

struct Managed {
    stack: Stack,
    dir: PathBuf,
    queue: PathBuf,
    bearer: String,
    issuer: String,
    transmitter: Option<Killed>,
}

/// A stack whose agent manages its stream at the dev transmitter (not started yet).
fn prepare(tag: &str, delivery: &str) -> Managed {
    let dir = std::env::temp_dir().join(format!("fw-ssfm-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, out) = cli(&["dev", "ssf", "keygen", "--dir", dir.to_str().unwrap()]);
    assert!(ok, "dev ssf keygen: {out}");
    let bearer = format!("manage-{}", flowwarden::signals::dev::random_jti());
    std::fs::write(dir.join("bearer"), &bearer).unwrap();
    std::fs::write(dir.join("push-authorization"), "Bearer push-secret-7").unwrap();
    let issuer = format!("http://127.0.0.1:{TX_PORT}");
    let delivery_lines = match delivery {
        "push" => format!(
            "push_authorization_file = \"{}\"\npush_endpoint = \"https://{{server}}:{ADMISSION_PORT}/v1/ssf/events\"\n",
            dir.join("push-authorization").display()
        ),
        _ => "delivery = \"poll\"\npoll_interval_secs = 1\n".to_owned(),
    };
    let transmitter = format!(
        r#"
[[signals.transmitter]]
issuer = "{issuer}"
audience = "{AUDIENCE}"
algorithms = ["RS256"]
discovery = true
manage_stream = true
bearer_token_file = "{bearer}"
refresh_secs = 10
{delivery_lines}"#,
        bearer = dir.join("bearer").display(),
    );
    let stack = Stack::prepare(tag, ECHO_POLICY, "", "");
    let text = std::fs::read_to_string(&stack.config).unwrap()
        + &transmitter.replace("{server}", &stack.pair.server_addr.to_string());
    std::fs::write(&stack.config, text).unwrap();
    let queue = dir.join("queue");
    Managed {
        stack,
        dir,
        queue,
        bearer,
        issuer,
        transmitter: None,
    }
}

impl Managed {
    fn start_transmitter(&mut self, agent_fingerprint: Option<&str>) {
        let bin = agent_bin();
        let mut cmd = self.stack.pair.server.command(bin.to_str().unwrap());
        cmd.args(["dev", "ssf", "serve", "--listen"])
            .arg(format!("127.0.0.1:{TX_PORT}"))
            .arg("--dir")
            .arg(&self.dir)
            .arg("--queue")
            .arg(&self.queue)
            .args(["--issuer", &self.issuer, "--audience", AUDIENCE])
            .arg("--bearer-file")
            .arg(self.dir.join("bearer"));
        if let Some(fp) = agent_fingerprint {
            cmd.args(["--agent-fingerprint", fp]);
        }
        let child = cmd
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.join("transmitter.log")).unwrap())
            .spawn()
            .expect("starting dev ssf serve");
        self.transmitter = Some(Killed(child));
    }

    /// One request to the transmitter with the management token: (status, JSON body).
    fn tx(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let bearer = self.bearer.clone();
        let (method, path) = (method.to_owned(), path.to_owned());
        self.stack.pair.server.run(move || {
            let mut s = TcpStream::connect(("127.0.0.1", TX_PORT)).expect("the transmitter");
            let body = body.map(|b| b.to_string()).unwrap_or_default();
            write!(
                s,
                "{method} {path} HTTP/1.1\r\nhost: tx\r\nauthorization: Bearer {bearer}\r\n\
                 content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            let mut answer = String::new();
            s.read_to_string(&mut answer).unwrap();
            let status = answer[9..12].parse().unwrap();
            let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            (status, serde_json::from_str(body).unwrap_or(Value::Null))
        })
    }

    fn streams(&self) -> Vec<Value> {
        let (status, v) = self.tx("GET", "/streams", None);
        assert_eq!(status, 200, "{v}");
        v.as_array().cloned().unwrap_or_default()
    }

    fn stream_status(&self) -> Value {
        self.stack.ctl_json(&["signals", "status"])["transmitters"][0].clone()
    }

    /// Waits until the agent's view of its stream satisfies `check`.
    fn wait_stream(&self, what: &str, within: Duration, check: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        self.stack.wait_until(within, what, || {
            last = self.stream_status();
            check(&last)
        });
        last
    }

    /// Queues a SET at the transmitter (`dev ssf set --queue`); answers its jti.
    fn queue(&self, args: &[&str]) -> String {
        let mut all = vec![
            "dev",
            "ssf",
            "set",
            "--dir",
            self.dir.to_str().unwrap(),
            "--issuer",
            &self.issuer,
            "--queue",
            self.queue.to_str().unwrap(),
        ];
        all.extend_from_slice(args);
        let (ok, out) = cli(&all);
        assert!(ok, "dev ssf set: {out}");
        out.trim().to_owned()
    }

    fn queue_empty(&self) -> bool {
        std::fs::read_dir(&self.queue).map_or(true, |d| {
            d.filter_map(Result::ok)
                .all(|e| e.path().extension().is_none_or(|x| x != "set"))
        })
    }

    fn login(&self, email: &str, cache: &str) -> Result<String, String> {
        let token = self.stack.fresh_token(&TokenSpec::user(email, &["ops"]));
        let (ok, out) = self
            .stack
            .login(&token, &self.stack.scratch.dir.join(cache));
        if !ok {
            return Err(out);
        }
        let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        Ok(v["session"].as_str().unwrap().to_owned())
    }

    fn state(&self, id: &str) -> String {
        self.stack.ctl_json(&["sessions", "show", id])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

fn verified(s: &Value) -> bool {
    s["stream_id"].is_string() && s["counts"]["verification verified"].as_u64() >= Some(1)
}

fn log_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("transmitter.log")).unwrap_or_default()
}

#[test]
fn a_managed_poll_stream_is_created_verified_polled_followed_and_read_again_after_kill_9() {
    if !require_root("a_managed_poll_stream") {
        return;
    }
    let mut m = prepare("ssfm-poll", "poll");
    m.start_transmitter(None);
    m.stack.start_agent();

    // Created once, verified with the agent's own state, described in `signals status`.
    let s = m.wait_stream(
        "the stream is created and verified",
        Duration::from_secs(20),
        verified,
    );
    let streams = m.streams();
    assert_eq!(streams.len(), 1, "one stream: {streams:?}");
    let id = streams[0]["stream_id"].as_str().unwrap().to_owned();
    assert_eq!(s["stream_id"], id.as_str());
    assert_eq!(s["stream_status"], "enabled");
    assert_eq!(streams[0]["delivery"]["method"], "urn:ietf:rfc:8936");
    assert!(
        streams[0]["events_requested"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.as_str().unwrap().ends_with("/session-revoked")),
        "the agent asks for the events it acts on: {}",
        streams[0]
    );

    // An event queued at the transmitter is polled and acted on.
    let alice = m
        .login("alice@corp.example", "alice")
        .expect("alice logs in");
    let revoke = [
        "--event",
        "session-revoked",
        "--email",
        "alice@corp.example",
        "--jti",
        "revoke-alice-1",
    ];
    m.queue(&revoke);
    m.stack
        .wait_until(Duration::from_secs(15), "alice's session ends", || {
            m.state(&alice) == "terminated"
        });
    m.stack
        .wait_until(Duration::from_secs(10), "the SET is acknowledged", || {
            m.queue_empty()
        });

    // The transmitter disables the stream: the agent reads the status and refuses SETs.
    let (status, v) = m.tx(
        "POST",
        "/streams/status",
        Some(serde_json::json!({"stream_id": id, "status": "disabled"})),
    );
    assert_eq!(status, 200, "{v}");
    m.wait_stream(
        "the agent reads the disabled status",
        Duration::from_secs(25),
        |s| s["stream_status"] == "disabled",
    );
    let (status, v) = m.tx(
        "POST",
        "/streams/status",
        Some(serde_json::json!({"stream_id": id, "status": "enabled"})),
    );
    assert_eq!(status, 200, "{v}");
    m.wait_stream(
        "the agent reads the enabled status",
        Duration::from_secs(25),
        |s| s["stream_status"] == "enabled",
    );

    // kill -9 and start again: the same stream is read, not a second one created, and it is
    // verified anew.
    m.stack.agent_mut().kill9();
    m.stack.start_agent();
    let s = m.wait_stream(
        "the restarted agent verifies its stream",
        Duration::from_secs(20),
        verified,
    );
    assert_eq!(s["stream_id"], id.as_str(), "the same stream");
    assert_eq!(m.streams().len(), 1, "no second stream");

    // What was acknowledged before the kill is in force: alice's old session stays ended.
    assert_eq!(m.state(&alice), "terminated");
    // A fresh login after the event is allowed; the same SET delivered again is recognised
    // by its jti and does not end it.
    let again = m
        .login("alice@corp.example", "alice2")
        .expect("a fresh login");
    m.queue(&revoke);
    m.stack.wait_until(
        Duration::from_secs(15),
        "the replay is acknowledged",
        || m.queue_empty(),
    );
    assert_eq!(m.state(&again), "active", "a replay changes nothing");
    let s = m.stream_status();
    assert!(
        s["counts"]["session-revoked duplicate"].as_u64() >= Some(1),
        "the replay is counted as a duplicate: {s}"
    );
}

#[test]
fn a_managed_push_stream_carries_the_agents_credential_and_pushed_events_act() {
    if !require_root("a_managed_push_stream") {
        return;
    }
    let mut m = prepare("ssfm-push", "push");
    // The agent comes first (the transmitter pins its certificate); it retries the
    // transmitter it cannot reach yet.
    m.stack.start_agent();
    let fp = m.stack.fingerprint();
    m.start_transmitter(Some(&fp));
    let s = m.wait_stream(
        "the push stream is created and verified by a pushed event",
        Duration::from_secs(30),
        verified,
    );
    let streams = m.streams();
    assert_eq!(streams.len(), 1, "{streams:?}");
    assert_eq!(s["stream_id"], streams[0]["stream_id"]);
    assert_eq!(
        streams[0]["delivery"]["endpoint_url"],
        format!(
            "https://{}:{ADMISSION_PORT}/v1/ssf/events",
            m.stack.pair.server_addr
        )
    );
    assert!(
        streams[0]["delivery"]["authorization_header"].is_null(),
        "the credential is never read back"
    );

    let alice = m
        .login("alice@corp.example", "alice")
        .expect("alice logs in");
    m.queue(&[
        "--event",
        "session-revoked",
        "--email",
        "alice@corp.example",
    ]);
    m.stack
        .wait_until(Duration::from_secs(15), "alice's session ends", || {
            m.state(&alice) == "terminated"
        });
    assert!(
        !log_of(&m.dir).contains("refused a pushed SET"),
        "every push was accepted: {}",
        log_of(&m.dir)
    );
}
