//! `cargo xtask demo`: the whole flowwarden story, narrated with the real commands, on a
//! throwaway pair of network namespaces. Exits non-zero if any step does not behave as
//! narrated, so it doubles as a smoke test; removes everything it made, also on Ctrl-C.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    panic::AssertUnwindSafe,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, anyhow, bail, ensure};
use flowwarden_tests::{
    agent_proc::agent_bin,
    netns::Netns,
    privileged::require_root,
    ssh::{SshSession, Sshd, realtime_ns},
    stack::{ADMISSION_PORT, Stack},
};
use serde_json::Value;

/// The policy the demo's agent enforces, written to its policy directory.
const POLICY: &str = r#"# The protected services of this host, and who may reach them.
#
# A resource is default-deny: traffic to it passes only inside a live session that a
# rule grants it to. Traffic to anything that is not a resource is never touched.

# OpenSSH on every local address.
[[resource]]
name = "ssh"
protocol = "tcp"          # tcp or udp
ports = [22]              # ports, or ranges as "LOW-HIGH"

# Mosh, the roaming shell that travels next to ssh, over UDP.
[[resource]]
name = "mosh"
protocol = "udp"
ports = ["60000-61000"]

# An internal web service.
[[resource]]
name = "web"
protocol = "tcp"
ports = [8080]

# Operators reach the shells, from a managed device that complies with the device policy.
[[rule]]
name = "remote-shell"     # unique across all files
resources = ["ssh", "mosh"]
groups = ["ops"]

[rule.device]
managed = true            # a token without this claim never matches
compliant = true          # the identity provider can withdraw it (act 7)

# Developers reach the web service, and nothing else.
[[rule]]
name = "developers-web"
resources = ["web"]
groups = ["developers"]
"#;

/// The identity provider's Shared Signals stream: the agent trusts the development
/// transmitter's RS256 key and push credential, written into `ssf/` of the agent's directory
/// (paths are relative to agent.toml) before it starts.
const SIGNALS: &str = r#"
[[signals.transmitter]]
issuer = "https://ssf.flowwarden.dev"
audience = "flowwarden"
algorithms = ["RS256"]
jwks_file = "ssf/ssf-jwks.json"
push_authorization_file = "ssf/authorization"
"#;
/// alice's laptop, as her tokens and the identity provider's events name it.
const LAPTOP: &str = "laptop-0042";

/// The line of [`POLICY`] that the policy change of act 8 rewrites.
const SHELL_GROUPS: &str = r#"groups = ["ops"]"#;
const SHELL_GROUPS_CHANGED: &str = r#"groups = ["sre"]"#;

/// The live counter ssh runs. Each line carries the server's clock (Unix seconds), so the
/// demo can tell whether anything printed after a termination reached the client.
const COUNTER: &str = r#"i=0; while echo "tick $i $(date +%s.%N)"; do i=$((i+1)); sleep 0.2; done"#;

const WEB_PORT: u16 = 8080;
/// Inside the `mosh` range: the second flow of alice's session.
const MOSH_PORT: u16 = 60001;
const ALICE: &str = "alice@corp.example";
/// A refused `ssh` gives up after its ConnectTimeout (3 s); this bounds the wait.
const SSH_REFUSAL: Duration = Duration::from_secs(10);
/// A dropped HTTP request is given this long before it counts as unanswered.
const HTTP_TIMEOUT: Duration = Duration::from_millis(1500);

/// Bold headings on a terminal, plain text otherwise (logs, CI).
fn bold(text: &str) -> String {
    if std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none()
    {
        format!("\x1b[1m{text}\x1b[0m")
    } else {
        text.to_owned()
    }
}

/// A step's heading.
fn say(text: &str) {
    println!("\n{}", bold(&format!("==> {text}")));
}

/// Narration: what is about to happen, or what just did, in plain words.
fn tell(text: &str) {
    println!("{text}");
}

/// A command as a person would type it.
fn cmd(text: &str) {
    println!("    $ {text}");
}

/// A command typed on the client.
fn client_cmd(text: &str) {
    println!("    client$ {text}");
}

/// Output, indented under its command.
fn note(text: &str) {
    for line in text.trim_end().lines() {
        println!("    {}", line.trim_end());
    }
}

/// An argument as a shell would need it.
fn quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:@=,+".contains(c))
    {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// The last panic's message: helpers of the test crate report a broken step by panicking.
static PANIC: Mutex<Option<String>> = Mutex::new(None);

fn main() {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second Ctrl-C exits at once; the first lets the demo clean up.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&interrupted));
        let _ = signal_hook::flag::register(sig, Arc::clone(&interrupted));
    }
    // Record the message instead of printing a backtrace hint in the middle of the story; it
    // is reported below as the step's failure.
    std::panic::set_hook(Box::new(|info| {
        *PANIC.lock().unwrap_or_else(|e| e.into_inner()) = Some(info.to_string());
    }));
    let mut created = Created::default();
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| run(&interrupted, &mut created)))
        .unwrap_or_else(|_| {
            let message = PANIC.lock().unwrap_or_else(|e| e.into_inner()).take();
            Err(anyhow!(message.unwrap_or_else(|| "a step panicked".into())))
        });
    // Every guard (ssh, sshd, agent, pins, namespaces, files) has been dropped by now; check
    // that nothing is left rather than claim it.
    let left = created.leftovers();
    let interrupted = interrupted.load(Ordering::Relaxed);
    if !left.is_empty() {
        eprintln!("\ndemo left these behind (remove them by hand):");
        for path in &left {
            eprintln!("    {}", path.display());
        }
    }
    match result {
        Err(_) if interrupted => {
            if left.is_empty() {
                eprintln!("\ndemo interrupted: everything it created has been removed");
            }
            std::process::exit(130);
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}");
            if left.is_empty() {
                eprintln!("(everything it created has been removed)");
            }
            std::process::exit(1);
        }
        Ok(()) if !left.is_empty() => std::process::exit(1),
        Ok(()) => println!(
            "\n{}",
            bold("demo complete: everything it created has been removed")
        ),
    }
}

/// What the demo made on the machine, checked after every guard has dropped.
#[derive(Default)]
struct Created {
    paths: Vec<PathBuf>,
}

impl Created {
    fn leftovers(&self) -> Vec<&PathBuf> {
        self.paths.iter().filter(|p| p.exists()).collect()
    }
}

fn run(interrupted: &AtomicBool, created: &mut Created) -> anyhow::Result<()> {
    if !require_root("demo") {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    // Builds the CLI/agent binary if needed, before the story starts.
    let bin = agent_bin();
    ensure!(!interrupted.load(Ordering::Relaxed), "interrupted");

    say("1. A client and a server, each in its own network namespace, joined by a veth pair");
    let mut stack = Stack::prepare("demo", POLICY, "", SIGNALS);
    created.paths.extend([
        stack.pair.client.path(),
        stack.pair.server.path(),
        stack.pin_dir.clone(),
        stack.scratch.dir.clone(),
    ]);
    // The stand-in identity provider's event signing key and push credential (act 7).
    let ssf = stack.scratch.dir.join("ssf");
    let (ok, out) = flowwarden_tests::stack::cli(&[
        "dev",
        "ssf",
        "keygen",
        "--dir",
        &ssf.display().to_string(),
    ]);
    ensure!(ok, "dev ssf keygen failed: {out}");
    std::fs::write(
        ssf.join("authorization"),
        format!("Bearer ssf-{}", flowwarden::signals::dev::random_jti()),
    )?;
    stack.start_agent();
    let demo = Demo {
        stack: &stack,
        interrupted,
        bin,
    };
    let result = demo.story();
    if let Err(e) = &result
        && !interrupted.load(Ordering::Relaxed)
    {
        // What the agent said is the first thing to read when a step fails (CI).
        eprintln!("\n{e:#}\n\nthe agent's log (last 40 lines):");
        let log = stack.agent().log();
        let lines: Vec<&str> = log.lines().collect();
        for line in &lines[lines.len().saturating_sub(40)..] {
            eprintln!("    {line}");
        }
    }
    result?;

    say("9. Cleaning up: stop the agent, remove the datapath, delete the namespaces");
    tell("The agent gets SIGTERM and stops. A stopped agent leaves enforcement in place (it");
    tell("opens nothing by stopping), so the datapath is removed on purpose:");
    ensure!(stack.agent_mut().stop(), "the agent did not stop cleanly");
    let pin_dir = stack.pin_dir.display().to_string();
    cmd(&format!("flowwarden datapath detach --pin-dir {pin_dir}"));
    let (ok, out) = flowwarden_tests::stack::cli(&["datapath", "detach", "--pin-dir", &pin_dir]);
    ensure!(ok, "detach failed: {out}");
    note(out.lines().last().unwrap_or(""));
    cmd(&format!(
        "ip netns del {}; ip netns del {}",
        stack.pair.client.name, stack.pair.server.name
    ));
    // Dropping the stack kills whatever still runs in the namespaces and deletes them and the
    // scratch directory; main then checks that nothing is left.
    Ok(())
}

struct Demo<'a> {
    stack: &'a Stack,
    interrupted: &'a AtomicBool,
    bin: PathBuf,
}

/// A finished command: exit status and what it printed.
struct Ran {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Demo<'_> {
    fn story(&self) -> anyhow::Result<()> {
        let stack = self.stack;
        let pair = &stack.pair;
        let server: IpAddr = pair.server_addr.into();
        let scratch = &stack.scratch.dir;

        cmd(&format!(
            "ip netns add {}; ip netns add {}",
            pair.client.name, pair.server.name
        ));
        cmd(&format!(
            "ip -n {} link add {} type veth peer name {} netns {}",
            pair.client.name, pair.client_if, pair.server_if, pair.server.name
        ));
        note(&format!(
            "client {} ⇄ server {}",
            pair.client_addr, pair.server_addr
        ));

        tell("(`client$` commands run in the client namespace; `$` ones are the operator's.)");
        tell("\nThe server runs a real OpenSSH server, a web service on tcp/8080, and a mosh-like");
        tell("UDP listener on udp/60001.");
        let sshd = Sshd::start(&pair.server, scratch.join("ssh"), server);
        cmd(&format!(
            "nsenter --net={} /usr/sbin/sshd -D -f {}",
            pair.server.path().display(),
            sshd.dir.join("sshd_config").display()
        ));
        let web: SocketAddr = (server, WEB_PORT).into();
        let listener = pair
            .server
            .run(|| TcpListener::bind(web))
            .context("binding the web service")?;
        std::thread::spawn(move || serve_web(&listener));
        let mosh: SocketAddr = (server, MOSH_PORT).into();
        let sink = pair
            .server
            .run(|| UdpSocket::bind(mosh))
            .context("binding the mosh listener")?;
        std::thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while sink.recv(&mut buf).is_ok() {}
        });
        // Asked from the server itself (over its loopback, not the protected veth), it answers:
        // whatever the client sees later is the agent's doing.
        note(&format!("(server) GET http://{web}/"));
        let answer = self
            .http_get(&pair.server, web)?
            .context("the web service does not answer")?;
        ensure!(
            answer.contains("200 OK"),
            "the web service answered {answer:?}"
        );
        note(&format!("{answer}   (asked on the server itself)"));

        tell("\nThe agent guards the server's veth with this policy (policies/test.toml):");
        for line in POLICY.lines() {
            note(&format!("| {line}"));
        }
        tell("\nA development identity provider stands in for a real one: a signing key whose");
        tell("public JWKS the agent trusts ([[auth.issuer]] in agent.toml).");
        cmd(&format!(
            "flowwarden dev keygen --dir {}",
            stack.keys.display()
        ));
        cmd(&format!(
            "nsenter --net={} flowwarden agent --config {}",
            pair.server.path().display(),
            stack.config.display()
        ));
        cmd(&format!(
            "export FLOWWARDEN_SOCKET={}   # where the CLI finds the agent",
            stack.socket.display()
        ));
        self.fw_show(&["status"])?;
        let fingerprint = self.fw_json(&["status"])?["admission"]["fingerprint"]
            .as_str()
            .context("status has no admission fingerprint")?
            .to_owned();
        self.check()?;

        say("2. Before login, the server's protected services are dark to the client");
        let ssh_line = |remote: &str| format!("ssh root@{server} {}", quote(remote));
        tell("`ssh` here is `ssh -i KEY -o BatchMode=yes -o ConnectTimeout=3 …`, with a key made");
        tell("for the demo. The kernel drops its SYNs: no session, no grant.");
        self.ssh_refused(&sshd, "echo hello")?;
        self.fw_show(&["status"])?;
        let no_grant = self.fw_json(&["status"])?["drops"]["no_grant"]
            .as_u64()
            .unwrap_or(0);
        ensure!(no_grant > 0, "the dropped SYNs were not counted");
        tell(&format!(
            "The kernel counted {no_grant} packets dropped for want of a grant."
        ));
        self.check()?;

        say("3. alice (group ops, on a managed laptop) logs in, and ssh works");
        tell("The identity provider issues her a token (here: the development issuer):");
        let alice_dir = scratch.join("alice");
        std::fs::create_dir_all(&alice_dir)?;
        let token_file = alice_dir.join("idp.jwt");
        let keys = stack.keys.display().to_string();
        let token_args = [
            "dev",
            "token",
            "--dir",
            &keys,
            "--sub",
            ALICE,
            "--email",
            ALICE,
            "--group",
            "ops",
            "--device-id",
            LAPTOP,
            "--managed",
            "true",
            "--compliant",
            "true",
            "--os",
            "linux",
        ];
        cmd(&format!(
            "flowwarden {} > {}",
            token_args.map(quote).join(" "),
            token_file.display()
        ));
        let minted = self.run_polled(
            {
                let mut c = Command::new(&self.bin);
                c.args(token_args);
                c
            },
            Duration::from_secs(10),
        )?;
        ensure!(
            minted.status.success(),
            "dev token failed: {}",
            minted.stderr
        );
        let token = minted.stdout.trim().to_owned();
        ensure!(token.split('.').count() == 3, "dev token printed no JWT");
        std::fs::write(&token_file, &token)?;
        note(&format!(
            "{}…  (a signed JWT of {} characters; the agent never stores or logs it)",
            &token[..token.len().min(40)],
            token.len()
        ));
        tell("\nOn her laptop she presents it to the agent's admission endpoint over TLS,");
        tell("pinned by the certificate fingerprint that `flowwarden status` shows:");
        let alice = self.login(&fingerprint, &token_file, &alice_dir)?;
        tell("\nNow ssh gets through. It runs a live counter on the server:");
        client_cmd(&ssh_line(COUNTER));
        let mut counter = SshSession::spawn(sshd.ssh(&pair.client, server, COUNTER));
        self.wait_until(Duration::from_secs(15), "counter lines over ssh", || {
            counter.line_count() >= 5 || matches!(counter.child.try_wait(), Ok(Some(_)))
        })?;
        ensure!(
            counter.line_count() >= 5,
            "ssh ended early: {}",
            counter.stderr.lock().unwrap()
        );
        for (line, _) in counter.lines.lock().unwrap().iter().take(5) {
            note(line);
        }
        note("…");
        tell("\nHer laptop also streams mosh-style UDP to udp/60001, a datagram every 20 ms:");
        tell("a second flow of the same session.");
        let sender = Sender::start(&pair.client, mosh)?;
        tell("\nThe web service is for developers, so alice's request is dropped. Why:");
        note(&format!("(client) GET http://{web}/"));
        match self.http_get(&pair.client, web)? {
            Ok(answer) => bail!("alice reached the web service: {answer}"),
            Err(e) => note(&format!("no answer ({e})")),
        }
        self.fw_show(&["policy", "explain", "--user", ALICE, "--resource", "web"])?;
        self.check()?;

        say("4. What the operator sees: sessions, identity, flows, audit");
        self.fw_show(&["sessions", "list"])?;
        tell("");
        self.wait_until(Duration::from_secs(5), "the mosh flow is listed", || {
            self.flows(&alice)
                .is_ok_and(|f| f.iter().any(|f| f["resource"] == "mosh"))
        })?;
        self.fw_show(&["sessions", "show", &alice])?;
        let shown = self.fw_json(&["sessions", "show", &alice])?;
        ensure!(
            shown["state"] == "active" && shown["groups"][0] == "ops",
            "sessions show: {shown}"
        );
        ensure!(
            shown["device"]["managed"] == true,
            "the device posture is missing: {shown}"
        );
        tell("\nWhich identity owns a connection? The ssh flow's two ends, from");
        tell("`flowwarden flows list --json`, go to `whois`:");
        let flows = self.flows(&alice)?;
        let ssh_flow = flows
            .iter()
            .find(|f| f["resource"] == "ssh")
            .context("the ssh flow is not listed")?;
        let (src, dst) = (
            ssh_flow["source"].as_str().unwrap_or_default(),
            ssh_flow["destination"].as_str().unwrap_or_default(),
        );
        let who = self.fw("whois", &["whois", src, dst])?;
        cmd(&format!("flowwarden whois {src} {dst}"));
        // The rest repeats `sessions show` above.
        for line in who.lines().take(4) {
            note(line);
        }
        note("…  (the same identity, claims and flows as above)");
        let who = self.fw_json(&["whois", src, dst])?;
        ensure!(
            who["session"]["id"] == alice.as_str() && who["session"]["user"] == ALICE,
            "whois named someone else: {who}"
        );
        tell("\nEvery decision is in the audit log:");
        self.fw_show(&["audit"])?;
        self.check()?;
        tell("\nThe same story can be watched in a browser: `flowwarden console` serves it at");
        tell("http://127.0.0.1:9470, live (administrators sign in through the identity provider");
        tell("of [console.oidc]; see docs/console.md). The demo goes on without it.");

        say("5. The operator terminates alice's session: the connection dies at once");
        let terminate = [
            "sessions",
            "terminate",
            alice.as_str(),
            "--reason",
            "laptop reported stolen",
        ];
        self.fw_show(&terminate)?;
        let returned_ns = realtime_ns();
        let returned = Instant::now();
        let exit = self.wait_exit(&mut counter, Duration::from_secs(5))?;
        let stderr = counter.stderr.lock().unwrap().clone();
        let Some((status, exited)) = exit.filter(|(s, _)| !s.success()) else {
            bail!("ssh did not fail within 5 s of the termination ({exit:?}, stderr {stderr:?})");
        };
        let exited_after = exited.duration_since(returned);
        ensure!(
            ["reset", "closed", "Broken pipe", "abort"]
                .iter()
                .any(|w| stderr.contains(w)),
            "ssh did not report the connection closed: {stderr:?}"
        );
        let lines = counter.lines.lock().unwrap().clone();
        let late: Vec<&String> = lines
            .iter()
            .map(|(l, _)| l)
            .filter(|l| printed_ns(l).is_some_and(|t| t > returned_ns))
            .collect();
        ensure!(
            late.is_empty(),
            "lines printed after terminate returned reached the client: {late:?}"
        );
        let (last, _) = lines.last().context("no counter line at all")?;
        let before_ms = printed_ns(last)
            .map(|t| (returned_ns.saturating_sub(t)) / 1_000_000)
            .context("unreadable counter line")?;
        ensure!(
            before_ms < 1_000,
            "the counter had stopped {before_ms} ms before the termination"
        );
        ensure!(
            exited_after <= Duration::from_secs(1),
            "ssh took {} ms to exit after the termination",
            exited_after.as_millis()
        );
        tell("The counter stops mid-stream, and ssh exits with the connection closed:");
        note(&format!(
            "last line: {last}  ({before_ms} ms before terminate returned; nothing later arrived)"
        ));
        note(&match exited_after.as_millis() {
            0 => format!("ssh had exited by the time the call returned ({status}), saying:"),
            ms => format!("ssh exited {ms} ms after the call returned ({status}), saying:"),
        });
        note(&format!("  {}", stderr.trim()));

        tell("\nThe mosh stream keeps sending; the kernel drops each packet and counts it against");
        tell("the session:");
        self.pause(Duration::from_millis(300))?;
        self.wait_until(Duration::from_secs(3), "drops after termination", || {
            self.fw_json(&["sessions", "show", &alice])
                .is_ok_and(|s| s["dropped_after_termination"]["packets"].as_u64() > Some(0))
        })?;
        let sent = sender.stop();
        let shown = self.fw_show(&["sessions", "show", &alice])?;
        ensure!(
            shown.contains("dropped after termination:"),
            "sessions show does not report the drops"
        );
        let ended = self.fw_json(&["sessions", "show", &alice])?;
        ensure!(ended["state"] == "terminated", "state: {}", ended["state"]);
        tell(&format!(
            "(the mosh stream sent {sent} datagrams; those sent after the termination are the drops)"
        ));
        tell("\nA new ssh is refused: the session is over, and only a new login opens it again.");
        self.ssh_refused(&sshd, "echo hello")?;
        drop(counter);
        self.check()?;

        say("6. Termination sticks: her old token is refused, a device lock keeps her out");
        tell("alice tries again with the token she still holds:");
        self.login_refused(&fingerprint, &token_file, &alice_dir, "token_revoked")?;
        tell("\nTerminating denied that token until it expires: she needs a new one from the");
        tell("identity provider, which has her log in there again:");
        // A later second than the denied token's: another token, not a copy of it.
        self.pause(Duration::from_millis(1100))?;
        self.mint(&token_args, &token_file)?;
        let fresh = self.login(&fingerprint, &token_file, &alice_dir)?;
        ensure!(fresh != alice, "login reused the terminated session");
        client_cmd(&ssh_line(COUNTER));
        let mut counter = SshSession::spawn(sshd.ssh(&pair.client, server, COUNTER));
        self.wait_until(Duration::from_secs(15), "counter lines over ssh", || {
            counter.line_count() >= 3 || matches!(counter.child.try_wait(), Ok(Some(_)))
        })?;
        ensure!(
            counter.line_count() >= 3,
            "ssh ended early: {}",
            counter.stderr.lock().unwrap()
        );
        note("…");
        tell("\nThen her laptop is reported stolen. One lock on its device id cuts her off:");
        let added = self.fw_show(&[
            "lock",
            "add",
            "--device",
            LAPTOP,
            "--reason",
            "laptop reported stolen",
            "--show-reason",
        ])?;
        ensure!(
            added.contains("ended 1 live session"),
            "the lock did not end her session: {added}"
        );
        let exit = self.wait_exit(&mut counter, Duration::from_secs(5))?;
        ensure!(
            exit.is_some_and(|(s, _)| !s.success()),
            "ssh survived the device lock ({exit:?})"
        );
        note(&format!(
            "ssh exited: {}",
            counter.stderr.lock().unwrap().trim()
        ));
        drop(counter);
        tell("\nand keeps her out, whatever token that laptop brings:");
        self.login_refused(&fingerprint, &token_file, &alice_dir, "locked")?;
        self.fw_show(&["lock", "list"])?;
        let lock = self.fw_json(&["lock", "list"])?[0]["id"]
            .as_str()
            .context("lock list shows no lock")?
            .to_owned();
        tell("\nThe laptop turns up again: the lock is removed (locks may also carry a --ttl).");
        self.fw_show(&["lock", "remove", &lock])?;
        self.check()?;

        say("7. The identity provider reports her laptop non-compliant: her shell closes");
        tell("The shells need a compliant device (rule remote-shell). The identity provider");
        tell("streams security events to the agent (Shared Signals: CAEP and RISC events, signed,");
        tell("pushed to /v1/ssf/events; [[signals.transmitter]] in agent.toml trusts its key).");
        tell("alice logs in again and opens ssh:");
        let alice3 = self.login(&fingerprint, &token_file, &alice_dir)?;
        let mut counter = self.counter(&sshd, &ssh_line(COUNTER))?;
        tell("\nHer laptop's disk encryption gets switched off. Device management tells the");
        tell("identity provider, which pushes a CAEP device-compliance-change for the laptop");
        tell("(`idp$`: `flowwarden dev ssf` stands in for the provider, with its own key):");
        self.device_status(&fingerprint, "not-compliant")?;
        let pushed = Instant::now();
        let exit = self.wait_exit(&mut counter, Duration::from_secs(5))?;
        let stderr = counter.stderr.lock().unwrap().clone();
        let Some((_, exited)) = exit.filter(|(s, _)| !s.success()) else {
            bail!("ssh survived the non-compliant device ({exit:?}, stderr {stderr:?})");
        };
        note(&format!(
            "ssh exited {} ms after the agent accepted the event, saying:",
            exited.saturating_duration_since(pushed).as_millis()
        ));
        note(&format!("  {}", stderr.trim()));
        drop(counter);
        self.wait_until(Duration::from_secs(3), "the session ends", || {
            self.fw_json(&["sessions", "show", &alice3])
                .is_ok_and(|s| s["state"] == "terminated")
        })?;
        tell("\nHer session lost both shells, which left it nothing: it ended, naming the event:");
        let shown = self.fw_show(&["sessions", "show", &alice3])?;
        ensure!(
            shown.contains("device-compliance-change"),
            "sessions show does not name the event"
        );
        tell("\nEncryption back on, the provider reports the laptop compliant again; her next");
        tell("login gets her shells back:");
        self.device_status(&fingerprint, "compliant")?;
        self.check()?;

        say("8. A policy change severs a live connection too, within a second");
        tell("alice logs in again and opens ssh:");
        let alice2 = self.login(&fingerprint, &token_file, &alice_dir)?;
        ensure!(
            ![&alice, &fresh, &alice3].contains(&&alice2),
            "login reused an ended session"
        );
        client_cmd(&ssh_line(COUNTER));
        let mut counter = SshSession::spawn(sshd.ssh(&pair.client, server, COUNTER));
        self.wait_until(Duration::from_secs(15), "counter lines over ssh", || {
            counter.line_count() >= 3 || matches!(counter.child.try_wait(), Ok(Some(_)))
        })?;
        ensure!(
            counter.line_count() >= 3,
            "ssh ended early: {}",
            counter.stderr.lock().unwrap()
        );
        for (line, _) in counter.lines.lock().unwrap().iter().take(3) {
            note(line);
        }
        note("…");
        let changed = POLICY.replacen(SHELL_GROUPS, SHELL_GROUPS_CHANGED, 1);
        ensure!(changed != POLICY, "the policy has no ops line to change");
        let candidate_dir = scratch.join("candidate");
        std::fs::create_dir_all(&candidate_dir)?;
        let candidate = candidate_dir.join("test.toml");
        std::fs::write(&candidate, &changed)?;
        tell(&format!(
            "\nThe shells move from ops to sre: in {}, rule remote-shell",
            candidate.display()
        ));
        note(&format!("- {SHELL_GROUPS}"));
        note(&format!("+ {SHELL_GROUPS_CHANGED}"));
        tell("Before applying it, the operator asks what it would cut:");
        let dir = candidate_dir.display().to_string();
        let would = self.fw_show(&["policy", "explain", "--candidate", &dir])?;
        ensure!(
            would.contains(&alice2),
            "explain does not name alice's session"
        );
        tell("\nApplied: the agent follows edits of its policy directory by itself (it looks");
        tell("every 100 ms here), so copying the file in is all it takes:");
        cmd(&format!(
            "cp {} {}",
            candidate.display(),
            stack.policy_path().display()
        ));
        stack.write_policy(&changed);
        let written = Instant::now();
        let exit = self.wait_exit(&mut counter, Duration::from_secs(5))?;
        let stderr = counter.stderr.lock().unwrap().clone();
        let Some((_, exited)) = exit.filter(|(s, _)| !s.success()) else {
            bail!("ssh survived the policy change ({exit:?}, stderr {stderr:?})");
        };
        let severed_after = exited.duration_since(written);
        ensure!(
            severed_after <= Duration::from_secs(1),
            "the policy change took {} ms to sever ssh",
            severed_after.as_millis()
        );
        note(&format!(
            "ssh exited {} ms after the policy file changed, saying:",
            severed_after.as_millis()
        ));
        note(&format!("  {}", stderr.trim()));
        drop(counter);
        self.wait_until(Duration::from_secs(3), "the session ends", || {
            self.fw_json(&["sessions", "show", &alice2])
                .is_ok_and(|s| s["state"] == "terminated")
        })?;
        // The kernel and the session change first; the audit records follow at once.
        let kinds = || -> Vec<String> {
            self.fw("audit", &["audit", "--session", &alice2, "--json"])
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|e| e["kind"].as_str().map(str::to_owned))
                .collect()
        };
        let recorded = ["grant_removed", "session_terminated"];
        self.wait_until(
            Duration::from_secs(3),
            "the audit log records the policy change",
            || {
                let kinds = kinds();
                recorded.iter().all(|k| kinds.iter().any(|x| x == k))
            },
        )?;
        tell("\nThe audit log says what happened to the session, and why:");
        self.fw_show(&["audit", "--session", &alice2])?;
        self.check()?;
        Ok(())
    }

    fn check(&self) -> anyhow::Result<()> {
        if self.interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    }

    /// Sleeps, but gives up at once on Ctrl-C.
    fn pause(&self, d: Duration) -> anyhow::Result<()> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.check()?;
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Polls `done` every 20 ms until it holds, `within` passes, or Ctrl-C.
    fn wait_until(
        &self,
        within: Duration,
        what: &str,
        mut done: impl FnMut() -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + within;
        while !done() {
            self.check()?;
            ensure!(Instant::now() < deadline, "{what}: not within {within:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Waits for `ssh` to exit: its status and when it was seen exiting (to within 5 ms), or
    /// None if it still runs after `within`.
    fn wait_exit(
        &self,
        ssh: &mut SshSession,
        within: Duration,
    ) -> anyhow::Result<Option<(ExitStatus, Instant)>> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = ssh.child.try_wait()? {
                let at = Instant::now();
                // Its stderr reader may still be copying the last line.
                self.pause(Duration::from_millis(50))?;
                return Ok(Some((status, at)));
            }
            if Instant::now() > deadline {
                return Ok(None);
            }
            self.check()?;
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Runs `cmd` to completion, polling for Ctrl-C; kills it after `within`.
    fn run_polled(&self, mut cmd: Command, within: Duration) -> anyhow::Result<Ran> {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {:?}", cmd.get_program()))?;
        let drain = |mut pipe: Box<dyn std::io::Read + Send>| {
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = pipe.read_to_string(&mut s);
                s
            })
        };
        let out = drain(Box::new(child.stdout.take().context("stdout")?));
        let err = drain(Box::new(child.stderr.take().context("stderr")?));
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = child.try_wait()? {
                break status;
            }
            if self.interrupted.load(Ordering::Relaxed) || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.check()?;
                bail!("{:?} did not finish within {within:?}", cmd.get_program());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        Ok(Ran {
            status,
            stdout: out.join().unwrap_or_default(),
            stderr: err.join().unwrap_or_default(),
        })
    }

    /// [`http_get`] on its own thread, so that Ctrl-C need not wait for its timeout. The outer
    /// error is the interruption, the inner one the request's.
    fn http_get(&self, ns: &Netns, addr: SocketAddr) -> anyhow::Result<std::io::Result<String>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let ns = ns.clone();
        std::thread::spawn(move || {
            let _ = tx.send(http_get(&ns, addr));
        });
        loop {
            match rx.recv_timeout(Duration::from_millis(20)) {
                Ok(answer) => return Ok(answer),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => self.check()?,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    bail!("the HTTP request's thread died")
                }
            }
        }
    }

    /// `flowwarden ARGS` against the agent; its output, or an error naming `what`.
    fn fw(&self, what: &str, args: &[&str]) -> anyhow::Result<String> {
        let (ok, out) = self.stack.ctl(args);
        ensure!(ok, "`flowwarden {what}` failed: {}", out.trim());
        Ok(out)
    }

    /// Shows `$ flowwarden ARGS` and its human output; returns the output.
    fn fw_show(&self, args: &[&str]) -> anyhow::Result<String> {
        let line = args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ");
        cmd(&format!("flowwarden {line}"));
        let out = self.fw(&line, args)?;
        note(&out);
        Ok(out)
    }

    /// `flowwarden ARGS --json`, parsed: what the demo checks.
    fn fw_json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let mut full = args.to_vec();
        full.push("--json");
        let out = self.fw(&args.join(" "), &full)?;
        serde_json::from_str(&out).with_context(|| format!("flowwarden {args:?}: not JSON: {out}"))
    }

    fn flows(&self, session: &str) -> anyhow::Result<Vec<Value>> {
        let v = self.fw_json(&["flows", "list", "--session", session])?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Runs `flowwarden login` on the client (shown), whatever the agent answers.
    fn run_login(&self, fingerprint: &str, token_file: &Path, cache: &Path) -> anyhow::Result<Ran> {
        let agent = format!("{}:{ADMISSION_PORT}", self.stack.pair.server_addr);
        let token = token_file.display().to_string();
        let args = [
            "login",
            "--agent",
            &agent,
            "--fingerprint",
            fingerprint,
            "--token-file",
            &token,
        ];
        client_cmd(&format!("flowwarden {}", args.map(quote).join(" ")));
        let mut login = self
            .stack
            .pair
            .client
            .command(&self.bin.display().to_string());
        // Her cache (session, reconnect seed) stays in the demo's scratch directory.
        login.args(args).env("XDG_CACHE_HOME", cache);
        self.run_polled(login, Duration::from_secs(20))
    }

    /// `flowwarden login` on the client, shown with its human output; the new session's id.
    fn login(&self, fingerprint: &str, token_file: &Path, cache: &Path) -> anyhow::Result<String> {
        let ran = self.run_login(fingerprint, token_file, cache)?;
        ensure!(
            ran.status.success(),
            "login failed: {}{}",
            ran.stdout,
            ran.stderr
        );
        note(&ran.stdout);
        let id = ran
            .stdout
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("session "))
            .and_then(|l| l.split_whitespace().next())
            .context("login printed no session id")?
            .to_owned();
        let live = self.fw_json(&["sessions", "list", "--live", "--user", ALICE])?;
        ensure!(
            live.as_array()
                .is_some_and(|l| l.iter().any(|s| s["id"] == id.as_str())),
            "the agent does not list session {id} as live: {live}"
        );
        Ok(id)
    }

    /// Mints a development token with `args` (as in act 3) into `token_file`, shown.
    fn mint(&self, args: &[&str], token_file: &Path) -> anyhow::Result<()> {
        cmd(&format!(
            "flowwarden {} > {}",
            args.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" "),
            token_file.display()
        ));
        let mut c = Command::new(&self.bin);
        c.args(args);
        let minted = self.run_polled(c, Duration::from_secs(10))?;
        ensure!(
            minted.status.success(),
            "dev token failed: {}",
            minted.stderr
        );
        std::fs::write(token_file, minted.stdout.trim())?;
        Ok(())
    }

    /// `flowwarden login` that the agent must refuse with `code`, shown with its error.
    fn login_refused(
        &self,
        fingerprint: &str,
        token_file: &Path,
        cache: &Path,
        code: &str,
    ) -> anyhow::Result<()> {
        let ran = self.run_login(fingerprint, token_file, cache)?;
        ensure!(
            !ran.status.success() && ran.stderr.contains(code),
            "login was not refused {code}: {}{}",
            ran.stdout,
            ran.stderr
        );
        note(ran.stderr.trim());
        Ok(())
    }

    /// Opens the live counter over ssh (shown) and waits for its first lines.
    fn counter(&self, sshd: &Sshd, shown: &str) -> anyhow::Result<SshSession> {
        let pair = &self.stack.pair;
        client_cmd(shown);
        let mut counter =
            SshSession::spawn(sshd.ssh(&pair.client, pair.server_addr.into(), COUNTER));
        self.wait_until(Duration::from_secs(15), "counter lines over ssh", || {
            counter.line_count() >= 3 || matches!(counter.child.try_wait(), Ok(Some(_)))
        })?;
        ensure!(
            counter.line_count() >= 3,
            "ssh ended early: {}",
            counter.stderr.lock().unwrap()
        );
        note("…");
        Ok(counter)
    }

    /// The stand-in identity provider pushes a CAEP device-compliance-change for alice's
    /// laptop with `status` (`compliant` or `not-compliant`), shown; the agent must accept it.
    fn device_status(&self, fingerprint: &str, status: &str) -> anyhow::Result<()> {
        let ssf = self.stack.scratch.dir.join("ssf");
        let agent = format!("{}:{ADMISSION_PORT}", self.stack.pair.server_addr);
        let (dir, auth) = (
            ssf.display().to_string(),
            ssf.join("authorization").display().to_string(),
        );
        let args = [
            "dev",
            "ssf",
            "push",
            "--dir",
            &dir,
            "--event",
            "device-compliance-change",
            "--device",
            LAPTOP,
            "--status",
            status,
            "--agent",
            &agent,
            "--fingerprint",
            fingerprint,
            "--authorization-file",
            &auth,
        ];
        println!("    idp$ flowwarden {}", args.map(quote).join(" "));
        // From the client side of the veth, as a provider elsewhere on the network would.
        let mut push = self
            .stack
            .pair
            .client
            .command(&self.bin.display().to_string());
        push.args(args);
        let ran = self.run_polled(push, Duration::from_secs(20))?;
        ensure!(
            ran.status.success() && ran.stdout.contains("202"),
            "the agent did not accept the event: {}{}",
            ran.stdout,
            ran.stderr
        );
        note(&ran.stdout);
        Ok(())
    }

    /// Shows an `ssh` that must time out: its SYNs are dropped.
    fn ssh_refused(&self, sshd: &Sshd, remote: &str) -> anyhow::Result<()> {
        let pair = &self.stack.pair;
        client_cmd(&format!("ssh root@{} {}", pair.server_addr, quote(remote)));
        let ran = self.run_polled(
            sshd.ssh(&pair.client, pair.server_addr.into(), remote),
            SSH_REFUSAL,
        )?;
        ensure!(!ran.status.success(), "ssh got through: {}", ran.stdout);
        // A timeout, not a refusal: sshd is up, the kernel drops the packets.
        ensure!(
            ran.stderr.contains("timed out"),
            "ssh failed for another reason: {}",
            ran.stderr.trim()
        );
        note(&ran.stderr);
        Ok(())
    }
}

/// When the server printed a counter line (`tick N SECONDS.NANOS`), in Unix nanoseconds.
fn printed_ns(line: &str) -> Option<u128> {
    let stamp = line.split_whitespace().nth(2)?;
    let (secs, nanos) = stamp.split_once('.')?;
    Some(secs.parse::<u128>().ok()? * 1_000_000_000 + nanos.parse::<u128>().ok()?)
}

/// Answers every request with one line of text, each connection on its own thread.
fn serve_web(listener: &TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream: TcpStream = stream;
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") && request.len() < 8192 {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let body = "hello from web\n";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\
                 Connection: close\r\n\r\n{body}",
                body.len()
            );
        });
    }
}

/// One HTTP GET from inside `ns`: "status line: body", or why nothing came back.
fn http_get(ns: &Netns, addr: SocketAddr) -> std::io::Result<String> {
    ns.run(move || {
        let mut s = TcpStream::connect_timeout(&addr, HTTP_TIMEOUT)?;
        s.set_read_timeout(Some(HTTP_TIMEOUT))?;
        write!(
            s,
            "GET / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)?;
        let status = answer.lines().next().unwrap_or_default().to_owned();
        let body = answer.split("\r\n\r\n").nth(1).unwrap_or_default().trim();
        Ok(format!("{status}: {body}"))
    })
}

/// A UDP stream from the client, one datagram every 20 ms, until stopped (or dropped).
struct Sender {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Sender {
    fn start(ns: &Netns, to: SocketAddr) -> anyhow::Result<Self> {
        let sock = ns
            .run(|| UdpSocket::bind("0.0.0.0:0"))
            .context("binding the UDP sender")?;
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, sent) = (Arc::clone(&stop), Arc::clone(&sent));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    if sock.send_to(b"mosh-ish keystrokes", to).is_ok() {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Ok(Self {
            stop,
            sent,
            thread: Some(thread),
        })
    }

    /// Stops the stream; how many datagrams it sent.
    fn stop(mut self) -> u64 {
        self.halt();
        self.sent.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        self.halt();
    }
}
