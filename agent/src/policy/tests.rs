//! Tests of the policy as a whole: loading a directory, file order, fingerprints, and the
//! shipped example.

use std::{net::IpAddr, path::Path, sync::Arc};

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

/// Re-evaluation after a policy change asks `applicable().reaches(id)` instead of building a
/// decision: the two must agree on every resource, for identities that match by group, by
/// device, by source and not at all.
#[test]
fn applicable_rules_reach_exactly_the_granted_resources() {
    let text = include_str!("../../../policies/example.toml");
    let p = parse_policy([(Path::new("policies/example.toml"), text)]).unwrap();
    let mut managed = test_identity("alice@corp.example", &["ops", "dev"]);
    managed.device.managed = Some(true);
    managed.device.compliant = Some(true);
    managed.device.os = Some("linux".into());
    managed
        .claims
        .insert("amr".into(), serde_json::json!(["pwd", "hwk"]));
    let identities = [
        managed,
        test_identity("alice@corp.example", &["ops"]),
        test_identity("bob@corp.example", &["dev"]),
        test_identity("eve@elsewhere.example", &[]),
    ];
    let sources = [IpAddr::from([10, 1, 2, 3]), IpAddr::from([192, 0, 2, 7])];
    let mut granted_somewhere = 0;
    for identity in &identities {
        for source in sources {
            let decision = p.evaluate(identity, source);
            let applicable = p.applicable(identity, source);
            for resource in &p.resources.resources {
                let granted = decision.grants.iter().any(|g| g.resource_id == resource.id);
                granted_somewhere += usize::from(granted);
                assert_eq!(
                    applicable.reaches(resource.id),
                    granted,
                    "{} from {source} to {}",
                    identity.user(),
                    resource.name
                );
            }
        }
    }
    assert!(
        granted_somewhere > 0,
        "the example grants something to someone"
    );
}

/// The policy in force while every hostile edit below is tried: the line numbers of its
/// resources and rule appear in the duplicate-name errors.
const BASE: &str = "\
[[resource]]
name = 'ssh'
protocol = 'tcp'
ports = [22]

[[resource]]
name = 'web'
protocol = 'tcp'
ports = ['8000-8010']
destinations = ['10.0.0.0/8']

[[rule]]
name = 'ops'
resources = ['ssh', 'web']
groups = ['ops']
";

/// A rule that is valid on its own, for edits that only break its session or sources.
const RULE: &str = "[[rule]]\nname = 'extra'\nresources = ['ssh']\neveryone = true\n";

#[test]
fn hostile_edits_are_refused_with_file_line_field_and_change_nothing() {
    let dir = TestDir::new();
    dir.write("10-base.toml", BASE);
    let handle = watch::PolicyHandle::new(dir.path()).unwrap();
    let good = handle.current();
    let base = dir.path().join("10-base.toml").display().to_string();
    let edit = dir.path().join("20-edit.toml");
    let ports =
        |list: &str| format!("[[resource]]\nname = 'alt'\nprotocol = 'tcp'\nports = {list}\n");
    let dests = |list: &str| format!("{}destinations = {list}\n", ports("[9999]"));
    let session = |lines: &str| format!("{RULE}[rule.session]\n{lines}");
    let sources = |list: &str| format!("{RULE}sources = {list}\n");
    let already = |p: &str, other: &str| {
        format!(
            "resource.ports: tcp/{p} is already protected by resource \"{other}\" for the same \
             destinations: give each resource its own ports or disjoint destinations"
        )
    };
    let not_a_prefix = |p: &str, example: &str| {
        format!(
            "\"{p}\" is not an address prefix: write e.g. \"10.0.0.0/8\", {example} or a single address"
        )
    };
    // (what, the edit file, "line: field: problem" expected in it)
    let cases: Vec<(&str, String, String)> = vec![
        // Syntax errors. toml notices an unclosed array where the file ends, one line on.
        ("unclosed array", format!("{RULE}groups = ['ops'\n"), "6: toml: invalid array: expected `]`".into()),
        ("unclosed string", "[[resource]]\nname = 'alt\n".into(), "2: toml: invalid literal string".into()),
        ("prose", "protect ssh please\n".into(), "1: toml: expected `.`, `=`".into()),
        ("duplicate key", format!("{RULE}everyone = false\n"), "5: rule.everyone: duplicate key `everyone` in table `rule`".into()),
        // Unknown keys.
        ("unknown table", "[[resources]]\nname = 'alt'\n".into(), "1: resources: unknown key, expected `resource` or `rule`".into()),
        (
            "unknown resource key",
            format!("{}port = 22\n", ports("[9999]")),
            "5: resource.port: unknown key, expected one of `name`, `protocol`, `ports`, `destinations`".into(),
        ),
        (
            "unknown session key",
            session("max_duraton = '1h'\n"),
            "6: rule.session.max_duraton: unknown key, expected one of `max_duration`, \
             `idle_timeout`, `dormant_timeout`, `reconnect`"
                .into(),
        ),
        // Duplicate names, across files.
        (
            "resource name taken",
            "[[resource]]\nname = 'ssh'\nprotocol = 'udp'\nports = [22]\n".into(),
            format!("2: resource.name: \"ssh\" is defined twice (first at {base}:2): resource names must be unique"),
        ),
        (
            "rule name taken",
            "[[rule]]\nname = 'ops'\nresources = ['ssh']\neveryone = true\n".into(),
            format!("2: rule.name: \"ops\" is defined twice (first at {base}:13): rule names must be unique"),
        ),
        // Overlapping ports.
        ("a range over another resource's port", ports("['20-30']"), format!("4: {}", already("22", "ssh"))),
        (
            "same port, same destinations",
            format!("{}destinations = ['10.0.0.0/8']\n", ports("[8005]")),
            format!("4: {}", already("8005", "web")),
        ),
        ("a port twice in one resource", ports("[9000, '8990-9010']"), "4: resource.ports: tcp/9000 is listed twice".into()),
        // Absurd ports.
        ("port 0", ports("[0]"), "4: resource.ports: 0 is not a port: use 1 to 65535".into()),
        ("port 65536", ports("[65536]"), "4: resource.ports: 65536 is not a port: use 1 to 65535".into()),
        ("negative port", ports("[-22]"), "4: resource.ports: -22 is not a port: use 1 to 65535".into()),
        ("range past 65535", ports("['60000-70000']"), "4: resource.ports: 70000 is not a port: use 1 to 65535".into()),
        ("range from 0", ports("['0-10']"), "4: resource.ports: 0 is not a port: use 1 to 65535".into()),
        ("reversed range", ports("['30-20']"), "4: resource.ports: \"30-20\": the low port is above the high port".into()),
        (
            "fractional port",
            ports("[22.5]"),
            "4: resource.ports: 22.5 is not a port: write a number from 1 to 65535 or a range such as \"8000-8010\"".into(),
        ),
        (
            "no ports",
            ports("[]"),
            "4: resource.ports: empty: list ports or ranges, e.g. [22] or [\"8000-8010\"]".into(),
        ),
        // Absurd prefixes.
        ("destination /33", dests("['10.0.0.0/33']"), format!("5: resource.destinations: {}", not_a_prefix("10.0.0.0/33", "\"fd00::/8\""))),
        ("destination /129", dests("['fd00::/129']"), format!("5: resource.destinations: {}", not_a_prefix("fd00::/129", "\"fd00::/8\""))),
        ("source /33", sources("['192.0.2.0/33']"), format!("5: rule.sources: {}", not_a_prefix("192.0.2.0/33", "\"2001:db8::/32\""))),
        ("source /129", sources("['2001:db8::/129']"), format!("5: rule.sources: {}", not_a_prefix("2001:db8::/129", "\"2001:db8::/32\""))),
        (
            "no sources",
            sources("[]"),
            "5: rule.sources: empty: list the prefixes sessions may come from, e.g. \
             [\"10.0.0.0/8\"], or leave sources out to allow any source"
                .into(),
        ),
        // Absurd session limits.
        ("max_duration 0", session("max_duration = '0s'\n"), "6: rule.session.max_duration: \"0s\" is out of range: use 1m to 30d".into()),
        (
            "max_duration 100 years",
            session("max_duration = '36500d'\n"),
            "6: rule.session.max_duration: \"36500d\" is out of range: use 1m to 30d".into(),
        ),
        (
            "max_duration past u64",
            session("max_duration = '999999999d999999999h'\n"),
            "6: rule.session.max_duration: \"999999999d999999999h\" is out of range: use 1m to 30d".into(),
        ),
        (
            "idle_timeout past max_duration",
            session("max_duration = '1h'\nidle_timeout = '2h'\n"),
            "7: rule.session.idle_timeout: \"2h\" is longer than max_duration \"1h\": the session \
             ends before it could apply; shorten it or leave it out"
                .into(),
        ),
        (
            "dormant_timeout past max_duration",
            session("dormant_timeout = '1d'\nmax_duration = '8h'\n"),
            "6: rule.session.dormant_timeout: \"1d\" is longer than max_duration \"8h\": the \
             session ends before it could apply; shorten it or leave it out"
                .into(),
        ),
        // Empty tables.
        ("empty rule", "[[rule]]\n".into(), "1: rule.name: missing: this key is required".into()),
        ("empty resource", "\n[[resource]]\n".into(), "2: resource.name: missing: this key is required".into()),
        (
            "a rule that matches nobody",
            "[[rule]]\nname = 'nobody'\nresources = ['ssh']\n".into(),
            "2: rule.users: rule \"nobody\" matches nobody: list users, groups or claims, or set \
             everyone = true to grant every identity"
                .into(),
        ),
    ];
    let ops = test_identity("alice@corp.example", &["ops"]);
    let granted = |p: &Policy| {
        let d = p.evaluate(&ops, IpAddr::from([10, 1, 2, 3]));
        d.grants
            .iter()
            .map(|g| g.resource.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(granted(&good), ["ssh", "web"]);
    let mut wrong = Vec::new();
    for (what, text, want) in &cases {
        std::fs::write(&edit, text).unwrap();
        let err = match handle.reload() {
            Ok(r) => panic!("{what}: accepted ({r:?}):\n{text}"),
            Err(e) => e.to_string(),
        };
        let expected = format!(
            "{}:{want}; the last good policy ({}) stays in force",
            edit.display(),
            good.fingerprint
        );
        if err != expected {
            wrong.push(format!("{what}:\n  expected {expected}\n  got      {err}"));
        }
        let now = handle.current();
        assert!(
            Arc::ptr_eq(&now, &good),
            "{what}: the policy in force changed"
        );
        assert_eq!(granted(&now), ["ssh", "web"], "{what}");
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // Without the edit, the directory says what is in force: nothing to reload.
    std::fs::remove_file(&edit).unwrap();
    assert!(matches!(handle.reload().unwrap(), watch::Reload::Unchanged));
}

#[test]
fn lenient_spellings_that_are_not_absurd_are_accepted() {
    // Kept on purpose (docs/policy.md): they protect more, or say the same thing twice.
    let p = parse_policy([(
        Path::new("p.toml"),
        "[[resource]]\nname = 'a'\nprotocol = 'tcp'\nports = [80]\ndestinations = []\n\
         [[resource]]\nname = 'b'\nprotocol = 'tcp'\nports = [81]\n\
         destinations = ['10.1.2.3', '10.0.0.0/8', '10.0.0.0/8', '10.9.9.9/8']\n\
         [[rule]]\nname = 'r'\nresources = ['a']\neveryone = true\n\
         [rule.session]\nmax_duration = '1h'\nidle_timeout = '1h'\ndormant_timeout = '1h'\n",
    )])
    .unwrap();
    // An empty destination list protects every local address, like an absent one.
    assert!(p.resources.by_name("a").unwrap().destinations.is_empty());
    // A single address is a host prefix; host bits are cleared.
    let b: Vec<String> = p
        .resources
        .by_name("b")
        .unwrap()
        .destinations
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(b, ["10.1.2.3/32", "10.0.0.0/8", "10.0.0.0/8", "10.0.0.0/8"]);
    // Limits equal to max_duration are fine.
    assert_eq!(p.rules[0].session.idle_timeout_secs, Some(3600));
}
