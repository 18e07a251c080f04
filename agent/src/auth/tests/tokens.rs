//! Token-level rules of issue 14: `typ`, signature re-encoding, duplicate members, a key
//! replaced under the same kid, and what key state an issuer reports.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::json;

use super::{
    fixtures::*,
    provider::{Provider, Reply},
};
use crate::auth::{Verifier, source::Tuning};

/// The order of the P-256 group, big-endian.
const P256_N: [u8; 32] = [
    0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
    0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
];

/// `n − s`, big-endian, 32 bytes.
fn negate(s: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let mut d = i16::from(P256_N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        if d < 0 {
            d += 256;
        }
        out[i] = d as u8;
    }
    out
}

#[test]
fn token_types_default_and_required_at_jwt() {
    let dev = DevIssuer::new("typ");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let token = |typ: Option<&str>| {
        let mut header = json!({"alg": "ES256", "kid": dev.keys.kid});
        if let Some(t) = typ {
            header["typ"] = json!(t);
        }
        craft(&header, &claims(), &dev.key())
    };
    for typ in [
        Some("JWT"),
        Some("jwt"),
        Some("at+jwt"),
        Some("application/at+jwt"),
        None,
    ] {
        assert_eq!(code(&verifier.verify(&token(typ), NOW)), "ok", "{typ:?}");
    }
    assert_eq!(
        code(&verifier.verify(&token(Some("JOSE")), NOW)),
        "wrong_token_type"
    );

    let mut strict = dev.issuer(&["ES256"]);
    strict.token_types = vec!["at+jwt".into()];
    let verifier = Verifier::new(&config(vec![strict])).expect("verifier");
    for typ in [Some("at+jwt"), Some("application/AT+JWT")] {
        assert_eq!(code(&verifier.verify(&token(typ), NOW)), "ok", "{typ:?}");
    }
    for typ in [Some("JWT"), None] {
        assert_eq!(
            code(&verifier.verify(&token(typ), NOW)),
            "wrong_token_type",
            "{typ:?} with token_types = [\"at+jwt\"]"
        );
    }
}

#[test]
fn a_re_encoded_ecdsa_signature_is_the_same_token() {
    let dev = DevIssuer::new("high-s");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let token = craft(&dev.header(), &claims(), &dev.key());
    let (signed, sig64) = token.rsplit_once('.').expect("three parts");
    let sig = URL_SAFE_NO_PAD.decode(sig64).expect("base64");
    let mut other = sig[..32].to_vec();
    other.extend(negate(&sig[32..]));
    assert_ne!(other, sig);
    let twin = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&other));
    let a = verifier.verify(&token, NOW).expect("the original verifies");
    let b = verifier.verify(&twin, NOW).expect("(r, n−s) verifies too");
    assert_eq!(
        a.token_sha256, b.token_sha256,
        "one fingerprint for both encodings"
    );
    assert_eq!(
        a.denial_key(),
        b.denial_key(),
        "one denial key for both encodings"
    );

    let with_jti = craft(&dev.header(), &with_claim("jti", json!("t-1")), &dev.key());
    let id = verifier.verify(&with_jti, NOW).expect("verifies");
    assert!(id.denial_key().starts_with("jti:"), "{}", id.denial_key());
}

fn with_claim(name: &str, value: serde_json::Value) -> serde_json::Value {
    let mut c = claims();
    c[name] = value;
    c
}

#[test]
fn duplicate_payload_members_and_future_iat_are_refused() {
    let dev = DevIssuer::new("dups");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let c = claims();
    let payload = format!(
        r#"{{"iss":{},"aud":{},"sub":"alice","sub":"root","exp":{}}}"#,
        c["iss"], c["aud"], c["exp"]
    );
    let header = dev.header().to_string();
    let dup = craft_bytes("ES256", header.as_bytes(), payload.as_bytes(), &dev.key());
    let err = verifier
        .verify(&dup, NOW)
        .expect_err("duplicates are refused");
    assert_eq!(err.code(), "malformed");
    assert!(err.to_string().contains("\"sub\" appears twice"), "{err}");
    let nested = format!(
        r#"{{"iss":{},"aud":{},"sub":"a","exp":{},"device":{{"managed":false,"managed":true}}}}"#,
        c["iss"], c["aud"], c["exp"]
    );
    let dup = craft_bytes("ES256", header.as_bytes(), nested.as_bytes(), &dev.key());
    assert_eq!(code(&verifier.verify(&dup, NOW)), "malformed");

    let future = craft(
        &dev.header(),
        &with_claim("iat", json!(NOW + 3600)),
        &dev.key(),
    );
    assert_eq!(code(&verifier.verify(&future, NOW)), "not_yet_valid");
    let ending = craft(
        &dev.header(),
        &with_claim("exp", json!(NOW + 2)),
        &dev.key(),
    );
    assert_eq!(
        code(&verifier.verify(&ending, NOW)),
        "expired",
        "2 s left is not worth a session"
    );
}

#[test]
fn a_key_replaced_under_the_same_kid_is_reloaded_on_the_bad_signature() {
    let dev = DevIssuer::new("same-kid");
    let tuning = Tuning {
        on_demand_every: Duration::from_secs(3600),
        ..Tuning::default()
    };
    let verifier =
        Verifier::with_tuning(&config(vec![dev.issuer(&["ES256"])]), tuning).expect("verifier");
    assert_eq!(
        code(&verifier.verify(&craft(&dev.header(), &claims(), &dev.key()), NOW)),
        "ok"
    );

    // The provider restarts with a new key and keeps the kid.
    let replacement = new_ec_key();
    write_jwks(&dev.keys.jwks, &[ec_jwk(&replacement, &dev.keys.kid)]);
    let token = craft(&dev.header(), &claims(), &Key::Ec(replacement));
    assert!(
        verifier.verify_cached(&token, NOW).is_none(),
        "a bad signature under a known kid is worth one re-read"
    );
    assert_eq!(
        code(&verifier.verify(&token, NOW)),
        "ok",
        "reloaded and retried"
    );
    // The re-read is rate-limited: a stream of forgeries under the kid fetches nothing more.
    let forged = craft(&dev.header(), &claims(), &Key::Ec(new_ec_key()));
    assert_eq!(code(&verifier.verify(&forged, NOW)), "bad_signature");
    let status = &verifier.key_status()[0];
    assert_eq!(status.kids, std::slice::from_ref(&dev.keys.kid));
    assert!(
        status.last_fetch_unix.is_some() && status.last_error.is_none(),
        "{status:?}"
    );
}

#[test]
fn jwks_max_age_brings_the_next_refresh_forward_within_bounds() {
    let key = new_ec_key();
    let provider = Provider::start(Reply::Cached(
        json!({"keys": [ec_jwk(&key, "k1")]}),
        "public, max-age=120".into(),
    ));
    let mut cfg = issuer(&provider.issuer, &["ES256"]);
    cfg.discovery = Some(true);
    let tuning = Tuning {
        on_demand_every: Duration::ZERO,
        ..Tuning::default()
    };
    let verifier = Verifier::with_tuning(&config(vec![cfg]), tuning).expect("verifier");
    let status = &verifier.key_status()[0];
    assert!(
        !status.loaded && status.next_refresh_unix.is_none(),
        "{status:?}"
    );
    assert!(
        status.kids.is_empty() && status.last_fetch_unix.is_none(),
        "{status:?}"
    );
    assert_eq!(
        code(&verifier.verify(&provider.token("k1", &Key::Ec(key)), NOW)),
        "ok"
    );
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let status = &verifier.key_status()[0];
    assert_eq!(status.kids, ["k1"]);
    let next = status.next_refresh_unix.expect("a periodic refresh is due");
    // refresh_secs is 3600: max-age 120 brings it forward to about two minutes.
    assert!(
        (now + 100..=now + 121).contains(&next),
        "next refresh at {next}, expected about {now} + 120"
    );

    provider.set_jwks(Reply::Cached(
        json!({"keys": [ec_jwk(&new_ec_key(), "k2")]}),
        "no-store".into(),
    ));
    let unknown = provider.token("k2", &Key::Ec(new_ec_key()));
    assert_eq!(code(&verifier.verify(&unknown, NOW)), "bad_signature");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let next = verifier.key_status()[0].next_refresh_unix.expect("due");
    assert!(
        (now + 50..=now + 61).contains(&next),
        "no-store waits the 60 s floor, not a fetch loop: next at {next}, now {now}"
    );
}

#[test]
fn clients_are_not_told_the_providers_internals() {
    let rejection = crate::auth::Rejection::KeysUnavailable {
        detail: "https://idp.internal/jwks: invalid peer certificate: UnknownIssuer".into(),
    };
    let told = rejection.client_message();
    assert!(
        !told.contains("idp.internal") && !told.contains("UnknownIssuer"),
        "{told}"
    );
    assert!(
        rejection.to_string().contains("UnknownIssuer"),
        "the log keeps the detail"
    );
    assert_eq!(
        crate::auth::Rejection::Expired.client_message(),
        "the token has expired"
    );
}

#[test]
fn the_same_claims_in_another_member_order_are_the_same_token_for_denial() {
    let dev = DevIssuer::new("reorder");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let c = claims();
    let header = dev.header().to_string();
    let one = format!(
        r#"{{"iss":{},"aud":{},"sub":"alice","exp":{}}}"#,
        c["iss"], c["aud"], c["exp"]
    );
    let other = format!(
        r#"{{"exp":{},"sub":"alice","aud":{},"iss":{}}}"#,
        c["exp"], c["aud"], c["iss"]
    );
    let a = verifier
        .verify(
            &craft_bytes("ES256", header.as_bytes(), one.as_bytes(), &dev.key()),
            NOW,
        )
        .expect("verifies");
    let b = verifier
        .verify(
            &craft_bytes("ES256", header.as_bytes(), other.as_bytes(), &dev.key()),
            NOW,
        )
        .expect("verifies");
    assert_ne!(
        a.token_sha256, b.token_sha256,
        "two encodings, two fingerprints"
    );
    assert_eq!(
        a.denial_key(),
        b.denial_key(),
        "one denial key for the same claims in any order"
    );
}
