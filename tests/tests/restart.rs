//! Killing the agent opens and closes nothing: a streaming connection keeps flowing through
//! SIGKILL, and a new agent adopts the pinned maps and links (no second attachment, counters
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

use flowwarden::{
    datapath::{DropReason, Maps},
    policy::parse_resources,
};
use flowwarden_tests::{
    agent_proc::{AgentProcess, AgentSetup, Scratch, run_cli, write_config},
    attachments::attached_programs,
    loaded::private_pin_dir,
    netns::NetnsPair,
    privileged::require_root,
    tcp::{accept, connect, listen},
};

const POLICY: &str = r#"
[[resource]]
name = "stream"
protocol = "tcp"
ports = [7100]
"#;
const SESSION: u64 = 0x0b0b_0000_0000_0007;

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
    let pair = NetnsPair::new("rst").expect("namespace pair");
    let pin_dir = private_pin_dir("restart");
    let scratch = Scratch::new("restart");
    let config = write_config(
        &scratch,
        &AgentSetup {
            interface: &pair.server_if,
            pin_dir: &pin_dir,
            policy: POLICY,
            datapath_extra: "",
        },
    );
    let mut first = AgentProcess::start(&pair.server, &config);
    let mut maps = Maps::open_pinned(&pin_dir).unwrap();
    let id = parse_resources([(std::path::Path::new("p"), POLICY)])
        .unwrap()
        .by_name("stream")
        .unwrap()
        .id;
    maps.grant(pair.client_addr.into(), id, SESSION).unwrap();

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

    first.kill9();
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
    let stranger = unused_addr(&pair);
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
    let refused = pair.client.run(move || connect_from(from, addr));
    assert!(
        refused.is_err(),
        "an ungranted source connected while the agent was down"
    );
    assert!(maps.counters().unwrap().dropped(DropReason::NoGrant) > drops_before);

    // A new agent adopts what is pinned: no second attachment, the same maps.
    let second = AgentProcess::start(&pair.server, &config);
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
    drop(second);
    drop(maps);
    reader.join().unwrap();
    let (ok, out) = run_cli(
        None,
        &["datapath", "detach", "--pin-dir", pin_dir.to_str().unwrap()],
    );
    assert!(ok, "{out}");
}

/// An address in the client's subnet that nobody has been granted.
fn unused_addr(pair: &NetnsPair) -> std::net::Ipv4Addr {
    let o = pair.client_addr.octets();
    std::net::Ipv4Addr::new(o[0], o[1], o[2], 99)
}

/// Connects to `to` from the local address `from`, giving up after 300 ms.
fn connect_from(from: SocketAddr, to: SocketAddr) -> std::io::Result<std::net::TcpStream> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket(2)/bind(2)/connect(2) on a fresh fd we own; sockaddr_in values are
    // built in place and outlive the calls.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stream = std::net::TcpStream::from_raw_fd(fd);
        let sa = |a: SocketAddr| {
            let SocketAddr::V4(v4) = a else {
                unreachable!()
            };
            libc::sockaddr_in {
                sin_family: libc::AF_INET as u16,
                sin_port: v4.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from(*v4.ip()).to_be(),
                },
                sin_zero: [0; 8],
            }
        };
        let local = sa(from);
        if libc::bind(
            fd,
            &local as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        // A 300 ms send timeout bounds connect(2) on a blocking socket.
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 300_000,
        };
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            &tv as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as u32,
        );
        let remote = sa(to);
        if libc::connect(
            fd,
            &remote as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_in>() as u32,
        ) != 0
        {
            return Err(std::io::Error::last_os_error());
        }
        Ok(stream)
    }
}
