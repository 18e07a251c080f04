//! Hostile and broken tokens: each is refused with its exact code, and none is accepted.

use serde_json::{Value, json};

use super::fixtures::*;
use crate::auth::{MAX_TOKEN_BYTES, Rejection, Verifier};

/// The dev issuer allowing ES256 and RS256, with the dev EC key and an RSA key in its JWKS.
fn setup() -> (DevIssuer, Verifier) {
    let dev = DevIssuer::new("hostile");
    write_jwks(&dev.keys.jwks, &[dev.jwk(), rsa_jwk("rsa-1")]);
    let verifier = Verifier::new(&config(vec![dev.issuer(&["ES256", "RS256"])])).expect("verifier");
    (dev, verifier)
}

fn with(base: Value, key: &str, value: Value) -> Value {
    let mut v = base;
    v[key] = value;
    v
}

fn without(base: Value, key: &str) -> Value {
    let mut v = base;
    v.as_object_mut().map(|m| m.remove(key));
    v
}

#[test]
fn hostile_tokens_are_rejected_with_exact_codes() {
    let (dev, verifier) = setup();
    let key = dev.key();
    let h = dev.header();
    let good = craft(&h, &claims(), &key);
    assert_eq!(
        code(&verifier.verify(&good, NOW)),
        "ok",
        "the baseline must verify"
    );
    let [h64, p64, s64] = {
        let parts: Vec<&str> = good.split('.').collect();
        [parts[0], parts[1], parts[2]]
    };

    let unsigned = |alg: &str| {
        format!(
            "{}.{}.",
            b64(json!({"alg": alg, "kid": dev.keys.kid}).to_string()),
            b64(claims().to_string())
        )
    };
    let rsa = Key::Rsa(rsa_key());
    let mut cases: Vec<(&str, String, &str)> = vec![
        ("alg none", unsigned("none"), "algorithm_not_allowed"),
        ("alg NONE", unsigned("NONE"), "algorithm_not_allowed"),
        (
            "alg nOnE with a signature",
            format!("{}{s64}", unsigned("nOnE")),
            "algorithm_not_allowed",
        ),
        (
            "alg not in the issuer's list",
            craft(&json!({"alg": "PS256", "kid": "rsa-1"}), &claims(), &rsa),
            "algorithm_not_allowed",
        ),
        (
            "alg unknown",
            craft(&json!({"alg": "XS999", "kid": "rsa-1"}), &claims(), &rsa),
            "algorithm_not_allowed",
        ),
        (
            "unknown kid",
            craft(&with(h.clone(), "kid", json!("nope")), &claims(), &key),
            "unknown_key",
        ),
        (
            "kid is a path",
            craft(
                &with(h.clone(), "kid", json!("../../etc/passwd")),
                &claims(),
                &key,
            ),
            "unknown_key",
        ),
        (
            "kid is a URL",
            craft(
                &with(h.clone(), "kid", json!("https://evil/x")),
                &claims(),
                &key,
            ),
            "unknown_key",
        ),
        (
            "ES256 naming the RSA key",
            craft(&with(h.clone(), "kid", json!("rsa-1")), &claims(), &key),
            "unknown_key",
        ),
        (
            "jku pointing elsewhere, signed by another key",
            craft(
                &with(h.clone(), "jku", json!("https://evil/jwks")),
                &claims(),
                &Key::Ec(new_ec_key()),
            ),
            "bad_signature",
        ),
        (
            "another key with the same kid",
            craft(&h, &claims(), &Key::Ec(new_ec_key())),
            "bad_signature",
        ),
        (
            "tampered payload",
            format!(
                "{h64}.{}.{s64}",
                b64(with(claims(), "sub", json!("root")).to_string())
            ),
            "bad_signature",
        ),
        (
            "truncated signature",
            format!("{h64}.{p64}.{}", &s64[..20]),
            "bad_signature",
        ),
        ("empty signature", format!("{h64}.{p64}."), "bad_signature"),
        (
            "expired",
            craft(&h, &with(claims(), "exp", json!(NOW - 31)), &key),
            "expired",
        ),
        (
            "not yet valid",
            craft(&h, &with(claims(), "nbf", json!(NOW + 31)), &key),
            "not_yet_valid",
        ),
        (
            "exp as a string",
            craft(&h, &with(claims(), "exp", json!("9999999999")), &key),
            "malformed",
        ),
        (
            "nbf as a string",
            craft(&h, &with(claims(), "nbf", json!("0")), &key),
            "malformed",
        ),
        (
            "wrong aud",
            craft(&h, &with(claims(), "aud", json!("someone-else")), &key),
            "wrong_audience",
        ),
        (
            "wrong aud array",
            craft(&h, &with(claims(), "aud", json!(["a", "b"])), &key),
            "wrong_audience",
        ),
        (
            "missing aud",
            craft(&h, &without(claims(), "aud"), &key),
            "missing_claim",
        ),
        (
            "missing exp",
            craft(&h, &without(claims(), "exp"), &key),
            "missing_claim",
        ),
        (
            "missing iss",
            craft(&h, &without(claims(), "iss"), &key),
            "missing_claim",
        ),
        (
            "wrong iss",
            craft(
                &h,
                &with(claims(), "iss", json!("https://evil.example")),
                &key,
            ),
            "unknown_issuer",
        ),
        (
            "iss with a trailing slash",
            craft(
                &h,
                &with(claims(), "iss", json!("https://idp.flowwarden.dev/")),
                &key,
            ),
            "unknown_issuer",
        ),
        ("malformed base64", "!!!.@@@.###".into(), "malformed"),
        (
            "bad base64 payload",
            format!("{h64}.*{p64}.{s64}"),
            "malformed",
        ),
        ("padded header", format!("{h64}=.{p64}.{s64}"), "malformed"),
        (
            "header not JSON",
            format!("{}.{p64}.{s64}", b64("{alg")),
            "malformed",
        ),
        (
            "header without alg",
            format!("{}.{p64}.{s64}", b64("{\"kid\":\"x\"}")),
            "malformed",
        ),
        (
            "payload not an object",
            format!("{h64}.{}.{s64}", b64("[1,2]")),
            "malformed",
        ),
        (
            "crit header",
            craft(&with(h.clone(), "crit", json!(["b64"])), &claims(), &key),
            "malformed",
        ),
        ("two parts", format!("{h64}.{p64}"), "malformed"),
        (
            "five parts (JWE)",
            format!("{h64}.{p64}.{s64}.a.b"),
            "malformed",
        ),
        ("empty", String::new(), "malformed"),
        ("1 MiB", "a".repeat(1024 * 1024), "too_large"),
        (
            "one byte over",
            format!("{h64}.{p64}.{}", "A".repeat(MAX_TOKEN_BYTES)),
            "too_large",
        ),
    ];
    for (i, secret) in rsa_public_bytes().into_iter().enumerate() {
        let name = if i == 0 {
            "HS256 with the RSA key's DER"
        } else {
            "HS256 with the RSA key's PEM"
        };
        let token = craft(
            &json!({"alg": "HS256", "kid": "rsa-1"}),
            &claims(),
            &Key::Secret(secret),
        );
        cases.push((name, token, "algorithm_not_allowed"));
    }

    let mut failures = Vec::new();
    for (name, token, want) in &cases {
        let got = verifier.verify(token, NOW);
        if code(&got) != *want {
            failures.push(format!("{name}: want {want}, got {got:?}"));
        }
        if let Err(e) = &got {
            let text = format!("{e} {e:?}");
            let leaked = token
                .split('.')
                .any(|part| part.len() > 12 && text.contains(part));
            if leaked {
                failures.push(format!("{name}: the rejection quotes the token: {text}"));
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn rejections_carry_exact_details() {
    let (dev, verifier) = setup();
    let key = dev.key();
    let h = dev.header();
    let reject = |payload: Value| verifier.verify(&craft(&h, &payload, &key), NOW).err();
    let malformed = |detail: &str| {
        Some(Rejection::Malformed {
            detail: detail.into(),
        })
    };
    let missing = |claim: &str| {
        Some(Rejection::MissingClaim {
            claim: claim.into(),
        })
    };
    assert_eq!(
        reject(with(claims(), "exp", json!("1"))),
        malformed("exp must be a number")
    );
    assert_eq!(
        reject(with(claims(), "nbf", json!("1"))),
        malformed("nbf must be a number")
    );
    assert_eq!(reject(without(claims(), "aud")), missing("aud"));
    assert_eq!(reject(without(claims(), "exp")), missing("exp"));
    assert_eq!(reject(without(claims(), "iss")), missing("iss"));
    assert_eq!(reject(without(claims(), "sub")), missing("sub"));
    let body = b64(claims().to_string());
    assert_eq!(
        verifier
            .verify(&format!("{}.{body}.", b64(r#"{"alg":"None"}"#)), NOW)
            .err(),
        Some(Rejection::AlgorithmNotAllowed { alg: "None".into() })
    );
    let long_alg = "X".repeat(500);
    let r = verifier.verify(
        &format!("{}.{body}.", b64(json!({"alg": long_alg}).to_string())),
        NOW,
    );
    assert!(
        matches!(&r, Err(Rejection::AlgorithmNotAllowed { alg }) if alg.len() <= 32),
        "an attacker's alg is echoed only briefly: {r:?}"
    );
    assert_eq!(Rejection::TooLarge.code(), "too_large");
}

/// Found by the `token` fuzz target: a header signed by the trusted key, with invalid UTF-8
/// in a member the verifier does not read, was accepted (serde_json skips such members
/// unchecked). It is not UTF-8 JSON, so it is not a JWS header.
#[test]
fn a_signed_header_that_is_not_utf8_is_malformed() {
    let (dev, verifier) = setup();
    let mut header = format!(r#"{{"alg":"ES256","kid":"{}","x":"#, dev.keys.kid).into_bytes();
    header.extend_from_slice(b"[\"\xc9xp\"]}");
    let payload = claims().to_string();
    let token = craft_bytes("ES256", &header, payload.as_bytes(), &dev.key());
    assert_eq!(
        verifier.verify(&token, NOW),
        Err(Rejection::Malformed {
            detail: "the header is not UTF-8".into()
        })
    );
    // The same header with valid UTF-8 there verifies: only the encoding was wrong.
    let fixed = String::from_utf8_lossy(&header).into_owned();
    let token = craft_bytes("ES256", fixed.as_bytes(), payload.as_bytes(), &dev.key());
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
}

#[test]
fn size_limit_is_exact() {
    let (_dev, verifier) = setup();
    let at_limit = "a".repeat(MAX_TOKEN_BYTES);
    assert_eq!(code(&verifier.verify(&at_limit, NOW)), "malformed");
    let over = "a".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(code(&verifier.verify(&over, NOW)), "too_large");
}

#[test]
fn junk_never_panics_or_passes() {
    let (dev, verifier) = setup();
    let good = craft(&dev.header(), &claims(), &dev.key());
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..2000 {
        // Flip, drop or duplicate bytes of a valid token.
        let mut bytes = good.clone().into_bytes();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() as usize) % bytes.len();
            match next() % 3 {
                0 => bytes[at] = b"A.-_z9=\"{"[(next() % 9) as usize],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, bytes[at]),
            }
        }
        let token = String::from_utf8_lossy(&bytes).into_owned();
        if token == good {
            continue;
        }
        let got = verifier.verify(&token, NOW);
        assert_ne!(code(&got), "ok", "a mangled token was accepted: {token}");
    }
}
