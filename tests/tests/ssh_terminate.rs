//! Termination with real OpenSSH: `sessions terminate` makes a live `ssh` exit at once, ends
//! the server-side session, lets no line printed after the call returned reach the client,
//! and proves itself with the drops counted after termination.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use flowwarden_tests::{
    privileged::require_root,
    ssh::{SshSession, Sshd, realtime_ns},
    stack::{Stack, TokenSpec},
    tcp::{accept, carries, connect, listen},
};
use serde_json::Value;

const POLICY: &str = r#"
[[resource]]
name = "ssh"
protocol = "tcp"
ports = [22]

[[resource]]
name = "metrics"
protocol = "udp"
ports = [9999]

[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]

[[rule]]
name = "ops"
groups = ["ops"]
resources = ["ssh", "metrics", "echo"]
"#;

/// Prints the server's CLOCK_REALTIME every 10 ms, until its output goes nowhere.
const TICKER: &str = "while date +%s%N; do sleep 0.01; done";

fn stdout_json(out: &str) -> Value {
    let start = out.find('{').unwrap_or_else(|| panic!("no JSON in: {out}"));
    serde_json::Deserializer::from_str(&out[start..])
        .into_iter::<Value>()
        .next()
        .unwrap()
        .unwrap()
}

#[test]
fn terminate_severs_a_live_ssh_at_once_and_proves_it() {
    if !require_root("terminate_severs_a_live_ssh_at_once_and_proves_it") {
        return;
    }
    let stack = Stack::start("ssh", POLICY, "");
    let server = stack.pair.server_addr.into();
    let sshd = Sshd::start(&stack.pair.server, stack.scratch.dir.join("ssh"), server);

    // Before login: ssh cannot even connect.
    let out = sshd
        .ssh(&stack.pair.client, server, "true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "ssh worked without a session");

    let alice = stack.scratch.dir.join("alice");
    let token = stack.token(&TokenSpec::user("alice@corp.example", &["ops"]));
    let (ok, out) = stack.login(&token, &alice);
    assert!(ok, "{out}");
    let id = stdout_json(&out)["session"].as_str().unwrap().to_owned();

    let mut ssh = SshSession::spawn(sshd.ssh(&stack.pair.client, server, TICKER));
    stack.wait_until(
        Duration::from_secs(10),
        "ticker lines arrive over ssh",
        || ssh.line_count() >= 30,
    );
    // A second flow of the same session that keeps sending after termination: its drops are
    // the proof the kernel counts.
    let stop = Arc::new(AtomicBool::new(false));
    let udp_target: SocketAddr = (stack.pair.server_addr, 9999).into();
    let sender = {
        let stop = Arc::clone(&stop);
        let sock = stack
            .pair
            .client
            .run(|| UdpSocket::bind("0.0.0.0:0"))
            .unwrap();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let _ = sock.send_to(b"metric 1", udp_target);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    // The operator's view: who, from where, to what.
    let list = stack.ctl_json(&["sessions", "list", "--live"]);
    let s = &list.as_array().unwrap()[0];
    assert_eq!(s["id"], id.as_str());
    assert_eq!(s["user"], "alice@corp.example");
    assert_eq!(s["source"], stack.pair.client_addr.to_string());
    assert!(
        s["grants"]
            .as_array()
            .unwrap()
            .iter()
            .any(|g| g["resource"] == "ssh")
    );
    let flows = stack.ctl_json(&["flows", "list", "--session", &id]);
    let ssh_flow = flows
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["resource"] == "ssh")
        .expect("the ssh flow is listed")
        .clone();
    let who = stack.ctl_json(&[
        "whois",
        ssh_flow["source"].as_str().unwrap(),
        ssh_flow["destination"].as_str().unwrap(),
    ]);
    assert_eq!(who["session"]["user"], "alice@corp.example");
    assert_eq!(who["session"]["groups"][0], "ops");
    let mut server_side = pids_of("while date +%s%N");
    server_side.extend(pids_of("sshd: root@notty"));
    assert!(
        server_side.len() >= 2,
        "the server-side session and its ticker run: {server_side:?}"
    );

    // Terminate, and time when the call returned.
    let (ok, out) = stack.ctl(&["sessions", "terminate", &id, "--reason", "test"]);
    let returned_ns = realtime_ns();
    assert!(ok, "terminate failed: {out}");

    let status = ssh.wait_exit(Duration::from_secs(5));
    let stderr = ssh.stderr.lock().unwrap().clone();
    assert!(
        status.is_some_and(|s| !s.success()),
        "ssh did not exit at once (status {status:?}); stderr: {stderr}"
    );
    assert!(
        ["reset", "closed", "Broken pipe", "abort"]
            .iter()
            .any(|w| stderr.contains(w)),
        "ssh should report the connection closed or reset: {stderr:?}"
    );
    // No line printed (server clock) after the call returned reached the client.
    let late: Vec<String> = ssh
        .lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| l.trim().parse::<u128>().is_ok_and(|t| t > returned_ns))
        .map(|(l, _)| l.clone())
        .collect();
    assert!(
        late.is_empty(),
        "lines printed after terminate returned arrived: {late:?}"
    );
    stack.wait_until(
        Duration::from_secs(5),
        "the server-side session ends",
        || {
            server_side
                .iter()
                .all(|p| !std::path::Path::new(&format!("/proc/{p}")).exists())
        },
    );

    // Proof: the kernel dropped the session's packets after termination.
    std::thread::sleep(Duration::from_millis(300));
    let shown = stack.ctl_json(&["sessions", "show", &id]);
    assert_eq!(shown["state"], "terminated");
    assert!(
        shown["dropped_after_termination"]["packets"]
            .as_u64()
            .unwrap()
            > 0,
        "no drop after termination was counted: {shown}"
    );
    let (ok, human) = stack.ctl(&["sessions", "show", &id]);
    assert!(
        ok && human.contains("dropped after termination:"),
        "{human}"
    );
    stop.store(true, Ordering::Relaxed);
    sender.join().unwrap();

    // A new ssh fails until a fresh login; after it, ssh works again.
    let out = sshd
        .ssh(&stack.pair.client, server, "true")
        .output()
        .unwrap();
    assert!(
        !out.status.success(),
        "ssh worked after termination without a new login"
    );
    let (ok, out) = stack.login(
        &stack.token(&TokenSpec::user("alice@corp.example", &["ops"])),
        &alice,
    );
    assert!(ok, "{out}");
    let out = sshd
        .ssh(&stack.pair.client, server, "echo back")
        .output()
        .unwrap();
    assert!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains("back"),
        "ssh after a fresh login: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn terminating_a_user_ends_all_their_sessions_and_flows() {
    if !require_root("terminating_a_user_ends_all_their_sessions_and_flows") {
        return;
    }
    let stack = Stack::start("usr", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);
    let mut conns = Vec::new();
    let mut ids = Vec::new();
    // Two sessions of bob (from the same host, one after the other), two connections each.
    for n in 0..2 {
        let cache = stack.scratch.dir.join(format!("bob{n}"));
        let (ok, out) = stack.login(
            &stack.token(&TokenSpec::user("bob@corp.example", &["ops"])),
            &cache,
        );
        assert!(ok, "{out}");
        ids.push(stdout_json(&out)["session"].as_str().unwrap().to_owned());
        for _ in 0..2 {
            let c = connect(&stack.pair.client, echo, Duration::from_secs(5)).unwrap();
            let s = accept(&listener, Duration::from_secs(5)).unwrap();
            conns.push((c, s));
        }
    }
    // Someone else's session must survive.
    let carol = stack.scratch.dir.join("carol");
    let (ok, out) = stack.login(
        &stack.token(&TokenSpec::user("carol@corp.example", &["ops"])),
        &carol,
    );
    assert!(ok, "{out}");
    let carol_id = stdout_json(&out)["session"].as_str().unwrap().to_owned();

    let v = stack.ctl_json(&["sessions", "terminate", "--user", "bob@corp.example"]);
    assert_eq!(v["count"], 2, "{v}");
    for id in &ids {
        assert_eq!(
            stack.ctl_json(&["sessions", "show", id])["state"],
            "terminated"
        );
    }
    assert_eq!(
        stack.ctl_json(&["sessions", "show", &carol_id])["state"],
        "active"
    );
    // Each of bob's four connections is torn down on the client side too (RST from the
    // destroyed server sockets), not left hanging.
    for (c, _) in &mut conns {
        use std::io::Read as _;
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 16];
        let r = c.read(&mut buf);
        assert!(
            matches!(&r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a connection of a terminated session was not torn down: {r:?}"
        );
    }
}

/// The flows `flows list` shows, as comparable (client, resource address) pairs.
fn flow_pairs(v: &Value) -> Vec<String> {
    let mut pairs: Vec<String> = v
        .as_array()
        .unwrap_or_else(|| panic!("flows list: expected an array, saw {v}"))
        .iter()
        .map(|f| format!("{} {} {}", f["session"], f["source"], f["destination"]))
        .collect();
    pairs.sort();
    pairs
}

#[test]
fn terminate_after_a_restart_destroys_the_sockets_opened_before_it() {
    if !require_root("terminate_after_a_restart_destroys_the_sockets_opened_before_it") {
        return;
    }
    let mut stack = Stack::start("rst", POLICY, "");
    let echo: SocketAddr = (stack.pair.server_addr, 7000).into();
    let listener = listen(&stack.pair.server, echo);
    let login = |who: &str| {
        let cache = stack.scratch.dir.join(who);
        let email = format!("{who}@corp.example");
        let (ok, out) = stack.login(&stack.token(&TokenSpec::user(&email, &["ops"])), &cache);
        assert!(ok, "{out}");
        stdout_json(&out)["session"].as_str().unwrap().to_owned()
    };
    let open = |n: usize| {
        (0..n)
            .map(|_| {
                let c = connect(&stack.pair.client, echo, Duration::from_secs(5)).unwrap();
                let s = accept(&listener, Duration::from_secs(5)).unwrap();
                (c, s)
            })
            .collect::<Vec<_>>()
    };
    // Both from the client's one address: the newest session holds the grant, so bob's
    // flows are opened before carol logs in, and carol's after.
    let bob = login("bob");
    let mut bobs = open(3);
    let _carol = login("carol");
    let mut carols = open(1);
    let flows_before = stack.ctl_json(&["flows", "list", "--session", &bob]);

    // A crash: the flows stay in the pinned kernel table, and the new agent knows them only
    // from its walk at start (it saw none of their flow-opened events).
    stack.agent_mut().kill9();
    stack.start_agent();
    stack.wait_until(
        Duration::from_secs(10),
        "the restarted agent's flow index to be reconciled",
        || {
            stack
                .agent()
                .log_contains("flow index reconciled with the kernel")
        },
    );

    let listed = stack.ctl_json(&["flows", "list", "--session", &bob]);
    let all = stack.ctl_json(&["flows", "list"]);
    let walked: Vec<Value> = all
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["session"] == bob.as_str())
        .cloned()
        .collect();
    assert_eq!(
        flow_pairs(&listed),
        flow_pairs(&Value::Array(walked)),
        "flows list --session (flow index) against the full walk"
    );
    assert_eq!(flow_pairs(&listed).len(), 3, "bob's three flows: {listed}");
    assert_eq!(
        flow_pairs(&listed),
        flow_pairs(&flows_before),
        "the same flows as before the restart"
    );

    let v = stack.ctl_json(&["sessions", "terminate", &bob]);
    assert_eq!(v["count"], 1, "{v}");
    // Every socket of bob's flows is destroyed: the client sees a reset (or EOF) at once.
    for (c, _) in &mut bobs {
        use std::io::Read as _;
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let r = c.read(&mut [0u8; 16]);
        assert!(
            matches!(&r, Ok(0))
                || r.as_ref()
                    .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
            "a connection opened before the restart outlived its session's termination: {r:?}"
        );
    }
    // Carol's connection, opened under the same grant after bob's, is not touched.
    let (c, s) = &mut carols[0];
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    assert!(
        carries(c, s, b"still here"),
        "the other session's connection was torn down too"
    );
}

/// Pids whose command line contains `needle`.
fn pids_of(needle: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| {
                    String::from_utf8_lossy(&c)
                        .replace('\0', " ")
                        .contains(needle)
                })
                .unwrap_or(false)
        })
        .filter(|pid| *pid != std::process::id())
        .collect()
}
