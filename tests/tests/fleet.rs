//! The fleet over a real NATS JetStream server: three agents in namespaces with real OpenSSH,
//! commanded with `flowwarden fleet`. A user terminated everywhere, an agent that was down
//! catching up before it admits, a purged position resynchronised from the snapshot, forged,
//! unsigned and replayed commands refused, and policy pushed to every host.

use std::time::Duration;

use flowwarden::fleet::{
    admin::Admin,
    command::{Action, Envelope, Target},
    keys::AdminKey,
};
use flowwarden_tests::{
    nats::{FleetAdmin, FleetHost, NatsServer, wait_for},
    privileged::require_root,
    ssh::{SshSession, Sshd},
    stack::TokenSpec,
};
use serde_json::{Value, json};

const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["ssh", "echo"]
"#;

/// The same, without ssh: what a pushed policy takes away.
const POLICY_NO_SSH: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["echo"]
"#;

const TICKER: &str = "while date +%s%N; do sleep 0.05; done";

fn session_of(out: &str) -> String {
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    let v: Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    v["session"].as_str().unwrap().to_owned()
}

/// Waits until every host is in the view and current.
fn wait_hosts_current(admin: &FleetAdmin, n: usize) {
    wait_for(
        Duration::from_secs(60),
        "every host current in `fleet hosts`",
        || {
            let hosts = admin.json(&["hosts"]);
            let hosts = hosts.as_array().unwrap();
            hosts.len() == n
                && hosts
                    .iter()
                    .all(|h| h["current"] == true && h["connected"] == true)
        },
    );
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn admin_link(admin: &FleetAdmin) -> flowwarden::fleet::FleetConfig {
    flowwarden::fleet::FleetConfig::for_admin(admin.servers.clone(), admin.prefix.clone())
}

#[test]
fn terminate_user_severs_her_ssh_on_every_host() {
    if !require_root("terminate_user_severs_her_ssh_on_every_host") {
        return;
    }
    let nats = NatsServer::single("fleet-term").expect("nats-server");
    let admin = FleetAdmin::new("fleet-term", vec![nats.url()]);
    let (ok, out) = admin.cli(&["init"]);
    assert!(ok, "{out}");
    let hosts: Vec<FleetHost> = (1..=3)
        .map(|i| {
            let mut h = FleetHost::prepare(&admin, &format!("ft{i}"), POLICY, &[nats.port], "");
            // ft1 takes a burst of admissions below: its events share messages.
            h.stack.set_in_table(
                "admission",
                "rate_per_sec = 100000\nrate_burst = 100000\nmax_connections_per_source = 1024\n",
            );
            h.stack.start_agent();
            h
        })
        .collect();
    wait_hosts_current(&admin, 3);

    // Alice and Bob each hold an ssh on every host.
    let mut sshs = Vec::new();
    let mut bob_sshs = Vec::new();
    let mut sshds = Vec::new();
    let mut alice_tokens = Vec::new();
    for h in &hosts {
        let s = &h.stack;
        let server = s.pair.server_addr.into();
        let sshd = Sshd::start(&s.pair.server, s.scratch.dir.join("ssh"), server);
        let alice = s.token(&TokenSpec::user("alice@corp.example", &["ops"]));
        let (ok, out) = s.login(&alice, &s.scratch.dir.join("alice"));
        assert!(ok, "{out}");
        alice_tokens.push(alice);
        let ssh = SshSession::spawn(sshd.ssh(&s.pair.client, server, TICKER));
        s.wait_until(Duration::from_secs(10), "alice's ssh prints", || {
            ssh.line_count() >= 3
        });
        sshs.push(ssh);
        sshds.push(sshd);
    }
    // Bob shares no session with her: a second client namespace is not needed, his session
    // is only listed and must survive.
    for h in &hosts {
        let bob = h
            .stack
            .token(&TokenSpec::user("bob@corp.example", &["ops"]));
        let (ok, out) = h.stack.login(&bob, &h.stack.scratch.dir.join("bob"));
        assert!(ok, "{out}");
        bob_sshs.push(session_of(&out));
    }
    wait_for(
        Duration::from_secs(10),
        "the fleet view lists alice on 3 hosts",
        || {
            admin
                .json(&["sessions", "list", "--user", "alice@corp.example"])
                .as_array()
                .unwrap()
                .len()
                == 3
        },
    );

    let issued = admin.json(&[
        "sessions",
        "terminate",
        "--user",
        "alice@corp.example",
        "--wait",
        "20",
    ]);
    let outcomes = issued["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 3, "every host answers: {issued}");
    assert!(outcomes.iter().all(|o| o["applied"] == true), "{issued}");

    for ((h, ssh), old) in hosts.iter().zip(&mut sshs).zip(&alice_tokens) {
        let status = ssh.wait_exit(Duration::from_secs(10));
        assert!(status.is_some(), "alice's ssh on {} did not exit", h.name);
        let live =
            h.stack
                .ctl_json(&["sessions", "list", "--live", "--user", "alice@corp.example"]);
        assert_eq!(live, json!([]), "alice still live on {}", h.name);
        let bob = h
            .stack
            .ctl_json(&["sessions", "list", "--live", "--user", "bob@corp.example"]);
        assert_eq!(
            bob.as_array().unwrap().len(),
            1,
            "bob was cut on {}: {bob}",
            h.name
        );
        // Audited with the admin key as the actor.
        let applied = h.audit("fleet_command_applied");
        assert_eq!(applied.len(), 1, "{applied:?}");
        assert_eq!(applied[0]["command"], issued["command"]);
        assert_eq!(applied[0]["method"], "sessions.terminate");
        let terminated = h.audit("session_terminated");
        assert!(
            terminated.iter().any(|e| e["user"] == "alice@corp.example"
                && e["reason"].as_str().unwrap_or("").contains("fleet command")),
            "{terminated:?}"
        );
        let status = h.fleet_status();
        assert_eq!(status["connected"], true, "{status}");
        assert_eq!(status["commands_applied"], 1, "{status}"); // Her old token is refused on every host.
        let (ok, out) = h.stack.login(old, &h.stack.scratch.dir.join("alice-after"));
        assert!(
            !ok && (out.contains("token_revoked") || out.contains("issued_before_cutoff")),
            "{}: {out}",
            h.name
        );
    }
    // The fleet's events stream has every host's termination.
    let (ok, out) = admin.cli(&["audit", "--last", "1000", "--json"]);
    assert!(ok, "{out}");
    let hosts_terminated: std::collections::BTreeSet<String> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|e| e["kind"] == "session_terminated" && e["user"] == "alice@corp.example")
        .map(|e| e["host"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(hosts_terminated.len(), 3, "{out}");

    // A burst of admissions on ft1: its events travel many to a message, and the stream
    // still holds every audit event of every host exactly once, in seq order.
    let ft1 = &hosts[0].stack;
    let bob = ft1.token(&TokenSpec::user("bob@corp.example", &["ops"]));
    let client = flowwarden_tests::admit::AdmitClient::new(
        (
            ft1.pair.server_addr,
            flowwarden_tests::stack::ADMISSION_PORT,
        )
            .into(),
        &ft1.fingerprint(),
    );
    let source = ft1.pair.client_addr.into();
    let admitted = ft1.pair.client.run(|| {
        std::thread::scope(|scope| {
            let workers: Vec<_> = (0..4)
                .map(|_| {
                    scope.spawn(|| {
                        (0..50)
                            .filter(|_| {
                                matches!(
                                    client.admit(source, &bob),
                                    flowwarden_tests::admit::AdmitOutcome::Admitted(_)
                                )
                            })
                            .count()
                    })
                })
                .collect();
            workers
                .into_iter()
                .map(|w| w.join().unwrap())
                .sum::<usize>()
        })
    });
    assert_eq!(admitted, 200, "every admission of the burst");
    let mut published = 0;
    for h in &hosts {
        let (ok, local) = h.stack.ctl(&["audit", "--limit", "10000", "--json"]);
        assert!(ok, "{local}");
        let local: Vec<u64> = local
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|e| e["seq"].as_u64())
            .collect();
        assert!(local.len() >= 3, "{}: {local:?}", h.name);
        let mut streamed = Vec::new();
        wait_for(
            Duration::from_secs(20),
            "the stream has every event",
            || {
                let (ok, out) = admin.cli(&["audit", "--last", "100000", "--json"]);
                assert!(ok, "{out}");
                streamed = out
                    .lines()
                    .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                    .filter(|e| e["host"] == h.name.as_str())
                    .filter_map(|e| e["seq"].as_u64())
                    .collect();
                streamed.len() >= local.len()
            },
        );
        // Events the host wrote after its log was read come after, in the same order.
        let every: Vec<u64> = (1..=streamed.len() as u64).collect();
        assert!(
            streamed == every && streamed.starts_with(&local),
            "{}: the stream must hold each of its events once, in seq order; it has {} \
             (first {:?}, last {:?}) against the host's {} ({:?} to {:?})",
            h.name,
            streamed.len(),
            streamed.first(),
            streamed.last(),
            local.len(),
            local.first(),
            local.last()
        );
        published += streamed.len() as u64;
    }
    // Under the burst, events shared messages (one message per event cost a fleet member
    // about 15 % of its admission rate).
    let messages = runtime().block_on(async {
        let a = Admin::connect(&admin_link(&admin), 1).await.unwrap();
        let mut stream = a.js.get_stream(a.names.events_stream()).await.unwrap();
        stream.info().await.unwrap().state.messages
    });
    assert!(
        messages < published,
        "{messages} messages for {published} events"
    );
}

#[test]
fn an_agent_that_was_down_catches_up_before_admitting_and_resyncs_when_purged() {
    if !require_root("an_agent_that_was_down_catches_up_before_admitting_and_resyncs_when_purged") {
        return;
    }
    let nats = NatsServer::single("fleet-catch").expect("nats-server");
    let admin = FleetAdmin::new("fleet-catch", vec![nats.url()]);
    assert!(admin.cli(&["init"]).0);
    let mut host = FleetHost::start(&admin, "fc1", POLICY, &[nats.port], "");
    wait_hosts_current(&admin, 1);
    let s = &host.stack;
    let alice_token = s.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = s.login(&alice_token, &s.scratch.dir.join("alice"));
    assert!(ok, "{out}");
    let first = session_of(&out);

    // Down while alice is terminated fleet-wide.
    host.stack.agent_mut().kill9();
    let issued = admin.json(&[
        "sessions",
        "terminate",
        "--user",
        "alice@corp.example",
        "--wait",
        "0",
    ]);
    assert!(issued["stream_seq"].as_u64().unwrap() >= 1, "{issued}");
    let locked = admin.json(&[
        "lock",
        "add",
        "--user",
        "carol@corp.example",
        "--reason",
        "offboarded",
        "--wait",
        "0",
    ]);

    // Back: its first admission comes after the termination it missed.
    host.stack.start_agent();
    let bob = host
        .stack
        .token(&TokenSpec::user("bob@corp.example", &["ops"]));
    wait_for(
        Duration::from_secs(30),
        "bob admitted after the restart",
        || {
            host.stack
                .login(&bob, &host.stack.scratch.dir.join("bob"))
                .0
        },
    );
    let terminated = host.audit("session_terminated");
    let admitted = host.audit("session_admitted");
    let end = terminated
        .iter()
        .find(|e| e["session"] == first.as_str())
        .unwrap_or_else(|| panic!("alice's session {first} was not terminated: {terminated:?}"));
    let bob_in = admitted
        .iter()
        .filter(|e| e["user"] == "bob@corp.example")
        .map(|e| e["seq"].as_u64().unwrap())
        .min()
        .unwrap();
    assert!(
        end["seq"].as_u64().unwrap() < bob_in,
        "the missed termination (seq {}) came after the first admission (seq {bob_in})",
        end["seq"]
    );
    // The lock issued while it was down held before its first admission, and holds now.
    let lock_added = host.audit("lock_added");
    assert_eq!(lock_added.len(), 1, "{lock_added:?}");
    assert!(
        lock_added[0]["seq"].as_u64().unwrap() < bob_in,
        "{lock_added:?}"
    );
    let carol = host
        .stack
        .token(&TokenSpec::user("carol@corp.example", &["ops"]));
    let (ok, out) = host
        .stack
        .login(&carol, &host.stack.scratch.dir.join("carol"));
    assert!(!ok && out.contains("locked"), "carol was admitted: {out}");
    let listed = admin.json(&["lock", "list"]);
    assert_eq!(listed[0]["id"], locked["command"], "{listed}");
    // Removed fleet-wide: carol is let back in.
    let removed = admin.json(&[
        "lock",
        "remove",
        locked["command"].as_str().unwrap(),
        "--wait",
        "20",
    ]);
    assert_eq!(removed["outcomes"][0]["applied"], true, "{removed}");
    let (ok, out) = host
        .stack
        .login(&carol, &host.stack.scratch.dir.join("carol2"));
    assert!(
        ok,
        "carol still refused after the fleet lock was removed: {out}"
    );
    assert_eq!(admin.json(&["lock", "list"]), json!([]));

    // Now alice again, down again, terminated again, and the stream purged meanwhile: the
    // snapshot carries it.
    // Her old token stays refused; a new one from the IdP works until the next termination.
    let (ok, out) = host
        .stack
        .login(&alice_token, &host.stack.scratch.dir.join("alice-old"));
    assert!(!ok && out.contains("token_revoked"), "{out}");
    let alice_token = host
        .stack
        .fresh_token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = host
        .stack
        .login(&alice_token, &host.stack.scratch.dir.join("alice2"));
    assert!(ok, "{out}");
    let second = session_of(&out);
    host.stack.agent_mut().kill9();
    let issued = admin.json(&[
        "sessions",
        "terminate",
        "--user",
        "alice@corp.example",
        "--wait",
        "0",
    ]);
    let rt = runtime();
    rt.block_on(async {
        let a = Admin::connect(&admin_link(&admin), 1).await.unwrap();
        let stream = a.js.get_stream(a.names.control_stream()).await.unwrap();
        stream.purge().await.unwrap();
    });
    host.stack.start_agent();
    wait_for(
        Duration::from_secs(30),
        "the purged command applied from the snapshot",
        || {
            host.audit("fleet_command_applied")
                .iter()
                .any(|e| e["command"] == issued["command"])
        },
    );
    assert!(
        host.stack
            .agent()
            .log_contains("resynchronised from the snapshot"),
        "{}",
        host.stack.agent().log()
    );
    let s = host.stack.ctl_json(&["sessions", "show", &second]);
    assert_eq!(s["state"], "terminated", "{s}");
    // Each command applied once, even those that are also in the snapshot: two
    // terminations, the lock and its removal.
    let applied = host.audit("fleet_command_applied");
    assert_eq!(applied.len(), 4, "{applied:?}");
}

#[test]
fn forged_unsigned_and_replayed_commands_are_refused_and_audited() {
    if !require_root("forged_unsigned_and_replayed_commands_are_refused_and_audited") {
        return;
    }
    let nats = NatsServer::single("fleet-forge").expect("nats-server");
    let admin = FleetAdmin::new("fleet-forge", vec![nats.url()]);
    assert!(admin.cli(&["init"]).0);
    let host = FleetHost::start(&admin, "ff1", POLICY, &[nats.port], "");
    wait_hosts_current(&admin, 1);
    let s = &host.stack;
    let token = s.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = s.login(&token, &s.scratch.dir.join("alice"));
    assert!(ok, "{out}");
    let id = session_of(&out);

    let rt = runtime();
    let genuine = AdminKey::load(&admin.key).unwrap();
    let (mallory, _) = AdminKey::generate().unwrap();
    let terminate = Action::Call {
        method: "sessions.terminate".into(),
        params: json!({"ids": [id]}),
    };
    let wait = Duration::from_secs(10);
    rt.block_on(async {
        let a = Admin::connect(&admin_link(&admin), 1).await.unwrap();
        // 1. Signed by a key the agent does not trust.
        let forged = a
            .issue(&mallory, Target::All, terminate.clone(), None, wait)
            .await
            .unwrap();
        assert!(
            forged.outcomes.first().is_some_and(|o| !o.applied),
            "{forged:?}\n{}",
            host.stack.agent().log()
        );
        // 2. A trusted key's id on someone else's signature.
        let env = Envelope::new(&genuine, Target::All, terminate.clone()).unwrap();
        let mut signed: flowwarden::fleet::command::Signed =
            serde_json::from_slice(&env.sign(&mallory)).unwrap();
        signed.key = genuine.public.id.clone();
        let bad = a
            .publish_signed(
                &env.id,
                &Target::All,
                serde_json::to_vec(&signed).unwrap(),
                None,
                wait,
            )
            .await
            .unwrap();
        assert!(!bad.outcomes[0].applied, "{bad:?}");
        // 3. Unsigned: the bare envelope.
        let env = Envelope::new(&genuine, Target::All, terminate.clone()).unwrap();
        let bare = a
            .publish_signed(
                &env.id,
                &Target::All,
                serde_json::to_vec(&env).unwrap(),
                None,
                wait,
            )
            .await
            .unwrap();
        assert!(!bare.outcomes[0].applied, "{bare:?}");
    });
    // None of them touched alice.
    let live = s.ctl_json(&["sessions", "show", &id]);
    assert_eq!(live["state"], "active", "{live}");

    // 4. A genuine command, then the same signed bytes again under a new message id.
    let policy_reload = Action::Call {
        method: "policy.reload".into(),
        params: json!({}),
    };
    rt.block_on(async {
        let a = Admin::connect(&admin_link(&admin), 1).await.unwrap();
        let env = Envelope::new(&genuine, Target::All, policy_reload).unwrap();
        let bytes = env.sign(&genuine);
        let first = a
            .publish_signed(&env.id, &Target::All, bytes.clone(), None, wait)
            .await
            .unwrap();
        assert!(first.outcomes[0].applied, "{first:?}");
        let replay = a
            .publish_signed(
                &format!("{}-again", env.id),
                &Target::All,
                bytes,
                None,
                Duration::ZERO,
            )
            .await
            .unwrap();
        assert!(
            replay.stream_seq > first.stream_seq,
            "the replay was stored: {replay:?}"
        );
    });
    wait_for(Duration::from_secs(10), "four refusals audited", || {
        host.audit("fleet_command_refused").len() >= 4
    });
    let reasons: std::collections::BTreeSet<String> = host
        .audit("fleet_command_refused")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_owned())
        .collect();
    for r in ["unknown_key", "bad_signature", "malformed", "replayed"] {
        assert!(reasons.contains(r), "no {r} refusal: {reasons:?}");
    }
    assert_eq!(host.audit("fleet_command_applied").len(), 1);
    let status = host.fleet_status();
    assert_eq!(status["commands_refused"], 4, "{status}");
}

#[test]
fn a_pushed_policy_is_checked_everywhere_and_applied_everywhere() {
    if !require_root("a_pushed_policy_is_checked_everywhere_and_applied_everywhere") {
        return;
    }
    let nats = NatsServer::single("fleet-policy").expect("nats-server");
    let admin = FleetAdmin::new("fleet-policy", vec![nats.url()]);
    assert!(admin.cli(&["init"]).0);
    let hosts: Vec<FleetHost> = (1..=2)
        .map(|i| {
            FleetHost::start(
                &admin,
                &format!("fp{i}"),
                POLICY,
                &[nats.port],
                "policy = \"fleet\"",
            )
        })
        .collect();
    wait_hosts_current(&admin, 2);
    let mut sshs = Vec::new();
    let mut sshds = Vec::new();
    for h in &hosts {
        let s = &h.stack;
        let server = s.pair.server_addr.into();
        let sshd = Sshd::start(&s.pair.server, s.scratch.dir.join("ssh"), server);
        let alice = s.token(&TokenSpec::user("alice@corp.example", &["ops"]));
        let (ok, out) = s.login(&alice, &s.scratch.dir.join("alice"));
        assert!(ok, "{out}");
        let ssh = SshSession::spawn(sshd.ssh(&s.pair.client, server, TICKER));
        s.wait_until(Duration::from_secs(10), "alice's ssh prints", || {
            ssh.line_count() >= 3
        });
        sshs.push(ssh);
        sshds.push(sshd);
    }
    let dir = hosts[0].stack.scratch.dir.join("push");
    std::fs::create_dir_all(&dir).unwrap();

    // Invalid: refused by the CLI before anything is published.
    std::fs::write(
        dir.join("main.toml"),
        "[[rule]]\nname = \"x\"\nresources = [\"nope\"]\n",
    )
    .unwrap();
    let (ok, out) = admin.cli(&["policy", "push", dir.to_str().unwrap()]);
    assert!(!ok, "an invalid policy was pushed: {out}");
    // Invalid but signed (as a CLI that skipped the check would send it): refused by every
    // agent, nothing changes.
    let rt = runtime();
    let key = AdminKey::load(&admin.key).unwrap();
    let bad = rt.block_on(async {
        let a = Admin::connect(&admin_link(&admin), 1).await.unwrap();
        let mut files = std::collections::BTreeMap::new();
        files.insert(
            "main.toml".to_owned(),
            "[[rule]]\nname = \"x\"\nresources = [\"nope\"]\n".to_owned(),
        );
        let bundle = flowwarden::fleet::command::PolicyBundle { version: 5, files };
        a.issue(
            &key,
            Target::All,
            Action::Policy(bundle),
            None,
            Duration::from_secs(20),
        )
        .await
        .unwrap()
    });
    assert_eq!(bad.outcomes.len(), 2, "{bad:?}");
    for o in &bad.outcomes {
        assert!(o.outcome.starts_with("refused: invalid policy"), "{o:?}");
    }
    for (h, ssh) in hosts.iter().zip(&mut sshs) {
        assert!(
            ssh.wait_exit(Duration::from_millis(500)).is_none(),
            "ssh cut on {} by an invalid policy",
            h.name
        );
        assert_eq!(h.fleet_status()["policy_version"], 0);
    }

    // Valid: ssh is no longer granted; every host applies it and cuts the live ssh.
    std::fs::write(dir.join("main.toml"), POLICY_NO_SSH).unwrap();
    let pushed = admin.json(&[
        "policy",
        "push",
        dir.to_str().unwrap(),
        "--version",
        "7",
        "--wait",
        "20",
    ]);
    let outcomes = pushed["outcomes"].as_array().unwrap();
    assert_eq!(outcomes.len(), 2, "{pushed}");
    assert!(
        outcomes.iter().all(|o| o["applied"] == true
            && o["outcome"]
                .as_str()
                .unwrap()
                .starts_with("version 7 in force")),
        "{pushed}"
    );
    for (h, ssh) in hosts.iter().zip(&mut sshs) {
        assert!(
            ssh.wait_exit(Duration::from_secs(10)).is_some(),
            "ssh not cut on {}",
            h.name
        );
        assert_eq!(h.fleet_status()["policy_version"], 7);
        let files: Vec<String> = std::fs::read_dir(h.stack.scratch.dir.join("policies"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            files,
            ["main.toml"],
            "the pushed bundle is the policy directory"
        );
    }
    wait_for(
        Duration::from_secs(10),
        "fleet hosts shows version 7",
        || {
            admin
                .json(&["hosts"])
                .as_array()
                .unwrap()
                .iter()
                .all(|h| h["policy_version"] == 7)
        },
    );
}
