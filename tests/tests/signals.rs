//! Identity-provider signals against a real agent: SETs pushed to `/v1/ssf/events` (signed
//! by `flowwarden dev ssf`'s key) end and narrow real sessions, make a live `ssh` exit, and
//! every hostile SET is refused with its RFC 8935 error while nothing changes.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use flowwarden::signals::dev::{self, DevSet, SigningKey};
use flowwarden_tests::{
    privileged::require_root,
    ssh::{SshSession, Sshd},
    stack::{ADMISSION_PORT, AUDIENCE, ECHO_POLICY, ISSUER, Stack, cli},
    tcp::{accept, carries, connect, listen},
};
use serde_json::{Value, json};

const SSH_POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

# ssh only from a compliant device; echo from any device.
[[rule]]
name = "ops-ssh"
groups = ["ops"]
resources = ["ssh"]

[rule.device]
compliant = true

[[rule]]
name = "ops-echo"
groups = ["ops"]
resources = ["echo"]
"#;

/// A stack whose agent trusts a development transmitter pushing with `authorization`.
struct Signals {
    stack: Stack,
    key: SigningKey,
    jwks: PathBuf,
    authorization: String,
}

fn start(tag: &str, policy: &str) -> Signals {
    let dir = std::env::temp_dir().join(format!("fw-ssf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, out) = cli(&["dev", "ssf", "keygen", "--dir", dir.to_str().unwrap()]);
    assert!(ok, "dev ssf keygen: {out}");
    let authorization = format!("Bearer ssf-{}", dev::random_jti());
    let auth_file = dir.join("authorization");
    std::fs::write(&auth_file, &authorization).unwrap();
    let jwks = dir.join(dev::SSF_JWKS_FILE);
    // Development tokens carry no jti, sid or tid: the test maps those subject formats to
    // claims they do carry, which is also how the per-transmitter mapping is tested.
    let transmitter = format!(
        r#"
[[signals.transmitter]]
issuer = "{issuer}"
audience = "{AUDIENCE}"
algorithms = ["RS256"]
jwks_file = "{jwks}"
push_authorization_file = "{auth}"

[signals.transmitter.subjects]
jwt_id = "device_os"
session = "device_id"
tenant = "device_os"
"#,
        issuer = dev::DEV_TRANSMITTER,
        jwks = jwks.display(),
        auth = auth_file.display(),
    );
    let stack = Stack::start_with(tag, policy, "", &transmitter);
    let key = SigningKey::from_dir(&dir).expect("the transmitter key");
    Signals {
        stack,
        key,
        jwks,
        authorization,
    }
}

fn now() -> u64 {
    flowwarden::sessions::model::now_ms() / 1000
}

impl Signals {
    /// POSTs `body` from the client namespace: (status, body).
    fn post(&self, authorization: &str, content_type: &str, body: &[u8]) -> (u16, Value) {
        let agent = format!("{}:{ADMISSION_PORT}", self.stack.pair.server_addr);
        let fp = self.stack.fingerprint();
        let (status, text) = self
            .stack
            .pair
            .client
            .run(|| dev::push(&agent, &fp, authorization, content_type, body))
            .expect("the agent answers");
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn push_token(&self, token: &str) -> (u16, Value) {
        self.post(
            &self.authorization,
            "application/secevent+jwt",
            token.as_bytes(),
        )
    }

    /// Signs and pushes a well-formed SET; asserts 202.
    fn push(&self, set: &DevSet) -> String {
        let token = self.key.sign(set, now()).expect("sign");
        let (status, body) = self.push_token(&token);
        assert_eq!(status, 202, "pushing {}: {body}", set.event_type);
        token
    }

    fn login(&self, email: &str, extra: &[&str], cache: &str) -> String {
        let mut args = vec![
            "dev",
            "token",
            "--dir",
            self.stack.keys.to_str().unwrap(),
            "--sub",
            email,
            "--email",
            email,
            "--group",
            "ops",
        ];
        args.extend_from_slice(extra);
        let (ok, token) = cli(&args);
        assert!(ok, "dev token: {token}");
        let (ok, out) = self
            .stack
            .login(token.trim(), &self.stack.scratch.dir.join(cache));
        assert!(ok, "login {email}: {out}");
        let v: Value = serde_json::from_str(&out[out.find('{').unwrap()..]).unwrap();
        v["session"].as_str().unwrap().to_owned()
    }

    fn state(&self, id: &str) -> String {
        self.stack.ctl_json(&["sessions", "show", id])["state"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    fn audit_outcomes(&self) -> Vec<(String, String)> {
        // One JSON object per line.
        let (ok, out) = self.stack.ctl(&[
            "audit",
            "--kind",
            "signal_received",
            "--limit",
            "1000",
            "--json",
        ]);
        assert!(ok, "audit: {out}");
        out.lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|e| {
                (
                    e["event"].as_str().unwrap_or_default().to_owned(),
                    e["outcome"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }
}

fn email(e: &str) -> Option<Value> {
    Some(json!({"format": "email", "email": e}))
}

#[test]
fn session_revoked_makes_a_live_ssh_exit_and_a_replay_changes_nothing() {
    if !require_root("session_revoked_makes_a_live_ssh_exit_and_a_replay_changes_nothing") {
        return;
    }
    let s = start("ssf-ssh", SSH_POLICY);
    let server: IpAddr = s.stack.pair.server_addr.into();
    let sshd = Sshd::start(
        &s.stack.pair.server,
        s.stack.scratch.dir.join("ssh"),
        server,
    );
    let alice = s.login(
        "alice@corp.example",
        &["--device-id", "laptop-1", "--compliant", "true"],
        "alice",
    );
    let mut ssh = SshSession::spawn(sshd.ssh(
        &s.stack.pair.client,
        server,
        "while date; do sleep 0.05; done",
    ));
    s.stack
        .wait_until(Duration::from_secs(10), "lines over ssh", || {
            ssh.line_count() >= 5
        });
    // From the same address, after alice's ssh flow opened (it stays hers).
    let bob = s.login(
        "bob@corp.example",
        &["--device-id", "laptop-2", "--compliant", "true"],
        "bob",
    );

    let set = DevSet::new("session-revoked", email("ALICE@corp.example"));
    let token = s.push(&set);
    let exited = ssh.wait_exit(Duration::from_secs(5));
    assert!(
        exited.is_some_and(|st| !st.success()),
        "ssh did not exit after session-revoked ({exited:?})"
    );
    assert_eq!(s.state(&alice), "terminated");
    assert_eq!(s.state(&bob), "active", "bob was not named");
    let shown = s.stack.ctl_json(&["sessions", "show", &alice]);
    assert_eq!(shown["ended"]["cause"], "identity_event", "{shown}");
    assert_eq!(shown["signals"][0]["event"], "session-revoked", "{shown}");
    assert_eq!(shown["signals"][0]["outcome"], "terminated", "{shown}");
    let (ok, human) = s.stack.ctl(&["sessions", "show", &alice]);
    assert!(
        ok && human.contains("session-revoked from https://ssf.flowwarden.dev"),
        "{human}"
    );

    // The same SET again: acknowledged, audited as a duplicate, nothing applied twice.
    let (status, body) = s.push_token(&token);
    assert_eq!(status, 202, "{body}");
    assert_eq!(s.state(&bob), "active");
    let outcomes = s.audit_outcomes();
    assert!(
        outcomes
            .iter()
            .any(|(e, o)| e == "session-revoked" && o.starts_with("terminated"))
            && outcomes.contains(&("session-revoked".into(), "duplicate".into())),
        "{outcomes:?}"
    );
    let status = s.stack.ctl_json(&["signals", "status"]);
    let t = &status["transmitters"][0];
    assert_eq!(t["received"], 2, "{status}");
    assert_eq!(t["counts"]["session-revoked duplicate"], 1, "{status}");
}

#[test]
fn device_non_compliance_severs_only_what_needs_a_compliant_device() {
    if !require_root("device_non_compliance_severs_only_what_needs_a_compliant_device") {
        return;
    }
    let s = start("ssf-device", SSH_POLICY);
    let server: IpAddr = s.stack.pair.server_addr.into();
    let sshd = Sshd::start(
        &s.stack.pair.server,
        s.stack.scratch.dir.join("ssh"),
        server,
    );
    let alice = s.login(
        "alice@corp.example",
        &["--device-id", "laptop-1", "--compliant", "true"],
        "alice",
    );
    let echo_addr = (s.stack.pair.server_addr, 7000).into();
    let listener = listen(&s.stack.pair.server, echo_addr);
    let mut client =
        connect(&s.stack.pair.client, echo_addr, Duration::from_secs(5)).expect("echo connects");
    let mut served = accept(&listener, Duration::from_secs(5)).expect("accept");
    assert!(carries(&mut client, &mut served, b"before"));
    let mut ssh = SshSession::spawn(sshd.ssh(
        &s.stack.pair.client,
        server,
        "while date; do sleep 0.05; done",
    ));
    s.stack
        .wait_until(Duration::from_secs(10), "lines over ssh", || {
            ssh.line_count() >= 5
        });

    let mut set = DevSet::new(
        "device-compliance-change",
        Some(json!({"format": "opaque", "id": "laptop-1"})),
    );
    set.event
        .insert("current_status".into(), "not-compliant".into());
    set.event
        .insert("previous_status".into(), "compliant".into());
    s.push(&set);

    let exited = ssh.wait_exit(Duration::from_secs(5));
    assert!(
        exited.is_some(),
        "ssh (needs a compliant device) did not exit"
    );
    assert!(
        carries(&mut client, &mut served, b"after"),
        "echo (any device) must keep flowing"
    );
    let shown = s.stack.ctl_json(&["sessions", "show", &alice]);
    assert_eq!(shown["state"], "active", "{shown}");
    assert_eq!(shown["device"]["compliant"], false, "{shown}");
    let grants: Vec<&str> = shown["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["resource"].as_str().unwrap())
        .collect();
    assert_eq!(grants, ["echo"], "{shown}");
    assert!(
        shown["signals"][0]["outcome"]
            .as_str()
            .unwrap()
            .contains("severed ssh"),
        "{shown}"
    );

    // A new login from that laptop with a token minted before the change still claiming
    // compliance gets what a non-compliant device gets.
    let again = s.login(
        "alice@corp.example",
        &["--device-id", "laptop-1", "--compliant", "true"],
        "alice2",
    );
    let shown = s.stack.ctl_json(&["sessions", "show", &again]);
    let grants: Vec<&str> = shown["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["resource"].as_str().unwrap())
        .collect();
    assert_eq!(grants, ["echo"], "{shown}");

    // Compliant again: recorded, nothing reopens by itself.
    set.event
        .insert("current_status".into(), "compliant".into());
    set.jti = None;
    s.push(&set);
    let shown = s.stack.ctl_json(&["sessions", "show", &alice]);
    assert_eq!(shown["device"]["compliant"], true, "{shown}");
    assert_eq!(
        shown["grants"].as_array().unwrap().len(),
        1,
        "nothing reopens: {shown}"
    );

    // A "compliant" signal never vouches for a device its token does not: a new login
    // whose token says the laptop is not compliant still gets echo alone.
    let third = s.login(
        "alice@corp.example",
        &["--device-id", "laptop-1", "--compliant", "false"],
        "alice3",
    );
    let shown = s.stack.ctl_json(&["sessions", "show", &third]);
    assert_eq!(shown["device"]["compliant"], false, "{shown}");
    let grants: Vec<&str> = shown["grants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["resource"].as_str().unwrap())
        .collect();
    assert_eq!(grants, ["echo"], "{shown}");
}

#[test]
fn each_event_type_and_subject_format_acts_on_the_sessions_it_names() {
    if !require_root("each_event_type_and_subject_format_acts_on_the_sessions_it_names") {
        return;
    }
    let s = start("ssf-events", ECHO_POLICY);
    let dev = ["--device-id", "laptop-9", "--os", "linux"];
    // (event, subject, extra event members, ends the session)
    let cases: Vec<(&str, Value, Value, bool)> = vec![
        (
            "session-revoked",
            json!({"format": "email", "email": "u1@corp.example"}),
            json!({}),
            true,
        ),
        (
            "session-revoked",
            json!({"format": "iss_sub", "iss": ISSUER, "sub": "u2@corp.example"}),
            json!({}),
            true,
        ),
        (
            "session-revoked",
            json!({"format": "opaque", "id": "u3@corp.example"}),
            json!({}),
            true,
        ),
        (
            "session-revoked",
            json!({"format": "jwt_id", "iss": ISSUER, "jti": "linux"}),
            json!({}),
            true,
        ),
        (
            "session-revoked",
            json!({"format": "complex", "user": {"format": "email", "email": "u5@corp.example"},
                   "device": {"format": "opaque", "id": "laptop-9"},
                   "session": {"format": "opaque", "id": "laptop-9"},
                   "tenant": {"format": "opaque", "id": "linux"}}),
            json!({}),
            true,
        ),
        (
            "credential-change",
            json!({"format": "email", "email": "u6@corp.example"}),
            json!({"change_type": "revoke", "credential_type": "password"}),
            true,
        ),
        (
            "credential-change",
            json!({"format": "email", "email": "u7@corp.example"}),
            json!({"change_type": "create", "credential_type": "fido2-roaming"}),
            false,
        ),
        (
            "account-disabled",
            json!({"format": "email", "email": "u8@corp.example"}),
            json!({"reason": "hijacking"}),
            true,
        ),
        (
            "account-purged",
            json!({"format": "email", "email": "u9@corp.example"}),
            json!({}),
            true,
        ),
        (
            "credential-compromise",
            json!({"format": "email", "email": "u10@corp.example"}),
            json!({"credential_type": "password"}),
            true,
        ),
        // Groups change: ops is gone, the policy grants nothing, the session ends.
        (
            "token-claims-change",
            json!({"format": "email", "email": "u11@corp.example"}),
            json!({"claims": {"groups": ["staff"]}}),
            true,
        ),
        (
            "assurance-level-change",
            json!({"format": "email", "email": "u12@corp.example"}),
            json!({"namespace": "RFC8176", "current_level": "phr"}),
            false,
        ),
        (
            "https://example.com/secevent/custom",
            json!({"format": "email", "email": "u13@corp.example"}),
            json!({}),
            false,
        ),
        (
            "session-revoked",
            json!({"format": "phone_number", "phone_number": "+15551234"}),
            json!({}),
            false,
        ),
    ];
    for (i, (event, subject, members, ends)) in cases.into_iter().enumerate() {
        let user = format!("u{}@corp.example", i + 1);
        let id = s.login(&user, &dev, &format!("c{i}"));
        let other = s.login("bystander@corp.example", &[], &format!("b{i}"));
        let mut set = DevSet::new(event, Some(subject.clone()));
        set.event = members.as_object().unwrap().clone();
        s.push(&set);
        let want = if ends { "terminated" } else { "active" };
        assert_eq!(s.state(&id), want, "{event} {subject}");
        if i != 3 && i != 4 {
            assert_eq!(
                s.state(&other),
                "active",
                "{event} {subject} must spare others"
            );
        }
        let _ = s
            .stack
            .ctl(&["sessions", "terminate", &other, "--allow-relogin"]);
        if event == "assurance-level-change" {
            let shown = s.stack.ctl_json(&["sessions", "show", &id]);
            assert_eq!(shown["claims"]["acr"], "phr", "{shown}");
        }
    }
    let outcomes = s.audit_outcomes();
    for (event, outcome) in [
        ("credential-change", "ignored"),
        ("https://example.com/secevent/custom", "ignored"),
        (
            "token-claims-change",
            "claims_updated; terminated: policy allows nothing",
        ),
        ("assurance-level-change", "assurance_updated"),
    ] {
        assert!(
            outcomes
                .iter()
                .any(|(e, o)| e == event && o.starts_with(outcome.split(';').next().unwrap())),
            "{event} {outcome}: {outcomes:?}"
        );
    }
}

#[test]
fn hostile_sets_are_refused_with_their_error_and_change_nothing() {
    if !require_root("hostile_sets_are_refused_with_their_error_and_change_nothing") {
        return;
    }
    let s = start("ssf-hostile", ECHO_POLICY);
    let alice = s.login("alice@corp.example", &[], "alice");
    let good = DevSet::new("session-revoked", email("alice@corp.example"));
    let payload = good.payload(now());
    let header = s.key.header();
    let sign = |h: &Value, p: &Value| s.key.sign_raw(h, p).unwrap();
    let with = |k: &str, v: Value| {
        let mut p = payload.clone();
        p[k] = v;
        p
    };
    let b64 = |v: &Value| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let forger = std::env::temp_dir().join(format!("fw-ssf-forger-{}", std::process::id()));
    dev::keygen(&forger).unwrap();
    let mut forged_header = header.clone();
    forged_header["kid"] = header["kid"].clone();
    let forged = SigningKey::load(&forger.join(dev::SSF_KEY_FILE), &s.jwks)
        .unwrap()
        .sign_raw(&forged_header, &payload)
        .unwrap();
    let none = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "secevent+jwt"})),
        b64(&payload)
    );
    let hs_input = format!(
        "{}.{}",
        b64(&json!({"alg": "HS256", "typ": "secevent+jwt", "kid": header["kid"]})),
        b64(&payload)
    );
    let hs = {
        use base64::Engine as _;
        let jwks = std::fs::read(&s.jwks).unwrap();
        let mac = aws_lc_rs_hmac(&jwks, hs_input.as_bytes());
        format!(
            "{hs_input}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac)
        )
    };
    let mut jwt_typ = header.clone();
    jwt_typ["typ"] = json!("JWT");
    let two_events = with(
        "events",
        json!({good.event_uri(): {}, "https://schemas.openid.net/secevent/risc/event-type/account-disabled": {}}),
    );
    let cases: Vec<(&str, String, &str)> = vec![
        ("forged signature", forged, "invalid_key"),
        ("HS256 keyed with the public JWKS", hs, "invalid_key"),
        ("alg none", none, "invalid_key"),
        (
            "wrong iss",
            sign(&header, &with("iss", json!("https://evil.example"))),
            "invalid_issuer",
        ),
        (
            "wrong aud",
            sign(&header, &with("aud", json!("someone-else"))),
            "invalid_audience",
        ),
        (
            "sub present",
            sign(&header, &with("sub", json!("alice"))),
            "invalid_request",
        ),
        ("two events", sign(&header, &two_events), "invalid_request"),
        ("wrong typ", sign(&jwt_typ, &payload), "invalid_request"),
    ];
    for (what, token, err) in &cases {
        let (status, body) = s.push_token(token);
        assert_eq!(
            (status, body["err"].as_str()),
            (400, Some(*err)),
            "{what}: {body}"
        );
        assert!(
            body["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{what}: {body}"
        );
    }
    let good_token = sign(&header, &payload);
    let set_type = "application/secevent+jwt";
    let (status, body) = s.post(&s.authorization, set_type, &vec![b'a'; 1 << 20]);
    assert_eq!(
        (status, body["err"].as_str()),
        (400, Some("invalid_request")),
        "1 MiB body: {body}"
    );
    let (status, body) = s.post(&s.authorization, "application/json", good_token.as_bytes());
    assert_eq!(
        (status, body["err"].as_str()),
        (400, Some("invalid_request")),
        "content type: {body}"
    );
    let (status, body) = s.post("", set_type, good_token.as_bytes());
    assert_eq!(
        (status, body["err"].as_str()),
        (400, Some("authentication_failed")),
        "no authorization: {body}"
    );
    let (status, body) = s.post("Bearer wrong", set_type, good_token.as_bytes());
    assert_eq!(
        (status, body["err"].as_str()),
        (400, Some("authentication_failed")),
        "wrong authorization: {body}"
    );

    assert_eq!(s.state(&alice), "active", "no hostile SET changed anything");
    let status = s.stack.ctl_json(&["signals", "status"]);
    assert_eq!(status["transmitters"][0]["received"], 0, "{status}");
    assert!(s.audit_outcomes().is_empty());

    // The good SET still works afterwards; replayed after a restart, it is a duplicate.
    let (status, _) = s.push_token(&good_token);
    assert_eq!(status, 202);
    assert_eq!(s.state(&alice), "terminated");
    let mut s = s;
    s.stack.agent_mut().kill9();
    s.stack.start_agent();
    let bob = s.login("bob@corp.example", &[], "bob");
    let (status, _) = s.push_token(&good_token);
    assert_eq!(status, 202, "a replay is acknowledged");
    assert_eq!(s.state(&bob), "active");
    assert!(
        s.audit_outcomes()
            .contains(&("session-revoked".into(), "duplicate".into())),
        "the replay after kill -9 is recognised"
    );

    // Without the push credential, a flood is audited only within its source's admission
    // budget (burst 40, 20 a second), then answered 429 with no record: nobody without the
    // credential writes the audit log at will. The transmitter itself is never limited.
    let refused_records = |s: &Signals| {
        let (ok, out) = s.stack.ctl(&[
            "audit",
            "--kind",
            "signal_refused",
            "--limit",
            "10000",
            "--json",
        ]);
        assert!(ok, "audit: {out}");
        out.lines().filter(|l| l.contains('{')).count()
    };
    let carol = s.login("carol@corp.example", &[], "carol");
    let before = refused_records(&s);
    let started = std::time::Instant::now();
    let mut limited = 0;
    for _ in 0..300 {
        let (status, body) = s.post("Bearer flood", set_type, good_token.as_bytes());
        match status {
            429 => {
                assert_eq!(body["err"], "rate_limited", "{body}");
                limited += 1;
            }
            400 => assert_eq!(body["err"], "authentication_failed", "{body}"),
            other => panic!("an unauthenticated push answered {other}: {body}"),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    let recorded = refused_records(&s) - before;
    let budget = 40 + (20.0 * secs).ceil() as usize;
    assert!(limited > 0, "300 pushes in {secs:.1} s were never limited");
    assert!(
        recorded <= budget,
        "{recorded} refusals audited in {secs:.1} s, more than the budget of {budget}"
    );
    s.push(&DevSet::new("session-revoked", email("carol@corp.example")));
    assert_eq!(
        s.state(&carol),
        "terminated",
        "the transmitter is not limited"
    );
}

fn aws_lc_rs_hmac(key: &[u8], msg: &[u8]) -> Vec<u8> {
    // HMAC-SHA256 by hand (RFC 2104): the test crate has no crypto dependency of its own.
    use flowwarden::signals::dev::sha256;
    let mut k = if key.len() > 64 {
        sha256(key)
    } else {
        key.to_vec()
    };
    k.resize(64, 0);
    let inner: Vec<u8> = k
        .iter()
        .map(|b| b ^ 0x36)
        .chain(msg.iter().copied())
        .collect();
    let outer: Vec<u8> = k.iter().map(|b| b ^ 0x5c).chain(sha256(&inner)).collect();
    sha256(&outer)
}

#[test]
fn endings_stick_denied_tokens_cut_offs_and_locks() {
    if !require_root("endings_stick_denied_tokens_cut_offs_and_locks") {
        return;
    }
    let s = start("ssf-sticky", ECHO_POLICY);
    let login = |email: &str, cache: &str| -> (String, String) {
        let (ok, token) = cli(&[
            "dev",
            "token",
            "--dir",
            s.stack.keys.to_str().unwrap(),
            "--sub",
            email,
            "--email",
            email,
            "--group",
            "ops",
        ]);
        assert!(ok, "{token}");
        let token = token.trim().to_owned();
        let (ok, out) = s.stack.login(&token, &s.stack.scratch.dir.join(cache));
        assert!(ok, "login {email}: {out}");
        (token, out)
    };
    let refused = |token: &str, cache: &str, why: &str| {
        let (ok, out) = s.stack.login(token, &s.stack.scratch.dir.join(cache));
        assert!(!ok && out.contains(why), "expected {why}: {out}");
    };

    // session-revoked: the session's token is denied, and older tokens of the user cut off.
    let (alice_token, _) = login("alice@corp.example", "a1");
    s.push(&DevSet::new("session-revoked", email("alice@corp.example")));
    refused(&alice_token, "a2", "token_revoked");

    // credential-compromise: a cut-off at the event's time refuses tokens issued until then;
    // a token issued after it is admitted.
    let (carol_token, _) = login("carol@corp.example", "c1");
    s.push(&DevSet::new(
        "credential-compromise",
        email("carol@corp.example"),
    ));
    refused(&carol_token, "c2", "issued_before_cutoff");
    std::thread::sleep(Duration::from_millis(1100));
    login("carol@corp.example", "c3");

    // account-disabled: a user lock, until an administrator removes it.
    login("dave@corp.example", "d1");
    s.push(&DevSet::new("account-disabled", email("dave@corp.example")));
    std::thread::sleep(Duration::from_millis(1100));
    let (ok, fresh) = cli(&[
        "dev",
        "token",
        "--dir",
        s.stack.keys.to_str().unwrap(),
        "--sub",
        "dave@corp.example",
        "--email",
        "dave@corp.example",
        "--group",
        "ops",
    ]);
    assert!(ok);
    refused(fresh.trim(), "d2", "locked");
    let locks = s.stack.ctl_json(&["lock", "list"]);
    let lock = &locks.as_array().unwrap()[0];
    assert_eq!(lock["target"]["user"], "dave@corp.example", "{locks}");
    let id = lock["id"].as_str().unwrap();
    let (ok, out) = s.stack.ctl(&["lock", "remove", id]);
    assert!(ok, "{out}");
    let (ok, out) = s.stack.login(fresh.trim(), &s.stack.scratch.dir.join("d3"));
    assert!(ok, "after the lock is removed: {out}");
}

/// `config check` refuses a transmitter the agent would refuse at start, naming the field, so
/// the mistake surfaces before a restart and not after it.
#[test]
fn config_check_refuses_a_transmitter_the_agent_would_refuse() {
    let scratch = flowwarden_tests::agent_proc::Scratch::new("sigcheck");
    let config = scratch.dir.join("agent.toml");
    let base = format!(
        "[policy]\ndir = \"{}\"\n\n[[signals.transmitter]]\nissuer = \"https://ssf.corp.example\"\n\
         audience = \"flowwarden\"\njwks_file = \"keys.json\"\npush_authorization_file = \"auth\"\n",
        scratch.dir.join("policies").display()
    );
    std::fs::write(&config, &base).unwrap();
    let (ok, out) = cli(&["config", "check", "--config", config.to_str().unwrap()]);
    assert!(ok, "a valid transmitter: {out}");

    for (extra, field) in [
        ("algorithms = [\"HS256\"]\n", "algorithms"),
        ("manage_stream = true\n", "bearer_token_file"),
        ("iat_window_secs = 0\n", "iat_window_secs"),
    ] {
        std::fs::write(&config, format!("{base}{extra}")).unwrap();
        let (ok, out) = cli(&["config", "check", "--config", config.to_str().unwrap()]);
        assert!(!ok, "{extra}: accepted: {out}");
        assert!(
            out.contains("[signals]") && out.contains(field),
            "{extra}: {out}"
        );
    }
}
