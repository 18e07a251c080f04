//! Signing administrators in: OpenID Connect discovery, the authorization code flow with
//! PKCE, and the ID token verified by the agent's own JWT verifier (issuer, audience, algs,
//! expiry, signature) plus the nonce.

use std::{sync::Arc, time::Duration};

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use super::{ConsoleError, config::ConsoleOidc};
use crate::{
    auth::{AuthConfig, ClaimMapping, DEFAULT_TOKEN_TYPES, IssuerConfig, Verifier},
    identity::ClaimPath,
};

/// Calls to the identity provider give up after this long.
const IDP_TIMEOUT: Duration = Duration::from_secs(10);

/// What discovery says about the provider; the rest of the document is ignored.
#[derive(Debug, Deserialize)]
struct Discovery {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
}

#[derive(Debug, Deserialize)]
struct TokenAnswer {
    id_token: Option<String>,
}

/// A sign-in under way: what the browser brings back must match it.
#[derive(Debug, Clone)]
pub struct Pending {
    pub state: String,
    pub nonce: String,
    pub verifier: String,
    /// Where to go after signing in (a path on the console).
    pub next: String,
    pub created: std::time::Instant,
}

/// Who signed in, as the ID token says.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// The email if the token has one, else the subject.
    pub user: String,
    pub groups: Vec<String>,
}

pub struct Oidc {
    cfg: ConsoleOidc,
    http: ureq::Agent,
    authorization_endpoint: String,
    token_endpoint: String,
    redirect_uri: String,
    client_secret: Option<String>,
    verifier: Arc<Verifier>,
}

/// 32 random bytes, base64url: states, nonces, PKCE verifiers, cookies, CSRF tokens.
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source works");
    URL_SAFE_NO_PAD.encode(b)
}

/// The PKCE S256 challenge of a verifier (RFC 7636 4.2).
pub fn challenge(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Percent-encodes a query value: everything but RFC 3986's unreserved characters.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl Oidc {
    /// Reads the provider's discovery document and sets up ID-token verification. Blocking.
    ///
    /// # Errors
    /// The provider cannot be reached or trusted, or its document is not for this issuer.
    pub fn discover(cfg: ConsoleOidc, public_url: &str) -> Result<Self, ConsoleError> {
        let tls = crate::auth::trust::client_config(cfg.ca_file.as_deref())
            .map_err(|e| ConsoleError::Idp(format!("console.oidc.ca_file: {e}")))?;
        let http = ureq::AgentBuilder::new()
            .tls_config(tls)
            .timeout(IDP_TIMEOUT)
            .redirects(0)
            .user_agent(concat!("flowwarden-console/", env!("CARGO_PKG_VERSION")))
            .build();
        let url = format!(
            "{}/.well-known/openid-configuration",
            cfg.issuer.trim_end_matches('/')
        );
        let doc: Discovery = http
            .get(&url)
            .call()
            .map_err(|e| ConsoleError::Idp(format!("discovery at {url}: {e}")))?
            .into_json()
            .map_err(|e| ConsoleError::Idp(format!("discovery at {url}: {e}")))?;
        if doc.issuer != cfg.issuer {
            return Err(ConsoleError::Idp(format!(
                "discovery at {url} names issuer {:?}, configured {:?}: set console.oidc.issuer \
                 to the provider's exact issuer",
                doc.issuer, cfg.issuer
            )));
        }
        let client_secret = match &cfg.client_secret_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| {
                        ConsoleError::Idp(format!(
                            "console.oidc.client_secret_file {}: {e}",
                            path.display()
                        ))
                    })?
                    .trim_end()
                    .to_owned(),
            ),
            None => None,
        };
        let groups = ClaimPath::parse(&cfg.groups_claim)
            .map_err(|e| ConsoleError::Idp(format!("console.oidc.groups_claim: {e}")))?;
        let verifier = Verifier::new(&AuthConfig {
            leeway_secs: 30,
            issuers: vec![IssuerConfig {
                issuer: cfg.issuer.clone(),
                audiences: vec![cfg.client_id.clone()],
                algorithms: cfg.algorithms.clone(),
                jwks_file: None,
                discovery: Some(true),
                hs256_secret_file: None,
                ca_file: cfg.ca_file.clone(),
                token_types: DEFAULT_TOKEN_TYPES
                    .iter()
                    .map(|t| (*t).to_owned())
                    .collect(),
                refresh_secs: 3600,
                claims: ClaimMapping {
                    groups,
                    ..ClaimMapping::default()
                },
            }],
        })
        .map_err(|e| ConsoleError::Idp(format!("console.oidc: {e}")))?;
        Ok(Self {
            http,
            authorization_endpoint: doc.authorization_endpoint,
            token_endpoint: doc.token_endpoint,
            redirect_uri: format!("{public_url}/callback"),
            client_secret,
            verifier: Arc::new(verifier),
            cfg,
        })
    }

    /// A new sign-in: where to send the browser, and what to remember until it comes back.
    pub fn begin(&self, next: String) -> (String, Pending) {
        let pending = Pending {
            state: random_token(),
            nonce: random_token(),
            verifier: random_token(),
            next,
            created: std::time::Instant::now(),
        };
        let url = format!(
            "{}?response_type=code&client_id={}&redirect_uri={}&scope={}&state={}&nonce={}\
             &code_challenge={}&code_challenge_method=S256",
            self.authorization_endpoint,
            enc(&self.cfg.client_id),
            enc(&self.redirect_uri),
            enc(&self.cfg.scopes.join(" ")),
            pending.state,
            pending.nonce,
            challenge(&pending.verifier),
        );
        (url, pending)
    }

    /// Trades the code for an ID token and verifies it. Blocking.
    ///
    /// # Errors
    /// The provider refuses the code, or the ID token does not verify or has the wrong nonce.
    pub fn finish(&self, code: &str, pending: &Pending) -> Result<SignedIn, ConsoleError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.redirect_uri.as_str()),
            ("code_verifier", pending.verifier.as_str()),
            ("client_id", self.cfg.client_id.as_str()),
        ];
        if let Some(secret) = &self.client_secret {
            form.push(("client_secret", secret.as_str()));
        }
        let answer: TokenAnswer = match self.http.post(&self.token_endpoint).send_form(&form) {
            Ok(r) => r
                .into_json()
                .map_err(|e| ConsoleError::Idp(format!("token endpoint: {e}")))?,
            Err(ureq::Error::Status(code, r)) => {
                // The provider's error code and description, never the request.
                let body = r.into_string().unwrap_or_default();
                return Err(ConsoleError::Idp(format!(
                    "the token endpoint refused the code: HTTP {code} {}",
                    body.chars().take(300).collect::<String>()
                )));
            }
            Err(e) => return Err(ConsoleError::Idp(format!("token endpoint: {e}"))),
        };
        let id_token = answer
            .id_token
            .ok_or_else(|| ConsoleError::Idp("the token endpoint sent no id_token".into()))?;
        let now = crate::sessions::model::now_ms() / 1000;
        let identity = self
            .verifier
            .verify(&id_token, now)
            .map_err(|e| ConsoleError::Idp(format!("the ID token was refused: {e}")))?;
        let nonce = identity.claims.to_map().get("nonce").cloned();
        if nonce.as_ref().and_then(|n| n.as_str()) != Some(pending.nonce.as_str()) {
            return Err(ConsoleError::Idp(
                "the ID token's nonce is not this sign-in's: start again".into(),
            ));
        }
        Ok(SignedIn {
            user: identity.user().to_owned(),
            groups: identity.groups,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_challenge_is_rfc_7636s_example() {
        // RFC 7636 appendix B.
        assert_eq!(
            challenge("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let (a, b) = (random_token(), random_token());
        assert_ne!(a, b);
        assert_eq!(a.len(), 43);
    }
}
