//! Tokens that must verify, and the identity they must produce.

use std::sync::Arc;

use serde_json::json;
use sha2::{Digest, Sha256};

use super::fixtures::*;
use crate::{
    auth::{
        Verifier,
        dev::{self, DEV_ISSUER, DevClaims},
    },
    identity::Device,
};

#[test]
fn verifier_is_send_sync() {
    fn shareable<T: Send + Sync + 'static>() {}
    shareable::<Verifier>();
    shareable::<Arc<Verifier>>();
}

#[test]
fn dev_token_becomes_the_identity() {
    let dev = DevIssuer::new("verify-dev");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let mut claims = DevClaims::new("alice");
    claims.email = Some("alice@corp.example".into());
    claims.groups = vec!["ops".into(), "dev".into()];
    claims.device_id = Some("laptop-7".into());
    claims.managed = Some(true);
    claims.compliant = Some(false);
    claims.os = Some("linux".into());
    claims.not_before_secs = Some(-10);
    let token = dev::token(&dev.keys.private_key, &dev.keys.kid, &claims, NOW).expect("token");

    let id = verifier
        .verify(&token, NOW + 5)
        .expect("a dev token verifies");
    assert_eq!(id.issuer, DEV_ISSUER);
    assert_eq!(id.subject, "alice");
    assert_eq!(id.email.as_deref(), Some("alice@corp.example"));
    assert_eq!(id.groups, ["ops", "dev"]);
    assert_eq!(
        id.device,
        Device {
            id: Some("laptop-7".into()),
            managed: Some(true),
            compliant: Some(false),
            os: Some("linux".into()),
        }
    );
    assert_eq!(id.token_expires_at, NOW + 3600);
    assert_eq!(id.token_issued_at, Some(NOW));
    assert_eq!(
        id.token_sha256,
        hex::encode(Sha256::digest(
            &token.as_bytes()[..token.rfind('.').unwrap()]
        )),
        "the fingerprint covers the signed part, not the signature"
    );
    assert_eq!(id.claims.get("nbf"), Some(json!(NOW - 10)));
    assert_eq!(id.claims.get("device_os"), Some(json!("linux")));
    assert!(
        !format!("{id:?}").contains(&token),
        "the identity must not carry the token"
    );
}

#[test]
fn groups_as_a_string_and_posture_as_strings() {
    let dev = DevIssuer::new("verify-strings");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let mut payload = claims();
    payload["groups"] = json!("ops");
    payload["device_managed"] = json!("true");
    payload["device_compliant"] = json!("false");
    payload["aud"] = json!(["other", "flowwarden"]);
    let token = craft(&dev.header(), &payload, &dev.key());
    let id = verifier.verify(&token, NOW).expect("verifies");
    assert_eq!(id.groups, ["ops"]);
    assert_eq!(id.device.managed, Some(true));
    assert_eq!(id.device.compliant, Some(false));
    assert_eq!(id.device.id, None);
    assert_eq!(id.email, None);
    assert_eq!(id.token_issued_at, Some(NOW));
}

#[test]
fn claim_mapping_is_followed() {
    let dev = DevIssuer::new("verify-mapping");
    let mut issuer = dev.issuer(&["ES256"]);
    issuer.claims.subject = crate::identity::ClaimPath::top("oid");
    issuer.claims.groups = crate::identity::ClaimPath::top("roles");
    issuer.claims.email = crate::identity::ClaimPath::top("upn");
    let verifier = Verifier::new(&config(vec![issuer])).expect("verifier");
    let mut payload = claims();
    payload["oid"] = json!("object-1");
    payload["roles"] = json!(["admin"]);
    payload["upn"] = json!("bob@corp.example");
    let id = verifier
        .verify(&craft(&dev.header(), &payload, &dev.key()), NOW)
        .expect("verifies");
    assert_eq!(id.subject, "object-1");
    assert_eq!(id.groups, ["admin"]);
    assert_eq!(id.email.as_deref(), Some("bob@corp.example"));

    payload.as_object_mut().map(|m| m.remove("oid"));
    let r = verifier.verify(&craft(&dev.header(), &payload, &dev.key()), NOW);
    assert_eq!(
        r.err(),
        Some(crate::auth::Rejection::MissingClaim {
            claim: "oid".into()
        })
    );
}

#[test]
fn every_key_family_verifies() {
    let dir = TempDir::new("verify-families");
    let ec = new_ec_key();
    let ed = new_ed_key();
    let jwks = dir.path().join("jwks.json");
    write_jwks(
        &jwks,
        &[rsa_jwk("rsa-1"), ec_jwk(&ec, "ec-1"), ed_jwk(&ed, "ed-1")],
    );
    let mut issuer = issuer(
        DEV_ISSUER,
        &[
            "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "EdDSA",
        ],
    );
    issuer.jwks_file = Some(jwks);
    let verifier = Verifier::new(&config(vec![issuer])).expect("verifier");
    let rsa = Key::Rsa(rsa_key());
    let cases = [
        ("RS256", "rsa-1", &rsa),
        ("RS384", "rsa-1", &rsa),
        ("RS512", "rsa-1", &rsa),
        ("PS256", "rsa-1", &rsa),
        ("PS384", "rsa-1", &rsa),
        ("PS512", "rsa-1", &rsa),
        ("ES256", "ec-1", &Key::Ec(ec)),
        ("EdDSA", "ed-1", &Key::Ed(ed)),
    ];
    for (alg, kid, key) in cases {
        let token = craft(&json!({"alg": alg, "kid": kid}), &claims(), key);
        assert_eq!(code(&verifier.verify(&token, NOW)), "ok", "{alg}");
    }
}

#[test]
fn without_a_kid_the_only_key_of_the_type_is_used() {
    let dev = DevIssuer::new("verify-nokid");
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    let token = craft(&json!({"alg": "ES256"}), &claims(), &dev.key());
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");

    // Two EC keys: none is guessed.
    let other = new_ec_key();
    write_jwks(&dev.keys.jwks, &[dev.jwk(), ec_jwk(&other, "second")]);
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier");
    assert_eq!(code(&verifier.verify(&token, NOW)), "unknown_key");
}

#[test]
fn hs256_with_a_configured_secret() {
    let dir = TempDir::new("verify-hs256");
    let secret_path = dir.path().join("secret");
    let secret = b"0123456789abcdef0123456789abcdef-long-enough".to_vec();
    std::fs::write(&secret_path, [&secret[..], b"\n"].concat()).expect("write secret");
    let mut cfg = issuer(DEV_ISSUER, &["HS256"]);
    cfg.hs256_secret_file = Some(secret_path.clone());
    let verifier = Verifier::new(&config(vec![cfg.clone()])).expect("verifier");

    let header = json!({"alg": "HS256", "kid": "anything"});
    let good = craft(&header, &claims(), &Key::Secret(secret));
    assert_eq!(code(&verifier.verify(&good, NOW)), "ok");
    let forged = craft(
        &header,
        &claims(),
        &Key::Secret(b"another-secret-of-enough-length!!".to_vec()),
    );
    assert_eq!(code(&verifier.verify(&forged, NOW)), "bad_signature");
    let rs = craft(&json!({"alg": "RS256"}), &claims(), &Key::Rsa(rsa_key()));
    assert_eq!(code(&verifier.verify(&rs, NOW)), "algorithm_not_allowed");

    std::fs::write(&secret_path, b"short\n").expect("write short secret");
    let err = Verifier::new(&config(vec![cfg]))
        .err()
        .map(|e| e.to_string());
    assert!(
        err.as_deref()
            .is_some_and(|e| e.starts_with("auth.issuer[0].hs256_secret_file: ")
                && e.contains("at least 32")),
        "{err:?}"
    );
}

#[test]
fn verifies_concurrently() {
    let dev = DevIssuer::new("verify-threads");
    let verifier =
        Arc::new(Verifier::new(&config(vec![dev.issuer(&["ES256"])])).expect("verifier"));
    let token = Arc::new(craft(&dev.header(), &claims(), &dev.key()));
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (v, t) = (Arc::clone(&verifier), Arc::clone(&token));
            std::thread::spawn(move || (0..50).all(|_| v.verify(&t, NOW).is_ok()))
        })
        .collect();
    for h in handles {
        assert!(
            h.join().expect("thread"),
            "every concurrent verification succeeds"
        );
    }
}
