//! Log records for the rare events an operator should hear about at once (aya-log, read by
//! the agent into its `tracing` stream). Never on the path of an admitted packet.
//!
//! A drop is logged the first time a CPU sees its reason, then at most once a minute per CPU
//! and reason: a record says that something started happening, the counters (`flowwarden
//! status`, metrics) count every packet. The first drop of a revoked session is logged once
//! per session, as it is already reported once.

use agent_common::{FlowKey, kernel_log, stat};
use aya_ebpf::helpers::bpf_ktime_get_ns;
use aya_log_ebpf::{debug, info, warn};

use crate::maps::LOG_RATE;

/// aya-log's macros take a program context that they do not use (aya-log-ebpf 0.2): the
/// records go to its own ring buffer. The verdict code has no context to give, so this
/// stands in.
const NO_CTX: () = ();

/// Whether this CPU may log a drop of `reason` at `now`; stamps the slot when it may.
#[inline(always)]
fn allowed(reason: u32, now: u64) -> bool {
    let Some(last) = LOG_RATE.get_ptr_mut(reason) else {
        return false;
    };
    // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < kernel_log::INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// A packet whose headers claim IP/TCP/UDP but do not parse.
///
/// A function of its own, called from the program's entry: the record's arguments and
/// aya-log's buffers live in its frame, not in the entry's, which the verifier adds to every
/// call chain under its 512-byte limit.
#[inline(never)]
pub fn malformed(ifindex: u32, len: u64, monitor: bool) {
    // SAFETY: a helper without arguments.
    if !allowed(stat::DROP_MALFORMED, unsafe { bpf_ktime_get_ns() }) {
        return;
    }
    if monitor {
        warn!(
            &NO_CTX,
            target: kernel_log::TARGET,
            "monitor mode: would drop a malformed packet on ifindex {} ({} bytes): its IP/TCP/UDP headers do not parse; counted as malformed, logged at most once a minute per CPU",
            ifindex,
            len
        );
    } else {
        warn!(
            &NO_CTX,
            target: kernel_log::TARGET,
            "dropped a malformed packet on ifindex {} ({} bytes): its IP/TCP/UDP headers do not parse; counted as malformed, logged at most once a minute per CPU",
            ifindex,
            len
        );
    }
}

/// A new flow to a resource that was denied: the flow table was full or its session held its
/// budget of live flows (warn: the operator may have to act), or no grant admits it (debug: the audit log already has these).
#[inline(always)]
pub fn denied(reason: u32, key: &FlowKey, resource_id: u32, monitor: bool, now: u64) {
    if reason == stat::DROP_FLOW_TABLE_FULL {
        if !allowed(reason, now) {
            return;
        }
        if monitor {
            warn!(
                &NO_CTX,
                target: kernel_log::TARGET,
                "monitor mode: the flow table is full; would deny the new flow {:i}:{} -> {:i}:{} (resource {}); raise [datapath] flow_table_size",
                key.src,
                key.sport,
                key.dst,
                key.dport,
                resource_id
            );
        } else {
            warn!(
                &NO_CTX,
                target: kernel_log::TARGET,
                "the flow table is full: denied the new flow {:i}:{} -> {:i}:{} (resource {}); raise [datapath] flow_table_size",
                key.src,
                key.sport,
                key.dst,
                key.dport,
                resource_id
            );
        }
    } else if reason == stat::DROP_SESSION_FLOW_LIMIT {
        if allowed(reason, now) {
            warn!(
                &NO_CTX,
                target: kernel_log::TARGET,
                "a session holds its budget of live flows: denied the new flow {:i}:{} -> {:i}:{} (resource {}); monitor mode {}; raise [datapath] session_flow_limit if this session is legitimate",
                key.src,
                key.sport,
                key.dst,
                key.dport,
                resource_id,
                monitor as u8
            );
        }
    } else if allowed(reason, now) {
        debug!(
            &NO_CTX,
            target: kernel_log::TARGET,
            "no grant admits {:i}:{} -> {:i}:{} (resource {}); monitor mode {}",
            key.src,
            key.sport,
            key.dst,
            key.dport,
            resource_id,
            monitor as u8
        );
    }
}

/// The first packet dropped for a revoked session: the revocation took hold.
#[inline(always)]
pub fn first_revoked_drop(session_id: u64, key: &FlowKey, resource_id: u32) {
    // Big-endian bytes print as the 16 hex digits of the session id that the CLI shows.
    let session = session_id.to_be_bytes();
    info!(
        &NO_CTX,
        target: kernel_log::TARGET,
        "session {:x} is revoked: dropped its first packet since, {:i}:{} -> {:i}:{} (resource {})",
        &session,
        key.src,
        key.sport,
        key.dst,
        key.dport,
        resource_id
    );
}
