//! The `[auth]` config table: trusted issuers, their audiences, algorithms, key source and
//! claim mapping, with validation that names the offending field.

use std::{collections::HashMap, path::PathBuf};

use serde::Deserialize;

use super::{alg::Alg, fetch};
use crate::identity::ClaimPath;

/// Clock skew allowed for `exp` / `nbf` is capped: more would let expired tokens in for long.
pub const MAX_LEEWAY_SECS: u64 = 300;
/// Below this, periodic key refreshes would hammer the identity provider.
pub const MIN_REFRESH_SECS: u64 = 10;
/// Above this, a key the identity provider withdrew would stay trusted for too long.
pub const MAX_REFRESH_SECS: u64 = 7 * 24 * 3600;

/// `[auth]` in the agent's TOML config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// Clock skew allowed when checking `exp` and `nbf`; at most 300.
    #[serde(default = "default_leeway_secs")]
    pub leeway_secs: u64,
    /// `[[auth.issuer]]` tables: the identity providers whose tokens are accepted.
    #[serde(default, rename = "issuer")]
    pub issuers: Vec<IssuerConfig>,
}

/// One trusted identity provider.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerConfig {
    /// The exact `iss` value of its tokens.
    pub issuer: String,
    /// A token's `aud` (a string or an array) must contain one of these.
    pub audiences: Vec<String>,
    /// Allowed `alg` values, from RS256 RS384 RS512 PS256 PS384 PS512 ES256 ES384 EdDSA HS256.
    pub algorithms: Vec<String>,
    /// Key source: a JWKS file, re-read on rotation.
    pub jwks_file: Option<PathBuf>,
    /// Key source: `true` fetches `<issuer>/.well-known/openid-configuration` → `jwks_uri`.
    pub discovery: Option<bool>,
    /// Key source: a shared HS256 secret (the file's bytes, without trailing whitespace).
    pub hs256_secret_file: Option<PathBuf>,
    /// With `discovery`: a PEM bundle of the certificate authorities that vouch for the
    /// provider's discovery and JWKS URLs. It replaces the system store for this issuer (see
    /// docs/configuration.md); without it the system store is used.
    pub ca_file: Option<PathBuf>,
    /// Accepted values of the token header's `typ`, compared case-insensitively and with or
    /// without `application/`; `""` accepts a token without `typ`. Default: `JWT`, `at+jwt`
    /// and none. `["at+jwt"]` requires RFC 9068 access tokens.
    #[serde(default = "default_token_types")]
    pub token_types: Vec<String>,
    /// Periodic key refresh interval, seconds.
    #[serde(default = "default_refresh_secs")]
    pub refresh_secs: u64,
    /// Which claims carry the subject, email, groups and device posture.
    #[serde(default)]
    pub claims: ClaimMapping,
}

/// Claim paths that feed the identity: a top-level name, or a JSON Pointer into nested claims
/// (`/device/managed`; see [`ClaimPath`]). Defaults are the conventional top-level names. A
/// path that does not parse is refused when the config is read, with its line.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClaimMapping {
    pub subject: ClaimPath,
    pub email: ClaimPath,
    pub groups: ClaimPath,
    pub device_id: ClaimPath,
    pub device_managed: ClaimPath,
    pub device_compliant: ClaimPath,
    pub device_os: ClaimPath,
}

impl Default for ClaimMapping {
    fn default() -> Self {
        Self {
            subject: ClaimPath::top("sub"),
            email: ClaimPath::top("email"),
            groups: ClaimPath::top("groups"),
            device_id: ClaimPath::top("device_id"),
            device_managed: ClaimPath::top("device_managed"),
            device_compliant: ClaimPath::top("device_compliant"),
            device_os: ClaimPath::top("device_os"),
        }
    }
}

/// The `typ` values accepted when an issuer sets none: what providers put on ID tokens and
/// RFC 9068 access tokens, and no `typ` at all.
pub const DEFAULT_TOKEN_TYPES: [&str; 3] = ["JWT", "at+jwt", ""];

fn default_token_types() -> Vec<String> {
    DEFAULT_TOKEN_TYPES
        .iter()
        .map(|t| (*t).to_owned())
        .collect()
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            leeway_secs: default_leeway_secs(),
            issuers: Vec::new(),
        }
    }
}

fn default_leeway_secs() -> u64 {
    30
}

fn default_refresh_secs() -> u64 {
    3600
}

/// Why the `[auth]` config cannot be used. `field` is the config path (`auth.issuer[0].algorithms`).
#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{field}: cannot read {}: {source}", path.display())]
    Unreadable {
        field: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{field}: {} is not a usable key source: {reason}", path.display())]
    BadKeys {
        field: String,
        path: PathBuf,
        reason: String,
    },
    #[error("auth: cannot start the key refresh thread: {0}")]
    RefreshThread(#[source] std::io::Error),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> AuthConfigError {
    AuthConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

impl AuthConfig {
    /// Checks everything that can be checked without reading files or the network.
    ///
    /// # Errors
    /// The first problem found, naming its field.
    pub fn validate(&self) -> Result<(), AuthConfigError> {
        if self.leeway_secs > MAX_LEEWAY_SECS {
            return Err(invalid(
                "auth.leeway_secs",
                format!(
                    "{} is more than {MAX_LEEWAY_SECS} seconds",
                    self.leeway_secs
                ),
            ));
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, issuer) in self.issuers.iter().enumerate() {
            let at = format!("auth.issuer[{i}]");
            issuer.validate(&at)?;
            if let Some(first) = seen.insert(issuer.issuer.as_str(), i) {
                return Err(invalid(
                    format!("{at}.issuer"),
                    format!(
                        "{:?} is configured twice (also auth.issuer[{first}])",
                        issuer.issuer
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl IssuerConfig {
    fn validate(&self, at: &str) -> Result<(), AuthConfigError> {
        if self.issuer.trim().is_empty() {
            return Err(invalid(format!("{at}.issuer"), "must not be empty"));
        }
        if self.audiences.is_empty() {
            return Err(invalid(
                format!("{at}.audiences"),
                "at least one audience is required",
            ));
        }
        if self.audiences.iter().any(|a| a.is_empty()) {
            return Err(invalid(
                format!("{at}.audiences"),
                "an audience must not be empty",
            ));
        }
        let algs = self.parse_algorithms(at)?;

        let sources = [
            self.jwks_file.is_some(),
            self.discovery == Some(true),
            self.hs256_secret_file.is_some(),
        ];
        if sources.iter().filter(|s| **s).count() != 1 {
            return Err(invalid(
                at,
                "exactly one key source is required: jwks_file, discovery = true or hs256_secret_file",
            ));
        }
        let hmac = algs.contains(&Alg::Hs256);
        if self.hs256_secret_file.is_some() && algs != [Alg::Hs256] {
            return Err(invalid(
                format!("{at}.algorithms"),
                "an hs256_secret_file only verifies HS256: set algorithms = [\"HS256\"]",
            ));
        }
        if hmac && self.hs256_secret_file.is_none() {
            // A JWKS public key must never be usable as an HMAC secret.
            return Err(invalid(
                format!("{at}.algorithms"),
                "HS256 is only allowed with hs256_secret_file, never with a JWKS",
            ));
        }
        if self.ca_file.is_some() && self.discovery != Some(true) {
            return Err(invalid(
                format!("{at}.ca_file"),
                "only used with discovery = true (keys from a file need no TLS)",
            ));
        }
        if self.token_types.is_empty() {
            return Err(invalid(
                format!("{at}.token_types"),
                "accepts no token: list the typ values, e.g. [\"at+jwt\"]",
            ));
        }
        if self.discovery == Some(true) {
            let url = fetch::discovery_url(&self.issuer);
            fetch::check_url(&url).map_err(|why| invalid(format!("{at}.discovery"), why))?;
        }
        if !(MIN_REFRESH_SECS..=MAX_REFRESH_SECS).contains(&self.refresh_secs) {
            return Err(invalid(
                format!("{at}.refresh_secs"),
                format!(
                    "{} is outside {MIN_REFRESH_SECS}..={MAX_REFRESH_SECS} seconds",
                    self.refresh_secs
                ),
            ));
        }
        Ok(())
    }

    /// The allowed algorithms, typed; `none` in any spelling is refused by name.
    pub(crate) fn parse_algorithms(&self, at: &str) -> Result<Vec<Alg>, AuthConfigError> {
        let field = format!("{at}.algorithms");
        if self.algorithms.is_empty() {
            return Err(invalid(field, "at least one algorithm is required"));
        }
        let mut algs = Vec::with_capacity(self.algorithms.len());
        for name in &self.algorithms {
            let alg = match Alg::from_name(name) {
                Some(alg) => alg,
                None if name.trim().eq_ignore_ascii_case("none") => {
                    return Err(invalid(
                        field,
                        format!("{name:?} is not allowed: use {}", Alg::CHOICES),
                    ));
                }
                None => {
                    return Err(invalid(
                        field,
                        format!("{name:?} is not supported: use {}", Alg::CHOICES),
                    ));
                }
            };
            if !algs.contains(&alg) {
                algs.push(alg);
            }
        }
        Ok(algs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> AuthConfig {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Root {
            auth: AuthConfig,
        }
        toml::from_str::<Root>(toml_text)
            .map(|r| r.auth)
            .unwrap_or_else(|e| panic!("config should parse: {e}"))
    }

    fn one(extra: &str) -> String {
        format!(
            "[auth]\n[[auth.issuer]]\nissuer = \"https://idp.example\"\naudiences = [\"fw\"]\n{extra}\n"
        )
    }

    fn err(cfg: &AuthConfig) -> String {
        match cfg.validate() {
            Err(e) => e.to_string(),
            Ok(()) => panic!("expected a validation error for {cfg:?}"),
        }
    }

    #[test]
    fn defaults_and_toml_shape() {
        let cfg = parse(&one("algorithms = [\"ES256\"]\ndiscovery = true"));
        assert_eq!(cfg.leeway_secs, 30);
        assert_eq!(cfg.issuers.len(), 1);
        assert_eq!(cfg.issuers[0].refresh_secs, 3600);
        assert_eq!(cfg.issuers[0].claims, ClaimMapping::default());
        cfg.validate().expect("valid");

        let cfg = parse(&one(
            "algorithms = [\"RS256\"]\njwks_file = \"/etc/jwks.json\"\n[auth.issuer.claims]\ngroups = \"roles\"",
        ));
        assert_eq!(cfg.issuers[0].claims.groups.as_str(), "roles");
        assert_eq!(cfg.issuers[0].claims.subject.as_str(), "sub");
        cfg.validate().expect("valid");
        assert!(AuthConfig::default().validate().is_ok());
    }

    #[test]
    fn claim_paths_are_parsed_when_the_config_is_read() {
        #[derive(Debug, Deserialize)]
        struct Root {
            auth: AuthConfig,
        }
        let nested = one(
            "algorithms = [\"ES256\"]\ndiscovery = true\n[auth.issuer.claims]\n\
             device_managed = \"/device/managed\"\ngroups = \"https://corp.example/claims/groups\"",
        );
        let cfg = toml::from_str::<Root>(&nested).expect("paths parse").auth;
        assert_eq!(cfg.issuers[0].claims.device_managed.claim(), "device");
        assert_eq!(
            cfg.issuers[0].claims.groups.claim(),
            "https://corp.example/claims/groups"
        );
        for (bad, want) in [
            (
                "device_managed = \"device.managed\"",
                "write \"/device/managed\"",
            ),
            ("device_os = \"/device/~9\"", "`~` must be followed"),
            ("subject = \"\"", "must name a claim"),
        ] {
            let text = one(&format!(
                "algorithms = [\"ES256\"]\ndiscovery = true\n[auth.issuer.claims]\n{bad}"
            ));
            let err = toml::from_str::<Root>(&text).expect_err(bad).to_string();
            assert!(err.contains(want) && err.contains("line"), "{bad}: {err}");
        }
    }

    #[test]
    fn unknown_fields_are_refused() {
        #[derive(Debug, Deserialize)]
        struct Root {
            #[allow(dead_code)]
            auth: AuthConfig,
        }
        let text = one("algorithms = [\"ES256\"]\ndiscovery = true\njwks_url = \"x\"");
        assert!(toml::from_str::<Root>(&text).is_err());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                "algorithms = [\"none\"]\ndiscovery = true",
                "auth.issuer[0].algorithms: \"none\" is not allowed: use RS256,",
            ),
            (
                "algorithms = [\"NoNe\"]\ndiscovery = true",
                "auth.issuer[0].algorithms: \"NoNe\" is not allowed",
            ),
            (
                "algorithms = [\"HS512\"]\ndiscovery = true",
                "auth.issuer[0].algorithms: \"HS512\" is not supported",
            ),
            (
                "algorithms = []\ndiscovery = true",
                "auth.issuer[0].algorithms: at least one",
            ),
            (
                "algorithms = [\"RS256\", \"HS256\"]\njwks_file = \"/j\"",
                "auth.issuer[0].algorithms: HS256 is only allowed with hs256_secret_file",
            ),
            (
                "algorithms = [\"RS256\"]\nhs256_secret_file = \"/s\"",
                "auth.issuer[0].algorithms: an hs256_secret_file only verifies HS256",
            ),
            (
                "algorithms = [\"RS256\"]",
                "auth.issuer[0]: exactly one key source",
            ),
            (
                "algorithms = [\"RS256\"]\ndiscovery = false",
                "auth.issuer[0]: exactly one key source",
            ),
            (
                "algorithms = [\"RS256\"]\ndiscovery = true\njwks_file = \"/j\"",
                "auth.issuer[0]: exactly one key source",
            ),
            (
                "algorithms = [\"RS256\"]\ndiscovery = true\nrefresh_secs = 1",
                "auth.issuer[0].refresh_secs: 1 is outside",
            ),
            (
                "algorithms = [\"RS256\"]\njwks_file = \"/j\"\nca_file = \"/ca.pem\"",
                "auth.issuer[0].ca_file: only used with discovery",
            ),
            (
                "algorithms = [\"RS256\"]\ndiscovery = true\ntoken_types = []",
                "auth.issuer[0].token_types: accepts no token",
            ),
        ];
        for (extra, want) in cases {
            let got = err(&parse(&one(extra)));
            assert!(
                got.starts_with(want),
                "for {extra:?}: want {want:?}, got {got:?}"
            );
        }
    }

    #[test]
    fn leeway_audience_duplicates_and_plain_http() {
        let mut cfg = parse(&one("algorithms = [\"ES256\"]\ndiscovery = true"));
        cfg.leeway_secs = 301;
        assert!(err(&cfg).starts_with("auth.leeway_secs: 301"));
        cfg.leeway_secs = 300;
        cfg.issuers[0].audiences.clear();
        assert!(err(&cfg).starts_with("auth.issuer[0].audiences:"));
        cfg.issuers[0].audiences = vec!["fw".into()];
        cfg.issuers.push(cfg.issuers[0].clone());
        assert!(
            err(&cfg)
                .starts_with("auth.issuer[1].issuer: \"https://idp.example\" is configured twice")
        );
        cfg.issuers.pop();
        cfg.issuers[0].issuer = "http://idp.example".into();
        assert!(err(&cfg).starts_with("auth.issuer[0].discovery: "));
        cfg.issuers[0].issuer = "http://127.0.0.1:8080/realm".into();
        cfg.validate().expect("plain http is fine on loopback");
    }
}
