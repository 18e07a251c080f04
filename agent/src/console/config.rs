//! The `[console]` config table: where the web console listens, how browsers reach it, and
//! the OpenID Connect issuer and groups that sign administrators in.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::fleet::FleetConfig;

/// Where the console listens unless told otherwise: loopback only, plain HTTP.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:9470";
/// How long a console sign-in lasts before the administrator signs in again.
pub const DEFAULT_SESSION_SECS: u64 = 8 * 3600;

/// `[console]` in the agent's TOML config (read by `flowwarden console`, not by the agent).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleConfig {
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The URL browsers use to reach the console (the redirect URI is `<public_url>/callback`).
    /// Default: `http://<listen>` on loopback, `https://<listen>` beyond.
    pub public_url: Option<String>,
    /// TLS beyond loopback: this pair, or one generated under `<state.dir>/console/`.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Console sign-ins expire after this many seconds (60 to 604800).
    #[serde(default = "default_session_secs")]
    pub session_secs: u64,
    /// The identity provider administrators sign in with. Required to start the console.
    pub oidc: Option<ConsoleOidc>,
    /// NATS credentials for the Hosts page, in place of the agent's own in `[fleet]` (which
    /// may not read other hosts' views). Servers, prefix and CA still come from `[fleet]`.
    pub fleet: Option<ConsoleFleet>,
}

/// `[console.fleet]`: the console's own NATS credentials (one kind, like `[fleet]`'s).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleFleet {
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    pub nkey_file: Option<PathBuf>,
    pub creds_file: Option<PathBuf>,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// A fleet admin key (`flowwarden fleet keygen`): with it, admins may end sessions on
    /// other hosts from the Fleet sessions page, as signed fleet commands. Without it the
    /// console cannot command the fleet.
    pub admin_key_file: Option<PathBuf>,
}

impl ConsoleFleet {
    fn has_credentials(&self) -> bool {
        let creds = Self {
            admin_key_file: None,
            ..self.clone()
        };
        creds != Self::default()
    }
}

/// `[console.oidc]`: authorization code flow with PKCE against one issuer.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConsoleOidc {
    /// The exact `iss`; discovery is read from `<issuer>/.well-known/openid-configuration`.
    pub issuer: String,
    pub client_id: String,
    /// A confidential client's secret (the file's bytes, trimmed); a public client has none.
    pub client_secret_file: Option<PathBuf>,
    /// A PEM bundle that replaces the system store for this issuer.
    pub ca_file: Option<PathBuf>,
    /// Allowed ID-token algorithms.
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Scopes asked for; `openid` must be one of them.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The claim (a name or a JSON Pointer) that carries the administrator's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Members of any of these groups may change things (terminate, lock).
    #[serde(default = "default_admin_groups")]
    pub admin_groups: Vec<String>,
    /// Members of any of these groups may look, and nothing more.
    #[serde(default = "default_read_groups")]
    pub read_groups: Vec<String>,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            public_url: None,
            cert_file: None,
            key_file: None,
            session_secs: DEFAULT_SESSION_SECS,
            oidc: None,
            fleet: None,
        }
    }
}

fn default_listen() -> SocketAddr {
    DEFAULT_LISTEN.parse().expect("a valid default address")
}

fn default_session_secs() -> u64 {
    DEFAULT_SESSION_SECS
}

fn default_algorithms() -> Vec<String> {
    vec!["ES256".into(), "RS256".into()]
}

fn default_scopes() -> Vec<String> {
    vec!["openid".into(), "email".into(), "groups".into()]
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_admin_groups() -> Vec<String> {
    vec!["flowwarden-admin".into()]
}

fn default_read_groups() -> Vec<String> {
    vec!["flowwarden".into()]
}

/// Why the `[console]` table cannot be used; `field` is its config path.
#[derive(Debug, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct ConsoleConfigError {
    pub field: &'static str,
    pub problem: String,
}

fn invalid(field: &'static str, problem: impl Into<String>) -> ConsoleConfigError {
    ConsoleConfigError {
        field,
        problem: problem.into(),
    }
}

impl ConsoleConfig {
    /// Whether the console is reachable from beyond this host (then: TLS, `Secure` cookies).
    pub fn beyond_loopback(&self) -> bool {
        !self.listen.ip().is_loopback()
    }

    /// The URL browsers use, without a trailing slash.
    pub fn public_url(&self) -> String {
        match &self.public_url {
            Some(url) => url.trim_end_matches('/').to_owned(),
            None if self.beyond_loopback() => format!("https://{}", self.listen),
            None => format!("http://{}", self.listen),
        }
    }

    /// The OIDC table, checked; relative paths are taken from `base` (the config's directory).
    ///
    /// # Errors
    /// A missing `[console.oidc]`, or a value that cannot work, naming its field.
    pub fn checked(&self, base: &Path) -> Result<(Self, ConsoleOidc), ConsoleConfigError> {
        let mut me = self.clone();
        if !(60..=7 * 24 * 3600).contains(&me.session_secs) {
            return Err(invalid(
                "console.session_secs",
                format!("{} is out of range: use 60 to 604800", me.session_secs),
            ));
        }
        if me.cert_file.is_some() != me.key_file.is_some() {
            return Err(invalid(
                "console.cert_file",
                "set both cert_file and key_file, or neither (a self-signed pair is then generated)",
            ));
        }
        if let Some(url) = &me.public_url {
            let https = url.starts_with("https://");
            let plain_on_loopback = url.starts_with("http://") && !me.beyond_loopback();
            if !(https || plain_on_loopback) {
                return Err(invalid(
                    "console.public_url",
                    format!("{url:?}: use https:// (http:// only when listening on loopback)"),
                ));
            }
        }
        let Some(mut oidc) = me.oidc.take() else {
            return Err(invalid(
                "console.oidc",
                "missing: the console signs administrators in through OpenID Connect; add \
                 [console.oidc] with issuer and client_id (see docs/console.md)",
            ));
        };
        if !oidc.scopes.iter().any(|s| s == "openid") {
            return Err(invalid("console.oidc.scopes", "must include \"openid\""));
        }
        if oidc.admin_groups.is_empty() && oidc.read_groups.is_empty() {
            return Err(invalid(
                "console.oidc.admin_groups",
                "admin_groups and read_groups are both empty: nobody could sign in",
            ));
        }
        crate::identity::ClaimPath::parse(&oidc.groups_claim)
            .map_err(|e| invalid("console.oidc.groups_claim", e))?;
        for p in [
            me.cert_file.as_mut(),
            me.key_file.as_mut(),
            oidc.client_secret_file.as_mut(),
            oidc.ca_file.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok((me, oidc))
    }
}

impl ConsoleConfig {
    /// The fleet admin key the console signs commands with, if it has one (relative to
    /// `base`).
    pub fn fleet_admin_key(&self, base: &Path) -> Option<PathBuf> {
        let path = self.fleet.as_ref()?.admin_key_file.as_ref()?;
        Some(if path.is_relative() {
            base.join(path)
        } else {
            path.clone()
        })
    }

    /// How the console reaches the fleet for its Hosts page: `[fleet]`'s servers, prefix and
    /// CA, with `[console.fleet]`'s credentials when given (relative paths from `base`).
    /// `None`: no `[fleet]`, no Hosts page.
    ///
    /// # Errors
    /// `[console.fleet]` without `[fleet]`, or a value that cannot work, naming its field.
    pub fn fleet_link(
        &self,
        fleet: Option<&FleetConfig>,
        base: &Path,
    ) -> Result<Option<FleetConfig>, ConsoleConfigError> {
        let Some(fleet) = fleet else {
            return match self.fleet {
                Some(_) => Err(invalid(
                    "console.fleet",
                    "set, but the config has no [fleet] section: the Hosts page reads the \
                     fleet's servers from [fleet] (see docs/console.md)",
                )),
                None => Ok(None),
            };
        };
        let mut link = fleet.clone();
        if let Some(own) = &self.fleet {
            if own.user.is_some() != own.password_file.is_some() {
                return Err(invalid(
                    "console.fleet.user",
                    "user and password_file go together: set both or neither",
                ));
            }
            if own.cert_file.is_some() != own.key_file.is_some() {
                return Err(invalid(
                    "console.fleet.cert_file",
                    "cert_file and key_file go together: set both or neither",
                ));
            }
            if own == &ConsoleFleet::default() {
                return Err(invalid(
                    "console.fleet",
                    "empty: give user and password_file, nkey_file, creds_file or \
                     cert_file and key_file (or remove the table to use [fleet]'s)",
                ));
            }
            if own.admin_key_file.is_some() && !own.has_credentials() {
                return Err(invalid(
                    "console.fleet.admin_key_file",
                    "needs the console's own NATS user, one that may publish fleet commands \
                     (the agent's own may not): give user and password_file, nkey_file, \
                     creds_file or cert_file and key_file too",
                ));
            }
        }
        if let Some(own) = self.fleet.as_ref().filter(|o| o.has_credentials()) {
            // None of the agent's credentials: the console is a NATS user of its own.
            link.user.clone_from(&own.user);
            link.password_file.clone_from(&own.password_file);
            link.nkey_file.clone_from(&own.nkey_file);
            link.creds_file.clone_from(&own.creds_file);
            link.cert_file.clone_from(&own.cert_file);
            link.key_file.clone_from(&own.key_file);
            link.resolve_paths(base);
        }
        if link.servers.is_empty() {
            return Err(invalid(
                "fleet.servers",
                "empty: list the NATS servers the Hosts page reads the fleet's view from",
            ));
        }
        Ok(Some(link))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> ConsoleConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn defaults_listen_on_loopback_and_need_an_issuer() {
        let c = ConsoleConfig::default();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.public_url(), "http://127.0.0.1:9470");
        let e = c.checked(Path::new("/etc/flowwarden")).unwrap_err();
        assert_eq!(e.field, "console.oidc", "{e}");
    }

    #[test]
    fn beyond_loopback_is_https_and_relative_paths_follow_the_config() {
        let c = parse(
            r#"listen = "0.0.0.0:9470"
[oidc]
issuer = "https://idp.corp.example"
client_id = "flowwarden-console"
ca_file = "idp-ca.pem"
"#,
        );
        assert!(c.beyond_loopback());
        assert_eq!(c.public_url(), "https://0.0.0.0:9470");
        let (_, oidc) = c.checked(Path::new("/etc/flowwarden")).unwrap();
        assert_eq!(
            oidc.ca_file.as_deref(),
            Some(Path::new("/etc/flowwarden/idp-ca.pem"))
        );
        assert_eq!(oidc.admin_groups, ["flowwarden-admin"]);
    }

    #[test]
    fn unusable_values_are_refused_by_name() {
        let bad = parse(
            r#"listen = "0.0.0.0:9470"
public_url = "http://console.corp.example"
[oidc]
issuer = "https://idp.corp.example"
client_id = "c"
"#,
        );
        assert_eq!(
            bad.checked(Path::new("/")).unwrap_err().field,
            "console.public_url"
        );
        let bad = parse(
            r#"[oidc]
issuer = "https://idp.corp.example"
client_id = "c"
scopes = ["email"]
"#,
        );
        assert_eq!(
            bad.checked(Path::new("/")).unwrap_err().field,
            "console.oidc.scopes"
        );
        assert!(toml::from_str::<ConsoleConfig>("lsiten = \"x\"").is_err());
    }

    #[test]
    fn the_hosts_page_reaches_fleet_servers_with_the_consoles_own_credentials() {
        let mut fleet =
            FleetConfig::for_admin(vec!["nats://nats1:4222".into()], "flowwarden".into());
        fleet.user = Some("agent-web-1".into());
        fleet.password_file = Some("/etc/flowwarden/agent-nats-password".into());
        fleet.ca_file = Some("/etc/flowwarden/fleet-ca.pem".into());
        // No [fleet]: no Hosts page; [console.fleet] alone is a mistake.
        assert_eq!(
            ConsoleConfig::default()
                .fleet_link(None, Path::new("/"))
                .unwrap(),
            None
        );
        let own = parse("[fleet]\nuser = \"fleet-console\"\npassword_file = \"pw\"\n");
        assert_eq!(
            own.fleet_link(None, Path::new("/")).unwrap_err().field,
            "console.fleet"
        );
        // Without [console.fleet], [fleet] as it is.
        let link = ConsoleConfig::default()
            .fleet_link(Some(&fleet), Path::new("/etc/flowwarden"))
            .unwrap()
            .unwrap();
        assert_eq!(link, fleet);
        // With it, the console's user instead of the agent's, the CA kept.
        let link = own
            .fleet_link(Some(&fleet), Path::new("/etc/flowwarden"))
            .unwrap()
            .unwrap();
        assert_eq!(link.user.as_deref(), Some("fleet-console"));
        assert_eq!(
            link.password_file.as_deref(),
            Some(Path::new("/etc/flowwarden/pw"))
        );
        assert_eq!(link.ca_file, fleet.ca_file);
        assert_eq!(link.servers, fleet.servers);
        for (bad, field) in [
            ("[fleet]\nuser = \"c\"\n", "console.fleet.user"),
            (
                "[fleet]\ncert_file = \"c.pem\"\n",
                "console.fleet.cert_file",
            ),
            ("[fleet]\n", "console.fleet"),
        ] {
            let e = parse(bad)
                .fleet_link(Some(&fleet), Path::new("/"))
                .unwrap_err();
            assert_eq!(e.field, field, "{bad}: {e}");
        }
        assert!(toml::from_str::<ConsoleConfig>("[fleet]\npasword_file = \"x\"").is_err());
        // An admin key needs a NATS user of the console's own, and follows the config.
        let e = parse("[fleet]\nadmin_key_file = \"admin.key\"\n")
            .fleet_link(Some(&fleet), Path::new("/"))
            .unwrap_err();
        assert_eq!(e.field, "console.fleet.admin_key_file", "{e}");
        let with_key = parse(
            "[fleet]\nuser = \"fleet-console-admin\"\npassword_file = \"pw\"\n\
             admin_key_file = \"admin.key\"\n",
        );
        with_key
            .fleet_link(Some(&fleet), Path::new("/etc/flowwarden"))
            .expect("a console that may command");
        assert_eq!(
            with_key.fleet_admin_key(Path::new("/etc/flowwarden")),
            Some("/etc/flowwarden/admin.key".into())
        );
        assert_eq!(own.fleet_admin_key(Path::new("/etc")), None);
    }
}
