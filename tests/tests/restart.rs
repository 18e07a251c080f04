//! Killing the agent opens and closes nothing: a logged-in session's stream keeps flowing
//! through SIGKILL, and a new agent adopts the pinned maps and links (no second attachment, counters
//! continue).

use std::{
    io::{Read as _, Write as _},
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use flowwarden::datapath::{DropReason, Maps};
use flowwarden_tests::{
    attachments::attached_programs,
    netns::NetnsPair,
    privileged::require_root,
    stack::{Stack, TokenSpec},
    tcp::{accept, connect, connect_from, listen},
};

const POLICY: &str = r#"
[[resource]]
name = "stream"
protocol = "tcp"
ports = [7100]

[[rule]]
name = "ops-stream"
groups = ["ops"]
resources = ["stream"]
"#;

/// Waits until `received` grows by at least `bytes`, or panics after `within`.
fn wait_for_progress(received: &AtomicU64, bytes: u64, within: Duration, what: &str) {
    let start = received.load(Ordering::Relaxed);
    let deadline = Instant::now() + within;
    while received.load(Ordering::Relaxed) < start + bytes {
        assert!(
            Instant::now() < deadline,
            "{what}: the stream stalled at {start} bytes"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn sigkill_keeps_the_stream_and_a_new_agent_adopts_the_pins() {
    if !require_root("sigkill_keeps_the_stream_and_a_new_agent_adopts_the_pins") {
        return;
    }
    let mut stack = Stack::start("rsk", POLICY, "");
    let token = stack.token(&TokenSpec::user("grace@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &stack.scratch.dir.join("grace"));
    assert!(ok, "login failed: {out}");
    let maps = Maps::open_pinned(&stack.pin_dir).unwrap();
    let pair = &stack.pair;

    let addr: SocketAddr = (pair.server_addr, 7100).into();
    let listener = listen(&pair.server, addr);
    let mut client = connect(&pair.client, addr, Duration::from_secs(5)).unwrap();
    let mut server = accept(&listener, Duration::from_secs(5)).unwrap();

    // The client streams a line every 10 ms; the server counts what arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let writer = {
        let stop = Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if client.write_all(format!("line {n}\n").as_bytes()).is_err() {
                    return n;
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(10));
            }
            n
        })
    };
    let reader = {
        let received = Arc::clone(&received);
        server
            .set_read_timeout(Some(Duration::from_secs(1)))
            .unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = server.read(&mut buf) {
                if n == 0 {
                    break;
                }
                received.fetch_add(n as u64, Ordering::Relaxed);
            }
        })
    };
    wait_for_progress(&received, 200, Duration::from_secs(5), "before the kill");

    stack.agent.as_mut().expect("agent running").kill9();
    let flow_before = maps.flows()[0].1;
    wait_for_progress(
        &received,
        500,
        Duration::from_secs(5),
        "with the agent killed",
    );
    let flow_after_kill = maps.flows()[0].1;
    assert!(
        flow_after_kill.rx_packets > flow_before.rx_packets,
        "the kernel keeps counting with no agent: {flow_before:?} → {flow_after_kill:?}"
    );
    // Unauthenticated traffic stays dropped with no agent running.
    let drops_before = maps.counters().unwrap().dropped(DropReason::NoGrant);
    // A second address on the client that nobody has been granted.
    let stranger = unused_addr(pair);
    pair.client
        .ip(&[
            "addr",
            "add",
            &format!("{stranger}/32"),
            "dev",
            &pair.client_if,
        ])
        .unwrap();
    let from: SocketAddr = (stranger, 0).into();
    let refused = pair
        .client
        .run(move || connect_from(from, addr, Duration::from_millis(300)));
    assert!(
        refused.is_err(),
        "an ungranted source connected while the agent was down"
    );
    assert!(maps.counters().unwrap().dropped(DropReason::NoGrant) > drops_before);

    // A new agent adopts what is pinned: no second attachment, the same maps.
    stack.start_agent();
    let pair = &stack.pair;
    let second = stack.agent();
    assert_eq!(second.count_in_log("how=adopted"), 2, "{}", second.log());
    let attached = attached_programs(&pair.server, &pair.server_if);
    assert_eq!(
        attached.len(),
        2,
        "exactly one XDP and one TCX egress program: {attached:?}"
    );
    wait_for_progress(&received, 300, Duration::from_secs(5), "after the restart");
    let flow_after_restart = maps.flows()[0].1;
    assert!(
        flow_after_restart.rx_packets > flow_after_kill.rx_packets,
        "counters continue"
    );
    assert_eq!(maps.flows().len(), 1, "the same flow, not a new one");

    stop.store(true, Ordering::Relaxed);
    let lines = writer.join().unwrap();
    assert!(lines > 50, "the writer wrote {lines} lines without error");
    let live = stack.ctl_json(&["sessions", "list", "--live"]);
    assert_eq!(
        live.as_array().map(Vec::len),
        Some(1),
        "the session survived: {live}"
    );
    drop(maps);
    drop(stack);
    reader.join().unwrap();
}

/// An address in the client's subnet that nobody has been granted.
fn unused_addr(pair: &NetnsPair) -> std::net::Ipv4Addr {
    let o = pair.client_addr.octets();
    std::net::Ipv4Addr::new(o[0], o[1], o[2], 99)
}

#[test]
fn a_corrupt_state_file_stops_the_start_and_leaves_enforcement_as_pinned() {
    if !require_root("a_corrupt_state_file_stops_the_start_and_leaves_enforcement_as_pinned") {
        return;
    }
    let mut stack = Stack::start("crp", POLICY, "");
    let token = stack.token(&TokenSpec::user("heidi@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &stack.scratch.dir.join("heidi"));
    assert!(ok, "login failed: {out}");
    let addr: SocketAddr = (stack.pair.server_addr, 7100).into();
    let listener = listen(&stack.pair.server, addr);
    let mut client = connect(&stack.pair.client, addr, Duration::from_secs(5)).unwrap();
    let mut server = accept(&listener, Duration::from_secs(5)).unwrap();
    stack.agent.as_mut().expect("agent running").kill9();

    let state = stack.scratch.dir.join("state/state.redb");
    std::fs::write(&state, b"this is not a redb file").unwrap();
    let before = std::fs::read(&state).unwrap();
    let bin = flowwarden_tests::agent_proc::agent_bin();
    let out = stack
        .pair
        .server
        .command(bin.to_str().unwrap())
        .args(["agent", "--config"])
        .arg(&stack.config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "the agent started on a corrupt state file"
    );
    assert!(
        stderr.contains("refusing to start") && stderr.contains("state.redb"),
        "the refusal should say why and which file: {stderr}"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        before,
        "the corrupt file was modified"
    );
    // Nothing was opened or closed: the admitted flow still passes, strangers stay out.
    use std::io::{Read as _, Write as _};
    client.write_all(b"still here").unwrap();
    let mut buf = [0u8; 10];
    server.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"still here");
    let pins = Maps::open_pinned(&stack.pin_dir).expect("the pins are still there");
    assert!(!pins.grants().is_empty(), "the grants were dropped");
}
