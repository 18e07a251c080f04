//! The session table (`FW_SESSIONS`), mapped into the agent's memory: which slot each session
//! holds, claiming and releasing slots, revoking, and reading the kernel's per-session counters.
//!
//! The pinned table is the truth: a handle learns the slots in use by reading it, and claims a
//! free one with a compare-and-swap on its `session_id`, so that no two handles (a restarted
//! agent and the pins it adopted, a tool beside a running agent) ever hand one slot to two
//! sessions.

use std::{
    collections::HashMap,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
    sync::{
        RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use agent_common::SessionSlot;
use aya::maps::MapData;

use super::DatapathError;

/// A session's revocation, as the kernel holds it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Revocation {
    /// CLOCK_MONOTONIC when the agent revoked the session.
    pub revoked_at_ns: u64,
    /// CLOCK_MONOTONIC of the first packet dropped after revocation; zero until then.
    pub first_drop_ns: u64,
}

/// A session's counters, as the kernel holds them. Live traffic is counted per flow; the
/// agent sums a session's flows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SessionStats {
    pub flows_opened: u64,
    /// Flows of the session in the flow table (its per-session budget's count).
    pub live_flows: u64,
    /// Packets of the session dropped after it was revoked, both directions.
    pub dropped_after_revoke_packets: u64,
    pub dropped_after_revoke_bytes: u64,
    /// New flows denied because the session held its budget of live flows.
    pub flow_limit_drops: u64,
}

/// Field offsets of [`SessionSlot`] in u64 words, for atomic access through the mapping.
mod word {
    pub const SESSION_ID: usize = 0;
    pub const REVOKED_AT: usize = 1;
    pub const FIRST_DROP: usize = 2;
    pub const FLOWS_OPENED: usize = 3;
    pub const LIVE_FLOWS: usize = 4;
    pub const DROPPED_PACKETS: usize = 5;
    pub const DROPPED_BYTES: usize = 6;
    pub const FLOW_LIMIT_DROPS: usize = 7;
    pub const COUNT: usize = 8;
}

const _: () = assert!(std::mem::size_of::<SessionSlot>() == word::COUNT * 8);

/// This handle's index of the table: which slot each session holds, as far as it knows
/// (checked against the table on every use), and the slots it believes free.
#[derive(Debug, Default)]
struct Index {
    held: HashMap<u64, u32>,
    /// Lowest last (taken from the end).
    free: Vec<u32>,
}

/// The session table mapped into memory, and this handle's index of it.
///
/// Every method takes `&self`: the table is shared (an `Arc`) by the map writers and by the
/// revocation path, so that revoking a session is one store that waits for no map writer,
/// walk or scan, only for the index's read lock (held for a hash lookup).
pub struct SlotTable {
    base: NonNull<AtomicU64>,
    /// Slots in the table (the map's `max_entries`).
    capacity: u32,
    /// Bytes mapped, for `munmap`.
    mapped: usize,
    index: RwLock<Index>,
    /// The map itself: its fd must stay open while programs that were loaded (or will be)
    /// with it run. `None` for the anonymous memory of unit tests.
    _map: Option<MapData>,
}

// SAFETY: the mapping is shared memory that every access reaches through atomics; the index
// (`held`, `free`) is behind its own lock.
unsafe impl Send for SlotTable {}
// SAFETY: as above: the mapping is only reached through atomics, the index through its lock.
unsafe impl Sync for SlotTable {}

impl Drop for SlotTable {
    fn drop(&mut self) {
        // SAFETY: `base` and `mapped` are exactly what mmap returned and mapped; nothing
        // borrows the mapping past `self`.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.mapped) };
    }
}

impl SlotTable {
    /// Maps the session table and learns which slots are held.
    ///
    /// # Errors
    /// The map is not mappable (a table of another layout) or mmap fails.
    pub(super) fn new(map: MapData, name: &'static str) -> Result<Self, DatapathError> {
        let info = map.info().map_err(|e| DatapathError::SlotTable {
            name,
            message: format!("cannot read the map's info: {e}"),
        })?;
        let capacity = info.max_entries();
        let value_size = info.value_size() as usize;
        if value_size != std::mem::size_of::<SessionSlot>() {
            return Err(DatapathError::SlotTable {
                name,
                message: format!(
                    "its values are {value_size} bytes, this agent's are {}",
                    std::mem::size_of::<SessionSlot>()
                ),
            });
        }
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(4096) as usize;
        let mapped = (capacity as usize * value_size).div_ceil(page) * page;
        // SAFETY: a shared read-write mapping of a BPF_F_MMAPABLE array's values, of no more
        // than their page-rounded size, at offset 0 as the kernel lays it out. The result is
        // checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DatapathError::SlotTable {
                name,
                message: format!(
                    "cannot map it into memory: {} (it must be created with BPF_F_MMAPABLE, \
                     Linux 5.5 or newer)",
                    std::io::Error::last_os_error()
                ),
            });
        }
        let base = NonNull::new(ptr.cast::<AtomicU64>()).ok_or(DatapathError::SlotTable {
            name,
            message: "mmap returned a null mapping".into(),
        })?;
        let table = Self {
            base,
            capacity,
            mapped,
            index: RwLock::default(),
            _map: Some(map),
        };
        table.rescan(&mut table.write());
        Ok(table)
    }

    /// A table over anonymous memory instead of the kernel's map: the same code, without root,
    /// for unit tests and the in-memory datapath.
    ///
    /// # Errors
    /// mmap fails.
    pub(crate) fn in_memory(capacity: u32) -> Result<Self, DatapathError> {
        let mapped = (capacity.max(1) as usize) * std::mem::size_of::<SessionSlot>();
        // SAFETY: a fresh private anonymous mapping, zeroed by the kernel; checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let base = NonNull::new(ptr.cast::<AtomicU64>())
            .filter(|_| ptr != libc::MAP_FAILED)
            .ok_or_else(|| DatapathError::SlotTable {
                name: agent_common::map_names::SESSIONS,
                message: format!(
                    "cannot map {mapped} bytes of memory: {}",
                    std::io::Error::last_os_error()
                ),
            })?;
        let table = Self {
            base,
            capacity: capacity.max(1),
            mapped,
            index: RwLock::default(),
            _map: None,
        };
        table.rescan(&mut table.write());
        Ok(table)
    }

    fn read(&self) -> RwLockReadGuard<'_, Index> {
        // Every change leaves the index usable (it is checked against the table on each use).
        self.index.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Index> {
        self.index.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Rebuilds this handle's index from the table itself.
    fn rescan(&self, index: &mut Index) {
        index.held.clear();
        index.free.clear();
        // Slot 0 is never handed out: a zeroed grant or flow names no session.
        for slot in (1..self.capacity).rev() {
            match self.word(slot, word::SESSION_ID).load(Ordering::Acquire) {
                0 => index.free.push(slot),
                id => {
                    index.held.insert(id, slot);
                }
            }
        }
    }

    fn word(&self, slot: u32, field: usize) -> &AtomicU64 {
        debug_assert!(slot < self.capacity && field < word::COUNT);
        // SAFETY: `slot` < capacity, so the word lies inside the mapping, which lives as long
        // as `self`; the kernel and other handles only touch it atomically (or, for the
        // kernel's counters, with atomic adds), and AtomicU64 has u64's layout.
        unsafe { &*self.base.as_ptr().add(slot as usize * word::COUNT + field) }
    }

    /// Slots in the table, slot 0 (never handed out) included.
    pub fn capacity(&self) -> u32 {
        self.capacity
    }

    /// Slots held by sessions.
    pub fn held(&self) -> usize {
        self.read().held.len()
    }

    /// The slot `session_id` holds, if it holds one.
    pub fn slot_of(&self, session_id: u64) -> Option<u32> {
        self.slot_in(&self.read(), session_id)
    }

    fn slot_in(&self, index: &Index, session_id: u64) -> Option<u32> {
        let slot = *index.held.get(&session_id)?;
        (self.word(slot, word::SESSION_ID).load(Ordering::Acquire) == session_id).then_some(slot)
    }

    /// The slot of `session_id`, claiming a free one when it holds none.
    ///
    /// # Errors
    /// Every slot is held: [`DatapathError::SessionTableFull`]. Nothing is overwritten.
    pub fn claim(&self, session_id: u64) -> Result<u32, DatapathError> {
        if let Some(slot) = self.slot_of(session_id) {
            return Ok(slot);
        }
        let mut index = self.write();
        // Claimed by another caller between the two locks.
        if let Some(slot) = self.slot_in(&index, session_id) {
            return Ok(slot);
        }
        index.held.remove(&session_id);
        if let Some(slot) = self.take_free(&mut index, session_id) {
            return Ok(slot);
        }
        // Another handle may have released slots since this one looked.
        self.rescan(&mut index);
        if let Some(slot) = self.slot_in(&index, session_id) {
            return Ok(slot);
        }
        self.take_free(&mut index, session_id)
            .ok_or(DatapathError::SessionTableFull {
                capacity: self.capacity.saturating_sub(1),
            })
    }

    /// Takes the first slot of the free list that is still free in the table.
    fn take_free(&self, index: &mut Index, session_id: u64) -> Option<u32> {
        while let Some(slot) = index.free.pop() {
            // Released slots were zeroed before their session id was: a claimed slot starts
            // live, with no counts.
            if self
                .word(slot, word::SESSION_ID)
                .compare_exchange(0, session_id, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                index.held.insert(session_id, slot);
                return Some(slot);
            }
        }
        None
    }

    /// Gives the slot of `session_id` back (counters and revocation with it). Only for
    /// sessions that ended and whose grants and flows are gone: a flow that still named the
    /// slot would be dropped (its generation no longer matches), never admitted.
    pub fn release(&self, session_id: u64) {
        let mut index = self.write();
        let Some(slot) = self.slot_in(&index, session_id) else {
            index.held.remove(&session_id);
            return;
        };
        for field in 1..word::COUNT {
            self.word(slot, field).store(0, Ordering::Relaxed);
        }
        self.word(slot, word::SESSION_ID)
            .store(0, Ordering::Release);
        index.held.remove(&session_id);
        index.free.push(slot);
    }

    /// Every session id that holds a slot in the table (read from the table, not this
    /// handle's index): for reconciliation, which releases the slots of sessions the agent no
    /// longer knows.
    pub fn holders(&self) -> Vec<u64> {
        (1..self.capacity)
            .map(|slot| self.word(slot, word::SESSION_ID).load(Ordering::Acquire))
            .filter(|&id| id != 0)
            .collect()
    }

    /// Revokes `session_id`: one store into its slot, seen by the kernel's next packet.
    /// Revoking twice keeps the first revocation's time. A session without a slot has
    /// nothing in the kernel to stop; it gets one (marked revoked) when one is free, so that
    /// the revocation can be read back.
    pub fn revoke(&self, session_id: u64, now_ns: u64) {
        let slot = match self.claim(session_id) {
            Ok(slot) => slot,
            Err(_) => return,
        };
        let _ = self.word(slot, word::REVOKED_AT).compare_exchange(
            0,
            now_ns.max(1),
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    pub fn revocation(&self, session_id: u64) -> Option<Revocation> {
        let slot = self.slot_of(session_id)?;
        self.revocation_at(slot)
    }

    fn revocation_at(&self, slot: u32) -> Option<Revocation> {
        let revoked_at_ns = self.word(slot, word::REVOKED_AT).load(Ordering::Acquire);
        (revoked_at_ns != 0).then(|| Revocation {
            revoked_at_ns,
            first_drop_ns: self.word(slot, word::FIRST_DROP).load(Ordering::Relaxed),
        })
    }

    /// Every revoked session in the table (read from the table, not this handle's index).
    pub fn revoked_sessions(&self) -> Vec<(u64, Revocation)> {
        let mut out = Vec::new();
        for slot in 1..self.capacity {
            let id = self.word(slot, word::SESSION_ID).load(Ordering::Acquire);
            if id != 0
                && let Some(r) = self.revocation_at(slot)
            {
                out.push((id, r));
            }
        }
        out
    }

    pub fn stats(&self, session_id: u64) -> Option<SessionStats> {
        Some(self.stats_at(self.slot_of(session_id)?))
    }

    fn stats_at(&self, slot: u32) -> SessionStats {
        let read = |field| self.word(slot, field).load(Ordering::Relaxed);
        SessionStats {
            flows_opened: read(word::FLOWS_OPENED),
            live_flows: read(word::LIVE_FLOWS),
            dropped_after_revoke_packets: read(word::DROPPED_PACKETS),
            dropped_after_revoke_bytes: read(word::DROPPED_BYTES),
            flow_limit_drops: read(word::FLOW_LIMIT_DROPS),
        }
    }

    /// Every session's counters (read from the table).
    pub fn all_stats(&self) -> HashMap<u64, SessionStats> {
        let mut out = HashMap::new();
        for slot in 1..self.capacity {
            let id = self.word(slot, word::SESSION_ID).load(Ordering::Acquire);
            if id != 0 {
                out.insert(id, self.stats_at(slot));
            }
        }
        out
    }

    /// Counts a dropped packet of a revoked session, as the kernel program does (for tests
    /// of what reads the counters).
    #[cfg(test)]
    pub(crate) fn count_drop(&self, session_id: u64, bytes: u64) {
        if let Some(slot) = self.slot_of(session_id) {
            self.word(slot, word::DROPPED_PACKETS)
                .fetch_add(1, Ordering::Relaxed);
            self.word(slot, word::DROPPED_BYTES)
                .fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// Counts a flow the agent wrote into the flow table against its session's budget.
    pub fn flow_added(&self, slot: u32, session_id: u64) {
        if slot < self.capacity
            && self.word(slot, word::SESSION_ID).load(Ordering::Acquire) == session_id
        {
            self.word(slot, word::LIVE_FLOWS)
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Gives a removed flow's place in its session's budget back. Never below zero: a count
    /// that drifted (flows removed behind the agent's back) must not wrap into a budget
    /// that denies every flow.
    pub fn flow_removed(&self, slot: u32, session_id: u64) {
        if slot < self.capacity
            && slot != 0
            && self.word(slot, word::SESSION_ID).load(Ordering::Acquire) == session_id
        {
            let _ = self.word(slot, word::LIVE_FLOWS).fetch_update(
                Ordering::Relaxed,
                Ordering::Relaxed,
                |n| n.checked_sub(1),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(capacity: u32) -> SlotTable {
        SlotTable::in_memory(capacity).unwrap()
    }

    #[test]
    fn slot_zero_is_never_handed_out_and_a_full_table_refuses() {
        let t = table(4);
        let slots: Vec<u32> = (1..=3).map(|id| t.claim(id).unwrap()).collect();
        assert_eq!(slots, [1, 2, 3]);
        assert_eq!(t.claim(2).unwrap(), 2, "a session keeps its slot");
        let err = t.claim(9).unwrap_err().to_string();
        assert!(err.contains("session_slots"), "{err}");
        assert_eq!(t.slot_of(9), None, "a refusal claims nothing");
        for id in 1..=3 {
            assert_eq!(
                t.slot_of(id),
                Some(slots[id as usize - 1]),
                "nothing overwritten"
            );
        }
    }

    #[test]
    fn a_released_slot_comes_back_clean_for_the_next_session() {
        let t = table(2);
        let slot = t.claim(7).unwrap();
        t.revoke(7, 100);
        t.flow_added(slot, 7);
        assert_eq!(t.revocation(7).unwrap().revoked_at_ns, 100);
        t.revoke(7, 200);
        assert_eq!(
            t.revocation(7).unwrap().revoked_at_ns,
            100,
            "revoking twice keeps the first time"
        );
        t.release(7);
        assert_eq!(t.revocation(7), None);
        assert_eq!(t.claim(8).unwrap(), slot);
        assert_eq!(t.revocation(8), None, "the next session starts live");
        assert_eq!(t.stats(8).unwrap(), SessionStats::default());
    }

    #[test]
    fn a_second_handle_learns_the_held_slots_from_the_table() {
        let first = table(8);
        first.claim(1).unwrap();
        first.claim(2).unwrap();
        first.revoke(2, 5);
        // A second handle over the same memory, as a restarted agent over the pinned map.
        let second = SlotTable {
            base: first.base,
            capacity: first.capacity,
            mapped: 0,
            index: RwLock::default(),
            _map: None,
        };
        second.rescan(&mut second.write());
        assert_eq!(second.slot_of(1), first.slot_of(1));
        assert!(second.revocation(2).is_some());
        let fresh = second.claim(3).unwrap();
        assert!(fresh != first.slot_of(1).unwrap() && fresh != first.slot_of(2).unwrap());
        // The first handle's free list is stale: its claim must skip the slot taken.
        let other = first.claim(4).unwrap();
        assert_ne!(other, fresh, "two handles handed out one slot");
        std::mem::forget(second);
    }

    #[test]
    fn the_flow_budget_count_never_wraps_below_zero() {
        let t = table(2);
        let slot = t.claim(5).unwrap();
        t.flow_removed(slot, 5);
        assert_eq!(t.stats(5).unwrap().live_flows, 0);
        t.flow_added(slot, 5);
        t.flow_added(slot, 6);
        assert_eq!(
            t.stats(5).unwrap().live_flows,
            1,
            "another session's flow is not counted"
        );
    }
}
