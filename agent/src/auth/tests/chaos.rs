//! A hostile identity provider on 127.0.0.1: JWKS endpoints that hang, trickle, answer 500,
//! serve garbage or huge bodies, or rotate keys while tokens arrive. Verification must degrade
//! to a specific rejection, never accept a token that no currently published key signed, never
//! hold a token up for longer than the fetch budget, and recover by itself.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::json;

use super::{
    fixtures::*,
    provider::{Provider, Reply},
};
use crate::auth::{Rejection, Verifier, source::Tuning};

/// The budget of one key fetch in these tests (5 s in production).
const BUDGET: Duration = Duration::from_millis(400);
/// Least time between token-triggered fetches in these tests (10 s in production).
const ON_DEMAND_EVERY: Duration = Duration::from_millis(200);
/// A provider this slow is one the verifier must give up on.
const FOREVER: Duration = Duration::from_secs(10);
/// Liveness bound for a verification that meets a dead provider: far above [`BUDGET`], far
/// below [`FOREVER`], so that it tells "gave up at the budget" from "waited for the server".
const GAVE_UP: Duration = Duration::from_secs(3);

fn verifier_for(provider: &Provider, refresh_every: Option<Duration>) -> Verifier {
    let mut issuer = issuer(&provider.issuer, &["ES256"]);
    issuer.discovery = Some(true);
    let tuning = Tuning {
        http_timeout: BUDGET,
        on_demand_every: ON_DEMAND_EVERY,
        retry_after_failure: refresh_every.unwrap_or(ON_DEMAND_EVERY),
        refresh_every,
    };
    Verifier::with_tuning(&config(vec![issuer]), tuning).expect("verifier")
}

/// Waits out the on-demand rate limit, so that the next unknown kid fetches again.
fn past_the_rate_limit() {
    thread::sleep(ON_DEMAND_EVERY + Duration::from_millis(50));
}

/// Polls `cond` for up to 5 s.
fn eventually(mut cond: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(20));
    }
    cond()
}

fn unavailable_because(got: &Result<crate::identity::Identity, Rejection>, why: &str) -> bool {
    matches!(got, Err(Rejection::KeysUnavailable { detail }) if detail.contains(why))
}

#[test]
fn garbage_from_the_provider_is_refused_with_its_reason_then_healed() {
    let good = new_ec_key();
    let good_jwk = ec_jwk(&good, "good");
    let good = Key::Ec(good);
    let forger = Key::Ec(new_ec_key());
    let huge = {
        let mut b = b"{\"keys\": [], \"pad\": \"".to_vec();
        b.resize(2 * 1024 * 1024, b'x');
        b.extend_from_slice(b"\"}");
        b
    };
    let cases: Vec<(&str, Reply, &str)> = vec![
        (
            "html",
            Reply::Body(b"<html>surprise</html>".to_vec()),
            "not a JWKS document",
        ),
        ("empty body", Reply::Body(Vec::new()), "not a JWKS document"),
        (
            "JSON array",
            Reply::Json(json!([good_jwk])),
            "not a JWKS document",
        ),
        (
            "keys not a list",
            Reply::Json(json!({"keys": "good"})),
            "not a JWKS document",
        ),
        (
            "no keys",
            Reply::Json(json!({"keys": []})),
            "none of its 0 keys",
        ),
        (
            "keys that cannot verify ES256",
            Reply::Json(json!({"keys": [
                {"kty": "EC", "crv": "P-256", "kid": "good", "x": "!!", "y": "??"},
                {"kty": "EC", "crv": "P-256", "kid": "good"},
                {"kty": "oct", "kid": "good", "k": "c2VjcmV0"},
                {"kty": "EC", "crv": "P-521", "kid": "good", "x": "AA", "y": "AA"},
                {"kty": "RSA", "kid": "good", "n": "AQAB", "e": "AQAB"},
                {"kty": "EC", "crv": "P-256", "kid": "good", "use": "enc",
                 "x": good_jwk["x"], "y": good_jwk["y"]},
                "not even an object",
            ]})),
            "none of its 7 keys",
        ),
        ("HTTP 500", Reply::Status(500), "HTTP status 500"),
        ("HTTP 404", Reply::Status(404), "HTTP status 404"),
        (
            "HTTP 302",
            Reply::Status(302),
            "HTTP status 302 (redirects are not followed)",
        ),
        ("2 MiB body", Reply::Body(huge), "larger than 1048576 bytes"),
        ("endless body", Reply::Endless, "larger than 1048576 bytes"),
    ];
    for (what, reply, why) in cases {
        let provider = Provider::start(reply);
        let verifier = verifier_for(&provider, None);
        let token = provider.token("good", &good);
        let forged = provider.token("good", &forger);
        let got = verifier.verify(&token, NOW);
        assert!(unavailable_because(&got, why), "{what}: {got:?}");
        // Within the rate limit: the same failure, no new fetch, and still nothing accepted.
        let fetched = provider.jwks_requests();
        let got = verifier.verify(&forged, NOW);
        assert!(unavailable_because(&got, why), "{what}, forged: {got:?}");
        assert_eq!(provider.jwks_requests(), fetched, "{what}: rate-limited");
        let status = &verifier.key_status()[0];
        assert!(
            !status.loaded
                && status
                    .last_error
                    .as_deref()
                    .is_some_and(|e| e.contains(why)),
            "{what}: {status:?}"
        );

        provider.publish(std::slice::from_ref(&good_jwk));
        past_the_rate_limit();
        assert_eq!(code(&verifier.verify(&token, NOW)), "ok", "{what}: healed");
        assert_eq!(
            code(&verifier.verify(&forged, NOW)),
            "bad_signature",
            "{what}: a forged token after healing"
        );
        assert_eq!(verifier.key_status()[0].last_error, None, "{what}");
    }
}

#[test]
fn a_bad_discovery_document_is_refused_with_its_reason() {
    let key = new_ec_key();
    let jwk = ec_jwk(&key, "k");
    let key = Key::Ec(key);
    let provider = Provider::start(Reply::Json(json!({ "keys": [jwk] })));
    let token = provider.token("k", &key);
    let cases: Vec<(&str, Reply, &str)> = vec![
        (
            "garbage",
            Reply::Body(b"\x00\xff".to_vec()),
            "not an OpenID discovery document",
        ),
        (
            "no jwks_uri",
            Reply::Json(json!({"issuer": provider.issuer})),
            "missing field `jwks_uri`",
        ),
        ("HTTP 500", Reply::Status(500), "HTTP status 500"),
        (
            "keys elsewhere",
            Reply::Json(json!({"issuer": provider.issuer, "jwks_uri": "http://203.0.113.7/jwks"})),
            "not an https:// URL",
        ),
        (
            "another issuer",
            Reply::Json(
                json!({"issuer": "https://idp.evil.example", "jwks_uri": "http://127.0.0.1:9/"}),
            ),
            "idp.evil.example",
        ),
    ];
    for (what, reply, why) in cases {
        provider.set_document(Some(reply));
        let verifier = verifier_for(&provider, None);
        let got = verifier.verify(&token, NOW);
        assert!(unavailable_because(&got, why), "{what}: {got:?}");
        provider.set_document(None);
        past_the_rate_limit();
        assert_eq!(code(&verifier.verify(&token, NOW)), "ok", "{what}: healed");
    }
}

#[test]
fn a_stalled_provider_costs_a_token_at_most_the_fetch_budget() {
    let key = new_ec_key();
    let jwk = ec_jwk(&key, "k");
    let key = Key::Ec(key);
    let good = || Reply::Json(json!({ "keys": [jwk.clone()] }));
    let stalled = |r: Reply| Reply::After(FOREVER, Box::new(r));
    // (what, discovery document, JWKS)
    let cases: Vec<(&str, Option<Reply>, Reply)> = vec![
        (
            "document never comes",
            Some(stalled(Reply::Status(500))),
            good(),
        ),
        ("JWKS never comes", None, stalled(good())),
        ("JWKS trickles", None, Reply::Trickle),
    ];
    for (what, document, jwks) in cases {
        let provider = Provider::start(jwks);
        provider.set_document(document);
        let verifier = verifier_for(&provider, None);
        let token = provider.token("k", &key);
        let started = Instant::now();
        let got = verifier.verify(&token, NOW);
        let waited = started.elapsed();
        assert!(unavailable_because(&got, "timed out"), "{what}: {got:?}");
        assert!(
            waited < GAVE_UP,
            "{what}: the token waited {waited:?}; the fetch budget is {BUDGET:?}"
        );
        provider.set_document(None);
        provider.set_jwks(good());
        past_the_rate_limit();
        assert_eq!(
            code(&verifier.verify(&token, NOW)),
            "ok",
            "{what}: recovers"
        );
    }
}

#[test]
fn the_two_requests_of_discovery_share_one_budget() {
    // Each answer alone fits in the budget; both together do not. A per-request timeout would
    // let a token wait for twice the budget (and the provider decide how long).
    let key = new_ec_key();
    let jwk = ec_jwk(&key, "k");
    let key = Key::Ec(key);
    let each = BUDGET * 3 / 4;
    let provider = Provider::start(Reply::After(
        each,
        Box::new(Reply::Json(json!({"keys": [jwk]}))),
    ));
    let document =
        json!({"issuer": provider.issuer, "jwks_uri": format!("{}/jwks", provider.issuer)});
    provider.set_document(Some(Reply::After(each, Box::new(Reply::Json(document)))));
    let verifier = verifier_for(&provider, None);
    let got = verifier.verify(&provider.token("k", &key), NOW);
    assert!(unavailable_because(&got, "jwks"), "{got:?}");
}

#[test]
fn a_fetch_in_flight_holds_up_no_token_whose_key_is_known() {
    let known = new_ec_key();
    let known_jwk = ec_jwk(&known, "known");
    let known = Key::Ec(known);
    let provider = Provider::start(Reply::Json(json!({ "keys": [known_jwk] })));
    let verifier = Arc::new(verifier_for(&provider, None));
    let token = provider.token("known", &known);
    assert_eq!(code(&verifier.verify(&token, NOW)), "ok");

    provider.set_jwks(Reply::After(FOREVER, Box::new(Reply::Status(500))));
    past_the_rate_limit();
    let fetched = provider.jwks_requests();
    let stranger = provider.token("rotated", &known);
    let fetcher = {
        let (verifier, stranger) = (verifier.clone(), stranger.clone());
        thread::spawn(move || {
            let started = Instant::now();
            (verifier.verify(&stranger, NOW), started.elapsed())
        })
    };
    assert!(
        eventually(|| provider.jwks_requests() > fetched),
        "the unknown kid should start a fetch"
    );
    // While that fetch hangs, tokens with a known kid verify at once from the cached set, and
    // another unknown kid waits for the fetch under way instead of starting its own.
    for _ in 0..100 {
        assert_eq!(code(&verifier.verify(&token, NOW)), "ok");
    }
    assert!(
        !fetcher.is_finished(),
        "the fetch should still be in flight"
    );
    let started = Instant::now();
    let other = verifier.verify(&provider.token("other", &known), NOW);
    assert_eq!(code(&other), "unknown_key", "{other:?}");
    assert!(started.elapsed() < GAVE_UP, "{:?}", started.elapsed());

    let (got, waited) = fetcher.join().expect("fetcher");
    assert!(unavailable_because(&got, "timed out"), "{got:?}");
    assert!(waited < GAVE_UP, "the token waited {waited:?}");
    assert_eq!(
        provider.jwks_requests(),
        fetched + 1,
        "one fetch for both unknown kids"
    );
}

#[test]
fn rotation_admits_new_keys_once_published_and_retires_old_ones() {
    let (a, b, forger) = (new_ec_key(), new_ec_key(), Key::Ec(new_ec_key()));
    let (a_jwk, b_jwk) = (ec_jwk(&a, "a"), ec_jwk(&b, "b"));
    let (a, b) = (Key::Ec(a), Key::Ec(b));
    let provider = Provider::start(Reply::Json(json!({ "keys": [a_jwk] })));
    let verifier = verifier_for(&provider, None);
    let old = provider.token("a", &a);
    let new = provider.token("b", &b);
    assert_eq!(code(&verifier.verify(&old, NOW)), "ok");

    // A token signed with the next key arrives before the provider publishes it.
    past_the_rate_limit();
    assert_eq!(
        code(&verifier.verify(&new, NOW)),
        "unknown_key",
        "not published yet"
    );
    provider.publish(&[a_jwk.clone(), b_jwk.clone()]);
    let fetched = provider.jwks_requests();
    assert_eq!(
        code(&verifier.verify(&new, NOW)),
        "unknown_key",
        "published, but the last fetch was a moment ago"
    );
    assert_eq!(provider.jwks_requests(), fetched, "rate-limited");
    past_the_rate_limit();
    assert_eq!(
        code(&verifier.verify(&new, NOW)),
        "ok",
        "fetched once published"
    );
    assert_eq!(
        code(&verifier.verify(&old, NOW)),
        "ok",
        "both keys are published"
    );

    // Keys crossed with kids, and a forger who learned the kids, are refused.
    for (what, token) in [
        ("kid a, signed by b", provider.token("a", &b)),
        ("kid b, signed by a", provider.token("b", &a)),
        ("kid a, forged", provider.token("a", &forger)),
        ("kid b, forged", provider.token("b", &forger)),
    ] {
        assert_eq!(
            code(&verifier.verify(&token, NOW)),
            "bad_signature",
            "{what}"
        );
    }

    // The old key is withdrawn; once the verifier refetches, its tokens are refused.
    provider.publish(std::slice::from_ref(&b_jwk));
    past_the_rate_limit();
    assert_eq!(
        code(&verifier.verify(&provider.token("c", &b), NOW)),
        "unknown_key",
        "an unknown kid refetches the set"
    );
    assert_eq!(
        code(&verifier.verify(&old, NOW)),
        "unknown_key",
        "a withdrawn key"
    );
    assert_eq!(code(&verifier.verify(&new, NOW)), "ok");
}

#[test]
fn a_kid_reused_for_a_new_key_is_picked_up_by_the_periodic_refresh() {
    let (first, second) = (new_ec_key(), new_ec_key());
    let (first_jwk, second_jwk) = (ec_jwk(&first, "k"), ec_jwk(&second, "k"));
    let (first, second) = (Key::Ec(first), Key::Ec(second));
    let provider = Provider::start(Reply::Json(json!({ "keys": [first_jwk] })));
    let verifier = verifier_for(&provider, Some(Duration::from_millis(200)));
    let before = provider.token("k", &first);
    let after = provider.token("k", &second);
    assert_eq!(code(&verifier.verify(&before, NOW)), "ok");

    provider.publish(std::slice::from_ref(&second_jwk));
    // The cached key answers for "k" until the next refresh: the new signature does not
    // verify with it, and a bad signature is no reason to refetch.
    assert!(
        eventually(|| code(&verifier.verify(&after, NOW)) == "ok"),
        "the periodic refresh should load the new key under the old kid"
    );
    assert_eq!(code(&verifier.verify(&before, NOW)), "bad_signature");

    // The provider breaks: the last good set stays in force, and heals by itself.
    provider.set_jwks(Reply::Status(503));
    assert!(eventually(|| verifier.key_status()[0].last_error.is_some()));
    assert_eq!(code(&verifier.verify(&after, NOW)), "ok", "last good keys");
    provider.publish(&[second_jwk]);
    assert!(eventually(|| verifier.key_status()[0].last_error.is_none()));
    assert_eq!(code(&verifier.verify(&after, NOW)), "ok");
}

#[test]
fn a_rotation_storm_never_lets_a_forged_token_through() {
    let (a, b) = (new_ec_key(), new_ec_key());
    let (a_jwk, b_jwk) = (ec_jwk(&a, "a"), ec_jwk(&b, "b"));
    let (a, b, forger) = (Key::Ec(a), Key::Ec(b), Key::Ec(new_ec_key()));
    let provider = Arc::new(Provider::start(Reply::Json(json!({ "keys": [a_jwk] }))));
    let verifier = Arc::new(verifier_for(&provider, Some(Duration::from_millis(100))));
    let legit = [provider.token("a", &a), provider.token("b", &b)];
    let forged = [
        provider.token("a", &forger),
        provider.token("b", &forger),
        provider.token("c", &forger),
        provider.token("b", &a),
        provider.token("a", &b),
    ];
    let states = [
        Reply::Json(json!({ "keys": [a_jwk] })),
        Reply::Json(json!({ "keys": [a_jwk, b_jwk] })),
        Reply::Json(json!({ "keys": [b_jwk] })),
        Reply::Body(b"{\"keys\": [".to_vec()),
        Reply::Status(500),
        Reply::After(
            BUDGET / 2,
            Box::new(Reply::Json(json!({ "keys": [b_jwk, a_jwk] }))),
        ),
        Reply::Trickle,
    ];
    let stop = Arc::new(AtomicBool::new(false));
    let rotator = {
        let (provider, stop) = (provider.clone(), stop.clone());
        thread::spawn(move || {
            for state in states.iter().cycle() {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                provider.set_jwks(state.clone());
                thread::sleep(Duration::from_millis(40));
            }
        })
    };
    let checkers: Vec<_> = (0..4)
        .map(|_| {
            let (verifier, stop) = (verifier.clone(), stop.clone());
            let (legit, forged) = (legit.clone(), forged.clone());
            thread::spawn(move || {
                let mut accepted = 0;
                while !stop.load(Ordering::Acquire) {
                    for token in &legit {
                        let got = code(&verifier.verify(token, NOW));
                        assert!(
                            ["ok", "unknown_key", "keys_unavailable"].contains(&got),
                            "a signed token got {got}"
                        );
                        accepted += usize::from(got == "ok");
                    }
                    for (i, token) in forged.iter().enumerate() {
                        let got = verifier.verify(token, NOW);
                        assert!(got.is_err(), "SECURITY: forged token {i} was accepted");
                    }
                }
                accepted
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(1500));
    stop.store(true, Ordering::Release);
    rotator.join().expect("rotator");
    let accepted: usize = checkers
        .into_iter()
        .map(|c| c.join().expect("checker"))
        .sum();
    assert!(
        accepted > 0,
        "no signed token was accepted during the storm"
    );

    // The storm ends with b alone: the verifier settles there by itself.
    provider.publish(std::slice::from_ref(&b_jwk));
    assert!(
        eventually(|| {
            code(&verifier.verify(&legit[1], NOW)) == "ok"
                && code(&verifier.verify(&legit[0], NOW)) == "unknown_key"
        }),
        "after the storm, b verifies and the withdrawn a does not"
    );
}
