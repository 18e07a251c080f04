//! The daemon's TOML configuration (`agent.toml`), with defaults that run out of the box.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Where the agent looks for its configuration unless told otherwise.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/flowwarden/agent.toml";
/// Where maps and links are pinned, so enforcement outlives the agent process.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/flowwarden";
pub const DEFAULT_POLICY_DIR: &str = "/etc/flowwarden/policies";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/flowwarden";
pub const DEFAULT_ADMISSION_LISTEN: &str = "0.0.0.0:7443";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid config {path}: {field}: {problem}")]
    Invalid {
        path: PathBuf,
        field: &'static str,
        problem: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub datapath: DatapathConfig,
    #[serde(default)]
    pub policy: PolicyConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub admission: AdmissionConfig,
    #[serde(default)]
    pub sessions: SessionsConfig,
    #[serde(default)]
    pub api: ApiConfig,
    #[serde(default)]
    pub metrics: MetricsConfig,
    #[serde(default)]
    pub auth: crate::auth::AuthConfig,
    /// Membership of a fleet over NATS JetStream; absent: this host stands alone.
    #[serde(default)]
    pub fleet: Option<crate::fleet::FleetConfig>,
    /// How long lock records that can no longer refuse anything are kept.
    #[serde(default)]
    pub locks: crate::locks::LocksConfig,
    #[serde(default)]
    pub signals: crate::signals::SignalsConfig,
    /// `[console]`: read by `flowwarden console`, not by the agent.
    #[serde(default)]
    pub console: crate::console::ConsoleConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Serve Prometheus metrics at `http://<listen>/metrics`. Off by default.
    #[serde(default)]
    pub enabled: bool,
    #[serde(default = "default_metrics_listen")]
    pub listen: std::net::SocketAddr,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> std::net::SocketAddr {
    "127.0.0.1:9469".parse().expect("a valid default address")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiConfig {
    /// The status socket (JSON-RPC 2.0, one object per line).
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Members may call every method (uid 0 always may).
    #[serde(default = "default_admin_group")]
    pub admin_group: String,
    /// Members may call the read methods; the socket and its directory belong to this group.
    #[serde(default = "default_read_group")]
    pub read_group: String,
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// A connection that sends no complete request for this long is closed.
    #[serde(default = "default_idle_timeout_secs")]
    pub idle_timeout_secs: u64,
    /// Connections one uid without admin access may hold at once.
    #[serde(default = "default_max_connections_per_uid")]
    pub max_connections_per_uid: usize,
    /// Connections beyond `max_connections` that only administrators may open.
    #[serde(default = "default_admin_reserve")]
    pub admin_reserve: usize,
    /// The idle timeout while three quarters of `max_connections` are taken (never longer
    /// than `idle_timeout_secs`).
    #[serde(default = "default_pressure_idle_timeout_secs")]
    pub pressure_idle_timeout_secs: u64,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            socket: default_socket(),
            admin_group: default_admin_group(),
            read_group: default_read_group(),
            max_connections: default_max_connections(),
            idle_timeout_secs: default_idle_timeout_secs(),
            max_connections_per_uid: default_max_connections_per_uid(),
            admin_reserve: default_admin_reserve(),
            pressure_idle_timeout_secs: default_pressure_idle_timeout_secs(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// Holds `state.redb` (sessions, revocations, audit) and the generated TLS certificate.
    #[serde(default = "default_state_dir")]
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            dir: default_state_dir(),
        }
    }
}

impl StateConfig {
    pub fn store_path(&self) -> PathBuf {
        self.dir.join("state.redb")
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Where clients present their tokens (HTTPS).
    #[serde(default = "default_admission_listen")]
    pub listen: std::net::SocketAddr,
    /// PEM certificate chain and key; when both are absent a self-signed pair is generated
    /// in the state directory at first start.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Admission attempts each source address may make per second, and the burst above it.
    #[serde(default = "default_rate_per_sec")]
    pub rate_per_sec: u32,
    #[serde(default = "default_rate_burst")]
    pub rate_burst: u32,
    /// Admission connections open at once, in all. The agent lowers it further to what its
    /// open-files limit affords beside the status socket and a reserve.
    #[serde(default = "default_admission_max_connections")]
    pub max_connections: usize,
    /// Admission connections open at once from one source address.
    #[serde(default = "default_admission_max_per_source")]
    pub max_connections_per_source: usize,
    /// A connection that has not sent a complete request this long after its TLS handshake
    /// (or its last answer) is closed.
    #[serde(default = "default_admission_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

impl Default for AdmissionConfig {
    fn default() -> Self {
        Self {
            listen: default_admission_listen(),
            cert_file: None,
            key_file: None,
            rate_per_sec: default_rate_per_sec(),
            rate_burst: default_rate_burst(),
            max_connections: default_admission_max_connections(),
            max_connections_per_source: default_admission_max_per_source(),
            request_timeout_ms: default_admission_request_timeout_ms(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionsConfig {
    /// What a policy change does to live flows that lose their grant.
    #[serde(default)]
    pub on_policy_change: OnPolicyChange,
    /// How often expiry, idle flows and dormancy are checked.
    #[serde(default = "default_sweep_interval_ms")]
    pub sweep_interval_ms: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self {
            on_policy_change: OnPolicyChange::default(),
            sweep_interval_ms: default_sweep_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnPolicyChange {
    /// Remove the grant and cut its live flows at once.
    #[default]
    Sever,
    /// Remove the grant only: live flows go on until they end or go idle.
    DenyNewFlows,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatapathConfig {
    /// Interfaces whose traffic is enforced. Required: the agent never guesses.
    #[serde(default)]
    pub interfaces: Vec<String>,
    /// Where ingress is checked: `auto` (per interface: native XDP on real NICs, TC on veth
    /// and virtual NICs, whose native XDP path costs throughput), XDP or TC.
    #[serde(default)]
    pub ingress: IngressHook,
    #[serde(default)]
    pub xdp_mode: XdpModeChoice,
    /// `enforce` drops; `monitor` only counts what would be dropped.
    #[serde(default)]
    pub mode: Mode,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    /// Flows the kernel can hold; when full, new flows to resources are denied.
    /// Takes effect when the maps are created (after `datapath detach`).
    #[serde(default = "default_flow_table_size")]
    pub flow_table_size: u32,
    /// Sessions that may hold grants, flows or a revocation in the kernel at once; when all
    /// slots are held, admissions are refused. Takes effect when the maps are created.
    #[serde(default = "default_session_slots")]
    pub session_slots: u32,
    /// Live flows one session may hold; its further new flows are denied and counted
    /// (`session_flow_limit`), other sessions are unaffected.
    #[serde(default = "default_session_flow_limit")]
    pub session_flow_limit: u32,
}

impl Default for DatapathConfig {
    fn default() -> Self {
        Self {
            interfaces: Vec::new(),
            ingress: IngressHook::default(),
            xdp_mode: XdpModeChoice::default(),
            mode: Mode::default(),
            pin_dir: default_pin_dir(),
            flow_table_size: default_flow_table_size(),
            session_slots: default_session_slots(),
            session_flow_limit: default_session_flow_limit(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Directory of policy files (`*.toml`); relative paths are taken from the config's directory.
    #[serde(default = "default_policy_dir")]
    pub dir: PathBuf,
    /// How often the directory is checked for edits (0 disables watching; `policy reload`
    /// still works).
    #[serde(default = "default_watch_interval_ms")]
    pub watch_interval_ms: u64,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            dir: default_policy_dir(),
            watch_interval_ms: default_watch_interval_ms(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IngressHook {
    /// Chosen per interface from its driver: XDP where the driver's native XDP path costs
    /// nothing, TC on veth and virtual NICs (see `datapath::attach::choose_ingress`).
    #[default]
    Auto,
    Xdp,
    Tc,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum XdpModeChoice {
    /// Driver mode, falling back (with a warning) to generic mode.
    #[default]
    Auto,
    Driver,
    Generic,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    #[default]
    Enforce,
    Monitor,
}

fn default_pin_dir() -> PathBuf {
    PathBuf::from(DEFAULT_PIN_DIR)
}

fn default_policy_dir() -> PathBuf {
    PathBuf::from(DEFAULT_POLICY_DIR)
}

pub const DEFAULT_SOCKET: &str = "/run/flowwarden/agent.sock";

fn default_socket() -> PathBuf {
    PathBuf::from(DEFAULT_SOCKET)
}

fn default_admin_group() -> String {
    "flowwarden-admin".into()
}

fn default_read_group() -> String {
    "flowwarden".into()
}

fn default_max_connections() -> usize {
    256
}

fn default_idle_timeout_secs() -> u64 {
    300
}

fn default_max_connections_per_uid() -> usize {
    crate::api::transport::DEFAULT_MAX_PER_UID
}

fn default_admin_reserve() -> usize {
    crate::api::transport::DEFAULT_ADMIN_RESERVE
}

fn default_pressure_idle_timeout_secs() -> u64 {
    crate::api::transport::DEFAULT_PRESSURE_IDLE_TIMEOUT.as_secs()
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

fn default_admission_listen() -> std::net::SocketAddr {
    DEFAULT_ADMISSION_LISTEN
        .parse()
        .expect("a valid default address")
}

fn default_rate_per_sec() -> u32 {
    20
}

fn default_rate_burst() -> u32 {
    40
}

fn default_admission_max_connections() -> usize {
    1_024
}

fn default_admission_max_per_source() -> usize {
    32
}

fn default_admission_request_timeout_ms() -> u64 {
    5_000
}

fn default_sweep_interval_ms() -> u64 {
    1_000
}

fn default_watch_interval_ms() -> u64 {
    250
}

fn default_flow_table_size() -> u32 {
    agent_common::map_sizes::FLOWS
}

fn default_session_slots() -> u32 {
    agent_common::map_sizes::SESSIONS
}

fn default_session_flow_limit() -> u32 {
    agent_common::map_sizes::SESSION_FLOW_LIMIT
}

impl Config {
    /// Reads and validates a config file; relative paths inside it are resolved against the
    /// file's directory.
    ///
    /// # Errors
    /// The file cannot be read, is not valid TOML, has unknown keys or out-of-range values.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        let base = path.parent().unwrap_or(Path::new("."));
        for issuer in &mut config.auth.issuers {
            for p in [
                issuer.jwks_file.as_mut(),
                issuer.hs256_secret_file.as_mut(),
                issuer.ca_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
        config.signals.resolve_paths(base);
        if let Some(fleet) = &mut config.fleet {
            fleet.resolve_paths(base);
        }
        for p in [
            Some(&mut config.policy.dir),
            Some(&mut config.state.dir),
            Some(&mut config.api.socket),
            config.admission.cert_file.as_mut(),
            config.admission.key_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(config)
    }

    /// Parses config text; `path` only names the file in errors.
    ///
    /// # Errors
    /// Invalid TOML, unknown keys, or out-of-range values.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |field, problem: String| ConfigError::Invalid {
            path: path.to_owned(),
            field,
            problem,
        };
        let size = self.datapath.flow_table_size;
        if !(1_024..=16_777_216).contains(&size) {
            return Err(invalid(
                "datapath.flow_table_size",
                format!("{size} is out of range: use 1024 to 16777216"),
            ));
        }
        let slots = self.datapath.session_slots;
        if !(1_024..=4_194_304).contains(&slots) {
            return Err(invalid(
                "datapath.session_slots",
                format!("{slots} is out of range: use 1024 to 4194304"),
            ));
        }
        let limit = self.datapath.session_flow_limit;
        if !(1..=16_777_216).contains(&limit) {
            return Err(invalid(
                "datapath.session_flow_limit",
                format!("{limit} is out of range: use 1 to 16777216"),
            ));
        }
        if self.admission.cert_file.is_some() != self.admission.key_file.is_some() {
            return Err(invalid(
                "admission.cert_file",
                "set both cert_file and key_file, or neither (a self-signed pair is then generated)"
                    .into(),
            ));
        }
        if self.admission.rate_per_sec == 0 || self.admission.rate_burst == 0 {
            return Err(invalid(
                "admission.rate_per_sec",
                "rate_per_sec and rate_burst must be at least 1".into(),
            ));
        }
        if !(16..=1_000_000).contains(&self.admission.max_connections) {
            return Err(invalid(
                "admission.max_connections",
                format!(
                    "{} is out of range: use 16 to 1000000",
                    self.admission.max_connections
                ),
            ));
        }
        let per_source = self.admission.max_connections_per_source;
        if !(1..=self.admission.max_connections).contains(&per_source) {
            return Err(invalid(
                "admission.max_connections_per_source",
                format!("{per_source} is out of range: use 1 to max_connections"),
            ));
        }
        if !(100..=600_000).contains(&self.admission.request_timeout_ms) {
            return Err(invalid(
                "admission.request_timeout_ms",
                format!(
                    "{} is out of range: use 100 to 600000",
                    self.admission.request_timeout_ms
                ),
            ));
        }
        if !(1..=86_400).contains(&self.api.idle_timeout_secs) {
            return Err(invalid(
                "api.idle_timeout_secs",
                format!(
                    "{} is out of range: use 1 to 86400",
                    self.api.idle_timeout_secs
                ),
            ));
        }
        if !(1..=100_000).contains(&self.api.max_connections) {
            return Err(invalid(
                "api.max_connections",
                format!(
                    "{} is out of range: use 1 to 100000",
                    self.api.max_connections
                ),
            ));
        }
        let per_uid = self.api.max_connections_per_uid;
        if !(1..=self.api.max_connections).contains(&per_uid) {
            return Err(invalid(
                "api.max_connections_per_uid",
                format!("{per_uid} is out of range: use 1 to max_connections"),
            ));
        }
        if self.api.admin_reserve > 100_000 {
            return Err(invalid(
                "api.admin_reserve",
                format!(
                    "{} is out of range: use 0 to 100000",
                    self.api.admin_reserve
                ),
            ));
        }
        let pressure = self.api.pressure_idle_timeout_secs;
        if !(1..=86_400).contains(&pressure) {
            return Err(invalid(
                "api.pressure_idle_timeout_secs",
                format!("{pressure} is out of range: use 1 to 86400"),
            ));
        }
        if !(50..=60_000).contains(&self.sessions.sweep_interval_ms) {
            return Err(invalid(
                "sessions.sweep_interval_ms",
                format!(
                    "{} is out of range: use 50 to 60000",
                    self.sessions.sweep_interval_ms
                ),
            ));
        }
        for name in &self.datapath.interfaces {
            if name.is_empty() || name.len() > 15 || name.contains(['/', ' ']) {
                return Err(invalid(
                    "datapath.interfaces",
                    format!(
                        "{name:?} is not an interface name (1 to 15 characters, no '/' or spaces)"
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_takes_safe_defaults() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c.datapath.mode, Mode::Enforce);
        assert_eq!(c.datapath.ingress, IngressHook::Auto);
        assert_eq!(c.datapath.pin_dir, PathBuf::from(DEFAULT_PIN_DIR));
        assert_eq!(c.policy.dir, PathBuf::from(DEFAULT_POLICY_DIR));
        assert!(c.datapath.interfaces.is_empty());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Config::parse(
            "[datapath]\ninterfaces = []\nmod = 'x'\n",
            Path::new("a.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("a.toml"), "{err}");
        assert!(err.contains("mod"), "{err}");
        assert!(err.contains("line 3"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = Config::parse("[datapath]\nflow_table_size = 3\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("datapath.flow_table_size"), "{err}");
        let err = Config::parse("[datapath]\nmode = 'open'\n", Path::new("a.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("enforce") && err.contains("monitor"), "{err}");
    }

    #[test]
    fn relative_policy_dir_is_taken_from_the_config_directory() {
        let dir = std::env::temp_dir().join(format!("fw-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, "[policy]\ndir = 'policies'\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.policy.dir, dir.join("policies"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn status_socket_limits_are_config_keys_with_checked_ranges() {
        let c = Config::parse("", Path::new("a.toml")).unwrap();
        assert_eq!(c.api.max_connections_per_uid, 32);
        assert_eq!(c.api.admin_reserve, 32);
        assert_eq!(c.api.pressure_idle_timeout_secs, 10);
        let c = Config::parse(
            "[api]\nmax_connections_per_uid = 4\nadmin_reserve = 0\npressure_idle_timeout_secs = 2\n",
            Path::new("a.toml"),
        )
        .unwrap();
        assert_eq!((c.api.max_connections_per_uid, c.api.admin_reserve), (4, 0));
        for (text, field) in [
            ("max_connections_per_uid = 0", "api.max_connections_per_uid"),
            (
                "max_connections_per_uid = 257",
                "api.max_connections_per_uid",
            ),
            (
                "pressure_idle_timeout_secs = 0",
                "api.pressure_idle_timeout_secs",
            ),
        ] {
            let err = Config::parse(&format!("[api]\n{text}\n"), Path::new("a.toml"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{text}: {err}");
        }
    }
}
