//! Sessions end to end: real tokens over real TLS admit sessions that open exactly their
//! grants for their source; bad tokens admit nothing; policy edits, expiry and restarts do
//! what DESIGN.md says.

use std::{net::SocketAddr, path::Path, time::Duration};

use flowwarden::admission::client::{Client, ClientError, Trust};
use flowwarden_tests::{
    privileged::require_root,
    stack::{ADMISSION_PORT, Stack, TokenSpec, cli},
    tcp::{accept, carries, connect, connect_from, listen, read_timeout},
};
use serde_json::Value;

const POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[resource]]
name = "admin"
protocol = "tcp"
ports = [7001]

[[rule]]
name = "ops-echo"
groups = ["ops"]
resources = ["echo"]
[rule.session]
reconnect = true

[[rule]]
name = "admins"
groups = ["admins"]
resources = ["admin"]
"#;

const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(5);

fn stdout_json(out: &str) -> Value {
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    let mut de = serde_json::Deserializer::from_str(&out[start..]).into_iter::<Value>();
    de.next()
        .unwrap()
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {out}"))
}

fn sessions(stack: &Stack) -> Vec<Value> {
    stack
        .ctl_json(&["sessions", "list"])
        .as_array()
        .cloned()
        .unwrap()
}

fn session(stack: &Stack, id: &str) -> Value {
    stack.ctl_json(&["sessions", "show", id])
}

fn audit_kinds(stack: &Stack) -> Vec<String> {
    let (ok, out) = stack.ctl(&["audit", "--json", "--limit", "10000"]);
    assert!(ok, "{out}");
    out.lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .map(|e| e["kind"].as_str().unwrap_or("").to_owned())
        .collect()
}

#[test]
fn a_token_admits_its_grants_for_its_source_only_and_a_policy_edit_severs_them() {
    if !require_root("a_token_admits_its_grants_for_its_source_only_and_a_policy_edit_severs_them")
    {
        return;
    }
    let stack = Stack::start("adm", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let admin: SocketAddr = (stack.pair.server_addr, 7001).into();
    let echo_listener = listen(&stack.pair.server, echo);
    let _admin_listener = listen(&stack.pair.server, admin);
    assert!(
        connect(&stack.pair.client, echo, SHORT).is_err(),
        "no session yet"
    );

    let token = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let cache = stack.scratch.dir.join("alice");
    let (ok, out) = stack.login(&token, &cache);
    assert!(ok, "login failed: {out}");
    let answer = stdout_json(&out);
    let id = answer["session"].as_str().unwrap().to_owned();
    assert_eq!(answer["user"], "alice@corp.example");
    assert_eq!(answer["source"], stack.pair.client_addr.to_string());
    assert_eq!(answer["grants"][0]["resource"], "echo");
    // The seed is a credential: it goes to the cache file, never to the output.
    assert!(
        answer["reconnect"].is_object() && !out.contains("seed"),
        "{out}"
    );
    // The token never reaches the disk: neither the client cache nor the agent's state.
    let cached = std::fs::read_to_string(
        cache
            .join("flowwarden/sessions")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    assert!(
        !cached.contains(&token[..40]),
        "the client cache holds the token"
    );
    let state = std::fs::read(stack.scratch.dir.join("state/state.redb")).unwrap();
    assert!(
        !state.windows(40).any(|w| w == &token.as_bytes()[..40]),
        "the agent's state file holds the token"
    );

    // The granted port opens for this source only; the other resource stays closed.
    let mut client = connect(&stack.pair.client, echo, LONG).expect("granted connection");
    let mut server = accept(&echo_listener, LONG).unwrap();
    assert!(carries(&mut client, &mut server, b"ping"));
    assert!(carries(&mut server, &mut client, b"pong"));
    assert!(
        connect(&stack.pair.client, admin, SHORT).is_err(),
        "admin is not granted"
    );
    let o = stack.pair.client_addr.octets();
    let other = std::net::Ipv4Addr::new(o[0], o[1], o[2], 77);
    stack
        .pair
        .client
        .ip(&[
            "addr",
            "add",
            &format!("{other}/32"),
            "dev",
            &stack.pair.client_if,
        ])
        .unwrap();
    let from: SocketAddr = (other, 0).into();
    let stranger = stack
        .pair
        .client
        .run(move || flowwarden_tests::tcp::connect_from(from, echo, SHORT));
    assert!(
        stranger.is_err(),
        "another source address of the same host got in"
    );

    let list = sessions(&stack);
    assert_eq!(list.len(), 1);
    assert_eq!(list[0]["id"], id.as_str());
    assert_eq!(list[0]["state"], "active");
    assert_eq!(list[0]["user"], "alice@corp.example");
    assert_eq!(list[0]["grants"][0]["rule"], "ops-echo");
    assert!(list[0]["traffic"]["flows"].as_u64().unwrap() >= 1);
    let detail = session(&stack, &id);
    assert_eq!(detail["groups"][0], "ops");
    assert_eq!(detail["device"]["managed"], true);
    assert_eq!(detail["claims"]["email"], "alice@corp.example");
    assert_eq!(detail["token_sha256"].as_str().unwrap().len(), 64);

    // A policy edit that takes ops off echo severs the live connection and ends the session.
    stack.write_policy(&POLICY.replace("groups = [\"ops\"]", "groups = [\"sre\"]"));
    stack.wait_until(LONG, "policy edit ends the session", || {
        session(&stack, &id)["state"] == "terminated"
    });
    read_timeout(&client, SHORT);
    read_timeout(&server, SHORT);
    assert!(
        !carries(&mut client, &mut server, b"after edit"),
        "the edit left the flow open"
    );
    // The kernel and the session table change first; the audit records are committed right
    // after (docs/policy.md, continuous evaluation).
    let wanted = [
        "session_admitted",
        "grant_removed",
        "session_terminated",
        "policy_reloaded",
    ];
    stack.wait_until(LONG, "the policy change is in the audit log", || {
        let kinds = audit_kinds(&stack);
        wanted.iter().all(|k| kinds.iter().any(|x| x == k))
    });
    let ended = session(&stack, &id);
    assert_eq!(ended["ended"]["cause"], "policy_change");
}

#[test]
fn bad_tokens_are_refused_with_their_reason_and_admit_nothing() {
    if !require_root("bad_tokens_are_refused_with_their_reason_and_admit_nothing") {
        return;
    }
    let stack = Stack::start(
        "bad",
        POLICY,
        "\n[metrics]\nenabled = true\nlisten = \"127.0.0.1:9469\"\n",
    );
    let cache = stack.scratch.dir.join("mallory");
    // Signed by a key the agent does not trust, under a kid it does not know.
    let rogue = stack.scratch.dir.join("rogue");
    assert!(cli(&["dev", "keygen", "--dir", rogue.to_str().unwrap()]).0);
    let (ok, rogue_token) = cli(&[
        "dev",
        "token",
        "--dir",
        rogue.to_str().unwrap(),
        "--sub",
        "mallory",
        "--group",
        "ops",
    ]);
    assert!(ok);
    let good = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (head, rest) = good.split_once('.').unwrap();
    let (_, sig) = rest.split_once('.').unwrap();
    let forged_payload = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            br#"{"iss":"https://idp.flowwarden.dev","aud":"flowwarden","sub":"mallory","groups":["ops"],"exp":4102444800}"#,
        )
    };
    let cases = [
        (rogue_token.trim().to_owned(), "unknown_key"),
        (format!("{head}.{forged_payload}.{sig}"), "bad_signature"),
        ("not-a-jwt".to_owned(), "malformed"),
        ("a".repeat(20_000), "too_large"),
    ];
    for (token, code) in &cases {
        let (ok, out) = stack.login(token, &cache);
        assert!(!ok, "{code}: a bad token was admitted: {out}");
        assert!(
            out.contains(code),
            "{code}: the refusal does not say why: {out}"
        );
        assert!(
            !out.contains(&token[..token.len().min(30)]) || token.len() < 12,
            "{code}: the token is echoed back"
        );
    }
    // A valid token whose identity no rule grants anything: 403 with the policy's reason.
    let nobody = stack.token(&TokenSpec::user("eve@corp.example", &["visitors"]));
    let (ok, out) = stack.login(&nobody, &cache);
    assert!(!ok && out.contains("denied"), "{out}");
    assert!(
        sessions(&stack).is_empty(),
        "a refused token left a session behind"
    );
    let kinds = audit_kinds(&stack);
    assert_eq!(
        kinds.iter().filter(|k| *k == "admission_rejected").count(),
        cases.len(),
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "admission_denied"), "{kinds:?}");
    // The metrics endpoint counts each refusal by reason.
    let scrape = stack.pair.server.run(|| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9469")?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>(text)
    });
    let metrics =
        scrape.unwrap_or_else(|e| panic!("metrics endpoint: {e}\n{}", stack.agent().log()));
    for (_, code) in &cases {
        let line =
            format!("flowwarden_admissions_total{{result=\"rejected\",reason=\"{code}\"}} 1");
        assert!(metrics.contains(&line), "metrics lack {line}:\n{metrics}");
    }
    assert!(
        metrics.contains("flowwarden_admissions_total{result=\"denied\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("flowwarden_map_fill_ratio{map=\"flows\"}"),
        "{metrics}"
    );
    let log = stack.agent().log();
    for (token, _) in &cases {
        if token.len() > 40 {
            assert!(!log.contains(&token[..40]), "the agent logged a token");
        }
    }
}

#[test]
fn expiry_ends_a_session_and_reconnect_tokens_are_single_use() {
    if !require_root("expiry_ends_a_session_and_reconnect_tokens_are_single_use") {
        return;
    }
    let stack = Stack::start("exp", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);

    // A token that lives 8 s makes a session that expires with it (the agent refuses tokens
    // with less than 5 s left, so it cannot be shorter).
    let mut spec = TokenSpec::user("carol@corp.example", &["ops"]);
    spec.lifetime_secs = 8;
    let short = stack.token(&spec);
    let carol = stack.scratch.dir.join("carol");
    let (ok, out) = stack.login(&short, &carol);
    assert!(ok, "{out}");
    let short_id = stdout_json(&out)["session"].as_str().unwrap().to_owned();
    let mut c = connect(&stack.pair.client, echo, LONG).unwrap();
    let mut s = accept(&listener, LONG).unwrap();
    assert!(carries(&mut c, &mut s, b"before expiry"));
    stack.wait_until(Duration::from_secs(15), "the session expires", || {
        session(&stack, &short_id)["state"] == "expired"
    });
    read_timeout(&s, SHORT);
    assert!(
        !carries(&mut c, &mut s, b"after expiry"),
        "an expired session still passes"
    );
    let (ok, out) = stack.reconnect(&carol);
    assert!(
        !ok && out.contains("session_ended"),
        "an expired session reconnected: {out}"
    );

    // A live session reconnects; the same reconnect token never works twice; a forged one never.
    let dave = stack.scratch.dir.join("dave");
    let (ok, out) = stack.login(
        &stack.token(&TokenSpec::user("dave@corp.example", &["ops"])),
        &dave,
    );
    assert!(ok, "{out}");
    let answer = stdout_json(&out);
    let id: flowwarden::sessions::model::SessionId =
        answer["session"].as_str().unwrap().parse().unwrap();
    let cached: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(answer["saved_to"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let seed = cached["reconnect_seed"].as_str().unwrap().to_owned();
    let (ok, out) = stack.reconnect(&dave);
    assert!(ok, "reconnect of a live session failed: {out}");
    let agent = format!("{}:{ADMISSION_PORT}", stack.pair.server_addr);
    let fp = stack.fingerprint();
    let now = flowwarden::sessions::model::now_ms();
    let token = flowwarden::auth::reconnect::mint(&seed, id, now + 10_000, now / 1000).unwrap();
    let forged =
        flowwarden::auth::reconnect::mint(&"11".repeat(32), id, now + 20_000, now / 1000).unwrap();
    let (first, replay, forgery) = stack.pair.client.run(move || {
        let client = Client::new(&agent, &Trust::Fingerprint(fp)).unwrap();
        (
            client.reconnect(&token),
            client.reconnect(&token),
            client.reconnect(&forged),
        )
    });
    assert!(first.is_ok(), "{first:?}");
    assert!(
        matches!(&replay, Err(ClientError::Refused { code, .. }) if code == "replayed"),
        "{replay:?}"
    );
    assert!(
        matches!(&forgery, Err(ClientError::Refused { code, .. }) if code == "bad_mac"),
        "{forgery:?}"
    );

    // Terminated: reconnect is refused, a fresh login works again.
    let (ok, out) = stack.ctl(&["sessions", "terminate", &id.to_string(), "--reason", "test"]);
    assert!(ok, "{out}");
    let (ok, out) = stack.reconnect(&dave);
    assert!(!ok && out.contains("session_ended"), "{out}");
    let kinds = audit_kinds(&stack);
    assert!(
        kinds.iter().filter(|k| *k == "reconnect_rejected").count() >= 3,
        "{kinds:?}"
    );
}

#[test]
fn sessions_and_audit_survive_a_restart_and_expired_ones_are_revoked_at_start() {
    if !require_root("sessions_and_audit_survive_a_restart_and_expired_ones_are_revoked_at_start") {
        return;
    }
    let mut stack = Stack::start("rst", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);
    let erin = stack.scratch.dir.join("erin");
    let (ok, out) = stack.login(
        &stack.token(&TokenSpec::user("erin@corp.example", &["ops"])),
        &erin,
    );
    assert!(ok, "{out}");
    let long_id = stdout_json(&out)["session"].as_str().unwrap().to_owned();
    // Erin's connection opens under her grant. Frank logs in from the same address after it:
    // his session then owns the (address, echo) grant, but not erin's open flow.
    let mut c = connect(&stack.pair.client, echo, LONG).expect("erin connects");
    let mut s = accept(&listener, LONG).unwrap();
    let mut spec = TokenSpec::user("frank@corp.example", &["ops"]);
    // Above the agent's 5 s minimum remaining lifetime, and over before the restart below.
    spec.lifetime_secs = 8;
    let frank = stack.scratch.dir.join("frank");
    let (ok, out) = stack.login(&stack.token(&spec), &frank);
    assert!(ok, "{out}");
    let short_id = stdout_json(&out)["session"].as_str().unwrap().to_owned();
    let before = audit_kinds(&stack).len();

    stack.agent_mut().kill9();
    // While the agent is down, the kernel keeps enforcing: erin's flow still passes.
    assert!(carries(&mut c, &mut s, b"agent down"));
    std::thread::sleep(Duration::from_secs(9));
    stack.start_agent();

    assert_eq!(session(&stack, &long_id)["state"], "active");
    let frank_after = session(&stack, &short_id);
    assert_eq!(frank_after["state"], "expired", "{frank_after}");
    assert!(
        carries(&mut c, &mut s, b"agent back"),
        "the restart cut a live session"
    );
    let pins = flowwarden::datapath::Maps::open_pinned(&stack.pin_dir).unwrap();
    let frank_id: flowwarden::sessions::model::SessionId = short_id.parse().unwrap();
    assert!(
        pins.revocation(frank_id.0).is_some(),
        "the expired session is not revoked in the kernel"
    );
    let kinds = audit_kinds(&stack);
    assert!(
        kinds.len() > before,
        "audit records were lost or none were added"
    );
    assert_eq!(
        kinds.iter().filter(|k| *k == "session_admitted").count(),
        2,
        "{kinds:?}"
    );
    assert!(kinds.iter().any(|k| k == "agent_started"));
    assert!(Path::new(&stack.scratch.dir.join("state/state.redb")).exists());
}

#[test]
fn idle_flows_age_out_then_the_session_goes_dormant_then_expires() {
    if !require_root("idle_flows_age_out_then_the_session_goes_dormant_then_expires") {
        return;
    }
    let policy = POLICY.replace(
        "[rule.session]\nreconnect = true",
        "[rule.session]\nreconnect = true\nidle_timeout = \"10s\"\ndormant_timeout = \"10s\"",
    );
    let stack = Stack::start("idle", &policy, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);
    let ivan = stack.scratch.dir.join("ivan");
    let (ok, out) = stack.login(
        &stack.token(&TokenSpec::user("ivan@corp.example", &["ops"])),
        &ivan,
    );
    assert!(ok, "{out}");
    let id = stdout_json(&out)["session"].as_str().unwrap().to_owned();
    let mut c = connect(&stack.pair.client, echo, LONG).unwrap();
    let mut s = accept(&listener, LONG).unwrap();
    assert!(carries(&mut c, &mut s, b"one exchange, then silence"));
    assert_eq!(session(&stack, &id)["traffic"]["flows"], 1);

    // Silence: the flow ages out (dead-peer detection), the session goes dormant…
    stack.wait_until(Duration::from_secs(25), "the idle flow is removed", || {
        session(&stack, &id)["traffic"]["flows"] == 0
    });
    stack.wait_until(Duration::from_secs(15), "the session goes dormant", || {
        session(&stack, &id)["state"] == "dormant"
    });
    // …a new flow would wake it, but none comes: the dormant timeout expires it.
    stack.wait_until(
        Duration::from_secs(25),
        "the dormant session expires",
        || session(&stack, &id)["state"] == "expired",
    );
    let ended = session(&stack, &id);
    assert_eq!(ended["ended"]["cause"], "dormant_timeout", "{ended}");
    let kinds = audit_kinds(&stack);
    for k in ["flow_idle", "state_changed", "session_expired"] {
        assert!(kinds.iter().any(|x| x == k), "audit lacks {k}: {kinds:?}");
    }
    assert!(
        connect(&stack.pair.client, echo, SHORT).is_err(),
        "an expired session still admits"
    );
}

#[test]
fn a_reconnect_from_a_new_address_moves_the_grants_with_the_session() {
    if !require_root("a_reconnect_from_a_new_address_moves_the_grants_with_the_session") {
        return;
    }
    let stack = Stack::start("mov", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);
    let cache = stack.scratch.dir.join("erin");
    let (ok, out) = stack.login(
        &stack.token(&TokenSpec::user("erin@corp.example", &["ops"])),
        &cache,
    );
    assert!(ok, "{out}");
    let id = stdout_json(&out)["session"].as_str().unwrap().to_owned();
    let old = stack.pair.client_addr;
    let mut c = connect(&stack.pair.client, echo, LONG).unwrap();
    let mut s = accept(&listener, LONG).unwrap();
    assert!(carries(&mut c, &mut s, b"from the first address"));

    // The client moves: a second address on its interface becomes the source of everything
    // it opens towards the server (as after a DHCP renewal or a roam).
    let [a, b, c3, _] = old.octets();
    let new = std::net::Ipv4Addr::new(a, b, c3, 3);
    let ns = &stack.pair.client;
    ns.ip(&[
        "addr",
        "add",
        &format!("{new}/24"),
        "dev",
        &stack.pair.client_if,
    ])
    .unwrap();
    ns.ip(&[
        "route",
        "replace",
        &format!("{a}.{b}.{c3}.0/24"),
        "dev",
        &stack.pair.client_if,
        "src",
        &new.to_string(),
    ])
    .unwrap();
    assert!(
        connect(&stack.pair.client, echo, SHORT).is_err(),
        "the new address has no grant before the reconnect"
    );

    let (ok, out) = stack.reconnect(&cache);
    assert!(ok, "reconnect from {new} failed: {out}");
    let shown = session(&stack, &id);
    assert_eq!(shown["source"], new.to_string(), "{shown}");
    assert_eq!(shown["previous_sources"][0], old.to_string(), "{shown}");
    let mut c =
        connect(&stack.pair.client, echo, LONG).expect("the grant moved to the new address");
    let mut s = accept(&listener, LONG).unwrap();
    assert_eq!(c.local_addr().unwrap().ip(), std::net::IpAddr::V4(new));
    assert!(carries(&mut c, &mut s, b"from the new address"));

    // The old address lost its grant: a new connection from it is dropped.
    let from_old = stack
        .pair
        .client
        .run(move || connect_from((old, 0).into(), echo, SHORT));
    assert!(from_old.is_err(), "the old address still opens flows");
    let kinds = audit_kinds(&stack);
    assert!(
        kinds.iter().any(|k| k == "session_reconnected"),
        "{kinds:?}"
    );
}
