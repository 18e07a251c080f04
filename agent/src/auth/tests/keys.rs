//! Key files: loading errors at start, rotation picked up without a restart (on an unknown kid
//! and periodically), and the last good keys kept when the file turns bad.

use std::time::{Duration, Instant};

use serde_json::json;

use super::fixtures::*;
use crate::auth::{
    AuthConfigError, Verifier,
    dev::{self, DevClaims},
    source::Tuning,
};

#[test]
fn unreadable_or_useless_files_stop_the_start() {
    let dev = DevIssuer::new("keys-start");
    let mut issuer = dev.issuer(&["ES256"]);
    issuer.jwks_file = Some(dev.dir.path().join("missing.json"));
    let err = Verifier::new(&config(vec![issuer.clone()])).err();
    assert!(
        matches!(&err, Some(AuthConfigError::Unreadable { field, .. }) if field == "auth.issuer[0].jwks_file"),
        "{err:?}"
    );

    let garbage = dev.dir.path().join("garbage.json");
    write_file(&garbage, b"<html>");
    issuer.jwks_file = Some(garbage);
    let err = Verifier::new(&config(vec![issuer.clone()])).err();
    assert!(
        matches!(err, Some(AuthConfigError::BadKeys { .. })),
        "{err:?}"
    );

    // Keys of the wrong family only: nothing can verify ES256.
    let rsa_only = dev.dir.path().join("rsa.json");
    write_jwks(&rsa_only, &[rsa_jwk("rsa-1")]);
    issuer.jwks_file = Some(rsa_only);
    let err = Verifier::new(&config(vec![issuer]))
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.contains("none of its 1 keys can verify ES256")),
        "{err:?}"
    );
}

#[test]
fn unusable_keys_are_skipped_not_fatal() {
    let dev = DevIssuer::new("keys-skip");
    let junk = [
        json!({"kty": "oct", "kid": "sym", "k": b64("a-secret-that-must-never-be-used!")}),
        json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"}),
        json!({"kty": "RSA", "kid": "small", "n": b64([0xff; 128]), "e": "AQAB"}),
        json!({"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": "AA", "y": "AA"}),
        json!("not even an object"),
    ];
    let mut keys = junk.to_vec();
    keys.push(dev.jwk());
    write_jwks(&dev.keys.jwks, &keys);
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    assert_eq!(verifier.key_status()[0].keys, 1);
    let token = craft(&dev.header(), &claims(), &dev.key());
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
}

/// Admissions try `verify_cached` on the async worker first: it must answer from cached keys
/// exactly as `verify` does (accepting and rejecting), and defer, never reject, when only a
/// key fetch could answer.
#[test]
fn verify_cached_answers_from_cached_keys_and_defers_what_needs_a_fetch() {
    let dev = DevIssuer::new("keys-cached");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let claims = DevClaims::new("alice");
    let old = dev::token(&dev.keys.private_key, &dev.keys.kid, &claims, NOW).expect("old token");
    let cached = verifier
        .verify_cached(&old, NOW)
        .expect("answered from the cache");
    assert_eq!(cached.expect("verified").subject, "alice");

    let rotated = dev::keygen(dev.dir.path()).expect("rotate");
    let new = dev::token(&rotated.private_key, &rotated.kid, &claims, NOW).expect("new token");
    assert!(
        verifier.verify_cached(&new, NOW).is_none(),
        "an unknown kid is left to verify(), which may re-read the keys"
    );
    assert_eq!(code(&verifier.verify(&new, NOW)), "ok");
    assert_eq!(
        verifier.verify_cached(&new, NOW).map(|r| code(&r)),
        Some("ok"),
        "cached from then on"
    );
    // One signature character changed, away from the end (whose spare bits must stay zero).
    let at = new.len() - 10;
    let swapped = if &new[at..=at] == "A" { "B" } else { "A" };
    let forged = format!("{}{swapped}{}", &new[..at], &new[at + 1..]);
    // A bad signature under a known kid may mean a key replaced under the same kid: it is
    // left to verify() while a re-read is allowed, and answered from the cache once not.
    assert_eq!(
        verifier.verify_cached(&forged, NOW).map(|r| code(&r)),
        Some("bad_signature"),
        "the re-read just done rate-limits the next: a rejection needs no fetch"
    );
}

#[test]
fn rotated_file_is_picked_up_on_an_unknown_kid() {
    let dev = DevIssuer::new("keys-rotate");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let claims = DevClaims::new("alice");
    let old = dev::token(&dev.keys.private_key, &dev.keys.kid, &claims, NOW).expect("old token");
    assert_eq!(code(&verifier.verify(&old, NOW)), "ok");

    // Rotate: keygen rewrites the key and the JWKS (new kid) in place.
    let rotated = dev::keygen(dev.dir.path()).expect("rotate");
    assert_ne!(rotated.kid, dev.keys.kid);
    let new = dev::token(&rotated.private_key, &rotated.kid, &claims, NOW).expect("new token");
    assert_eq!(
        code(&verifier.verify(&new, NOW)),
        "ok",
        "the new key is found by re-reading the file"
    );
    assert_eq!(
        code(&verifier.verify(&old, NOW)),
        "unknown_key",
        "the withdrawn key is gone"
    );

    // A second rotation right away: re-reads on unknown kids are rate-limited.
    let again = dev::keygen(dev.dir.path()).expect("rotate again");
    let newest = dev::token(&again.private_key, &again.kid, &claims, NOW).expect("token");
    assert_eq!(code(&verifier.verify(&newest, NOW)), "unknown_key");
    assert_eq!(
        code(&verifier.verify(&new, NOW)),
        "ok",
        "the cached set still serves"
    );
}

#[test]
fn periodic_refresh_rotates_and_keeps_the_last_good_set() {
    let dev = DevIssuer::new("keys-periodic");
    let tuning = Tuning {
        refresh_every: Some(Duration::from_millis(100)),
        retry_after_failure: Duration::from_millis(100),
        // Only the periodic refresh may pick the rotation up.
        on_demand_every: Duration::from_secs(3600),
        ..Tuning::default()
    };
    let cfg = config(vec![dev.issuer(&["ES256"])]);
    let verifier = Verifier::with_tuning(&cfg, tuning).expect("verifier");
    let dev_jwk = dev.jwk();
    // Spend the one on-demand refresh now, so that only the periodic one is left.
    let stranger = craft(&json!({"alg": "ES256", "kid": "x"}), &claims(), &dev.key());
    assert_eq!(code(&verifier.verify(&stranger, NOW)), "unknown_key");

    let other = new_ec_key();
    write_jwks(&dev.keys.jwks, &[ec_jwk(&other, "next")]);
    let token = craft(
        &json!({"alg": "ES256", "kid": "next"}),
        &claims(),
        &Key::Ec(other),
    );
    assert!(
        wait_for(|| code(&verifier.verify(&token, NOW)) == "ok"),
        "the periodic refresh should load the rotated file"
    );

    // The file turns to garbage: the last good keys keep serving, the error is visible.
    write_file(&dev.keys.jwks, b"{\"keys\": \"truncated");
    assert!(
        wait_for(|| verifier.key_status()[0].last_error.is_some()),
        "the failed refresh should be reported"
    );
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
    let status = &verifier.key_status()[0];
    assert!(status.loaded && status.keys == 1, "{status:?}");
    assert!(status.source.starts_with("jwks_file "), "{status:?}");

    // And the file heals: the error clears by itself.
    write_jwks(&dev.keys.jwks, &[dev_jwk]);
    assert!(wait_for(|| verifier.key_status()[0].last_error.is_none()));
    let back = craft(&dev.header(), &claims(), &dev.key());
    assert_eq!(code(&verifier.verify(&back, NOW)), "ok");
}

/// Polls `cond` for up to 5 s.
fn wait_for(mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}
