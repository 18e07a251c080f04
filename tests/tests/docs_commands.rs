//! Every command example in README.md and docs/*.md: the `flowwarden …` ones run against a
//! live agent, as written but for the placeholders (session ids, host names, paths under
//! /etc), and must succeed; where the docs show their output right after, the output must
//! have that shape. Every other command is listed in [`NOT_RUN`] with the place that
//! exercises it instead, or the reason nothing can. A new example that is neither makes
//! the first test fail, and so does a fenced block without a language.

use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    net::SocketAddr,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use flowwarden_tests::{
    agent_proc::agent_bin,
    netns::Netns,
    privileged::require_root,
    stack::{ADMISSION_PORT, Stack, TokenSpec},
    tcp::{accept, connect, listen},
};
use serde_json::Value;

/// Commands in the docs that no test runs as written, each with where it is exercised
/// instead, or why it cannot be. Matched exactly, after comments are stripped.
const NOT_RUN: &[(&str, &str)] = &[
    (
        "flowwarden fleet keygen --out admin.key",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet init --replicas 3",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet hosts",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet sessions list --user alice@corp.example",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet sessions terminate --user alice@corp.example",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet sessions terminate 3f2a9c0d11b2e4f5",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet policy push /etc/flowwarden/policies",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        r#"flowwarden fleet lock add --user mallory@corp.example --reason "offboarded""#,
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet lock list",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet lock remove 5d0c3f5e9b2a4c1d8e7f6a5b4c3d2e1f",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet audit --follow",
        "needs NATS JetStream servers: tests/tests/fleet.rs and fleet_cluster.rs run these commands against real ones",
    ),
    (
        "flowwarden fleet signal publish set.jwt --from ssf-relay-1",
        "needs NATS JetStream servers and agents that trust the transmitter: tests/tests/fleet_signals.rs publishes SETs this way",
    ),
    (
        "cargo xtask demo",
        "the demo itself; run by hand, it exits non-zero when a step does not behave as narrated",
    ),
    ("cargo xtask test", "CI runs it (.ci/run)"),
    (
        "cargo xtask test --filter revocation",
        "CI runs `cargo xtask test`; --filter only narrows it (the revocation tests exist: enforce_netns.rs)",
    ),
    (
        "cargo xtask setup",
        "the first step of `cargo xtask test` (CI) and `cargo xtask demo`",
    ),
    (
        "cargo xtask bench datapath",
        "a benchmark, run by hand; its figures are in BENCHMARKS.md",
    ),
    (
        "cargo xtask bench admission",
        "a benchmark, run by hand; its figures are in BENCHMARKS.md",
    ),
    (
        "cargo xtask bench policy",
        "a benchmark, run by hand; its figures are in BENCHMARKS.md",
    ),
    (
        "cargo xtask bench revoke",
        "a benchmark, run by hand; its figures are in BENCHMARKS.md",
    ),
    (
        "cargo xtask clippy",
        "the lint, run by hand before a commit",
    ),
    (
        "cargo xtask install",
        "installs into / for real; xtask/tests/install.rs runs it with --destdir and checks the documented layout",
    ),
    (
        "cargo build --release -p flowwarden",
        "a release build takes minutes; `cargo xtask test` builds the same crate (CI)",
    ),
    (
        "install -m 0755 target/release/flowwarden /usr/local/bin/flowwarden",
        "writes to the host's /usr/local; xtask/tests/install.rs checks the same layout under a staging root",
    ),
    (
        "install -d -m 0755 /etc/flowwarden /etc/flowwarden/policies",
        "writes to the host's /etc; xtask/tests/install.rs checks the same layout",
    ),
    (
        "install -m 0640 packaging/agent.toml /etc/flowwarden/agent.toml",
        "writes to the host's /etc; xtask/tests/install.rs checks the same layout",
    ),
    (
        "install -m 0644 packaging/flowwarden.service /etc/systemd/system/flowwarden.service",
        "writes to the host's /etc; xtask/tests/install.rs checks the same layout",
    ),
    (
        "systemctl daemon-reload",
        "needs systemd as PID 1, which the test machines are not; the unit's paths are checked by xtask/tests/install.rs",
    ),
    (
        "systemctl enable --now flowwarden",
        "needs systemd as PID 1; the unit runs `flowwarden config check` and `flowwarden agent`, which this test runs",
    ),
    (
        "systemctl stop flowwarden",
        "needs systemd as PID 1; stopping by SIGTERM is tested by restart.rs and by this test's agent runs",
    ),
    (
        "systemctl start flowwarden",
        "needs systemd as PID 1; starting is `flowwarden agent`, which this test runs",
    ),
    (
        "systemctl restart flowwarden",
        "needs systemd as PID 1; a restart that adopts the pins is tested by restart.rs",
    ),
    (
        "journalctl -u flowwarden | grep fingerprint",
        "needs systemd's journal; the fingerprint line is the one `flowwarden status` and the agent log show (this test reads it)",
    ),
    (
        "groupadd --system flowwarden",
        "changes the host's groups; the group checks run with throwaway users in api::transport::tests::real_users_get_the_access_their_groups_give",
    ),
    (
        "groupadd --system flowwarden-admin",
        "changes the host's groups; as above",
    ),
    (
        "usermod -aG flowwarden,flowwarden-admin alice",
        "changes the host's users; as above",
    ),
    (
        "cp -a /var/lib/flowwarden /var/backups/flowwarden-$(date +%F)",
        "a backup of the host's state while systemd has the agent stopped; the store's crash and restore behaviour is tested in agent/src/store",
    ),
    (
        "ssh server",
        "real OpenSSH through a session: the demo, and tests/tests/ssh_terminate.rs",
    ),
];

/// Fence languages the docs may use. A block without one could hide a command.
const LANGUAGES: &[&str] = &["sh", "text", "toml", "json", "ini"];

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_owned()
}

/// A fenced block of a document.
struct Block {
    at: String,
    lang: String,
    lines: Vec<String>,
    /// Only blank lines lie between this block and the previous one.
    follows_previous: bool,
}

fn blocks(path: &Path) -> Vec<Block> {
    let text = std::fs::read_to_string(path).unwrap();
    let name = path
        .strip_prefix(workspace())
        .unwrap()
        .display()
        .to_string();
    let mut out: Vec<Block> = Vec::new();
    let mut open: Option<Block> = None;
    let mut since_last_block: Option<bool> = None;
    for (n, line) in text.lines().enumerate() {
        match (open.take(), line.strip_prefix("```")) {
            (None, Some(lang)) => {
                open = Some(Block {
                    at: format!("{name}:{}", n + 1),
                    lang: lang.trim().to_owned(),
                    lines: Vec::new(),
                    follows_previous: since_last_block == Some(true),
                });
            }
            (Some(block), Some(_)) => {
                out.push(block);
                since_last_block = Some(true);
            }
            (Some(mut block), None) => {
                block.lines.push(line.to_owned());
                open = Some(block);
            }
            (None, None) => {
                if !line.trim().is_empty() {
                    since_last_block = Some(false);
                }
            }
        }
    }
    assert!(open.is_none(), "{name}: a fenced block is never closed");
    out
}

fn documents() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = std::fs::read_dir(workspace().join("docs"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    docs.insert(0, workspace().join("README.md"));
    docs
}

/// A command of an `sh` block.
#[derive(Debug, Clone)]
struct Example {
    at: String,
    text: String,
    /// The output the docs show for it: the block right after its own, for the first
    /// `flowwarden` command of a block.
    output: Option<Vec<String>>,
}

/// `text` without its comment (a `#` at the start or after a blank, outside quotes).
fn strip_comment(text: &str) -> &str {
    let (mut single, mut double, mut prev_blank) = (false, false, true);
    for (i, c) in text.char_indices() {
        match c {
            '\'' if !double => single = !single,
            '"' if !single => double = !double,
            '#' if !single && !double && prev_blank => return text[..i].trim_end(),
            _ => {}
        }
        prev_blank = c.is_whitespace();
    }
    text.trim_end()
}

fn examples() -> Vec<Example> {
    let mut out = Vec::new();
    for doc in documents() {
        let blocks = blocks(&doc);
        for (i, block) in blocks.iter().enumerate() {
            if block.lang != "sh" {
                continue;
            }
            let output = blocks
                .get(i + 1)
                .filter(|next| next.follows_previous && next.lang == "text")
                .map(|next| next.lines.clone());
            let mut first_flowwarden = true;
            let mut pending = String::new();
            for (n, line) in block.lines.iter().enumerate() {
                let line = strip_comment(line);
                if let Some(start) = line.strip_suffix('\\') {
                    pending.push_str(start);
                    continue;
                }
                pending.push_str(line);
                let text = pending.split_whitespace().collect::<Vec<_>>().join(" ");
                pending.clear();
                if text.is_empty() {
                    continue;
                }
                let is_flowwarden = program(&text) == "flowwarden";
                out.push(Example {
                    at: format!("{} (line {})", block.at, n + 1),
                    output: (is_flowwarden && first_flowwarden)
                        .then(|| output.clone())
                        .flatten(),
                    text,
                });
                first_flowwarden &= !is_flowwarden;
            }
        }
    }
    out
}

/// The program a command line runs, past `VAR=value` assignments.
fn program(text: &str) -> &str {
    text.split_whitespace()
        .find(|w| !w.contains('='))
        .unwrap_or("")
}

/// Whether the live test runs this example: the CLI, and `curl` of the metrics endpoint.
fn runs_live(text: &str) -> bool {
    // `flowwarden fleet` talks to NATS servers, not to the agent: listed in NOT_RUN.
    matches!(program(text), "flowwarden" | "curl")
        && !without_env(text).starts_with("flowwarden fleet")
}

#[test]
fn every_block_says_what_it_holds_and_every_other_command_is_accounted_for() {
    let mut problems = Vec::new();
    for doc in documents() {
        for block in blocks(&doc) {
            if !LANGUAGES.contains(&block.lang.as_str()) {
                problems.push(format!(
                    "{}: a fenced block in language {:?}: use one of {LANGUAGES:?} (`sh` for \
                     commands, which this test runs, `text` for output)",
                    block.at, block.lang
                ));
            }
        }
    }
    let examples = examples();
    let mut used = BTreeSet::new();
    for e in &examples {
        if runs_live(&e.text) {
            continue;
        }
        match NOT_RUN.iter().find(|(text, _)| *text == e.text) {
            Some((text, _)) => {
                used.insert(*text);
            }
            None if NOT_RUN_KINDS
                .iter()
                .any(|(prefix, _)| without_env(&e.text).starts_with(prefix)) => {}
            None => problems.push(format!(
                "{}: `{}` is neither run by every_documented_command_runs_against_a_live_agent \
                 (flowwarden, curl) nor listed in NOT_RUN with where it is exercised",
                e.at, e.text
            )),
        }
    }
    for (text, _) in NOT_RUN {
        if !used.contains(text) {
            problems.push(format!(
                "NOT_RUN lists `{text}`, which no document shows any more"
            ));
        }
    }
    let flowwarden = examples
        .iter()
        .filter(|e| program(&e.text) == "flowwarden")
        .count();
    assert!(
        flowwarden >= 40,
        "only {flowwarden} flowwarden examples found: is the parser broken?"
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// Kinds of commands that no test runs as written, by how they start (after any leading
/// `VAR=value` assignments), with where they are exercised instead.
const NOT_RUN_KINDS: &[(&str, &str)] = &[
    (
        "cargo test ",
        "a part of the suite that `cargo xtask test` runs (CI); the docs name it to run it alone",
    ),
    (
        "cargo xtask bench ",
        "a benchmark, run by hand; its figures are in BENCHMARKS.md or docs/reliability.md",
    ),
    (
        "cargo xtask fuzz",
        "CI runs a short pass of every target (the last step of `cargo xtask test`)",
    ),
    (
        "cargo xtask soak",
        "the long form of the crash-consistency test, which CI runs with fewer kill points",
    ),
];

/// `text` without leading environment assignments (`A=1 B=2 cargo …` → `cargo …`).
fn without_env(text: &str) -> &str {
    let mut rest = text.trim_start();
    while let Some((word, tail)) = rest.split_once(' ') {
        let is_assignment = word.split_once('=').is_some_and(|(name, _)| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        });
        if !is_assignment {
            break;
        }
        rest = tail.trim_start();
    }
    rest
}

/// The policy the live agent enforces: the resources and rules the docs' examples name.
const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "admin-console"
protocol = "tcp"
ports = [8443, "9000-9010"]

[[rule]]
name = "ops-ssh"
resources = ["ssh"]
groups = ["ops"]

[[rule]]
name = "platform-admins"
resources = ["admin-console"]
groups = ["platform-admins"]
claims = { acr = "phr" }
"#;

const ALICE: &str = "alice@corp.example";

/// The live agent, and what the docs' placeholders stand for.
struct Live {
    stack: Stack,
    /// `/etc/flowwarden/…` of the docs lives here.
    etc: PathBuf,
    /// The operator's (server) and the user's (client) home directories.
    server_home: PathBuf,
    client_home: PathBuf,
    /// `sha256:…` of the admission certificate.
    fingerprint: String,
}

impl Live {
    fn start() -> Self {
        // Metrics on, for the docs' curl; a [metrics] table after the [api] lines.
        let stack = Stack::start_with("docs", POLICY, "", "\n[metrics]\nenabled = true\n");
        let etc = stack.scratch.dir.join("etc/flowwarden");
        let candidate = etc.join("candidate");
        std::fs::create_dir_all(&candidate).unwrap();
        // The candidate of policy.md: ops loses ssh.
        std::fs::write(
            candidate.join("policy.toml"),
            POLICY.replace(r#"groups = ["ops"]"#, r#"groups = ["sre"]"#),
        )
        .unwrap();
        let server_home = stack.scratch.dir.join("home/root");
        let client_home = stack.scratch.dir.join("home/alice");
        std::fs::create_dir_all(client_home.join(".cache")).unwrap();
        std::fs::create_dir_all(&server_home).unwrap();
        let token = stack.token(&TokenSpec::user(ALICE, &["ops"]));
        std::fs::write(client_home.join(".cache/idp.jwt"), &token).unwrap();
        let fingerprint = format!("sha256:{}", stack.fingerprint());
        Self {
            stack,
            etc,
            server_home,
            client_home,
            fingerprint,
        }
    }

    /// A new session of alice through the agent, as a client would make it.
    fn login(&self) -> String {
        // A token of its own: a terminate denies the token of the session it ends, and a
        // terminate --user refuses every older token of alice's.
        let token = self.stack.fresh_token(&TokenSpec::user(ALICE, &["ops"]));
        let (ok, out) = self
            .stack
            .login(&token, &self.stack.scratch.dir.join("harness-cache"));
        assert!(ok, "login failed: {out}");
        let json = &out[out.find('{').unwrap_or(0)..=out.rfind('}').unwrap_or(0)];
        let v: Value =
            serde_json::from_str(json).unwrap_or_else(|e| panic!("login --json ({e}): {out}"));
        v["session"]
            .as_str()
            .unwrap_or_else(|| panic!("no session id in {v}"))
            .to_owned()
    }

    /// alice's newest live session, made if she has none.
    fn live_session(&self) -> String {
        let live = self
            .stack
            .ctl_json(&["sessions", "list", "--live", "--user", ALICE]);
        match live[0]["id"].as_str() {
            Some(id) => id.to_owned(),
            None => self.login(),
        }
    }

    /// The newest lock, made (on a device nobody here uses) if there is none.
    fn a_lock(&self) -> String {
        let locks = self.stack.ctl_json(&["lock", "list"]);
        if let Some(id) = locks
            .as_array()
            .and_then(|l| l.last())
            .and_then(|l| l["id"].as_str())
        {
            return id.to_owned();
        }
        let added = self
            .stack
            .ctl_json(&["lock", "add", "--device", "laptop-17"]);
        added["lock"]["id"].as_str().expect("a lock id").to_owned()
    }

    /// `SOURCE DESTINATION` of a flow the kernel holds.
    fn a_flow(&self) -> String {
        let flows = self.stack.ctl_json(&["flows", "list"]);
        let flow = &flows[0];
        format!(
            "{} {}",
            flow["source"].as_str().expect("a flow is open"),
            flow["destination"].as_str().unwrap()
        )
    }

    /// The docs' text with the placeholders replaced by this agent's values.
    fn substitute(&self, text: &str) -> String {
        let pair = &self.stack.pair;
        let fingerprint = &self.fingerprint;
        let mut out = text
            .replace("<sha256 the agent logs>", fingerprint)
            .replace(
                "server.corp.example:7443",
                &format!("{}:{ADMISSION_PORT}", pair.server_addr),
            )
            .replace(
                "server:7443",
                &format!("{}:{ADMISSION_PORT}", pair.server_addr),
            )
            .replace(
                "/etc/flowwarden/agent.toml",
                &self.stack.config.display().to_string(),
            )
            .replace("/etc/flowwarden/", &format!("{}/", self.etc.display()))
            .replace("/etc/flowwarden ", &format!("{} ", self.etc.display()));
        // A certificate fingerprint of the docs: `sha256:` and 64 hex digits.
        while let Some(at) = out.find("sha256:").filter(|&at| {
            out[at + 7..].len() >= 64
                && out[at + 7..at + 71].bytes().all(|b| b.is_ascii_hexdigit())
                && out[at + 7..at + 71] != fingerprint[7..]
        }) {
            out.replace_range(at..at + 71, fingerprint);
        }
        if out.contains("<id>") || out.contains("bc5aef237a937e96") {
            let id = self.live_session();
            out = out.replace("<id>", &id).replace("bc5aef237a937e96", &id);
        }
        if out.contains("lk-5e551000000000a1") {
            out = out.replace("lk-5e551000000000a1", &self.a_lock());
        }
        if out.contains("10.0.0.7:51514 10.0.0.2:22") {
            out = out.replace("10.0.0.7:51514 10.0.0.2:22", &self.a_flow());
        }
        // The docs detach the default pin directory; this agent pins elsewhere, and the
        // machine's own agent (if any) must not be touched.
        if out.starts_with("flowwarden datapath detach") && !out.contains("--pin-dir") {
            out.push_str(&format!(" --pin-dir {}", self.stack.pin_dir.display()));
        }
        out
    }

    /// `sh -c TEXT` as the operator on the server, or as alice on the client.
    fn shell(&self, text: &str, on_client: bool) -> Command {
        let ns: &Netns = if on_client {
            &self.stack.pair.client
        } else {
            &self.stack.pair.server
        };
        let bin_dir = agent_bin().parent().unwrap().to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = ns.command("sh");
        cmd.args(["-c", text])
            .env("PATH", path)
            .env(
                "HOME",
                if on_client {
                    &self.client_home
                } else {
                    &self.server_home
                },
            )
            .env("FLOWWARDEN_SOCKET", &self.stack.socket)
            .env("NO_COLOR", "1")
            .env_remove("XDG_CACHE_HOME")
            .current_dir(&self.stack.scratch.dir)
            .stdin(Stdio::null());
        cmd
    }
}

fn text_of(out: &Output) -> String {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&out.stderr));
    s
}

/// The first word of a line, with what varies from run to run (numbers, session ids)
/// reduced to a mark.
fn first_word(line: &str) -> Option<String> {
    let word = line.split_whitespace().next()?;
    if word == "…" {
        return None;
    }
    Some(if word.bytes().all(|b| b.is_ascii_digit()) {
        "<n>".into()
    } else if word.len() == 16 && word.bytes().all(|b| b.is_ascii_hexdigit()) {
        "<id>".into()
    } else {
        word.to_owned()
    })
}

/// Lines of the documented output whose first word starts no line of the real output.
fn shape_mismatches(documented: &[String], actual: &str) -> Vec<String> {
    let seen: BTreeSet<String> = actual.lines().filter_map(first_word).collect();
    documented
        .iter()
        .filter(|l| first_word(l).is_some_and(|w| !seen.contains(&w)))
        .cloned()
        .collect()
}

/// What an example needs: where it runs, and whether it ends by itself.
enum Kind {
    /// Run to completion; must exit 0.
    Once { on_client: bool },
    /// `audit --follow`: runs until stopped; must keep running and print.
    Follows,
    /// `flowwarden agent`: must reach "ready" and stop cleanly on SIGTERM.
    Agent,
}

fn kind(text: &str) -> Kind {
    let args: Vec<&str> = text
        .split_whitespace()
        .skip_while(|w| w.contains('='))
        .collect();
    match args.get(1).copied() {
        Some("agent") => Kind::Agent,
        Some("audit") if args.contains(&"--follow") => Kind::Follows,
        Some("login") => Kind::Once { on_client: true },
        _ => Kind::Once { on_client: false },
    }
}

fn text_is_detach(text: &str) -> bool {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .contains("datapath detach")
}

/// The phase an example runs in: reads first, then changes, then the agent runs (which
/// need the stack's agent stopped).
fn phase(text: &str) -> u8 {
    let args = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if matches!(kind(text), Kind::Agent) {
        3
    } else if args.contains("datapath detach") {
        2
    } else if args.contains("sessions terminate")
        || args.contains("policy reload")
        || args.contains("datapath mode monitor")
        || args.contains("datapath mode enforce")
    {
        1
    } else {
        0
    }
}

#[test]
fn every_documented_command_runs_against_a_live_agent() {
    if !require_root("every_documented_command_runs_against_a_live_agent") {
        return;
    }
    let mut examples: Vec<Example> = examples()
        .into_iter()
        .filter(|e| runs_live(&e.text))
        .collect();
    // Stable: within a phase, the docs' order (keygen before token, login before reconnect).
    examples.sort_by_key(|e| phase(&e.text));

    let mut live = Live::start();
    // As getting-started.md has it: watch in monitor mode first (status then shows what it
    // would drop); the examples that switch modes run later.
    live.stack.ctl_json(&["datapath", "mode", "monitor"]);
    // An open connection to ssh, so that there is a flow to show, list and look up.
    let server: SocketAddr = (live.stack.pair.server_addr, 22).into();
    let listener = listen(&live.stack.pair.server, server);
    live.login();
    let _client = connect(&live.stack.pair.client, server, Duration::from_secs(5))
        .expect("connecting to ssh through alice's session");
    let _server = accept(&listener, Duration::from_secs(5)).expect("accepting");
    live.stack
        .wait_until(Duration::from_secs(5), "the flow is listed", || {
            live.stack.ctl_json(&["flows", "list"])[0]["source"].is_string()
        });

    let mut failures = Vec::new();
    let mut ran = 0;
    for e in &examples {
        if e.text.contains("sessions terminate") {
            // Each terminate ends a session of its own.
            live.login();
        }
        if text_is_detach(&e.text) && !pinned(&live) {
            // An earlier detach removed everything: as operations.md has it, start the agent
            // (which pins again) and stop it, then detach.
            live.stack.start_agent();
        }
        if text_is_detach(&e.text) {
            stop_stack_agent(&mut live);
        }
        let text = live.substitute(&e.text);
        let report = |what: &str, out: &str| format!("{}: `{text}`: {what}\n{out}", e.at);
        match kind(&e.text) {
            Kind::Once { on_client } => {
                let out = live.shell(&text, on_client).output().expect("running sh");
                let shown = text_of(&out);
                if !out.status.success() {
                    failures.push(report(&format!("exited with {}", out.status), &shown));
                } else if program(&text) == "curl" && !shown.contains("\nflowwarden_sessions{") {
                    failures.push(report(
                        "no flowwarden_sessions metric in the answer",
                        &shown,
                    ));
                } else if let Some(doc) = &e.output {
                    let doc: Vec<String> = doc.iter().map(|l| live.substitute(l)).collect();
                    let missing = shape_mismatches(&doc, &shown);
                    if !missing.is_empty() {
                        failures.push(report(
                            &format!(
                                "its output does not have the documented shape: no line \
                                 starts like {missing:?}"
                            ),
                            &shown,
                        ));
                    }
                }
            }
            Kind::Follows => {
                let mut child = live
                    .shell(&exec_form(&text), false)
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .process_group(0)
                    .spawn()
                    .expect("running sh");
                let lines = collect_lines(child.stdout.take().unwrap());
                std::thread::sleep(Duration::from_secs(2));
                let exited = child.try_wait().unwrap();
                stop_group(&child);
                let _ = child.wait();
                let printed = lines.lock().unwrap().clone();
                if let Some(status) = exited {
                    failures.push(report(
                        &format!("ended by itself ({status})"),
                        &printed.join("\n"),
                    ));
                } else if printed.is_empty() {
                    failures.push(report("printed nothing in 2 s", ""));
                }
            }
            Kind::Agent => {
                stop_stack_agent(&mut live);
                if let Err(why) = run_agent(&live, &text) {
                    failures.push(report(&why, ""));
                }
            }
        }
        ran += 1;
    }
    assert!(ran >= 40, "only {ran} examples ran");
    assert!(
        failures.is_empty(),
        "{} of {ran} documented commands failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

fn collect_lines(from: impl std::io::Read + Send + 'static) -> Arc<Mutex<Vec<String>>> {
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&lines);
    std::thread::spawn(move || {
        for line in BufReader::new(from).lines().map_while(Result::ok) {
            sink.lock().unwrap().push(line);
        }
    });
    lines
}

fn stop_group(child: &std::process::Child) {
    // SAFETY: kill(2) on the process group we made for our own child.
    unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
}

/// Stops the stack's agent with SIGTERM, if it runs.
fn stop_stack_agent(live: &mut Live) {
    if let Some(mut agent) = live.stack.agent.take() {
        assert!(
            agent.stop(),
            "the stack's agent did not stop:\n{}",
            agent.log()
        );
    }
}

/// Whether anything is pinned under the stack's pin directory.
fn pinned(live: &Live) -> bool {
    std::fs::read_dir(live.stack.pin_dir.join("maps")).is_ok_and(|mut d| d.next().is_some())
}

/// `text` for `sh -c`, with the shell replaced by the command: signals reach the command
/// itself and its exit status is the command's. `VAR=value` prefixes become exports.
fn exec_form(text: &str) -> String {
    let words: Vec<&str> = text.split_whitespace().collect();
    let split = words.iter().take_while(|w| w.contains('=')).count();
    let (vars, command) = words.split_at(split);
    if vars.is_empty() {
        format!("exec {text}")
    } else {
        format!("export {}; exec {}", vars.join(" "), command.join(" "))
    }
}

/// Runs a documented `flowwarden agent` line until it is ready, then stops it with SIGTERM.
fn run_agent(live: &Live, text: &str) -> Result<(), String> {
    let mut child = live
        .shell(&exec_form(text), false)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("running sh");
    let log = collect_lines(child.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(30);
    let result = loop {
        let shown = log.lock().unwrap().join("\n");
        if shown.contains(" ready") {
            break Ok(shown);
        }
        if let Some(status) = child.try_wait().unwrap() {
            break Err(format!("exited with {status} before ready:\n{shown}"));
        }
        if Instant::now() > deadline {
            break Err(format!("not ready in 30 s:\n{shown}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    stop_group(&child);
    let status = child.wait().unwrap();
    let shown = result?;
    if !status.success() {
        return Err(format!("SIGTERM: exited with {status}:\n{shown}"));
    }
    // FLOWWARDEN_LOG=debug takes effect. (A filter for one module, such as
    // flowwarden::auth=debug, has nothing to say at start: only that the agent starts.)
    let everything_at_debug = text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("FLOWWARDEN_LOG="))
        .any(|filter| filter.split(',').any(|d| d == "debug"));
    if everything_at_debug && !shown.contains(" DEBUG ") {
        return Err(format!("no DEBUG line with {text:?}:\n{shown}"));
    }
    Ok(())
}
