//! `cargo xtask demo`: the story of flowwarden in one run, narrated, on a throwaway pair of
//! network namespaces. Exits non-zero if any step does not behave as narrated.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
        mpsc,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail, ensure};
use flowwarden::{
    datapath::{DropReason, Maps},
    policy::parse_resources,
};
use flowwarden_tests::{
    agent_proc::{AgentProcess, AgentSetup, Scratch, agent_bin, run_cli, write_config},
    loaded::private_pin_dir,
    netns::NetnsPair,
    privileged::require_root,
    tcp::connect,
};

const POLICY: &str = r#"# The demo protects one service: a ticker on tcp/7000.
[[resource]]
name = "ticker"
protocol = "tcp"
ports = [7000]
"#;
const PORT: u16 = 7000;
const SESSION: u64 = 0xde70_0000_0000_0001;

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

fn say(text: &str) {
    println!("\n{}", bold(&format!("==> {text}")));
}

fn cmd(text: &str) {
    println!("    $ {text}");
}

fn note(text: &str) {
    println!("    {text}");
}

fn main() {
    let interrupted = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second Ctrl-C exits at once; the first lets the demo clean up.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 1, Arc::clone(&interrupted));
        let _ = signal_hook::flag::register(sig, Arc::clone(&interrupted));
    }
    let result = run(&interrupted);
    // Every guard (agent, pins, namespaces) has been dropped by now: cleanup is done.
    match result {
        Ok(()) => println!(
            "\n{}",
            bold("demo complete: everything it created has been removed")
        ),
        Err(_) if interrupted.load(Ordering::Relaxed) => {
            eprintln!("\ndemo interrupted: everything it created has been removed");
            std::process::exit(130);
        }
        Err(e) => {
            eprintln!("\ndemo FAILED: {e:#}\n(everything it created has been removed)");
            std::process::exit(1);
        }
    }
}

fn run(interrupted: &AtomicBool) -> anyhow::Result<()> {
    let check = || -> anyhow::Result<()> {
        if interrupted.load(Ordering::Relaxed) {
            bail!("interrupted");
        }
        Ok(())
    };
    if !require_root("demo") {
        bail!("the demo creates network namespaces and loads BPF programs: run it as root");
    }
    let bin = agent_bin();

    say("1. Two hosts: a client and a server network namespace, joined by a veth pair");
    let pair = NetnsPair::new("demo").context("creating the namespaces")?;
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
    check()?;

    say("2. The server runs a service on tcp/7000 that sends a tick every 100 ms");
    let addr: SocketAddr = (pair.server_addr, PORT).into();
    let listener = pair
        .server
        .run(|| TcpListener::bind(addr))
        .context("binding the ticker")?;
    std::thread::spawn(move || ticker(listener));

    say("3. The agent protects tcp/7000 on the server's interface");
    let pin_dir = private_pin_dir("demo");
    let scratch = Scratch::new("demo");
    let config = write_config(
        &scratch,
        &AgentSetup {
            interface: &pair.server_if,
            pin_dir: &pin_dir,
            policy: POLICY,
            datapath_extra: "",
        },
    );
    for line in std::fs::read_to_string(&config)?.lines() {
        note(&format!("agent.toml | {line}"));
    }
    for line in POLICY.lines() {
        note(&format!("policies/demo.toml | {line}"));
    }
    cmd(&format!(
        "nsenter --net=/run/netns/{} {} agent --config {}",
        pair.server.name,
        bin.display(),
        config.display()
    ));
    let agent = AgentProcess::start(&pair.server, &config);
    let _cleanup = Detach(pin_dir.clone());
    note("agent ready: XDP on ingress, TCX on egress, maps pinned under");
    note(&format!("{}", pin_dir.display()));
    let mut maps = Maps::open_pinned(&pin_dir)?;
    let ticker_id = parse_resources([(std::path::Path::new("demo.toml"), POLICY)])?
        .by_name("ticker")
        .context("ticker resource")?
        .id;
    check()?;

    say("4. Without a session, the client cannot reach the protected service");
    cmd(&format!("(client) connect {addr}"));
    let refused = connect(&pair.client, addr, Duration::from_secs(1));
    ensure!(refused.is_err(), "the client connected without a grant");
    let no_grant = maps.counters()?.dropped(DropReason::NoGrant);
    ensure!(no_grant > 0, "the dropped SYN was not counted");
    note(&format!(
        "connection timed out; kernel counter dropped[no_grant] = {no_grant}"
    ));
    check()?;

    say("5. A session is admitted: the agent writes a grant (client address, ticker) → session");
    note("(in the next release `flowwarden login` with a JWT does this; here the demo writes");
    note(" the grant through the agent's typed map handle, as the tests do)");
    maps.grant(pair.client_addr.into(), ticker_id, SESSION)?;
    note(&format!(
        "grant {} → ticker for session {SESSION:016x}",
        pair.client_addr
    ));
    let stream = connect(&pair.client, addr, Duration::from_secs(5)).context("granted connect")?;
    let (ticks_tx, ticks) = mpsc::channel::<String>();
    let reader = stream.try_clone()?;
    std::thread::spawn(move || {
        for line in BufReader::new(reader).lines() {
            match line {
                Ok(l) => {
                    if ticks_tx.send(l).is_err() {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    });
    for _ in 0..5 {
        let tick = ticks
            .recv_timeout(Duration::from_secs(2))
            .context("no tick arrived")?;
        note(&format!("client received: {tick}"));
    }
    let flows = maps.flows();
    ensure!(flows.len() == 1, "expected one flow, found {}", flows.len());
    let (key, flow) = flows[0];
    note(&format!(
        "kernel flow tcp {}:{} → :{}  session {:016x}  in {} pkts / {} B, out {} pkts / {} B",
        pair.client_addr,
        key.sport,
        key.dport,
        flow.session_id,
        flow.rx_packets,
        flow.rx_bytes,
        flow.tx_packets,
        flow.tx_bytes
    ));
    check()?;

    say("6. The session is revoked: one write to the kernel's revoked map");
    cmd(&format!("(agent) revoked[{SESSION:016x}] = now"));
    // Drain what was in flight, then revoke and mark the moment.
    while ticks.try_recv().is_ok() {}
    maps.revoke(SESSION)?;
    let revoked_at = Instant::now();
    let mut after = 0;
    while let Ok(tick) = ticks.recv_timeout(Duration::from_millis(1500)) {
        // A tick already on the wire before the write may still land; nothing sent later may.
        ensure!(
            revoked_at.elapsed() < Duration::from_millis(50),
            "{tick} arrived {:?} after the revocation",
            revoked_at.elapsed()
        );
        after += 1;
    }
    note(&format!(
        "no tick arrived in the 1.5 s after the revocation ({after} already in flight)"
    ));
    let stats = maps.session_stats(SESSION).context("session counters")?;
    ensure!(
        stats.dropped_after_revoke_packets > 0,
        "no drop was counted after the revocation"
    );
    note(&format!(
        "proof: dropped after revocation: {} packets, {} bytes",
        stats.dropped_after_revoke_packets, stats.dropped_after_revoke_bytes
    ));
    let refused = connect(&pair.client, addr, Duration::from_secs(1));
    ensure!(
        refused.is_err(),
        "a new connection of the revoked session got through"
    );
    note("a new connection of the revoked session is refused too");
    ensure!(
        agent.log_contains("first packet dropped after revocation"),
        "the agent did not report the first drop"
    );
    note("the agent logged: first packet dropped after revocation");
    drop(stream);
    check()?;

    say("7. Cleaning up: stop the agent, detach the datapath, delete the namespaces");
    drop(agent);
    drop(maps);
    cmd(&format!(
        "flowwarden datapath detach --pin-dir {}",
        pin_dir.display()
    ));
    let (ok, out) = run_cli(
        None,
        &["datapath", "detach", "--pin-dir", pin_dir.to_str().unwrap()],
    );
    ensure!(ok, "detach failed: {out}");
    note(out.lines().last().unwrap_or(""));
    cmd(&format!(
        "ip netns del {}; ip netns del {}",
        pair.client.name, pair.server.name
    ));
    Ok(())
}

/// Sends `tick N` every 100 ms to every client, each on its own thread.
fn ticker(listener: TcpListener) {
    for stream in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut stream: TcpStream = stream;
            for n in 1.. {
                if writeln!(stream, "tick {n}").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
    }
}

/// Removes the demo's pins even when a step fails or the demo is interrupted.
struct Detach(std::path::PathBuf);

impl Drop for Detach {
    fn drop(&mut self) {
        let _ = flowwarden::datapath::detach_all(&self.0);
    }
}
