//! DEVELOPMENT TOOLS, NOT FOR PRODUCTION: a local ES256 signing key with its JWKS, and tokens
//! signed with it, so the agent can be tried and tested without an identity provider.
//!
//! Anyone holding `dev-signing-key.pem` can mint any identity for an agent that trusts
//! `dev-jwks.json`. Production agents trust their identity provider's keys only.

use std::{
    fs,
    io::Write,
    path::{Path, PathBuf},
};

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// The issuer the demo configuration trusts.
pub const DEV_ISSUER: &str = "https://idp.flowwarden.dev";
/// The audience the demo configuration expects.
pub const DEV_AUDIENCE: &str = "flowwarden";
pub const KEY_FILE: &str = "dev-signing-key.pem";
pub const JWKS_FILE: &str = "dev-jwks.json";

/// What [`keygen`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevKeys {
    /// PKCS#8 PEM private key, mode 0600.
    pub private_key: PathBuf,
    /// Public JWKS to point `jwks_file` at.
    pub jwks: PathBuf,
    /// The key's `kid` (its RFC 7638 thumbprint).
    pub kid: String,
}

/// The claims of a development token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevClaims {
    pub issuer: String,
    pub audience: String,
    pub subject: String,
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub device_id: Option<String>,
    pub managed: Option<bool>,
    pub compliant: Option<bool>,
    pub os: Option<String>,
    /// `exp` = now + this.
    pub lifetime_secs: u64,
    /// `nbf` = now + this, when set (negative: in the past).
    pub not_before_secs: Option<i64>,
}

impl DevClaims {
    /// A one-hour token for `subject` from the demo issuer to the demo audience.
    pub fn new(subject: &str) -> Self {
        Self {
            issuer: DEV_ISSUER.into(),
            audience: DEV_AUDIENCE.into(),
            subject: subject.into(),
            email: None,
            groups: Vec::new(),
            device_id: None,
            managed: None,
            compliant: None,
            os: None,
            lifetime_secs: 3600,
            not_before_secs: None,
        }
    }
}

/// Why a development key or token could not be made.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a PKCS#8 PEM ES256 (P-256) private key", path.display())]
    BadKey { path: PathBuf },
    #[error("{} is not a development JWKS with a kid", path.display())]
    BadJwks { path: PathBuf },
    #[error("generating a P-256 key failed")]
    Keygen,
    #[error("signing the token failed: {0}")]
    Sign(String),
}

/// Writes a new P-256 signing key and its public JWKS into `dir` (created if missing),
/// replacing earlier ones. Each file is replaced atomically, so an agent re-reading the JWKS
/// never sees half a file.
///
/// # Errors
/// A file cannot be written, or key generation fails.
pub fn keygen(dir: &Path) -> Result<DevKeys, DevError> {
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DevError::Write { path, source }
    };
    fs::create_dir_all(dir).map_err(write_err(dir))?;
    let pair =
        EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).map_err(|_| DevError::Keygen)?;
    let pkcs8 = pair.to_pkcs8v1().map_err(|_| DevError::Keygen)?;
    let point = pair.public_key().as_ref();
    // Uncompressed SEC1 point: 0x04 || x || y.
    let (x, y) = point.get(1..).ok_or(DevError::Keygen)?.split_at(32);
    let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
    // RFC 7638 thumbprint: required members in lexicographic order, no whitespace.
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let kid = URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()));

    let key_path = dir.join(KEY_FILE);
    write_atomic(
        &key_path,
        pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes(),
        0o600,
    )
    .map_err(write_err(&key_path))?;
    let jwks = json!({"keys": [{
        "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"
    }]});
    let jwks_path = dir.join(JWKS_FILE);
    let text = format!("{jwks:#}\n");
    write_atomic(&jwks_path, text.as_bytes(), 0o644).map_err(write_err(&jwks_path))?;
    Ok(DevKeys {
        private_key: key_path,
        jwks: jwks_path,
        kid,
    })
}

/// The `kid` of the (first) key in a development JWKS written by [`keygen`].
///
/// # Errors
/// The file cannot be read or has no key with a string `kid`.
pub fn kid_of(jwks_path: &Path) -> Result<String, DevError> {
    let bytes = fs::read(jwks_path).map_err(|source| DevError::Read {
        path: jwks_path.to_owned(),
        source,
    })?;
    let bad = || DevError::BadJwks {
        path: jwks_path.to_owned(),
    };
    let jwks: Value = serde_json::from_slice(&bytes).map_err(|_| bad())?;
    jwks["keys"][0]["kid"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(bad)
}

/// Signs an ES256 development token with the key at `key_pem`, valid from `now_secs`.
///
/// # Errors
/// The key cannot be read or is not a P-256 PKCS#8 key; signing fails.
pub fn token(
    key_pem: &Path,
    kid: &str,
    claims: &DevClaims,
    now_secs: u64,
) -> Result<String, DevError> {
    let pem_text = fs::read(key_pem).map_err(|source| DevError::Read {
        path: key_pem.to_owned(),
        source,
    })?;
    let key = EncodingKey::from_ec_pem(&pem_text).map_err(|_| DevError::BadKey {
        path: key_pem.to_owned(),
    })?;
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, &Value::Object(payload(claims, now_secs)), &key).map_err(|e| {
        match e.kind() {
            jsonwebtoken::errors::ErrorKind::InvalidEcdsaKey
            | jsonwebtoken::errors::ErrorKind::InvalidKeyFormat => DevError::BadKey {
                path: key_pem.to_owned(),
            },
            _ => DevError::Sign(e.to_string()),
        }
    })
}

fn payload(c: &DevClaims, now: u64) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("iss".into(), c.issuer.clone().into());
    m.insert("aud".into(), c.audience.clone().into());
    m.insert("sub".into(), c.subject.clone().into());
    m.insert("iat".into(), now.into());
    m.insert("exp".into(), now.saturating_add(c.lifetime_secs).into());
    if let Some(offset) = c.not_before_secs {
        let nbf = i64::try_from(now)
            .unwrap_or(i64::MAX)
            .saturating_add(offset)
            .max(0);
        m.insert("nbf".into(), nbf.into());
    }
    if let Some(email) = &c.email {
        m.insert("email".into(), email.clone().into());
    }
    m.insert("groups".into(), c.groups.clone().into());
    let optional = [
        ("device_id", c.device_id.clone().map(Value::from)),
        ("device_managed", c.managed.map(Value::from)),
        ("device_compliant", c.compliant.map(Value::from)),
        ("device_os", c.os.clone().map(Value::from)),
    ];
    for (name, value) in optional {
        if let Some(v) = value {
            m.insert(name.into(), v);
        }
    }
    m
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// Writes a sibling temporary file with `mode` from its creation, then renames it over `path`.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let _ = fs::remove_file(&tmp);
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::tests::fixtures::TempDir;

    #[test]
    fn keygen_writes_a_private_key_and_a_public_jwks() {
        let dir = TempDir::new("dev-keygen");
        let keys = keygen(dir.path()).expect("keygen");
        assert_eq!(keys.private_key, dir.path().join(KEY_FILE));
        let pem_text = fs::read_to_string(&keys.private_key).expect("key file");
        assert!(pem_text.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&keys.private_key)
                .expect("meta")
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let jwks: Value =
            serde_json::from_slice(&fs::read(&keys.jwks).expect("jwks")).expect("json");
        let key = &jwks["keys"][0];
        assert_eq!(key["kid"], keys.kid.as_str());
        assert_eq!(key["alg"], "ES256");
        assert_eq!(key["use"], "sig");
        assert!(
            key.get("d").is_none(),
            "the JWKS must not carry the private key"
        );

        assert_eq!(kid_of(&keys.jwks).ok(), Some(keys.kid.clone()));
        assert!(matches!(
            kid_of(&keys.private_key),
            Err(DevError::BadJwks { .. })
        ));

        // Keygen again replaces both, with a new kid.
        let again = keygen(dir.path()).expect("keygen again");
        assert_ne!(again.kid, keys.kid);
    }

    #[test]
    fn token_carries_the_claims() {
        let dir = TempDir::new("dev-token");
        let keys = keygen(dir.path()).expect("keygen");
        let mut claims = DevClaims::new("alice");
        claims.email = Some("alice@corp.example".into());
        claims.groups = vec!["ops".into()];
        claims.managed = Some(true);
        claims.not_before_secs = Some(-5);
        let t = token(&keys.private_key, &keys.kid, &claims, 1000).expect("token");
        let header = jsonwebtoken::decode_header(&t).expect("header");
        assert_eq!(header.alg, Algorithm::ES256);
        assert_eq!(header.kid.as_deref(), Some(keys.kid.as_str()));
        let body = t.split('.').nth(1).expect("payload");
        let payload: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(body).expect("b64")).expect("json");
        assert_eq!(payload["exp"], 4600);
        assert_eq!(payload["nbf"], 995);
        assert_eq!(payload["device_managed"], true);
        assert!(payload.get("device_os").is_none());

        let missing = dir.path().join("nope.pem");
        assert!(matches!(
            token(&missing, "k", &claims, 0),
            Err(DevError::Read { .. })
        ));
        assert!(matches!(
            token(&keys.jwks, "k", &claims, 0),
            Err(DevError::BadKey { .. })
        ));
    }
}
