//! Who a verified token says the user is: the typed identity snapshot a session is admitted
//! with, and evaluated against policy. Built only by `auth` from a token it has verified.

use std::{collections::BTreeMap, fmt};

use serde::{
    Deserialize, Deserializer, Serialize, Serializer,
    de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor},
};
use serde_json::{Value, value::RawValue};
use sha2::{Digest, Sha256};

mod path;

pub use path::ClaimPath;

/// The identity of a verified token. The bearer token itself is never kept: only its claims
/// and the SHA-256 fingerprint of the token (to correlate with IdP logs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    /// `iss`: which configured issuer vouched for it.
    pub issuer: String,
    /// `sub`, or the claim the issuer's config maps to the subject.
    pub subject: String,
    /// From the configured email claim, if present.
    pub email: Option<String>,
    /// From the configured groups claim (a string or an array of strings).
    pub groups: Vec<String>,
    pub device: Device,
    /// Every claim of the token as issued, for display and claim-match rules.
    pub claims: Claims,
    /// Lowercase hex SHA-256 of the token's signed part (`header.payload`, without the
    /// signature): an ECDSA signature rewritten as (r, n−s) verifies too, and must not make
    /// the same token look like another one.
    pub token_sha256: String,
    /// `exp` of the token, seconds since the Unix epoch: a session never outlives it unless
    /// a reconnect renews it.
    pub token_expires_at: u64,
    /// `iat` of the token, if present, seconds since the Unix epoch.
    pub token_issued_at: Option<u64>,
}

/// Device claims, mapped by the issuer's config. Absent claims are `None`: a policy that
/// requires a posture never treats "unknown" as satisfied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub id: Option<String>,
    pub managed: Option<bool>,
    pub compliant: Option<bool>,
    pub os: Option<String>,
}

impl Identity {
    /// The name operators know the user by: the email if there is one, else the subject.
    pub fn user(&self) -> &str {
        self.email.as_deref().unwrap_or(&self.subject)
    }

    /// Whether `who` names this identity: its email (case-insensitively) or its subject.
    pub fn is(&self, who: &str) -> bool {
        self.subject == who
            || self
                .email
                .as_deref()
                .is_some_and(|e| e.eq_ignore_ascii_case(who))
    }

    pub fn in_group(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }

    /// The key a token denial is recorded under: the issuer and `jti` when the token has a
    /// `jti` (every token the provider issued under that id), else the issuer and the token's
    /// claims in their canonical form (members sorted, compact: see [`Claims`]). Neither
    /// changes when the signature bytes are re-encoded (an ECDSA signature rewritten as
    /// (r, n−s)) or when the same claims come in another member order or header, so a denial
    /// cannot be dodged by re-encoding the token.
    pub fn denial_key(&self) -> String {
        let mut h = Sha256::new();
        h.update(self.issuer.as_bytes());
        h.update([0]);
        match self.claims.get("jti") {
            Some(Value::String(jti)) if !jti.is_empty() => {
                h.update(jti.as_bytes());
                format!("jti:{}", hex::encode(h.finalize()))
            }
            _ => {
                h.update(self.claims.as_json().as_bytes());
                format!("claims:{}", hex::encode(h.finalize()))
            }
        }
    }

    /// A claim's values as strings, for claim-match rules: a string is one value, an array of
    /// strings (or numbers, or booleans) is each of them; anything else matches nothing.
    pub fn claim_values(&self, claim: &ClaimPath) -> Vec<String> {
        fn scalar(v: &serde_json::Value) -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        }
        match self.claims.get_path(claim) {
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(scalar).collect(),
            Some(v) => scalar(&v).into_iter().collect(),
            None => Vec::new(),
        }
    }
}

/// Every claim of a token, kept as one compact JSON object: a session holds them for display
/// and for the rare claim-match rule, and one string per session costs a fraction of a map
/// of small allocations (a claims map was half of a session's memory).
#[derive(Clone, PartialEq, Eq)]
pub struct Claims(Box<str>);

impl Default for Claims {
    fn default() -> Self {
        Self("{}".into())
    }
}

impl fmt::Debug for Claims {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Claims {
    /// The compact JSON text of the claims object.
    pub fn as_json(&self) -> &str {
        &self.0
    }

    /// One claim's value, found by scanning the text (no map is built).
    pub fn get(&self, name: &str) -> Option<Value> {
        let mut de = serde_json::Deserializer::from_str(&self.0);
        // The text was checked to be an object when it was made: a failure cannot happen, and
        // would only mean "no such claim".
        Find(name).deserialize(&mut de).ok().flatten()
    }

    /// The value at a claim path (a top-level claim, or inside one).
    pub fn get_path(&self, path: &ClaimPath) -> Option<Value> {
        path.descend(self.get(path.claim())?)
    }

    /// Every claim, as a map.
    pub fn to_map(&self) -> serde_json::Map<String, Value> {
        serde_json::from_str(&self.0).unwrap_or_default()
    }

    /// Adds or replaces a claim (rebuilds the text: for building identities, not hot paths).
    pub fn insert(&mut self, name: String, value: Value) {
        let mut map = self.to_map();
        map.insert(name, value);
        *self = Self::from(map);
    }

    pub fn is_empty(&self) -> bool {
        self.0.as_ref() == "{}"
    }
}

impl From<serde_json::Map<String, Value>> for Claims {
    fn from(map: serde_json::Map<String, Value>) -> Self {
        Self(Value::Object(map).to_string().into_boxed_str())
    }
}

impl From<BTreeMap<String, Value>> for Claims {
    fn from(map: BTreeMap<String, Value>) -> Self {
        Self::from(map.into_iter().collect::<serde_json::Map<_, _>>())
    }
}

impl Serialize for Claims {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // Written as the object itself (as a map of claims always was), not as a string.
        match RawValue::from_string(self.0.to_string()) {
            Ok(raw) => raw.serialize(s),
            Err(e) => Err(serde::ser::Error::custom(e)),
        }
    }
}

impl<'de> Deserialize<'de> for Claims {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = serde_json::Map::<String, Value>::deserialize(d)?;
        Ok(Self::from(map))
    }
}

/// Finds one key of a JSON object, skipping the other values without building them.
struct Find<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for Find<'_> {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Find<'_> {
    type Value = Option<Value>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(hit) = map.next_key_seed(KeyIs(self.0))? {
            if hit && found.is_none() {
                found = Some(map.next_value::<Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

/// Whether a key equals the wanted name, compared without allocating when it can be.
struct KeyIs<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for KeyIs<'_> {
    type Value = bool;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeyIs<'_> {
    type Value = bool;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a claim name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<bool, E> {
        Ok(v == self.0)
    }
}

#[cfg(test)]
pub(crate) fn test_identity(email: &str, groups: &[&str]) -> Identity {
    Identity {
        issuer: "https://idp.test".into(),
        subject: format!("sub-{email}"),
        email: Some(email.into()),
        groups: groups.iter().map(|g| g.to_string()).collect(),
        device: Device::default(),
        claims: Claims::default(),
        token_sha256: "00".repeat(32),
        token_expires_at: u64::MAX / 2,
        token_issued_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_groups() {
        let mut id = test_identity("Alice@Corp.example", &["ops"]);
        assert_eq!(id.user(), "Alice@Corp.example");
        assert!(id.is("alice@corp.example"));
        assert!(id.is("sub-Alice@Corp.example"));
        assert!(!id.is("bob@corp.example"));
        assert!(id.in_group("ops") && !id.in_group("dev"));
        id.claims
            .insert("amr".into(), serde_json::json!(["pwd", "mfa", 3, true]));
        id.claims.insert("acr".into(), serde_json::json!("gold"));
        id.claims.insert("obj".into(), serde_json::json!({"a": 1}));
        let values = |p: &str| id.claim_values(&ClaimPath::parse(p).unwrap());
        assert_eq!(values("amr"), ["pwd", "mfa", "3", "true"]);
        assert_eq!(values("acr"), ["gold"]);
        assert!(values("obj").is_empty());
        assert_eq!(values("/obj/a"), ["1"]);
        assert!(values("missing").is_empty());
    }

    #[test]
    fn denial_keys_use_the_jti_else_the_signed_part() {
        let mut id = test_identity("a@corp.example", &[]);
        let by_claims = id.denial_key();
        assert!(by_claims.starts_with("claims:"), "{by_claims}");
        id.token_sha256 = "22".repeat(32);
        assert_eq!(
            id.denial_key(),
            by_claims,
            "the claims decide, not the bytes"
        );
        let reordered: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"sub":"a","exp":2}"#).unwrap();
        let mut other = id.clone();
        id.claims = Claims::from(reordered);
        let ordered: serde_json::Map<String, Value> =
            serde_json::from_str(r#"{"exp":2,"sub":"a"}"#).unwrap();
        other.claims = Claims::from(ordered);
        assert_eq!(
            id.denial_key(),
            other.denial_key(),
            "member order does not matter"
        );
        id.claims.insert("jti".into(), serde_json::json!("t-1"));
        let with_jti = id.denial_key();
        assert!(
            with_jti.starts_with("jti:") && with_jti.len() == 68,
            "{with_jti}"
        );
        id.token_sha256 = "11".repeat(32);
        assert_eq!(id.denial_key(), with_jti, "the jti decides, not the bytes");
        id.issuer = "https://other.example".into();
        assert_ne!(
            id.denial_key(),
            with_jti,
            "the same jti from another issuer"
        );
    }

    #[test]
    fn claims_are_kept_compactly_and_read_back_exactly() {
        let mut map = serde_json::Map::new();
        map.insert("sub".into(), serde_json::json!("alice"));
        map.insert("we\"ird".into(), serde_json::json!({"nested": [1, "two"]}));
        map.insert("n".into(), serde_json::json!(1.5));
        let claims = Claims::from(map.clone());
        assert_eq!(claims.get("sub"), Some(serde_json::json!("alice")));
        assert_eq!(
            claims.get("we\"ird"),
            Some(serde_json::json!({"nested": [1, "two"]}))
        );
        assert_eq!(claims.get("n"), Some(serde_json::json!(1.5)));
        assert_eq!(
            claims.get("nested"),
            None,
            "only top-level claims are claims"
        );
        assert_eq!(claims.to_map(), map);
        // Stored as the object it always was, so older state files read back the same.
        let json = serde_json::to_string(&claims).unwrap();
        assert_eq!(
            serde_json::from_str::<Value>(&json).unwrap(),
            Value::Object(map)
        );
        assert_eq!(serde_json::from_str::<Claims>(&json).unwrap(), claims);
        assert!(serde_json::from_str::<Claims>("[1]").is_err());
        assert!(Claims::default().is_empty() && !claims.is_empty());
    }
}
