//! Turns session decisions into kernel map writes: grants in, grants out, revocations, and
//! the flows of a session. The sessions room decides; this room only writes.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

mod census;
mod diag_codec;
pub mod flow_index;
mod in_memory;
pub mod kernel;
pub mod pressure;
pub mod sockets;
#[cfg(test)]
mod tests;

pub use census::{CENSUS_MAX_AGE, FlowCensus, LARGE_TABLE, Traffic, TrafficMap, WALK_DUTY};

use self::{
    flow_index::{FlowIndex, WALK_BATCH},
    kernel::{FlowWalker, KernelMaps},
};
use crate::{
    config::Mode,
    datapath::{
        Counters, DatapathError, FLOW_CHUNK, Flow, FlowKey, Maps, ResourceEntries, Revocation,
        SessionStats, SlotTable, Walk, monotonic_ns,
    },
    policy::ResourceTable,
    sessions::model::{SessionGrant, SessionId},
};

#[derive(Debug, thiserror::Error)]
pub enum EnforceError {
    #[error("session {session}: {action}: {source}")]
    Kernel {
        session: SessionId,
        action: &'static str,
        source: DatapathError,
    },
    #[error("withdrawing {count} grants: {source}")]
    Withdraw { count: usize, source: DatapathError },
    #[error("reading kernel state: {0}")]
    Read(#[source] DatapathError),
    #[error("{action}: {source}")]
    Datapath {
        action: &'static str,
        source: DatapathError,
    },
}

/// Policy compiled into what the kernel's resource tables must hold: plain port slots and
/// trie entries (agent-common types), which the datapath diffs against what it installed
/// last. Here, between the two rooms, so that the datapath never names policy.
impl From<&ResourceTable> for ResourceEntries {
    fn from(table: &ResourceTable) -> Self {
        ResourceEntries::new(table.port_slots(), table.dst_entries())
    }
}

pub struct Enforcer {
    /// The kernel's maps (or the in-memory fake of unit tests), behind the writers' lock.
    maps: Mutex<Box<dyn KernelMaps>>,
    /// Walks go through their own handle, outside the lock that map writers share.
    flow_table: Arc<dyn FlowWalker>,
    /// The session table (revocations, counters), reached without the writers' lock: a
    /// revocation is one store that waits for no grant write, flow removal or scan.
    slots: Arc<SlotTable>,
    flows_capacity: u32,
    /// The newest census of the flow table, for reads of a large table to reuse.
    census: Mutex<Option<Arc<FlowCensus>>>,
    /// Each session's flows, so that one session's are found without walking the table.
    index: FlowIndex,
    /// Whether ended sessions' local sockets are torn down (not by the in-memory fake, which
    /// must never reach the host's sockets).
    sockets: bool,
    /// The last counters of released slots that dropped anything: a terminated session's
    /// "dropped after termination" is its proof that the cut held, and must not read zero
    /// once its slot serves another session. In memory (a restart reads zero again); only
    /// sessions with drops are kept.
    released: Mutex<HashMap<SessionId, SessionStats>>,
}

impl Enforcer {
    pub fn new(maps: Maps) -> Self {
        let (flow_table, slots, capacity) =
            (maps.flow_table(), maps.slot_table(), maps.flows_capacity());
        Self::with_parts(Box::new(maps), flow_table, slots, capacity, true)
    }

    fn with_parts(
        maps: Box<dyn KernelMaps>,
        flow_table: Arc<dyn FlowWalker>,
        slots: Arc<SlotTable>,
        flows_capacity: u32,
        sockets: bool,
    ) -> Self {
        Self {
            maps: Mutex::new(maps),
            flow_table,
            slots,
            flows_capacity,
            census: Mutex::new(None),
            index: FlowIndex::new(),
            sockets,
            released: Mutex::new(HashMap::new()),
        }
    }

    fn maps(&self) -> MutexGuard<'_, Box<dyn KernelMaps>> {
        // A panic while holding the lock cannot leave the kernel maps half-written in a way
        // that matters more than stopping enforcement updates: keep going.
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes every grant of a session. All or nothing: on failure the ones already written
    /// are withdrawn again.
    ///
    /// # Errors
    /// The grant table is full or the kernel refuses a write.
    pub fn grant(
        &self,
        session: SessionId,
        source: IpAddr,
        grants: &[SessionGrant],
    ) -> Result<(), EnforceError> {
        let mut maps = self.maps();
        // A slot claimed by this call goes back with the grants: an admission refused here
        // must not keep a place in the session table.
        let had_slot = self.slots.slot_of(session.0).is_some();
        for (i, g) in grants.iter().enumerate() {
            if let Err(source_err) = maps.grant(source, g.resource_id, session.0) {
                for done in &grants[..i] {
                    let _ = maps.remove_grant(source, done.resource_id);
                }
                if !had_slot {
                    self.slots.release(session.0);
                }
                return Err(EnforceError::Kernel {
                    session,
                    action: "write grant",
                    source: source_err,
                });
            }
        }
        Ok(())
    }

    /// Removes the grant (source, resource) if it still belongs to `session` (a newer session
    /// from the same source may own it now).
    ///
    /// # Errors
    /// The kernel refuses the delete.
    pub fn withdraw(
        &self,
        session: SessionId,
        source: IpAddr,
        resource_id: u32,
    ) -> Result<(), EnforceError> {
        let mut maps = self.maps();
        if maps.grant_for(source, resource_id) == Some(session.0) {
            maps.remove_grant(source, resource_id)
                .map_err(|e| EnforceError::Kernel {
                    session,
                    action: "remove grant",
                    source: e,
                })?;
        }
        Ok(())
    }

    /// Removes these grants whoever holds them, in one batch: the caller decided that no
    /// live session keeps them.
    ///
    /// # Errors
    /// The kernel refuses a delete.
    pub fn withdraw_all(&self, grants: &[(IpAddr, u32)]) -> Result<usize, EnforceError> {
        if grants.is_empty() {
            return Ok(0);
        }
        self.maps()
            .remove_grants(grants)
            .map_err(|source| EnforceError::Withdraw {
                count: grants.len(),
                source,
            })
    }

    /// Severs every flow of the session on its next packet: one store into its slot of the
    /// session table, without the writers' lock (nothing else in the agent can delay it).
    ///
    /// # Errors
    /// None today (kept for a datapath whose revocation can fail).
    pub fn revoke(&self, session: SessionId) -> Result<(), EnforceError> {
        self.slots.revoke(session.0, monotonic_ns());
        Ok(())
    }

    pub fn revocation(&self, session: SessionId) -> Option<Revocation> {
        self.slots.revocation(session.0)
    }

    /// Every revoked session id in the kernel.
    pub fn revoked(&self) -> Vec<SessionId> {
        self.slots
            .revoked_sessions()
            .into_iter()
            .map(|(id, _)| SessionId(id))
            .collect()
    }

    /// Every grant in the kernel: (source, resource id, session).
    pub fn grants(&self) -> Vec<(IpAddr, u32, SessionId)> {
        self.maps()
            .grants()
            .into_iter()
            .map(|(k, s)| {
                (
                    crate::datapath::addr_from_bytes(k.src),
                    k.resource_id,
                    SessionId(s),
                )
            })
            .collect()
    }

    /// Removes a grant whatever session it belongs to (reconciliation of orphans).
    ///
    /// # Errors
    /// The kernel refuses the delete.
    pub fn remove_grant(&self, source: IpAddr, resource_id: u32) -> Result<(), EnforceError> {
        self.maps()
            .remove_grant(source, resource_id)
            .map_err(EnforceError::Read)
    }

    /// Every flow in the kernel.
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        self.flows_where(|_| true)
    }

    /// Hands every flow to `each`, without the writers' lock.
    fn walk(&self, chunk: usize, mut each: impl FnMut(&FlowKey, &Flow)) -> Walk {
        self.flow_table.walk(chunk, &mut each)
    }

    /// The flows `pick` selects, from one pass that copies only those.
    pub fn flows_where(&self, pick: impl Fn(&Flow) -> bool) -> Vec<(FlowKey, Flow)> {
        let mut out = Vec::new();
        self.walk(FLOW_CHUNK, |k, f| {
            if pick(f) {
                out.push((*k, *f));
            }
        });
        out
    }

    /// Removes the flows for which `sever` says yes; returns them.
    pub fn remove_flows(&self, sever: impl Fn(&FlowKey, &Flow) -> bool) -> Vec<(FlowKey, Flow)> {
        let mut doomed = Vec::new();
        self.walk(FLOW_CHUNK, |k, f| {
            if sever(k, f) {
                doomed.push((*k, *f));
            }
        });
        self.remove_all(&doomed);
        // A census kept for reads loses them too: a terminated session's flows must not
        // linger in lists for the census's lifetime.
        if !doomed.is_empty() {
            let mut slot = self.census.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(kept) = slot.as_mut() {
                let census = Arc::make_mut(kept);
                for (_, f) in &doomed {
                    census.remove(f);
                }
            }
        }
        doomed
    }

    /// Only the removals take the writers' lock; the walk before them does not.
    fn remove_all(&self, doomed: &[(FlowKey, Flow)]) {
        if doomed.is_empty() {
            return;
        }
        let mut maps = self.maps();
        for (k, f) in doomed {
            let _ = maps.remove_flow_of(k, f);
        }
        drop(maps);
        self.index.removed(doomed);
    }

    /// One pass over the flow table that also reconciles the flow index with it (see
    /// [`flow_index`]); a walk that fails part way prunes nothing.
    fn walk_indexed(&self, mut each: impl FnMut(&FlowKey, &Flow)) {
        let mark = self.index.walk_started();
        let mut met = Vec::with_capacity(WALK_BATCH);
        let walk = self.walk(FLOW_CHUNK, |k, f| {
            met.push((*k, f.session_id));
            if met.len() == WALK_BATCH {
                self.index.walked(&mark, &met);
                met.clear();
            }
            each(k, f);
        });
        self.index.walked(&mark, &met);
        if walk != Walk::Failed {
            self.index.walk_done(mark);
        }
    }

    /// A flow the kernel opened (its flow-opened event), for the flow index.
    pub fn flow_opened(&self, session: SessionId, key: &FlowKey) {
        self.index.opened(session, key);
    }

    /// Flows the index holds, over all sessions.
    pub fn indexed_flows(&self) -> usize {
        self.index.len()
    }

    /// Bytes the flow index holds on the heap (see [`FlowIndex::heap_bytes`]).
    pub fn indexed_bytes(&self) -> usize {
        self.index.heap_bytes()
    }

    /// The flows of these sessions as the kernel holds them now: from the flow index and one
    /// lookup per flow (which also drops any the index still held but the kernel no longer
    /// has, or has for another session), or one walk when the index cannot tell.
    pub fn flows_of(&self, sessions: &HashSet<u64>) -> Vec<(FlowKey, Flow)> {
        let mut keys = Vec::new();
        for id in sessions {
            match self.index.flows_of(SessionId(*id)) {
                Some(k) => keys.extend(k),
                None => return self.flows_where(|f| sessions.contains(&f.session_id)),
            }
        }
        if keys.is_empty() {
            return Vec::new();
        }
        let maps = self.maps();
        keys.into_iter()
            .filter_map(|k| {
                maps.flow(&k)
                    .filter(|f| sessions.contains(&f.session_id))
                    .map(|f| (k, f))
            })
            .collect()
    }

    /// The flows of one session: see [`Enforcer::flows_of`].
    pub fn session_flows(&self, session: SessionId) -> Vec<(FlowKey, Flow)> {
        self.flows_of(&HashSet::from([session.0]))
    }

    /// The sweep's one pass over the flow table: removes the flows `sever` picks, and takes a
    /// census of the rest that reads of a large table may reuse for a while. A large table
    /// whose last census still stands in (see [`FlowCensus::lifetime`]) is not walked: the
    /// sweep gets that census and removes nothing this time, so idle flows go a few seconds
    /// later instead of the sweep walking a million flows every second.
    pub fn sweep_flows(
        &self,
        mut sever: impl FnMut(&FlowKey, &Flow) -> bool,
    ) -> (Vec<(FlowKey, Flow)>, Arc<FlowCensus>) {
        if let Some(last) = self.last_census().filter(|c| c.stands_in(Instant::now())) {
            return (Vec::new(), last);
        }
        let mut doomed = Vec::new();
        let mut census = FlowCensus::new();
        self.walk_indexed(|k, f| {
            if sever(k, f) {
                doomed.push((*k, *f));
            } else {
                census.add(f);
            }
        });
        self.remove_all(&doomed);
        (doomed, self.keep(census.done()))
    }

    /// A fresh census of the flow table: one pass, kept for later reads.
    pub fn census(&self) -> Arc<FlowCensus> {
        let mut census = FlowCensus::new();
        self.walk_indexed(|_, f| census.add(f));
        self.keep(census.done())
    }

    /// The census for a read (a list, status, metrics): the last one if it counted a large
    /// table recently enough (see [`FlowCensus::lifetime`]: [`CENSUS_MAX_AGE`], more when
    /// walks are slow), a fresh one otherwise. Traffic of a large table is then up to that
    /// old; small tables are always walked.
    pub fn recent_census(&self) -> Arc<FlowCensus> {
        match self.last_census() {
            Some(c) if c.stands_in(Instant::now()) => c,
            _ => self.census(),
        }
    }

    fn last_census(&self) -> Option<Arc<FlowCensus>> {
        self.census
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn keep(&self, census: FlowCensus) -> Arc<FlowCensus> {
        let census = Arc::new(census);
        let mut slot = self.census.lock().unwrap_or_else(|e| e.into_inner());
        // Walks may overlap: the one that ended last is the newest.
        if slot.as_ref().is_none_or(|c| c.taken <= census.taken) {
            *slot = Some(Arc::clone(&census));
        }
        census
    }

    pub fn session_stats(&self, session: SessionId) -> Option<SessionStats> {
        self.slots
            .stats(session.0)
            .or_else(|| self.released().get(&session).copied())
    }

    /// Every session's kernel counters, read from the mapped session table (and the last
    /// counters of released slots that dropped anything).
    pub fn all_session_stats(&self) -> HashMap<SessionId, SessionStats> {
        let mut all: HashMap<SessionId, SessionStats> = self.released().clone();
        all.extend(
            self.slots
                .all_stats()
                .into_iter()
                .map(|(id, s)| (SessionId(id), s)),
        );
        all
    }

    fn released(&self) -> MutexGuard<'_, HashMap<SessionId, SessionStats>> {
        self.released.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// # Errors
    /// The kernel refuses the read.
    pub fn counters(&self) -> Result<Counters, EnforceError> {
        self.maps().counters().map_err(EnforceError::Read)
    }

    /// Flows held (from [`Enforcer::recent_census`]) and the table's capacity.
    pub fn flow_fill(&self) -> (usize, u32) {
        (self.recent_census().flows, self.flows_capacity)
    }

    /// Destroys the local TCP sockets of these sessions' flows (netlink SOCK_DESTROY in this
    /// process's network namespace), so local processes see an abort and peers get a reset
    /// at once instead of hanging on a revoked flow. Call after the revocation: the kernel
    /// already drops the flows, this only makes both ends notice.
    /// The session's flows come from the flow index (see [`Enforcer::flows_of`]).
    pub fn destroy_sockets(
        &self,
        sessions: &HashSet<u64>,
    ) -> Result<sockets::Destroyed, sockets::SocketError> {
        if !self.sockets {
            return Ok(sockets::Destroyed::default());
        }
        let flows: Vec<sockets::FlowSockets> = self
            .flows_of(sessions)
            .iter()
            .filter(|(k, _)| k.proto == agent_common::IPPROTO_TCP)
            .map(|(k, _)| flow_sockets(k))
            .collect();
        sockets::destroy_tcp(&flows)
    }

    /// Like [`Enforcer::destroy_sockets`] for the flows `pick` selects.
    pub fn destroy_sockets_where(
        &self,
        pick: impl Fn(&Flow) -> bool,
    ) -> Result<sockets::Destroyed, sockets::SocketError> {
        if !self.sockets {
            return Ok(sockets::Destroyed::default());
        }
        let mut flows: Vec<sockets::FlowSockets> = Vec::new();
        self.walk(FLOW_CHUNK, |k, f| {
            if k.proto == agent_common::IPPROTO_TCP && pick(f) {
                flows.push(flow_sockets(k));
            }
        });
        sockets::destroy_tcp(&flows)
    }

    /// Makes the kernel's resource tables protect exactly the resources of `table`.
    ///
    /// # Errors
    /// The kernel refuses a write (for example the destination trie is full).
    pub fn install_resources(&self, table: &ResourceTable) -> Result<(), EnforceError> {
        let entries = ResourceEntries::from(table);
        self.maps()
            .install_resources(entries)
            .map_err(|source| EnforceError::Datapath {
                action: "install resources",
                source,
            })
    }

    /// Switches between enforcing and only counting what would be dropped.
    ///
    /// # Errors
    /// The kernel refuses the write.
    pub fn set_mode(&self, mode: Mode) -> Result<(), EnforceError> {
        self.maps()
            .set_mode(mode)
            .map_err(|source| EnforceError::Datapath {
                action: "set mode",
                source,
            })
    }

    /// # Errors
    /// The kernel refuses the read.
    pub fn mode(&self) -> Result<Mode, EnforceError> {
        self.maps().mode().map_err(EnforceError::Read)
    }

    /// The flow of this 5-tuple (client → resource), if the kernel holds it.
    pub fn flow_between(&self, key: &FlowKey) -> Option<Flow> {
        self.maps().flow(key)
    }

    /// Writes a flow the agent already knows (from an open socket, or a benchmark's fill).
    ///
    /// # Errors
    /// The session table or the flow table is full, or the kernel refuses the write.
    pub fn insert_flow(&self, key: FlowKey, flow: Flow) -> Result<(), EnforceError> {
        self.maps()
            .insert_flow(key, flow)
            .map_err(|source| EnforceError::Kernel {
                session: SessionId(flow.session_id),
                action: "write flow",
                source,
            })
    }

    /// Hands every flow to `each` in chunks of `chunk`, without the writers' lock.
    pub fn for_each_flow_in_chunks(&self, chunk: usize, each: impl FnMut(&FlowKey, &Flow)) -> Walk {
        self.walk(chunk, each)
    }

    /// Gives an ended session's slot in the kernel's session table back, with its revocation
    /// and counters. Only once its grants and flows are gone.
    pub fn release_session(&self, session: SessionId) {
        if let Some(last) = self.slots.stats(session.0)
            && (last.dropped_after_revoke_packets > 0 || last.flow_limit_drops > 0)
        {
            // Nothing of it is live any more: what it dropped is all that is worth keeping.
            let kept = SessionStats {
                live_flows: 0,
                ..last
            };
            self.released().insert(session, kept);
        }
        self.slots.release(session.0);
    }

    /// Slots held by sessions and the session table's capacity.
    pub fn session_slots_fill(&self) -> (usize, u32) {
        (self.slots.held(), self.slots.capacity().saturating_sub(1))
    }

    /// Every session id that holds a slot in the kernel's session table (read from the
    /// table itself): reconciliation releases the ones no stored session explains.
    pub fn slot_holders(&self) -> Vec<SessionId> {
        self.slots.holders().into_iter().map(SessionId).collect()
    }
}

/// The local socket's view of a flow: the client is remote, the resource local.
fn flow_sockets(k: &FlowKey) -> sockets::FlowSockets {
    sockets::FlowSockets {
        remote: (crate::datapath::addr_from_bytes(k.src), k.sport).into(),
        local: (crate::datapath::addr_from_bytes(k.dst), k.dport).into(),
    }
}
