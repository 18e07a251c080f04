//! The agent's own log stream (stderr, through `tracing`): kernel log records arrive in it
//! under `flowwarden::kernel`, also after a restart that adopted the programs, and a start
//! says nothing about stale sockets unless a dead agent really left one.

use std::time::{Duration, Instant};

use flowwarden_tests::{
    agent_proc::{AgentProcess, AgentSetup, Scratch, write_config},
    frames::{Frame, truncate},
    loaded::{TEST_POLICY, private_pin_dir},
    netns::{Netns, NetnsPair},
    privileged::require_root,
};

const STALE: &str = "removing a stale status socket";

/// Sends `frame` as is out of `interface` in `ns`, through a packet socket.
fn send_raw(ns: &Netns, interface: &str, frame: &[u8]) {
    let interface = std::ffi::CString::new(interface).unwrap();
    ns.run(|| {
        // SAFETY: plain socket calls on a descriptor we own and close; the address and the
        // frame outlive the calls that read them.
        unsafe {
            let ifindex = libc::if_nametoindex(interface.as_ptr());
            assert_ne!(ifindex, 0, "no interface {interface:?}");
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
            assert!(
                fd >= 0,
                "packet socket: {}",
                std::io::Error::last_os_error()
            );
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            addr.sll_halen = 6;
            let sent = libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                std::mem::size_of_val(&addr) as u32,
            );
            let error = std::io::Error::last_os_error();
            libc::close(fd);
            assert_eq!(sent, frame.len() as isize, "sendto: {error}");
        }
    });
}

fn ifindex(ns: &Netns, interface: &str) -> u32 {
    let interface = std::ffi::CString::new(interface).unwrap();
    // SAFETY: if_nametoindex reads a NUL-terminated string we own.
    ns.run(|| unsafe { libc::if_nametoindex(interface.as_ptr()) })
}

fn wait_for_line(agent: &AgentProcess, needle: &str, within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(line) = agent.log().lines().find(|l| l.contains(needle)) {
            return line.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needle:?} within {within:?}; the agent's log:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn kernel_records_reach_the_agent_log_also_after_a_restart() {
    if !require_root("kernel_records_reach_the_agent_log_also_after_a_restart") {
        return;
    }
    let pair = NetnsPair::new("klog").expect("namespace pair");
    let scratch = Scratch::new("klog");
    let pin_dir = private_pin_dir("klog");
    let config = write_config(
        &scratch,
        &AgentSetup {
            interface: &pair.server_if,
            pin_dir: &pin_dir,
            policy: TEST_POLICY,
            datapath_extra: "",
        },
    );
    let mut first = AgentProcess::start(&pair.server, &config);
    assert_eq!(
        first.count_in_log(STALE),
        0,
        "a first start found a stale socket:\n{}",
        first.log()
    );
    // A crash leaves the socket file and the attached programs behind; the next agent
    // adopts the programs, and must read their log records from the pinned ring buffer.
    first.kill9();
    let second = AgentProcess::start(&pair.server, &config);
    assert_eq!(
        second.count_in_log(STALE),
        1,
        "the crashed agent's socket is removed, once:\n{}",
        second.log()
    );
    assert!(second.log_contains("adopted=true"), "{}", second.log());

    // A TCP packet whose TCP header is cut short, from the client to the server's veth.
    let frame = truncate(
        Frame::tcp(pair.client_addr.into(), 40000, pair.server_addr.into(), 22).build(),
        14 + 20 + 8,
    );
    send_raw(&pair.client, &pair.client_if, &frame);
    let line = wait_for_line(&second, "malformed packet", Duration::from_secs(10));
    let expected = format!(
        " WARN flowwarden::kernel: dropped a malformed packet on ifindex {} (42 bytes): its \
         IP/TCP/UDP headers do not parse",
        ifindex(&pair.server, &pair.server_if)
    );
    assert!(
        line.contains(&expected),
        "expected a line with {expected:?}, got {line:?}"
    );
    let _ = flowwarden::datapath::detach_all(&pin_dir);
}
