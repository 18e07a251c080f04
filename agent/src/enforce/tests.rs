//! Unit tests of the enforcer over in-memory maps (`Enforcer::in_memory`): grants, the
//! revocation path, the flow index and flow removal, without root.

use std::{collections::HashSet, net::IpAddr};

use super::Enforcer;
use crate::{
    config::Mode,
    datapath::{Flow, FlowKey, addr_bytes},
    sessions::model::{SessionGrant, SessionId},
};

fn addr(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn grant(resource_id: u32) -> SessionGrant {
    SessionGrant {
        resource: format!("r{resource_id}"),
        resource_id,
        rule: "test".into(),
    }
}

fn key(source: &str, sport: u16) -> FlowKey {
    FlowKey {
        src: addr_bytes(addr(source)),
        dst: addr_bytes(addr("192.0.2.1")),
        sport,
        dport: 22,
        proto: agent_common::IPPROTO_TCP,
        _pad: [0; 3],
    }
}

fn flow(session: u64) -> Flow {
    Flow {
        session_id: session,
        resource_id: 1,
        ..Flow::default()
    }
}

#[test]
fn a_grant_that_does_not_fit_is_all_or_nothing_and_gives_its_slot_back() {
    // One usable slot.
    let e = Enforcer::in_memory(2, 64).unwrap();
    e.grant(SessionId(1), addr("198.51.100.1"), &[grant(1), grant(2)])
        .unwrap();
    let err = e
        .grant(SessionId(2), addr("198.51.100.2"), &[grant(1)])
        .unwrap_err();
    assert!(err.to_string().contains("session_slots"), "{err}");
    assert_eq!(e.session_slots_fill(), (1, 1));
    assert_eq!(e.grants().len(), 2, "only the first session's grants");
}

#[test]
fn withdraw_leaves_a_grant_that_another_session_holds_now() {
    let e = Enforcer::in_memory(8, 64).unwrap();
    let src = addr("198.51.100.1");
    e.grant(SessionId(1), src, &[grant(1)]).unwrap();
    e.grant(SessionId(2), src, &[grant(1)]).unwrap();
    e.withdraw(SessionId(1), src, 1).unwrap();
    assert_eq!(e.grants(), vec![(src, 1, SessionId(2))]);
    e.withdraw(SessionId(2), src, 1).unwrap();
    assert!(e.grants().is_empty());
}

#[test]
fn a_revocation_is_read_back_and_keeps_its_first_time() {
    let e = Enforcer::in_memory(8, 64).unwrap();
    e.grant(SessionId(7), addr("198.51.100.1"), &[grant(1)])
        .unwrap();
    assert!(e.revocation(SessionId(7)).is_none());
    e.revoke(SessionId(7)).unwrap();
    let first = e.revocation(SessionId(7)).unwrap();
    e.revoke(SessionId(7)).unwrap();
    assert_eq!(e.revocation(SessionId(7)), Some(first));
    assert_eq!(e.revoked(), vec![SessionId(7)]);
    e.release_session(SessionId(7));
    assert!(e.revoked().is_empty());
    assert_eq!(e.session_slots_fill().0, 0);
}

/// A terminated session's "dropped after termination" is the proof that the cut held: it
/// survives the release of its slot, which then serves the next session from zero.
#[test]
fn what_a_released_slot_dropped_is_still_read_back() {
    let e = Enforcer::in_memory(8, 64).unwrap();
    e.grant(SessionId(7), addr("198.51.100.1"), &[grant(1)])
        .unwrap();
    e.grant(SessionId(8), addr("198.51.100.2"), &[grant(1)])
        .unwrap();
    e.revoke(SessionId(7)).unwrap();
    e.revoke(SessionId(8)).unwrap();
    for _ in 0..3 {
        e.slots.count_drop(7, 100);
    }
    e.release_session(SessionId(7));
    e.release_session(SessionId(8));
    let seven = e.session_stats(SessionId(7)).expect("kept");
    assert_eq!(
        (
            seven.dropped_after_revoke_packets,
            seven.dropped_after_revoke_bytes
        ),
        (3, 300)
    );
    assert_eq!(
        e.all_session_stats()[&SessionId(7)].dropped_after_revoke_bytes,
        300
    );
    assert!(
        e.session_stats(SessionId(8)).is_none(),
        "a slot that dropped nothing leaves nothing behind"
    );
    assert_eq!(e.session_slots_fill().0, 0, "both slots are free");
    e.grant(SessionId(9), addr("198.51.100.3"), &[grant(1)])
        .unwrap();
    assert_eq!(
        e.session_stats(SessionId(9))
            .unwrap()
            .dropped_after_revoke_packets,
        0,
        "the next session starts from zero"
    );
}

#[test]
fn one_sessions_flows_come_from_the_index_once_a_walk_has_reconciled_it() {
    let e = Enforcer::in_memory(8, 64).unwrap();
    for (session, sport) in [(1, 1000), (1, 1001), (2, 2000)] {
        e.insert_flow(key("198.51.100.1", sport), flow(session))
            .unwrap();
    }
    // Before any walk the index cannot vouch for flows opened under an earlier agent: a
    // walk answers instead, with the same flows.
    assert_eq!(e.session_flows(SessionId(1)).len(), 2);
    let census = e.census();
    assert_eq!(census.flows, 3);
    assert_eq!(e.indexed_flows(), 3);
    let mut ports: Vec<u16> = e
        .session_flows(SessionId(1))
        .iter()
        .map(|(k, _)| k.sport)
        .collect();
    ports.sort_unstable();
    assert_eq!(ports, [1000, 1001]);
    assert_eq!(
        e.session_stats(SessionId(1)).unwrap().live_flows,
        2,
        "each flow counts against its session's budget"
    );

    let removed = e.remove_flows(|_, f| f.session_id == 1);
    assert_eq!(removed.len(), 2);
    assert!(e.session_flows(SessionId(1)).is_empty());
    assert_eq!(e.session_stats(SessionId(1)).unwrap().live_flows, 0);
    assert_eq!(
        e.flows_of(&HashSet::from([2])).len(),
        1,
        "another session's flow stays"
    );
    assert_eq!(e.indexed_flows(), 1);
}

#[test]
fn the_mode_switch_reads_back_and_sockets_are_never_touched() {
    let e = Enforcer::in_memory(8, 64).unwrap();
    assert_eq!(e.mode().unwrap(), Mode::Enforce);
    e.set_mode(Mode::Monitor).unwrap();
    assert_eq!(e.mode().unwrap(), Mode::Monitor);
    e.insert_flow(key("127.0.0.1", 22), flow(3)).unwrap();
    let d = e.destroy_sockets(&HashSet::from([3])).unwrap();
    assert_eq!(
        d.destroyed + d.not_found,
        0,
        "the fake reached the host's sockets"
    );
}
