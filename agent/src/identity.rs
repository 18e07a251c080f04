//! Who a verified token says the user is: the typed identity snapshot a session is admitted
//! with, and evaluated against policy. Built only by `auth` from a token it has verified.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    pub claims: BTreeMap<String, serde_json::Value>,
    /// Lowercase hex SHA-256 of the bearer token.
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

    /// A claim's values as strings, for claim-match rules: a string is one value, an array of
    /// strings (or numbers, or booleans) is each of them; anything else matches nothing.
    pub fn claim_values(&self, claim: &str) -> Vec<String> {
        fn scalar(v: &serde_json::Value) -> Option<String> {
            match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Bool(b) => Some(b.to_string()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            }
        }
        match self.claims.get(claim) {
            Some(serde_json::Value::Array(items)) => items.iter().filter_map(scalar).collect(),
            Some(v) => scalar(v).into_iter().collect(),
            None => Vec::new(),
        }
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
        claims: BTreeMap::new(),
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
        assert_eq!(id.claim_values("amr"), ["pwd", "mfa", "3", "true"]);
        assert_eq!(id.claim_values("acr"), ["gold"]);
        assert!(id.claim_values("obj").is_empty());
        assert!(id.claim_values("missing").is_empty());
    }
}
