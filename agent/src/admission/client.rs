//! The client side of admission, used by `flowwarden login`: HTTPS to the agent, trusting
//! either a CA file or a pinned SHA-256 certificate fingerprint.

use std::{path::PathBuf, sync::Arc, time::Duration};

use rustls::{
    ClientConfig, ConfigBuilder, DigitallySignedStruct, SignatureScheme, WantsVerifier,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature},
    pki_types::{CertificateDer, ServerName, UnixTime, pem::PemObject as _},
};

use super::{
    tls::fingerprint,
    wire::{AdmissionResponse, ErrorResponse, RECONNECT_PATH, RECONNECT_SCHEME, SESSIONS_PATH},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot use CA file {path}: {detail}")]
    CaFile { path: PathBuf, detail: String },
    #[error("{0:?} is not a SHA-256 fingerprint: expected 64 hex digits (colons allowed)")]
    BadFingerprint(String),
    #[error("cannot reach the agent at {agent}: {detail}")]
    Connect { agent: String, detail: String },
    #[error("the agent refused ({status} {code}): {message}")]
    Refused {
        status: u16,
        code: String,
        message: String,
    },
    #[error("the agent answered something unexpected ({status}): {detail}")]
    BadResponse { status: u16, detail: String },
    #[error("cannot set up TLS for the admission client: {0}")]
    Tls(String),
}

/// How the client decides the agent is the agent.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Verify the certificate chain and name against these CAs.
    CaFile(PathBuf),
    /// Accept exactly the certificate with this SHA-256 (the agent prints it at start).
    Fingerprint(String),
}

pub struct Client {
    agent: ureq::Agent,
    base: String,
    addr: String,
}

impl Client {
    /// # Errors
    /// The CA file is unusable or the fingerprint is malformed.
    pub fn new(agent_addr: &str, trust: &Trust) -> Result<Self, ClientError> {
        let config = match trust {
            Trust::CaFile(path) => {
                let mut roots = rustls::RootCertStore::empty();
                let certs = CertificateDer::pem_file_iter(path)
                    .and_then(|it| it.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| ClientError::CaFile {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                for c in certs {
                    roots.add(c).map_err(|e| ClientError::CaFile {
                        path: path.clone(),
                        detail: e.to_string(),
                    })?;
                }
                builder(&provider())?
                    .with_root_certificates(roots)
                    .with_no_client_auth()
            }
            Trust::Fingerprint(fp) => pinned_config(fp)?,
        };
        let agent = ureq::AgentBuilder::new()
            .tls_config(Arc::new(config))
            .timeout(Duration::from_secs(15))
            .build();
        Ok(Self {
            agent,
            base: format!("https://{agent_addr}"),
            addr: agent_addr.to_owned(),
        })
    }

    /// Presents an identity provider token; the agent admits a session for this host's
    /// address as it sees it.
    ///
    /// # Errors
    /// The agent is unreachable, refuses the token (with its reason), or answers garbage.
    pub fn login(&self, token: &str) -> Result<AdmissionResponse, ClientError> {
        self.post(SESSIONS_PATH, &format!("Bearer {token}"))
    }

    /// Presents a reconnect token minted from the session's seed.
    ///
    /// # Errors
    /// As for [`Client::login`].
    pub fn reconnect(&self, token: &str) -> Result<AdmissionResponse, ClientError> {
        self.post(RECONNECT_PATH, &format!("{RECONNECT_SCHEME} {token}"))
    }

    fn post(&self, path: &str, authorization: &str) -> Result<AdmissionResponse, ClientError> {
        let result = self
            .agent
            .post(&format!("{}{path}", self.base))
            .set("Authorization", authorization)
            .call();
        let response = match result {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => {
                let body = r.into_string().unwrap_or_default();
                return Err(match serde_json::from_str::<ErrorResponse>(&body) {
                    Ok(e) => ClientError::Refused {
                        status,
                        code: e.error,
                        message: e.message,
                    },
                    Err(_) => ClientError::BadResponse {
                        status,
                        detail: body.chars().take(200).collect(),
                    },
                });
            }
            Err(e) => {
                return Err(ClientError::Connect {
                    agent: self.addr.clone(),
                    detail: e.to_string(),
                });
            }
        };
        let status = response.status();
        let body = response
            .into_string()
            .map_err(|e| ClientError::BadResponse {
                status,
                detail: e.to_string(),
            })?;
        serde_json::from_str(&body).map_err(|e| ClientError::BadResponse {
            status,
            detail: e.to_string(),
        })
    }
}

/// Lowercase hex without separators or a `sha256:` prefix.
pub fn normalize_fingerprint(fp: &str) -> Result<String, ClientError> {
    let t = fp.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    let hex: String = t
        .chars()
        .filter(|c| *c != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    if hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit()) {
        Ok(hex)
    } else {
        Err(ClientError::BadFingerprint(fp.to_owned()))
    }
}

/// The agent's TLS settings on the client side: aws-lc-rs, the safe default versions.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn builder(
    provider: &Arc<CryptoProvider>,
) -> Result<ConfigBuilder<ClientConfig, WantsVerifier>, ClientError> {
    ClientConfig::builder_with_provider(Arc::clone(provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| ClientError::Tls(e.to_string()))
}

/// A client TLS configuration that trusts exactly the agent certificate with this SHA-256
/// fingerprint (any of the forms [`normalize_fingerprint`] accepts): what `flowwarden login
/// --fingerprint` uses, and what the tests' raw HTTPS clients use so that both trust the same.
///
/// # Errors
/// The fingerprint is malformed, or the TLS provider refuses the default versions.
pub fn pinned_config(fingerprint: &str) -> Result<ClientConfig, ClientError> {
    let provider = provider();
    let verifier = PinnedCertificate::new(fingerprint, Arc::clone(&provider))?;
    Ok(builder(&provider)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_no_client_auth())
}

/// Accepts exactly one certificate: the pin replaces chain and name checks, signatures on
/// the handshake are still verified.
#[derive(Debug)]
pub struct PinnedCertificate {
    pinned: String,
    provider: Arc<CryptoProvider>,
}

impl PinnedCertificate {
    /// # Errors
    /// The fingerprint is not 64 hex digits (colons and a `sha256:` prefix allowed).
    pub fn new(fingerprint: &str, provider: Arc<CryptoProvider>) -> Result<Self, ClientError> {
        Ok(Self {
            pinned: normalize_fingerprint(fingerprint)?,
            provider,
        })
    }
}

impl ServerCertVerifier for PinnedCertificate {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if fingerprint(end_entity) == self.pinned {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(
                "the agent's certificate does not match the pinned fingerprint".into(),
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_normalized() {
        let hex = "ab".repeat(32);
        assert_eq!(normalize_fingerprint(&hex).unwrap(), hex);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(
            normalize_fingerprint(&format!("sha256:{colons}")).unwrap(),
            hex
        );
        assert!(normalize_fingerprint("abc").is_err());
        assert!(normalize_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn a_pin_accepts_its_certificate_and_no_other() {
        let cert = |name: &str| {
            let c = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            CertificateDer::from(c.cert.der().to_vec())
        };
        let (agent, impostor) = (cert("agent.test"), cert("impostor.test"));
        let pin = PinnedCertificate::new(&fingerprint(&agent), provider()).unwrap();
        let name = ServerName::try_from("agent.test").unwrap();
        let check =
            |c: &CertificateDer<'_>| pin.verify_server_cert(c, &[], &name, &[], UnixTime::now());
        assert!(check(&agent).is_ok(), "the pinned certificate was refused");
        let refused = check(&impostor).expect_err("another certificate was accepted");
        assert!(
            refused.to_string().contains("pinned fingerprint"),
            "unexpected refusal: {refused}"
        );
        assert!(matches!(
            PinnedCertificate::new("abc", provider()),
            Err(ClientError::BadFingerprint(_))
        ));
        assert!(pinned_config(&fingerprint(&agent)).is_ok());
    }
}
