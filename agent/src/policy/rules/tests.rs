//! Tests of rule parsing and validation: good rules, and each bad one with its exact error.

use std::path::Path;

use super::*;
use crate::policy::{Policy, parse_policy};

/// Resources live in their own file so that line numbers in `p.toml` are the rule's own.
const RESOURCES: &str = "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n\
                         [[resource]]\nname = 'web'\nprotocol = 'tcp'\nports = [443]\n";

fn parse(rules: &str) -> Result<Policy, PolicyError> {
    parse_policy([
        (Path::new("r.toml"), RESOURCES),
        (Path::new("p.toml"), rules),
    ])
}

fn error(rules: &str) -> String {
    match parse(rules) {
        Ok(_) => panic!("expected an error for:\n{rules}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn the_documented_rule_parses() {
    let p = parse(
        r#"
[[rule]]
name = "ops-ssh"
resources = ["ssh", "web"]
users = ["Alice@Corp.example"]
groups = ["ops"]
everyone = false
claims = { acr = "mfa", amr = ["hwk", "otp"], email_verified = true, level = 3 }
sources = ["10.0.0.0/8", "192.0.2.7", "2001:db8::1/32"]
[rule.device]
managed = true
compliant = false
os = ["linux", "macos"]
[rule.session]
max_duration = "8h"
idle_timeout = "15m"
dormant_timeout = "1h30m"
reconnect = false
"#,
    )
    .unwrap();
    assert_eq!(p.rules.len(), 1);
    let r = &p.rules[0];
    assert_eq!(r.name, "ops-ssh");
    assert_eq!(r.location, "p.toml:3");
    assert_eq!(r.resources, ["ssh", "web"]);
    assert_eq!(
        r.targets().collect::<Vec<_>>(),
        [
            ("ssh", p.resources.by_name("ssh").unwrap().id),
            ("web", p.resources.by_name("web").unwrap().id)
        ]
    );
    assert_eq!(r.users, ["Alice@Corp.example"]);
    assert_eq!(r.groups, ["ops"]);
    assert!(!r.everyone);
    let claims: Vec<(&str, Vec<&str>)> = r
        .claims
        .iter()
        .map(|c| {
            (
                c.claim.as_str(),
                c.values.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        claims,
        [
            ("acr", vec!["mfa"]),
            ("amr", vec!["hwk", "otp"]),
            ("email_verified", vec!["true"]),
            ("level", vec!["3"]),
        ]
    );
    assert_eq!(
        r.device,
        DeviceRequirements {
            managed: Some(true),
            compliant: Some(false),
            os: vec!["linux".into(), "macos".into()],
        }
    );
    assert_eq!(
        r.session,
        SessionOverrides {
            max_duration_secs: Some(8 * 3600),
            idle_timeout_secs: Some(15 * 60),
            dormant_timeout_secs: Some(5400),
            reconnect: Some(false),
        }
    );
    let sources: Vec<String> = r.sources.iter().map(ToString::to_string).collect();
    assert_eq!(sources, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
}

#[test]
fn minimal_rules_and_rules_in_any_file() {
    let p = parse_policy([
        (
            Path::new("a.toml"),
            "[[rule]]\nname = 'all'\nresources = ['ssh']\neveryone = true\n",
        ),
        (Path::new("b.toml"), RESOURCES),
        (
            Path::new("c.toml"),
            "[[rule]]\nname = 'mfa'\nresources = ['web']\nclaims = { acr = 'mfa' }\n",
        ),
    ])
    .unwrap();
    assert_eq!(p.rules.len(), 2);
    assert!(p.rules[0].everyone && !p.rules[0].names_people());
    assert_eq!(p.rules[0].session, SessionOverrides::default());
    assert_eq!(p.rules[0].device, DeviceRequirements::default());
    assert!(p.rules[0].sources.is_empty());
    assert_eq!(p.rule("mfa").unwrap().location, "c.toml:2");
}

#[test]
fn bad_rules_say_file_line_field_and_what_is_allowed() {
    let cases: &[(&str, &str)] = &[
        (
            "[[rule]]\nname = 'Ops SSH'\nresources = ['ssh']\neveryone = true\n",
            "p.toml:2: rule.name: \"Ops SSH\": use 1 to 64 of a-z, 0-9, '-' and '_'",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = []\neveryone = true\n",
            "p.toml:3: rule.resources: empty: list the resources this rule grants, e.g. [\"ssh\"]",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = [\n  'ssh',\n  'sshd',\n]\neveryone = true\n",
            "p.toml:5: rule.resources: unknown resource \"sshd\" (resources: ssh, web)",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh', 'ssh']\neveryone = true\n",
            "p.toml:3: rule.resources: \"ssh\" is listed twice",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\n",
            "p.toml:2: rule.users: rule \"a\" matches nobody: list users, groups or claims, or \
             set everyone = true to grant every identity",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\nusers = []\ngroups = []\neveryone = false\n",
            "p.toml:2: rule.users: rule \"a\" matches nobody: list users, groups or claims, or \
             set everyone = true to grant every identity",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\ngroups = ['ops']\neveryone = true\n",
            "p.toml:5: rule.everyone: everyone = true already matches every identity: remove \
             users and groups, or set everyone = false",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\nusers = ['alice', ' ']\n",
            "p.toml:4: rule.users: an empty user name matches nothing: remove it",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.session]\n\
             max_duration = '8 hours'\n",
            "p.toml:6: rule.session.max_duration: \"8 hours\" is not a duration: write numbers \
             with units s, m, h or d, e.g. \"90s\", \"15m\", \"8h\", \"7d\" or \"1h30m\"",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.session]\n\
             max_duration = '31d'\n",
            "p.toml:6: rule.session.max_duration: \"31d\" is out of range: use 1m to 30d",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.session]\n\
             idle_timeout = '5s'\n",
            "p.toml:6: rule.session.idle_timeout: \"5s\" is out of range: use 10s to 7d",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n\
             session = { dormant_timeout = '0s' }\n",
            "p.toml:5: rule.session.dormant_timeout: \"0s\" is out of range: use 10s to 30d",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.session]\n\
             max_duration = 3600\n",
            "p.toml:6: rule.session.max_duration: invalid type: integer `3600`, expected a string",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.session]\n\
             reconect = false\n",
            "p.toml:6: rule.session.reconect: unknown key, expected one of `max_duration`, \
             `idle_timeout`, `dormant_timeout`, `reconnect`",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n\
             sources = ['10.0.0.0/8', '10.0.0.0/33']\n",
            "p.toml:5: rule.sources: \"10.0.0.0/33\" is not an address prefix: write e.g. \
             \"10.0.0.0/8\", \"2001:db8::/32\" or a single address",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\nclaims = { amr = [] }\n",
            "p.toml:4: rule.claims.amr: empty: list the values that match, e.g. [\"hwk\", \
             \"otp\"], or leave the claim out",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\nclaims = { level = 1.5 }\n",
            "p.toml:4: rule.claims.level: a claim matches a string, a boolean or an integer, \
             or a list of them",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.device]\nos = []\n",
            "p.toml:6: rule.device.os: empty: list the allowed systems, e.g. [\"linux\", \
             \"macos\"], or leave os out to allow any",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n[rule.device]\n\
             managed = 'yes'\n",
            "p.toml:6: rule.device.managed: invalid type: string \"yes\", expected a boolean",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n\n[[rule]]\n\
             name = 'a'\nresources = ['web']\neveryone = true\n",
            "p.toml:7: rule.name: \"a\" is defined twice (first at p.toml:2): rule names must \
             be unique",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\nusers = 'alice'\n",
            "p.toml:5: rule.users: invalid type: string \"alice\", expected a sequence",
        ),
        (
            "[[rule]]\nname = 'a'\nresources = ['ssh'\neveryone = true\n",
            "p.toml:4: toml: invalid array: expected `]`",
        ),
    ];
    for (text, want) in cases {
        assert_eq!(&error(text), want, "for:\n{text}");
    }
}

#[test]
fn duplicate_names_across_files_and_no_resources() {
    let rule = "[[rule]]\nname = 'a'\nresources = ['ssh']\neveryone = true\n";
    let err = parse_policy([
        (Path::new("r.toml"), RESOURCES),
        (Path::new("a.toml"), rule),
        (Path::new("b.toml"), rule),
    ])
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "b.toml:2: rule.name: \"a\" is defined twice (first at a.toml:2): rule names must be unique"
    );
    let err = parse_policy([(Path::new("p.toml"), rule)])
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "p.toml:3: rule.resources: unknown resource \"ssh\" (resources: none are defined)"
    );
}

#[test]
fn claim_paths_match_nested_and_namespaced_claims() {
    let p = parse(
        r#"
[[rule]]
name = "managed"
resources = ["ssh"]
claims = { "/device/managed" = true, "https://corp.example/claims/groups" = "ops", "/roles/name" = "db" }
"#,
    )
    .unwrap();
    let rule = &p.rules[0];
    let mut id = crate::identity::test_identity("a@corp.example", &[]);
    id.claims.insert(
        "device".into(),
        serde_json::json!({"managed": true, "os": "linux"}),
    );
    id.claims.insert(
        "https://corp.example/claims/groups".into(),
        serde_json::json!(["dev", "ops"]),
    );
    id.claims.insert(
        "roles".into(),
        serde_json::json!([{"name": "web"}, {"name": "db"}]),
    );
    assert!(rule.claims_match(&id), "{:?}", rule.claims);
    id.claims
        .insert("device".into(), serde_json::json!({"managed": false}));
    assert!(!rule.claims_match(&id));
    let why = crate::policy::explain::failures(rule, &id, None);
    assert!(
        why.iter()
            .any(|w| w.contains("claim /device/managed must be true")),
        "{why:?}"
    );
}

#[test]
fn claim_paths_that_do_not_parse_are_refused_with_their_line() {
    let err = error(
        "[[rule]]\nname = 'r'\nresources = ['ssh']\nclaims = { \"device.managed\" = true }\n",
    );
    assert!(
        err.starts_with("p.toml:4:") && err.contains("write \"/device/managed\""),
        "{err}"
    );
    let err = error("[[rule]]\nname = 'r'\nresources = ['ssh']\nclaims = { \"/a/~x\" = 1 }\n");
    assert!(err.contains("`~` must be followed"), "{err}");
}
