//! The `[signals]` config table: the Shared Signals transmitters the agent listens to, how
//! each delivers (push or poll), where its keys come from, and which session claims each
//! subject format is matched against.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::SignalError;
use crate::{auth::Alg, identity::ClaimPath};

/// A SET whose `iat` is further than this from the agent's clock is refused, unless the
/// transmitter's `iat_window_secs` says otherwise.
pub const DEFAULT_IAT_WINDOW_SECS: u64 = 300;
/// A wider window would make the durable `jti` record (kept as long as the window) grow for
/// days, and lets very old SETs act.
pub const MAX_IAT_WINDOW_SECS: u64 = 7 * 24 * 3600;

/// Below this, periodic key refreshes would hammer the transmitter.
const MIN_REFRESH_SECS: u64 = 10;

/// `[signals]` in the agent's TOML config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignalsConfig {
    /// `[[signals.transmitter]]` tables.
    #[serde(default, rename = "transmitter")]
    pub transmitters: Vec<TransmitterConfig>,
}

/// How SETs reach the agent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Delivery {
    /// RFC 8935: the transmitter POSTs each SET to `/v1/ssf/events` on the admission listener.
    #[default]
    Push,
    /// RFC 8936: the agent polls the transmitter's endpoint.
    Poll,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Push => "push",
            Self::Poll => "poll",
        }
    }

    /// The SSF `delivery.method` URN.
    pub fn urn(self) -> &'static str {
        match self {
            Self::Push => "urn:ietf:rfc:8935",
            Self::Poll => "urn:ietf:rfc:8936",
        }
    }
}

/// One Shared Signals transmitter (one stream).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransmitterConfig {
    /// The transmitter's issuer: the exact `iss` of its SETs.
    pub issuer: String,
    /// The `aud` the agent expects in each SET (what the stream was configured with).
    pub audience: String,
    /// Allowed `alg` values: RS256 and/or ES256 (RS384, RS512, PS256, ES384, EdDSA too).
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// Key source: fetch `<issuer>/.well-known/ssf-configuration` and its `jwks_uri`.
    #[serde(default)]
    pub discovery: bool,
    /// Key source: this JWKS URL.
    pub jwks_uri: Option<String>,
    /// Key source: a JWKS file (development transmitters, air-gapped setups).
    pub jwks_file: Option<PathBuf>,
    /// A PEM bundle of the CAs that vouch for the transmitter's HTTPS (replaces the system
    /// store for this transmitter, as an issuer's `ca_file` does).
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub delivery: Delivery,
    /// Push: a file holding the exact `Authorization` header value the transmitter sends
    /// (the stream's `authorization_header`). Required for push.
    pub push_authorization_file: Option<PathBuf>,
    /// Poll: the transmitter's poll endpoint (not set for a managed stream: the transmitter
    /// names it).
    pub poll_endpoint: Option<String>,
    /// Poll: seconds between polls when nothing is pending.
    #[serde(default = "default_poll_interval")]
    pub poll_interval_secs: u64,
    /// Poll: `maxEvents` of each request.
    #[serde(default = "default_max_events")]
    pub max_events: u32,
    /// A file with the bearer token for the transmitter's management API (scope
    /// `ssf.manage`) and poll endpoint. Never logged.
    pub bearer_token_file: Option<PathBuf>,
    /// Find or create the stream at the `configuration_endpoint` of the issuer's
    /// `ssf-configuration`, ask for verification and read its status (needs
    /// `bearer_token_file`; see [`super::stream`]). Otherwise the stream is configured
    /// statically at the transmitter.
    #[serde(default)]
    pub manage_stream: bool,
    /// Push, managed stream: the URL the transmitter should push to (this agent's
    /// `https://host:7443/v1/ssf/events`).
    pub push_endpoint: Option<String>,
    /// How far a SET's `iat` may be from the agent's clock, seconds.
    #[serde(default = "default_iat_window")]
    pub iat_window_secs: u64,
    /// Key refresh interval, seconds.
    #[serde(default = "default_refresh")]
    pub refresh_secs: u64,
    /// Which session claims each subject format is compared with.
    #[serde(default)]
    pub subjects: SubjectMapping,
}

/// Claim paths that subjects are matched against. Email subjects match the session's email
/// (case-insensitively), `iss_sub` its issuer and subject, device subjects the device id of
/// its posture; the rest are claims.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SubjectMapping {
    /// An `opaque` user subject's `id` is compared with this claim.
    pub opaque: ClaimPath,
    /// A `jwt_id` subject's `jti` is compared with this claim of the session's token.
    pub jwt_id: ClaimPath,
    /// A complex subject's `session` member (opaque) is compared with this claim.
    pub session: ClaimPath,
    /// A complex subject's `tenant` member (opaque) is compared with this claim.
    pub tenant: ClaimPath,
    /// `assurance-level-change` writes its `current_level` into this claim.
    pub assurance_level: ClaimPath,
}

impl Default for SubjectMapping {
    fn default() -> Self {
        Self {
            opaque: ClaimPath::top("sub"),
            jwt_id: ClaimPath::top("jti"),
            session: ClaimPath::top("sid"),
            tenant: ClaimPath::top("tid"),
            assurance_level: ClaimPath::top("acr"),
        }
    }
}

fn default_algorithms() -> Vec<String> {
    vec!["RS256".into(), "ES256".into()]
}

fn default_poll_interval() -> u64 {
    5
}

fn default_max_events() -> u32 {
    100
}

fn default_iat_window() -> u64 {
    DEFAULT_IAT_WINDOW_SECS
}

fn default_refresh() -> u64 {
    3600
}

fn invalid(field: String, reason: impl Into<String>) -> SignalError {
    SignalError::Config {
        field,
        reason: reason.into(),
    }
}

impl SignalsConfig {
    /// Relative paths are relative to the config file's directory.
    pub fn resolve_paths(&mut self, base: &Path) {
        for t in &mut self.transmitters {
            for p in [
                t.jwks_file.as_mut(),
                t.ca_file.as_mut(),
                t.push_authorization_file.as_mut(),
                t.bearer_token_file.as_mut(),
            ]
            .into_iter()
            .flatten()
            {
                if p.is_relative() {
                    *p = base.join(&*p);
                }
            }
        }
    }

    /// Checks what can be checked without files or the network.
    ///
    /// # Errors
    /// The first problem, naming its field (`signals.transmitter[0].algorithms`).
    pub fn validate(&self) -> Result<(), SignalError> {
        for (i, t) in self.transmitters.iter().enumerate() {
            let at = format!("signals.transmitter[{i}]");
            t.validate(&at)?;
            if let Some(j) = self.transmitters[..i]
                .iter()
                .position(|o| o.issuer == t.issuer)
            {
                return Err(invalid(
                    format!("{at}.issuer"),
                    format!("{:?} is configured twice (also transmitter[{j}])", t.issuer),
                ));
            }
        }
        Ok(())
    }
}

impl TransmitterConfig {
    /// The allowed algorithms, parsed.
    ///
    /// # Errors
    /// An unknown name, HS256 (a transmitter's JWKS must never double as an HMAC secret), or
    /// none at all.
    pub(crate) fn algs(&self, at: &str) -> Result<Vec<Alg>, SignalError> {
        let field = format!("{at}.algorithms");
        if self.algorithms.is_empty() {
            return Err(invalid(field, "at least one algorithm is required"));
        }
        let mut algs = Vec::new();
        for name in &self.algorithms {
            match Alg::from_name(name) {
                Some(Alg::Hs256) => {
                    return Err(invalid(
                        field,
                        "HS256 is not allowed for a transmitter: its keys come from a JWKS",
                    ));
                }
                Some(a) => algs.push(a),
                None => {
                    return Err(invalid(
                        field,
                        format!("{name:?} is not an algorithm: use RS256 or ES256"),
                    ));
                }
            }
        }
        Ok(algs)
    }

    fn validate(&self, at: &str) -> Result<(), SignalError> {
        if self.issuer.trim().is_empty() {
            return Err(invalid(format!("{at}.issuer"), "must not be empty"));
        }
        if self.audience.is_empty() {
            return Err(invalid(format!("{at}.audience"), "must not be empty"));
        }
        self.algs(at)?;
        let sources = [
            self.discovery,
            self.jwks_uri.is_some(),
            self.jwks_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(invalid(
                at.to_owned(),
                "exactly one key source is required: discovery = true, jwks_uri or jwks_file",
            ));
        }
        for (name, url) in [
            ("jwks_uri", &self.jwks_uri),
            ("poll_endpoint", &self.poll_endpoint),
        ] {
            if let Some(url) = url {
                crate::auth::check_url(url).map_err(|why| invalid(format!("{at}.{name}"), why))?;
            }
        }
        if self.discovery {
            crate::auth::check_url(&self.issuer)
                .map_err(|why| invalid(format!("{at}.issuer"), why))?;
        }
        if !(1..=MAX_IAT_WINDOW_SECS).contains(&self.iat_window_secs) {
            return Err(invalid(
                format!("{at}.iat_window_secs"),
                format!("must be between 1 and {MAX_IAT_WINDOW_SECS}"),
            ));
        }
        if self.refresh_secs < MIN_REFRESH_SECS {
            return Err(invalid(
                format!("{at}.refresh_secs"),
                format!("at least {}", MIN_REFRESH_SECS),
            ));
        }
        if self.manage_stream {
            if self.bearer_token_file.is_none() {
                return Err(invalid(
                    format!("{at}.bearer_token_file"),
                    "manage_stream needs the transmitter's management token (scope ssf.manage) \
                     in a file",
                ));
            }
            // The management API is found in the issuer's ssf-configuration.
            crate::auth::check_url(&self.issuer)
                .map_err(|why| invalid(format!("{at}.issuer"), why))?;
            match self.delivery {
                Delivery::Push => {
                    let Some(url) = &self.push_endpoint else {
                        return Err(invalid(
                            format!("{at}.push_endpoint"),
                            "a managed push stream needs the URL the transmitter pushes to: \
                             this agent's https://HOST:PORT/v1/ssf/events",
                        ));
                    };
                    if !url.starts_with("https://") || !url.ends_with(super::PUSH_PATH) {
                        return Err(invalid(
                            format!("{at}.push_endpoint"),
                            format!(
                                "{url:?} is not this agent's push URL: write \
                                 https://HOST:PORT{}",
                                super::PUSH_PATH
                            ),
                        ));
                    }
                }
                Delivery::Poll => {
                    if self.poll_endpoint.is_some() {
                        return Err(invalid(
                            format!("{at}.poll_endpoint"),
                            "a managed stream's poll endpoint comes from the transmitter: \
                             remove poll_endpoint, or set manage_stream = false",
                        ));
                    }
                }
            }
        } else if self.push_endpoint.is_some() {
            return Err(invalid(
                format!("{at}.push_endpoint"),
                "push_endpoint is what a managed stream asks the transmitter to push to: \
                 set manage_stream = true, or remove it",
            ));
        }
        match self.delivery {
            Delivery::Push => {
                if self.push_authorization_file.is_none() {
                    return Err(invalid(
                        format!("{at}.push_authorization_file"),
                        "push delivery needs the Authorization header value the transmitter \
                         sends, in a file",
                    ));
                }
            }
            Delivery::Poll => {
                if self.poll_endpoint.is_none() && !self.manage_stream {
                    return Err(invalid(
                        format!("{at}.poll_endpoint"),
                        "poll delivery needs the transmitter's poll endpoint",
                    ));
                }
                if self.max_events == 0 || self.poll_interval_secs == 0 {
                    return Err(invalid(
                        format!("{at}.max_events"),
                        "max_events and poll_interval_secs must be at least 1",
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<SignalsConfig, String> {
        let cfg: SignalsConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| e.to_string())?;
        Ok(cfg)
    }

    #[test]
    fn a_push_transmitter_with_defaults() {
        let cfg = parse(
            "[[transmitter]]\nissuer = \"https://tx.example\"\naudience = \"fw\"\n\
             jwks_file = \"k.json\"\npush_authorization_file = \"auth\"\n",
        )
        .expect("valid");
        let t = &cfg.transmitters[0];
        assert_eq!(t.delivery, Delivery::Push);
        assert_eq!(t.algorithms, ["RS256", "ES256"]);
        assert_eq!(t.subjects.session.as_str(), "sid");
        assert_eq!(t.iat_window_secs, DEFAULT_IAT_WINDOW_SECS);
    }

    #[test]
    fn bad_transmitters_name_their_field() {
        let base = "issuer = \"https://tx.example\"\naudience = \"fw\"\n";
        for (extra, field) in [
            (
                "push_authorization_file = \"a\"\n",
                "exactly one key source",
            ),
            (
                "jwks_file = \"k\"\njwks_uri = \"https://x/j\"\npush_authorization_file = \"a\"\n",
                "exactly one key source",
            ),
            ("jwks_file = \"k\"\n", "push_authorization_file"),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\nalgorithms = [\"HS256\"]\n",
                "algorithms",
            ),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\nalgorithms = [\"none\"]\n",
                "algorithms",
            ),
            (
                "jwks_uri = \"http://idp.example/j\"\npush_authorization_file = \"a\"\n",
                "jwks_uri",
            ),
            ("jwks_file = \"k\"\ndelivery = \"poll\"\n", "poll_endpoint"),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\niat_window_secs = 0\n",
                "iat_window_secs",
            ),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\nmanage_stream = true\n",
                "bearer_token_file",
            ),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\nmanage_stream = true\n\
                 bearer_token_file = \"b\"\n",
                "push_endpoint",
            ),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\nmanage_stream = true\n\
                 bearer_token_file = \"b\"\npush_endpoint = \"https://h:7443/events\"\n",
                "push_endpoint",
            ),
            (
                "jwks_file = \"k\"\ndelivery = \"poll\"\nmanage_stream = true\n\
                 bearer_token_file = \"b\"\npoll_endpoint = \"https://tx.example/p\"\n",
                "poll_endpoint",
            ),
            (
                "jwks_file = \"k\"\npush_authorization_file = \"a\"\n\
                 push_endpoint = \"https://h:7443/v1/ssf/events\"\n",
                "push_endpoint",
            ),
        ] {
            let err = parse(&format!("[[transmitter]]\n{base}{extra}")).unwrap_err();
            assert!(err.contains(field), "{extra}: {err}");
        }
        let err = parse(&format!(
            "[[transmitter]]\n{base}jwks_file = \"k\"\npush_authorization_file = \"a\"\n\
             [[transmitter]]\n{base}jwks_file = \"k\"\npush_authorization_file = \"a\"\n"
        ))
        .unwrap_err();
        assert!(err.contains("configured twice"), "{err}");
        // Managed streams: the transmitter names the poll endpoint.
        parse(&format!(
            "[[transmitter]]\n{base}jwks_file = \"k\"\ndelivery = \"poll\"\n\
             manage_stream = true\nbearer_token_file = \"b\"\n"
        ))
        .expect("a managed poll stream");
        parse(&format!(
            "[[transmitter]]\n{base}discovery = true\npush_authorization_file = \"a\"\n\
             manage_stream = true\nbearer_token_file = \"b\"\n\
             push_endpoint = \"https://h:7443/v1/ssf/events\"\n"
        ))
        .expect("a managed push stream");
        assert!(
            toml::from_str::<SignalsConfig>(
                "[[transmitter]]\nissuer=\"x\"\naudience=\"y\"\nbogus=1\n"
            )
            .is_err()
        );
    }
}
