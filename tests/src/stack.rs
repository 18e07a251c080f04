//! A whole flowwarden stack for end-to-end tests: a namespace pair, a development identity
//! provider (key + JWKS), an agent in the server namespace with its admission endpoint,
//! status socket, store and policy, and the CLI run as the client or the operator would.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::{
    agent_proc::{AgentProcess, Scratch, agent_bin},
    loaded::private_pin_dir,
    netns::NetnsPair,
};

pub const ISSUER: &str = "https://idp.flowwarden.dev";
pub const AUDIENCE: &str = "flowwarden";
pub const ADMISSION_PORT: u16 = 7443;
/// The smallest policy the stack tests use: one resource, `echo` on tcp/7000, for the `ops`
/// group (rule `ops-echo`).
pub const ECHO_POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "ops-echo"
groups = ["ops"]
resources = ["echo"]
"#;

/// Claims of a development token.
#[derive(Debug, Clone)]
pub struct TokenSpec<'a> {
    pub sub: &'a str,
    pub email: &'a str,
    pub groups: &'a [&'a str],
    pub managed: Option<bool>,
    pub lifetime_secs: u64,
}

impl<'a> TokenSpec<'a> {
    pub fn user(email: &'a str, groups: &'a [&'a str]) -> Self {
        Self {
            sub: email,
            email,
            groups,
            managed: Some(true),
            lifetime_secs: 3600,
        }
    }
}

pub struct Stack {
    pub pair: NetnsPair,
    pub scratch: Scratch,
    pub pin_dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub keys: PathBuf,
    pub agent: Option<AgentProcess>,
}

impl Stack {
    /// Sets everything up and starts the agent. `policy` is the text of
    /// `policies/test.toml`; `sessions_extra` goes into the `[sessions]` table.
    pub fn start(tag: &str, policy: &str, sessions_extra: &str) -> Self {
        Self::start_with(tag, policy, sessions_extra, "")
    }

    /// Like [`Stack::start`], with extra lines for the `[api]` table too.
    pub fn start_with(tag: &str, policy: &str, sessions_extra: &str, api_extra: &str) -> Self {
        let mut stack = Self::prepare(tag, policy, sessions_extra, api_extra);
        stack.start_agent();
        stack
    }

    /// Like [`Stack::start_with`] without starting the agent, for tests that add to the
    /// namespaces or the config first (the fleet tests add a `[fleet]` section).
    pub fn prepare(tag: &str, policy: &str, sessions_extra: &str, api_extra: &str) -> Self {
        let pair = NetnsPair::new(tag).expect("namespace pair");
        let scratch = Scratch::new(tag);
        let pin_dir = private_pin_dir(tag);
        let keys = scratch.dir.join("keys");
        let socket = scratch.dir.join("agent.sock");
        let out = cli(&["dev", "keygen", "--dir", keys.to_str().unwrap()]);
        assert!(out.0, "dev keygen failed: {}", out.1);
        let config = scratch.dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                r#"[datapath]
interfaces = ["{iface}"]
pin_dir = "{pin}"

[policy]
dir = "policies"
watch_interval_ms = 100

[state]
dir = "state"

[admission]
listen = "{addr}:{port}"

[sessions]
sweep_interval_ms = 100
{sessions_extra}

[api]
socket = "agent.sock"
{api_extra}

[[auth.issuer]]
issuer = "{ISSUER}"
audiences = ["{AUDIENCE}"]
algorithms = ["ES256"]
jwks_file = "keys/dev-jwks.json"
"#,
                iface = pair.server_if,
                pin = pin_dir.display(),
                addr = pair.server_addr,
                port = ADMISSION_PORT,
            ),
        )
        .expect("writing agent.toml");
        std::fs::write(scratch.dir.join("policies/test.toml"), policy).expect("writing policy");
        Self {
            pair,
            scratch,
            pin_dir,
            config,
            socket,
            keys,
            agent: None,
        }
    }

    /// Sets `key = value` lines in the `[table]` of `agent.toml`: a key the table has is
    /// replaced, others are added under its header. For callers that size maps, raise limits
    /// or change intervals before the agent starts.
    ///
    /// # Panics
    /// The config has no such table.
    pub fn set_in_table(&self, table: &str, lines: &str) {
        let text = std::fs::read_to_string(&self.config).expect("reading agent.toml");
        let mut out: Vec<String> = text.lines().map(str::to_owned).collect();
        let header = format!("[{table}]");
        let start = out
            .iter()
            .position(|l| l.trim() == header)
            .unwrap_or_else(|| panic!("agent.toml has no [{table}] table:\n{text}"));
        for line in lines.lines().filter(|l| !l.trim().is_empty()) {
            let key = line.split('=').next().unwrap_or_default().trim();
            let end = out[start + 1..]
                .iter()
                .position(|l| l.trim_start().starts_with('['))
                .map_or(out.len(), |p| start + 1 + p);
            let existing = out[start + 1..end]
                .iter()
                .position(|l| l.split('=').next().unwrap_or_default().trim() == key);
            match existing {
                Some(p) => out[start + 1 + p] = line.to_owned(),
                None => out.insert(start + 1, line.to_owned()),
            }
        }
        std::fs::write(&self.config, out.join("\n") + "\n").expect("writing agent.toml");
    }

    pub fn start_agent(&mut self) {
        self.agent = Some(AgentProcess::start(&self.pair.server, &self.config));
    }

    /// Starts the agent again and returns how long after its spawn it first answered `status`
    /// on its socket (polled every 2 ms): the figure "answers status within 1 s of starting".
    ///
    /// # Panics
    /// The agent exits, or does not answer within `bound`; the panic shows its log.
    pub fn restart_timed(&mut self, bound: Duration) -> Duration {
        let spawned = Instant::now();
        self.agent = Some(AgentProcess::spawn(&self.pair.server, &self.config));
        loop {
            if let Ok(mut rpc) = flowwarden::api::client::RpcClient::connect(&self.socket)
                && rpc.call("status", serde_json::json!({})).is_ok()
            {
                return spawned.elapsed();
            }
            let agent = self.agent_mut();
            if let Some(status) = agent.exit_status() {
                panic!("the restarted agent exited with {status}:\n{}", agent.log());
            }
            assert!(
                spawned.elapsed() < bound,
                "the restarted agent did not answer status within {bound:?}:\n{}",
                agent.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    pub fn agent(&self) -> &AgentProcess {
        self.agent.as_ref().expect("agent running")
    }

    pub fn agent_mut(&mut self) -> &mut AgentProcess {
        self.agent.as_mut().expect("agent running")
    }

    pub fn policy_path(&self) -> PathBuf {
        self.scratch.dir.join("policies/test.toml")
    }

    /// Rewrites the policy file (the agent notices within its watch interval).
    pub fn write_policy(&self, text: &str) {
        let tmp = self.scratch.dir.join("policies/.test.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, self.policy_path()).unwrap();
    }

    /// A development token for `spec`.
    pub fn token(&self, spec: &TokenSpec<'_>) -> String {
        let mut args = vec![
            "dev".to_owned(),
            "token".into(),
            "--dir".into(),
            self.keys.display().to_string(),
            "--sub".into(),
            spec.sub.into(),
            "--email".into(),
            spec.email.into(),
            "--lifetime".into(),
            spec.lifetime_secs.to_string(),
        ];
        for g in spec.groups {
            args.push("--group".into());
            args.push((*g).into());
        }
        if let Some(m) = spec.managed {
            args.push("--managed".into());
            args.push(m.to_string());
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, out) = cli(&refs);
        assert!(ok, "dev token failed: {out}");
        out.lines().next().unwrap_or_default().trim().to_owned()
    }

    /// A development token for `spec` minted in a later second than anything before the call:
    /// its `iat` is after a cut-off set until now, and it is not the same token as one of the
    /// same claims minted earlier (whose denial would refuse it). Waits for the next second.
    pub fn fresh_token(&self, spec: &TokenSpec<'_>) -> String {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        std::thread::sleep(Duration::from_millis(1020 - u64::from(now.subsec_millis())));
        self.token(spec)
    }

    /// `flowwarden <args>` against this agent's socket, as root in the host namespace.
    pub fn ctl(&self, args: &[&str]) -> (bool, String) {
        let mut full = vec!["--socket", self.socket.to_str().unwrap()];
        full.extend_from_slice(args);
        cli(&full)
    }

    /// Like [`Stack::ctl`] with `--json`, parsed; panics on failure.
    pub fn ctl_json(&self, args: &[&str]) -> Value {
        let mut full: Vec<&str> = args.to_vec();
        full.push("--json");
        let (ok, out) = self.ctl(&full);
        assert!(ok, "flowwarden {args:?} failed: {out}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {out}"))
    }

    /// The admission certificate's fingerprint, from `status`.
    pub fn fingerprint(&self) -> String {
        let status = self.ctl_json(&["status"]);
        status["admission"]["fingerprint"]
            .as_str()
            .expect("fingerprint in status")
            .to_owned()
    }

    /// `flowwarden login` run in the client namespace with a token on stdin. The client's
    /// cache goes under `cache` (one per simulated user).
    pub fn login(&self, token: &str, cache: &Path) -> (bool, String) {
        let agent = format!("{}:{ADMISSION_PORT}", self.pair.server_addr);
        let fp = self.fingerprint();
        let token_file = cache.join("token.jwt");
        std::fs::create_dir_all(cache).unwrap();
        std::fs::write(&token_file, token).unwrap();
        let bin = agent_bin();
        let out = self
            .pair
            .client
            .command(bin.to_str().unwrap())
            .args([
                "login",
                "--agent",
                &agent,
                "--fingerprint",
                &fp,
                "--token-file",
            ])
            .arg(&token_file)
            .arg("--json")
            .env("XDG_CACHE_HOME", cache)
            .output()
            .expect("running flowwarden login");
        text(out)
    }

    /// `flowwarden login --reconnect` in the client namespace.
    pub fn reconnect(&self, cache: &Path) -> (bool, String) {
        let agent = format!("{}:{ADMISSION_PORT}", self.pair.server_addr);
        let bin = agent_bin();
        let out = self
            .pair
            .client
            .command(bin.to_str().unwrap())
            .args(["login", "--agent", &agent, "--reconnect", "--json"])
            .env("XDG_CACHE_HOME", cache)
            .output()
            .expect("running flowwarden login --reconnect");
        text(out)
    }

    /// Polls `check` every 50 ms until it holds or `within` passes.
    pub fn wait_until(&self, within: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}\nagent log:\n{}",
                self.agent.as_ref().map(|a| a.log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill9();
        }
        let _ = flowwarden::datapath::detach_all(&self.pin_dir);
    }
}

/// `flowwarden <args>` in the host namespace: (success, stdout + stderr).
pub fn cli(args: &[&str]) -> (bool, String) {
    let out = Command::new(agent_bin())
        .args(args)
        .output()
        .expect("running flowwarden");
    text(out)
}

fn text(out: std::process::Output) -> (bool, String) {
    let mut s = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.stderr.is_empty() {
        if !s.is_empty() {
            s.push('\n');
        }
        s.push_str(&String::from_utf8_lossy(&out.stderr));
    }
    (out.status.success(), s)
}
