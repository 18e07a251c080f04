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

/// A flow packed relative to its session: its addresses as indexes into the session's own
/// short address list (its source, and this host's resource addresses). 7 bytes instead of
/// the key's 40: with a million flows the index stays a small part of the agent's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Packed {
    sport: u16,
    dport: u16,
    src: u8,
    dst: u8,
    proto: u8,
}

/// One session's flows: packed flow → the walk generation that last vouched for it.
#[derive(Debug, Default)]
struct SessionFlows {
    addrs: Vec<[u8; 16]>,
    flows: foldhash::HashMap<Packed, u32>,
    /// The session's flows name more addresses than a packed flow can: its entries are
    /// incomplete and lookups walk the table instead.
    overflowed: bool,
}

impl SessionFlows {
    fn intern(&mut self, addr: [u8; 16]) -> Option<u8> {
        if let Some(i) = self.addrs.iter().position(|a| *a == addr) {
            return u8::try_from(i).ok();
        }
        let i = u8::try_from(self.addrs.len()).ok()?;
        self.addrs.push(addr);
        Some(i)
    }

    fn find(&self, key: &FlowKey) -> Option<Packed> {
        let at = |addr: &[u8; 16]| {
            self.addrs
                .iter()
                .position(|a| a == addr)
                .and_then(|i| u8::try_from(i).ok())
        };
        Some(Packed {
            sport: key.sport,
            dport: key.dport,
            src: at(&key.src)?,
            dst: at(&key.dst)?,
            proto: key.proto,
        })
    }

    /// Records `key` as vouched for by `generation` (a later one is never lowered).
    fn note(&mut self, key: &FlowKey, generation: u32) {
        let (Some(src), Some(dst)) = (self.intern(key.src), self.intern(key.dst)) else {
            self.overflowed = true;
            return;
        };
        let packed = Packed {
            sport: key.sport,
            dport: key.dport,
            src,
            dst,
            proto: key.proto,
        };
        let stamp = self.flows.entry(packed).or_insert(generation);
        *stamp = (*stamp).max(generation);
    }

    fn unpack(&self, p: &Packed) -> FlowKey {
        FlowKey {
            src: self.addrs[usize::from(p.src)],
            dst: self.addrs[usize::from(p.dst)],
            sport: p.sport,
            dport: p.dport,
            proto: p.proto,
            _pad: [0; 3],
        }
    }
}

#[derive(Debug, Default)]
struct Inner {
    sessions: std::collections::HashMap<SessionId, SessionFlows, BuildHasherDefault<IdHasher>>,
    /// The newest walk's number. A flow opened now carries it: the walk under way may have
    /// passed its slot already, so only a later walk may judge it gone.
    generation: u32,
    /// A walk over the whole table has completed: flows opened before the agent started
    /// (known to the kernel only) are in.
    reconciled: bool,
}

/// A walk under way, from [`FlowIndex::walk_started`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WalkMark(u32);

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
            if let Some(p) = s.find(key) {
                s.flows.remove(&p);
            }
            if s.flows.is_empty() && !s.overflowed {
                inner.sessions.remove(&id);
            }
        }
    }

    /// A walk over the whole table begins: hand it every flow met with
    /// [`FlowIndex::walked`], then end it with [`FlowIndex::walk_done`] (or drop the mark
    /// if the walk failed part way: nothing is pruned then).
    pub fn walk_started(&self) -> WalkMark {
        let mut inner = self.inner();
        inner.generation = inner.generation.wrapping_add(1);
        WalkMark(inner.generation)
    }

    /// Flows a walk met: (key, session), a batch of up to [`WALK_BATCH`] at a time.
    pub fn walked(&self, mark: WalkMark, flows: &[(FlowKey, u64)]) {
        let mut inner = self.inner();
        for (key, session) in flows {
            inner
                .sessions
                .entry(SessionId(*session))
                .or_default()
                .note(key, mark.0);
        }
    }

    /// The walk met every flow: entries it did not vouch for, and that nothing opened since
    /// it began, are gone from the kernel. Pruned a slice of sessions at a time, so lookups
    /// meanwhile are not held up behind a million entries.
    pub fn walk_done(&self, mark: WalkMark) {
        let ids: Vec<SessionId> = self.inner().sessions.keys().copied().collect();
        for slice in ids.chunks(PRUNE_SLICE) {
            let mut inner = self.inner();
            for id in slice {
                let Some(s) = inner.sessions.get_mut(id) else {
                    continue;
                };
                // Generations only grow (a wrap takes four billion walks); an older stamp
                // was not seen by this walk.
                s.flows.retain(|_, stamp| *stamp >= mark.0);
                if s.flows.is_empty() {
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
            Some(s) => Some(s.flows.keys().map(|p| s.unpack(p)).collect()),
        }
    }

    /// Flows held, over all sessions (for tests and benchmarks).
    pub fn len(&self) -> usize {
        self.inner().sessions.values().map(|s| s.flows.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
        index.walked(mark, &[(key(1, 1001, 9), 7)]);
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
        index.walked(mark, &[(key(1, 1001, 9), 7), (key(3, 1, 9), 8)]);
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
        index.walked(new, &[(key(1, 1000, 9), 7)]);
        // The older walk meets the same flow later: its stamp must not go back.
        index.walked(old, &[(key(1, 1000, 9), 7)]);
        index.walk_done(new);
        index.walk_done(old);
        assert_eq!(index.flows_of(SessionId(7)), Some(vec![key(1, 1000, 9)]));
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
