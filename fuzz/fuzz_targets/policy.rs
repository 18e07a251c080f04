//! Fuzz target `policy`: arbitrary text as up to three policy files, parsed and validated as
//! one policy. Invalid text must be refused with `file:line: field: problem` naming one of the
//! files and a line inside it; a valid policy must then evaluate the same as it explains.
//!
//! Input: UTF-8 text (policy files are read as UTF-8), split into files at lines `#---`.

#![no_main]

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use flowwarden::{
    identity::{Device, Identity},
    policy::{Policy, PolicyError, Resource, parse_policy},
};
use libfuzzer_sys::fuzz_target;
use serde_json::json;

const NAMES: [&str; 3] = ["10-a.toml", "20-b.toml", "30-c.toml"];

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let texts: Vec<&str> = text.splitn(NAMES.len(), "\n#---\n").collect();
    let files: Vec<(&Path, &str)> = NAMES
        .iter()
        .map(Path::new)
        .zip(texts.iter().copied())
        .collect();
    match parse_policy(files.iter().copied()) {
        Ok(policy) => {
            each_resource_owns_its_ports(&policy);
            evaluation_matches_explanation(&policy);
        }
        Err(PolicyError::Invalid {
            location,
            field,
            problem,
        }) => {
            let (file, line) = location
                .rsplit_once(':')
                .unwrap_or_else(|| panic!("no line in {location:?}: {field}: {problem}"));
            let (_, text) = files
                .iter()
                .find(|(p, _)| Path::new(file) == *p)
                .unwrap_or_else(|| panic!("{location:?} names no file of the policy"));
            let line: usize = line.parse().expect("the line is a number");
            let lines = text.matches('\n').count() + 1;
            assert!(
                (1..=lines).contains(&line),
                "{location}: line outside the file's {lines} lines"
            );
            assert!(!field.is_empty() && !problem.is_empty());
            assert!(!problem.contains('\n'), "a multi-line problem: {problem:?}");
        }
        Err(other) => panic!("in-memory files failed with {other}"),
    }
});

/// Identical (protocol, port, prefix) claims are refused, so at each resource's own ports and
/// addresses the owner is that resource, or one with a longer prefix there.
fn each_resource_owns_its_ports(policy: &Policy) {
    let table = &policy.resources;
    let slots = table.port_slots();
    let _ = table.dst_entries();
    let prefix_at = |r: &Resource, dst: IpAddr| {
        r.destinations
            .iter()
            .filter(|n| n.contains(&dst))
            .map(|n| u32::from(n.prefix_len()) + 1)
            .max()
            .unwrap_or(0)
    };
    for r in &table.resources {
        let addrs: Vec<IpAddr> = if r.destinations.is_empty() {
            vec![IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3))]
        } else {
            r.destinations.iter().map(|n| n.network()).collect()
        };
        for &(lo, hi) in &r.ports {
            assert!(lo <= hi, "{}: range {lo}-{hi}", r.name);
            for port in [lo, hi] {
                for &dst in &addrs {
                    let owner = table
                        .resource_for(r.protocol, port, dst)
                        .unwrap_or_else(|| panic!("no owner for {}'s {port} at {dst}", r.name));
                    let (mine, theirs) = (prefix_at(r, dst), prefix_at(owner, dst));
                    assert!(
                        owner.id == r.id || theirs > mine,
                        "{} owns {}'s port {port} at {dst}",
                        owner.name,
                        r.name
                    );
                }
            }
        }
    }
    assert!(slots.values().all(|s| table.by_id(s.resource_id).is_some()));
}

/// The evaluation index and the rule-by-rule explanation must agree on every resource.
fn evaluation_matches_explanation(policy: &Policy) {
    let sources = [
        IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
        IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
        IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
    ];
    for identity in identities() {
        for source in sources {
            let decision = policy.evaluate(&identity, source);
            assert_eq!(decision.is_allowed(), decision.denied_reason.is_none());
            for resource in &policy.resources.resources {
                let explained = policy.explain(&identity, Some(source), &resource.name);
                let granted = decision.grants.iter().find(|g| g.resource == resource.name);
                assert_eq!(
                    explained.allowed,
                    granted.is_some(),
                    "evaluate and explain disagree on {} for {} from {source}: {:?}",
                    resource.name,
                    identity.subject,
                    explained.reasons
                );
                if let Some(grant) = granted {
                    assert_eq!(grant.resource_id, resource.id);
                    assert_eq!(explained.rule.as_deref(), Some(grant.rule.as_str()));
                }
            }
        }
    }
}

fn identities() -> Vec<Identity> {
    let identity = |subject: &str, email: Option<&str>, groups: &[&str], device: Device| {
        let claims: BTreeMap<String, serde_json::Value> = [
            ("sub", json!(subject)),
            ("amr", json!(["hwk"])),
            ("acr", json!("phr")),
            ("email_verified", json!(true)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Identity {
            issuer: "https://idp.example".into(),
            subject: subject.into(),
            email: email.map(Into::into),
            groups: groups.iter().map(|g| (*g).to_owned()).collect(),
            device,
            claims: claims.into(),
            token_sha256: String::new(),
            token_expires_at: u64::MAX,
            token_issued_at: None,
        }
    };
    vec![
        identity(
            "alice",
            Some("alice@corp.example"),
            &["ops"],
            Device {
                id: Some("laptop-1".into()),
                managed: Some(true),
                compliant: Some(true),
                os: Some("linux".into()),
            },
        ),
        identity("bob", None, &["platform-admins", "ops"], Device::default()),
        identity("eve", Some("eve@elsewhere.example"), &[], Device::default()),
    ]
}
