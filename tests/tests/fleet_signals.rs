//! Identity signals across a fleet, against a real NATS JetStream server and real agents: a
//! SET pushed to one host acts on every host that trusts its transmitter; one published
//! straight to the fleet's signals stream (by a relay) acts too; a forged one changes nothing
//! anywhere and is audited as refused on every host; a replay through the fleet is a no-op;
//! a host with no such transmitter refuses it (audited) and acts on nothing. The NATS
//! permissions of `packaging/nats-server.conf` carry all this, and keep each agent and relay
//! to its own subject.

use std::{path::PathBuf, time::Duration};

use flowwarden::signals::dev::{self, DevSet, SigningKey};
use flowwarden_tests::{
    nats::{FleetAdmin, FleetHost, NatsServer, wait_for},
    privileged::require_root,
    stack::{ADMISSION_PORT, AUDIENCE, TokenSpec, cli},
};
use serde_json::{Value, json};

const POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["echo"]
"#;

const WAIT: Duration = Duration::from_secs(20);

/// A development transmitter: its signing key and the `[[signals.transmitter]]` that trusts
/// it (pushing with `authorization`).
struct Transmitter {
    key: SigningKey,
    authorization: String,
    section: String,
    dir: PathBuf,
}

impl Transmitter {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("fw-ssf-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (ok, out) = cli(&["dev", "ssf", "keygen", "--dir", dir.to_str().unwrap()]);
        assert!(ok, "dev ssf keygen: {out}");
        let authorization = format!("Bearer ssf-{}", dev::random_jti());
        let auth_file = dir.join("authorization");
        std::fs::write(&auth_file, &authorization).unwrap();
        let section = format!(
            "\n[[signals.transmitter]]\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\n\
             algorithms = [\"RS256\"]\njwks_file = \"{}\"\npush_authorization_file = \"{}\"\n",
            dev::DEV_TRANSMITTER,
            dir.join(dev::SSF_JWKS_FILE).display(),
            auth_file.display(),
        );
        let key = SigningKey::from_dir(&dir).expect("the transmitter key");
        Self {
            key,
            authorization,
            section,
            dir,
        }
    }

    /// A SET about `email` with a known jti, signed now.
    fn sign(&self, event: &str, email: &str) -> (String, String) {
        let jti = dev::random_jti();
        let mut set = DevSet::new(event, Some(json!({"format": "email", "email": email})));
        set.jti = Some(jti.clone());
        let now = flowwarden::sessions::model::now_ms() / 1000;
        (self.key.sign(&set, now).expect("sign"), jti)
    }
}

impl Drop for Transmitter {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pushes `token` to `host`'s `/v1/ssf/events` from its client namespace.
fn push(host: &FleetHost, authorization: &str, token: &str) -> (u16, String) {
    let s = &host.stack;
    let agent = format!("{}:{ADMISSION_PORT}", s.pair.server_addr);
    let fp = s.fingerprint();
    s.pair
        .client
        .run(|| {
            dev::push(
                &agent,
                &fp,
                authorization,
                "application/secevent+jwt",
                token.as_bytes(),
            )
        })
        .expect("the agent answers")
}

fn login(host: &FleetHost, email: &str) -> String {
    let s = &host.stack;
    let token = s.token(&TokenSpec::user(email, &["ops"]));
    let (ok, out) = s.login(&token, &s.scratch.dir.join(email));
    assert!(ok, "login {email} on {}: {out}", host.name);
    let v: Value = serde_json::Deserializer::from_str(&out[out.find('{').unwrap()..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    v["session"].as_str().unwrap().to_owned()
}

fn state(host: &FleetHost, id: &str) -> String {
    host.stack.ctl_json(&["sessions", "show", id])["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// `host`'s signal_received records of `jti`: (outcome, detail).
fn received(host: &FleetHost, jti: &str) -> Vec<(String, String)> {
    host.audit("signal_received")
        .into_iter()
        .filter(|e| e["jti"] == jti)
        .map(|e| {
            (
                e["outcome"].as_str().unwrap_or_default().to_owned(),
                e["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// `host`'s signal_refused records whose detail contains `needle`: (err, detail).
fn refused(host: &FleetHost, needle: &str) -> Vec<(String, String)> {
    host.audit("signal_refused")
        .into_iter()
        .filter(|e| e["detail"].as_str().is_some_and(|d| d.contains(needle)))
        .map(|e| {
            (
                e["err"].as_str().unwrap_or_default().to_owned(),
                e["detail"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

/// Publishes `token` on the fleet's signals stream as relay `from`, with the CLI.
fn publish(admin: &FleetAdmin, from: &str, token: &str, dir: &std::path::Path) -> Value {
    let file = dir.join(format!("{from}-{}.jwt", dev::random_jti()));
    std::fs::write(&file, token).unwrap();
    admin.json(&["signal", "publish", file.to_str().unwrap(), "--from", from])
}

#[test]
fn a_set_pushed_to_one_host_acts_on_every_host_and_a_forged_one_on_none() {
    if !require_root("a_set_pushed_to_one_host_acts_on_every_host_and_a_forged_one_on_none") {
        return;
    }
    let nats = NatsServer::single("fleet-ssf").expect("nats-server");
    let admin = FleetAdmin::new("fleet-ssf", vec![nats.url()]);
    let (ok, out) = admin.cli(&["init"]);
    assert!(ok, "{out}");
    let tx = Transmitter::new("fleet-ssf");
    let a = FleetHost::start(&admin, "fsa", POLICY, &[nats.port], &tx.section);
    let b = FleetHost::start(&admin, "fsb", POLICY, &[nats.port], &tx.section);
    // A host that does not trust the transmitter: it must not act on what the others do.
    let c = FleetHost::start(&admin, "fsc", POLICY, &[nats.port], "");
    wait_for(WAIT * 3, "every host current", || {
        let hosts = admin.json(&["hosts"]);
        hosts.as_array().is_some_and(|h| {
            h.len() == 3
                && h.iter()
                    .all(|h| h["current"] == true && h["connected"] == true)
        })
    });
    let alice: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|h| login(h, "alice@corp.example"))
        .collect();
    let bob: Vec<String> = [&a, &b, &c]
        .iter()
        .map(|h| login(h, "bob@corp.example"))
        .collect();

    // Session-revoked for alice, pushed to host A only.
    let (token, jti) = tx.sign("session-revoked", "alice@corp.example");
    let (status, body) = push(&a, &tx.authorization, &token);
    assert_eq!(status, 202, "{body}");
    assert_eq!(state(&a, &alice[0]), "terminated");
    wait_for(WAIT, "alice's session on host B ends", || {
        state(&b, &alice[1]) == "terminated"
    });
    let on_b = received(&b, &jti);
    assert!(
        on_b.iter().any(|(o, d)| o.starts_with("terminated")
            && d.contains(&format!("via the fleet ({}.signals.fsa)", admin.prefix))),
        "host B's audit of {jti}: {on_b:?}"
    );
    let shown = b.stack.ctl_json(&["sessions", "show", &alice[1]]);
    assert_eq!(shown["ended"]["cause"], "identity_event", "{shown}");
    // Host A sees its own SET come back from the fleet: a duplicate, applied once.
    wait_for(WAIT, "host A's echo of its own SET", || {
        received(&a, &jti).iter().any(|(o, _)| o == "duplicate")
    });
    let on_a = received(&a, &jti);
    assert_eq!(
        on_a.iter()
            .filter(|(o, _)| o.starts_with("terminated"))
            .count(),
        1,
        "{on_a:?}"
    );
    // Host C has no transmitter for that issuer: refused, audited, nothing ended.
    wait_for(WAIT, "host C refuses the SET", || {
        !refused(&c, "no [[signals.transmitter]]").is_empty()
    });
    assert_eq!(
        refused(&c, "no [[signals.transmitter]]")[0].0,
        "invalid_issuer"
    );
    assert_eq!(state(&c, &alice[2]), "active");

    // A forged SET about bob (same issuer, another key), published straight to the fleet by
    // a compromised relay: refused on every host that checks it, bob's sessions untouched.
    let forger = Transmitter::new("fleet-ssf-forger");
    let (forged, _) = forger.sign("session-revoked", "bob@corp.example");
    publish(&admin, "evil-relay", &forged, &tx.dir);
    let via_evil = format!("via the fleet ({}.signals.evil-relay)", admin.prefix);
    for h in [&a, &b] {
        wait_for(WAIT, "the forged SET refused", || {
            !refused(h, &via_evil).is_empty()
        });
        let r = refused(h, &via_evil);
        assert_eq!(r[0].0, "invalid_key", "{} refused it as {r:?}", h.name);
    }
    wait_for(WAIT, "host C refuses the forged SET", || {
        !refused(&c, &via_evil).is_empty()
    });
    for (h, id) in [&a, &b, &c].iter().zip(&bob) {
        assert_eq!(state(h, id), "active", "bob on {}", h.name);
    }

    // The first SET again, through the fleet with a fresh message id (so that the stream
    // stores it): a duplicate on every host, nothing applied twice.
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let config = flowwarden::fleet::FleetConfig::for_admin(
                admin.servers.clone(),
                admin.prefix.clone(),
            );
            let fleet = flowwarden::fleet::admin::Admin::connect(&config, 1)
                .await
                .expect("admin link");
            fleet
                .js
                .publish(fleet.names.signals("replayer"), token.clone().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        });
    }
    let via_replayer = format!("via the fleet ({}.signals.replayer)", admin.prefix);
    for h in [&a, &b] {
        wait_for(WAIT, "the replay seen as a duplicate", || {
            received(h, &jti)
                .iter()
                .any(|(o, d)| o == "duplicate" && d.contains(&via_replayer))
        });
        let all = received(h, &jti);
        assert_eq!(
            all.iter()
                .filter(|(o, _)| o.starts_with("terminated"))
                .count(),
            1,
            "{}: {all:?}",
            h.name
        );
    }
    for (h, id) in [&a, &b, &c].iter().zip(&bob) {
        assert_eq!(state(h, id), "active", "bob on {}", h.name);
    }

    // A SET no agent received from the transmitter, relayed through the fleet by the
    // administrator: it acts on every host that trusts the transmitter.
    let (relayed, bob_jti) = tx.sign("session-revoked", "bob@corp.example");
    let published = publish(&admin, "admin", &relayed, &tx.dir);
    assert_eq!(
        published["subject"],
        format!("{}.signals.admin", admin.prefix),
        "{published}"
    );
    for (h, id) in [&a, &b].iter().zip(&bob) {
        wait_for(WAIT, "bob's session ends from the relayed SET", || {
            state(h, id) == "terminated"
        });
        assert!(
            received(h, &bob_jti)
                .iter()
                .any(|(o, _)| o.starts_with("terminated")),
            "{}",
            h.name
        );
    }
    assert_eq!(state(&c, &bob[2]), "active", "host C trusts no transmitter");
    assert_eq!(
        a.fleet_status()["signals_published"],
        1,
        "host A published its one push"
    );
    assert_eq!(
        b.fleet_status()["signals_published"],
        0,
        "host B was pushed nothing"
    );
    // The push, the forged SET, the replay and the relayed SET.
    wait_for(WAIT, "host C counts what it received", || {
        c.fleet_status()["signals_received"] == 4
    });
    assert_eq!(
        state(&c, &alice[2]),
        "active",
        "host C trusts no transmitter"
    );
}

/// The `authorization` block of `packaging/nats-server.conf`, with its `web-1` agent user
/// copied for each of `hosts`.
fn packaged_authorization(hosts: &[&str]) -> String {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/nats-server.conf");
    let text = std::fs::read_to_string(&path).unwrap();
    let auth = &text[text
        .find("authorization {")
        .expect("an authorization block")..];
    let start = auth
        .find("    { user: agent-web-1")
        .expect("the web-1 agent user");
    let end = auth.find("    # A relay").expect("the relay user");
    let agent = &auth[start..end];
    let agents: String = hosts.iter().map(|h| agent.replace("web-1", h)).collect();
    format!("{}{agents}{}", &auth[..start], &auth[end..])
}

#[test]
fn the_packaged_server_permissions_carry_signals_and_keep_each_publisher_to_its_subject() {
    if !require_root(
        "the_packaged_server_permissions_carry_signals_and_keep_each_publisher_to_its_subject",
    ) {
        return;
    }
    let nats = NatsServer::single_with("fleet-ssf-perm", &packaged_authorization(&["fpa", "fpb"]))
        .expect("nats-server with the packaged permissions");
    let mut admin = FleetAdmin::new("fleet-ssf-perm", vec![nats.url()]);
    // The packaged permissions name the default prefix.
    admin.prefix = "flowwarden".into();
    let tx = Transmitter::new("fleet-ssf-perm");
    let secret = |name: &str, password: &str| {
        let p = tx.dir.join(format!("{name}.password"));
        std::fs::write(&p, password).unwrap();
        p.display().to_string()
    };
    let admin_pw = secret("fleet-admin", "CHANGE-ME-admin");
    let as_user = |user: &str, file: &str, args: &[&str]| {
        let mut full = vec!["--user", user, "--password-file", file];
        full.extend_from_slice(args);
        admin.cli(&full)
    };
    let (ok, out) = as_user("fleet-admin", &admin_pw, &["init"]);
    assert!(ok, "init as fleet-admin: {out}");
    let hosts: Vec<FleetHost> = ["fpa", "fpb"]
        .iter()
        .map(|h| {
            let pw = secret(h, &format!("CHANGE-ME-{h}"));
            let extra = format!(
                "user = \"agent-{h}\"\npassword_file = \"{pw}\"\n{}",
                tx.section
            );
            FleetHost::start(&admin, h, POLICY, &[nats.port], &extra)
        })
        .collect();
    let (a, b) = (&hosts[0], &hosts[1]);
    for h in &hosts {
        // Each host has caught up on the control stream under its packaged user (it admits
        // no one before).
        wait_for(WAIT * 3, "the host is current", || {
            h.fleet_status()["current"] == true
        });
    }
    let alice_b = login(b, "alice@corp.example");
    let bob_b = login(b, "bob@corp.example");

    // Host A publishes what it accepted; host B consumes it, as their own users.
    let (token, _) = tx.sign("session-revoked", "alice@corp.example");
    wait_for(WAIT, "host A accepts the push", || {
        push(a, &tx.authorization, &token).0 == 202
    });
    wait_for(WAIT, "alice's session on host B ends", || {
        state(b, &alice_b) == "terminated"
    });

    // The relay user publishes on its own subject, and nowhere else.
    let relay_pw = secret("ssf-relay-1", "CHANGE-ME-relay-1");
    let (bob_set, _) = tx.sign("session-revoked", "bob@corp.example");
    let file = tx.dir.join("bob.jwt");
    std::fs::write(&file, &bob_set).unwrap();
    let file = file.to_str().unwrap();
    let (ok, out) = as_user(
        "ssf-relay-1",
        &relay_pw,
        &["signal", "publish", file, "--from", "fpa"],
    );
    assert!(!ok, "the relay posed as host fpa: {out}");
    assert_eq!(state(b, &bob_b), "active");
    let (ok, out) = as_user(
        "ssf-relay-1",
        &relay_pw,
        &["signal", "publish", file, "--from", "ssf-relay-1"],
    );
    assert!(ok, "the relay publishes on its own subject: {out}");
    wait_for(WAIT, "bob's session on host B ends", || {
        state(b, &bob_b) == "terminated"
    });
    // An agent's user may not publish as another host either.
    let (ok, out) = as_user(
        "agent-fpa",
        &tx.dir.join("fpa.password").display().to_string(),
        &["signal", "publish", file, "--from", "fpb"],
    );
    assert!(!ok, "agent fpa posed as host fpb: {out}");
}

#[test]
fn a_set_accepted_while_the_fleet_is_away_reaches_it_when_it_is_back_even_across_a_crash() {
    if !require_root(
        "a_set_accepted_while_the_fleet_is_away_reaches_it_when_it_is_back_even_across_a_crash",
    ) {
        return;
    }
    let mut nats = NatsServer::single("fleet-ssf-away").expect("nats-server");
    let admin = FleetAdmin::new("fleet-ssf-away", vec![nats.url()]);
    let (ok, out) = admin.cli(&["init"]);
    assert!(ok, "{out}");
    let tx = Transmitter::new("fleet-ssf-away");
    let mut a = FleetHost::start(&admin, "fwa", POLICY, &[nats.port], &tx.section);
    let b = FleetHost::start(&admin, "fwb", POLICY, &[nats.port], &tx.section);
    wait_for(WAIT * 3, "both hosts current", || {
        let hosts = admin.json(&["hosts"]);
        hosts.as_array().is_some_and(|h| {
            h.len() == 2
                && h.iter()
                    .all(|h| h["current"] == true && h["connected"] == true)
        })
    });
    let alice_b = login(&b, "alice@corp.example");

    // The fleet's server goes away; host A still accepts (and applies) a SET…
    nats.kill();
    let (token, jti) = tx.sign("session-revoked", "alice@corp.example");
    let (status, body) = push(&a, &tx.authorization, &token);
    assert_eq!(status, 202, "{body}");
    assert!(
        received(&a, &jti)
            .iter()
            .any(|(o, _)| o.starts_with("terminated") || o == "ignored"),
        "host A applied it"
    );
    // …and crashes before it could publish it.
    a.stack.agent_mut().kill9();
    a.stack.start_agent();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(state(&b, &alice_b), "active", "nothing reached host B yet");

    nats.start().expect("nats-server again");
    wait_for(WAIT * 2, "alice's session on host B ends", || {
        state(&b, &alice_b) == "terminated"
    });
    let on_b = received(&b, &jti);
    assert!(
        on_b.iter().any(|(o, d)| o.starts_with("terminated")
            && d.contains(&format!("via the fleet ({}.signals.fwa)", admin.prefix))),
        "{on_b:?}"
    );
}
