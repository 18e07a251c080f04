//! Administrator keys: Ed25519 key pairs that sign fleet commands, and the public keys each
//! agent trusts (from `agent.toml`). NATS credentials alone never command the fleet.

use std::path::Path;

use aws_lc_rs::{
    rand::SystemRandom,
    signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey},
};
use base64::{Engine as _, engine::general_purpose::STANDARD};
use sha2::{Digest as _, Sha256};

use super::FleetError;

/// How a public key is written in `agent.toml` and printed by `fleet keygen`.
const PUBLIC_PREFIX: &str = "ed25519:";
/// The first line of a private key file, so that a wrong file is named as such.
const PRIVATE_HEADER: &str = "flowwarden fleet admin key (ed25519, pkcs8, base64)";

/// A public key an agent trusts, with its short id (the first 8 bytes of its SHA-256, hex).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminPublicKey {
    pub id: String,
    bytes: [u8; 32],
}

impl AdminPublicKey {
    /// Parses `ed25519:<base64 of the 32-byte key>`.
    ///
    /// # Errors
    /// [`FleetError::BadPublicKey`], saying what is wrong with it.
    pub fn parse(text: &str) -> Result<Self, FleetError> {
        let bad = |why: &str| FleetError::BadPublicKey {
            key: text.chars().take(80).collect(),
            why: why.to_owned(),
        };
        let b64 = text.trim().strip_prefix(PUBLIC_PREFIX).ok_or_else(|| {
            bad("it does not start with `ed25519:` (as `fleet keygen` prints it)")
        })?;
        let raw = STANDARD
            .decode(b64)
            .map_err(|e| bad(&format!("not base64: {e}")))?;
        let bytes: [u8; 32] = raw
            .try_into()
            .map_err(|v: Vec<u8>| bad(&format!("{} bytes, an Ed25519 key has 32", v.len())))?;
        Ok(Self {
            id: key_id(&bytes),
            bytes,
        })
    }

    /// Whether `signature` is this key's signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &[u8]) -> bool {
        UnparsedPublicKey::new(&ED25519, &self.bytes)
            .verify(message, signature)
            .is_ok()
    }

    /// As `agent.toml` writes it.
    pub fn encoded(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", STANDARD.encode(self.bytes))
    }
}

fn key_id(public: &[u8]) -> String {
    hex::encode(&Sha256::digest(public)[..8])
}

/// An administrator's private key, which signs commands.
pub struct AdminKey {
    pair: Ed25519KeyPair,
    pub public: AdminPublicKey,
}

impl std::fmt::Debug for AdminKey {
    // Never the private half, even in a debug print.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminKey")
            .field("id", &self.public.id)
            .finish_non_exhaustive()
    }
}

impl AdminKey {
    /// A new random key pair and the text of its private key file.
    ///
    /// # Errors
    /// The system's random source fails.
    pub fn generate() -> Result<(Self, String), FleetError> {
        let doc = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
            .map_err(|_| FleetError::KeyGeneration)?;
        let text = format!("{PRIVATE_HEADER}\n{}\n", STANDARD.encode(doc.as_ref()));
        let key = Self::from_pkcs8(doc.as_ref(), Path::new("(generated)"))?;
        Ok((key, text))
    }

    /// Reads a private key file written by `fleet keygen`.
    ///
    /// # Errors
    /// [`FleetError::Read`] or [`FleetError::BadPrivateKey`].
    pub fn load(path: &Path) -> Result<Self, FleetError> {
        let text = std::fs::read_to_string(path).map_err(|source| FleetError::Read {
            what: "the admin key",
            path: path.to_owned(),
            source,
        })?;
        let bad = |why: String| FleetError::BadPrivateKey {
            path: path.to_owned(),
            why,
        };
        let mut lines = text.lines();
        if lines.next() != Some(PRIVATE_HEADER) {
            return Err(bad(format!(
                "its first line is not `{PRIVATE_HEADER}`; make one with `flowwarden fleet keygen`"
            )));
        }
        let der = STANDARD
            .decode(lines.next().unwrap_or_default().trim())
            .map_err(|e| bad(format!("the key is not base64: {e}")))?;
        Self::from_pkcs8(&der, path)
    }

    fn from_pkcs8(der: &[u8], path: &Path) -> Result<Self, FleetError> {
        let pair = Ed25519KeyPair::from_pkcs8(der).map_err(|e| FleetError::BadPrivateKey {
            path: path.to_owned(),
            why: format!("not an Ed25519 PKCS#8 key: {e}"),
        })?;
        let bytes: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| FleetError::KeyGeneration)?;
        let public = AdminPublicKey {
            id: key_id(&bytes),
            bytes,
        };
        Ok(Self { pair, public })
    }

    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        self.pair.sign(message).as_ref().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_with_its_public_key_only() {
        let (key, text) = AdminKey::generate().unwrap();
        let dir = std::env::temp_dir().join(format!("fw-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("admin.key");
        std::fs::write(&path, text).unwrap();
        let loaded = AdminKey::load(&path).unwrap();
        assert_eq!(loaded.public, key.public);
        let public = AdminPublicKey::parse(&key.public.encoded()).unwrap();
        let sig = loaded.sign(b"terminate alice");
        assert!(public.verifies(b"terminate alice", &sig));
        assert!(!public.verifies(b"terminate bob", &sig));
        let (other, _) = AdminKey::generate().unwrap();
        assert!(!other.public.verifies(b"terminate alice", &sig));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn bad_public_keys_say_why() {
        for (text, why) in [
            ("rsa:AAAA", "ed25519:"),
            ("ed25519:!!", "base64"),
            ("ed25519:AAAA", "32"),
        ] {
            let e = AdminPublicKey::parse(text).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
    }
}
