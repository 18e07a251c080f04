//! Security Event Tokens (RFC 8417, SSF §4): one SET in, a validated event or the RFC 8935
//! error code that refuses it out. Keys come from the transmitter's JWKS, fetched, cached
//! and checked the way an issuer's are (`auth`), with the same algorithm-confusion rules.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{
    ErrCode, Via,
    subject::{BadSubject, Subject},
};
use crate::auth::{Alg, IssuerKeys, KeyOutcome, OnDemand};

/// A SET larger than this is not one any transmitter sends (a few hundred bytes to a few
/// KiB); a pushed body larger than this is refused before it is read. It stays below the
/// admission listener's head limit, which counts body bytes too.
pub const MAX_SET_BYTES: usize = 16 * 1024;
/// A `jti` longer than this is refused: it is kept, durably, for the `iat` window.
const MAX_JTI_CHARS: usize = 256;
/// An attacker-chosen value is echoed in descriptions only this far.
const MAX_ECHO: usize = 32;

/// A SET refused: the RFC 8935 / SSF error code and a description for the transmitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub err: ErrCode,
    pub description: String,
}

fn refuse(err: ErrCode, description: impl Into<String>) -> Refused {
    Refused {
        err,
        description: description.into(),
    }
}

fn request(description: impl Into<String>) -> Refused {
    refuse(ErrCode::InvalidRequest, description)
}

fn echo(s: &str) -> String {
    s.chars().take(MAX_ECHO).collect()
}

/// A SET whose signature, issuer, audience and shape checked out.
#[derive(Debug, Clone, PartialEq)]
pub struct Set {
    pub iss: String,
    pub jti: String,
    pub iat: u64,
    /// The one event's type URI.
    pub event_type: String,
    /// The one event's payload.
    pub event: Map<String, Value>,
    /// `sub_id` (SSF), else the event's `subject` member (CAEP before SSF 1.0); `None` for
    /// stream events (verification, stream-updated) that name none.
    pub subject: Option<Subject>,
    /// When the transmitter says the event happened (`event_timestamp`), else `iat`.
    pub event_time: u64,
    /// How it reached this agent (set by the receiver; the token does not say).
    pub via: Via,
}

/// What a SET is checked against.
pub(crate) struct Expect<'a> {
    pub issuer: &'a str,
    pub audience: &'a str,
    pub algs: &'a [Alg],
    pub keys: &'a IssuerKeys,
    pub iat_window_secs: u64,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
    typ: Option<String>,
    crit: Option<Value>,
}

fn b64(part: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(part).ok()
}

/// Validates one SET at Unix time `now`. May block on a key fetch (an unknown `kid`, keys not
/// loaded yet): call it from a blocking context.
///
/// # Errors
/// The [`Refused`] naming the RFC 8935 code; nothing is accepted on any failure.
pub(crate) fn validate(token: &str, want: &Expect<'_>, now: u64) -> Result<Set, Refused> {
    if token.len() > MAX_SET_BYTES {
        return Err(request(format!(
            "the SET is larger than {MAX_SET_BYTES} bytes"
        )));
    }
    let parts: Vec<&str> = token.trim().split('.').collect();
    if parts.len() == 5 {
        return Err(request(
            "encrypted SETs (JWE) are not supported: send a signed SET",
        ));
    }
    let [h64, p64, s64] = parts[..] else {
        return Err(request("a SET is three base64url parts separated by dots"));
    };
    let header_json = b64(h64).ok_or_else(|| request("the header is not base64url"))?;
    let header: Header = std::str::from_utf8(&header_json)
        .ok()
        .and_then(|t| serde_json::from_str(t).ok())
        .ok_or_else(|| request("the header is not a JSON object with a string alg"))?;
    if header.crit.is_some() {
        return Err(request(
            "critical header extensions (crit) are not supported",
        ));
    }
    // RFC 8417 2.3: explicit typing keeps an ID token or access token from passing as a SET.
    let typ = header
        .typ
        .as_deref()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if typ.strip_prefix("application/").unwrap_or(&typ) != "secevent+jwt" {
        return Err(request(format!(
            "the header's typ is {:?}, not secevent+jwt",
            echo(header.typ.as_deref().unwrap_or("(none)"))
        )));
    }
    // `none`, HS256 and anything not configured never reach a key: an RSA public key is
    // never used as an HMAC secret.
    let alg = Alg::from_name(&header.alg)
        .filter(|a| want.algs.contains(a))
        .ok_or_else(|| {
            refuse(
                ErrCode::InvalidKey,
                format!(
                    "algorithm {:?} is not allowed for this transmitter",
                    echo(&header.alg)
                ),
            )
        })?;

    let payload_json = b64(p64).ok_or_else(|| request("the payload is not base64url"))?;
    let claims = crate::auth::strict_object(&payload_json)
        .map_err(|why| request(format!("the payload is not a JSON object: {why}")))?;
    match claims.get("iss") {
        Some(Value::String(iss)) if iss == want.issuer => {}
        Some(Value::String(iss)) => {
            return Err(refuse(
                ErrCode::InvalidIssuer,
                format!("iss {:?} is not this stream's issuer", echo(iss)),
            ));
        }
        _ => return Err(refuse(ErrCode::InvalidIssuer, "the SET has no string iss")),
    }
    let signature = b64(s64).ok_or_else(|| request("the signature is not base64url"))?;
    let signed = &token.trim().as_bytes()[..h64.len() + 1 + p64.len()];
    check_signature(want.keys, header.kid.as_deref(), alg, signed, &signature)?;

    // Trusted from here on.
    let audience_ok = match claims.get("aud") {
        Some(Value::String(a)) => a == want.audience,
        Some(Value::Array(all)) => all.iter().any(|a| a.as_str() == Some(want.audience)),
        _ => false,
    };
    if !audience_ok {
        return Err(refuse(
            ErrCode::InvalidAudience,
            format!("aud does not contain {:?}", want.audience),
        ));
    }
    // RFC 8417 2.2 / SSF 4.1: the subject is in the event (or sub_id), never `sub`, so a
    // SET cannot be mistaken for an access token.
    if claims.contains_key("sub") {
        return Err(request(
            "a SET must not carry sub: name the subject in sub_id",
        ));
    }
    let jti = match claims.get("jti") {
        Some(Value::String(j)) if !j.is_empty() && j.chars().count() <= MAX_JTI_CHARS => j.clone(),
        _ => {
            return Err(request(format!(
                "the SET needs a string jti of 1 to {MAX_JTI_CHARS} characters"
            )));
        }
    };
    let iat = match claims.get("iat").and_then(Value::as_u64) {
        Some(iat) => iat,
        None => return Err(request("the SET needs a numeric iat")),
    };
    if iat.abs_diff(now) > want.iat_window_secs {
        return Err(request(format!(
            "iat is {}s from the receiver's clock, beyond the {}s window",
            iat.abs_diff(now),
            want.iat_window_secs
        )));
    }
    if let Some(exp) = claims.get("exp") {
        match exp.as_u64() {
            Some(exp) if exp > now => {}
            _ => return Err(request("the SET has expired (exp)")),
        }
    }
    let Some(Value::Object(events)) = claims.get("events") else {
        return Err(request("the SET has no events object"));
    };
    if events.len() != 1 {
        return Err(request(format!(
            "a SET carries exactly one event (SSF 4.1.1); this one has {}",
            events.len()
        )));
    }
    let Some((event_type, Value::Object(event))) = events.iter().next() else {
        return Err(request("the event's payload must be a JSON object"));
    };
    let subject_value = claims.get("sub_id").or_else(|| event.get("subject"));
    let subject = subject_value
        .map(Subject::parse)
        .transpose()
        .map_err(|BadSubject(why)| request(why))?;
    let event_time = event
        .get("event_timestamp")
        .and_then(Value::as_u64)
        .unwrap_or(iat);
    Ok(Set {
        iss: want.issuer.to_owned(),
        jti,
        iat,
        event_type: event_type.clone(),
        event: event.clone(),
        subject,
        event_time,
        via: Via::Transmitter,
    })
}

/// The claims a SET's payload holds, unverified: only to pick the transmitter whose keys then
/// check it (a SET from the fleet arrives without the stream that names its transmitter), and
/// to name it before it is checked.
fn claimed(token: &str) -> Option<Map<String, Value>> {
    if token.len() > MAX_SET_BYTES {
        return None;
    }
    let payload = b64(token.trim().split('.').nth(1)?)?;
    serde_json::from_slice(&payload).ok()
}

/// The `iss` a SET claims, unverified (see [`claimed`]).
pub(crate) fn claimed_issuer(token: &str) -> Option<String> {
    claimed(token)?.get("iss")?.as_str().map(str::to_owned)
}

/// The (`iss`, `jti`) a SET claims, unverified (see [`claimed`]).
pub fn claimed_id(token: &str) -> Option<(String, String)> {
    let claims = claimed(token)?;
    let text = |k: &str| claims.get(k)?.as_str().map(str::to_owned);
    Some((text("iss")?, text("jti")?))
}

/// The signature with the transmitter's key of that `kid`; an unknown kid (or a key the
/// transmitter replaced under the same kid) reloads the keys once, rate-limited as for
/// issuers.
fn check_signature(
    keys: &IssuerKeys,
    kid: Option<&str>,
    alg: Alg,
    signed: &[u8],
    signature: &[u8],
) -> Result<(), Refused> {
    let set = keys.snapshot();
    let mut outcome = set.verify(kid, alg, signed, signature);
    let retry = match outcome {
        KeyOutcome::NoKey => true,
        KeyOutcome::BadSignature => keys.may_refresh_now(&set),
        KeyOutcome::Verified => false,
    };
    if retry {
        match keys.refresh_on_demand(&set) {
            OnDemand::Fresh(newer) => outcome = newer.verify(kid, alg, signed, signature),
            OnDemand::NotNow { last_error } if !set.loaded => {
                return Err(refuse(
                    ErrCode::InvalidKey,
                    format!(
                        "the transmitter's keys are not loaded: {}",
                        last_error.unwrap_or_else(|| "not fetched yet".into())
                    ),
                ));
            }
            OnDemand::Failed(why) if !set.loaded => {
                return Err(refuse(
                    ErrCode::InvalidKey,
                    format!("the transmitter's keys cannot be loaded: {why}"),
                ));
            }
            OnDemand::NotNow { .. } | OnDemand::Failed(_) => {}
        }
    }
    match outcome {
        KeyOutcome::Verified => Ok(()),
        KeyOutcome::BadSignature => {
            Err(refuse(ErrCode::InvalidKey, "the signature does not verify"))
        }
        KeyOutcome::NoKey => Err(refuse(
            ErrCode::InvalidKey,
            "no key of the transmitter matches the SET's kid and algorithm",
        )),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::signals::{
        config::TransmitterConfig,
        dev::{self, DevSet, SigningKey},
        keys::transmitter_keys,
    };

    const NOW: u64 = 1_800_000_000;

    struct Fixture {
        key: SigningKey,
        keys: IssuerKeys,
        jwks: Vec<u8>,
        _dir: std::path::PathBuf,
    }

    fn fixture() -> Fixture {
        let dir = std::env::temp_dir().join(format!(
            "fw-set-{}-{}",
            std::process::id(),
            dev::random_jti()
        ));
        let (key_path, jwks_path, _) = dev::keygen(&dir).expect("keygen");
        let cfg: TransmitterConfig = toml::from_str(&format!(
            "issuer = \"{}\"\naudience = \"flowwarden\"\njwks_file = \"{}\"\n\
             push_authorization_file = \"x\"\n",
            dev::DEV_TRANSMITTER,
            jwks_path.display()
        ))
        .expect("config");
        let algs = cfg.algs("t").expect("algs");
        Fixture {
            key: SigningKey::load(&key_path, &jwks_path).expect("key"),
            keys: transmitter_keys("t", &cfg, algs).expect("keys"),
            jwks: std::fs::read(&jwks_path).expect("jwks"),
            _dir: dir,
        }
    }

    fn check(f: &Fixture, token: &str) -> Result<Set, Refused> {
        validate(
            token,
            &Expect {
                issuer: dev::DEV_TRANSMITTER,
                audience: "flowwarden",
                algs: &[Alg::Rs256, Alg::Es256],
                keys: &f.keys,
                iat_window_secs: 300,
            },
            NOW,
        )
    }

    fn revoked() -> DevSet {
        DevSet::new(
            "session-revoked",
            Some(json!({"format": "email", "email": "alice@corp.test"})),
        )
    }

    fn err(f: &Fixture, token: &str) -> ErrCode {
        check(f, token).expect_err("refused").err
    }

    #[test]
    fn a_good_set_validates() {
        let f = fixture();
        let set = check(&f, &f.key.sign(&revoked(), NOW).expect("sign")).expect("valid");
        assert_eq!(set.event_type, revoked().event_uri());
        assert_eq!(set.subject, Some(Subject::Email("alice@corp.test".into())));
        assert_eq!(set.iat, NOW);
    }

    #[test]
    fn the_claimed_issuer_is_read_without_trusting_it() {
        let f = fixture();
        let token = f.key.sign(&revoked(), NOW).expect("sign");
        assert_eq!(
            claimed_issuer(&token).as_deref(),
            Some(dev::DEV_TRANSMITTER)
        );
        assert_eq!(claimed_issuer("not a token"), None);
        assert_eq!(
            claimed_issuer("a.e30.c"),
            None,
            "an empty payload has no iss"
        );
        let huge = format!("a.{}.c", "A".repeat(MAX_SET_BYTES));
        assert_eq!(claimed_issuer(&huge), None);
    }

    #[test]
    fn hostile_sets_are_refused_with_their_rfc_8935_code() {
        let f = fixture();
        let payload = revoked().payload(NOW);
        let header = f.key.header();
        let signed = |h: &Value, p: &Value| f.key.sign_raw(h, p).expect("sign");
        let with = |k: &str, v: Value| {
            let mut p = payload.clone();
            p[k] = v;
            p
        };

        // Forged: a signature from another key.
        let other = fixture();
        assert_eq!(
            err(&f, &other.key.sign_raw(&header, &payload).unwrap()),
            ErrCode::InvalidKey
        );
        // alg none, with no signature.
        let none = format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(json!({"alg": "none", "typ": "secevent+jwt"}).to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        assert_eq!(err(&f, &none), ErrCode::InvalidKey);
        // HS256 keyed with the transmitter's public JWKS.
        let hs_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(
                json!({"alg": "HS256", "typ": "secevent+jwt", "kid": f.key.kid}).to_string()
            ),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        );
        let mac = aws_lc_rs::hmac::sign(
            &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &f.jwks),
            hs_input.as_bytes(),
        );
        let hs = format!("{hs_input}.{}", URL_SAFE_NO_PAD.encode(mac.as_ref()));
        assert_eq!(err(&f, &hs), ErrCode::InvalidKey);
        // Wrong issuer, wrong audience.
        assert_eq!(
            err(&f, &signed(&header, &with("iss", json!("https://evil")))),
            ErrCode::InvalidIssuer
        );
        assert_eq!(
            err(&f, &signed(&header, &with("aud", json!("other")))),
            ErrCode::InvalidAudience
        );
        assert!(
            check(
                &f,
                &signed(&header, &with("aud", json!(["x", "flowwarden"])))
            )
            .is_ok()
        );
        // sub present; two events; no events; wrong typ; iat out of the window; expired.
        for (what, token) in [
            ("sub", signed(&header, &with("sub", json!("alice")))),
            (
                "two events",
                signed(
                    &header,
                    &with(
                        "events",
                        json!({revoked().event_uri(): {}, "https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}),
                    ),
                ),
            ),
            ("no events", signed(&header, &with("events", json!({})))),
            ("iat", signed(&header, &with("iat", json!(NOW - 3600)))),
            ("exp", signed(&header, &with("exp", json!(NOW - 1)))),
            ("jti", signed(&header, &with("jti", json!("")))),
            (
                "critical subject member",
                signed(
                    &header,
                    &with(
                        "sub_id",
                        json!({"format": "complex", "user": {"format": "email", "email": "a@b"},
                               "application": {"format": "opaque", "id": "x"}}),
                    ),
                ),
            ),
        ] {
            assert_eq!(err(&f, &token), ErrCode::InvalidRequest, "{what}");
        }
        for typ in [json!("JWT"), json!("at+jwt"), Value::Null] {
            let mut h = header.clone();
            h["typ"] = typ.clone();
            assert_eq!(
                err(&f, &signed(&h, &payload)),
                ErrCode::InvalidRequest,
                "typ {typ}"
            );
        }
        let mut h = header.clone();
        h["typ"] = json!("application/secevent+jwt");
        assert!(
            check(&f, &signed(&h, &payload)).is_ok(),
            "the long media type form"
        );
        assert_eq!(err(&f, "a.b"), ErrCode::InvalidRequest);
        assert_eq!(
            err(&f, &"x".repeat(MAX_SET_BYTES + 1)),
            ErrCode::InvalidRequest
        );
    }
}
