//! Throwaway network namespaces joined by a veth pair, removed again on drop (needs root).
//!
//! Everything goes through `ip -n NAME ...` or `nsenter --net=...`, never `ip netns exec`:
//! the latter also enters a new mount namespace and remounts /sys, which hides the bpffs at
//! /sys/fs/bpf that the agent pins into.

use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Interface names are limited to IFNAMSIZ - 1 bytes.
const IFNAME_MAX: usize = 15;
/// Keeps namespace names (files under /run/netns) readable; the pid and counter that make them
/// unique are never cut.
const TAG_MAX: usize = 24;

/// Pairs created so far by this process: tells apart pairs with the same tag and picks addresses.
static PAIRS: AtomicU32 = AtomicU32::new(0);

/// A named network namespace (a bind mount at /run/netns/NAME, as made by `ip netns add`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// The file that pins the namespace, usable with setns(2) and `nsenter --net=`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `f` on a fresh thread that has joined this namespace and returns its result.
    ///
    /// Only that thread moves, so the caller stays where it is. Sockets are bound to the
    /// namespace they were created in, so ones made inside `f` keep working there when used
    /// from any thread afterwards. Panics if the namespace cannot be entered; a panic in `f`
    /// is passed on to the caller.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            let thread = scope.spawn(|| {
                let ns =
                    File::open(&path).unwrap_or_else(|e| panic!("opening {}: {e}", path.display()));
                // SAFETY: setns only reads the descriptor, which `ns` keeps open for the call.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    panic!(
                        "setns into {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                }
                // The thread ends with the scope, so no later work can run in the wrong
                // namespace by reusing it.
                f()
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// A command running `program` in this namespace: `nsenter --net=PATH -- program`. nsenter
    /// switches only the network namespace, so /sys/fs/bpf and the rest of the host mounts stay
    /// visible. Add the program's arguments with `.arg(s)`.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `ip -n NAME args...` and returns its stdout.
    pub fn ip(&self, args: &[&str]) -> anyhow::Result<String> {
        run_checked(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// Pids of the processes in the namespace, as `ip netns pids` finds them.
    fn pids(&self) -> Vec<libc::pid_t> {
        run_checked(Command::new("ip").args(["netns", "pids", &self.name]))
            .map(|out| {
                out.split_whitespace()
                    .filter_map(|p| p.parse().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Kills what still runs inside and deletes the namespace; errors are ignored, since this
    /// also runs on namespaces that may not (or no longer) exist.
    fn destroy(&self) {
        // SAFETY: getpid cannot fail.
        let me = unsafe { libc::getpid() };
        for pid in self.pids() {
            // Never ourselves: a thread of ours left inside would make the whole test binary
            // look like a resident of the namespace.
            if pid != me {
                // SAFETY: kill only sends a signal; a pid that is already gone just fails.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }

    /// Whether the namespace is (still) registered under /run/netns.
    pub fn exists(&self) -> bool {
        self.path().exists()
    }
}

/// Two namespaces, `client` and `server`, joined by a veth pair with IPv4 and IPv6 addresses
/// on both ends, loopbacks up. Both namespaces (and whatever runs in them) go away on drop.
#[derive(Debug)]
pub struct NetnsPair {
    pub client: Netns,
    pub server: Netns,
    /// The veth end inside `client`.
    pub client_if: String,
    /// The veth end inside `server`.
    pub server_if: String,
    pub client_addr: Ipv4Addr,
    pub server_addr: Ipv4Addr,
    pub client_addr6: Ipv6Addr,
    pub server_addr6: Ipv6Addr,
}

impl NetnsPair {
    /// Creates namespaces `fw<tag>c<pid>` and `fw<tag>s<pid>` (with `x<n>` appended for the
    /// n-th further pair of this process), joined by veth `<short>c0` / `<short>s0`, with
    /// 10.X.Y.1/24 and fd00:X:Y::1/64 on the client end and .2 / ::2 on the server end. X and Y
    /// come from the pid and the pair counter, so concurrent runs and pairs differ.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        let seq = PAIRS.fetch_add(1, Ordering::Relaxed);
        let pair = Self::named(tag, std::process::id(), seq);
        // Leftovers of a crashed run that had our pid: start from a clean slate.
        pair.client.destroy();
        pair.server.destroy();
        // From here on an error drops `pair`, which removes whatever part was made.
        pair.setup()?;
        Ok(pair)
    }

    /// Names and addresses only; nothing is created.
    fn named(tag: &str, pid: u32, seq: u32) -> Self {
        let suffix = if seq == 0 {
            pid.to_string()
        } else {
            format!("{pid}x{seq}")
        };
        // Namespace names become file names and `ip` arguments: keep them to a safe alphabet.
        let ns_tag: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                    c
                } else {
                    '_'
                }
            })
            .take(TAG_MAX)
            .collect();
        // Interface names: alphanumerics only, the tag shortened to leave room for the
        // unique part and the "c0"/"s0" ends.
        let id = if seq == 0 {
            format!("{pid:x}")
        } else {
            format!("{pid:x}x{seq:x}")
        };
        let room = (IFNAME_MAX - 2).saturating_sub(id.len());
        let mut short: String = tag
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(room)
            .collect();
        short.push_str(&id);
        // Only reachable with absurd counters; the veths live inside the fresh namespaces, so
        // keeping the tail (the most unique part) is enough.
        if short.len() > IFNAME_MAX - 2 {
            short = short[short.len() - (IFNAME_MAX - 2)..].to_string();
        }

        // 254 × 256 /24 networks under 10.0.0.0/8, skipping 10.0.x.x.
        let n = (pid.wrapping_mul(16).wrapping_add(seq)) % (254 * 256);
        let (x, y) = ((n / 256 + 1) as u8, (n % 256) as u8);
        NetnsPair {
            client: Netns {
                name: format!("fw{ns_tag}c{suffix}"),
            },
            server: Netns {
                name: format!("fw{ns_tag}s{suffix}"),
            },
            client_if: format!("{short}c0"),
            server_if: format!("{short}s0"),
            client_addr: Ipv4Addr::new(10, x, y, 1),
            server_addr: Ipv4Addr::new(10, x, y, 2),
            client_addr6: Ipv6Addr::new(0xfd00, x.into(), y.into(), 0, 0, 0, 0, 1),
            server_addr6: Ipv6Addr::new(0xfd00, x.into(), y.into(), 0, 0, 0, 0, 2),
        }
    }

    fn setup(&self) -> anyhow::Result<()> {
        for ns in [&self.client, &self.server] {
            run_checked(Command::new("ip").args(["netns", "add", &ns.name]))?;
        }
        // Both ends are created directly in their namespaces, so the names never pass through
        // (or clash in) the host namespace.
        self.client.ip(&[
            "link",
            "add",
            &self.client_if,
            "type",
            "veth",
            "peer",
            "name",
            &self.server_if,
            "netns",
            &self.server.name,
        ])?;
        let ends = [
            (
                &self.client,
                &self.client_if,
                self.client_addr,
                self.client_addr6,
            ),
            (
                &self.server,
                &self.server_if,
                self.server_addr,
                self.server_addr6,
            ),
        ];
        for (ns, ifname, addr, addr6) in ends {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", ifname])?;
            // nodad: duplicate address detection would hold the address "tentative" (unusable)
            // for about a second, and nothing else can claim it in a fresh namespace.
            ns.ip(&[
                "addr",
                "add",
                &format!("{addr6}/64"),
                "dev",
                ifname,
                "nodad",
            ])?;
            ns.ip(&["link", "set", "lo", "up"])?;
            ns.ip(&["link", "set", ifname, "up"])?;
        }
        // A veth has carrier only once both ends are up; traffic sent before that is dropped
        // and TCP would only retry after a second, so wait for it here.
        let deadline = Instant::now() + Duration::from_secs(5);
        for (ns, ifname, _, _) in ends {
            loop {
                let link = ns.ip(&["-o", "link", "show", "dev", ifname])?;
                if link.contains("LOWER_UP") {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{ifname} in {} has no carrier: {link}", ns.name);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Ok(())
    }
}

impl Drop for NetnsPair {
    fn drop(&mut self) {
        self.client.destroy();
        self.server.destroy();
    }
}

/// Runs `cmd` to completion and returns its stdout; fails with the command line, exit status
/// and stderr when it cannot start or exits unsuccessfully.
pub fn run_checked(cmd: &mut Command) -> anyhow::Result<String> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = cmd.output().with_context(|| format!("running `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privileged::require_root;
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    #[test]
    fn names_fit_and_differ() {
        let a = NetnsPair::named("verdict", 4_194_304, 0);
        assert_eq!(a.client.name, "fwverdictc4194304");
        assert_eq!(a.server.name, "fwverdicts4194304");
        let b = NetnsPair::named("a very long tag/with odd chars", 4_194_304, 300);
        assert_eq!(b.client.name, "fwa_very_long_tag_with_oddc4194304x300");
        for p in [&a, &b] {
            for ifname in [&p.client_if, &p.server_if] {
                assert!(ifname.len() <= IFNAME_MAX, "{ifname}");
                assert!(
                    ifname.chars().all(|c| c.is_ascii_alphanumeric()),
                    "{ifname}"
                );
            }
        }
        assert_ne!(a.client_if, b.client_if);
        assert_ne!(a.client_addr, b.client_addr);
        assert_eq!(a.client_addr.octets()[..3], a.server_addr.octets()[..3]);
        assert_eq!(a.client_addr.octets()[3], 1);
        assert_eq!(a.server_addr.octets()[3], 2);
        assert_eq!(a.client_addr6.segments()[7], 1);
        assert_eq!(a.server_addr6.segments()[7], 2);
        assert_ne!(a.client_addr.octets()[1], 0);
    }

    #[test]
    fn run_checked_reports_stderr() {
        let out = run_checked(Command::new("sh").args(["-c", "echo out"])).unwrap();
        assert_eq!(out, "out\n");
        let err = run_checked(Command::new("sh").args(["-c", "echo oops >&2; exit 3"]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("sh -c echo oops >&2; exit 3"), "{err}");
        assert!(err.contains("oops"), "{err}");
        assert!(run_checked(&mut Command::new("/nonexistent/program")).is_err());
    }

    /// Accepts one connection on `listener`, echoes back what it reads, and checks the client
    /// side of the exchange.
    fn exchange(listener: &TcpListener, mut client: TcpStream, expect_peer: SocketAddr) {
        let (mut conn, peer) = listener.accept().unwrap();
        assert_eq!(peer.ip(), expect_peer.ip());
        for s in [&client, &conn] {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        }
        client.write_all(b"ping").unwrap();
        let mut buf = [0; 4];
        conn.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ping");
        conn.write_all(b"pong").unwrap();
        client.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"pong");
    }

    #[test]
    fn pair_carries_tcp_and_is_removed() {
        if !require_root("pair_carries_tcp_and_is_removed") {
            return;
        }
        let pair = NetnsPair::new("nstest").unwrap();
        let (client, server) = (pair.client.clone(), pair.server.clone());
        assert!(client.exists() && server.exists());

        for (server_ip, client_ip) in [
            (pair.server_addr.into(), pair.client_addr.into()),
            (pair.server_addr6.into(), pair.client_addr6.into()),
        ] {
            let listener = server.run(|| TcpListener::bind(SocketAddr::new(server_ip, 0)).unwrap());
            let target = listener.local_addr().unwrap();
            // The listener is already listening, so the handshake completes without accept.
            let stream = client
                .run(|| TcpStream::connect_timeout(&target, Duration::from_secs(5)))
                .unwrap();
            exchange(&listener, stream, SocketAddr::new(client_ip, 0));
            // The server address exists only inside the server namespace; binding it from
            // here (the host namespace) must fail, proving run() really switched.
            assert!(TcpListener::bind(SocketAddr::new(server_ip, 0)).is_err());
        }

        // Processes started through command() land in the namespace and are killed on drop.
        let addrs = client.command("ip").args(["-o", "addr"]).output().unwrap();
        assert!(String::from_utf8_lossy(&addrs.stdout).contains(&pair.client_addr.to_string()));
        let mut sleeper = server.command("sleep").arg("600").spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !server.pids().contains(&(sleeper.id() as libc::pid_t)) {
            assert!(
                Instant::now() < deadline,
                "sleep never showed up in {}",
                server.name
            );
            std::thread::sleep(Duration::from_millis(10));
        }

        drop(pair);
        assert!(!client.exists() && !server.exists());
        let list = run_checked(Command::new("ip").args(["netns", "list"])).unwrap();
        // Whole first words: another run's names may contain ours as a prefix.
        let listed = |name: &str| {
            list.lines()
                .any(|l| l.split_whitespace().next() == Some(name))
        };
        assert!(!listed(&client.name) && !listed(&server.name), "{list}");
        // Reaps the sleeper; it finishing by a signal shows the drop killed it.
        let status = sleeper.wait().unwrap();
        assert!(!status.success(), "{status}");
    }
}
