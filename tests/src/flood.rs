//! Admission floods for the flood benchmark and test: an agent reachable from many source
//! addresses of one client namespace, and the loops that hammer it or admit at a steady pace.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, TcpStream},
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use flowwarden::admission::client::{Client, ClientError, Trust};

use crate::{
    agent_proc::{AgentProcess, Scratch},
    loaded::private_pin_dir,
    netns::NetnsPair,
    stack::{ADMISSION_PORT, AUDIENCE, ISSUER, cli},
};

/// Extra source addresses a pair can carry: client ends from .10, server ends from .130 of
/// the pair's /24.
pub const MAX_SOURCES: usize = 120;

/// One client source address and the server address that makes connections leave from it.
#[derive(Debug, Clone, Copy)]
pub struct Source {
    /// The address the agent sees (and rate-limits).
    pub client: Ipv4Addr,
    /// Where to connect so that the connection leaves from `client`.
    pub server: Ipv4Addr,
}

impl Source {
    /// `host:port` of the admission endpoint as seen from this source.
    pub fn agent(&self) -> String {
        format!("{}:{ADMISSION_PORT}", self.server)
    }
}

/// An agent in the server namespace of a pair, listening for admissions on every address,
/// with `count` extra sources on the client side. Everything goes away on drop.
pub struct FloodStack {
    pub agent: Option<AgentProcess>,
    pub pair: NetnsPair,
    pub scratch: Scratch,
    pub pin_dir: PathBuf,
    pub sources: Vec<Source>,
    pub fingerprint: String,
}

impl Drop for FloodStack {
    fn drop(&mut self) {
        if let Some(mut a) = self.agent.take() {
            a.kill9();
        }
        let _ = flowwarden::datapath::detach_all(&self.pin_dir);
    }
}

impl FloodStack {
    /// Starts the agent with `[admission]` lines `admission_extra` (for example the rate
    /// limit) and the policy text `policy`, and adds `count` sources.
    ///
    /// The client namespace cannot bind a client library's sockets to an address, so each
    /// source gets its own server address and a route to it that names the source as the
    /// preferred address (`ip route add SERVER/32 dev IF src CLIENT`): the kernel then picks
    /// that source for every connection to that server address, whatever client makes it.
    pub fn start(
        tag: &str,
        policy: &str,
        admission_extra: &str,
        count: usize,
    ) -> anyhow::Result<Self> {
        Self::start_with(tag, policy, admission_extra, "", count)
    }

    /// As [`FloodStack::start`], with further config `sections` (whole TOML tables, for
    /// example `[metrics]`) at the end of the config.
    pub fn start_with(
        tag: &str,
        policy: &str,
        admission_extra: &str,
        sections: &str,
        count: usize,
    ) -> anyhow::Result<Self> {
        if count > MAX_SOURCES {
            bail!("at most {MAX_SOURCES} sources, not {count}");
        }
        let pair = NetnsPair::new(tag)?;
        let scratch = Scratch::new(tag);
        let pin_dir = private_pin_dir(tag);
        flowwarden::auth::dev::keygen(&scratch.dir.join("keys"))?;
        let config = scratch.dir.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "[datapath]\ninterfaces = [\"{iface}\"]\npin_dir = \"{pin}\"\n\n\
                 [policy]\ndir = \"policies\"\n\n[state]\ndir = \"state\"\n\n\
                 [admission]\nlisten = \"0.0.0.0:{ADMISSION_PORT}\"\n{admission_extra}\n\n\
                 [api]\nsocket = \"agent.sock\"\n\n\
                 [[auth.issuer]]\nissuer = \"{ISSUER}\"\naudiences = [\"{AUDIENCE}\"]\n\
                 algorithms = [\"ES256\"]\njwks_file = \"keys/{jwks}\"\n\n{sections}\n",
                iface = pair.server_if,
                pin = pin_dir.display(),
                jwks = flowwarden::auth::dev::JWKS_FILE,
            ),
        )?;
        std::fs::write(scratch.dir.join("policies/flood.toml"), policy)?;
        let [a, b, c, _] = pair.client_addr.octets();
        let mut sources = Vec::with_capacity(count);
        for i in 0..count as u8 {
            let s = Source {
                client: Ipv4Addr::new(a, b, c, 10 + i),
                server: Ipv4Addr::new(a, b, c, 130 + i),
            };
            let (cif, sif) = (&pair.client_if, &pair.server_if);
            pair.client
                .ip(&["addr", "add", &format!("{}/32", s.client), "dev", cif])?;
            pair.server
                .ip(&["addr", "add", &format!("{}/32", s.server), "dev", sif])?;
            let (dst, src) = (format!("{}/32", s.server), s.client.to_string());
            pair.client
                .ip(&["route", "add", &dst, "dev", cif, "src", &src])?;
            sources.push(s);
        }
        let agent = Some(AgentProcess::start(&pair.server, &config));
        let mut stack = Self {
            agent,
            pair,
            scratch,
            pin_dir,
            sources,
            fingerprint: String::new(),
        };
        stack.fingerprint = stack.status()?["admission"]["fingerprint"]
            .as_str()
            .context("no fingerprint in status")?
            .to_owned();
        Ok(stack)
    }

    pub fn socket(&self) -> PathBuf {
        self.scratch.dir.join("agent.sock")
    }

    /// `flowwarden status --json` against this agent.
    pub fn status(&self) -> anyhow::Result<serde_json::Value> {
        self.ctl_json(&["status"])
    }

    /// `flowwarden ARGS --json` against this agent's socket, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> anyhow::Result<serde_json::Value> {
        let socket = self.socket();
        let mut full = vec!["--socket", socket.to_str().unwrap()];
        full.extend_from_slice(args);
        full.push("--json");
        let (ok, out) = cli(&full);
        if !ok {
            bail!("flowwarden {args:?} failed: {out}");
        }
        Ok(serde_json::from_str(&out)?)
    }

    /// The agent's pid: the only process in the server namespace (nsenter execs it).
    pub fn agent_pid(&self) -> anyhow::Result<u32> {
        let out = std::process::Command::new("ip")
            .args(["netns", "pids", &self.pair.server.name])
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next()
            .and_then(|p| p.parse().ok())
            .context("no process in the server namespace")
    }

    /// An admission client that reaches the agent from `source`. Create and use it inside
    /// the client namespace (`pair.client.run`): its connections are made where it is used.
    pub fn client(&self, source: &Source) -> anyhow::Result<Client> {
        Ok(Client::new(
            &source.agent(),
            &Trust::Fingerprint(self.fingerprint.clone()),
        )?)
    }
}

/// What a stream of admission attempts got back.
#[derive(Debug, Default, Clone)]
pub struct Tally {
    pub admitted: usize,
    /// HTTP 429 `rate_limited`.
    pub rate_limited: usize,
    /// HTTP 401: the token was refused.
    pub rejected: usize,
    /// Anything else: connection failures, other statuses.
    pub failed: usize,
    pub first_failure: Option<String>,
    /// The message of the first 429, to check it says what the documentation says.
    pub first_rate_limited: Option<String>,
    /// Admitted attempts only: from the scheduled send (paced) or the send (hammered).
    pub latencies: Vec<Duration>,
}

impl Tally {
    pub fn attempts(&self) -> usize {
        self.admitted + self.rate_limited + self.rejected + self.failed
    }

    fn record(&mut self, result: Result<(), ClientError>, since: Instant) {
        match result {
            Ok(()) => {
                self.admitted += 1;
                self.latencies.push(since.elapsed());
            }
            Err(ClientError::Refused {
                status: 429,
                code,
                message,
            }) if code == "rate_limited" => {
                self.rate_limited += 1;
                self.first_rate_limited.get_or_insert(message);
            }
            Err(ClientError::Refused { status: 401, .. }) => self.rejected += 1,
            Err(e) => {
                self.failed += 1;
                self.first_failure.get_or_insert(e.to_string());
            }
        }
    }

    pub fn merge(&mut self, other: Self) {
        self.admitted += other.admitted;
        self.rate_limited += other.rate_limited;
        self.rejected += other.rejected;
        self.failed += other.failed;
        self.first_failure = self.first_failure.take().or(other.first_failure);
        self.first_rate_limited = self.first_rate_limited.take().or(other.first_rate_limited);
        self.latencies.extend(other.latencies);
    }
}

/// Posts `tokens` (cycled) from `source` as fast as the answers come, until `stop`. With
/// `reconnect`, every attempt opens a new TLS connection (a handshake flood); otherwise one
/// keep-alive connection carries them all. Call inside the client namespace.
pub fn hammer(
    stack: &FloodStack,
    source: &Source,
    tokens: &[String],
    reconnect: bool,
    stop: &AtomicBool,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    let mut client = stack.client(source)?;
    for token in tokens.iter().cycle() {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if reconnect {
            client = stack.client(source)?;
        }
        let t = Instant::now();
        tally.record(client.login(token).map(drop), t);
    }
    Ok(tally)
}

/// Admits `tokens` from `source`, token i due at `start + i × every`, each over a new TLS
/// connection as `flowwarden login` makes one; latency counts from the due time, so a slow
/// answer cannot hide the attempts it delayed. Call inside the client namespace.
pub fn paced(
    stack: &FloodStack,
    source: &Source,
    tokens: &[String],
    start: Instant,
    every: Duration,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::default();
    for (i, token) in tokens.iter().enumerate() {
        let due = start + every * u32::try_from(i).unwrap_or(u32::MAX);
        std::thread::sleep(due.saturating_duration_since(Instant::now()));
        let client = stack.client(source)?;
        tally.record(client.login(token).map(drop), due);
    }
    Ok(tally)
}

/// ES256 development tokens for `users` distinct subjects `{prefix}-{i}` in `groups`.
pub fn mint(
    stack: &FloodStack,
    prefix: &str,
    users: usize,
    groups: &[&str],
) -> anyhow::Result<Vec<String>> {
    use flowwarden::auth::dev;
    let keys = stack.scratch.dir.join("keys");
    let kid = dev::kid_of(&keys.join(dev::JWKS_FILE))?;
    let key = keys.join(dev::KEY_FILE);
    let now = flowwarden::sessions::model::now_ms() / 1000;
    (0..users)
        .map(|i| {
            let mut c = dev::DevClaims::new(&format!("{prefix}-{i:05}"));
            c.email = Some(format!("{prefix}-{i:05}@corp.example"));
            c.groups = groups.iter().map(|g| (*g).to_owned()).collect();
            c.managed = Some(true);
            Ok(dev::token(&key, &kid, &c, now)?)
        })
        .collect()
}

/// A token whose signature no longer matches its claims: the agent must verify it to refuse
/// it, which is what makes invalid tokens within the limit cost something.
pub fn forged(token: &str) -> String {
    let (rest, sig) = token.rsplit_once('.').unwrap_or((token, ""));
    let mut sig: Vec<u8> = sig.bytes().collect();
    if let Some(first) = sig.first_mut() {
        *first = if *first == b'A' { b'B' } else { b'A' };
    }
    format!("{rest}.{}", String::from_utf8_lossy(&sig))
}

/// How a held connection idles once its TCP connection is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Completes the TLS handshake, then sends nothing.
    Tls,
    /// Completes the TLS handshake and sends the start of a request, never its end.
    HalfRequest,
}

/// A TLS connection to the agent that holds its place and does nothing more.
pub struct HeldConnection(rustls::StreamOwned<rustls::ClientConnection, TcpStream>);

impl HeldConnection {
    /// Whether the agent still keeps it open: a read that would block, rather than an end
    /// of stream or an error.
    pub fn is_open(&mut self) -> bool {
        if self.0.sock.set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 256];
        loop {
            match self.0.read(&mut buf) {
                Ok(0) => return false,
                Ok(_) => {}
                Err(e) => return e.kind() == std::io::ErrorKind::WouldBlock,
            }
        }
    }
}

/// What [`hold`] got.
#[derive(Default)]
pub struct Held {
    /// Connections whose handshake completed (and whose half request was sent).
    pub connections: Vec<HeldConnection>,
    /// Connections the agent closed or refused before they got there.
    pub turned_away: usize,
}

/// Opens `count` connections from `source`, one after another, each idling as `idle` says,
/// and keeps those the agent lets through. Call inside the client namespace.
pub fn hold(source: &Source, count: usize, idle: Idle) -> Held {
    let tls = Arc::new(attacker_tls());
    let addr = std::net::SocketAddr::from((source.server, ADMISSION_PORT));
    let mut held = Held::default();
    for _ in 0..count {
        match hold_one(&tls, addr, idle) {
            Ok(c) => held.connections.push(c),
            Err(_) => held.turned_away += 1,
        }
    }
    held
}

fn hold_one(
    tls: &Arc<rustls::ClientConfig>,
    addr: std::net::SocketAddr,
    idle: Idle,
) -> std::io::Result<HeldConnection> {
    let tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(10))?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
    let conn =
        rustls::ClientConnection::new(Arc::clone(tls), name).map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(conn, tcp);
    while stream.conn.is_handshaking() {
        stream.conn.complete_io(&mut stream.sock)?;
    }
    if idle == Idle::HalfRequest {
        stream.write_all(
            format!("POST /v1/sessions HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bea").as_bytes(),
        )?;
        stream.flush()?;
    }
    Ok(HeldConnection(stream))
}

/// A client that trusts any certificate: the flood does not care whom it exhausts.
fn attacker_tls() -> rustls::ClientConfig {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("default TLS versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
        .with_no_client_auth()
}

#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The agent's resident memory (VmRSS), in KiB.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS in /proc/PID/status")
}

/// One sample of a Prometheus text `name{labels}` from `text`, 0 when absent.
pub fn metric(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `GET /metrics` from the agent's metrics endpoint at `addr`, inside the server namespace.
pub fn scrape(stack: &FloodStack, addr: std::net::SocketAddr) -> anyhow::Result<String> {
    stack.pair.server.run(|| {
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        tcp.read_to_string(&mut text)?;
        Ok(text)
    })
}
