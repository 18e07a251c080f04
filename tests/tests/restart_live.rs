//! A restart of the agent under live traffic, by SIGKILL and by a graceful stop: an iperf3
//! stream and a live `ssh` session carry on without error, a terminated session's client that
//! keeps sending stays dropped (and counted), a stranger stays dropped, and the new agent adopts
//! the pinned maps and links, reconciles, and answers `status`.

use std::{
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    process::{Child, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use flowwarden::datapath::{DropReason, Maps};
use flowwarden_tests::{
    admit::{AdmitClient, AdmitOutcome},
    attachments::attached_programs,
    netns::Netns,
    privileged::require_root,
    ssh::{SshSession, Sshd, realtime_ns},
    stack::{ADMISSION_PORT, Stack, TokenSpec},
    tcp::connect_from,
};
use serde_json::Value;

const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "iperf"
protocol = "tcp"
ports = [5201]

[[resource]]
name = "metrics"
protocol = "udp"
ports = [9999]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["ssh", "iperf"]

[[rule]]
name = "telemetry"
groups = ["telemetry"]
resources = ["metrics"]
"#;

/// Prints the server's clock every 10 ms for as long as its output goes somewhere.
const TICKER: &str = "while date +%s%N; do sleep 0.01; done";
/// The iperf3 stream outlives setup, the stop, the time without an agent and the restart.
const IPERF_SECS: u64 = 14;
/// Time with no agent at all.
const DOWN: Duration = Duration::from_millis(1500);
/// Only tells "slow" from "never" on a loaded machine; the figure is printed.
const STATUS_BOUND: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Sigkill,
    Graceful,
}

#[test]
fn sigkill_under_live_ssh_iperf_and_a_terminated_sender_opens_and_closes_nothing() {
    if !require_root(
        "sigkill_under_live_ssh_iperf_and_a_terminated_sender_opens_and_closes_nothing",
    ) {
        return;
    }
    restart_under_live_traffic(Stop::Sigkill);
}

#[test]
fn graceful_restart_under_live_ssh_iperf_and_a_terminated_sender_opens_and_closes_nothing() {
    if !require_root(
        "graceful_restart_under_live_ssh_iperf_and_a_terminated_sender_opens_and_closes_nothing",
    ) {
        return;
    }
    restart_under_live_traffic(Stop::Graceful);
}

/// Datagrams that reached the server's metrics port: (sender, the sender's clock when sent).
type Arrivals = Arc<Mutex<Vec<(IpAddr, u128)>>>;

fn restart_under_live_traffic(stop: Stop) {
    let tag = match stop {
        Stop::Sigkill => "rlk",
        Stop::Graceful => "rlg",
    };
    let mut stack = Stack::start(tag, POLICY, "");
    // Owned copies: the stack is borrowed mutably to stop and restart the agent.
    let (client, server_ns) = (stack.pair.client.clone(), stack.pair.server.clone());
    let (server_addr, client_if) = (stack.pair.server_addr, stack.pair.client_if.clone());
    let pair = &stack.pair;
    let server: IpAddr = pair.server_addr.into();
    let o = pair.client_addr.octets();
    let bob_addr = Ipv4Addr::new(o[0], o[1], o[2], 21);
    let stranger = Ipv4Addr::new(o[0], o[1], o[2], 99);
    for a in [bob_addr, stranger] {
        client
            .ip(&["addr", "add", &format!("{a}/32"), "dev", &client_if])
            .expect("adding a client address");
    }

    // alice (ops) logs in as a user would; bob (telemetry) from his own address.
    let token = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &stack.scratch.dir.join("alice"));
    assert!(ok, "alice's login failed: {out}");
    let bob_token = stack.token(&TokenSpec::user("bob@corp.example", &["telemetry"]));
    let admit = AdmitClient::new((server_addr, ADMISSION_PORT).into(), &stack.fingerprint());
    let bob = match client.run(|| admit.admit(bob_addr.into(), &bob_token)) {
        AdmitOutcome::Admitted(r) => r.session,
        other => panic!("bob's admission failed: {other:?}"),
    };

    let sshd = Sshd::start(&server_ns, stack.scratch.dir.join("ssh"), server);
    let mut ssh = SshSession::spawn(sshd.ssh(&client, server, TICKER));
    let iperf_server = spawn_quiet(server_ns.command("iperf3").args(["-s", "-1", "-p", "5201"]));
    stack.wait_until(Duration::from_secs(10), "iperf3 -s listens", || {
        server_ns
            .command("ss")
            .args(["-Htln", "sport = :5201"])
            .output()
            .is_ok_and(|o| !o.stdout.is_empty())
    });
    let iperf = client
        .command("iperf3")
        .args(["-c", &server.to_string(), "-p", "5201", "-b", "50M", "-J"])
        .args(["-t", &IPERF_SECS.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting iperf3");

    let arrivals: Arrivals = Arc::default();
    let running = Arc::new(AtomicBool::new(true));
    let target: SocketAddr = (server_addr, 9999).into();
    let mut threads = vec![receive(&server_ns, target, &arrivals, &running)];
    for sender in [bob_addr, stranger] {
        let sock = client
            .run(|| UdpSocket::bind((sender, 0)))
            .expect("binding a sender");
        threads.push(send_stamped(sock, target, &running));
    }
    stack.wait_until(
        Duration::from_secs(10),
        "ssh lines and bob's datagrams arrive",
        || ssh.line_count() >= 30 && count_from(&arrivals, bob_addr.into()) > 10,
    );

    let (ok, out) = stack.ctl(&["sessions", "terminate", &bob, "--reason", "restart test"]);
    let terminated_ns = realtime_ns();
    assert!(ok, "terminating bob failed: {out}");
    let maps = Maps::open_pinned(&stack.pin_dir).expect("the pinned maps");
    let drops = |r: DropReason| maps.counters().expect("counters").dropped(r);
    std::thread::sleep(Duration::from_millis(300));
    let (revoked_before, no_grant_before) =
        (drops(DropReason::Revoked), drops(DropReason::NoGrant));
    assert!(
        revoked_before > 0 && no_grant_before > 0,
        "bob's and the stranger's drops are counted"
    );

    // The stop.
    let lines_at_stop = ssh.line_count();
    match stop {
        Stop::Sigkill => stack.agent_mut().kill9(),
        Stop::Graceful => assert!(
            stack.agent_mut().stop(),
            "SIGTERM did not stop the agent cleanly"
        ),
    }
    let down_since = Instant::now();
    let probe: SocketAddr = (server_addr, 22).into();
    let mut stranger_connects = 0;
    while down_since.elapsed() < DOWN {
        let from: SocketAddr = (stranger, 0).into();
        if client
            .run(move || connect_from(from, probe, Duration::from_millis(200)))
            .is_ok()
        {
            stranger_connects += 1;
        }
    }
    assert_eq!(
        stranger_connects, 0,
        "the stranger connected to ssh while no agent ran"
    );
    assert!(
        ssh.line_count() > lines_at_stop + 10,
        "ssh stalled with no agent: {} lines at the stop, {} now",
        lines_at_stop,
        ssh.line_count()
    );
    assert!(
        drops(DropReason::Revoked) > revoked_before,
        "bob's packets are dropped with no agent"
    );
    assert!(
        drops(DropReason::NoGrant) > no_grant_before,
        "the stranger's too"
    );

    // The restart: adopted, reconciled, answering.
    let took = stack.restart_timed(STATUS_BOUND);
    println!(
        "{stop:?}: the restarted agent answered status {:.0} ms after its start",
        took.as_secs_f64() * 1e3
    );
    let agent = stack.agent();
    assert_eq!(
        agent.count_in_log("how=adopted"),
        2,
        "links adopted:\n{}",
        agent.log()
    );
    assert!(
        agent.log_contains("store and kernel reconciled"),
        "{}",
        agent.log()
    );
    let attached = attached_programs(&stack.pair.server, &stack.pair.server_if);
    assert_eq!(
        attached.len(),
        2,
        "one XDP and one TCX egress program: {attached:?}"
    );
    let lines_at_restart = ssh.line_count();
    let revoked_at_restart = drops(DropReason::Revoked);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        ssh.line_count() > lines_at_restart + 10,
        "ssh stalled after the restart"
    );
    assert!(
        drops(DropReason::Revoked) > revoked_at_restart,
        "bob stays dropped after the restart"
    );
    let bob_view = stack.ctl_json(&["sessions", "show", &bob]);
    assert_eq!(bob_view["state"], "terminated", "{bob_view}");
    assert!(
        bob_view["dropped_after_termination"]["packets"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "bob's drops after termination are counted: {bob_view}"
    );
    let bob_id = u64::from_str_radix(&bob, 16).expect("a session id");
    assert!(
        maps.revocation(bob_id).is_some(),
        "bob is revoked in the kernel"
    );
    let live = stack.ctl_json(&["sessions", "list", "--live"]);
    let users: Vec<&str> = live
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["user"].as_str())
        .collect();
    assert_eq!(users, ["alice@corp.example"], "only alice is live: {live}");

    // The stream and ssh went on without an error.
    let iperf = wait_output(iperf, Duration::from_secs(IPERF_SECS + 15));
    let report: Value = serde_json::from_slice(&iperf.stdout).unwrap_or_else(|e| {
        panic!(
            "iperf3 -J output ({e}): {}",
            String::from_utf8_lossy(&iperf.stderr)
        )
    });
    assert!(
        iperf.status.success() && report.get("error").is_none(),
        "iperf3 failed: {report}"
    );
    let intervals = report["intervals"].as_array().cloned().unwrap_or_default();
    let slowest = intervals
        .iter()
        .filter_map(|i| i["sum"]["bits_per_second"].as_f64())
        .fold(f64::INFINITY, f64::min);
    assert!(
        intervals.len() as u64 >= IPERF_SECS - 1 && slowest > 0.0,
        "the iperf3 stream stalled (slowest interval {slowest} bit/s): {intervals:?}"
    );
    assert!(
        ssh.child.try_wait().expect("ssh status").is_none(),
        "ssh exited: {}",
        ssh.stderr.lock().unwrap()
    );
    let gap = longest_gap(&ssh);
    println!(
        "{stop:?}: longest pause between ssh lines {:.0} ms, slowest iperf3 second {:.1} Mbit/s",
        gap.as_secs_f64() * 1e3,
        slowest / 1e6
    );
    assert!(gap < Duration::from_secs(3), "ssh paused for {gap:?}");

    running.store(false, Ordering::Relaxed);
    for t in threads {
        t.join().expect("a traffic thread");
    }
    let arrived = arrivals.lock().unwrap().clone();
    let late: Vec<_> = arrived
        .iter()
        .filter(|(ip, t)| *ip == IpAddr::from(bob_addr) && *t > terminated_ns)
        .collect();
    assert!(
        late.is_empty(),
        "bob's datagrams sent after his termination arrived: {late:?}"
    );
    assert_eq!(
        count_from(&arrivals, stranger.into()),
        0,
        "the stranger's datagrams arrived"
    );
    drop(iperf_server);
}

fn count_from(arrivals: &Arrivals, ip: IpAddr) -> usize {
    arrivals
        .lock()
        .unwrap()
        .iter()
        .filter(|(a, _)| *a == ip)
        .count()
}

/// Counts what reaches `at` in `ns`, with the sender's stamp.
fn receive(
    ns: &Netns,
    at: SocketAddr,
    arrivals: &Arrivals,
    running: &Arc<AtomicBool>,
) -> JoinHandle<()> {
    let sock = ns
        .run(|| UdpSocket::bind(at))
        .expect("binding the metrics port");
    sock.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let (arrivals, running) = (Arc::clone(arrivals), Arc::clone(running));
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while running.load(Ordering::Relaxed) {
            if let Ok((n, peer)) = sock.recv_from(&mut buf) {
                let stamp = String::from_utf8_lossy(&buf[..n])
                    .trim()
                    .parse()
                    .unwrap_or(0);
                arrivals.lock().unwrap().push((peer.ip(), stamp));
            }
        }
    })
}

/// Sends the sender's clock every 5 ms.
fn send_stamped(sock: UdpSocket, to: SocketAddr, running: &Arc<AtomicBool>) -> JoinHandle<()> {
    let running = Arc::clone(running);
    std::thread::spawn(move || {
        while running.load(Ordering::Relaxed) {
            let _ = sock.send_to(realtime_ns().to_string().as_bytes(), to);
            std::thread::sleep(Duration::from_millis(5));
        }
    })
}

/// The longest time between two ssh lines arriving.
fn longest_gap(ssh: &SshSession) -> Duration {
    let lines = ssh.lines.lock().unwrap();
    let gap = lines
        .windows(2)
        .map(|w| w[1].1.saturating_sub(w[0].1))
        .max()
        .unwrap_or(0);
    Duration::from_nanos(u64::try_from(gap).unwrap_or(u64::MAX))
}

struct Quiet(Child);

impl Drop for Quiet {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_quiet(cmd: &mut std::process::Command) -> Quiet {
    Quiet(
        cmd.stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning"),
    )
}

fn wait_output(mut child: Child, within: Duration) -> std::process::Output {
    let deadline = Instant::now() + within;
    while child.try_wait().expect("waiting").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().expect("collecting output")
}
