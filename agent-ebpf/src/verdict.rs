//! The verdict shared by XDP and TC: is this packet part of a live session's flow?
//! The programs differ only in how they read the packet and what they return.

use agent_common::{
    DENIED_EVENTS_PER_SEC, Event, Flow, FlowKey, Grant, GrantKey, RESOURCE_DST_FIXED_BITS,
    RESOURCE_HAS_DSTS, ResourceDst, SessionSlot, config, event_kind, resource_port_index, stat,
};
use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
    maps::lpm_trie::Key,
};

use crate::{
    logs,
    maps::{
        CONFIG, DENY_RATE, FLOWS, GRANTS, RESOURCE_DSTS, RESOURCE_PORTS, SESSIONS, atomic_add,
        count, emit, monitor_mode,
    },
    parse::{Packet, TCP_ACK, TCP_RST, TCP_SYN},
};

const EEXIST: i64 = 17;
const NS_PER_SEC: u64 = 1_000_000_000;

pub enum Action {
    Pass,
    Drop,
}

/// Which resource, if any, owns `proto`/`port` at `addr`; zero for none.
#[inline(always)]
fn resource_of(proto: u8, port: u16, addr: &[u8; 16]) -> u32 {
    let Some(index) = resource_port_index(proto, port) else {
        return 0;
    };
    let Some(slot) = RESOURCE_PORTS.get(index) else {
        return 0;
    };
    if slot.resource_id == 0 || slot.flags & RESOURCE_HAS_DSTS == 0 {
        return slot.resource_id;
    }
    let key = Key::new(
        RESOURCE_DST_FIXED_BITS + 128,
        ResourceDst {
            proto,
            _pad: 0,
            port_be: port.to_be_bytes(),
            addr: *addr,
        },
    );
    RESOURCE_DSTS.get(&key).copied().unwrap_or(0)
}

/// The session slot `index` if it still belongs to `session_id` (see [`Flow`]): an array
/// lookup that the verifier inlines. `None` when another session holds the slot now, which
/// only happens once the owner ended: its flows are then dropped as revoked.
#[inline(always)]
fn slot_of(index: u32, session_id: u64) -> Option<*mut SessionSlot> {
    let slot = SESSIONS.get_ptr_mut(index)?;
    // SAFETY: a map value pointer stays valid for the whole program run.
    if unsafe { (*slot).session_id } != session_id {
        return None;
    }
    Some(slot)
}

/// Whether the session of this slot is live: owned, and not revoked.
#[inline(always)]
fn live(slot: Option<*mut SessionSlot>) -> bool {
    // SAFETY: as in `slot_of`; the agent stores `revoked_at_ns` whole (one aligned store).
    slot.is_some_and(|s| unsafe { core::ptr::read_volatile(&raw const (*s).revoked_at_ns) } == 0)
}

/// Stamps a flow's last-seen time, without a store (and the cache line it dirties for the
/// other CPUs) when the coarse clock has not moved since the last packet.
///
/// # Safety
/// `flow` points into the flow map.
#[inline(always)]
unsafe fn stamp(flow: *mut Flow) {
    let now = last_seen_now();
    // SAFETY: the caller guarantees the pointer.
    unsafe {
        if (*flow).last_seen_ns != now {
            (*flow).last_seen_ns = now;
        }
    }
}

/// Ingress towards a resource: a known flow passes unless its session is revoked; an unknown
/// flow passes only through a live grant for (source, resource), and becomes a flow.
#[inline(always)]
pub fn ingress(pkt: &Packet, len: u64) -> Action {
    let resource_id = resource_of(pkt.proto, pkt.dport, &pkt.dst);
    if resource_id == 0 {
        return Action::Pass;
    }
    let key = FlowKey {
        src: pkt.src,
        dst: pkt.dst,
        sport: pkt.sport,
        dport: pkt.dport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    // From here on the 5-tuple is read back from `key` in memory: the parser's 32 address
    // bytes no longer have to be kept (each in a stack slot of its own) across map lookups.
    let key = core::hint::black_box(&key);
    let mut replace = false;
    if let Some(flow) = FLOWS.get_ptr_mut(key) {
        // SAFETY: a map value pointer stays valid for the whole program run.
        let (session_id, index) = unsafe { ((*flow).session_id, (*flow).slot) };
        let slot = slot_of(index, session_id);
        if live(slot) {
            // SAFETY: as above; counters are shared by CPUs, hence the atomic adds.
            unsafe {
                atomic_add(&raw mut (*flow).rx_packets, 1);
                atomic_add(&raw mut (*flow).rx_bytes, len);
                stamp(flow);
            }
            return Action::Pass;
        }
        // A fresh SYN reusing the 5-tuple of a revoked session's lingering flow is a new
        // connection: it may open through a live grant (of a new session) instead.
        let syn_only = pkt.proto == agent_common::IPPROTO_TCP
            && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
        if !syn_only {
            return revoked(index, session_id, key, resource_id, len);
        }
        replace = true;
    }
    let grant_key = GrantKey {
        src: key.src,
        resource_id,
    };
    // SAFETY: the value is copied out at once.
    let Some(grant) = (unsafe { GRANTS.get(grant_key) }).copied() else {
        return deny(stat::DROP_NO_GRANT, key, resource_id, 0);
    };
    if !live(slot_of(grant.slot, grant.session_id)) {
        return revoked(grant.slot, grant.session_id, key, resource_id, len);
    }
    // The refusals are called from here, not from `open_flow`: a call from a call would add
    // a third frame to the chain the verifier holds to its 512-byte limit.
    match open_flow(key, &grant, resource_id, replace, len) {
        Opened::Yes => Action::Pass,
        Opened::OverBudget => deny(
            stat::DROP_SESSION_FLOW_LIMIT,
            key,
            resource_id,
            grant.session_id,
        ),
        // The table is full (or memory is short): fail closed, never evict.
        Opened::NoRoom => deny(
            stat::DROP_FLOW_TABLE_FULL,
            key,
            resource_id,
            grant.session_id,
        ),
    }
}

/// What [`open_flow`] did.
enum Opened {
    /// The flow is in the table (this CPU's, or another's a moment earlier).
    Yes,
    /// The session holds its budget of live flows.
    OverBudget,
    /// The table has no room.
    NoRoom,
}

/// Writes a new flow of the grant's session (over a revoked session's lingering one if
/// `replace`), unless the session holds its budget of live flows or the table has no room.
/// Another CPU opening the same flow a moment earlier counts as opened. The caller checked
/// that the grant's slot is its session's and live.
///
/// A function of its own (a BPF-to-BPF call), as are [`deny`] and [`revoked`]: the paths
/// that open or refuse a flow keep their locals (and their log records) out of the frame of
/// the established flow's path. The verifier adds that frame to every call chain under its
/// 512-byte limit.
#[inline(never)]
fn open_flow(key: &FlowKey, grant: &Grant, resource_id: u32, replace: bool, len: u64) -> Opened {
    let session_id = grant.session_id;
    let Some(slot) = slot_of(grant.slot, session_id) else {
        return Opened::NoRoom;
    };
    let limit = CONFIG.get(config::SESSION_FLOW_LIMIT).copied().unwrap_or(0);
    // SAFETY: a map value pointer stays valid for the whole program run; counters are shared
    // by CPUs, hence the atomic adds. Two CPUs may both pass the check at the budget's edge:
    // the budget is a bound on one session's share, and one flow over it is harmless.
    unsafe {
        if limit != 0 && (*slot).live_flows >= u64::from(limit) {
            atomic_add(&raw mut (*slot).flow_limit_drops, 1);
            return Opened::OverBudget;
        }
        atomic_add(&raw mut (*slot).live_flows, 1);
    }
    // Flow stamps share the last-seen clock, so last_seen_ns >= created_ns always holds.
    let now = last_seen_now();
    let flow = Flow {
        session_id,
        resource_id,
        slot: grant.slot,
        created_ns: now,
        last_seen_ns: now,
        rx_packets: 1,
        rx_bytes: len,
        tx_packets: 0,
        tx_bytes: 0,
    };
    let flags = if replace { BPF_ANY } else { BPF_NOEXIST };
    match FLOWS.insert(key, flow, flags as u64) {
        Ok(()) => {
            count(stat::FLOWS_OPENED, 1);
            // SAFETY: as above.
            unsafe { atomic_add(&raw mut (*slot).flows_opened, 1) };
            emit(Event {
                kind: event_kind::FLOW_OPENED,
                reason: 0,
                session_id,
                ts_ns: now,
                flow: *key,
                resource_id,
                monitor: 0,
            });
            Opened::Yes
        }
        Err(e) => {
            // Not added after all: give the budget back (an add of -1).
            // SAFETY: as above.
            unsafe { atomic_add(&raw mut (*slot).live_flows, u64::MAX) };
            if e as i64 == -EEXIST {
                Opened::Yes
            } else {
                Opened::NoRoom
            }
        }
    }
}

/// Egress from a resource: replies of a revoked session's flows are dropped, except TCP RST
/// so the peer learns at once. Everything else passes: a flow that was never admitted had
/// its request dropped on ingress.
#[inline(always)]
pub fn egress(pkt: &Packet, len: u64) -> Action {
    let resource_id = resource_of(pkt.proto, pkt.sport, &pkt.src);
    if resource_id == 0 {
        return Action::Pass;
    }
    let key = FlowKey {
        src: pkt.dst,
        dst: pkt.src,
        sport: pkt.dport,
        dport: pkt.sport,
        proto: pkt.proto,
        _pad: [0; 3],
    };
    let Some(flow) = FLOWS.get_ptr_mut(key) else {
        return Action::Pass;
    };
    // SAFETY: a map value pointer stays valid for the whole program run.
    let (session_id, index) = unsafe { ((*flow).session_id, (*flow).slot) };
    if !live(slot_of(index, session_id)) {
        if pkt.proto == agent_common::IPPROTO_TCP && pkt.tcp_flags & TCP_RST != 0 {
            count(stat::RST_PASSED_AFTER_REVOKE, 1);
            return Action::Pass;
        }
        return revoked(index, session_id, &key, resource_id, len);
    }
    // SAFETY: as above; counters are shared by CPUs, hence the atomic adds.
    unsafe {
        atomic_add(&raw mut (*flow).tx_packets, 1);
        atomic_add(&raw mut (*flow).tx_bytes, len);
        stamp(flow);
    }
    Action::Pass
}

/// A packet whose headers claim TCP/UDP but do not parse: dropped (fail closed) and counted.
/// `ifindex` and `len` only go into the (rate-limited) log record.
#[inline(always)]
pub fn malformed(ifindex: u32, len: u64) -> Action {
    let monitor = monitor_mode();
    logs::malformed(ifindex, len, monitor);
    if monitor {
        count(stat::MONITOR_OFFSET + stat::DROP_MALFORMED, 1);
        return Action::Pass;
    }
    count(stat::DROP_MALFORMED, 1);
    Action::Drop
}

/// A packet of a revoked session (or of one whose slot another session holds now): dropped
/// and counted against the session; the first such drop is reported, as proof that the
/// revocation took hold. A function of its own, as [`open_flow`] says why.
#[inline(never)]
fn revoked(index: u32, session_id: u64, key: &FlowKey, resource_id: u32, len: u64) -> Action {
    if monitor_mode() {
        count(stat::MONITOR_OFFSET + stat::DROP_REVOKED, 1);
        return Action::Pass;
    }
    count(stat::DROP_REVOKED, 1);
    // A slot that is no longer the session's has no counters of the session left to add to.
    let Some(slot) = slot_of(index, session_id) else {
        return Action::Drop;
    };
    // SAFETY: a map value pointer stays valid for the whole program run; counters are shared
    // by CPUs, hence the atomic adds. Two CPUs may both see zero and both report: user space
    // keeps the first.
    unsafe {
        atomic_add(&raw mut (*slot).dropped_after_revoke_packets, 1);
        atomic_add(&raw mut (*slot).dropped_after_revoke_bytes, len);
        if (*slot).first_drop_ns == 0 {
            let now = bpf_ktime_get_ns();
            (*slot).first_drop_ns = now;
            logs::first_revoked_drop(session_id, key, resource_id);
            emit(Event {
                kind: event_kind::FIRST_DROP_AFTER_REVOKE,
                reason: stat::DROP_REVOKED,
                session_id,
                ts_ns: now,
                flow: *key,
                resource_id,
                monitor: 0,
            });
        }
    }
    Action::Drop
}

/// A packet to a resource that no live grant admits: dropped (or only counted in monitor
/// mode), with a rate-limited event. A function of its own, as [`open_flow`] says why.
#[inline(never)]
fn deny(reason: u32, key: &FlowKey, resource_id: u32, session_id: u64) -> Action {
    let monitor = monitor_mode();
    count(
        if monitor {
            stat::MONITOR_OFFSET + reason
        } else {
            reason
        },
        1,
    );
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    logs::denied(reason, key, resource_id, monitor, now);
    if denied_event_allowed(now) {
        emit(Event {
            kind: event_kind::FLOW_DENIED,
            reason,
            session_id,
            ts_ns: now,
            flow: *key,
            resource_id,
            monitor: monitor as u32,
        });
    }
    if monitor { Action::Pass } else { Action::Drop }
}

/// Per-CPU budget of denied-flow events per second, so a scan cannot flood the ring buffer.
#[inline(always)]
fn denied_event_allowed(now: u64) -> bool {
    let Some(window) = DENY_RATE.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
    unsafe {
        if now.wrapping_sub((*window).window_start_ns) >= NS_PER_SEC {
            (*window).window_start_ns = now;
            (*window).count = 0;
        }
        if (*window).count < DENIED_EVENTS_PER_SEC {
            (*window).count += 1;
            return true;
        }
    }
    count(stat::DENIED_EVENTS_SUPPRESSED, 1);
    false
}

/// The clock of flow stamps (created, last seen): CLOCK_MONOTONIC_COARSE (Linux 5.11), a tick's precision at
/// a fraction of the cost, which is plenty for idle timeouts measured in seconds.
#[inline(always)]
fn last_seen_now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}
