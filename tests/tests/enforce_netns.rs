//! The agent enforcing real TCP between two network namespaces: a granted connection carries
//! data both ways, a revocation stops the very next write, unprotected ports are never touched,
//! and `datapath detach` leaves nothing of ours behind.

use std::{net::SocketAddr, time::Duration};

use flowwarden::{
    datapath::{DropReason, Maps},
    policy::parse_resources,
};
use flowwarden_tests::{
    agent_proc::{AgentProcess, AgentSetup, Scratch, run_cli, write_config},
    attachments::attached_programs,
    loaded::private_pin_dir,
    netns::NetnsPair,
    privileged::require_root,
    tcp::{accept, carries, connect, listen, read_timeout},
};

const POLICY: &str = r#"
[[resource]]
name = "echo"
protocol = "tcp"
ports = [7000]
"#;
const PROTECTED: u16 = 7000;
const UNPROTECTED: u16 = 7001;
const SESSION: u64 = 0xa11c_e000_0000_0001;
const SHORT: Duration = Duration::from_millis(700);
const LONG: Duration = Duration::from_secs(5);

#[test]
fn revocation_severs_a_live_connection_and_detach_removes_everything() {
    if !require_root("revocation_severs_a_live_connection_and_detach_removes_everything") {
        return;
    }
    let pair = NetnsPair::new("enf").expect("namespace pair");
    let pin_dir = private_pin_dir("enf");
    let scratch = Scratch::new("enf");
    let config = write_config(
        &scratch,
        &AgentSetup {
            interface: &pair.server_if,
            pin_dir: &pin_dir,
            policy: POLICY,
            datapath_extra: "",
        },
    );
    let mut agent = AgentProcess::start(&pair.server, &config);
    let mut maps = Maps::open_pinned(&pin_dir).expect("opening the agent's pinned maps");
    let echo = parse_resources([(std::path::Path::new("p"), POLICY)]).unwrap();
    let echo_id = echo.by_name("echo").unwrap().id;

    let protected: SocketAddr = (pair.server_addr, PROTECTED).into();
    let unprotected: SocketAddr = (pair.server_addr, UNPROTECTED).into();
    let protected_listener = listen(&pair.server, protected);
    let unprotected_listener = listen(&pair.server, unprotected);

    // Unprotected port: untouched, before any grant.
    let mut c = connect(&pair.client, unprotected, LONG).expect("unprotected port connects");
    let mut s = accept(&unprotected_listener, LONG).unwrap();
    assert!(
        carries(&mut c, &mut s, b"plain"),
        "unprotected traffic must pass"
    );
    assert!(carries(&mut s, &mut c, b"plain back"));

    // Protected port without a grant: the SYN is dropped.
    let before = maps.counters().unwrap();
    let refused = connect(&pair.client, protected, SHORT);
    assert!(
        refused.is_err(),
        "a connection without a grant must not be established"
    );
    assert!(
        maps.counters().unwrap().dropped(DropReason::NoGrant) > before.dropped(DropReason::NoGrant),
        "the dropped SYN must be counted as no_grant"
    );
    assert!(accept(&protected_listener, Duration::from_millis(100)).is_err());

    // With a grant: the connection is admitted and carries data both ways.
    maps.grant(pair.client_addr.into(), echo_id, SESSION)
        .unwrap();
    let mut client = connect(&pair.client, protected, LONG).expect("granted connection");
    let mut server = accept(&protected_listener, LONG).unwrap();
    assert!(carries(&mut client, &mut server, b"hello server"));
    assert!(carries(&mut server, &mut client, b"hello client"));
    let flows = maps.flows();
    assert_eq!(flows.len(), 1, "one flow for the one connection: {flows:?}");
    let (_, flow) = flows[0];
    assert_eq!(flow.session_id, SESSION);
    assert!(
        flow.rx_packets >= 3 && flow.tx_packets >= 2,
        "counted both ways: {flow:?}"
    );

    // Revocation: one map write; the very next write does not arrive, either way.
    maps.revoke(SESSION).unwrap();
    read_timeout(&server, SHORT);
    read_timeout(&client, SHORT);
    assert!(
        !carries(&mut client, &mut server, b"after revoke"),
        "client data passed a revocation"
    );
    assert!(
        !carries(&mut server, &mut client, b"reply after revoke"),
        "server data passed a revocation"
    );
    let counters = maps.counters().unwrap();
    assert!(counters.dropped(DropReason::Revoked) >= 2, "{counters:?}");
    let stats = maps.session_stats(SESSION).unwrap();
    assert!(stats.dropped_after_revoke_packets >= 2, "{stats:?}");
    // A new connection of the revoked session is refused too.
    assert!(connect(&pair.client, protected, SHORT).is_err());
    assert!(
        agent.log_contains("first packet dropped after revocation"),
        "{}",
        agent.log()
    );
    // …and the audit log has it, for the operator.
    let (ok, out) = run_cli(
        None,
        &[
            "--socket",
            scratch.dir.join("agent.sock").to_str().unwrap(),
            "audit",
            "--kind",
            "first_drop_after_termination",
            "--json",
        ],
    );
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("{SESSION:016x}")),
        "the first drop names the session: {out}"
    );

    // The unprotected connection never noticed; no flow was ever made for it.
    assert!(carries(&mut c, &mut s, b"still plain"));
    assert!(maps.flows().iter().all(|(k, _)| k.dport == PROTECTED));

    // Attached exactly once each: the default (`ingress = "auto"`) picks TC ingress on veth,
    // whose native XDP path costs throughput, and TCX egress.
    let attached = attached_programs(&pair.server, &pair.server_if);
    assert_eq!(
        attached
            .iter()
            .filter(|p| p.contains("fw_tc_ingress"))
            .count(),
        1,
        "{attached:?}"
    );
    assert!(
        !attached.iter().any(|p| p.contains("fw_xdp_ingress")),
        "auto attached XDP on veth: {attached:?}"
    );
    assert_eq!(
        attached
            .iter()
            .filter(|p| p.contains("fw_tc_egress"))
            .count(),
        1,
        "{attached:?}"
    );

    // A graceful stop keeps enforcement; detach removes it and every pin.
    assert!(
        agent.stop(),
        "agent exits cleanly on SIGTERM:\n{}",
        agent.log()
    );
    assert!(agent.log_contains("enforcement stays in place"));
    assert!(
        !carries(&mut client, &mut server, b"after stop"),
        "stopping the agent opened a door"
    );
    drop(maps);
    let (ok, out) = run_cli(
        None,
        &["datapath", "detach", "--pin-dir", pin_dir.to_str().unwrap()],
    );
    assert!(ok, "detach failed: {out}");
    assert!(out.contains("datapath detached"), "{out}");
    assert!(
        !pin_dir.exists(),
        "{} still exists after detach",
        pin_dir.display()
    );
    let attached = attached_programs(&pair.server, &pair.server_if);
    assert!(
        attached.is_empty(),
        "still attached after detach: {attached:?}"
    );
    // And with nothing attached, the protected port is reachable again (nothing enforces).
    let mut c2 = connect(&pair.client, protected, LONG).expect("reachable after detach");
    let mut s2 = accept(&protected_listener, LONG).unwrap();
    assert!(carries(&mut c2, &mut s2, b"unguarded"));
    // Detaching twice is harmless and says so.
    let (ok, out) = run_cli(
        None,
        &["datapath", "detach", "--pin-dir", pin_dir.to_str().unwrap()],
    );
    assert!(ok && out.contains("nothing to detach"), "{out}");
}
