//! Tears down the local TCP sockets of a terminated session's flows with sock_diag SOCK_DESTROY.

use std::{
    fmt,
    fs::File,
    io,
    net::SocketAddr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
};

use super::diag_codec::{
    Found, SOCK_DESTROY, SOCK_DIAG_BY_FAMILY, SockId, TCP_LISTEN, TCP_TIME_WAIT, decode_found,
    encode, kernel_id, malformed, parse_answer,
};

/// One flow as the agent knows it: `remote` is the client, `local` the resource address on
/// this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowSockets {
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl fmt::Display for FlowSockets {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} -> {}", self.remote, self.local)
    }
}

/// What a batch did: sockets aborted, and flows that had no live socket (already closed,
/// in TIME_WAIT, or never on this host).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Destroyed {
    pub destroyed: usize,
    pub not_found: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("cannot open a NETLINK_SOCK_DIAG socket ({step}): {source}")]
    Open {
        step: &'static str,
        source: io::Error,
    },
    #[error("cannot enter network namespace {}: {source}", path.display())]
    Netns { path: PathBuf, source: io::Error },
    #[error("cannot start a thread for network namespace {}: {source}", path.display())]
    Thread { path: PathBuf, source: io::Error },
    #[error("the thread destroying sockets in network namespace {} panicked", path.display())]
    ThreadPanicked { path: PathBuf },
    #[error("the kernel cannot destroy TCP sockets: {missing} is missing ({source})")]
    Unsupported {
        missing: &'static str,
        source: io::Error,
    },
    #[error(
        "destroying the TCP socket of flow {flow} needs CAP_NET_ADMIN in its network namespace"
    )]
    NotPermitted { flow: FlowSockets },
    #[error("{request} for flow {flow}: {source}")]
    Netlink {
        request: &'static str,
        flow: FlowSockets,
        source: io::Error,
    },
}

/// Destroys the local TCP sockets (IPv4 and IPv6, any state but LISTEN and TIME_WAIT) of each
/// flow, in the network namespace of the calling thread. Only exact 4-tuples are touched:
/// a listener is never destroyed, even when a flow names its port.
///
/// # Errors
/// The netlink socket cannot be opened, the caller lacks CAP_NET_ADMIN, the kernel lacks
/// TCP socket diagnostics or CONFIG_INET_DIAG_DESTROY, or the kernel answers unexpectedly.
/// A flow without a socket is not an error: it counts as `not_found`.
pub fn destroy_tcp(flows: &[FlowSockets]) -> Result<Destroyed, SocketError> {
    let mut done = Destroyed::default();
    if flows.is_empty() {
        return Ok(done);
    }
    let mut diag = DiagSocket::open()?;
    for flow in flows {
        if diag.destroy(flow)? {
            done.destroyed += 1;
        } else {
            done.not_found += 1;
        }
    }
    Ok(done)
}

/// Same as [`destroy_tcp`], inside the network namespace at `netns` (a `/run/netns/NAME` or
/// `/proc/PID/ns/net` path). Runs on a short-lived thread that `setns()`es there, so the
/// caller's thread never moves.
///
/// # Errors
/// As [`destroy_tcp`], and when `netns` cannot be opened or entered (not a network
/// namespace, or no CAP_SYS_ADMIN).
pub fn destroy_tcp_in(netns: &Path, flows: &[FlowSockets]) -> Result<Destroyed, SocketError> {
    let netns_err = |source| SocketError::Netns {
        path: netns.to_path_buf(),
        source,
    };
    // Opened here so that a bad path fails before a thread exists.
    let ns = File::open(netns).map_err(netns_err)?;
    // The worker logs under the caller's span, so its lines still say which session it serves.
    let span = tracing::Span::current();
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name("fw-sock-destroy".into())
            .spawn_scoped(scope, move || {
                let _in_span = span.enter();
                enter_netns(&ns).map_err(netns_err)?;
                destroy_tcp(flows)
            })
            .map_err(|source| SocketError::Thread {
                path: netns.to_path_buf(),
                source,
            })?;
        // The thread ends here, so it never runs anything else inside that namespace.
        worker.join().map_err(|_| SocketError::ThreadPanicked {
            path: netns.to_path_buf(),
        })?
    })
}

fn enter_netns(ns: &File) -> io::Result<()> {
    // SAFETY: `ns` is an open descriptor for the call's duration; setns only changes the
    // network namespace of this thread, which ends right after its work.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    Err(match err.raw_os_error() {
        Some(libc::EINVAL) => {
            io::Error::new(io::ErrorKind::InvalidInput, "not a network namespace")
        }
        _ => err,
    })
}

/// Kernel answers are synchronous; this only bounds a kernel that never answers.
const ANSWER_TIMEOUT_SECS: libc::time_t = 5;

/// A NETLINK_SOCK_DIAG socket reused for every request of a batch.
struct DiagSocket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

impl DiagSocket {
    fn open() -> Result<Self, SocketError> {
        let open_err = |step| move |source| SocketError::Open { step, source };
        // SAFETY: plain syscall on constant arguments; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::NETLINK_SOCK_DIAG,
            )
        };
        if raw < 0 {
            return Err(open_err("socket")(io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let timeout = libc::timeval {
            tv_sec: ANSWER_TIMEOUT_SECS,
            tv_usec: 0,
        };
        // SAFETY: `timeout` outlives the call and the length given is its size.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&raw const timeout).cast(),
                size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(open_err("receive timeout")(io::Error::last_os_error()));
        }
        let mut diag = Self {
            fd,
            seq: 0,
            buf: vec![0; 16 * 1024],
        };
        // Without tcp_diag every lookup answers ENOENT, which would read as "no such socket"
        // and report success while nothing is torn down. An empty dump tells the two apart.
        let probe = SockId::new(libc::AF_INET, 0, 0, [0; 16], [0; 16]);
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_DUMP;
        match diag.ask(SOCK_DIAG_BY_FAMILY, flags, 0, &probe, |_| {}) {
            Ok(0) => Ok(diag),
            Ok(errno) => Err(SocketError::Unsupported {
                missing: "TCP socket diagnostics (CONFIG_INET_DIAG, CONFIG_INET_TCP_DIAG)",
                source: io::Error::from_raw_os_error(errno),
            }),
            Err(source) => Err(open_err("probe for TCP socket diagnostics")(source)),
        }
    }

    /// Aborts the live socket of `flow`; `false` when it has none.
    fn destroy(&mut self, flow: &FlowSockets) -> Result<bool, SocketError> {
        let Some(id) = kernel_id(flow) else {
            tracing::warn!(%flow, "flow cannot name a connected TCP socket; nothing to destroy");
            return Ok(false);
        };
        let Some(found) = self.lookup(flow, &id)? else {
            tracing::debug!(%flow, "no live TCP socket for flow");
            return Ok(false);
        };
        // The cookie pins the request to the socket just seen: should it close meanwhile,
        // the kernel's lookup falls back to the listener, whose cookie differs, and the
        // answer is ENOENT instead of a destroyed listener.
        let pinned = SockId {
            cookie: found.id.cookie,
            ..id
        };
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
        let errno = self
            .ask(SOCK_DESTROY, flags, 0, &pinned, |_| {})
            .map_err(|source| netlink_err("SOCK_DESTROY", flow, source))?;
        match errno {
            0 => {
                tracing::debug!(%flow, state = found.state, "destroyed TCP socket");
                Ok(true)
            }
            libc::ENOENT => Ok(false),
            libc::EPERM | libc::EACCES => Err(SocketError::NotPermitted { flow: *flow }),
            libc::EOPNOTSUPP => Err(SocketError::Unsupported {
                missing: "CONFIG_INET_DIAG_DESTROY",
                source: io::Error::from_raw_os_error(errno),
            }),
            _ => {
                let source = io::Error::from_raw_os_error(errno);
                Err(netlink_err("SOCK_DESTROY", flow, source))
            }
        }
    }

    /// The socket with exactly this 4-tuple, if one is alive.
    fn lookup(&mut self, flow: &FlowSockets, id: &SockId) -> Result<Option<Found>, SocketError> {
        let mut found = None;
        let flags = libc::NLM_F_REQUEST | libc::NLM_F_ACK;
        let errno = self
            .ask(SOCK_DIAG_BY_FAMILY, flags, u32::MAX, id, |payload| {
                found = decode_found(payload);
            })
            .map_err(|source| netlink_err("SOCK_DIAG_BY_FAMILY", flow, source))?;
        match errno {
            0 => {}
            libc::ENOENT => return Ok(None),
            _ => {
                let source = io::Error::from_raw_os_error(errno);
                return Err(netlink_err("SOCK_DIAG_BY_FAMILY", flow, source));
            }
        }
        let found = found.ok_or_else(|| {
            netlink_err(
                "SOCK_DIAG_BY_FAMILY",
                flow,
                malformed("acknowledged without a socket"),
            )
        })?;
        // The kernel's lookup falls back to the listener of the local address when no
        // connected socket matches; it has no remote port. TIME_WAIT has no process to tell.
        let connected = found.id.dport == id.dport && found.id.sport == id.sport;
        if !connected || found.state == TCP_LISTEN || found.state == TCP_TIME_WAIT {
            tracing::debug!(%flow, state = found.state, "only a listener or TIME_WAIT matches");
            return Ok(None);
        }
        Ok(Some(found))
    }

    /// Sends one request and reads until its final answer, handing each data message's
    /// payload to `on_data`. Returns the errno the kernel answered with, 0 for success.
    fn ask(
        &mut self,
        kind: u16,
        flags: i32,
        states: u32,
        id: &SockId,
        mut on_data: impl FnMut(&[u8]),
    ) -> io::Result<i32> {
        self.seq = self.seq.wrapping_add(1);
        let request = encode(kind, flags, self.seq, states, id);
        // SAFETY: `request` is a live buffer of the length given.
        let sent = retry_eintr(|| unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                request.as_ptr().cast(),
                request.len(),
                0,
            )
        })?;
        if sent != request.len() {
            return Err(malformed("short send"));
        }
        loop {
            // SAFETY: `buf` is a live, writable buffer of the length given.
            let n = retry_eintr(|| unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr().cast(),
                    self.buf.len(),
                    0,
                )
            })
            .map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock => {
                    io::Error::new(io::ErrorKind::TimedOut, "the kernel did not answer")
                }
                _ => e,
            })?;
            if let Some(errno) = parse_answer(&self.buf[..n], self.seq, &mut on_data)? {
                return Ok(errno);
            }
        }
    }
}

fn netlink_err(request: &'static str, flow: &FlowSockets, source: io::Error) -> SocketError {
    SocketError::Netlink {
        request,
        flow: *flow,
        source,
    }
}

fn retry_eintr(mut call: impl FnMut() -> isize) -> io::Result<usize> {
    loop {
        let rc = call();
        if rc >= 0 {
            return Ok(rc as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read, Write},
        net::{Ipv4Addr, Ipv6Addr, TcpListener, TcpStream},
        process::Command,
        sync::atomic::{AtomicU32, Ordering},
        time::{Duration, Instant},
    };

    use super::*;

    const WAIT: Duration = Duration::from_secs(2);
    const SERVER_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
    const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
    const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 1);
    const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 2);

    /// Privileged tests need root; CI must give it, a developer's run skips them.
    fn privileged() -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        // A CI job that skipped these would report green while testing nothing.
        let ci = std::env::var("CI").unwrap_or_default();
        assert!(
            !(ci.eq_ignore_ascii_case("true") || ci == "1"),
            "needs root for network namespaces and SOCK_DESTROY; CI must run it as root"
        );
        eprintln!("skipped: needs root for network namespaces and SOCK_DESTROY");
        false
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A throwaway network namespace, deleted on drop.
    struct Netns(String);

    impl Netns {
        fn add(name: String) -> Self {
            ip(&["netns", "add", &name]);
            Self(name)
        }

        fn path(&self) -> PathBuf {
            Path::new("/run/netns").join(&self.0)
        }

        /// Runs `f` on a thread inside this namespace; sockets made there stay in it.
        fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
            let ns = File::open(self.path()).expect("open netns");
            std::thread::scope(|s| {
                s.spawn(|| {
                    enter_netns(&ns).expect("setns");
                    f()
                })
                .join()
                .expect("netns thread")
            })
        }
    }

    impl Drop for Netns {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    /// A server and a client namespace joined by a veth pair, IPv4 and IPv6.
    struct Pair {
        server: Netns,
        client: Netns,
    }

    fn pair() -> Pair {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "fwsk-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pair = Pair {
            server: Netns::add(format!("{tag}-s")),
            client: Netns::add(format!("{tag}-c")),
        };
        let (s, c) = (pair.server.0.as_str(), pair.client.0.as_str());
        ip(&[
            "link", "add", "v0", "netns", s, "type", "veth", "peer", "v1", "netns", c,
        ]);
        for (ns, dev, v4, v6) in [
            (s, "v0", SERVER_V4, SERVER_V6),
            (c, "v1", CLIENT_V4, CLIENT_V6),
        ] {
            ip(&["-n", ns, "addr", "add", &format!("{v4}/24"), "dev", dev]);
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                dev,
                "nodad",
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        pair
    }

    fn connect(from: &Netns, to: SocketAddr) -> TcpStream {
        let stream = from
            .run(|| TcpStream::connect_timeout(&to, WAIT))
            .unwrap_or_else(|e| panic!("expected to connect to {to}, saw {e}"));
        stream.set_read_timeout(Some(WAIT)).expect("read timeout");
        stream
    }

    /// Connects from the client namespace and returns both ends, proven to carry data.
    fn session(p: &Pair, listener: &TcpListener, to: SocketAddr) -> (TcpStream, TcpStream) {
        let mut client = connect(&p.client, to);
        let (mut accepted, _) = listener.accept().expect("accept");
        accepted.set_read_timeout(Some(WAIT)).expect("read timeout");
        client.write_all(b"x").expect("client write");
        accepted.read_exact(&mut [0]).expect("server read");
        accepted.write_all(b"y").expect("server write");
        client.read_exact(&mut [0]).expect("client read");
        (client, accepted)
    }

    /// Severs one live flow on the server side and checks what each end and the listener see.
    fn sever_server_side(bind: SocketAddr, to: SocketAddr) {
        let p = pair();
        let listener = p.server.run(|| TcpListener::bind(bind)).expect("bind");
        let to = SocketAddr::new(to.ip(), listener.local_addr().expect("addr").port());
        let (mut client, mut accepted) = session(&p, &listener, to);
        let flow = FlowSockets {
            remote: client.local_addr().expect("client addr"),
            local: to,
        };

        let got = destroy_tcp_in(&p.server.path(), &[flow]).expect("destroy");
        assert_eq!(
            got,
            Destroyed {
                destroyed: 1,
                not_found: 0
            },
            "flow {flow}"
        );

        let server_end = accepted.read(&mut [0]);
        assert_eq!(
            server_end.as_ref().map_err(io::Error::raw_os_error),
            Err(Some(libc::ECONNABORTED)),
            "server end of {flow}: expected ECONNABORTED, saw {server_end:?}"
        );
        match client.read(&mut [0]) {
            Ok(0) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
            other => panic!("client end of {flow}: expected a reset or EOF, saw {other:?}"),
        }

        // The listener outlives its flows, also when a gone flow is destroyed again: the
        // kernel's lookup would resolve that 4-tuple to the listener.
        let _next = session(&p, &listener, to);
        let again = destroy_tcp_in(&p.server.path(), &[flow]).expect("destroy again");
        assert_eq!(
            again,
            Destroyed {
                destroyed: 0,
                not_found: 1
            },
            "gone flow {flow}"
        );
        let _after = session(&p, &listener, to);
    }

    #[test]
    fn severs_ipv4_flow_and_spares_listener() {
        if privileged() {
            let server = SocketAddr::new(SERVER_V4.into(), 0);
            sever_server_side(server, server);
        }
    }

    #[test]
    fn severs_ipv6_flow_and_spares_listener() {
        if privileged() {
            let server = SocketAddr::new(SERVER_V6.into(), 0);
            sever_server_side(server, server);
        }
    }

    #[test]
    fn severs_ipv4_flow_on_dual_stack_listener() {
        if privileged() {
            let any = SocketAddr::new(Ipv6Addr::UNSPECIFIED.into(), 0);
            sever_server_side(any, SocketAddr::new(SERVER_V4.into(), 0));
        }
    }

    #[test]
    fn unknown_flows_are_not_found() {
        if !privileged() {
            return;
        }
        let p = pair();
        let listener = p
            .server
            .run(|| TcpListener::bind((SERVER_V4, 0)))
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let flows = [
            // A client port with no connection: resolves to the listener in the kernel.
            FlowSockets {
                remote: (CLIENT_V4, 40000).into(),
                local: (SERVER_V4, port).into(),
            },
            FlowSockets {
                remote: (CLIENT_V6, 40000).into(),
                local: (SERVER_V6, port).into(),
            },
            // A listener-shaped tuple and a mixed-family one: never sent to the kernel.
            FlowSockets {
                remote: (Ipv4Addr::UNSPECIFIED, 0).into(),
                local: (SERVER_V4, port).into(),
            },
            FlowSockets {
                remote: (CLIENT_V4, 40000).into(),
                local: (SERVER_V6, port).into(),
            },
        ];
        let got = destroy_tcp_in(&p.server.path(), &flows).expect("destroy");
        assert_eq!(
            got,
            Destroyed {
                destroyed: 0,
                not_found: 4
            }
        );
        let _still = session(&p, &listener, (SERVER_V4, port).into());
    }

    #[test]
    fn time_wait_is_not_found() {
        if !privileged() {
            return;
        }
        let p = pair();
        let listener = p
            .server
            .run(|| TcpListener::bind((SERVER_V4, 0)))
            .expect("bind");
        let to = listener.local_addr().expect("addr");
        let (mut client, mut accepted) = session(&p, &listener, to);
        let flow = FlowSockets {
            remote: to,
            local: client.local_addr().expect("client addr"),
        };
        // The client closes first, so its end is in TIME_WAIT once it has read the server's
        // FIN: reading EOF proves the state without sleeping on it.
        client
            .shutdown(std::net::Shutdown::Write)
            .expect("client FIN");
        assert_eq!(accepted.read(&mut [0]).expect("server sees FIN"), 0);
        drop(accepted);
        assert_eq!(client.read(&mut [0]).expect("client sees FIN"), 0);
        drop(client);
        let got = destroy_tcp_in(&p.client.path(), &[flow]).expect("destroy");
        assert_eq!(
            got,
            Destroyed {
                destroyed: 0,
                not_found: 1
            },
            "TIME_WAIT flow {flow}"
        );
    }

    #[test]
    fn without_cap_net_admin_is_not_permitted() {
        if !privileged() {
            return;
        }
        let p = pair();
        let listener = p
            .server
            .run(|| TcpListener::bind((SERVER_V4, 0)))
            .expect("bind");
        let to = listener.local_addr().expect("addr");
        let (mut client, mut accepted) = session(&p, &listener, to);
        let flow = FlowSockets {
            remote: client.local_addr().expect("client addr"),
            local: to,
        };
        let got = p.server.run(|| {
            // SAFETY: the raw syscall changes only this thread's credentials (glibc's wrapper
            // would change every thread of the test process), and the thread ends next.
            let rc = unsafe { libc::syscall(libc::SYS_setresuid, 65534, 65534, 65534) };
            assert_eq!(rc, 0, "become nobody: {}", io::Error::last_os_error());
            destroy_tcp(&[flow])
        });
        match got {
            Err(SocketError::NotPermitted { flow: f }) if f == flow => {}
            other => panic!("flow {flow}: expected NotPermitted, saw {other:?}"),
        }
        client.write_all(b"z").expect("client write");
        accepted
            .read_exact(&mut [0])
            .expect("flow still carries data");
    }

    #[test]
    fn bad_namespace_paths_are_errors() {
        let flow = FlowSockets {
            remote: (CLIENT_V4, 1).into(),
            local: (SERVER_V4, 2).into(),
        };
        for path in ["/run/netns/flowwarden-no-such-ns", "/proc/self/ns/uts"] {
            match destroy_tcp_in(Path::new(path), &[flow]) {
                Err(SocketError::Netns { path: p, .. }) if p == Path::new(path) => {}
                other => panic!("{path}: expected a netns error, saw {other:?}"),
            }
        }
    }

    /// Prints what destroying 100 flows costs; a figure, not an assertion.
    #[test]
    #[ignore = "benchmark: prints timings"]
    fn destroy_100_flows_timing() {
        if !privileged() {
            return;
        }
        let p = pair();
        let listener = p
            .server
            .run(|| TcpListener::bind((SERVER_V4, 0)))
            .expect("bind");
        let to = listener.local_addr().expect("addr");
        let open = |n| {
            (0..n)
                .map(|_| session(&p, &listener, to))
                .collect::<Vec<_>>()
        };
        let flows_of = |conns: &[(TcpStream, TcpStream)]| {
            conns
                .iter()
                .map(|(c, _)| FlowSockets {
                    remote: c.local_addr().expect("addr"),
                    local: to,
                })
                .collect::<Vec<_>>()
        };

        let conns = open(100);
        let flows = flows_of(&conns);
        let t = Instant::now();
        let got = destroy_tcp_in(&p.server.path(), &flows).expect("destroy");
        println!("destroy_tcp_in, 100 live flows: {:?} {got:?}", t.elapsed());
        let t = Instant::now();
        let got = destroy_tcp_in(&p.server.path(), &flows).expect("destroy");
        println!("destroy_tcp_in, 100 gone flows: {:?} {got:?}", t.elapsed());

        let conns = open(100);
        let flows = flows_of(&conns);
        let (took, got) = p.server.run(|| {
            let t = Instant::now();
            let got = destroy_tcp(&flows).expect("destroy");
            (t.elapsed(), got)
        });
        println!("destroy_tcp, 100 live flows: {took:?} {got:?}");
    }
}
