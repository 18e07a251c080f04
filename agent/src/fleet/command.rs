//! Fleet commands on the wire: an envelope (command id, issue time, issuer key, target, and
//! the same typed control call the status socket takes, or a policy bundle) signed with an
//! administrator's Ed25519 key, and its verification on each agent.

use std::collections::BTreeMap;

use base64::{Engine as _, engine::general_purpose::STANDARD};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::keys::{AdminKey, AdminPublicKey};
use crate::api::{jsonrpc::Call, methods::Request, peer::Access};

/// Commands issued further than this in the future (by the issuer's clock) are refused: a
/// clock that far off is a mistake or a forgery, and a command from the future would sort
/// before everything issued meanwhile.
pub const MAX_CLOCK_AHEAD_MS: u64 = 5 * 60 * 1000;

/// Which hosts a command is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Target {
    All,
    Host(String),
}

/// What a command does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// A status-socket call (an admin method), applied by the agent's own core.
    Call { method: String, params: Value },
    /// A policy bundle to validate and put in force.
    Policy(PolicyBundle),
}

/// A versioned policy directory: file name → TOML text.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyBundle {
    pub version: u64,
    pub files: BTreeMap<String, String>,
}

/// What the administrator signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope {
    /// Unique per command; agents apply each id once.
    pub id: String,
    pub issued_at_ms: u64,
    /// The id of the signing key.
    pub key: String,
    pub target: Target,
    pub action: Action,
}

/// The message on the control stream: the envelope's exact bytes and their signature, so
/// that no re-encoding stands between what was signed and what is checked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Signed {
    pub key: String,
    /// Base64 of the envelope's JSON.
    pub envelope: String,
    /// Base64 of the Ed25519 signature of those bytes.
    pub signature: String,
}

/// Why an agent refused a command: the `reason` of its `fleet_command_refused` audit event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("malformed: {0}")]
    Malformed(String),
    #[error("signed by key {0}, which this agent does not trust")]
    UnknownKey(String),
    #[error("the signature does not verify with key {0}")]
    BadSignature(String),
    #[error("issued {ahead_ms} ms in the future by the issuer's clock")]
    FromTheFuture { ahead_ms: u64 },
    #[error("command {0} was applied already: a replay")]
    Replayed(String),
    #[error("{0} is not a control method the fleet may call")]
    NotACommand(String),
}

impl Refusal {
    /// The reason code the audit event carries.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed",
            Self::UnknownKey(_) => "unknown_key",
            Self::BadSignature(_) => "bad_signature",
            Self::FromTheFuture { .. } => "from_the_future",
            Self::Replayed(_) => "replayed",
            Self::NotACommand(_) => "not_a_command",
        }
    }
}

impl Envelope {
    /// A new command from `key` with a random id, issued now.
    ///
    /// # Errors
    /// The system's random source fails.
    pub fn new(key: &AdminKey, target: Target, action: Action) -> Result<Self, getrandom::Error> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id)?;
        Ok(Self {
            id: hex::encode(id),
            issued_at_ms: crate::sessions::model::now_ms(),
            key: key.public.id.clone(),
            target,
            action,
        })
    }

    /// The signed message, as JSON bytes for the stream.
    pub fn sign(&self, key: &AdminKey) -> Vec<u8> {
        // Serialising our own plain struct cannot fail.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        let signed = Signed {
            key: key.public.id.clone(),
            envelope: STANDARD.encode(&bytes),
            signature: STANDARD.encode(key.sign(&bytes)),
        };
        serde_json::to_vec(&signed).unwrap_or_default()
    }

    /// Whether this host should apply it.
    pub fn is_for(&self, host: &str) -> bool {
        match &self.target {
            Target::All => true,
            Target::Host(h) => h == host,
        }
    }

    /// The status-socket call, checked to be an admin method with valid parameters.
    ///
    /// # Errors
    /// [`Refusal::NotACommand`] for unknown or read-only methods, [`Refusal::Malformed`] for
    /// parameters the method refuses.
    pub fn call(&self) -> Result<Option<Call>, Refusal> {
        let Action::Call { method, params } = &self.action else {
            return Ok(None);
        };
        let call = Call {
            id: Value::from(0),
            method: method.clone(),
            params: params.clone(),
        };
        let request = Request::parse(&call)
            .map_err(|e| Refusal::NotACommand(format!("{method} ({})", e.message)))?;
        // Reads have no business on the control stream, and a streaming method cannot be
        // answered there.
        if request.access() != Access::Admin {
            return Err(Refusal::NotACommand(method.clone()));
        }
        Ok(Some(call))
    }
}

/// Checks a message from the control stream: well-formed, signed by a trusted key, not from
/// the future. Replays are the caller's to detect (it knows which ids were applied).
///
/// # Errors
/// The [`Refusal`] to audit.
pub fn verify(bytes: &[u8], trusted: &[AdminPublicKey], now_ms: u64) -> Result<Envelope, Refusal> {
    let signed: Signed = serde_json::from_slice(bytes)
        .map_err(|e| Refusal::Malformed(format!("not a signed command: {e}")))?;
    let key = trusted
        .iter()
        .find(|k| k.id == signed.key)
        .ok_or_else(|| Refusal::UnknownKey(signed.key.chars().take(64).collect()))?;
    let envelope = STANDARD
        .decode(&signed.envelope)
        .map_err(|e| Refusal::Malformed(format!("envelope is not base64: {e}")))?;
    let signature = STANDARD
        .decode(&signed.signature)
        .map_err(|e| Refusal::Malformed(format!("signature is not base64: {e}")))?;
    if !key.verifies(&envelope, &signature) {
        return Err(Refusal::BadSignature(key.id.clone()));
    }
    let envelope: Envelope = serde_json::from_slice(&envelope)
        .map_err(|e| Refusal::Malformed(format!("signed envelope does not parse: {e}")))?;
    // The key named outside the signature must be the one inside it.
    if envelope.key != key.id {
        return Err(Refusal::BadSignature(key.id.clone()));
    }
    if envelope.issued_at_ms > now_ms + MAX_CLOCK_AHEAD_MS {
        return Err(Refusal::FromTheFuture {
            ahead_ms: envelope.issued_at_ms - now_ms,
        });
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn terminate_alice(key: &AdminKey) -> Envelope {
        Envelope::new(
            key,
            Target::All,
            Action::Call {
                method: "sessions.terminate".into(),
                params: json!({"user": "alice@corp.example"}),
            },
        )
        .unwrap()
    }

    #[test]
    fn a_signed_command_verifies_and_keeps_its_call() {
        let (key, _) = AdminKey::generate().unwrap();
        let env = terminate_alice(&key);
        let got = verify(
            &env.sign(&key),
            std::slice::from_ref(&key.public),
            env.issued_at_ms,
        )
        .unwrap();
        assert_eq!(got, env);
        let call = got.call().unwrap().expect("a call");
        assert_eq!(call.method, "sessions.terminate");
        assert!(got.is_for("any-host"));
    }

    #[test]
    fn forged_unsigned_and_foreign_commands_are_refused() {
        let (key, _) = AdminKey::generate().unwrap();
        let (mallory, _) = AdminKey::generate().unwrap();
        let trusted = [key.public.clone()];
        let env = terminate_alice(&key);
        let now = env.issued_at_ms;

        // Signed by an untrusted key.
        let e = verify(&env.sign(&mallory), &trusted, now).unwrap_err();
        assert_eq!(e.code(), "unknown_key", "{e}");

        // A trusted key id with someone else's signature.
        let mut forged: Signed = serde_json::from_slice(&env.sign(&mallory)).unwrap();
        forged.key = key.public.id.clone();
        let e = verify(&serde_json::to_vec(&forged).unwrap(), &trusted, now).unwrap_err();
        assert_eq!(e.code(), "bad_signature", "{e}");

        // The signed bytes altered (alice → bob).
        let mut altered: Signed = serde_json::from_slice(&env.sign(&key)).unwrap();
        let text = String::from_utf8(STANDARD.decode(&altered.envelope).unwrap()).unwrap();
        altered.envelope = STANDARD.encode(text.replace("alice", "bob"));
        let e = verify(&serde_json::to_vec(&altered).unwrap(), &trusted, now).unwrap_err();
        assert_eq!(e.code(), "bad_signature", "{e}");

        // Unsigned: a bare envelope.
        let e = verify(&serde_json::to_vec(&env).unwrap(), &trusted, now).unwrap_err();
        assert_eq!(e.code(), "malformed", "{e}");

        // From the future.
        let e = verify(&env.sign(&key), &trusted, now - MAX_CLOCK_AHEAD_MS - 1).unwrap_err();
        assert_eq!(e.code(), "from_the_future", "{e}");
    }

    #[test]
    fn only_admin_methods_are_commands() {
        let (key, _) = AdminKey::generate().unwrap();
        for (method, params, ok) in [
            (
                "sessions.terminate",
                json!({"ids": ["00000000000000ff"]}),
                true,
            ),
            ("policy.reload", json!({}), true),
            ("status", json!({}), false),
            ("sessions.list", json!({}), false),
            ("no.such", json!({}), false),
            ("sessions.terminate", json!({"bogus": 1}), false),
        ] {
            let env = Envelope::new(
                &key,
                Target::Host("h1".into()),
                Action::Call {
                    method: method.into(),
                    params,
                },
            )
            .unwrap();
            assert_eq!(env.call().is_ok(), ok, "{method}");
            assert!(env.is_for("h1") && !env.is_for("h2"));
        }
    }
}
