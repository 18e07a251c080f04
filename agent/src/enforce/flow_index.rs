//! The flows of each session, kept beside the kernel's flow table: terminating or listing one
//! session then costs what that session holds, not what the table holds (a walk over a
//! million flows takes half a second).
//!
//! Fed by the kernel's flow-opened events and by every census walk, and emptied as the agent
//! removes flows. A walk also reconciles it: what the walk did not meet, and nothing opened
//! since the walk began, is gone from the kernel and leaves the index. Until a first walk
//! has completed (at start, flows opened under an earlier agent are known only to the
//! kernel) the index answers "unknown", and callers walk the table instead.
//!
//! The index may briefly hold a flow that is already gone (a removal racing a walk's chunk);
//! callers check each flow against the kernel before acting on it. It may also lack a flow
//! whose event is still on its way: see [`FlowIndex::flows_of`].
//!
//! Memory: each session's flows are one allocation sized to them (`SessionFlows`): the
//! session's addresses, then one 8-byte word per flow in flow order, found by binary search.
//! A flow's word names its two addresses by their place in that list, so a session may name
//! 256 addresses; past that its lookups walk the table. A session keeps room for an eighth
//! more flows (a quarter once flows have gone), and an insertion moves at most its own flows
//! (4,096 under the default `session_flow_limit`). 100,000 sessions of ten flows (one source,
//! two destinations) take 17 MiB, 18 bytes a flow with the session map, against 38 MiB with a
//! hash map per session; the walk generation stamped on each flow is a byte (see `vouched`).

use std::{
    hash::BuildHasherDefault,
    sync::{Mutex, MutexGuard},
};

use super::census::IdHasher;
use crate::{
    datapath::{Flow, FlowKey},
    sessions::model::SessionId,
};

/// Flows handed over by a walk per hold of the index lock: a fraction of a millisecond, so a
/// termination looking up its flows meanwhile waits at most that long.
pub const WALK_BATCH: usize = 1024;
/// Sessions pruned per hold of the index lock after a walk.
const PRUNE_SLICE: usize = 1024;
/// Addresses one session's flows may name: an entry names each of its two by a byte.
const MAX_ADDRS: u16 = 256;
/// How far the newest walk generation may run ahead of the oldest walk still under way; see
/// [`vouched`].
const REACH: u8 = 64;

/// Whether `stamp` is the walk generation `mark` or a later one.
///
/// Generations are a byte, so that an entry and its stamp fit a word, and they wrap: `stamp`
/// counts as at or after `mark` when it lies 0 to 127 generations ahead of it (modulo 256).
/// That is exact wherever a flow still in the kernel could be pruned. The walk that prunes
/// met every such flow and stamped it with its mark unless it found a later stamp, and later
/// stamps come from other walks and flow-opened events while it runs: from generations at
/// most [`REACH`] past its own, since [`FlowIndex::walk_started`] does not let the newest
/// generation run further ahead of the oldest walk under way (a walk starting then shares the
/// newest generation, which can only keep more). Walks overlap by a sweep's and a read's
/// census or two, so that cap is seldom reached.
///
/// What can be misjudged is a stamp more than 127 generations behind, left by walks that all
/// failed part way before reaching the entry (a completed walk meets or prunes every entry).
/// If the flow is still in the kernel, the walk that meets it and its pruning compare the
/// same two generations and agree: it stays. If it is gone, it may stay too, a stale flow,
/// until a completed walk's mark falls within reach of its stamp again (at most 256
/// generations on). Callers already expect stale flows: every flow the index gives is looked
/// up in the kernel, owner included, before anything is done with it (`Enforcer::flows_of`,
/// which `flows.list`, socket teardown and lock counts go through).
fn vouched(stamp: u8, mark: u8) -> bool {
    stamp.wrapping_sub(mark) as i8 >= 0
}

/// One flow of a session in a word: the flow in the high 56 bits (source port, destination
/// port, its two addresses as places in the session's address list, protocol) and in the low
/// byte the walk generation that last vouched for it. Words order by flow, whatever their
/// stamps. 8 bytes instead of the key's 40: a million flows stay a small part of the agent's
/// memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry(u64);

impl Entry {
    fn new(flow: u64, stamp: u8) -> Self {
        Self((flow << 8) | u64::from(stamp))
    }

    /// The flow, as [`SessionFlows::pack`] gives it.
    fn flow(self) -> u64 {
        self.0 >> 8
    }

    fn stamp(self) -> u8 {
        self.0 as u8
    }
}

/// An address as two words, the form a session keeps it in.
fn to_words(addr: &[u8; 16]) -> [u64; 2] {
    let n = u128::from_ne_bytes(*addr);
    [n as u64, (n >> 64) as u64]
}

fn from_words(lo: u64, hi: u64) -> [u8; 16] {
    (u128::from(lo) | (u128::from(hi) << 64)).to_ne_bytes()
}

/// Words to allocate for `used` words in use, `entries` of them entries: room for an eighth
/// more entries (growth costs a copy per eighth, not a doubling of the memory), and an odd
/// count, which fills its allocator chunk (glibc's are 16-byte multiples with an 8-byte
/// header).
fn sized(used: usize, entries: usize) -> usize {
    (used + entries / 8) | 1
}

/// One session's flows, in one allocation sized to them: `words` holds the session's
/// addresses (two words each), then its entries ([`Entry`]) in flow order, then room for a
/// few more entries. 24 bytes here, and about 8 bytes a flow and 16 an address there.
#[derive(Debug, Default)]
struct SessionFlows {
    words: Box<[u64]>,
    /// Entries held.
    len: u32,
    /// Addresses held, at most [`MAX_ADDRS`].
    addrs: u16,
    /// The session's flows name more addresses than an entry can: its entries are
    /// incomplete and lookups walk the table instead.
    overflowed: bool,
}

impl SessionFlows {
    fn addr_words(&self) -> usize {
        2 * usize::from(self.addrs)
    }

    fn len(&self) -> usize {
        self.len as usize
    }

    fn entries(&self) -> &[u64] {
        &self.words[self.addr_words()..][..self.len()]
    }

    /// The place of `addr` in the session's address list.
    fn place(&self, addr: &[u8; 16]) -> Option<u8> {
        let want = to_words(addr);
        self.words[..self.addr_words()]
            .chunks_exact(2)
            .position(|w| w == want.as_slice())
            .and_then(|i| u8::try_from(i).ok())
    }

    fn addr(&self, place: u8) -> [u8; 16] {
        let i = 2 * usize::from(place);
        from_words(self.words[i], self.words[i + 1])
    }

    fn intern(&mut self, addr: &[u8; 16]) -> Option<u8> {
        if let Some(i) = self.place(addr) {
            return Some(i);
        }
        if self.addrs == MAX_ADDRS {
            return None;
        }
        let i = u8::try_from(self.addrs).ok()?;
        self.reserve(2);
        let (a, n) = (self.addr_words(), self.len());
        self.words.copy_within(a..a + n, a + 2);
        self.words[a..a + 2].copy_from_slice(&to_words(addr));
        self.addrs += 1;
        Some(i)
    }

    /// A flow in 56 bits, its addresses at these places in the session's list.
    fn pack(key: &FlowKey, src: u8, dst: u8) -> u64 {
        (u64::from(key.sport) << 40)
            | (u64::from(key.dport) << 24)
            | (u64::from(src) << 16)
            | (u64::from(dst) << 8)
            | u64::from(key.proto)
    }

    fn unpack(&self, flow: u64) -> FlowKey {
        FlowKey {
            src: self.addr((flow >> 16) as u8),
            dst: self.addr((flow >> 8) as u8),
            sport: (flow >> 40) as u16,
            dport: (flow >> 24) as u16,
            proto: flow as u8,
            _pad: [0; 3],
        }
    }

    /// Where `flow` is among the entries, or where it would go.
    fn search(&self, flow: u64) -> Result<usize, usize> {
        self.entries()
            .binary_search_by_key(&flow, |w| Entry(*w).flow())
    }

    /// Room for `more` words past those in use.
    fn reserve(&mut self, more: usize) {
        let used = self.addr_words() + self.len();
        if used + more > self.words.len() {
            self.resize(sized(used + more, self.len()));
        }
    }

    /// Gives back the room of entries gone, once it is more than a quarter of those left.
    fn fit(&mut self) {
        let used = self.addr_words() + self.len();
        if self.words.len() - used > 2 + self.len() / 4 {
            self.resize(sized(used, self.len()));
        }
    }

    /// Reallocates to `n` words (at least those in use), keeping those in use.
    fn resize(&mut self, n: usize) {
        let used = self.addr_words() + self.len();
        let mut words = std::mem::take(&mut self.words).into_vec();
        words.truncate(used);
        // Exactly `n`: `resize` alone would round the capacity up to a doubling.
        words.reserve_exact(n.saturating_sub(used));
        words.resize(n, 0);
        self.words = words.into_boxed_slice();
    }

    /// Records `key` as vouched for by `generation` (a later stamp is never lowered).
    fn note(&mut self, key: &FlowKey, generation: u8) {
        if self.words.is_empty() {
            // A session's first flow brings its two addresses: room for them and the flow.
            self.resize(5);
        }
        let (Some(src), Some(dst)) = (self.intern(&key.src), self.intern(&key.dst)) else {
            self.overflowed = true;
            return;
        };
        let flow = Self::pack(key, src, dst);
        let a = self.addr_words();
        match self.search(flow) {
            Ok(i) => {
                let word = &mut self.words[a + i];
                if !vouched(Entry(*word).stamp(), generation) {
                    *word = Entry::new(flow, generation).0;
                }
            }
            Err(i) => {
                self.reserve(1);
                let n = self.len();
                self.words.copy_within(a + i..a + n, a + i + 1);
                self.words[a + i] = Entry::new(flow, generation).0;
                self.len += 1;
            }
        }
    }

    fn remove(&mut self, key: &FlowKey) {
        let (Some(src), Some(dst)) = (self.place(&key.src), self.place(&key.dst)) else {
            return;
        };
        if let Ok(i) = self.search(Self::pack(key, src, dst)) {
            let (a, n) = (self.addr_words(), self.len());
            self.words.copy_within(a + i + 1..a + n, a + i);
            self.len -= 1;
            if !self.is_empty() {
                self.fit();
            }
        }
    }

    /// Drops the entries that the walk of `mark` did not vouch for.
    fn prune(&mut self, mark: u8) {
        let (a, n) = (self.addr_words(), self.len());
        let mut kept = 0;
        for i in a..a + n {
            let word = self.words[i];
            if vouched(Entry(word).stamp(), mark) {
                self.words[a + kept] = word;
                kept += 1;
            }
        }
        self.len = u32::try_from(kept).unwrap_or(u32::MAX);
        // An emptied session is dropped whole by the caller.
        if !self.is_empty() {
            self.fit();
        }
    }

    fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn keys(&self) -> Vec<FlowKey> {
        self.entries()
            .iter()
            .map(|w| self.unpack(Entry(*w).flow()))
            .collect()
    }
}

/// Bytes a std `HashMap` (hashbrown) allocates for `capacity` entries of `entry` bytes:
/// buckets a power of two at most 7/8 full, a control byte each and a group of 16 more.
fn table_bytes(capacity: usize, entry: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        (capacity + 1).next_power_of_two()
    } else {
        (capacity * 8 / 7).next_power_of_two()
    };
    buckets * (entry + 1) + 16
}

type Sessions = std::collections::HashMap<SessionId, SessionFlows, BuildHasherDefault<IdHasher>>;

#[derive(Debug)]
struct Inner {
    sessions: Sessions,
    /// The newest walk's generation. A flow opened now carries it: the walk under way may
    /// have passed its slot already, so only a later walk may judge it gone.
    generation: u8,
    /// Walks under way, by generation (see [`vouched`]).
    running: [u32; 256],
    /// A walk over the whole table has completed: flows opened before the agent started
    /// (known to the kernel only) are in.
    reconciled: bool,
}

impl Default for Inner {
    fn default() -> Self {
        Self {
            sessions: Sessions::default(),
            generation: 0,
            running: [0; 256],
            reconciled: false,
        }
    }
}

/// A walk under way, from [`FlowIndex::walk_started`]; dropped without
/// [`FlowIndex::walk_done`] when the walk failed part way.
#[derive(Debug)]
pub struct WalkMark<'a> {
    index: &'a FlowIndex,
    generation: u8,
}

impl Drop for WalkMark<'_> {
    fn drop(&mut self) {
        let mut inner = self.index.inner();
        let running = &mut inner.running[usize::from(self.generation)];
        *running = running.saturating_sub(1);
    }
}

/// Session → its flows in the kernel. See the module documentation.
#[derive(Debug, Default)]
pub struct FlowIndex {
    inner: Mutex<Inner>,
}

impl FlowIndex {
    pub fn new() -> Self {
        Self::default()
    }

    fn inner(&self) -> MutexGuard<'_, Inner> {
        // Every update leaves the index consistent; a panic elsewhere cannot half-write it.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The kernel opened a flow of `session` (its flow-opened event).
    pub fn opened(&self, session: SessionId, key: &FlowKey) {
        let mut inner = self.inner();
        let generation = inner.generation;
        inner
            .sessions
            .entry(session)
            .or_default()
            .note(key, generation);
    }

    /// The agent removed these flows from the kernel.
    pub fn removed(&self, flows: &[(FlowKey, Flow)]) {
        if flows.is_empty() {
            return;
        }
        let mut inner = self.inner();
        for (key, flow) in flows {
            let id = SessionId(flow.session_id);
            let Some(s) = inner.sessions.get_mut(&id) else {
                continue;
            };
            s.remove(key);
            if s.is_empty() && !s.overflowed {
                inner.sessions.remove(&id);
            }
        }
    }

    /// A walk over the whole table begins: hand it every flow met with
    /// [`FlowIndex::walked`], then end it with [`FlowIndex::walk_done`] (or drop the mark
    /// if the walk failed part way: nothing is pruned then).
    pub fn walk_started(&self) -> WalkMark<'_> {
        let mut inner = self.inner();
        let newest = inner.generation;
        // The oldest walk under way, as generations behind the newest.
        let behind = (0..=u8::MAX)
            .rev()
            .find(|&age| inner.running[usize::from(newest.wrapping_sub(age))] > 0);
        if behind.is_none_or(|age| age < REACH) {
            inner.generation = newest.wrapping_add(1);
        }
        let generation = inner.generation;
        inner.running[usize::from(generation)] += 1;
        WalkMark {
            index: self,
            generation,
        }
    }

    /// Flows a walk met: (key, session), a batch of up to [`WALK_BATCH`] at a time.
    pub fn walked(&self, mark: &WalkMark<'_>, flows: &[(FlowKey, u64)]) {
        let mut inner = self.inner();
        for (key, session) in flows {
            inner
                .sessions
                .entry(SessionId(*session))
                .or_default()
                .note(key, mark.generation);
        }
    }

    /// The walk met every flow: entries it did not vouch for, and that nothing opened since
    /// it began, are gone from the kernel. Pruned a slice of sessions at a time, so lookups
    /// meanwhile are not held up behind a million entries.
    pub fn walk_done(&self, mark: WalkMark<'_>) {
        let ids: Vec<SessionId> = self.inner().sessions.keys().copied().collect();
        for slice in ids.chunks(PRUNE_SLICE) {
            let mut inner = self.inner();
            for id in slice {
                let Some(s) = inner.sessions.get_mut(id) else {
                    continue;
                };
                s.prune(mark.generation);
                if s.is_empty() {
                    inner.sessions.remove(id);
                }
            }
        }
        self.inner().reconciled = true;
    }

    /// The keys of `session`'s flows, or `None` when the index cannot tell (no walk has
    /// completed since the agent started, or the session's flows overflowed the packing):
    /// the caller walks the table then.
    ///
    /// A flow opened a moment ago may still be on its way from the kernel's event ring; a
    /// revoked session opens no new flow, so a caller that needs every flow of a revoked
    /// session asks again once the events of the moment have been read.
    pub fn flows_of(&self, session: SessionId) -> Option<Vec<FlowKey>> {
        let inner = self.inner();
        if !inner.reconciled {
            return None;
        }
        match inner.sessions.get(&session) {
            None => Some(Vec::new()),
            Some(s) if s.overflowed => None,
            Some(s) => Some(s.keys()),
        }
    }

    /// Flows held, over all sessions (for tests and benchmarks).
    pub fn len(&self) -> usize {
        self.inner().sessions.values().map(SessionFlows::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the index holds on the heap, from its capacities: the session map's table and
    /// each session's words (not the allocator's own headers and rounding).
    pub fn heap_bytes(&self) -> usize {
        let inner = self.inner();
        let table = table_bytes(
            inner.sessions.capacity(),
            size_of::<(SessionId, SessionFlows)>(),
        );
        let words: usize = inner.sessions.values().map(|s| s.words.len()).sum();
        table + words * size_of::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: u8, sport: u16, dst: u8) -> FlowKey {
        let mut k = FlowKey {
            sport,
            dport: 22,
            proto: agent_common::IPPROTO_TCP,
            ..FlowKey::default()
        };
        // Sources and destinations never share an address.
        k.src[14] = src;
        k.dst[15] = dst;
        k
    }

    fn flow(session: u64) -> Flow {
        Flow {
            session_id: session,
            ..Flow::default()
        }
    }

    fn sorted(mut v: Vec<FlowKey>) -> Vec<FlowKey> {
        v.sort_by_key(|k| (k.src, k.sport, k.dst));
        v
    }

    /// A completed walk over nothing: the index is reconciled and answers.
    fn reconciled() -> FlowIndex {
        let index = FlowIndex::new();
        let mark = index.walk_started();
        index.walk_done(mark);
        index
    }

    #[test]
    fn unknown_until_a_walk_has_completed() {
        let index = FlowIndex::new();
        index.opened(SessionId(7), &key(1, 1000, 9));
        assert_eq!(index.flows_of(SessionId(7)), None, "before any walk");
        let mark = index.walk_started();
        index.walked(&mark, &[(key(1, 1001, 9), 7)]);
        assert_eq!(
            index.flows_of(SessionId(7)),
            None,
            "while the first walk runs"
        );
        index.walk_done(mark);
        // The event's flow was opened before the walk began and the walk did not meet it:
        // it is gone from the kernel.
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1001, 9)]));
    }

    #[test]
    fn each_session_gets_its_own_flows_back() {
        let index = reconciled();
        index.opened(SessionId(7), &key(1, 1000, 9));
        index.opened(SessionId(7), &key(1, 1001, 9));
        index.opened(SessionId(8), &key(2, 1000, 9));
        index.opened(SessionId(7), &key(1, 1000, 9));
        assert_eq!(
            sorted(index.flows_of(SessionId(7)).unwrap()),
            vec![key(1, 1000, 9), key(1, 1001, 9)]
        );
        assert_eq!(index.flows_of(SessionId(8)), Some(vec![key(2, 1000, 9)]));
        assert_eq!(index.flows_of(SessionId(9)), Some(Vec::new()));
        assert_eq!(index.len(), 3);
    }

    #[test]
    fn removed_flows_leave_and_an_emptied_session_goes() {
        let index = reconciled();
        index.opened(SessionId(7), &key(1, 1000, 9));
        index.opened(SessionId(7), &key(1, 1001, 9));
        index.removed(&[(key(1, 1000, 9), flow(7)), (key(5, 5, 5), flow(7))]);
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1001, 9)]));
        // Removed under another session's id: not this session's flow.
        index.removed(&[(key(1, 1001, 9), flow(8))]);
        assert_eq!(index.len(), 1);
        index.removed(&[(key(1, 1001, 9), flow(7))]);
        assert!(index.is_empty());
        assert_eq!(
            index.inner().sessions.len(),
            0,
            "no empty session entry left"
        );
    }

    #[test]
    fn a_walk_prunes_what_it_did_not_meet_but_keeps_what_opened_meanwhile() {
        let index = reconciled();
        index.opened(SessionId(7), &key(1, 1000, 9)); // gone before the walk
        index.opened(SessionId(7), &key(1, 1001, 9)); // still there
        let mark = index.walk_started();
        index.opened(SessionId(7), &key(1, 1002, 9)); // opened behind the walk
        index.walked(&mark, &[(key(1, 1001, 9), 7), (key(3, 1, 9), 8)]);
        index.walk_done(mark);
        assert_eq!(
            sorted(index.flows_of(SessionId(7)).unwrap()),
            vec![key(1, 1001, 9), key(1, 1002, 9)]
        );
        assert_eq!(index.flows_of(SessionId(8)), Some(vec![key(3, 1, 9)]));
    }

    #[test]
    fn overlapping_walks_never_prune_a_flow_the_newer_one_vouched_for() {
        let index = reconciled();
        let old = index.walk_started();
        let new = index.walk_started();
        index.walked(&new, &[(key(1, 1000, 9), 7)]);
        // The older walk meets the same flow later: its stamp must not go back.
        index.walked(&old, &[(key(1, 1000, 9), 7)]);
        index.walk_done(new);
        index.walk_done(old);
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1000, 9)]));
    }

    #[test]
    fn generations_wrap_and_a_walk_still_prunes_only_what_it_did_not_meet() {
        let index = reconciled();
        index.opened(SessionId(7), &key(1, 1000, 9));
        // More walks than a generation byte counts, each meeting the flow.
        for _ in 0..600 {
            let mark = index.walk_started();
            index.walked(&mark, &[(key(1, 1000, 9), 7)]);
            index.walk_done(mark);
        }
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1000, 9)]));
        index.opened(SessionId(7), &key(1, 1001, 9));
        let mark = index.walk_started();
        index.opened(SessionId(7), &key(1, 1002, 9));
        index.walked(&mark, &[(key(1, 1000, 9), 7)]);
        index.walk_done(mark);
        assert_eq!(
            index.flows_of(SessionId(7)),
            Some(vec![key(1, 1000, 9), key(1, 1002, 9)]),
            "the flow opened before the walk and not met is gone; the one opened behind it stays"
        );
    }

    #[test]
    fn a_long_walk_keeps_what_the_walks_overtaking_it_vouched_for() {
        let index = reconciled();
        let slow = index.walk_started();
        index.walked(&slow, &[(key(1, 1000, 9), 7)]);
        // More walks than half a generation byte start and end while the slow one runs; each
        // stamps the flow with its own, newer generation.
        for _ in 0..200 {
            let mark = index.walk_started();
            index.walked(&mark, &[(key(1, 1000, 9), 7)]);
            index.walk_done(mark);
        }
        index.walk_done(slow);
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1000, 9)]));
        // Once the slow walk is over, generations move on again: a flow gone is pruned.
        index.opened(SessionId(7), &key(1, 1001, 9));
        let mark = index.walk_started();
        index.walked(&mark, &[(key(1, 1000, 9), 7)]);
        index.walk_done(mark);
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1000, 9)]));
    }

    #[test]
    fn an_emptied_session_gives_its_room_back() {
        let index = reconciled();
        for sport in 0..1000 {
            index.opened(SessionId(7), &key(1, sport, 9));
        }
        index.opened(SessionId(8), &key(2, 1, 9));
        let full = index.heap_bytes();
        let doomed: Vec<(FlowKey, Flow)> = (0..990).map(|p| (key(1, p, 9), flow(7))).collect();
        index.removed(&doomed);
        assert_eq!(
            sorted(index.flows_of(SessionId(7)).unwrap()),
            (990..1000).map(|p| key(1, p, 9)).collect::<Vec<_>>()
        );
        let after = index.heap_bytes();
        assert!(
            full - after >= 990 * 8 * 3 / 4,
            "{full} bytes with 1,000 flows, {after} with 10"
        );
    }

    /// 100,000 sessions of ten flows each (one source, two destinations), handed over the
    /// way the first walk does: a batch at a time, every session growing a flow per round.
    /// The heap figure is from capacities; the RSS difference (printed) also holds the
    /// allocator's headers and what growth left behind, and whatever ran meanwhile.
    #[test]
    fn a_flow_costs_its_word_and_a_session_little_more() {
        const SESSIONS: u64 = 100_000;
        const FLOWS: u16 = 10;
        let rss = || -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            let pages: usize = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            pages * 4096
        };
        let before = rss();
        let index = reconciled();
        // Session ids are random; spread these as the CSPRNG would.
        let id = |i: u64| (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        let mark = index.walk_started();
        let mut batch = Vec::with_capacity(WALK_BATCH);
        for round in 0..FLOWS {
            for i in 0..SESSIONS {
                let mut k = key(0, 1024 + round, u8::from(round % 2 == 1));
                k.src[..8].copy_from_slice(&i.to_be_bytes());
                batch.push((k, id(i)));
                if batch.len() == WALK_BATCH {
                    index.walked(&mark, &batch);
                    batch.clear();
                }
            }
        }
        index.walked(&mark, &batch);
        index.walk_done(mark);
        let flows = usize::from(FLOWS) * SESSIONS as usize;
        assert_eq!(index.len(), flows);
        let heap = index.heap_bytes();
        let grown = rss().saturating_sub(before);
        eprintln!(
            "flow index: {flows} flows of {SESSIONS} sessions: {heap} bytes on the heap \
             ({:.1} MiB, {:.1} bytes a flow, {:.0} a session); RSS +{:.1} MiB",
            heap as f64 / 1048576.0,
            heap as f64 / flows as f64,
            heap as f64 / SESSIONS as f64,
            grown as f64 / 1048576.0,
        );
        // An entry is 8 bytes, with at most an eighth more room; a session's own cost is its
        // bucket in the session map (at most half empty) and its three addresses. The
        // layout before (a hash map per session) took about 390 bytes a session.
        let per_session = 2 * size_of::<(SessionId, SessionFlows)>() + 3 * 16 + 16;
        let bound = flows * 9 + SESSIONS as usize * per_session;
        assert!(
            heap <= bound,
            "{heap} bytes for {flows} flows, above {bound} (9 a flow and {per_session} a session)"
        );
    }

    #[test]
    fn a_session_naming_too_many_addresses_is_walked_instead() {
        let index = reconciled();
        for dst in 0..255u8 {
            index.opened(SessionId(7), &key(1, 1000, dst));
        }
        assert_eq!(
            index.flows_of(SessionId(7)).map(|v| v.len()),
            Some(255),
            "one source and 255 destinations fit"
        );
        index.opened(SessionId(7), &key(1, 1000, 255));
        assert_eq!(index.flows_of(SessionId(7)), None);
        // The flag stays: the session's entries can no longer be trusted to be complete.
        index.removed(&[(key(1, 1000, 0), flow(7))]);
        assert_eq!(index.flows_of(SessionId(7)), None);
    }
}
