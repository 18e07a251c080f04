//! The console's Hosts page, end to end in a real browser: a real nats-server, two fleet
//! hosts (real agents in namespaces), a pushed policy, and the console configured with
//! `[fleet]` and its own NATS user, whose permissions are the packaged ones
//! (packaging/nats-server.conf's CONSOLE block). A read-only administrator signs in through
//! the real OpenID provider and sees both hosts with their version and policy version, and
//! alice's session on the other host on the Fleet sessions page (filtered by host and user);
//! an admin ends it from there (a signed fleet command: the console holds an admin key and
//! its NATS user has the packaged CONSOLE_ADMIN permissions), a reader has no button and a
//! reader's forged POST is refused;
//! with NATS stopped the page shows an error block and the rest of the console keeps working.

use std::{net::TcpStream, path::Path, time::Duration};

use flowwarden_tests::{
    console::{Browser, start_console},
    nats::{FleetAdmin, FleetHost, NatsServer, free_port, wait_for},
    oidc::{OidcProvider, PrivateCa},
    privileged::require_root,
};

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

const CONSOLE_PASSWORD: &str = "console-test-password";

/// The packaged `NAME = { … }` permissions block (`CONSOLE`, `CONSOLE_ADMIN`), for the fleet
/// named `prefix`.
fn packaged_permissions(name: &str, prefix: &str) -> String {
    let conf = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nats-server.conf"),
    )
    .expect("packaging/nats-server.conf");
    let start = conf
        .find(&format!("  {name} = {{"))
        .unwrap_or_else(|| panic!("a {name} block in packaging/nats-server.conf"));
    let len = conf[start..].find("\n  }\n").expect("the block's end");
    let upper = prefix.to_ascii_uppercase().replace('-', "_");
    conf[start..start + len + 4]
        .replace("FLOWWARDEN_", &format!("{upper}_"))
        .replace("\"flowwarden.", &format!("\"{prefix}."))
}

#[test]
fn console_lists_the_fleets_hosts_and_says_when_nats_is_gone() {
    if !require_root("console_lists_the_fleets_hosts_and_says_when_nats_is_gone") {
        return;
    }
    let mut admin = FleetAdmin::new("con-hosts", Vec::new());
    // Agents and the admin CLI connect without credentials (a user that may do anything);
    // the console as `fleet-console`, with no more than the packaged permissions.
    let auth = format!(
        "authorization {{\n{}\n  users = [\n    {{ user: anyone, password: \"unused\" }}\n    \
         {{ user: fleet-console-admin, password: \"{CONSOLE_PASSWORD}\", permissions: $CONSOLE_ADMIN }}\n  \
         ]\n}}\nno_auth_user: anyone\n",
        packaged_permissions("CONSOLE_ADMIN", &admin.prefix)
    );
    // The read-only console's permissions are the commanding one's reads: what this test
    // proves enough for the pages holds for both.
    let read_only = packaged_permissions("CONSOLE", &admin.prefix);
    let commanding = packaged_permissions("CONSOLE_ADMIN", &admin.prefix);
    for line in read_only
        .lines()
        .filter(|l| l.trim_start().starts_with('"'))
    {
        assert!(
            commanding.contains(line),
            "CONSOLE allows {line} and CONSOLE_ADMIN does not"
        );
    }
    let mut nats = NatsServer::single_with("con-hosts", &auth).expect("nats-server");
    admin.servers = vec![nats.url()];
    let (ok, out) = admin.cli(&["init"]);
    assert!(ok, "fleet init: {out}");
    let hosts: Vec<FleetHost> = ["ch1", "ch2"]
        .iter()
        .map(|name| FleetHost::start(&admin, name, POLICY, &[nats.port], "policy = \"fleet\""))
        .collect();

    // A policy version other than the default, in force on both.
    let push = hosts[0].stack.scratch.dir.join("push");
    std::fs::create_dir_all(&push).unwrap();
    std::fs::write(push.join("main.toml"), POLICY).unwrap();
    let pushed = admin.json(&[
        "policy",
        "push",
        push.to_str().unwrap(),
        "--version",
        "4",
        "--wait",
        "30",
    ]);
    assert_eq!(
        pushed["outcomes"].as_array().map(Vec::len),
        Some(2),
        "{pushed}"
    );
    wait_for(
        Duration::from_secs(30),
        "`fleet hosts` shows both at policy version 4",
        || {
            let v = admin.json(&["hosts"]);
            let v = v.as_array().unwrap();
            v.len() == 2 && v.iter().all(|h| h["policy_version"] == 4)
        },
    );

    // alice on ch2: in the fleet's view, shown by ch1's console.
    let token = hosts[1]
        .stack
        .token(&flowwarden_tests::stack::TokenSpec::user(
            "alice@corp.example",
            &["ops"],
        ));
    let (ok, out) = hosts[1]
        .stack
        .login(&token, &hosts[1].stack.scratch.dir.join("alice"));
    assert!(ok, "alice logs in on ch2: {out}");
    let alice: serde_json::Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
    let alice = alice["session"].as_str().unwrap().to_owned();

    // The console of ch1, with ch1's [fleet] and a NATS user of its own.
    let stack = &hosts[0].stack;
    let ca = PrivateCa::generate(&stack.scratch.dir);
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let provider = OidcProvider::start_for_console(&ca, "k1", &format!("{url}/callback"));
    let password = stack.scratch.dir.join("console-nats-password");
    std::fs::write(&password, format!("{CONSOLE_PASSWORD}\n")).unwrap();
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

[console.fleet]
user = "fleet-console-admin"
password_file = "{password}"
admin_key_file = "{key}"
"#,
        issuer = provider.issuer,
        ca = ca.ca_file.display(),
        password = password.display(),
        key = admin.key.display(),
    ));
    std::fs::write(&stack.config, config).unwrap();
    let console_log = stack.scratch.dir.join("console.log");
    let console = start_console(&stack.config, &console_log);
    stack.wait_until(Duration::from_secs(30), "the console listens", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    let shots = flowwarden_tests::console::screenshots();
    let mut browser = Browser::start(
        "console_hosts.py",
        &url,
        &shots,
        &[
            ("HOSTS", "ch1,ch2"),
            ("VERSION", env!("CARGO_PKG_VERSION")),
            ("POLICY_VERSION", "4"),
            ("FLEET_SESSION", &alice),
            ("FLEET_SESSION_HOST", "ch2"),
            ("FLEET_SESSION_USER", "alice@corp.example"),
        ],
    );
    browser.expect("HOSTS", &console_log);
    browser.expect("FLEET_SESSIONS", &console_log);
    // The admin ended alice's session on ch2 from ch1's console: a signed fleet command, which
    // ch2 applied and audited on the admin's behalf.
    browser.expect("FLEET_TERMINATED", &console_log);
    let shown = hosts[1].stack.ctl_json(&["sessions", "show", &alice]);
    assert_eq!(shown["state"], "terminated", "{shown}");
    let ended = hosts[1].audit("session_terminated");
    assert!(
        ended.iter().any(|e| e["session"] == alice.as_str()
            && e.to_string().contains("admin@corp.example")),
        "ch2 audits the termination on the console admin's behalf: {ended:?}"
    );
    let applied = hosts[1].audit("fleet_command_applied");
    assert!(
        applied.iter().any(|e| e["method"] == "sessions.terminate"),
        "{applied:?}"
    );
    // The console read the view with the packaged permissions, and needed no more.
    let log = nats.log();
    assert!(
        !log.contains("Violation"),
        "the console's NATS user was refused something:\n{log}"
    );

    nats.kill();
    browser.tell("NATS_DOWN stopped");
    browser.expect("DONE", &console_log);
    drop(console);
}

/// `config check` checks `[console]` as `flowwarden console` does at start: `[console.fleet]`
/// without `[fleet]`, or with half a credential, is refused naming the field; a config
/// without a console is not asked for one.
#[test]
fn config_check_checks_the_console_table() {
    let scratch = flowwarden_tests::agent_proc::Scratch::new("consolecheck");
    let config = scratch.dir.join("agent.toml");
    let base = format!(
        "[policy]\ndir = \"{}\"\n",
        scratch.dir.join("policies").display()
    );
    let check = |text: &str| {
        std::fs::write(&config, text).unwrap();
        flowwarden_tests::stack::cli(&["config", "check", "--config", config.to_str().unwrap()])
    };
    let (ok, out) = check(&base);
    assert!(ok, "no console at all: {out}");
    let key = scratch.dir.join("admin.key");
    let (ok, out) = flowwarden_tests::stack::cli(&[
        "fleet",
        "keygen",
        "--out",
        key.to_str().unwrap(),
        "--json",
    ]);
    assert!(ok, "fleet keygen: {out}");
    let public: serde_json::Value = serde_json::from_str(&out).unwrap();
    let fleet = format!(
        "[fleet]\nservers = [\"nats://127.0.0.1:4222\"]\nadmin_keys = [{}]\n",
        public["public_key"]
    );
    let oidc = "[console.oidc]\nissuer = \"https://idp.corp.example\"\nclient_id = \"fw\"\n";
    let (ok, out) = check(&format!("{base}{fleet}{oidc}"));
    assert!(ok, "a console and a fleet: {out}");
    for (extra, field) in [
        ("[console.fleet]\nuser = \"console\"\n", "console.fleet"),
        (
            "[console.fleet]\ncreds_file = \"console.creds\"\n",
            "console.fleet",
        ),
        ("[console]\nsession_secs = 5\n", "console.session_secs"),
        (
            "[console.fleet]\nuser = \"c\"\npassword_file = \"pw\"\nadmin_key_file = \"missing.key\"\n",
            "console.fleet.admin_key_file",
        ),
        (
            "[console.fleet]\nadmin_key_file = \"admin.key\"\n",
            "console.fleet.admin_key_file",
        ),
    ] {
        let with_fleet = !extra.contains("creds_file");
        let text = if with_fleet {
            format!("{base}{fleet}{extra}{oidc}")
        } else {
            // [console.fleet] without [fleet].
            format!("{base}{extra}{oidc}")
        };
        let (ok, out) = check(&text);
        assert!(!ok, "{extra}: accepted: {out}");
        assert!(out.contains(field), "{extra}: {out}");
    }
}
