//! Acceptance against a real, certified OpenID provider (panva's oidc-provider, installed by
//! `cargo xtask setup`): discovery and JWKS over HTTPS from a private CA, JWT access tokens
//! with nested posture and namespaced groups, and key rotation with a new kid and under the
//! same kid. Needs node, not root.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::Path,
    time::{Duration, Instant},
};

use flowwarden::{
    auth::{AuthConfig, ClaimMapping, IssuerConfig, Rejection, Verifier},
    identity::{ClaimPath, Identity},
    policy::parse_policy,
};
use flowwarden_tests::{
    agent_proc::Scratch,
    oidc::{CLIENT_ID, OidcProvider, PrivateCa},
};

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

/// The issuer as docs/configuration.md tells operators to write it for a provider behind a
/// private CA, with posture read from the nested `device` claim.
fn issuer(provider: &OidcProvider, ca_file: Option<&Path>) -> AuthConfig {
    let path = |p: &str| ClaimPath::parse(p).expect("claim path");
    AuthConfig {
        leeway_secs: 30,
        issuers: vec![IssuerConfig {
            issuer: provider.issuer.clone(),
            audiences: vec!["flowwarden".into()],
            algorithms: vec!["ES256".into()],
            jwks_file: None,
            discovery: Some(true),
            hs256_secret_file: None,
            ca_file: ca_file.map(Path::to_owned),
            // RFC 9068 access tokens only.
            token_types: vec!["at+jwt".into()],
            refresh_secs: 3600,
            claims: ClaimMapping {
                groups: path("https://corp.example/claims/groups"),
                device_id: path("/device/id"),
                device_managed: path("/device/managed"),
                device_compliant: path("/device/compliant"),
                device_os: path("/device/os"),
                ..ClaimMapping::default()
            },
        }],
    }
}

/// Verifies `token` until it is admitted or `within` passes: the on-demand key reload is
/// rate-limited (one per 10 s per issuer), and the test must not depend on when the previous
/// one happened. Returns every refusal seen on the way.
fn admitted_within(verifier: &Verifier, token: &str, within: Duration) -> (Identity, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut refusals = Vec::new();
    loop {
        match verifier.verify(token, now()) {
            Ok(identity) => return (identity, refusals),
            Err(e) => refusals.push(e.code().to_owned()),
        }
        assert!(
            Instant::now() < deadline,
            "not admitted within {within:?}; refusals: {refusals:?}; keys: {:?}",
            verifier.key_status()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn discovery_through_a_private_ca_admits_and_policy_reads_nested_posture() {
    let scratch = Scratch::new("oidc-admit");
    let ca = PrivateCa::generate(&scratch.dir);
    let provider = OidcProvider::start(&ca, "k1");
    let verifier = Verifier::new(&issuer(&provider, Some(&ca.ca_file))).expect("verifier");
    let token = provider.access_token(&ca);

    let identity = verifier.verify(&token, now()).expect("admitted");
    assert_eq!(identity.subject, CLIENT_ID);
    assert_eq!(identity.groups, ["ops"]);
    assert_eq!(identity.device.managed, Some(true), "{identity:?}");
    assert_eq!(identity.device.compliant, Some(true));
    assert_eq!(identity.device.os.as_deref(), Some("linux"));
    assert_eq!(identity.device.id.as_deref(), Some("laptop-7"));
    let keys = &verifier.key_status()[0];
    assert_eq!(keys.kids, ["k1"], "{keys:?}");
    assert!(
        keys.next_refresh_unix.is_some() && keys.last_error.is_none(),
        "{keys:?}"
    );

    let policy = parse_policy([(
        Path::new("p.toml"),
        r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[rule]]
name = "managed-ops"
resources = ["ssh"]
claims = { "/device/managed" = true, "https://corp.example/claims/groups" = "ops" }

[[rule]]
name = "unmanaged-only"
resources = ["ssh"]
claims = { "/device/managed" = false }
"#,
    )])
    .expect("policy");
    let decision = policy.evaluate(&identity, IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)));
    assert!(decision.is_allowed(), "{decision:?}");
    let rules: Vec<&str> = decision.grants.iter().map(|g| g.rule.as_str()).collect();
    assert_eq!(
        rules,
        ["managed-ops"],
        "only the rule on /device/managed = true grants"
    );
}

#[test]
fn without_the_ca_file_the_keys_are_unavailable_with_a_clear_reason() {
    let scratch = Scratch::new("oidc-noca");
    let ca = PrivateCa::generate(&scratch.dir);
    let provider = OidcProvider::start(&ca, "k1");
    let verifier = Verifier::new(&issuer(&provider, None)).expect("verifier");
    let token = provider.access_token(&ca);

    let refusal = verifier.verify(&token, now()).expect_err("no trusted CA");
    assert!(
        matches!(refusal, Rejection::KeysUnavailable { .. }),
        "{refusal:?}"
    );
    let detail = refusal.to_string();
    assert!(
        detail.contains("UnknownIssuer") && detail.contains("ca_file"),
        "the log and status say why and what to set: {detail}"
    );
    let told = refusal.client_message();
    assert!(
        !told.contains("127.0.0.1") && !told.contains("UnknownIssuer"),
        "the client is not told the provider's internals: {told}"
    );
    let keys = &verifier.key_status()[0];
    assert!(!keys.loaded, "{keys:?}");
    assert!(
        keys.last_error
            .as_deref()
            .is_some_and(|e| e.contains("UnknownIssuer")),
        "{keys:?}"
    );
}

#[test]
fn rotation_with_a_new_kid_and_under_the_same_kid_admits_new_tokens() {
    let scratch = Scratch::new("oidc-rotate");
    let ca = PrivateCa::generate(&scratch.dir);
    let mut provider = OidcProvider::start(&ca, "k1");
    let verifier = Verifier::new(&issuer(&provider, Some(&ca.ca_file))).expect("verifier");
    verifier
        .verify(&provider.access_token(&ca), now())
        .expect("admitted before any rotation");

    // A new key under a new kid.
    provider.restart(&ca, "k2");
    let second = provider.access_token(&ca);
    let (_, refusals) = admitted_within(&verifier, &second, Duration::from_secs(30));
    assert!(
        refusals.iter().all(|r| r == "unknown_key"),
        "before the reload, only unknown_key: {refusals:?}"
    );
    assert_eq!(verifier.key_status()[0].kids, ["k2"]);

    // A new key under the same kid: the old set's key fails the signature, and the
    // agent reloads instead of refusing every login until refresh_secs (an hour) passes.
    provider.restart(&ca, "k2");
    let third = provider.access_token(&ca);
    let (identity, refusals) = admitted_within(&verifier, &third, Duration::from_secs(30));
    assert!(
        refusals.iter().all(|r| r == "bad_signature"),
        "before the reload, only bad_signature: {refusals:?}"
    );
    assert_eq!(identity.device.managed, Some(true));
    assert_eq!(verifier.key_status()[0].kids, ["k2"]);
    assert_eq!(
        verifier.verify(&second, now()).map_err(|e| e.code()).err(),
        Some("bad_signature"),
        "a token of the replaced key is refused"
    );
}
