//! Tests of the policy as a whole: loading a directory, file order, fingerprints, and the
//! shipped example.

use std::{net::IpAddr, path::Path};

use super::{testdir::TestDir, *};
use crate::identity::test_identity;

const SSH: &str = "[[resource]]\nname = 'ssh'\nprotocol = 'tcp'\nports = [22]\n";

#[test]
fn a_directory_loads_in_name_order() {
    let dir = TestDir::new();
    dir.write(
        "20-rules.toml",
        "[[rule]]\nname = 'b'\nresources = ['ssh']\neveryone = true\n",
    );
    dir.write("10-ssh.toml", SSH);
    dir.write(
        "30-more.toml",
        "[[rule]]\nname = 'a'\nresources = ['ssh']\ngroups = ['x']\n",
    );
    dir.write("notes.txt", "not policy");
    dir.write(".#20-rules.toml", "an editor's lock file");
    std::fs::create_dir(dir.path().join("old")).unwrap();
    let p = load_policy(dir.path()).unwrap();
    let files: Vec<_> = p.files.iter().map(|f| f.file_name().unwrap()).collect();
    assert_eq!(files, ["10-ssh.toml", "20-rules.toml", "30-more.toml"]);
    let rules: Vec<&str> = p.rules.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(rules, ["b", "a"]);
    assert_eq!(
        p.rule("a").unwrap().location,
        format!("{}:2", p.files[2].display())
    );
    assert_eq!(load_resources(dir.path()).unwrap(), p.resources);
}

#[test]
fn an_empty_directory_denies_everything() {
    let dir = TestDir::new();
    let p = load_policy(dir.path()).unwrap();
    assert!(p.resources.resources.is_empty() && p.rules.is_empty() && p.files.is_empty());
    let d = p.evaluate(&test_identity("a@b", &[]), IpAddr::from([10, 0, 0, 1]));
    assert!(!d.is_allowed());
}

#[test]
fn a_missing_directory_says_its_path() {
    let dir = TestDir::new();
    let missing = dir.path().join("nope");
    let err = load_policy(&missing).unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "cannot read policy directory {}: No such file or directory (os error 2)",
            missing.display()
        )
    );
}

#[test]
fn fingerprints_follow_names_and_contents() {
    let fp = |files: &[(&str, &str)]| {
        parse_policy(files.iter().map(|(p, t)| (Path::new(*p), *t)))
            .unwrap()
            .fingerprint
    };
    let one = fp(&[("/etc/p/a.toml", SSH), ("/etc/p/b.toml", "")]);
    assert_eq!(one.len(), 16);
    assert!(one.bytes().all(|b| b.is_ascii_hexdigit()));
    // Independent of the directory's spelling and of the order given.
    assert_eq!(one, fp(&[("p/b.toml", ""), ("p/a.toml", SSH)]));
    assert_ne!(one, fp(&[("p/a.toml", SSH)]));
    assert_ne!(one, fp(&[("p/c.toml", SSH), ("p/b.toml", "")]));
    assert_ne!(
        one,
        fp(&[("p/a.toml", &format!("{SSH}\n")), ("p/b.toml", "")])
    );
    // Bytes moved between a name and a file's text are a different policy.
    assert_ne!(fp(&[("a.toml", "##")]), fp(&[("a.toml#", "#")]));
    let dir = TestDir::new();
    dir.write("a.toml", SSH);
    dir.write("b.toml", "");
    assert_eq!(load_policy(dir.path()).unwrap().fingerprint, one);
}

#[test]
fn errors_name_the_file_they_are_in() {
    let err = parse_policy([
        (Path::new("a.toml"), SSH),
        (
            Path::new("b.toml"),
            "[[resource]]\nname = 'x'\nprotocol = 'tcp'\nports = [22]\n",
        ),
    ])
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "b.toml:4: resource.ports: tcp/22 is already protected by resource \"ssh\" for the \
         same destinations: give each resource its own ports or disjoint destinations"
    );
    let err = parse_policy([(Path::new("a.toml"), "x = \n")])
        .unwrap_err()
        .to_string();
    assert_eq!(err, "a.toml:1: toml: invalid string: expected `\"`, `'`");
}

#[test]
fn the_shipped_example_grants_what_it_says() {
    let text = include_str!("../../../policies/example.toml");
    let p = parse_policy([(Path::new("policies/example.toml"), text)]).unwrap();
    assert!(p.rules.len() >= 2, "the example shows rules");
    let mut alice = test_identity("alice@corp.example", &["ops"]);
    alice.device.managed = Some(true);
    alice.device.compliant = Some(true);
    alice.device.os = Some("linux".into());
    alice
        .claims
        .insert("amr".into(), serde_json::json!(["pwd", "hwk"]));
    let d = p.evaluate(&alice, IpAddr::from([10, 1, 2, 3]));
    assert_eq!(d.grants.len(), 1, "{d:?}");
    assert_eq!(
        (d.grants[0].resource.as_str(), d.grants[0].rule.as_str()),
        ("ssh", "ops-ssh")
    );
    let e = p.explain(&alice, Some(IpAddr::from([10, 1, 2, 3])), "admin-console");
    assert!(!e.allowed, "{e:?}");
}
