//! Tests of evaluation: who, claims, device posture, sources, everyone, combined settings and
//! default deny; and a micro-benchmark to run by hand.

use std::{net::IpAddr, path::Path};

use serde_json::json;

use super::*;
use crate::{
    identity::{Device, test_identity},
    policy::parse_policy,
};

pub(crate) const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]
[[resource]]
name = "web"
protocol = "tcp"
ports = [443]
[[resource]]
name = "db"
protocol = "tcp"
ports = [5432]
[[resource]]
name = "console"
protocol = "tcp"
ports = [8443]

[[rule]]
name = "ops-ssh"
resources = ["ssh"]
users = ["carol@corp.example", "sub-robot"]
groups = ["ops"]
sources = ["10.0.0.0/8"]
device = { managed = true }
session = { max_duration = "4h", reconnect = false }

[[rule]]
name = "mfa-web"
resources = ["web", "ssh"]
claims = { acr = "mfa", amr = ["hwk", "otp"] }
session = { max_duration = "12h", idle_timeout = "5m" }

[[rule]]
name = "dba"
resources = ["db"]
groups = ["dba"]
claims = { level = 3, email_verified = true }
[rule.device]
compliant = true
os = ["linux"]

[[rule]]
name = "lobby"
resources = ["console"]
everyone = true
sources = ["192.0.2.0/24", "2001:db8::/32"]
session = { dormant_timeout = "30m", reconnect = true }
"#;

pub(crate) fn policy() -> Policy {
    parse_policy([(Path::new("p.toml"), POLICY)]).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn managed(mut id: Identity) -> Identity {
    id.device.managed = Some(true);
    id
}

/// `(resource, rule)` of each grant.
fn grants(d: &Decision) -> Vec<(&str, &str)> {
    d.grants
        .iter()
        .map(|g| (g.resource.as_str(), g.rule.as_str()))
        .collect()
}

#[test]
fn groups_users_and_subjects() {
    let p = policy();
    let ops = managed(test_identity("alice@corp.example", &["eng", "ops"]));
    let d = p.evaluate(&ops, ip("10.1.2.3"));
    assert_eq!(grants(&d), [("ssh", "ops-ssh")]);
    assert_eq!(
        d.grants[0].resource_id,
        p.resources.by_name("ssh").unwrap().id
    );
    assert_eq!(d.denied_reason, None);
    assert!(d.is_allowed());

    // Emails match case-insensitively, subjects exactly.
    let carol = managed(test_identity("Carol@Corp.EXAMPLE", &[]));
    assert_eq!(
        grants(&p.evaluate(&carol, ip("10.9.9.9"))),
        [("ssh", "ops-ssh")]
    );
    let mut robot = managed(test_identity("robot@corp.example", &[]));
    robot.subject = "sub-robot".into();
    robot.email = None;
    assert_eq!(
        grants(&p.evaluate(&robot, ip("10.9.9.9"))),
        [("ssh", "ops-ssh")]
    );
    robot.subject = "SUB-ROBOT".into();
    assert!(!p.evaluate(&robot, ip("10.9.9.9")).is_allowed());

    // Group names are exact.
    let dev = managed(test_identity("dave@corp.example", &["eng", "Ops"]));
    let d = p.evaluate(&dev, ip("10.1.2.3"));
    assert!(d.grants.is_empty());
    assert_eq!(
        d.denied_reason.as_deref(),
        Some("no rule grants dave@corp.example anything from 10.1.2.3")
    );
    assert_eq!(d.settings, DEFAULT_SETTINGS);
}

#[test]
fn device_posture_true_false_absent() {
    let p = policy();
    let mut id = test_identity("alice@corp.example", &["ops"]);
    for (managed, want) in [
        (Some(true), None),
        (
            Some(false),
            Some("device.managed required, the token says false"),
        ),
        (
            None,
            Some("device.managed required, the token has no device_managed claim"),
        ),
    ] {
        id.device.managed = managed;
        let d = p.evaluate(&id, ip("10.0.0.1"));
        assert_eq!(d.denied_reason.as_deref(), want, "managed = {managed:?}");
        assert_eq!(d.is_allowed(), want.is_none());
    }

    let mut dba = test_identity("dan@corp.example", &["dba"]);
    dba.claims.insert("level".into(), json!(3));
    dba.claims.insert("email_verified".into(), json!(true));
    let cases: [(Device, Option<&str>); 4] = [
        (
            Device {
                compliant: Some(true),
                os: Some("Linux".into()),
                ..Device::default()
            },
            None,
        ),
        (
            Device {
                compliant: Some(true),
                os: Some("windows".into()),
                ..Device::default()
            },
            Some("device.os must be one of [linux], the token says windows"),
        ),
        (
            Device {
                compliant: Some(true),
                ..Device::default()
            },
            Some("device.os must be one of [linux], the token has no device_os claim"),
        ),
        (
            Device {
                os: Some("linux".into()),
                ..Device::default()
            },
            Some("device.compliant required, the token has no device_compliant claim"),
        ),
    ];
    for (device, want) in cases {
        dba.device = device.clone();
        let d = p.evaluate(&dba, ip("198.51.100.1"));
        assert_eq!(d.denied_reason.as_deref(), want, "{device:?}");
        if want.is_none() {
            assert_eq!(grants(&d), [("db", "dba")]);
        }
    }
}

#[test]
fn claims_with_lists_numbers_and_booleans() {
    let p = policy();
    let mut id = test_identity("erin@corp.example", &[]);
    let from = ip("198.51.100.7");
    assert!(!p.evaluate(&id, from).is_allowed());
    id.claims.insert("acr".into(), json!("mfa"));
    assert!(!p.evaluate(&id, from).is_allowed(), "amr is missing");
    for (amr, allowed) in [
        (json!(["pwd", "otp"]), true),
        (json!("hwk"), true),
        (json!(["pwd"]), false),
        (json!([]), false),
        (json!({"otp": true}), false),
    ] {
        id.claims.insert("amr".into(), amr.clone());
        let d = p.evaluate(&id, from);
        assert_eq!(d.is_allowed(), allowed, "amr = {amr}");
        if allowed {
            assert_eq!(grants(&d), [("web", "mfa-web"), ("ssh", "mfa-web")]);
        }
    }
    id.claims.insert("acr".into(), json!("MFA"));
    assert!(
        !p.evaluate(&id, from).is_allowed(),
        "claim values are exact"
    );

    let mut dba = test_identity("dan@corp.example", &["dba"]);
    dba.device.compliant = Some(true);
    dba.device.os = Some("linux".into());
    dba.claims.insert("email_verified".into(), json!(true));
    for (level, allowed) in [
        (json!(3), true),
        (json!("3"), true),
        (json!(4), false),
        (json!(3.5), false),
    ] {
        dba.claims.insert("level".into(), level.clone());
        assert_eq!(
            p.evaluate(&dba, from).is_allowed(),
            allowed,
            "level = {level}"
        );
    }
    dba.claims.insert("email_verified".into(), json!("false"));
    assert!(!p.evaluate(&dba, from).is_allowed());
}

#[test]
fn sources_and_everyone() {
    let p = policy();
    let nobody = test_identity("zed@elsewhere.example", &[]);
    let d = p.evaluate(&nobody, ip("192.0.2.44"));
    assert_eq!(grants(&d), [("console", "lobby")]);
    assert_eq!(d.settings.dormant_timeout_secs, 30 * 60);
    assert_eq!(
        grants(&p.evaluate(&nobody, ip("2001:db8::5"))),
        [("console", "lobby")]
    );
    let d = p.evaluate(&nobody, ip("192.0.3.1"));
    assert_eq!(
        d.denied_reason.as_deref(),
        Some("no rule grants zed@elsewhere.example anything from 192.0.3.1")
    );

    // A device failure is only named when it is all that stands in the way.
    let ops = test_identity("alice@corp.example", &["ops"]);
    let d = p.evaluate(&ops, ip("172.16.0.1"));
    assert_eq!(
        d.denied_reason.as_deref(),
        Some("no rule grants alice@corp.example anything from 172.16.0.1")
    );
    let ops = managed(ops);
    assert!(p.evaluate(&ops, ip("172.16.0.1")).grants.is_empty());
    assert_eq!(
        grants(&p.evaluate(&ops, ip("192.0.2.1"))),
        [("console", "lobby")]
    );
}

#[test]
fn several_rules_combine_conservatively() {
    let p = policy();
    let mut id = managed(test_identity("alice@corp.example", &["ops"]));
    id.claims.insert("acr".into(), json!("mfa"));
    id.claims.insert("amr".into(), json!(["otp"]));
    let d = p.evaluate(&id, ip("10.0.0.9"));
    // ssh: first granting rule in file order; web from the second.
    assert_eq!(grants(&d), [("ssh", "ops-ssh"), ("web", "mfa-web")]);
    assert_eq!(
        d.settings,
        SessionSettings {
            max_duration_secs: 4 * 3600,
            idle_timeout_secs: 5 * 60,
            dormant_timeout_secs: DEFAULT_SETTINGS.dormant_timeout_secs,
            reconnect: false,
        }
    );
    // From the lobby's network, ops-ssh does not apply: its limits and its "no reconnect"
    // do not either.
    let d = p.evaluate(&id, ip("192.0.2.1"));
    assert_eq!(
        grants(&d),
        [("web", "mfa-web"), ("ssh", "mfa-web"), ("console", "lobby")]
    );
    assert_eq!(
        d.settings,
        SessionSettings {
            max_duration_secs: 12 * 3600,
            idle_timeout_secs: 5 * 60,
            dormant_timeout_secs: 30 * 60,
            reconnect: true,
        }
    );
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["grants"][0]["rule"], "mfa-web");
    assert_eq!(json["denied_reason"], serde_json::Value::Null);
}

#[test]
fn default_deny() {
    let p = parse_policy([(
        Path::new("p.toml"),
        "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n",
    )])
    .unwrap();
    let d = p.evaluate(
        &test_identity("root@corp.example", &["ops"]),
        ip("10.0.0.1"),
    );
    assert!(d.grants.is_empty());
    assert_eq!(d.settings, DEFAULT_SETTINGS);
    assert_eq!(
        d.denied_reason.as_deref(),
        Some("no rule grants root@corp.example anything from 10.0.0.1")
    );
    let empty = parse_policy([]).unwrap();
    assert!(
        !empty
            .evaluate(&test_identity("a@b", &[]), ip("::1"))
            .is_allowed()
    );
}

#[test]
fn many_rules_spill_the_rule_set_to_the_heap() {
    let mut text = String::from("[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n");
    for i in 0..300 {
        text.push_str(&format!(
            "[[rule]]\nname = 'r{i}'\nresources = ['ssh']\ngroups = ['g{i}']\n"
        ));
    }
    let p = parse_policy([(Path::new("p.toml"), text.as_str())]).unwrap();
    for g in [0, 63, 64, 255, 256, 299] {
        let d = p.evaluate(&test_identity("a@b", &[&format!("g{g}")]), ip("10.0.0.1"));
        assert_eq!(d.grants[0].rule, format!("r{g}"));
    }
    assert!(
        !p.evaluate(&test_identity("a@b", &["g300"]), ip("10.0.0.1"))
            .is_allowed()
    );
}

/// `cargo test --release -- --ignored --nocapture evaluation_speed`: figures, not assertions.
#[test]
#[ignore = "a benchmark: run by hand"]
fn evaluation_speed() {
    let mut text = String::from(POLICY);
    for i in 0..6 {
        text.push_str(&format!(
            "[[rule]]\nname = 'extra{i}'\nresources = ['db']\ngroups = ['team{i}', 'x{i}']\n\
             users = ['u{i}@corp.example']\nsources = ['10.{i}.0.0/16']\n"
        ));
    }
    let p = parse_policy([(Path::new("p.toml"), text.as_str())]).unwrap();
    let groups: Vec<String> = (0..20).map(|i| format!("group-{i}")).collect();
    let groups: Vec<&str> = groups.iter().map(String::as_str).chain(["ops"]).collect();
    let mut id = managed(test_identity("Alice@Corp.example", &groups));
    id.claims.insert("acr".into(), json!("mfa"));
    id.claims.insert("amr".into(), json!(["pwd", "otp"]));
    let denied = test_identity("nobody@corp.example", &groups[..20]);
    for (what, id, src) in [
        ("granted (2 rules, 21 groups)", &id, ip("10.1.2.3")),
        ("denied (21 groups)", &denied, ip("172.16.0.1")),
    ] {
        let n = 1_000_000u32;
        let start = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(p.evaluate(std::hint::black_box(id), src));
        }
        let per = start.elapsed() / n;
        println!(
            "evaluate, {} rules, {what}: {per:?} per call, {:?} per 100,000 sessions",
            p.rules.len(),
            per * 100_000
        );
    }
}
