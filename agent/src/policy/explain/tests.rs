//! Tests of explain: the allowing rule, every reason a rule does not apply, unknown resources.

use std::{net::IpAddr, path::Path};

use serde_json::json;

use crate::{
    identity::test_identity,
    policy::{evaluate::tests::policy, parse_policy},
};

fn ip(s: &str) -> Option<IpAddr> {
    Some(s.parse().unwrap())
}

#[test]
fn allowed_names_the_rule() {
    let p = policy();
    let mut id = test_identity("alice@corp.example", &["ops"]);
    id.device.managed = Some(true);
    let e = p.explain(&id, ip("10.1.2.3"), "ssh");
    assert!(e.allowed);
    assert_eq!(e.rule.as_deref(), Some("ops-ssh"));
    assert_eq!(
        e.reasons,
        ["rule ops-ssh: grants ssh to alice@corp.example from 10.1.2.3"]
    );
    // Without a source, the source limit is mentioned, not checked.
    let e = p.explain(&id, None, "ssh");
    assert_eq!(
        e.reasons,
        ["rule ops-ssh: grants ssh to alice@corp.example from [10.0.0.0/8] only"]
    );
    let e = p.explain(&test_identity("x@y", &[]), None, "console");
    assert_eq!(e.rule.as_deref(), Some("lobby"));
    let e = p.explain(&test_identity("x@y", &[]), ip("192.0.2.1"), "console");
    assert_eq!(
        e.reasons,
        ["rule lobby: grants console to x@y from 192.0.2.1"]
    );
    assert_eq!(
        serde_json::to_value(&e).unwrap(),
        json!({
            "resource": "console",
            "allowed": true,
            "rule": "lobby",
            "reasons": ["rule lobby: grants console to x@y from 192.0.2.1"],
        })
    );
}

#[test]
fn denied_says_why_for_each_rule() {
    let p = policy();
    let mut id = test_identity("bob@corp.example", &["eng"]);
    id.device.managed = Some(false);
    id.claims.insert("amr".into(), json!(["pwd"]));
    let e = p.explain(&id, ip("192.0.2.1"), "ssh");
    assert!(!e.allowed);
    assert_eq!(e.rule, None);
    assert_eq!(
        e.reasons,
        [
            "rule ops-ssh: bob@corp.example is neither one of users [carol@corp.example, \
             sub-robot] nor in groups [ops]; device.managed required, the token says false; \
             source 192.0.2.1 is not in [10.0.0.0/8]",
            "rule mfa-web: claim acr must be mfa, the token has no acr claim; claim amr must \
             be one of [hwk, otp], the token says [pwd]",
        ]
    );

    let mut dba = test_identity("dan@corp.example", &["dba"]);
    dba.claims.insert("level".into(), json!(4));
    dba.claims
        .insert("email_verified".into(), json!({"by": "idp"}));
    dba.device.os = Some("windows".into());
    let e = p.explain(&dba, None, "db");
    assert_eq!(
        e.reasons,
        [
            "rule dba: claim email_verified must be true, the token's email_verified claim is \
          not a value or a list; claim level must be 3, the token says 4; device.compliant \
          required, the token has no device_compliant claim; device.os must be one of \
          [linux], the token says windows"
        ]
    );

    let e = p.explain(&test_identity("x@y", &[]), ip("10.0.0.1"), "console");
    assert_eq!(
        e.reasons,
        ["rule lobby: source 10.0.0.1 is not in [192.0.2.0/24, 2001:db8::/32]"]
    );
}

#[test]
fn who_alone_and_device_alone() {
    let p = parse_policy([(
        Path::new("p.toml"),
        "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n\
         [[rule]]\nname = 'ops-ssh'\nresources = ['ssh']\ngroups = ['ops']\n\
         [[rule]]\nname = 'people'\nresources = ['ssh']\nusers = ['carol@corp.example']\n\
         [[rule]]\nname = 'laptops'\nresources = ['ssh']\neveryone = true\n\
         device = { compliant = true }\n",
    )])
    .unwrap();
    let mut id = test_identity("alice@corp.example", &[]);
    id.device.compliant = Some(false);
    let e = p.explain(&id, ip("10.0.0.1"), "ssh");
    assert_eq!(
        e.reasons,
        [
            "rule ops-ssh: alice@corp.example is not in groups [ops]",
            "rule people: alice@corp.example is not one of users [carol@corp.example]",
            "rule laptops: device.compliant required, the token says false",
        ]
    );
    // A later rule allows: only it is named.
    id.device.compliant = Some(true);
    let e = p.explain(&id, ip("10.0.0.1"), "ssh");
    assert_eq!(e.rule.as_deref(), Some("laptops"));
    assert_eq!(e.reasons.len(), 1);
}

#[test]
fn unknown_and_ungranted_resources() {
    let p = policy();
    let id = test_identity("alice@corp.example", &["ops"]);
    let e = p.explain(&id, None, "smtp");
    assert!(!e.allowed);
    assert_eq!(
        e.reasons,
        ["unknown resource smtp (resources: ssh, web, db, console)"]
    );
    let p = parse_policy([(
        Path::new("p.toml"),
        "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n",
    )])
    .unwrap();
    assert_eq!(
        p.explain(&id, None, "ssh").reasons,
        ["no rule grants resource ssh"]
    );
    let empty = parse_policy([]).unwrap();
    assert_eq!(
        empty.explain(&id, None, "ssh").reasons,
        ["unknown resource ssh (resources: none are defined)"]
    );
}

#[test]
fn explain_agrees_with_evaluate() {
    let p = policy();
    let sources = ["10.0.0.1", "192.0.2.9", "172.16.0.1", "2001:db8::1"];
    let mut people = Vec::new();
    for groups in [&[][..], &["ops"], &["dba"], &["eng", "ops"]] {
        for managed in [None, Some(true), Some(false)] {
            for acr in [None, Some("mfa")] {
                let mut id = test_identity("Carol@corp.example", groups);
                id.device.managed = managed;
                id.device.compliant = managed;
                id.device.os = Some("linux".into());
                if let Some(acr) = acr {
                    id.claims.insert("acr".into(), json!(acr));
                    id.claims.insert("amr".into(), json!("otp"));
                    id.claims.insert("level".into(), json!(3));
                    id.claims.insert("email_verified".into(), json!(true));
                }
                people.push(id);
            }
        }
    }
    for id in &people {
        for source in sources {
            let d = p.evaluate(id, source.parse().unwrap());
            for r in &p.resources.resources {
                let e = p.explain(id, ip(source), &r.name);
                let granted = d.grants.iter().find(|g| g.resource == r.name);
                assert_eq!(
                    e.rule.as_deref(),
                    granted.map(|g| g.rule.as_str()),
                    "{} from {source} to {}: {e:?} vs {d:?}",
                    id.user(),
                    r.name
                );
            }
        }
    }
}
