//! The `[fleet]` section of `agent.toml`: where the NATS servers are, how to authenticate
//! (secrets read from files, never logged), this host's name, and which admin keys to trust.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{FleetError, keys::AdminPublicKey};

/// Where the agent takes its policy from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PolicySource {
    /// The policy directory of this host; pushed bundles are recorded and not applied.
    #[default]
    Local,
    /// Bundles pushed with `fleet policy push`, written into the policy directory.
    Fleet,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetConfig {
    /// NATS server URLs, e.g. `["nats://nats1:4222", "nats://nats2:4222"]`.
    pub servers: Vec<String>,
    /// This host's name in the fleet; the hostname when absent.
    #[serde(default)]
    pub host: Option<String>,
    /// The first token of every subject, stream and bucket name.
    #[serde(default = "default_prefix")]
    pub subject_prefix: String,
    /// Public keys (`ed25519:…`, from `flowwarden fleet keygen`) whose signed commands this
    /// agent applies. Required: without one no command could be trusted.
    #[serde(default)]
    pub admin_keys: Vec<String>,
    /// CA certificate(s) that sign the servers' certificates; TLS is required when set.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key, for servers that verify clients.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// NATS user name, and a file holding its password.
    #[serde(default)]
    pub user: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// A file holding an nkey seed (`SU…`).
    #[serde(default)]
    pub nkey_file: Option<PathBuf>,
    /// A NATS `.creds` file (JWT and seed).
    #[serde(default)]
    pub creds_file: Option<PathBuf>,
    /// Refuse admissions while this agent cannot confirm it has every control command.
    #[serde(default)]
    pub strict: bool,
    /// How long a confirmation holds: strict mode refuses once it is older than this, and at
    /// start every mode waits at most this long to catch up before admitting.
    #[serde(default = "default_current_within_secs")]
    pub current_within_secs: u64,
    #[serde(default)]
    pub policy: PolicySource,
}

fn default_prefix() -> String {
    "flowwarden".into()
}

fn default_current_within_secs() -> u64 {
    10
}

impl FleetConfig {
    /// A config for the admin CLI, which has no host of its own and trusts no keys.
    pub fn for_admin(servers: Vec<String>, subject_prefix: String) -> Self {
        Self {
            servers,
            host: Some("admin".into()),
            subject_prefix,
            admin_keys: Vec::new(),
            ca_file: None,
            cert_file: None,
            key_file: None,
            user: None,
            password_file: None,
            nkey_file: None,
            creds_file: None,
            strict: false,
            current_within_secs: default_current_within_secs(),
            policy: PolicySource::Local,
        }
    }

    /// Checks what can be checked without connecting, and parses the admin keys.
    ///
    /// # Errors
    /// [`FleetError::Config`] naming the field, or a key's parse error.
    pub fn validate(&self) -> Result<Vec<AdminPublicKey>, FleetError> {
        let bad = |why: String| Err(FleetError::Config(why));
        if self.servers.is_empty() {
            return bad(
                "servers is empty: list the NATS servers, e.g. servers = [\"nats://nats1:4222\"]"
                    .into(),
            );
        }
        if self.admin_keys.is_empty() {
            return bad(
                "admin_keys is empty: no fleet command could be trusted; add the public key \
                 `flowwarden fleet keygen` printed, e.g. admin_keys = [\"ed25519:…\"]"
                    .into(),
            );
        }
        if !valid_token(&self.subject_prefix) {
            return bad(format!(
                "subject_prefix {:?} must be letters, digits, - and _ only",
                self.subject_prefix
            ));
        }
        let host = self.host_name();
        if !valid_token(&host) {
            return bad(format!(
                "host {host:?} must be letters, digits, - and _ only (it is a subject token); \
                 set [fleet].host"
            ));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return bad("cert_file and key_file go together: set both or neither".into());
        }
        if self.user.is_some() != self.password_file.is_some() {
            return bad("user and password_file go together: set both or neither".into());
        }
        if self.current_within_secs == 0 {
            return bad("current_within_secs must be at least 1".into());
        }
        self.admin_keys
            .iter()
            .map(|k| AdminPublicKey::parse(k))
            .collect()
    }

    /// Makes relative file paths relative to the config file's directory.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [
            self.ca_file.as_mut(),
            self.cert_file.as_mut(),
            self.key_file.as_mut(),
            self.password_file.as_mut(),
            self.nkey_file.as_mut(),
            self.creds_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// This host's name: the configured one, else the kernel's hostname.
    pub fn host_name(&self) -> String {
        self.host.clone().unwrap_or_else(hostname)
    }
}

/// A subject token: no dots, wildcards or spaces.
pub fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// The kernel's hostname (`localhost` when it cannot be read).
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> FleetConfig {
        let (key, _) = super::super::keys::AdminKey::generate().unwrap();
        let mut c = FleetConfig::for_admin(vec!["nats://127.0.0.1:4222".into()], default_prefix());
        c.host = Some("web-1".into());
        c.admin_keys = vec![key.public.encoded()];
        c
    }

    #[test]
    fn a_complete_section_validates() {
        assert_eq!(config().validate().unwrap().len(), 1);
    }

    #[test]
    fn each_mistake_is_named() {
        type Break = fn(&mut FleetConfig);
        let cases: [(Break, &str); 6] = [
            (|c| c.servers.clear(), "servers is empty"),
            (|c| c.admin_keys.clear(), "admin_keys is empty"),
            (|c| c.host = Some("web.1".into()), "host \"web.1\""),
            (|c| c.subject_prefix = "a.>".into(), "subject_prefix"),
            (
                |c| c.cert_file = Some("/x".into()),
                "cert_file and key_file",
            ),
            (|c| c.admin_keys = vec!["rsa:x".into()], "ed25519:"),
        ];
        for (break_it, says) in cases {
            let mut c = config();
            break_it(&mut c);
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains(says), "expected {says:?} in {e}");
        }
    }

    #[test]
    fn parses_from_toml_and_refuses_unknown_fields() {
        let c: FleetConfig = toml::from_str(
            "servers = [\"nats://a:4222\"]\nadmin_keys = []\nstrict = true\npolicy = \"fleet\"\n",
        )
        .unwrap();
        assert!(c.strict);
        assert_eq!(c.policy, PolicySource::Fleet);
        assert_eq!(c.subject_prefix, "flowwarden");
        assert!(toml::from_str::<FleetConfig>("servers = []\npasword_file = \"x\"\n").is_err());
    }
}
