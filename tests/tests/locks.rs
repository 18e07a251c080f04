//! Termination that sticks, against a real agent with real tokens (and real OpenSSH where a
//! flow is involved): a terminated session's token is refused `token_revoked`, `terminate
//! --user` cuts off older tokens (and tokens without `iat`), each kind of lock severs what it
//! matches and keeps it out until it expires or is removed, and all of it survives a restart
//! and a `kill -9`.

use std::time::Duration;

use flowwarden_tests::{
    privileged::require_root,
    ssh::{SshSession, Sshd},
    stack::{Stack, cli},
};
use serde_json::Value;

const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["ssh"]
"#;

const ALICE: &str = "alice@corp.example";
const BOB: &str = "bob@corp.example";

/// Prints a line every 10 ms, until its output goes nowhere.
const TICKER: &str = "while date +%s%N; do sleep 0.01; done";

/// A development token for `email` (group ops), optionally with a device id.
fn token(stack: &Stack, email: &str, device: Option<&str>) -> String {
    let keys = stack.keys.display().to_string();
    let mut args = vec![
        "dev",
        "token",
        "--dir",
        &keys,
        "--sub",
        email,
        "--email",
        email,
        "--group",
        "ops",
        "--managed",
        "true",
        "--lifetime",
        "3600",
    ];
    if let Some(d) = device {
        args.extend(["--device-id", d]);
    }
    let (ok, out) = cli(&args);
    assert!(ok, "dev token failed: {out}");
    out.lines().next().unwrap_or_default().trim().to_owned()
}

/// A token minted in a later second than anything before: its `iat` is after a cut-off set
/// until now, and it is another token than an earlier one of the same claims.
fn fresh(stack: &Stack, email: &str, device: Option<&str>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    std::thread::sleep(Duration::from_millis(1020 - u64::from(now.subsec_millis())));
    token(stack, email, device)
}

/// The same claims as `token` signed without `iat`.
fn without_iat(stack: &Stack, token: &str) -> String {
    use base64::Engine as _;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let mut parts = token.split('.');
    let header: Value =
        serde_json::from_slice(&b64.decode(parts.next().unwrap()).unwrap()).unwrap();
    let mut claims: Value =
        serde_json::from_slice(&b64.decode(parts.next().unwrap()).unwrap()).unwrap();
    claims.as_object_mut().unwrap().remove("iat");
    let pem = std::fs::read(stack.keys.join(flowwarden::auth::dev::KEY_FILE)).unwrap();
    let key = jsonwebtoken::EncodingKey::from_ec_pem(&pem).unwrap();
    let mut h = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    h.kid = header["kid"].as_str().map(str::to_owned);
    jsonwebtoken::encode(&h, &claims, &key).unwrap()
}

/// Logs in with `token`: the session id, or the refusal's text.
fn login(stack: &Stack, token: &str, who: &str) -> Result<String, String> {
    let (ok, out) = stack.login(token, &stack.scratch.dir.join(who));
    if !ok {
        return Err(out);
    }
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    let v: Value = serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap();
    Ok(v["session"].as_str().unwrap().to_owned())
}

fn admitted(stack: &Stack, token: &str, who: &str) -> String {
    login(stack, token, who).unwrap_or_else(|e| panic!("{who} was not admitted: {e}"))
}

fn refused_with(stack: &Stack, token: &str, who: &str, code: &str) {
    match login(stack, token, who) {
        Ok(id) => panic!("{who} was admitted (session {id}); expected a refusal `{code}`"),
        Err(out) => assert!(out.contains(code), "{who}: expected `{code}`, got: {out}"),
    }
}

fn state(stack: &Stack, id: &str) -> String {
    stack.ctl_json(&["sessions", "show", id])["state"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// Audit events of one kind (`audit --json` writes one JSON object a line).
fn audit_reasons(stack: &Stack, kind: &str) -> Vec<Value> {
    let (ok, out) = stack.ctl(&["audit", "--kind", kind, "--limit", "1000", "--json"]);
    assert!(ok, "audit failed: {out}");
    out.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn rejected_for(stack: &Stack, reason: &str) -> usize {
    audit_reasons(stack, "admission_rejected")
        .iter()
        .filter(|e| e["reason"] == reason)
        .count()
}

#[test]
fn terminate_denies_the_token_a_new_token_gets_back_in_and_allow_relogin_does_not_deny() {
    if !require_root(
        "terminate_denies_the_token_a_new_token_gets_back_in_and_allow_relogin_does_not_deny",
    ) {
        return;
    }
    let stack = Stack::start("lk-deny", POLICY, "");
    let old = token(&stack, ALICE, None);
    let id = admitted(&stack, &old, "alice");
    let v = stack.ctl_json(&["sessions", "terminate", &id, "--reason", "test"]);
    assert_eq!(v["count"], 1, "{v}");
    assert_eq!(v["denied_tokens"], 1, "{v}");
    assert_eq!(state(&stack, &id), "terminated");

    refused_with(&stack, &old, "alice", "token_revoked");
    assert_eq!(
        rejected_for(&stack, "token_revoked"),
        1,
        "the refusal is audited"
    );
    assert_eq!(stack.ctl_json(&["status"])["locks"]["denied_tokens"], 1);

    let new = fresh(&stack, ALICE, None);
    let id2 = admitted(&stack, &new, "alice");
    assert_ne!(id, id2);

    // --allow-relogin: the old behaviour, the same token logs straight back in.
    let v = stack.ctl_json(&["sessions", "terminate", &id2, "--allow-relogin"]);
    assert_eq!(v["denied_tokens"], 0, "{v}");
    let id3 = admitted(&stack, &new, "alice");
    assert_eq!(state(&stack, &id2), "terminated");
    assert_ne!(id2, id3);
    // The first token stays refused all along.
    refused_with(&stack, &old, "alice", "token_revoked");
}

#[test]
fn terminate_user_severs_every_session_and_cuts_off_older_tokens_and_tokens_without_iat() {
    if !require_root(
        "terminate_user_severs_every_session_and_cuts_off_older_tokens_and_tokens_without_iat",
    ) {
        return;
    }
    let stack = Stack::start("lk-cutoff", POLICY, "");
    let first = token(&stack, ALICE, Some("laptop-1"));
    let second = token(&stack, ALICE, Some("laptop-2"));
    // Minted before the cut-off, never presented: refused for its age, not as denied.
    let unused = token(&stack, ALICE, Some("laptop-3"));
    let a = admitted(&stack, &first, "alice-1");
    let b = admitted(&stack, &second, "alice-2");
    let bob = admitted(&stack, &token(&stack, BOB, None), "bob");

    let v = stack.ctl_json(&[
        "sessions",
        "terminate",
        "--user",
        ALICE,
        "--reason",
        "compromised",
    ]);
    assert_eq!(v["count"], 2, "{v}");
    assert_eq!(v["cutoffs"], 1, "{v}");
    assert_eq!(state(&stack, &a), "terminated");
    assert_eq!(state(&stack, &b), "terminated");
    assert_eq!(state(&stack, &bob), "active", "bob is not alice");
    let shown = stack.ctl_json(&["sessions", "show", &a]);
    assert!(
        shown["ended"]["reason"]
            .as_str()
            .unwrap()
            .contains("cut-off"),
        "sessions show says a cut-off ended it: {shown}"
    );

    refused_with(&stack, &first, "alice-1", "token_revoked");
    refused_with(&stack, &unused, "alice-3", "issued_before_cutoff");
    let no_iat = without_iat(&stack, &fresh(&stack, ALICE, Some("laptop-4")));
    refused_with(&stack, &no_iat, "alice-4", "issued_before_cutoff");
    assert!(rejected_for(&stack, "issued_before_cutoff") >= 2);
    assert_eq!(stack.ctl_json(&["status"])["locks"]["cutoffs"], 1);

    admitted(&stack, &fresh(&stack, ALICE, Some("laptop-5")), "alice-5");
    admitted(&stack, &token(&stack, BOB, Some("b2")), "bob-2");
}

/// One lock target: how to add it, and alice's token and whether bob is untouched.
struct Case {
    flag: Vec<String>,
    device: Option<&'static str>,
}

#[test]
fn each_lock_target_severs_what_it_matches_keeps_it_out_and_spares_the_rest() {
    if !require_root("each_lock_target_severs_what_it_matches_keeps_it_out_and_spares_the_rest") {
        return;
    }
    let stack = Stack::start("lk-targets", POLICY, "");
    let issuer = flowwarden::auth::dev::DEV_ISSUER;
    let mut n = 0;
    let mut case = |make: &dyn Fn(&Stack, &str, &str) -> Case| {
        n += 1;
        let device = format!("dev-{n}");
        let alice_token = fresh(&stack, ALICE, Some(&device));
        let alice = admitted(&stack, &alice_token, &format!("alice-{n}"));
        let bob = admitted(
            &stack,
            &token(&stack, BOB, Some(&format!("bob-{n}"))),
            &format!("bob-{n}"),
        );
        let sha = stack.ctl_json(&["sessions", "show", &alice])["token_sha256"]
            .as_str()
            .unwrap()
            .to_owned();
        let c = make(&stack, &alice, &sha);
        let mut args: Vec<&str> = vec!["lock", "add"];
        args.extend(c.flag.iter().map(String::as_str));
        args.extend(["--reason", "test lock"]);
        let added = stack.ctl_json(&args);
        let what = c.flag.join(" ");
        assert_eq!(added["sessions_cut"], 1, "{what}: {added}");
        assert_eq!(
            added["terminated"][0]["id"],
            alice.as_str(),
            "{what}: {added}"
        );
        assert_eq!(state(&stack, &alice), "terminated", "{what}");
        assert_eq!(state(&stack, &bob), "active", "{what}: bob is spared");
        let ended = stack.ctl_json(&["sessions", "show", &alice]);
        let lock_id = added["lock"]["id"].as_str().unwrap().to_owned();
        assert!(
            ended["ended"]["reason"]
                .as_str()
                .unwrap()
                .contains(&lock_id),
            "{what}: sessions show names the lock: {ended}"
        );
        // A new token of the same identity is refused while the lock holds (a session lock
        // holds a session, which no new login reuses: its reconnect is refused instead).
        if c.flag[0] == "--token" {
            refused_with(&stack, &alice_token, &format!("alice-{n}t"), "locked");
        }
        if c.flag[0] != "--session" && c.flag[0] != "--token" {
            let again = fresh(&stack, ALICE, c.device.or(Some(&device)));
            refused_with(&stack, &again, &format!("alice-{n}b"), "locked");
        }
        let (ok, out) = stack.reconnect(&stack.scratch.dir.join(format!("alice-{n}")));
        assert!(!ok, "{what}: the locked session reconnected: {out}");
        admitted(
            &stack,
            &token(&stack, BOB, Some(&format!("bob-{n}b"))),
            &format!("bob-{n}b"),
        );
        let removed = stack.ctl_json(&["lock", "remove", &lock_id]);
        assert_eq!(removed["removed"]["id"], lock_id.as_str());
        // Bob's sessions do not matter past this case.
        stack.ctl_json(&["sessions", "terminate", "--user", BOB, "--allow-relogin"]);
    };
    case(&|_, _, _| Case {
        flag: vec!["--user".into(), "ALICE@corp.example".into()],
        device: None,
    });
    case(&|_, _, _| Case {
        flag: vec!["--subject".into(), issuer.into(), ALICE.into()],
        device: None,
    });
    case(&|_, _, _| Case {
        flag: vec!["--device".into(), "dev-3".into()],
        device: Some("dev-3"),
    });
    case(&|_, id, _| Case {
        flag: vec!["--session".into(), id.into()],
        device: None,
    });
    case(&|_, _, sha| Case {
        flag: vec!["--token".into(), sha.into()],
        device: None,
    });
    let events = audit_reasons(&stack, "lock_added");
    assert_eq!(events.len(), 5, "every lock is audited: {events:?}");
    assert_eq!(audit_reasons(&stack, "lock_removed").len(), 5);
    assert!(rejected_for(&stack, "locked") >= 3);
}

#[test]
fn a_device_lock_makes_a_live_ssh_exit_and_keeps_the_device_out() {
    if !require_root("a_device_lock_makes_a_live_ssh_exit_and_keeps_the_device_out") {
        return;
    }
    let stack = Stack::start("lk-ssh", POLICY, "");
    let server = stack.pair.server_addr.into();
    let sshd = Sshd::start(&stack.pair.server, stack.scratch.dir.join("ssh"), server);
    admitted(&stack, &token(&stack, ALICE, Some("laptop-17")), "alice");
    let mut ssh = SshSession::spawn(sshd.ssh(&stack.pair.client, server, TICKER));
    stack.wait_until(
        Duration::from_secs(10),
        "ticker lines arrive over ssh",
        || ssh.line_count() >= 10,
    );
    let added = stack.ctl_json(&[
        "lock",
        "add",
        "--device",
        "laptop-17",
        "--reason",
        "laptop reported stolen",
        "--show-reason",
    ]);
    assert_eq!(added["sessions_cut"], 1, "{added}");
    assert!(added["flows_cut"].as_u64().unwrap() >= 1, "{added}");
    let status = ssh.wait_exit(Duration::from_secs(10));
    assert!(status.is_some(), "ssh did not exit after the lock");
    // The client is told the lock and, as the lock says, its reason.
    let again = fresh(&stack, ALICE, Some("laptop-17"));
    match login(&stack, &again, "alice-2") {
        Ok(id) => panic!("admitted {id} under a device lock"),
        Err(out) => assert!(
            out.contains("locked") && out.contains("laptop reported stolen"),
            "{out}"
        ),
    }
    let out = sshd
        .ssh(&stack.pair.client, server, "true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "ssh worked under a device lock");
    // Another device of the same user is not this lock's business.
    admitted(&stack, &fresh(&stack, ALICE, Some("desktop-2")), "alice-3");
}

#[test]
fn a_group_and_a_source_lock_hold_and_a_ttl_lets_the_user_back_in_listed_as_expired() {
    if !require_root(
        "a_group_and_a_source_lock_hold_and_a_ttl_lets_the_user_back_in_listed_as_expired",
    ) {
        return;
    }
    let stack = Stack::start("lk-ttl", POLICY, "");
    let alice = admitted(&stack, &token(&stack, ALICE, None), "alice");
    let source = format!("{}/32", stack.pair.client_addr);
    let added = stack.ctl_json(&["lock", "add", "--source", &source, "--ttl", "3s"]);
    assert_eq!(added["sessions_cut"], 1, "{added}");
    assert_eq!(state(&stack, &alice), "terminated");
    let lock = added["lock"]["id"].as_str().unwrap().to_owned();
    refused_with(&stack, &fresh(&stack, BOB, None), "bob", "locked");
    // The TTL runs out: admitted again, the lock listed as expired and audited.
    stack.wait_until(Duration::from_secs(15), "the source lock expires", || {
        login(&stack, &token(&stack, BOB, Some("late")), "bob-late").is_ok()
    });
    stack.wait_until(Duration::from_secs(10), "the expiry is audited", || {
        !audit_reasons(&stack, "lock_expired").is_empty()
    });
    let shown = stack.ctl_json(&["lock", "show", &lock]);
    assert_eq!(shown["state"], "expired", "{shown}");
    assert!(shown["expired_at_ms"].is_u64(), "{shown}");
    let listed = stack.ctl_json(&["lock", "list"]);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "still listed: {listed}"
    );
    assert_eq!(
        stack.ctl_json(&["lock", "list", "--active"]),
        serde_json::json!([])
    );
    assert_eq!(stack.ctl_json(&["status"])["locks"]["expired_locks"], 1);

    // A group lock refuses everyone in the group; bob is in ops too.
    stack.ctl_json(&["lock", "add", "--group", "ops"]);
    refused_with(&stack, &fresh(&stack, ALICE, None), "alice-2", "locked");
    refused_with(&stack, &token(&stack, BOB, Some("g")), "bob-2", "locked");
}

#[test]
fn hostile_lock_requests_are_refused_with_a_clear_error_and_change_nothing() {
    if !require_root("hostile_lock_requests_are_refused_with_a_clear_error_and_change_nothing") {
        return;
    }
    let stack = Stack::start("lk-hostile", POLICY, "");
    let id = admitted(&stack, &token(&stack, ALICE, None), "alice");
    for (args, want) in [
        (vec!["--source", "10.0.0.5/8"], "did you mean 10.0.0.0/8"),
        (vec!["--source", "0.0.0.0/0"], "every address"),
        (vec!["--source", "10.0.0.300"], "not an address or prefix"),
        (vec!["--token", "abc"], "64 hex digits"),
        (vec!["--user", " "], "empty"),
        (vec!["--user", ALICE, "--ttl", "soon"], "not a duration"),
        (vec!["--user", ALICE, "--ttl", "0s"], "expire at once"),
        (
            vec!["--user", ALICE, "--group", "ops"],
            "cannot be used with",
        ),
        (vec!["--session", "zz"], "not a session id"),
    ] {
        let mut full = vec!["lock", "add"];
        full.extend(&args);
        let (ok, out) = stack.ctl(&full);
        assert!(!ok, "{args:?} was accepted: {out}");
        assert!(out.contains(want), "{args:?}: expected {want:?} in: {out}");
    }
    // Straight to the socket, past the CLI's checks.
    let mut rpc = flowwarden::api::client::RpcClient::connect(&stack.socket).unwrap();
    for (params, want) in [
        (
            serde_json::json!({"target": {"user": "a", "group": "b"}}),
            "invalid params",
        ),
        (
            serde_json::json!({"target": {"source": "::/0"}}),
            "every address",
        ),
        (
            serde_json::json!({"target": {"user": "a"}, "ttl_secs": 0}),
            "invalid TTL",
        ),
        (
            serde_json::json!({"target": {"user": "a"}, "show_reason": true}),
            "no reason",
        ),
        (
            serde_json::json!({"target": {"planet": "mars"}}),
            "unknown variant",
        ),
    ] {
        let e = rpc
            .call("lock.add", params.clone())
            .unwrap_err()
            .to_string();
        assert!(e.contains(want), "{params}: expected {want:?} in: {e}");
    }
    assert_eq!(stack.ctl_json(&["lock", "list"]), serde_json::json!([]));
    assert_eq!(state(&stack, &id), "active", "nothing was cut");
    let (ok, out) = stack.ctl(&["lock", "show", "lk-00000000000000ff"]);
    assert!(!ok && out.contains("no lock"), "{out}");
}

#[test]
fn locks_denials_and_cutoffs_survive_a_restart_and_a_kill_9() {
    if !require_root("locks_denials_and_cutoffs_survive_a_restart_and_a_kill_9") {
        return;
    }
    let mut stack = Stack::start("lk-restart", POLICY, "");
    let denied = token(&stack, ALICE, None);
    let id = admitted(&stack, &denied, "alice");
    stack.ctl_json(&["sessions", "terminate", &id]);
    let carol = "carol@corp.example";
    let carol_old = token(&stack, carol, None);
    admitted(&stack, &carol_old, "carol");
    stack.ctl_json(&["sessions", "terminate", "--user", carol]);
    let carol_unused_old = carol_old.clone();
    stack.ctl_json(&["lock", "add", "--device", "stolen-1"]);
    let check = |stack: &Stack, when: &str| {
        let counts = &stack.ctl_json(&["status"])["locks"];
        assert_eq!(counts["locks"], 1, "{when}: {counts}");
        assert!(
            counts["denied_tokens"].as_u64().unwrap() >= 2,
            "{when}: {counts}"
        );
        assert_eq!(counts["cutoffs"], 1, "{when}: {counts}");
        refused_with(stack, &denied, "alice", "token_revoked");
        refused_with(stack, &carol_unused_old, "carol", "token_revoked");
        refused_with(stack, &fresh(stack, BOB, Some("stolen-1")), "bob", "locked");
    };
    check(&stack, "before");
    assert!(stack.agent_mut().stop(), "the agent stops cleanly");
    stack.start_agent();
    check(&stack, "after a restart");
    stack.agent_mut().kill9();
    stack.start_agent();
    check(&stack, "after kill -9");
    admitted(&stack, &fresh(&stack, carol, None), "carol-new");
}
