//! Verdict tests: the real programs in the real kernel, run with BPF_PROG_TEST_RUN on synthetic
//! frames; each case checks the verdict and the exact counter changes.

use std::net::IpAddr;

use agent_common::program_names::{TC_EGRESS, TC_INGRESS, XDP_INGRESS};
use flowwarden::{
    config::Mode,
    datapath::{Counters, Datapath, DropReason, EventKind, FlowKey, LoadOptions, addr_bytes},
    policy::parse_resources,
};
use flowwarden_tests::{
    frames::{Frame, TCP_ACK, TCP_PSH, TCP_RST, TCP_SYN, non_ip_frame, truncate},
    loaded::LoadedDatapath,
    privileged::require_root,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const SESSION: u64 = 0x5e55_1000_0000_0001;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

const CLIENT: &str = "192.0.2.10";
const SERVER: &str = "10.9.0.2";
const CLIENT6: &str = "2001:db8::10";
const SERVER6: &str = "fd09::2";

/// Expected change of the global counters across one run.
#[derive(Default, Debug, PartialEq, Eq)]
struct Delta {
    dropped: Vec<(DropReason, u64)>,
    would_drop: Vec<(DropReason, u64)>,
    flows_opened: u64,
    rst_passed: u64,
}

fn delta(before: &Counters, after: &Counters) -> Delta {
    let diff = |f: &dyn Fn(&Counters, DropReason) -> u64| {
        DropReason::ALL
            .into_iter()
            .map(|r| (r, f(after, r) - f(before, r)))
            .filter(|&(_, n)| n != 0)
            .collect::<Vec<_>>()
    };
    Delta {
        dropped: diff(&|c, r| c.dropped(r)),
        would_drop: diff(&|c, r| c.would_drop(r)),
        flows_opened: after.flows_opened - before.flows_opened,
        rst_passed: after.rst_passed_after_revoke - before.rst_passed_after_revoke,
    }
}

/// Runs `program` once on `frame` and checks the verdict and the counter changes.
fn check(
    dp: &mut LoadedDatapath,
    what: &str,
    program: &'static str,
    frame: &[u8],
    verdict: u32,
    expected: Delta,
) {
    let before = dp.counters();
    let out = dp
        .datapath
        .test_run(program, frame, 1)
        .unwrap_or_else(|e| panic!("{what}: test run failed: {e}"));
    let after = dp.counters();
    assert_eq!(
        out.return_value, verdict,
        "{what}: expected verdict {verdict}, got {}",
        out.return_value
    );
    assert_eq!(delta(&before, &after), expected, "{what}: counter changes");
}

fn drops(reason: DropReason) -> Delta {
    Delta {
        dropped: vec![(reason, 1)],
        ..Delta::default()
    }
}

fn opened() -> Delta {
    Delta {
        flows_opened: 1,
        ..Delta::default()
    }
}

fn flow_key(src: &str, sport: u16, dst: &str, dport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: addr_bytes(ip(src)),
        dst: addr_bytes(ip(dst)),
        sport,
        dport,
        proto,
        _pad: [0; 3],
    }
}

#[test]
fn traffic_that_is_not_to_a_resource_is_never_touched() {
    if !require_root("traffic_that_is_not_to_a_resource_is_never_touched") {
        return;
    }
    let mut dp = LoadedDatapath::new("untouched");
    let none = Delta::default;
    check(
        &mut dp,
        "ARP",
        XDP_INGRESS,
        &non_ip_frame(),
        XDP_PASS,
        none(),
    );
    let http = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 80).build();
    check(&mut dp, "tcp/80 v4", XDP_INGRESS, &http, XDP_PASS, none());
    let http6 = Frame::tcp(ip(CLIENT6), 40000, ip(SERVER6), 80).build();
    check(&mut dp, "tcp/80 v6", XDP_INGRESS, &http6, XDP_PASS, none());
    // udp/22 is not ssh (tcp/22).
    let udp22 = Frame::udp(ip(CLIENT), 40000, ip(SERVER), 22).build();
    check(&mut dp, "udp/22", XDP_INGRESS, &udp22, XDP_PASS, none());
    // admin is tcp/8443 only towards 10.9.0.0/16 and fd09::/16.
    let elsewhere = Frame::tcp(ip(CLIENT), 40000, ip("10.8.0.2"), 8443).build();
    check(
        &mut dp,
        "tcp/8443 outside admin's prefix",
        XDP_INGRESS,
        &elsewhere,
        XDP_PASS,
        none(),
    );
    // An IPv4 fragment after the first carries no ports; without its first it is useless.
    let later = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .fragment(10, false)
        .build();
    check(
        &mut dp,
        "later fragment",
        XDP_INGRESS,
        &later,
        XDP_PASS,
        none(),
    );
    check(
        &mut dp,
        "tc ingress tcp/80",
        TC_INGRESS,
        &http,
        TC_ACT_OK,
        none(),
    );
    check(
        &mut dp,
        "tc egress from tcp/80",
        TC_EGRESS,
        &http,
        TC_ACT_OK,
        none(),
    );
    assert!(
        dp.datapath.maps.flows().is_empty(),
        "no flow may be created"
    );
}

/// A restarted agent whose policy lost resources: its first install finds the previous
/// agent's port slots in the pinned table (one batched read of all 131,072 slots) and clears
/// those it no longer wants, so a port that is no longer protected is no longer dropped, and
/// one that still is stays dropped throughout.
#[test]
fn a_new_agent_clears_the_resources_the_previous_one_left() {
    if !require_root("a_new_agent_clears_the_resources_the_previous_one_left") {
        return;
    }
    let mut dp = LoadedDatapath::new("stale");
    let dns = Frame::udp(ip(CLIENT), 40000, ip(SERVER), 53).build();
    let ssh = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .flags(TCP_SYN)
        .build();
    let admin = Frame::tcp(ip(CLIENT), 1, ip("10.9.200.1"), 8443).build();
    let no_grant = || drops(DropReason::NoGrant);
    check(
        &mut dp,
        "dns before",
        XDP_INGRESS,
        &dns,
        XDP_DROP,
        no_grant(),
    );
    check(
        &mut dp,
        "admin before",
        XDP_INGRESS,
        &admin,
        XDP_DROP,
        no_grant(),
    );

    let ssh_only = parse_resources([(
        std::path::Path::new("ssh-only.toml"),
        "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n",
    )])
    .expect("the smaller policy parses");
    let mut restarted = Datapath::load(&LoadOptions {
        pin_dir: dp.pin_dir().to_path_buf(),
        flow_table_size: 1024,
        ..LoadOptions::default()
    })
    .expect("adopting the pinned datapath");
    restarted
        .maps
        .install_resources(&ssh_only)
        .expect("installing the smaller resource table");

    let none = Delta::default;
    check(&mut dp, "dns after", XDP_INGRESS, &dns, XDP_PASS, none());
    check(
        &mut dp,
        "admin after",
        XDP_INGRESS,
        &admin,
        XDP_PASS,
        none(),
    );
    check(
        &mut dp,
        "ssh after",
        XDP_INGRESS,
        &ssh,
        XDP_DROP,
        no_grant(),
    );
}

#[test]
fn protected_traffic_without_a_grant_is_dropped() {
    if !require_root("protected_traffic_without_a_grant_is_dropped") {
        return;
    }
    let mut dp = LoadedDatapath::new("nogrant");
    let no_grant = || drops(DropReason::NoGrant);
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "tcp/22 v4",
            Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
                .flags(TCP_SYN)
                .build(),
        ),
        (
            "tcp/22 v6",
            Frame::tcp(ip(CLIENT6), 40000, ip(SERVER6), 22)
                .flags(TCP_SYN)
                .build(),
        ),
        (
            "udp/53 v4",
            Frame::udp(ip(CLIENT), 40000, ip(SERVER), 53).build(),
        ),
        (
            "udp/53 v6",
            Frame::udp(ip(CLIENT6), 40000, ip(SERVER6), 53).build(),
        ),
        (
            "tcp/8443 inside admin's prefix",
            Frame::tcp(ip(CLIENT), 1, ip("10.9.200.1"), 8443).build(),
        ),
        (
            "tcp/8443 v6 inside admin's prefix",
            Frame::tcp(ip(CLIENT6), 1, ip(SERVER6), 8443).build(),
        ),
        (
            "VLAN tagged",
            Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
                .vlan(7)
                .build(),
        ),
        (
            "QinQ tagged",
            Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
                .vlan(7)
                .vlan(8)
                .build(),
        ),
        (
            "IPv6 with extension headers",
            Frame::tcp(ip(CLIENT6), 1, ip(SERVER6), 22)
                .ipv6_ext_headers(3)
                .build(),
        ),
        (
            "IPv4 first fragment",
            Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
                .fragment(0, true)
                .build(),
        ),
        (
            "IPv6 first fragment",
            Frame::tcp(ip(CLIENT6), 40000, ip(SERVER6), 22)
                .fragment(0, true)
                .build(),
        ),
    ];
    for (what, frame) in &cases {
        check(&mut dp, what, XDP_INGRESS, frame, XDP_DROP, no_grant());
    }
    let ssh = &cases[0].1;
    check(
        &mut dp,
        "tc ingress tcp/22",
        TC_INGRESS,
        ssh,
        TC_ACT_SHOT,
        no_grant(),
    );
    assert!(
        dp.datapath.maps.flows().is_empty(),
        "a denied packet must not create a flow"
    );
    // A grant for another source, or for another resource, does not help.
    let ssh_id = dp.resource_id("ssh");
    let dns_id = dp.resource_id("dns");
    dp.datapath
        .maps
        .grant(ip("192.0.2.99"), ssh_id, SESSION)
        .unwrap();
    dp.datapath.maps.grant(ip(CLIENT), dns_id, SESSION).unwrap();
    check(
        &mut dp,
        "grant of another source/resource",
        XDP_INGRESS,
        ssh,
        XDP_DROP,
        no_grant(),
    );
}

#[test]
fn malformed_packets_are_dropped_and_counted() {
    if !require_root("malformed_packets_are_dropped_and_counted") {
        return;
    }
    let mut dp = LoadedDatapath::new("malformed");
    let full = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22).build();
    let malformed = || drops(DropReason::Malformed);
    check(
        &mut dp,
        "truncated IPv4 header",
        XDP_INGRESS,
        &truncate(full.clone(), 14 + 10),
        XDP_DROP,
        malformed(),
    );
    check(
        &mut dp,
        "truncated TCP header",
        XDP_INGRESS,
        &truncate(full.clone(), 14 + 20 + 8),
        XDP_DROP,
        malformed(),
    );
    let v6 = Frame::tcp(ip(CLIENT6), 1, ip(SERVER6), 22).build();
    check(
        &mut dp,
        "truncated IPv6 header",
        XDP_INGRESS,
        &truncate(v6, 14 + 30),
        XDP_DROP,
        malformed(),
    );
    let mut bad_ihl = full.clone();
    bad_ihl[14] = 0x43;
    check(
        &mut dp,
        "IPv4 IHL 3",
        XDP_INGRESS,
        &bad_ihl,
        XDP_DROP,
        malformed(),
    );
    let deep = Frame::tcp(ip(CLIENT6), 1, ip(SERVER6), 22)
        .ipv6_ext_headers(7)
        .build();
    check(
        &mut dp,
        "more IPv6 extension headers than we walk",
        XDP_INGRESS,
        &deep,
        XDP_DROP,
        malformed(),
    );
    // Nested VLAN devices would deliver this; the parser walks two tags: fail closed.
    let triple = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .vlan(1)
        .vlan(2)
        .vlan(3)
        .build();
    check(
        &mut dp,
        "three VLAN tags",
        XDP_INGRESS,
        &triple,
        XDP_DROP,
        malformed(),
    );
    // An Ethernet header that announces IPv4 and carries nothing: fail closed.
    check(
        &mut dp,
        "IPv4 ethertype, no IP header",
        XDP_INGRESS,
        &truncate(full, 14),
        XDP_DROP,
        malformed(),
    );
}

#[test]
fn a_grant_opens_a_flow_that_then_passes_and_counts() {
    if !require_root("a_grant_opens_a_flow_that_then_passes_and_counts") {
        return;
    }
    let mut dp = LoadedDatapath::new("grant");
    let ssh_id = dp.resource_id("ssh");
    let dns_id = dp.resource_id("dns");
    dp.datapath.maps.grant(ip(CLIENT), ssh_id, SESSION).unwrap();
    dp.datapath
        .maps
        .grant(ip(CLIENT6), dns_id, SESSION + 1)
        .unwrap();

    let syn = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .flags(TCP_SYN)
        .build();
    check(
        &mut dp,
        "first packet through the grant",
        XDP_INGRESS,
        &syn,
        XDP_PASS,
        opened(),
    );
    let data = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .flags(TCP_ACK | TCP_PSH)
        .payload(&[0u8; 100])
        .build();
    check(
        &mut dp,
        "established flow",
        XDP_INGRESS,
        &data,
        XDP_PASS,
        Delta::default(),
    );
    let key = flow_key(CLIENT, 40000, SERVER, 22, 6);
    let flow = dp.datapath.maps.flow(&key).expect("flow created");
    assert_eq!(flow.session_id, SESSION);
    assert_eq!(flow.resource_id, ssh_id);
    assert_eq!(flow.rx_packets, 2);
    assert_eq!(flow.rx_bytes, (syn.len() + data.len()) as u64);
    assert!(flow.last_seen_ns >= flow.created_ns && flow.created_ns > 0);

    let reply = Frame::tcp(ip(SERVER), 22, ip(CLIENT), 40000)
        .payload(&[1u8; 40])
        .build();
    check(
        &mut dp,
        "reply of a live flow",
        TC_EGRESS,
        &reply,
        TC_ACT_OK,
        Delta::default(),
    );
    let flow = dp.datapath.maps.flow(&key).unwrap();
    assert_eq!((flow.tx_packets, flow.tx_bytes), (1, reply.len() as u64));

    // Another connection from the same source is a second flow of the same session.
    let other = Frame::tcp(ip(CLIENT), 40001, ip(SERVER), 22)
        .flags(TCP_SYN)
        .build();
    check(
        &mut dp,
        "second flow, same grant",
        TC_INGRESS,
        &other,
        TC_ACT_OK,
        opened(),
    );

    let dns = Frame::udp(ip(CLIENT6), 5353, ip(SERVER6), 53)
        .payload(b"q")
        .build();
    check(
        &mut dp,
        "udp v6 through a grant",
        XDP_INGRESS,
        &dns,
        XDP_PASS,
        opened(),
    );
    assert_eq!(dp.datapath.maps.flows().len(), 3);
    assert_eq!(
        dp.datapath
            .maps
            .session_stats(SESSION)
            .unwrap()
            .flows_opened,
        2
    );

    let events: Vec<_> = std::iter::from_fn(|| dp.datapath.events.try_next()).collect();
    let opened_events: Vec<_> = events
        .iter()
        .filter(|e| e.kind == EventKind::FlowOpened)
        .collect();
    assert_eq!(
        opened_events.len(),
        3,
        "one flow-opened event per flow: {events:?}"
    );
    assert_eq!(opened_events[0].session_id, SESSION);
    assert_eq!(opened_events[0].source, "192.0.2.10:40000".parse().unwrap());
    assert_eq!(opened_events[0].destination, "10.9.0.2:22".parse().unwrap());
    assert_eq!(opened_events[0].resource_id, ssh_id);
}

#[test]
fn a_revoked_session_is_dropped_both_ways_but_rst_leaves() {
    if !require_root("a_revoked_session_is_dropped_both_ways_but_rst_leaves") {
        return;
    }
    let mut dp = LoadedDatapath::new("revoked");
    let ssh_id = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh_id, SESSION).unwrap();
    let data = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .payload(&[7u8; 64])
        .build();
    check(&mut dp, "admitted", XDP_INGRESS, &data, XDP_PASS, opened());

    dp.datapath.maps.revoke(SESSION).unwrap();
    let revoked = || drops(DropReason::Revoked);
    check(
        &mut dp,
        "known flow of a revoked session",
        XDP_INGRESS,
        &data,
        XDP_DROP,
        revoked(),
    );
    let new_flow = Frame::tcp(ip(CLIENT), 40002, ip(SERVER), 22)
        .flags(TCP_SYN)
        .build();
    check(
        &mut dp,
        "new flow through a revoked session's grant",
        XDP_INGRESS,
        &new_flow,
        XDP_DROP,
        revoked(),
    );
    let reply = Frame::tcp(ip(SERVER), 22, ip(CLIENT), 40000)
        .payload(&[1u8; 10])
        .build();
    check(
        &mut dp,
        "reply of a revoked flow",
        TC_EGRESS,
        &reply,
        TC_ACT_SHOT,
        revoked(),
    );
    let rst = Frame::tcp(ip(SERVER), 22, ip(CLIENT), 40000)
        .flags(TCP_RST | TCP_ACK)
        .build();
    check(
        &mut dp,
        "RST of a revoked flow",
        TC_EGRESS,
        &rst,
        TC_ACT_OK,
        Delta {
            rst_passed: 1,
            ..Delta::default()
        },
    );
    check(
        &mut dp,
        "tc ingress of a revoked flow",
        TC_INGRESS,
        &data,
        TC_ACT_SHOT,
        revoked(),
    );

    let stats = dp.datapath.maps.session_stats(SESSION).unwrap();
    assert_eq!(stats.dropped_after_revoke_packets, 4);
    assert_eq!(
        stats.dropped_after_revoke_bytes,
        (2 * data.len() + new_flow.len() + reply.len()) as u64
    );
    let revocation = dp.datapath.maps.revocation(SESSION).unwrap();
    assert!(revocation.first_drop_ns >= revocation.revoked_at_ns);
    // Revoking again keeps the first revocation.
    dp.datapath.maps.revoke(SESSION).unwrap();
    assert_eq!(dp.datapath.maps.revocation(SESSION).unwrap(), revocation);

    // A new session from the same source: a fresh SYN reusing the revoked flow's 5-tuple opens
    // a new flow through the new grant; anything else on that 5-tuple stays dropped.
    const NEXT: u64 = SESSION + 7;
    dp.datapath.maps.grant(ip(CLIENT), ssh_id, NEXT).unwrap();
    check(
        &mut dp,
        "non-SYN on the revoked 5-tuple",
        XDP_INGRESS,
        &data,
        XDP_DROP,
        revoked(),
    );
    let syn = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22)
        .flags(TCP_SYN)
        .build();
    check(
        &mut dp,
        "fresh SYN on the revoked 5-tuple",
        XDP_INGRESS,
        &syn,
        XDP_PASS,
        opened(),
    );
    let key = flow_key(CLIENT, 40000, SERVER, 22, 6);
    assert_eq!(dp.datapath.maps.flow(&key).unwrap().session_id, NEXT);
    check(
        &mut dp,
        "the new session's flow",
        XDP_INGRESS,
        &data,
        XDP_PASS,
        Delta::default(),
    );
    dp.datapath.maps.grant(ip(CLIENT), ssh_id, SESSION).unwrap();

    let first_drops: Vec<_> = std::iter::from_fn(|| dp.datapath.events.try_next())
        .filter(|e| e.kind == EventKind::FirstDropAfterRevoke)
        .collect();
    assert_eq!(
        first_drops.len(),
        1,
        "one first-drop event: {first_drops:?}"
    );
    assert_eq!(first_drops[0].session_id, SESSION);
}

#[test]
fn monitor_mode_counts_what_it_would_drop_and_passes_it() {
    if !require_root("monitor_mode_counts_what_it_would_drop_and_passes_it") {
        return;
    }
    let mut dp = LoadedDatapath::new("monitor");
    dp.datapath.maps.set_mode(Mode::Monitor).unwrap();
    assert_eq!(dp.datapath.maps.mode().unwrap(), Mode::Monitor);
    let would = |r| Delta {
        would_drop: vec![(r, 1)],
        ..Delta::default()
    };
    let ssh = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22).build();
    check(
        &mut dp,
        "no grant",
        XDP_INGRESS,
        &ssh,
        XDP_PASS,
        would(DropReason::NoGrant),
    );
    check(
        &mut dp,
        "no grant, tc",
        TC_INGRESS,
        &ssh,
        TC_ACT_OK,
        would(DropReason::NoGrant),
    );
    let bad = truncate(ssh.clone(), 14 + 10);
    check(
        &mut dp,
        "malformed",
        XDP_INGRESS,
        &bad,
        XDP_PASS,
        would(DropReason::Malformed),
    );
    assert!(
        dp.datapath.maps.flows().is_empty(),
        "monitor mode must not admit flows"
    );

    let ssh_id = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh_id, SESSION).unwrap();
    check(&mut dp, "granted", XDP_INGRESS, &ssh, XDP_PASS, opened());
    dp.datapath.maps.revoke(SESSION).unwrap();
    check(
        &mut dp,
        "revoked",
        XDP_INGRESS,
        &ssh,
        XDP_PASS,
        would(DropReason::Revoked),
    );
    assert!(
        dp.datapath
            .maps
            .session_stats(SESSION)
            .unwrap()
            .dropped_after_revoke_packets
            == 0
    );

    dp.datapath.maps.set_mode(Mode::Enforce).unwrap();
    check(
        &mut dp,
        "revoked, enforcing again",
        XDP_INGRESS,
        &ssh,
        XDP_DROP,
        drops(DropReason::Revoked),
    );
}

#[test]
fn a_full_flow_table_denies_new_flows_and_keeps_existing_ones() {
    if !require_root("a_full_flow_table_denies_new_flows_and_keeps_existing_ones") {
        return;
    }
    const CAPACITY: u32 = 8;
    let mut dp = LoadedDatapath::with_flow_table("full", CAPACITY);
    let ssh_id = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh_id, SESSION).unwrap();
    let frame = |sport| Frame::tcp(ip(CLIENT), sport, ip(SERVER), 22).build();
    for sport in 0..CAPACITY as u16 {
        check(
            &mut dp,
            "filling",
            XDP_INGRESS,
            &frame(1000 + sport),
            XDP_PASS,
            opened(),
        );
    }
    assert_eq!(dp.datapath.maps.flow_fill(), (CAPACITY as usize, CAPACITY));
    check(
        &mut dp,
        "one flow too many",
        XDP_INGRESS,
        &frame(2000),
        XDP_DROP,
        drops(DropReason::FlowTableFull),
    );
    check(
        &mut dp,
        "existing flow",
        XDP_INGRESS,
        &frame(1000),
        XDP_PASS,
        Delta::default(),
    );
    // Removing a flow makes room again.
    dp.datapath
        .maps
        .remove_flow(&flow_key(CLIENT, 1001, SERVER, 22, 6))
        .unwrap();
    check(
        &mut dp,
        "after one was removed",
        XDP_INGRESS,
        &frame(2000),
        XDP_PASS,
        opened(),
    );
}

#[test]
fn denied_events_are_rate_limited() {
    if !require_root("denied_events_are_rate_limited") {
        return;
    }
    let mut dp = LoadedDatapath::new("ratelimit");
    let ssh = Frame::tcp(ip(CLIENT), 40000, ip(SERVER), 22).build();
    // One run of 200 repeats stays on one CPU and well inside one second.
    let out = dp.datapath.test_run(XDP_INGRESS, &ssh, 200).unwrap();
    assert_eq!(out.return_value, XDP_DROP);
    let c = dp.counters();
    assert_eq!(c.dropped(DropReason::NoGrant), 200);
    let denied = std::iter::from_fn(|| dp.datapath.events.try_next())
        .filter(|e| matches!(e.kind, EventKind::FlowDenied(DropReason::NoGrant)))
        .count() as u64;
    assert_eq!(denied, agent_common::DENIED_EVENTS_PER_SEC);
    assert_eq!(c.denied_events_suppressed, 200 - denied);
}

/// A SYN from `client`:`sport` to the test server's ssh.
fn syn(client: &str, sport: u16) -> Vec<u8> {
    Frame::tcp(ip(client), sport, ip(SERVER), 22)
        .flags(TCP_SYN)
        .build()
}

#[test]
fn a_session_that_sprays_source_ports_fills_only_its_own_flow_budget() {
    if !require_root("a_session_that_sprays_source_ports_fills_only_its_own_flow_budget") {
        return;
    }
    const BUDGET: u32 = 4;
    const SPRAYER: u64 = 0x5e55_1000_0000_0a01;
    const NEIGHBOUR: u64 = 0x5e55_1000_0000_0a02;
    const NEIGHBOUR_IP: &str = "192.0.2.11";
    let mut dp = LoadedDatapath::new("budget");
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.set_session_flow_limit(BUDGET).unwrap();
    dp.datapath.maps.grant(ip(CLIENT), ssh, SPRAYER).unwrap();
    dp.datapath
        .maps
        .grant(ip(NEIGHBOUR_IP), ssh, NEIGHBOUR)
        .unwrap();

    for sport in 0..BUDGET as u16 {
        check(
            &mut dp,
            "within the budget",
            XDP_INGRESS,
            &syn(CLIENT, 3000 + sport),
            XDP_PASS,
            opened(),
        );
    }
    for sport in BUDGET as u16..BUDGET as u16 + 3 {
        check(
            &mut dp,
            "over the budget",
            XDP_INGRESS,
            &syn(CLIENT, 3000 + sport),
            XDP_DROP,
            drops(DropReason::SessionFlowLimit),
        );
    }
    let stats = dp.datapath.maps.session_stats(SPRAYER).unwrap();
    assert_eq!(
        (stats.live_flows, stats.flows_opened, stats.flow_limit_drops),
        (u64::from(BUDGET), u64::from(BUDGET), 3),
        "the sprayer's slot: {stats:?}"
    );
    assert_eq!(dp.datapath.maps.flows().len(), BUDGET as usize);
    // Its established flows go on.
    check(
        &mut dp,
        "an established flow of the sprayer",
        XDP_INGRESS,
        &Frame::tcp(ip(CLIENT), 3000, ip(SERVER), 22)
            .flags(TCP_ACK)
            .build(),
        XDP_PASS,
        Delta::default(),
    );
    // Another session is not affected.
    check(
        &mut dp,
        "another session's new flow",
        XDP_INGRESS,
        &syn(NEIGHBOUR_IP, 4000),
        XDP_PASS,
        opened(),
    );
    assert_eq!(
        dp.datapath
            .maps
            .session_stats(NEIGHBOUR)
            .unwrap()
            .flow_limit_drops,
        0
    );
    // A flow of the sprayer ends: its place in the budget comes back.
    dp.datapath
        .maps
        .remove_flow(&flow_key(CLIENT, 3000, SERVER, 22, 6))
        .unwrap();
    assert_eq!(
        dp.datapath.maps.session_stats(SPRAYER).unwrap().live_flows,
        u64::from(BUDGET) - 1
    );
    check(
        &mut dp,
        "a new flow once a place is free",
        XDP_INGRESS,
        &syn(CLIENT, 3100),
        XDP_PASS,
        opened(),
    );
}

#[test]
fn a_reused_slot_never_gives_its_verdict_to_the_previous_sessions_flows() {
    if !require_root("a_reused_slot_never_gives_its_verdict_to_the_previous_sessions_flows") {
        return;
    }
    const ENDED: u64 = 0x5e55_1000_0000_0b01;
    const NEXT: u64 = 0x5e55_1000_0000_0b02;
    let mut dp = LoadedDatapath::new("reuse");
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh, ENDED).unwrap();
    check(
        &mut dp,
        "the first session's flow",
        XDP_INGRESS,
        &syn(CLIENT, 5000),
        XDP_PASS,
        opened(),
    );
    let slot = dp
        .datapath
        .maps
        .slot_of(ENDED)
        .expect("a slot for a granted session");
    // The session ends: revoked, its grant withdrawn, and (its flow lingering, which the agent
    // never lets happen) its slot handed back and claimed by the next session.
    dp.datapath.maps.revoke(ENDED).unwrap();
    dp.datapath.maps.remove_grant(ip(CLIENT), ssh).unwrap();
    dp.datapath.maps.release_session(ENDED);
    assert_eq!(dp.datapath.maps.revocation(ENDED), None);
    dp.datapath.maps.grant(ip("192.0.2.12"), ssh, NEXT).unwrap();
    assert_eq!(
        dp.datapath.maps.slot_of(NEXT),
        Some(slot),
        "the next session reuses the slot"
    );
    check(
        &mut dp,
        "the ended session's lingering flow, its slot live for another session",
        XDP_INGRESS,
        &Frame::tcp(ip(CLIENT), 5000, ip(SERVER), 22)
            .flags(TCP_ACK)
            .build(),
        XDP_DROP,
        drops(DropReason::Revoked),
    );
    assert_eq!(
        dp.datapath
            .maps
            .session_stats(NEXT)
            .unwrap()
            .dropped_after_revoke_packets,
        0,
        "the drop is not the next session's"
    );
    check(
        &mut dp,
        "the next session's own flow",
        XDP_INGRESS,
        &syn("192.0.2.12", 5001),
        XDP_PASS,
        opened(),
    );
}

#[test]
fn a_second_load_over_the_pins_keeps_every_session_in_its_slot() {
    if !require_root("a_second_load_over_the_pins_keeps_every_session_in_its_slot") {
        return;
    }
    const LIVE: u64 = 0x5e55_1000_0000_0c01;
    const REVOKED_ONE: u64 = 0x5e55_1000_0000_0c02;
    const NEWCOMER: u64 = 0x5e55_1000_0000_0c03;
    let mut dp = LoadedDatapath::new("slots-restart");
    let ssh = dp.resource_id("ssh");
    dp.datapath.maps.grant(ip(CLIENT), ssh, LIVE).unwrap();
    dp.datapath.maps.revoke(REVOKED_ONE).unwrap();
    let live_slot = dp.datapath.maps.slot_of(LIVE).unwrap();
    let revoked_slot = dp.datapath.maps.slot_of(REVOKED_ONE).unwrap();

    // What a restarted agent does: load over the same pins, with a fresh slot index.
    let mut restarted = Datapath::load(&LoadOptions {
        pin_dir: dp.pin_dir().to_path_buf(),
        flow_table_size: 1024,
        ..LoadOptions::default()
    })
    .expect("adopting the pinned datapath");
    assert_eq!(restarted.maps.slot_of(LIVE), Some(live_slot));
    assert_eq!(restarted.maps.slot_of(REVOKED_ONE), Some(revoked_slot));
    assert!(restarted.maps.revocation(REVOKED_ONE).is_some());
    assert!(restarted.maps.revocation(LIVE).is_none());
    restarted
        .maps
        .grant(ip("192.0.2.13"), ssh, NEWCOMER)
        .unwrap();
    let newcomer = restarted.maps.slot_of(NEWCOMER).unwrap();
    assert!(
        newcomer != live_slot && newcomer != revoked_slot,
        "a held slot was handed to a new session: {newcomer}"
    );
    // The first handle still sees the live session as live.
    check(
        &mut dp,
        "the live session's new flow after the second load",
        XDP_INGRESS,
        &syn(CLIENT, 6000),
        XDP_PASS,
        opened(),
    );
}

/// Creates a map with BPF_MAP_CREATE and pins it at `path`, as an agent of the layout before
/// session slots did (aya creates maps only from an object).
fn pin_raw_map(path: &std::path::Path, map_type: u32, key: u32, value: u32, flags: u32) {
    let mut attr = [0u32; 32];
    attr[0] = map_type;
    attr[1] = key;
    attr[2] = value;
    attr[3] = 1024;
    attr[4] = flags;
    // SAFETY: BPF_MAP_CREATE (0) reads map_type, key_size, value_size, max_entries and
    // map_flags from a zeroed bpf_attr of the size we pass.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            0,
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert!(
        fd >= 0,
        "BPF_MAP_CREATE: {}",
        std::io::Error::last_os_error()
    );
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let mut pin = [0u64; 16];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: BPF_OBJ_PIN (6) reads pathname (NUL-terminated, alive across the call) and
    // bpf_fd from a zeroed bpf_attr of the size we pass.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            6,
            pin.as_mut_ptr(),
            std::mem::size_of_val(&pin),
        )
    };
    assert_eq!(
        rc,
        0,
        "BPF_OBJ_PIN {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    // SAFETY: `fd` is ours; the pin keeps the map.
    unsafe { libc::close(fd as i32) };
}

#[test]
fn pins_of_the_layout_before_session_slots_are_refused_with_what_to_do() {
    if !require_root("pins_of_the_layout_before_session_slots_are_refused_with_what_to_do") {
        return;
    }
    const BPF_MAP_TYPE_HASH: u32 = 1;
    const BPF_F_NO_PREALLOC: u32 = 1;
    flowwarden_tests::privileged::ensure_bpffs().expect("bpffs");
    let pin_dir = flowwarden_tests::loaded::private_pin_dir("oldlayout");
    let maps_dir = pin_dir.join("maps");
    std::fs::create_dir_all(&maps_dir).unwrap();
    // The old layout: revocations and session counters in hashes keyed by session id, and
    // grants of 8 bytes (a session id, no slot).
    pin_raw_map(
        &maps_dir.join("FW_REVOKED"),
        BPF_MAP_TYPE_HASH,
        8,
        16,
        BPF_F_NO_PREALLOC,
    );
    pin_raw_map(
        &maps_dir.join("FW_SESS_STATS"),
        BPF_MAP_TYPE_HASH,
        8,
        24,
        BPF_F_NO_PREALLOC,
    );
    pin_raw_map(&maps_dir.join("FW_GRANTS"), BPF_MAP_TYPE_HASH, 20, 8, 0);

    let opts = LoadOptions {
        pin_dir: pin_dir.clone(),
        flow_table_size: 1024,
        ..LoadOptions::default()
    };
    let err = match Datapath::load(&opts) {
        Ok(_) => {
            let _ = flowwarden::datapath::detach_all(&pin_dir);
            panic!("a datapath loaded over pins of the old layout");
        }
        Err(e) => e.to_string(),
    };
    assert!(
        err.contains("older flowwarden layout")
            && err.contains("FW_REVOKED, FW_SESS_STATS")
            && err.contains(&format!(
                "flowwarden datapath detach --pin-dir {}",
                pin_dir.display()
            )),
        "the refusal should name the old maps and the command that clears them: {err}"
    );
    assert!(
        maps_dir.join("FW_REVOKED").exists() && maps_dir.join("FW_GRANTS").exists(),
        "the refusal must leave the old pins alone"
    );

    // Doing what it says: detach removes the old pins too, and the next load succeeds.
    let removed = flowwarden::datapath::detach_all(&pin_dir).expect("detaching");
    assert!(
        removed.iter().any(|p| p.ends_with("FW_SESS_STATS")),
        "detach must remove the old layout's pins: {removed:?}"
    );
    let dp = Datapath::load(&opts).expect("a load after detach");
    drop(dp);
    let _ = flowwarden::datapath::detach_all(&pin_dir);
}
