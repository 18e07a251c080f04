//! The web console end to end, in a real browser: Playwright (tests/console/console_e2e.py)
//! drives the system's Chromium, administrators sign in through a real OpenID provider
//! (panva's oidc-provider), and the console talks to a real agent. alice's row appears live,
//! an admin terminates her, her `ssh` exits, the row shows the drops, the audit says who; a
//! read-only admin sees no button, and forged POSTs are refused and audited. Takes the
//! screenshots (in docs/img with `FLOWWARDEN_SCREENSHOTS=docs`).

use std::{net::TcpStream, time::Duration};

use flowwarden_tests::{
    console::{Browser, start_console},
    nats::free_port,
    oidc::{OidcProvider, PrivateCa},
    privileged::require_root,
    ssh::{SshSession, Sshd},
    stack::{Stack, TokenSpec},
};
use serde_json::Value;

const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[rule]]
name = "ops-ssh"
groups = ["ops"]
resources = ["ssh"]
"#;

/// Prints a line every 10 ms for as long as its output goes somewhere.
const TICKER: &str = "while date +%s%N; do sleep 0.01; done";

fn session_id(login_output: &str) -> String {
    let start = login_output
        .find('{')
        .unwrap_or_else(|| panic!("no JSON in: {login_output}"));
    let v: Value = serde_json::Deserializer::from_str(&login_output[start..])
        .into_iter()
        .next()
        .unwrap()
        .unwrap();
    v["session"].as_str().expect("a session id").to_owned()
}

#[test]
fn console_terminates_a_live_ssh_from_the_browser_and_refuses_forgeries() {
    if !require_root("console_terminates_a_live_ssh_from_the_browser_and_refuses_forgeries") {
        return;
    }
    let stack = Stack::start("console", POLICY, "");
    let server = stack.pair.server_addr.into();
    let sshd = Sshd::start(&stack.pair.server, stack.scratch.dir.join("ssh"), server);

    // The provider administrators sign in with, and the console, on loopback.
    let ca = PrivateCa::generate(&stack.scratch.dir);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let provider = OidcProvider::start_for_console(&ca, "k1", &format!("{url}/callback"));
    let mut config = std::fs::read_to_string(&stack.config).unwrap();
    config.push_str(&format!(
        r#"
[console]
listen = "127.0.0.1:{port}"
session_secs = 600

[console.oidc]
issuer = "{issuer}"
client_id = "flowwarden-console"
ca_file = "{ca}"
algorithms = ["ES256"]
admin_groups = ["flowwarden-console-admins"]
read_groups = ["flowwarden-console-readers"]
"#,
        issuer = provider.issuer,
        ca = ca.ca_file.display(),
    ));
    std::fs::write(&stack.config, config).unwrap();
    let console_log = stack.scratch.dir.join("console.log");
    let console = start_console(&stack.config, &console_log);
    stack.wait_until(Duration::from_secs(30), "the console listens", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let shots = flowwarden_tests::console::screenshots();
    let mut browser = Browser::start("console_e2e.py", &url, &shots, &[]);
    browser.expect("READY", &console_log);

    // alice logs in while the admin watches the sessions page, and opens a live ssh.
    let alice = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&alice, &stack.scratch.dir.join("alice"));
    assert!(ok, "{out}");
    let alice_id = session_id(&out);
    let mut ssh = SshSession::spawn(sshd.ssh(&stack.pair.client, server, TICKER));
    stack.wait_until(Duration::from_secs(10), "ticker lines over ssh", || {
        ssh.line_count() >= 30
    });
    let bob = stack.token(&TokenSpec::user("bob@corp.example", &["ops"]));
    let (ok, out) = stack.login(&bob, &stack.scratch.dir.join("bob"));
    assert!(ok, "{out}");
    let bob_id = session_id(&out);
    browser.tell(&format!("ALICE {alice_id}"));
    browser.tell(&format!("BOB {bob_id}"));

    // The admin terminated her from the browser: her ssh ends.
    browser.expect("TERMINATED", &console_log);
    let exited = ssh.wait_exit(Duration::from_secs(30));
    assert!(
        exited.is_some(),
        "alice's ssh is still running after the console terminated her session"
    );
    browser.expect("REFUSED", &console_log);

    // The forgeries changed nothing: bob is still in.
    let bob_now = stack.ctl_json(&["sessions", "show", &bob_id]);
    assert!(
        bob_now["state"] == "active" || bob_now["state"] == "dormant",
        "the forged POSTs must not have ended bob's session: {bob_now}"
    );
    // What the agent recorded: the administrator by name.
    let ended = stack.ctl_json(&["sessions", "show", &alice_id]);
    assert_eq!(ended["state"], "terminated", "{ended}");
    assert_eq!(
        ended["ended"]["by"], "admin@corp.example (console, uid 0)",
        "{ended}"
    );
    // "and lock this user": a fresh token from the provider does not get alice back in.
    let fresh = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&fresh, &stack.scratch.dir.join("alice-again"));
    assert!(!ok && out.contains("locked"), "alice got back in: {out}");

    browser.tell("GO locks");
    browser.expect("DONE", &console_log);
    // The lock added in the browser ended bob's session, in the administrator's name.
    let bob_now = stack.ctl_json(&["sessions", "show", &bob_id]);
    assert_eq!(bob_now["state"], "terminated", "{bob_now}");
    let (ok, out) = stack.ctl(&["audit", "--kind", "lock_added", "--json"]);
    assert!(ok, "{out}");
    assert_eq!(
        out.matches("admin@corp.example (console, uid 0)").count(),
        2,
        "alice's and bob's locks, both in the administrator's name: {out}"
    );
    let (ok, out) = stack.ctl(&["audit", "--kind", "console_refused", "--json"]);
    assert!(ok, "{out}");
    let refused: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let by = |who: &str, why: &str| {
        refused
            .iter()
            .filter(|e| e["by"] == who && e["reason"].as_str().is_some_and(|r| r.contains(why)))
            .count()
    };
    assert_eq!(by("admin@corp.example", "CSRF"), 2, "{refused:?}");
    assert_eq!(by("reader@corp.example", "read-only"), 2, "{refused:?}");
    drop(console);
}
