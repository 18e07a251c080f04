//! Test fixtures: temporary directories, signing keys of every family, token crafting and
//! issuer configs.

use std::{
    path::{Path, PathBuf},
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
};

use aws_lc_rs::{
    hmac,
    rand::SystemRandom,
    rsa::KeySize,
    signature::{
        self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaEncoding,
        RsaKeyPair, RsaPublicKeyComponents,
    },
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use serde_json::{Value, json};

use crate::{
    auth::{
        AuthConfig, ClaimMapping, IssuerConfig, Rejection,
        dev::{self, DEV_AUDIENCE, DEV_ISSUER, DevKeys},
    },
    identity::Identity,
};

/// The fixed "now" of the verification tests.
pub(crate) const NOW: u64 = 1_700_000_000;

/// A directory under the system temp dir, removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let path = std::env::temp_dir().join(format!(
            "fw-auth-{label}-{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create a temp dir");
        Self(path)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A key that signs test tokens.
pub(crate) enum Key {
    Ec(EcdsaKeyPair),
    Rsa(&'static RsaKeyPair),
    Ed(Ed25519KeyPair),
    Secret(Vec<u8>),
}

impl Key {
    fn sign(&self, alg: &str, msg: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Key::Ec(pair) => pair.sign(&rng, msg).expect("ecdsa sign").as_ref().to_vec(),
            Key::Rsa(pair) => {
                let padding: &'static dyn RsaEncoding = match alg {
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    "PS512" => &signature::RSA_PSS_SHA512,
                    _ => &signature::RSA_PKCS1_SHA256,
                };
                let mut sig = vec![0; pair.public_modulus_len()];
                pair.sign(padding, &rng, msg, &mut sig).expect("rsa sign");
                sig
            }
            Key::Ed(pair) => pair.sign(msg).as_ref().to_vec(),
            Key::Secret(s) => hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, s), msg)
                .as_ref()
                .to_vec(),
        }
    }
}

/// A compact JWS over exactly these header and payload JSON values.
pub(crate) fn craft(header: &Value, payload: &Value, key: &Key) -> String {
    let msg = format!("{}.{}", b64(header.to_string()), b64(payload.to_string()));
    let sig = key.sign(header["alg"].as_str().unwrap_or_default(), msg.as_bytes());
    format!("{msg}.{}", b64(sig))
}

/// A compact JWS over exactly these header and payload bytes, which need not be JSON at all.
pub(crate) fn craft_bytes(alg: &str, header: &[u8], payload: &[u8], key: &Key) -> String {
    let msg = format!("{}.{}", b64(header), b64(payload));
    format!("{msg}.{}", b64(key.sign(alg, msg.as_bytes())))
}

/// Claims that pass every check at [`NOW`] for the dev issuer.
pub(crate) fn claims() -> Value {
    json!({
        "iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "sub": "alice",
        "iat": NOW, "exp": NOW + 600,
    })
}

/// One RSA-2048 key for the whole test run: generating one takes a moment.
pub(crate) fn rsa_key() -> &'static RsaKeyPair {
    static KEY: OnceLock<RsaKeyPair> = OnceLock::new();
    KEY.get_or_init(|| RsaKeyPair::generate(KeySize::Rsa2048).expect("rsa keygen"))
}

pub(crate) fn rsa_jwk(kid: &str) -> Value {
    let parts = RsaPublicKeyComponents::<Vec<u8>>::from(rsa_key().public_key());
    json!({"kty": "RSA", "kid": kid, "use": "sig", "n": b64(&parts.n), "e": b64(&parts.e)})
}

/// The RSA public key as the bytes an attacker would try as an HMAC secret: PKCS#1 DER and PEM.
pub(crate) fn rsa_public_bytes() -> [Vec<u8>; 2] {
    let der = rsa_key().public_key().as_ref().to_vec();
    let pem = format!(
        "-----BEGIN RSA PUBLIC KEY-----\n{}\n-----END RSA PUBLIC KEY-----\n",
        STANDARD.encode(&der)
    );
    [der, pem.into_bytes()]
}

pub(crate) fn new_ec_key() -> EcdsaKeyPair {
    EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("ec keygen")
}

pub(crate) fn ec_jwk(pair: &EcdsaKeyPair, kid: &str) -> Value {
    let point = pair.public_key().as_ref();
    json!({"kty": "EC", "crv": "P-256", "kid": kid,
        "x": b64(&point[1..33]), "y": b64(&point[33..65])})
}

pub(crate) fn new_ed_key() -> Ed25519KeyPair {
    Ed25519KeyPair::generate().expect("ed25519 keygen")
}

pub(crate) fn ed_jwk(pair: &Ed25519KeyPair, kid: &str) -> Value {
    json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(pair.public_key().as_ref())})
}

/// Replaces a file atomically, as operators are told to, so a reader never sees half of it.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename over");
}

pub(crate) fn write_jwks(path: &Path, keys: &[Value]) {
    write_file(path, json!({ "keys": keys }).to_string().as_bytes());
}

pub(crate) fn issuer(issuer: &str, algorithms: &[&str]) -> IssuerConfig {
    IssuerConfig {
        issuer: issuer.into(),
        audiences: vec![DEV_AUDIENCE.into()],
        algorithms: algorithms.iter().map(|a| a.to_string()).collect(),
        jwks_file: None,
        discovery: None,
        hs256_secret_file: None,
        ca_file: None,
        token_types: crate::auth::DEFAULT_TOKEN_TYPES
            .iter()
            .map(|t| (*t).to_owned())
            .collect(),
        refresh_secs: 3600,
        claims: ClaimMapping::default(),
    }
}

pub(crate) fn config(issuers: Vec<IssuerConfig>) -> AuthConfig {
    AuthConfig {
        leeway_secs: 30,
        issuers,
    }
}

/// `"ok"` or the rejection's code, for one-line assertions.
pub(crate) fn code(r: &Result<Identity, Rejection>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code(),
    }
}

/// A development key made by `dev::keygen`, with its signing pair loaded for crafting.
pub(crate) struct DevIssuer {
    pub(crate) dir: TempDir,
    pub(crate) keys: DevKeys,
}

impl DevIssuer {
    pub(crate) fn new(label: &str) -> Self {
        let dir = TempDir::new(label);
        let keys = dev::keygen(dir.path()).expect("dev keygen");
        Self { dir, keys }
    }

    /// The dev signing key, as a crafting key.
    pub(crate) fn key(&self) -> Key {
        let pem = std::fs::read_to_string(&self.keys.private_key).expect("read dev key");
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = STANDARD.decode(body).expect("pem base64");
        Key::Ec(EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der).expect("pkcs8"))
    }

    /// The dev key's public JWK, as `keygen` wrote it.
    pub(crate) fn jwk(&self) -> Value {
        let text = std::fs::read(&self.keys.jwks).expect("read dev jwks");
        let jwks: Value = serde_json::from_slice(&text).expect("dev jwks json");
        jwks["keys"][0].clone()
    }

    /// The dev issuer trusting the dev JWKS file.
    pub(crate) fn issuer(&self, algorithms: &[&str]) -> IssuerConfig {
        let mut cfg = issuer(DEV_ISSUER, algorithms);
        cfg.jwks_file = Some(self.keys.jwks.clone());
        cfg
    }

    pub(crate) fn header(&self) -> Value {
        json!({"alg": "ES256", "typ": "JWT", "kid": self.keys.kid})
    }
}
