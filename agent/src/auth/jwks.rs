//! Key sets: a JWKS document (or an HS256 secret) parsed once into ready-to-verify keys, and
//! the lookup of the key a token names by `kid`.

use aws_lc_rs::{
    hmac,
    signature::{self, ParsedPublicKey, RsaParameters, RsaPublicKeyComponents},
};
use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;

use super::alg::{Alg, Family};

/// RSA keys below this size are refused (RFC 7518 3.3 requires 2048 bits).
const MIN_RSA_BITS: usize = 2048;
/// More keys than this in one set is not a key set anyone publishes.
const MAX_KEYS: usize = 256;

/// The keys of one issuer, pre-parsed: verifying a token parses no key material.
pub(crate) struct KeySet {
    keys: Vec<VerifyKey>,
    /// An HS256 secret is the issuer's only key: a `kid` in the token is not consulted.
    single_secret: bool,
    /// Whether this set came from a successful load (a discovery issuer starts with none).
    pub(crate) loaded: bool,
}

struct VerifyKey {
    kid: Option<String>,
    /// One checker per algorithm this key may verify for its issuer.
    checkers: Vec<(Alg, Checker)>,
}

enum Checker {
    Public(ParsedPublicKey),
    /// Boxed: an HMAC key holds precomputed hash states, over a kilobyte.
    Hmac(Box<hmac::Key>),
}

/// What the set says about a token's signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyOutcome {
    Verified,
    BadSignature,
    /// No key in the set fits this `kid` and algorithm.
    NoKey,
}

/// A JWKS document. Members other than `keys` are allowed: JWKS is an open format (RFC 7517),
/// and nothing here is trusted beyond the key material itself.
#[derive(Deserialize)]
struct JwksDocument {
    keys: Vec<serde_json::Value>,
}

/// One JWK, as far as it matters for verification; other members (`x5c`, `x5t`, ...) are
/// ignored rather than refused, as every identity provider publishes some.
#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    key_ops: Option<Vec<String>>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

impl KeySet {
    /// The set of an issuer whose keys were never loaded yet.
    pub(crate) fn empty() -> Self {
        Self {
            keys: Vec::new(),
            single_secret: false,
            loaded: false,
        }
    }

    pub(crate) fn from_secret(secret: &[u8]) -> Self {
        Self {
            keys: vec![VerifyKey {
                kid: None,
                checkers: vec![(
                    Alg::Hs256,
                    Checker::Hmac(Box::new(hmac::Key::new(hmac::HMAC_SHA256, secret))),
                )],
            }],
            single_secret: true,
            loaded: true,
        }
    }

    /// Parses a JWKS document, keeping the keys usable with `algs` and skipping the others.
    ///
    /// # Errors
    /// When the document is not a JWKS or holds no usable key: the reason, for the operator.
    pub(crate) fn from_jwks(bytes: &[u8], algs: &[Alg]) -> Result<Self, String> {
        let doc: JwksDocument =
            serde_json::from_slice(bytes).map_err(|e| format!("not a JWKS document: {e}"))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(format!("{} keys is more than {MAX_KEYS}", doc.keys.len()));
        }
        let mut keys = Vec::with_capacity(doc.keys.len());
        for (i, value) in doc.keys.iter().enumerate() {
            match parse_key(value, algs) {
                Ok(key) => keys.push(key),
                Err(why) => tracing::debug!(key = i, %why, "skipping a JWKS key"),
            }
        }
        if keys.is_empty() {
            return Err(format!(
                "none of its {} keys can verify {}",
                doc.keys.len(),
                algs.iter().map(|a| a.name()).collect::<Vec<_>>().join(", ")
            ));
        }
        Ok(Self {
            keys,
            single_secret: false,
            loaded: true,
        })
    }

    pub(crate) fn len(&self) -> usize {
        self.keys.len()
    }

    /// The kid of each key, `-` for a key without one.
    pub(crate) fn kids(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| k.kid.clone().unwrap_or_else(|| "-".into()))
            .collect()
    }

    /// Checks `signature` over `message` with the key the token names. A `kid` is only ever
    /// compared with the set's own kids. Without a `kid`, the set's only key for `alg` is used;
    /// with several candidates none is guessed.
    pub(crate) fn verify(
        &self,
        kid: Option<&str>,
        alg: Alg,
        message: &[u8],
        signature: &[u8],
    ) -> KeyOutcome {
        let fits = |k: &&VerifyKey| k.checker(alg).is_some();
        let mut candidates = self.keys.iter().filter(fits).peekable();
        if candidates.peek().is_none() {
            return KeyOutcome::NoKey;
        }
        if self.single_secret {
            return outcome(candidates.any(|k| k.check(alg, message, signature)));
        }
        match kid {
            Some(kid) => {
                let mut named = candidates
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .peekable();
                if named.peek().is_none() {
                    return KeyOutcome::NoKey;
                }
                outcome(named.any(|k| k.check(alg, message, signature)))
            }
            None => {
                let Some(only) = candidates.next() else {
                    return KeyOutcome::NoKey;
                };
                if candidates.next().is_some() {
                    return KeyOutcome::NoKey;
                }
                outcome(only.check(alg, message, signature))
            }
        }
    }
}

fn outcome(verified: bool) -> KeyOutcome {
    if verified {
        KeyOutcome::Verified
    } else {
        KeyOutcome::BadSignature
    }
}

impl VerifyKey {
    fn checker(&self, alg: Alg) -> Option<&Checker> {
        self.checkers
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, c)| c)
    }

    fn check(&self, alg: Alg, message: &[u8], sig: &[u8]) -> bool {
        match self.checker(alg) {
            Some(Checker::Public(key)) => key.verify_sig(message, sig).is_ok(),
            // Constant-time comparison of the tag.
            Some(Checker::Hmac(key)) => hmac::verify(key, message, sig).is_ok(),
            None => false,
        }
    }
}

fn parse_key(value: &serde_json::Value, algs: &[Alg]) -> Result<VerifyKey, String> {
    let jwk = RawJwk::deserialize(value).map_err(|e| format!("not a JWK: {e}"))?;
    if jwk.use_.as_deref().is_some_and(|u| u != "sig") {
        return Err("not a signature key (use)".into());
    }
    if let Some(ops) = &jwk.key_ops
        && !ops.iter().any(|op| op == "verify")
    {
        return Err("not a verification key (key_ops)".into());
    }
    // A key pinned to one algorithm verifies only that one.
    let pinned = match jwk.alg.as_deref() {
        Some(name) => Some(Alg::from_name(name).ok_or(format!("unsupported alg {name:?}"))?),
        None => None,
    };
    let family = match (jwk.kty.as_str(), jwk.crv.as_deref()) {
        ("RSA", _) => Family::Rsa,
        ("EC", Some("P-256")) => Family::EcP256,
        ("EC", Some("P-384")) => Family::EcP384,
        ("OKP", Some("Ed25519")) => Family::Ed25519,
        // Symmetric keys are never taken from a JWKS: that is how algorithm confusion starts.
        (kty, crv) => return Err(format!("unsupported key type {kty:?} / curve {crv:?}")),
    };
    let wanted: Vec<Alg> = algs
        .iter()
        .copied()
        .filter(|a| a.family() == family && pinned.is_none_or(|p| p == *a))
        .collect();
    if wanted.is_empty() {
        return Err("no allowed algorithm uses this key".into());
    }
    let mut checkers = Vec::with_capacity(wanted.len());
    match family {
        Family::Rsa => {
            let n = strip_zeros(component(&jwk.n, "n")?);
            let e = strip_zeros(component(&jwk.e, "e")?);
            if bit_len(&n) < MIN_RSA_BITS || e.is_empty() {
                return Err(format!("RSA key smaller than {MIN_RSA_BITS} bits"));
            }
            let parts = RsaPublicKeyComponents { n: &n, e: &e };
            for alg in wanted {
                let key = parts
                    .to_parsed_public_key(rsa_params(alg))
                    .map_err(|e| format!("bad RSA key: {e}"))?;
                checkers.push((alg, Checker::Public(key)));
            }
        }
        Family::EcP256 | Family::EcP384 => {
            let (len, params, alg) = if family == Family::EcP256 {
                (32, &signature::ECDSA_P256_SHA256_FIXED, Alg::Es256)
            } else {
                (48, &signature::ECDSA_P384_SHA384_FIXED, Alg::Es384)
            };
            let x = component(&jwk.x, "x")?;
            let y = component(&jwk.y, "y")?;
            if x.len() != len || y.len() != len {
                return Err("EC coordinates of the wrong length".into());
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            let key =
                ParsedPublicKey::new(params, &point).map_err(|e| format!("bad EC key: {e}"))?;
            checkers.push((alg, Checker::Public(key)));
        }
        Family::Ed25519 => {
            let x = component(&jwk.x, "x")?;
            let key = ParsedPublicKey::new(&signature::ED25519, &x)
                .map_err(|e| format!("bad Ed25519 key: {e}"))?;
            checkers.push((Alg::EdDsa, Checker::Public(key)));
        }
        Family::Hmac => return Err("symmetric key".into()),
    }
    Ok(VerifyKey {
        kid: jwk.kid,
        checkers,
    })
}

fn rsa_params(alg: Alg) -> &'static RsaParameters {
    match alg {
        Alg::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
        Alg::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
        Alg::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
        Alg::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
        Alg::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
        _ => &signature::RSA_PKCS1_2048_8192_SHA256,
    }
}

/// A base64url key member; padding is tolerated since some providers emit it.
fn component(value: &Option<String>, name: &str) -> Result<Vec<u8>, String> {
    let text = value.as_deref().ok_or(format!("missing {name}"))?;
    URL_SAFE_NO_PAD
        .decode(text.trim_end_matches('='))
        .map_err(|_| format!("{name} is not base64url"))
}

/// Big-endian integers in JWKs may carry leading zero octets; aws-lc wants none.
fn strip_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

fn bit_len(be: &[u8]) -> usize {
    match be.first() {
        Some(first) => be.len() * 8 - first.leading_zeros() as usize,
        None => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_unusable_sets_are_refused() {
        let algs = [Alg::Es256, Alg::Rs256];
        for bad in [&b"garbage"[..], b"{}", b"{\"keys\": 5}", b"[]"] {
            assert!(KeySet::from_jwks(bad, &algs).is_err());
        }
        let only_unusable = br#"{"keys": [
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"},
            {"kty": "RSA", "n": "AQAB", "e": "AQAB"},
            {"kty": "RSA", "use": "enc"},
            7
        ]}"#;
        let err = KeySet::from_jwks(only_unusable, &algs).err();
        assert!(err.is_some_and(|e| e.contains("none of its 6 keys")));
    }

    #[test]
    fn bit_lengths() {
        assert_eq!(bit_len(&[0x01, 0x00]), 9);
        assert_eq!(bit_len(&[0x80]), 8);
        assert_eq!(bit_len(&[]), 0);
        assert_eq!(strip_zeros(vec![0, 0, 5, 0]), vec![5, 0]);
    }
}
