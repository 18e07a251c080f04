//! DEVELOPMENT TOOLS, NOT FOR PRODUCTION: a stand-in Shared Signals transmitter's signing key
//! (RS256, or the ES256 key of `dev keygen`) and SETs signed with it, for demos, tests and
//! benchmarks, as `auth::dev` stands in for an identity provider.

use std::{
    fs,
    path::{Path, PathBuf},
};

use aws_lc_rs::{
    rand::SystemRandom,
    rsa::{KeySize, PublicKeyComponents},
    signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _, RSA_PKCS1_SHA256, RsaKeyPair,
    },
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use rustls_pki_types::{PrivatePkcs8KeyDer, pem::PemObject as _};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

use super::events::REQUESTED;

/// The issuer of development SETs.
pub const DEV_TRANSMITTER: &str = "https://ssf.flowwarden.dev";
/// The RS256 key `dev ssf keygen` writes, and its public JWKS.
pub const SSF_KEY_FILE: &str = "ssf-signing-key.pem";
pub const SSF_JWKS_FILE: &str = "ssf-jwks.json";

/// Why a development SET could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevSsfError {
    #[error("{}: {detail}", path.display())]
    File { path: PathBuf, detail: String },
    #[error("key generation or signing failed")]
    Crypto,
    #[error("{0}")]
    Event(String),
}

fn file_err(path: &Path) -> impl Fn(std::io::Error) -> DevSsfError + '_ {
    move |e| DevSsfError::File {
        path: path.to_owned(),
        detail: e.to_string(),
    }
}

enum Key {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

/// A transmitter's signing key and its `kid`.
pub struct SigningKey {
    key: Key,
    pub kid: String,
}

impl SigningKey {
    /// `RS256` or `ES256`.
    pub fn alg(&self) -> &'static str {
        match self.key {
            Key::Rsa(_) => "RS256",
            Key::Ec(_) => "ES256",
        }
    }

    /// Loads a PKCS#8 PEM key (RSA or P-256) and the `kid` of the first key of `jwks`.
    ///
    /// # Errors
    /// A file cannot be read, or holds no usable key.
    pub fn load(key_pem: &Path, jwks: &Path) -> Result<Self, DevSsfError> {
        let der = PrivatePkcs8KeyDer::from_pem_file(key_pem).map_err(|e| DevSsfError::File {
            path: key_pem.to_owned(),
            detail: e.to_string(),
        })?;
        let key = match RsaKeyPair::from_pkcs8(der.secret_pkcs8_der()) {
            Ok(k) => Key::Rsa(k),
            Err(_) => Key::Ec(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_pkcs8_der())
                    .map_err(|_| DevSsfError::File {
                        path: key_pem.to_owned(),
                        detail: "not an RSA or P-256 PKCS#8 key".into(),
                    })?,
            ),
        };
        let text = fs::read(jwks).map_err(file_err(jwks))?;
        let doc: Value = serde_json::from_slice(&text).map_err(|e| DevSsfError::File {
            path: jwks.to_owned(),
            detail: e.to_string(),
        })?;
        let kid = doc["keys"][0]["kid"]
            .as_str()
            .ok_or_else(|| DevSsfError::File {
                path: jwks.to_owned(),
                detail: "no key with a kid".into(),
            })?
            .to_owned();
        Ok(Self { key, kid })
    }

    /// The key in a directory: `dev ssf keygen`'s RS256 key if there, else `dev keygen`'s
    /// ES256 key.
    ///
    /// # Errors
    /// As [`SigningKey::load`].
    pub fn from_dir(dir: &Path) -> Result<Self, DevSsfError> {
        if dir.join(SSF_KEY_FILE).exists() {
            Self::load(&dir.join(SSF_KEY_FILE), &dir.join(SSF_JWKS_FILE))
        } else {
            Self::load(
                &dir.join(crate::auth::dev::KEY_FILE),
                &dir.join(crate::auth::dev::JWKS_FILE),
            )
        }
    }

    /// Signs `header.payload` as given (any header, any payload: hostile SETs too).
    ///
    /// # Errors
    /// Signing fails.
    pub fn sign_raw(&self, header: &Value, payload: &Value) -> Result<String, DevSsfError> {
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let rng = SystemRandom::new();
        let sig = match &self.key {
            Key::Rsa(k) => {
                let mut sig = vec![0; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, signing_input.as_bytes(), &mut sig)
                    .map_err(|_| DevSsfError::Crypto)?;
                sig
            }
            Key::Ec(k) => k
                .sign(&rng, signing_input.as_bytes())
                .map_err(|_| DevSsfError::Crypto)?
                .as_ref()
                .to_vec(),
        };
        Ok(format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig)))
    }

    /// The standard SET header: this key's `alg` and `kid`, `typ` `secevent+jwt`.
    pub fn header(&self) -> Value {
        json!({"alg": self.alg(), "kid": self.kid, "typ": "secevent+jwt"})
    }

    /// Signs a well-formed SET.
    ///
    /// # Errors
    /// Signing fails.
    pub fn sign(&self, set: &DevSet, now_secs: u64) -> Result<String, DevSsfError> {
        self.sign_raw(&self.header(), &set.payload(now_secs))
    }
}

/// Writes a new RSA-2048 signing key and its public JWKS into `dir`; returns the key file,
/// the JWKS file and the `kid`.
///
/// # Errors
/// A file cannot be written, or key generation fails.
pub fn keygen(dir: &Path) -> Result<(PathBuf, PathBuf, String), DevSsfError> {
    fs::create_dir_all(dir).map_err(file_err(dir))?;
    let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| DevSsfError::Crypto)?;
    let pkcs8 = aws_lc_rs::encoding::AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair)
        .map_err(|_| DevSsfError::Crypto)?;
    let parts = PublicKeyComponents::<Vec<u8>>::from(pair.public_key());
    let (n, e) = (
        URL_SAFE_NO_PAD.encode(&parts.n),
        URL_SAFE_NO_PAD.encode(&parts.e),
    );
    // RFC 7638 thumbprint: required members in lexicographic order.
    let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(
        format!(r#"{{"e":"{e}","kty":"RSA","n":"{n}"}}"#).as_bytes(),
    ));
    let key_path = dir.join(SSF_KEY_FILE);
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in STANDARD.encode(pkcs8.as_ref()).as_bytes().chunks(64) {
        pem.push_str(&String::from_utf8_lossy(line));
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    write_private(&key_path, pem.as_bytes())?;
    let jwks =
        json!({"keys": [{"kty": "RSA", "n": n, "e": e, "kid": kid, "alg": "RS256", "use": "sig"}]});
    let jwks_path = dir.join(SSF_JWKS_FILE);
    fs::write(&jwks_path, format!("{jwks:#}\n")).map_err(file_err(&jwks_path))?;
    Ok((key_path, jwks_path, kid))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), DevSsfError> {
    use std::{io::Write as _, os::unix::fs::OpenOptionsExt as _};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    f.write_all(bytes).map_err(file_err(path))
}

/// A development SET: one event about one subject.
#[derive(Debug, Clone)]
pub struct DevSet {
    pub issuer: String,
    pub audience: String,
    /// A short name (`session-revoked`) or a full event type URI.
    pub event_type: String,
    /// The subject identifier (`sub_id`), if any.
    pub subject: Option<Value>,
    /// Members of the event's payload (`current_status`, `claims`, …).
    pub event: Map<String, Value>,
    /// Random when `None`.
    pub jti: Option<String>,
}

impl DevSet {
    /// An event about `subject` from the development transmitter to audience `flowwarden`.
    pub fn new(event_type: &str, subject: Option<Value>) -> Self {
        Self {
            issuer: DEV_TRANSMITTER.into(),
            audience: crate::auth::dev::DEV_AUDIENCE.into(),
            event_type: event_type.into(),
            subject,
            event: Map::new(),
            jti: None,
        }
    }

    /// The full event type URI.
    pub fn event_uri(&self) -> String {
        if self.event_type.contains("://") {
            return self.event_type.clone();
        }
        REQUESTED
            .iter()
            .find(|uri| uri.ends_with(&format!("/{}", self.event_type)))
            .map_or_else(
                || {
                    format!(
                        "https://schemas.openid.net/secevent/caep/event-type/{}",
                        self.event_type
                    )
                },
                |u| (*u).to_owned(),
            )
    }

    /// The SET's claims as of `now_secs`.
    pub fn payload(&self, now_secs: u64) -> Value {
        let jti = self.jti.clone().unwrap_or_else(random_jti);
        let mut event = self.event.clone();
        event
            .entry("event_timestamp")
            .or_insert_with(|| Value::from(now_secs));
        let mut p = json!({
            "iss": self.issuer,
            "aud": self.audience,
            "jti": jti,
            "iat": now_secs,
            "events": {self.event_uri(): event},
        });
        if let Some(s) = &self.subject {
            p["sub_id"] = s.clone();
        }
        p
    }
}

/// A transmitter's push connection to one agent: one TLS connection kept alive across
/// pushes (certificate pinned by fingerprint), as a transmitter streaming SETs keeps one.
pub struct Pusher {
    http: ureq::Agent,
    url: String,
    agent: String,
}

impl Pusher {
    /// A pusher to the agent's push endpoint at `host:port`, trusting exactly the certificate
    /// with `fingerprint`. Nothing is connected until the first push.
    ///
    /// # Errors
    /// The fingerprint is malformed.
    pub fn new(agent: &str, fingerprint: &str) -> Result<Self, DevSsfError> {
        let tls = crate::admission::client::pinned_config(fingerprint)
            .map_err(|e| DevSsfError::Event(e.to_string()))?;
        let http = ureq::AgentBuilder::new()
            .tls_config(std::sync::Arc::new(tls))
            .timeout(std::time::Duration::from_secs(15))
            .build();
        Ok(Self {
            http,
            url: format!("https://{agent}{}", super::PUSH_PATH),
            agent: agent.to_owned(),
        })
    }

    /// POSTs `body` with this `Authorization` value (none when empty) and `Content-Type`;
    /// answers the HTTP status and body.
    ///
    /// # Errors
    /// The agent cannot be reached.
    pub fn push(
        &self,
        authorization: &str,
        content_type: &str,
        body: &[u8],
    ) -> Result<(u16, String), DevSsfError> {
        let mut call = self.http.post(&self.url).set("Content-Type", content_type);
        if !authorization.is_empty() {
            call = call.set("Authorization", authorization);
        }
        match call.send_bytes(body) {
            Ok(r) => Ok((r.status(), r.into_string().unwrap_or_default())),
            Err(ureq::Error::Status(code, r)) => Ok((code, r.into_string().unwrap_or_default())),
            Err(e) => Err(DevSsfError::Event(format!(
                "cannot reach the agent at {}: {e}",
                self.agent
            ))),
        }
    }
}

/// POSTs `body` to an agent's push endpoint (`host:port`, certificate pinned by
/// `fingerprint`) with this `Authorization` value (none when empty) and `Content-Type`, on a
/// connection of its own; answers the HTTP status and body.
///
/// # Errors
/// The agent cannot be reached, or the fingerprint is malformed.
pub fn push(
    agent: &str,
    fingerprint: &str,
    authorization: &str,
    content_type: &str,
    body: &[u8],
) -> Result<(u16, String), DevSsfError> {
    Pusher::new(agent, fingerprint)?.push(authorization, content_type, body)
}

/// SHA-256 of `bytes` (for tests that build hostile SETs by hand).
pub fn sha256(bytes: &[u8]) -> Vec<u8> {
    Sha256::digest(bytes).to_vec()
}

/// 16 random bytes, hex.
pub fn random_jti() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the OS random source works");
    hex::encode(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_become_uris() {
        let set = DevSet::new("account-disabled", None);
        assert_eq!(
            set.event_uri(),
            "https://schemas.openid.net/secevent/risc/event-type/account-disabled"
        );
        let p = DevSet::new(
            "session-revoked",
            Some(json!({"format": "email", "email": "a@b"})),
        )
        .payload(100);
        assert_eq!(p["iat"], 100);
        assert_eq!(p["sub_id"]["email"], "a@b");
        assert!(p.get("sub").is_none());
    }
}
