//! From the claims of a token whose signature verified to an [`Identity`]: the required
//! registered claims (`exp`, `aud`, `nbf`), then the identity fields per the claim mapping.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use super::{config::ClaimMapping, verify::Rejection};
use crate::identity::{ClaimPath, Device, Identity};

/// A token with less left than this is refused `expired`: admitting it would report a
/// session that is already over by the time the client reads the answer. The leeway does not
/// stretch it: the session could not outlive `exp` anyway.
pub(crate) const MIN_REMAINING_SECS: u64 = 5;

/// What the claims are checked against.
pub(crate) struct ClaimRules<'a> {
    pub(crate) audiences: &'a [String],
    pub(crate) mapping: &'a ClaimMapping,
    pub(crate) leeway_secs: u64,
}

/// Checks the time and audience claims and builds the identity. `claims` must come from a
/// token whose signature has verified; `iss` was already matched to the issuer; `signed` is
/// the token's signed part (`header.payload`), whose hash is its fingerprint.
pub(crate) fn identity(
    iss: String,
    claims: Map<String, Value>,
    signed: &[u8],
    now_secs: u64,
    rules: &ClaimRules<'_>,
) -> Result<Identity, Rejection> {
    let exp = numeric_date(&claims, "exp")?.ok_or_else(|| missing("exp"))?;
    let nbf = numeric_date(&claims, "nbf")?;
    let iat = numeric_date(&claims, "iat")?;
    let aud = audiences(&claims)?;

    // Valid while now < exp (RFC 7519 4.1.4), and with enough left to be worth a session.
    if now_secs.saturating_add(MIN_REMAINING_SECS) > exp {
        return Err(Rejection::Expired);
    }
    // A token from the future (nbf, or iat) is refused beyond the allowed clock skew.
    let ahead = |t: Option<u64>| t.is_some_and(|t| now_secs.saturating_add(rules.leeway_secs) < t);
    if ahead(nbf) || ahead(iat) {
        return Err(Rejection::NotYetValid);
    }
    if !aud
        .iter()
        .any(|a| rules.audiences.iter().any(|want| want == a))
    {
        return Err(Rejection::WrongAudience);
    }

    let m = rules.mapping;
    // Refusals name the path looked at, as the config wrote it.
    let subject = match m.subject.lookup(&claims) {
        Some(Value::String(s)) if !s.is_empty() => s,
        Some(Value::String(_)) | None | Some(Value::Null) => {
            return Err(missing(m.subject.as_str()));
        }
        Some(_) => return Err(malformed(format!("{} must be a string", m.subject))),
    };
    // Optional claims of an unexpected type count as absent: a policy that needs them then
    // denies, rather than an odd optional claim locking every user of an issuer out.
    let email = string(&claims, &m.email);
    let groups = match m.groups.lookup(&claims) {
        Some(Value::String(g)) => vec![g],
        Some(Value::Array(items)) => items
            .into_iter()
            .filter_map(|v| match v {
                Value::String(s) => Some(s),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    let device = Device {
        id: match m.device_id.lookup(&claims) {
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => string(&claims, &m.device_id),
        },
        managed: boolean(&claims, &m.device_managed),
        compliant: boolean(&claims, &m.device_compliant),
        os: string(&claims, &m.device_os),
    };

    Ok(Identity {
        issuer: iss,
        subject,
        email,
        groups,
        device,
        token_sha256: hex::encode(Sha256::digest(signed)),
        token_expires_at: exp,
        token_issued_at: iat,
        claims: crate::identity::Claims::from(claims),
    })
}

fn missing(claim: &str) -> Rejection {
    Rejection::MissingClaim {
        claim: claim.to_owned(),
    }
}

fn malformed(detail: String) -> Rejection {
    Rejection::Malformed { detail }
}

/// A NumericDate (RFC 7519 2): seconds since the epoch, possibly fractional.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Rejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(secs), _) => Ok(Some(secs)),
            (None, Some(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
            _ => Err(malformed(format!(
                "{name} must be a non-negative number of seconds"
            ))),
        },
        Some(_) => Err(malformed(format!("{name} must be a number"))),
    }
}

fn audiences(claims: &Map<String, Value>) -> Result<Vec<&str>, Rejection> {
    let wrong = || malformed("aud must be a string or an array of strings".into());
    match claims.get("aud") {
        None => Err(missing("aud")),
        Some(Value::String(a)) => Ok(vec![a.as_str()]),
        Some(Value::Array(items)) => items.iter().map(|v| v.as_str().ok_or_else(wrong)).collect(),
        Some(_) => Err(wrong()),
    }
}

fn string(claims: &Map<String, Value>, path: &ClaimPath) -> Option<String> {
    match path.lookup(claims)? {
        Value::String(s) => Some(s),
        _ => None,
    }
}

/// Posture flags: booleans, or the strings some providers emit instead.
fn boolean(claims: &Map<String, Value>, path: &ClaimPath) -> Option<bool> {
    match path.lookup(claims) {
        Some(Value::Bool(b)) => Some(b),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Some(true),
        Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn run(claims: Value, now: u64) -> Result<Identity, Rejection> {
        run_with(claims, now, &ClaimMapping::default())
    }

    fn run_with(claims: Value, now: u64, mapping: &ClaimMapping) -> Result<Identity, Rejection> {
        let Value::Object(map) = claims else {
            panic!("test claims must be an object")
        };
        let audiences = ["fw".to_owned()];
        let rules = ClaimRules {
            audiences: &audiences,
            mapping,
            leeway_secs: 30,
        };
        identity("https://idp".into(), map, b"h.p", now, &rules)
    }

    #[test]
    fn time_edges_use_the_leeway() {
        let base = json!({"sub": "a", "aud": "fw", "exp": 1000, "nbf": 500});
        assert!(run(base.clone(), 1000 - MIN_REMAINING_SECS).is_ok());
        assert_eq!(
            run(base.clone(), 1001 - MIN_REMAINING_SECS),
            Err(Rejection::Expired),
            "less than the minimum left: refused, however wide the leeway"
        );
        assert_eq!(run(base.clone(), 1029), Err(Rejection::Expired));
        assert!(run(base.clone(), 470).is_ok());
        assert_eq!(run(base, 469), Err(Rejection::NotYetValid));
        let iat = json!({"sub": "a", "aud": "fw", "exp": 1000, "iat": 600});
        assert!(run(iat.clone(), 570).is_ok(), "iat ahead within the leeway");
        assert_eq!(
            run(iat, 569),
            Err(Rejection::NotYetValid),
            "iat in the future"
        );
        let fractional = json!({"sub": "a", "aud": ["x", "fw"], "exp": 1000.9});
        assert_eq!(run(fractional, 10).map(|i| i.token_expires_at), Ok(1000));
    }

    #[test]
    fn claim_types() {
        let neg = json!({"sub": "a", "aud": "fw", "exp": -5});
        assert_eq!(run(neg, 1).map_err(|e| e.code()), Err("malformed"));
        let aud_num = json!({"sub": "a", "aud": 5, "exp": 100});
        assert_eq!(run(aud_num, 1).map_err(|e| e.code()), Err("malformed"));
        let iat_str = json!({"sub": "a", "aud": "fw", "exp": 100, "iat": "1"});
        assert_eq!(run(iat_str, 1).map_err(|e| e.code()), Err("malformed"));
        let no_sub = json!({"aud": "fw", "exp": 100});
        assert_eq!(
            run(no_sub, 1),
            Err(Rejection::MissingClaim {
                claim: "sub".into()
            })
        );
        let odd = json!({"sub": "a", "aud": "fw", "exp": 100, "email": 3, "groups": {"a": 1},
            "device_managed": "TRUE", "device_compliant": 1, "device_id": 42});
        let id = run(odd, 1).expect("odd optional claims are not fatal");
        assert_eq!(id.email, None);
        assert!(id.groups.is_empty());
        assert_eq!(id.device.managed, Some(true));
        assert_eq!(id.device.compliant, None);
        assert_eq!(id.device.id.as_deref(), Some("42"));
    }

    #[test]
    fn nested_and_namespaced_claims_feed_the_identity() {
        let path = |p: &str| ClaimPath::parse(p).expect("path");
        let mapping = ClaimMapping {
            subject: path("/user/id"),
            email: path("/user/emails/0"),
            groups: path("https://corp.example/claims/groups"),
            device_id: path("/device/id"),
            device_managed: path("/device/managed"),
            device_compliant: path("/device/compliant"),
            device_os: path("/device/os"),
        };
        let claims = json!({"aud": "fw", "exp": 100,
            "user": {"id": "u-1", "emails": ["a@corp.example"]},
            "https://corp.example/claims/groups": ["ops", "dev"],
            "device": {"id": "d-9", "managed": true, "compliant": "false", "os": "linux"}});
        let id = run_with(claims, 1, &mapping).expect("admitted");
        assert_eq!(id.subject, "u-1");
        assert_eq!(id.email.as_deref(), Some("a@corp.example"));
        assert_eq!(id.groups, ["ops", "dev"]);
        assert_eq!(
            id.device,
            Device {
                id: Some("d-9".into()),
                managed: Some(true),
                compliant: Some(false),
                os: Some("linux".into()),
            }
        );
        let roles = ClaimMapping {
            groups: path("/roles/name"),
            ..ClaimMapping::default()
        };
        let claims = json!({"sub": "a", "aud": "fw", "exp": 100,
            "roles": [{"name": "ops"}, {"name": "db"}]});
        assert_eq!(run_with(claims, 1, &roles).unwrap().groups, ["ops", "db"]);
        let no_sub = json!({"aud": "fw", "exp": 100, "user": {}});
        assert_eq!(
            run_with(no_sub, 1, &mapping),
            Err(Rejection::MissingClaim {
                claim: "/user/id".into()
            }),
            "the refusal names the path that was looked at"
        );
    }
}
