//! Fixtures shared by the fuzz targets: a fixed signing key and HS256 secret, the real
//! verifier configured to trust them, and an independent check (aws-lc directly, not the
//! agent's code) that a token the verifier accepted was really signed by one of them.

use std::{path::PathBuf, sync::OnceLock};

use aws_lc_rs::{
    hmac,
    rand::SystemRandom,
    signature::{self, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair},
};
use base64::{
    Engine,
    engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD},
};
use flowwarden::{
    auth::{AuthConfig, ClaimMapping, IssuerConfig, Verifier, dev},
    identity::Identity,
};
use serde_json::{Map, Value};

/// The verifier's clock: fixed, so that an input means the same thing on every run.
pub const NOW: u64 = 1_800_000_000;
/// The ES256 issuer (a JWKS file holding [`KEY_PKCS8_PEM`]'s public key).
pub const ES_ISSUER: &str = dev::DEV_ISSUER;
/// The HS256 issuer (a secret file holding [`HS_SECRET`]).
pub const HS_ISSUER: &str = "https://hs.fuzz.flowwarden.dev";
pub const AUDIENCE: &str = dev::DEV_AUDIENCE;
pub const LEEWAY_SECS: u64 = 30;
pub const HS_SECRET: &[u8] = b"flowwarden-fuzz-hs256-secret-0123456789";

/// A P-256 key made for the fuzz targets only; nothing trusts it outside them. Fixed rather
/// than generated per run so that the committed seed tokens stay valid.
const KEY_PKCS8_PEM: &str = "\
-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgNcQYzis4819/SF++
2GGAMqZNUal/HJe4DdvDWB3/iBWhRANCAARcC6LrdWA7qdXoBOuttG418Kg5/Dl7
fKcXeKCCUD4YJFLzdBooDL8JBBu2AWaef0yyIavl96EyTXgZVsLCWB9J
-----END PRIVATE KEY-----
";

/// Which of the fixture's keys signed a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signer {
    Es256,
    Hs256,
}

pub struct Fixture {
    pub verifier: Verifier,
    pub kid: String,
    key: EcdsaKeyPair,
    hmac: hmac::Key,
    rng: SystemRandom,
}

/// The fixture, built once per process.
pub fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(Fixture::new)
}

impl Fixture {
    fn new() -> Self {
        let der = STANDARD
            .decode(
                KEY_PKCS8_PEM
                    .lines()
                    .filter(|l| !l.starts_with("-----"))
                    .collect::<String>(),
            )
            .expect("the fixed key is base64");
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &der)
            .expect("the fixed key is a P-256 PKCS#8 key");
        let point = key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        let (x, y) = (URL_SAFE_NO_PAD.encode(x), URL_SAFE_NO_PAD.encode(y));
        let kid = "fuzz-es256".to_owned();
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": kid, "alg": "ES256", "use": "sig"
        }]});

        // Same bytes from every process, written by rename: parallel fuzzers can share them.
        let dir = std::env::temp_dir().join("flowwarden-fuzz-keys");
        std::fs::create_dir_all(&dir).expect("creating the fuzz key directory");
        let jwks_file = write_shared(&dir, "jwks.json", jwks.to_string().as_bytes());
        let secret_file = write_shared(&dir, "hs256.secret", HS_SECRET);

        let issuer = |name: &str, algorithms: &[&str]| IssuerConfig {
            issuer: name.into(),
            audiences: vec![AUDIENCE.into(), "other-audience".into()],
            algorithms: algorithms.iter().map(|a| (*a).to_owned()).collect(),
            jwks_file: None,
            discovery: None,
            hs256_secret_file: None,
            refresh_secs: 3600,
            claims: ClaimMapping::default(),
            ca_file: None,
            token_types: vec!["JWT".into(), "at+jwt".into(), String::new()],
        };
        let cfg = AuthConfig {
            leeway_secs: LEEWAY_SECS,
            issuers: vec![
                IssuerConfig {
                    // More algorithms than keys: tokens naming them must find no key.
                    jwks_file: Some(jwks_file),
                    ..issuer(ES_ISSUER, &["ES256", "ES384", "RS256", "PS256", "EdDSA"])
                },
                IssuerConfig {
                    hs256_secret_file: Some(secret_file),
                    ..issuer(HS_ISSUER, &["HS256"])
                },
            ],
        };
        let verifier = Verifier::new(&cfg).expect("the fuzz auth config is valid");
        Self {
            verifier,
            kid,
            key,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, HS_SECRET),
            rng: SystemRandom::new(),
        }
    }

    /// `header.payload.signature` over the given JSON texts (any bytes), signed by `signer`.
    pub fn sign(&self, signer: Signer, header: &[u8], payload: &[u8]) -> String {
        let signed = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(payload)
        );
        let signature = match signer {
            Signer::Es256 => self
                .key
                .sign(&self.rng, signed.as_bytes())
                .expect("ECDSA signing")
                .as_ref()
                .to_vec(),
            Signer::Hs256 => hmac::sign(&self.hmac, signed.as_bytes()).as_ref().to_vec(),
        };
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(signature))
    }

    /// Which fixture key really signed `token` (checked with aws-lc directly), if any.
    pub fn signer_of(&self, token: &str) -> Option<Signer> {
        let (signed, sig64) = token.rsplit_once('.')?;
        let signature = URL_SAFE_NO_PAD.decode(sig64).ok()?;
        let es = signature::UnparsedPublicKey::new(
            &signature::ECDSA_P256_SHA256_FIXED,
            self.key.public_key().as_ref(),
        );
        if es.verify(signed.as_bytes(), &signature).is_ok() {
            return Some(Signer::Es256);
        }
        hmac::verify(&self.hmac, signed.as_bytes(), &signature)
            .is_ok()
            .then_some(Signer::Hs256)
    }

    /// Panics unless an identity the verifier returned for `token` is deserved: the token is
    /// signed by the key of the issuer it names, with the algorithm that key is for, it is
    /// meant for [`AUDIENCE`], current at [`NOW`], and the identity is what its claims say.
    pub fn check_accepted(&self, token: &str, identity: &Identity) {
        let signer = self
            .signer_of(token)
            .unwrap_or_else(|| panic!("accepted a token no fixture key signed: {token:?}"));
        let mut parts = token.split('.');
        let (Some(h64), Some(p64), Some(_), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            panic!("accepted a token that is not three parts: {token:?}");
        };
        let header = json_object(h64).expect("accepted a token whose header is not an object");
        let claims = json_object(p64).expect("accepted a token whose payload is not an object");
        let (want_alg, want_iss) = match signer {
            Signer::Es256 => ("ES256", ES_ISSUER),
            Signer::Hs256 => ("HS256", HS_ISSUER),
        };
        assert_eq!(
            header.get("alg").and_then(Value::as_str),
            Some(want_alg),
            "accepted a token whose alg is not the signing key's: {token:?}"
        );
        assert_eq!(
            claims.get("iss").and_then(Value::as_str),
            Some(want_iss),
            "accepted a token signed by another issuer's key: {token:?}"
        );
        assert_eq!(identity.issuer, want_iss);
        assert!(
            numeric_date(&claims, "exp").is_some_and(|exp| NOW < exp.saturating_add(LEEWAY_SECS)),
            "accepted an expired token or one without exp: {token:?}"
        );
        if claims.contains_key("nbf") {
            assert!(
                numeric_date(&claims, "nbf").is_some_and(|nbf| nbf <= NOW + LEEWAY_SECS),
                "accepted a token that is not valid yet: {token:?}"
            );
        }
        let aud_ok = match claims.get("aud") {
            Some(Value::String(a)) => a == AUDIENCE || a == "other-audience",
            Some(Value::Array(a)) => a
                .iter()
                .any(|a| a.as_str() == Some(AUDIENCE) || a.as_str() == Some("other-audience")),
            _ => false,
        };
        assert!(aud_ok, "accepted a token for another audience: {token:?}");
        assert_eq!(
            claims.get("sub").and_then(Value::as_str),
            Some(identity.subject.as_str()),
            "the identity's subject is not the token's sub"
        );
        assert!(!identity.subject.is_empty(), "accepted an empty subject");
    }
}

/// RFC 7519 NumericDate, whole seconds: a non-negative number, fractions cut.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Option<u64> {
    let n = claims.get(name)?.as_number()?;
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0)
            .map(|f| f as u64)
    })
}

fn json_object(part: &str) -> Option<Map<String, Value>> {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).ok()?).ok()
}

fn write_shared(dir: &std::path::Path, name: &str, bytes: &[u8]) -> PathBuf {
    let path = dir.join(name);
    if std::fs::read(&path).is_ok_and(|old| old == bytes) {
        return path;
    }
    let tmp = dir.join(format!("{name}.{}", std::process::id()));
    std::fs::write(&tmp, bytes).expect("writing a fuzz key file");
    std::fs::rename(&tmp, &path).expect("installing a fuzz key file");
    path
}
