//! Real NATS servers for the fleet tests and bench: one JetStream server, or a three-server
//! JetStream cluster, each in a temporary directory on free ports, killed on drop. Also the
//! veth that lets an agent in a test namespace reach them.

use std::{
    net::{Ipv4Addr, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::netns::{Netns, run_checked};

/// Where `cargo xtask setup` installs nats-server.
pub const INSTALLED: &str = "/opt/flowwarden-tools/bin/nats-server";

/// The nats-server binary: `FLOWWARDEN_NATS_SERVER`, else the one setup installs, else PATH.
///
/// # Panics
/// None is found (run `cargo xtask setup`).
pub fn nats_server_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FLOWWARDEN_NATS_SERVER") {
        return PathBuf::from(p);
    }
    if std::path::Path::new(INSTALLED).is_file() {
        return INSTALLED.into();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("nats-server not found at {INSTALLED} nor on PATH: run `cargo xtask setup`")
        })
}

/// A port nobody listens on now (bound and released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// One nats-server process with JetStream.
pub struct NatsServer {
    pub name: String,
    pub port: u16,
    pub cluster_port: u16,
    pub dir: PathBuf,
    config: PathBuf,
    child: Option<Child>,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

fn scratch(tag: &str) -> PathBuf {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("fwnats-{tag}-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("creating the NATS scratch dir");
    dir
}

impl NatsServer {
    /// A single JetStream server listening on every address (so that agents in namespaces
    /// reach it over their fleet veth).
    pub fn single(tag: &str) -> anyhow::Result<Self> {
        let mut s = Self::configure(tag, "n1", &[], None, "")?;
        s.start()?;
        Ok(s)
    }

    /// Like [`NatsServer::single`], with `extra` lines in its configuration (an
    /// `authorization` block, say).
    pub fn single_with(tag: &str, extra: &str) -> anyhow::Result<Self> {
        let mut s = Self::configure(tag, "n1", &[], None, extra)?;
        s.start()?;
        Ok(s)
    }

    fn configure(
        tag: &str,
        name: &str,
        routes: &[u16],
        cluster_port: Option<u16>,
        extra: &str,
    ) -> anyhow::Result<Self> {
        let dir = scratch(&format!("{tag}-{name}"));
        let port = free_port();
        let mut text = format!(
            "server_name: {name}\nlisten: 0.0.0.0:{port}\nmax_payload: 8MB\n\
             jetstream {{ store_dir: \"{}\" }}\n{extra}\n",
            dir.join("js").display()
        );
        if let Some(cp) = cluster_port {
            let routes: Vec<String> = routes
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            text.push_str(&format!(
                "cluster {{ name: fwtest, listen: 127.0.0.1:{cp}, routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        let config = dir.join("nats.conf");
        std::fs::write(&config, text)?;
        Ok(Self {
            name: name.to_owned(),
            port,
            cluster_port: cluster_port.unwrap_or(0),
            dir,
            config,
            child: None,
        })
    }

    /// Starts (or restarts) the process and waits until it accepts connections.
    ///
    /// # Errors
    /// It exits or does not listen within 10 s.
    pub fn start(&mut self) -> anyhow::Result<()> {
        let log = std::fs::File::create(self.dir.join("server.log"))?;
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting nats-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_err() {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "nats-server {} exited with {status}:\n{}",
                    self.name,
                    self.log()
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server {} does not listen on {}:\n{}",
                    self.name,
                    self.port,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL an agent uses over its fleet veth.
    pub fn url_via(&self, link: &FleetLink) -> String {
        format!("nats://{}:{}", link.host_addr, self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three JetStream servers routed into one cluster.
pub struct NatsCluster {
    pub servers: Vec<NatsServer>,
}

impl NatsCluster {
    /// # Errors
    /// A server does not start.
    pub fn start(tag: &str) -> anyhow::Result<Self> {
        let cluster_ports: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        for (i, cp) in cluster_ports.iter().enumerate() {
            let routes: Vec<u16> = cluster_ports.iter().copied().filter(|p| p != cp).collect();
            servers.push(NatsServer::configure(
                tag,
                &format!("n{}", i + 1),
                &routes,
                Some(*cp),
                "",
            )?);
        }
        for s in &mut servers {
            s.start()?;
        }
        Ok(Self { servers })
    }

    /// Every server's URL, comma separated (as `--server` and FLOWWARDEN_FLEET_SERVERS take).
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(NatsServer::url).collect()
    }
}

static LINKS: AtomicU32 = AtomicU32::new(0);

/// A veth from the host namespace into a test namespace, so that an agent there reaches
/// the NATS servers (which listen in the host namespace). Removed on drop.
pub struct FleetLink {
    host_if: String,
    pub host_addr: Ipv4Addr,
    pub ns_addr: Ipv4Addr,
}

impl FleetLink {
    /// # Errors
    /// `ip` fails.
    pub fn new(ns: &Netns) -> anyhow::Result<Self> {
        let n = LINKS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let host_if = format!("fwf{:x}{n:x}", pid & 0x00ff_ffff);
        let ns_if = "fleet0";
        // 172.31.X.Y/30 per link: X and Y from the pid and the counter.
        let k = (pid.wrapping_mul(64).wrapping_add(n)) % (64 * 256);
        let (x, y) = (16 + (k / 64) as u8 % 16, ((k % 64) * 4) as u8);
        let host_addr = Ipv4Addr::new(172, x, y, 1);
        let ns_addr = Ipv4Addr::new(172, x, y, 2);
        let _ = Command::new("ip").args(["link", "del", &host_if]).output();
        run_checked(Command::new("ip").args([
            "link", "add", &host_if, "type", "veth", "peer", "name", ns_if, "netns", &ns.name,
        ]))?;
        run_checked(Command::new("ip").args([
            "addr",
            "add",
            &format!("{host_addr}/30"),
            "dev",
            &host_if,
        ]))?;
        run_checked(Command::new("ip").args(["link", "set", &host_if, "up"]))?;
        ns.ip(&["addr", "add", &format!("{ns_addr}/30"), "dev", ns_if])?;
        ns.ip(&["link", "set", ns_if, "up"])?;
        Ok(Self {
            host_if,
            host_addr,
            ns_addr,
        })
    }
}

impl Drop for FleetLink {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .output();
    }
}

/// An administrator's key and the CLI invocations that use it against one set of servers.
pub struct FleetAdmin {
    pub servers: Vec<String>,
    pub key: PathBuf,
    pub public_key: String,
    pub prefix: String,
    _dir: crate::agent_proc::Scratch,
}

impl FleetAdmin {
    /// Makes a key pair with `fleet keygen`.
    ///
    /// # Panics
    /// keygen fails.
    pub fn new(tag: &str, servers: Vec<String>) -> Self {
        let dir = crate::agent_proc::Scratch::new(&format!("{tag}-admin"));
        let key = dir.dir.join("admin.key");
        let (ok, out) =
            crate::stack::cli(&["fleet", "keygen", "--out", key.to_str().unwrap(), "--json"]);
        assert!(ok, "fleet keygen: {out}");
        let v: serde_json::Value = serde_json::from_str(&out).expect("keygen --json");
        Self {
            servers,
            key,
            public_key: v["public_key"].as_str().unwrap().to_owned(),
            prefix: format!("fw{}", std::process::id()),
            _dir: dir,
        }
    }

    /// `flowwarden fleet <args>` with this admin's servers, prefix and key.
    pub fn cli(&self, args: &[&str]) -> (bool, String) {
        let servers = self.servers.join(",");
        let mut full = vec![
            "fleet",
            "--server",
            &servers,
            "--prefix",
            &self.prefix,
            "--admin-key",
            self.key.to_str().unwrap(),
        ];
        full.extend_from_slice(args);
        crate::stack::cli(&full)
    }

    /// Like [`FleetAdmin::cli`] with `--json`, parsed; panics on failure.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = args.to_vec();
        full.push("--json");
        let (ok, out) = self.cli(&full);
        assert!(ok, "flowwarden fleet {args:?} failed: {out}");
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("fleet {args:?}: not JSON ({e}): {out}"))
    }

    /// The `[fleet]` section of an agent named `host` reaching `servers`.
    pub fn agent_section(&self, host: &str, servers: &[String], extra: &str) -> String {
        let servers: Vec<String> = servers.iter().map(|s| format!("{s:?}")).collect();
        format!(
            "\n[fleet]\nservers = [{}]\nhost = \"{host}\"\nsubject_prefix = \"{}\"\n\
             admin_keys = [\"{}\"]\ncurrent_within_secs = 60\n{extra}\n",
            servers.join(", "),
            self.prefix,
            self.public_key
        )
    }
}

/// A stack (namespaces, agent, IdP keys) that is also a fleet member over its own link.
pub struct FleetHost {
    pub name: String,
    pub link: FleetLink,
    pub stack: crate::stack::Stack,
}

impl FleetHost {
    /// Prepares a stack, links it to the host namespace, adds `[fleet]` for `admin` (servers
    /// reached through the link) and starts the agent.
    ///
    /// # Panics
    /// Any step fails.
    pub fn start(admin: &FleetAdmin, name: &str, policy: &str, ports: &[u16], extra: &str) -> Self {
        let stack = crate::stack::Stack::prepare(name, policy, "", "");
        let link = FleetLink::new(&stack.pair.server).expect("fleet link");
        let servers: Vec<String> = ports
            .iter()
            .map(|p| format!("nats://{}:{p}", link.host_addr))
            .collect();
        let mut config = std::fs::read_to_string(&stack.config).unwrap();
        config.push_str(&admin.agent_section(name, &servers, extra));
        std::fs::write(&stack.config, config).unwrap();
        let mut host = Self {
            name: name.to_owned(),
            link,
            stack,
        };
        host.stack.start_agent();
        host
    }

    /// The agent's `status` fleet part.
    pub fn fleet_status(&self) -> serde_json::Value {
        self.stack.ctl_json(&["status"])["fleet"].clone()
    }

    /// This agent's audit events of `kind`.
    pub fn audit(&self, kind: &str) -> Vec<serde_json::Value> {
        let (ok, out) = self
            .stack
            .ctl(&["audit", "--kind", kind, "--limit", "10000", "--json"]);
        assert!(ok, "audit --kind {kind}: {out}");
        // One event per line.
        out.lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

/// Polls `check` every 50 ms until it holds or `within` passes.
///
/// # Panics
/// It does not hold in time; the message says what was awaited.
pub fn wait_for(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
