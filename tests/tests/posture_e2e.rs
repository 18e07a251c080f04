//! Device posture end to end: a token's device claims reach the policy (a rule that requires
//! a managed, compliant Linux device admits only such a device) and `sessions show` shows the
//! posture the session was admitted with, as JSON and as text, through a live agent.

use flowwarden_tests::{
    privileged::require_root,
    stack::{Stack, cli},
};
use serde_json::Value;

const POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "managed-linux"
groups = ["ops"]
resources = ["echo"]
[rule.device]
managed = true
compliant = true
os = ["linux"]
"#;

/// A development token with device claims (`dev token`'s posture options).
fn token(stack: &Stack, email: &str, device: &[&str]) -> String {
    let keys = stack.keys.display().to_string();
    let mut args = vec![
        "dev", "token", "--dir", &keys, "--sub", email, "--email", email, "--group", "ops",
    ];
    args.extend_from_slice(device);
    let (ok, out) = cli(&args);
    assert!(ok, "dev token failed: {out}");
    out.lines().next().unwrap_or_default().trim().to_owned()
}

fn answer(out: &str) -> Value {
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

#[test]
fn sessions_show_shows_the_device_posture_the_session_was_admitted_with() {
    if !require_root("sessions_show_shows_the_device_posture_the_session_was_admitted_with") {
        return;
    }
    let stack = Stack::start("posture", POLICY, "");

    // A device that is not compliant: the rule does not apply, nothing is admitted.
    let refused = token(
        &stack,
        "bob@corp.example",
        &[
            "--device-id",
            "lt-0042",
            "--managed",
            "true",
            "--compliant",
            "false",
            "--os",
            "linux",
        ],
    );
    let (ok, out) = stack.login(&refused, &stack.scratch.dir.join("bob"));
    assert!(!ok, "a non-compliant device was admitted: {out}");
    let listed = stack.ctl_json(&["sessions", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");

    let admitted = token(
        &stack,
        "alice@corp.example",
        &[
            "--device-id",
            "lt-0007",
            "--managed",
            "true",
            "--compliant",
            "true",
            "--os",
            "linux",
        ],
    );
    let (ok, out) = stack.login(&admitted, &stack.scratch.dir.join("alice"));
    assert!(ok, "login failed: {out}");
    let id = answer(&out)["session"]
        .as_str()
        .unwrap_or_else(|| panic!("no session id in: {out}"))
        .to_owned();

    let shown = stack.ctl_json(&["sessions", "show", &id]);
    let device = &shown["device"];
    assert_eq!(device["id"], "lt-0007", "{shown}");
    assert_eq!(device["managed"], true, "{shown}");
    assert_eq!(device["compliant"], true, "{shown}");
    assert_eq!(device["os"], "linux", "{shown}");

    let (ok, text) = stack.ctl(&["sessions", "show", &id]);
    assert!(ok, "{text}");
    assert!(
        text.contains("device       id lt-0007, managed true, compliant true, os linux"),
        "the posture line is missing from `sessions show`:\n{text}"
    );
}
