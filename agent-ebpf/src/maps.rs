//! Every map of the kernel programs, pinned by name so a restarted agent adopts them.
//!
//! `#[map(name = ...)]` takes only a string literal: each one here must equal its constant in
//! `agent_common::map_names`, and the agent's `map_names_match_the_object` test holds the
//! built object to that list.

use agent_common::{
    Event, Flow, FlowKey, Grant, GrantKey, RateWindow, ResourceDst, ResourcePort, SessionSlot,
    map_sizes,
};
use aya_ebpf::{
    bindings::BPF_F_MMAPABLE,
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};

#[map(name = "FW_RES_PORTS")]
pub static RESOURCE_PORTS: Array<ResourcePort> = Array::pinned(map_sizes::RESOURCE_PORTS, 0);

#[map(name = "FW_RES_DSTS")]
pub static RESOURCE_DSTS: LpmTrie<ResourceDst, u32> = LpmTrie::pinned(map_sizes::RESOURCE_DSTS, 0);

// Preallocated: writing and withdrawing grants in bulk (admissions, policy changes) is what
// this table sees most, and the on-demand allocator made both slower (see map_sizes::GRANTS).
#[map(name = "FW_GRANTS")]
pub static GRANTS: HashMap<GrantKey, Grant> = HashMap::pinned(map_sizes::GRANTS, 0);

// A plain (preallocated) hash, not LRU: a full table denies new flows instead of evicting
// live ones, and an entry only leaves when the agent removes it.
#[map(name = "FW_FLOWS")]
pub static FLOWS: HashMap<FlowKey, Flow> = HashMap::pinned(map_sizes::FLOWS, 0);

// An array, so the verifier inlines its lookups (no helper call, no hashing); mappable, so
// the agent claims, revokes and reads slots with plain memory operations. Never evicts: a
// full table refuses admissions in user space.
#[map(name = "FW_SESSIONS")]
pub static SESSIONS: Array<SessionSlot> = Array::pinned(map_sizes::SESSIONS, BPF_F_MMAPABLE);

#[map(name = "FW_STATS")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(map_sizes::STATS, 0);

#[map(name = "FW_EVENTS")]
pub static EVENTS: RingBuf = RingBuf::pinned(map_sizes::EVENTS_BYTES, 0);

#[map(name = "FW_CONFIG")]
pub static CONFIG: Array<u32> = Array::pinned(map_sizes::CONFIG, 0);

#[map(name = "FW_DENY_RATE")]
pub static DENY_RATE: PerCpuArray<RateWindow> = PerCpuArray::pinned(1, 0);

/// When each CPU last logged each kind of drop (`kernel_log::RATE_SLOTS`). Never pinned: it
/// only paces log records, and a fresh one merely lets the next drop of a kind be logged.
#[map(name = "FW_LOG_RATE")]
pub static LOG_RATE: PerCpuArray<u64> =
    PerCpuArray::with_max_entries(agent_common::kernel_log::RATE_SLOTS, 0);

/// Benchmark reference map, never pinned: one lookup per packet for the floor program.
#[map(name = "FW_BENCH")]
pub static BENCH_FLOOR: HashMap<FlowKey, u64> =
    HashMap::with_max_entries(map_sizes::BENCH_FLOOR, 0);

/// Adds `n` to a global per-CPU counter.
#[inline(always)]
pub fn count(index: u32, n: u64) {
    if let Some(slot) = STATS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot is only touched by this CPU while the program runs.
        unsafe { *slot += n };
    }
}

/// Whether the operator switched the datapath to monitor mode.
#[inline(always)]
pub fn monitor_mode() -> bool {
    matches!(CONFIG.get(agent_common::config::MODE), Some(&m) if m == agent_common::config::MODE_MONITOR)
}

/// Reports an event to user space; a full ring buffer is counted, never waited on.
#[inline(always)]
pub fn emit(event: Event) {
    match EVENTS.reserve::<Event>(0) {
        Some(mut entry) => {
            entry.write(event);
            entry.submit(0);
        }
        None => count(agent_common::stat::EVENTS_LOST, 1),
    }
}

/// Adds `n` to a counter that several CPUs may update at once (BPF atomic add, no fetch).
///
/// # Safety
/// `counter` must point into a map value that lives for the rest of the program run.
#[inline(always)]
pub unsafe fn atomic_add(counter: *mut u64, n: u64) {
    // SAFETY: the caller guarantees the pointer; the result is unused, so this is a plain
    // BPF_ATOMIC add that every kernel with eBPF supports.
    unsafe {
        core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
            counter, n,
        )
    };
}
