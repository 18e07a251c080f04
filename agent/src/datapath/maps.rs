//! Typed handles for every map the kernel programs use; nothing else reads or writes them.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
};

use agent_common::{
    Flow, FlowKey, Grant, GrantKey, ResourceDst, ResourceDstKey, ResourceEntries, ResourcePort,
    addr_bytes, config as cfg, map_names as names, stat,
};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, IterableMap as _, LpmTrie, Map, MapData, MapError, PerCpuArray,
        lpm_trie::Key,
    },
};

use super::{
    DatapathError, maps_dir, monotonic_ns,
    slots::{Revocation, SessionStats, SlotTable},
    walk::{FlowTable, Walk, walk},
};
use crate::config::Mode;

/// Why the kernel dropped packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DropReason {
    NoGrant,
    Revoked,
    FlowTableFull,
    Malformed,
    SessionFlowLimit,
}

impl DropReason {
    pub const ALL: [Self; 5] = [
        Self::NoGrant,
        Self::Revoked,
        Self::FlowTableFull,
        Self::Malformed,
        Self::SessionFlowLimit,
    ];

    pub fn index(self) -> u32 {
        match self {
            Self::NoGrant => stat::DROP_NO_GRANT,
            Self::Revoked => stat::DROP_REVOKED,
            Self::FlowTableFull => stat::DROP_FLOW_TABLE_FULL,
            Self::Malformed => stat::DROP_MALFORMED,
            Self::SessionFlowLimit => stat::DROP_SESSION_FLOW_LIMIT,
        }
    }

    pub fn from_index(index: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.index() == index)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoGrant => "no_grant",
            Self::Revoked => "revoked",
            Self::FlowTableFull => "flow_table_full",
            Self::Malformed => "malformed",
            Self::SessionFlowLimit => "session_flow_limit",
        }
    }
}

/// The kernel's global counters, summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Packets dropped, by reason.
    pub dropped: BTreeMap<DropReason, u64>,
    /// Packets that monitor mode passed but enforce mode would have dropped, by reason.
    pub would_drop: BTreeMap<DropReason, u64>,
    pub flows_opened: u64,
    pub events_lost: u64,
    pub denied_events_suppressed: u64,
    pub rst_passed_after_revoke: u64,
}

impl Counters {
    pub fn dropped(&self, reason: DropReason) -> u64 {
        self.dropped.get(&reason).copied().unwrap_or(0)
    }

    pub fn would_drop(&self, reason: DropReason) -> u64 {
        self.would_drop.get(&reason).copied().unwrap_or(0)
    }
}

/// Port slots read per BPF_MAP_LOOKUP_BATCH call when a new handle looks for the slots a
/// previous agent installed: 16 syscalls for the whole table.
const PORT_CHUNK: usize = 8_192;

/// Handles to the pinned maps.
pub struct Maps {
    pin_dir: PathBuf,
    resource_ports: Array<MapData, ResourcePort>,
    resource_dsts: LpmTrie<MapData, ResourceDst, u32>,
    grants: HashMap<MapData, GrantKey, Grant>,
    flows: HashMap<MapData, FlowKey, Flow>,
    /// A second handle on the flow map, for walks that must not wait for (or hold up) the
    /// writers that share this one.
    flow_table: Arc<FlowTable>,
    flows_capacity: u32,
    /// The resource entries this handle last installed: later installs write only the
    /// difference instead of scanning all 131,072 port slots.
    installed: Option<ResourceEntries>,
    /// The session table, mapped: slots, revocations and per-session counters. Shared with
    /// the enforcer's revocation path, which must not wait for this handle's lock.
    slots: Arc<SlotTable>,
    stats: PerCpuArray<MapData, u64>,
    config: Array<MapData, u32>,
}

type Result<T> = std::result::Result<T, DatapathError>;

/// Entries read per call from the grant table.
const CHUNK: usize = 8_192;

pub(super) fn map_err(
    name: &'static str,
    action: &'static str,
) -> impl FnOnce(MapError) -> DatapathError {
    move |source| DatapathError::Map {
        name,
        action,
        source: Box::new(source),
    }
}

/// Whether a lookup error only means "no such key".
fn not_found(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound | MapError::ElementNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl Maps {
    /// Takes the maps out of a freshly loaded object.
    pub(super) fn take(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self> {
        Self::build(pin_dir, |name| {
            ebpf.take_map(name).ok_or(DatapathError::MissingMap {
                name,
                pin_dir: pin_dir.to_owned(),
            })
        })
    }

    /// Opens the maps a running (or stopped) agent pinned under `pin_dir`, without loading
    /// any program: for tools and tests that inspect or drive the datapath.
    ///
    /// # Errors
    /// A map is not pinned there, or is not the map this build expects.
    pub fn open_pinned(pin_dir: &Path) -> Result<Self> {
        Self::build(pin_dir, |name| {
            let path = maps_dir(pin_dir).join(name);
            let data = MapData::from_pin(&path).map_err(|source| DatapathError::OpenPinned {
                path: path.clone(),
                source: Box::new(source),
            })?;
            Map::from_map_data(data).map_err(|source| DatapathError::OpenPinned {
                path,
                source: Box::new(source),
            })
        })
    }

    fn build(pin_dir: &Path, mut get: impl FnMut(&'static str) -> Result<Map>) -> Result<Self> {
        let flows_map = get(names::FLOWS)?;
        let flows_capacity = match &flows_map {
            Map::HashMap(data) => data.info().map(|i| i.max_entries()).unwrap_or(0),
            _ => 0,
        };
        let flows: HashMap<MapData, FlowKey, Flow> = flows_map
            .try_into()
            .map_err(map_err(names::FLOWS, "open"))?;
        let flow_table = Arc::new(FlowTable::new(&flows)?);
        let slots = match get(names::SESSIONS)? {
            Map::Array(data) => Arc::new(SlotTable::new(data, names::SESSIONS)?),
            _ => {
                return Err(DatapathError::SlotTable {
                    name: names::SESSIONS,
                    message: "it is not an array map".into(),
                });
            }
        };
        Ok(Self {
            pin_dir: pin_dir.to_owned(),
            resource_ports: get(names::RESOURCE_PORTS)?
                .try_into()
                .map_err(map_err(names::RESOURCE_PORTS, "open"))?,
            resource_dsts: get(names::RESOURCE_DSTS)?
                .try_into()
                .map_err(map_err(names::RESOURCE_DSTS, "open"))?,
            grants: get(names::GRANTS)?
                .try_into()
                .map_err(map_err(names::GRANTS, "open"))?,
            flows,
            flow_table,
            flows_capacity,
            installed: None,
            slots,
            stats: get(names::STATS)?
                .try_into()
                .map_err(map_err(names::STATS, "open"))?,
            config: get(names::CONFIG)?
                .try_into()
                .map_err(map_err(names::CONFIG, "open"))?,
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The port slots that name a resource, as the pinned table holds them now. Read in
    /// batches of [`PORT_CHUNK`] slots: one syscall per slot made this read of all 131,072
    /// slots most of a restarted agent's time to its first `status` answer.
    fn occupied_port_slots(&self) -> Vec<u32> {
        let mut occupied = Vec::new();
        let read = super::batch::lookup::<u32, ResourcePort>(
            self.resource_ports.map().fd(),
            PORT_CHUNK,
            |index, slot| {
                if slot.resource_id != 0 {
                    occupied.push(*index);
                }
            },
        );
        match read {
            Ok(super::batch::Lookup::Done { .. }) => occupied,
            other => {
                if let Err(e) = other {
                    tracing::debug!(error = %e, "batched read of the port table failed: reading slot by slot");
                }
                (0..self.resource_ports.len())
                    .filter(|i| {
                        self.resource_ports
                            .get(i, 0)
                            .is_ok_and(|slot| slot.resource_id != 0)
                    })
                    .collect()
            }
        }
    }

    /// Makes the kernel's resource tables match `wanted` (policy compiles its resources into
    /// these entries). New entries are written before stale ones are removed, so a resource
    /// that stays protected is never unprotected in between.
    ///
    /// # Errors
    /// The kernel refuses a write (for example the destination trie is full).
    pub fn install_resources(&mut self, wanted: impl Into<ResourceEntries>) -> Result<()> {
        let wanted = wanted.into();
        if self.installed.as_ref() == Some(&wanted) {
            return Ok(());
        }
        // Destinations first: a port slot that says "consult the trie" must find its entries.
        let current_dsts: Vec<Key<ResourceDst>> = self
            .resource_dsts
            .keys()
            .collect::<std::result::Result<_, _>>()
            .map_err(map_err(names::RESOURCE_DSTS, "list"))?;
        for ((bits, dst), id) in &wanted.dsts {
            self.resource_dsts
                .insert(&Key::new(*bits, dst.dst()), id, 0)
                .map_err(map_err(names::RESOURCE_DSTS, "insert"))?;
        }
        let current_ports: Vec<u32> = match &self.installed {
            Some(previous) => previous.ports.keys().copied().collect(),
            // First install by this handle: the pinned table may hold another agent's slots.
            None => self.occupied_port_slots(),
        };
        for (index, slot) in &wanted.ports {
            self.resource_ports
                .set(*index, slot, 0)
                .map_err(map_err(names::RESOURCE_PORTS, "set"))?;
        }
        for index in current_ports {
            if !wanted.ports.contains_key(&index) {
                self.resource_ports
                    .set(index, ResourcePort::default(), 0)
                    .map_err(map_err(names::RESOURCE_PORTS, "clear"))?;
            }
        }
        for key in current_dsts {
            let entry = (key.prefix_len(), ResourceDstKey::of(&key.data()));
            if !wanted.dsts.contains_key(&entry) {
                match self.resource_dsts.remove(&key) {
                    Ok(()) => {}
                    Err(e) if not_found(&e) => {}
                    Err(e) => return Err(map_err(names::RESOURCE_DSTS, "remove")(e)),
                }
            }
        }
        self.installed = Some(wanted);
        Ok(())
    }

    /// Lets `source` reach `resource_id` for `session_id`, claiming the session's slot in
    /// the session table if it holds none yet.
    ///
    /// # Errors
    /// The session table is full ([`DatapathError::SessionTableFull`]: nothing is written),
    /// the grant table is full, or the kernel refuses the write.
    pub fn grant(&mut self, source: IpAddr, resource_id: u32, session_id: u64) -> Result<()> {
        let slot = self.slots.claim(session_id)?;
        let grant = Grant {
            session_id,
            slot,
            _pad: 0,
        };
        self.grants
            .insert(grant_key(source, resource_id), grant, 0)
            .map_err(map_err(names::GRANTS, "insert"))
    }

    /// Removes a grant; absent is fine. Flows it already opened stay until removed.
    ///
    /// # Errors
    /// The kernel refuses the delete.
    pub fn remove_grant(&mut self, source: IpAddr, resource_id: u32) -> Result<()> {
        match self.grants.remove(&grant_key(source, resource_id)) {
            Err(e) if !not_found(&e) => Err(map_err(names::GRANTS, "remove")(e)),
            _ => Ok(()),
        }
    }

    /// Removes many grants in one syscall where the kernel can (BPF_MAP_DELETE_BATCH), one
    /// by one where it cannot; absent ones are fine. Returns how many were removed.
    ///
    /// # Errors
    /// The kernel refuses a delete.
    pub fn remove_grants(&mut self, grants: &[(IpAddr, u32)]) -> Result<usize> {
        use aya::maps::IterableMap as _;
        let keys: Vec<GrantKey> = grants.iter().map(|&(s, r)| grant_key(s, r)).collect();
        match super::batch::delete_parallel(self.grants.map().fd(), &keys) {
            Ok(n) => Ok(n),
            Err(e) => {
                tracing::debug!(error = %e, "batch delete unavailable: deleting grants one by one");
                let mut n = 0;
                for k in &keys {
                    match self.grants.remove(k) {
                        Ok(()) => n += 1,
                        Err(e) if not_found(&e) => {}
                        Err(e) => return Err(map_err(names::GRANTS, "remove")(e)),
                    }
                }
                Ok(n)
            }
        }
    }

    pub fn grant_for(&self, source: IpAddr, resource_id: u32) -> Option<u64> {
        self.grants
            .get(&grant_key(source, resource_id), 0)
            .ok()
            .map(|g| g.session_id)
    }

    /// Every grant: (key, session id).
    pub fn grants(&self) -> Vec<(GrantKey, u64)> {
        let mut out = Vec::new();
        walk(&self.grants, names::GRANTS, CHUNK, |k, g| {
            out.push((*k, g.session_id));
        });
        out
    }

    /// Severs every flow of `session_id` on its next packet: one store into its slot of the
    /// session table. Revoking twice keeps the first revocation's time.
    ///
    /// # Errors
    /// None today: a session without a slot has no grant and no flow in the kernel to stop.
    pub fn revoke(&mut self, session_id: u64) -> Result<()> {
        self.slots.revoke(session_id, monotonic_ns());
        Ok(())
    }

    /// Gives the session's slot back (its revocation and counters with it). Only for
    /// sessions that ended and whose grants and flows are gone, so nothing is left for the
    /// revocation to stop; a flow that still named the slot would be dropped, never admitted.
    pub fn release_session(&mut self, session_id: u64) {
        self.slots.release(session_id);
    }

    pub fn revocation(&self, session_id: u64) -> Option<Revocation> {
        self.slots.revocation(session_id)
    }

    pub fn revoked_sessions(&self) -> Vec<(u64, Revocation)> {
        self.slots.revoked_sessions()
    }

    /// The session's slot in the session table, if it holds one.
    pub fn slot_of(&self, session_id: u64) -> Option<u32> {
        self.slots.slot_of(session_id)
    }

    /// Slots held by sessions and the session table's capacity.
    pub fn session_slots_fill(&self) -> (usize, u32) {
        (self.slots.held(), self.slots.capacity().saturating_sub(1))
    }

    /// Sets the budget of live flows per session (zero: none).
    ///
    /// # Errors
    /// The kernel refuses the write.
    pub fn set_session_flow_limit(&mut self, limit: u32) -> Result<()> {
        self.config
            .set(cfg::SESSION_FLOW_LIMIT, limit, 0)
            .map_err(map_err(names::CONFIG, "set session flow limit"))
    }

    /// Every flow the kernel holds.
    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        let mut out = Vec::new();
        self.for_each_flow(|k, f| out.push((*k, *f)));
        out
    }

    /// Hands every flow the kernel holds to `each`, in chunks, without collecting them.
    pub fn for_each_flow(&self, each: impl FnMut(&FlowKey, &Flow)) {
        self.flow_table.for_each(each);
    }

    /// [`FlowTable::for_each_in_chunks`] on this datapath's flow table.
    pub fn for_each_flow_in_chunks(&self, chunk: usize, each: impl FnMut(&FlowKey, &Flow)) -> Walk {
        self.flow_table.for_each_in_chunks(chunk, each)
    }

    /// A handle for walking the flow table that does not borrow these maps: walks of a large
    /// table take a good part of a second, and must not hold up grant and revocation writes.
    pub fn flow_table(&self) -> Arc<FlowTable> {
        Arc::clone(&self.flow_table)
    }

    /// The session table (slots, revocations, counters), for callers that must reach it
    /// without this handle: revoking a session waits for no other map write.
    pub fn slot_table(&self) -> Arc<SlotTable> {
        Arc::clone(&self.slots)
    }

    /// The flow table's capacity (`flow_table_size` when the maps were created).
    pub fn flows_capacity(&self) -> u32 {
        self.flows_capacity
    }

    pub fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.get(key, 0).ok()
    }

    /// Records a flow the agent already knows (for example from an open socket). Its `slot`
    /// is set to its session's (claimed if the session holds none), and a new flow counts
    /// against the session's budget as a flow the kernel opened does.
    ///
    /// # Errors
    /// The session table or the flow table is full, or the kernel refuses the write.
    pub fn insert_flow(&mut self, key: FlowKey, mut flow: Flow) -> Result<()> {
        flow.slot = self.slots.claim(flow.session_id)?;
        match self.flows.insert(key, flow, u64::from(aya_noexist())) {
            Ok(()) => {
                self.slots.flow_added(flow.slot, flow.session_id);
                Ok(())
            }
            Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::EEXIST) => {
                let old = self.flows.get(&key, 0).ok();
                self.flows
                    .insert(key, flow, 0)
                    .map_err(map_err(names::FLOWS, "insert"))?;
                if old.is_none_or(|o| o.session_id != flow.session_id || o.slot != flow.slot) {
                    if let Some(o) = old {
                        self.slots.flow_removed(o.slot, o.session_id);
                    }
                    self.slots.flow_added(flow.slot, flow.session_id);
                }
                Ok(())
            }
            Err(e) => Err(map_err(names::FLOWS, "insert")(e)),
        }
    }

    /// Forgets a flow; its next packet needs a live grant again. Absent is fine.
    ///
    /// # Errors
    /// The kernel refuses the delete.
    pub fn remove_flow(&mut self, key: &FlowKey) -> Result<()> {
        match self.flows.get(key, 0) {
            Ok(flow) => self.remove_flow_of(key, &flow),
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(names::FLOWS, "read")(e)),
        }
    }

    /// Forgets a flow read a moment ago as `flow`, and gives its place in its session's
    /// budget back. Absent is fine.
    ///
    /// # Errors
    /// The kernel refuses the delete.
    pub fn remove_flow_of(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        match self.flows.remove(key) {
            Ok(()) => {
                self.slots.flow_removed(flow.slot, flow.session_id);
                Ok(())
            }
            Err(e) if not_found(&e) => Ok(()),
            Err(e) => Err(map_err(names::FLOWS, "remove")(e)),
        }
    }

    /// Flows held and the table's capacity: the flow map's pressure.
    pub fn flow_fill(&self) -> (usize, u32) {
        let mut count = 0;
        self.for_each_flow(|_, _| count += 1);
        (count, self.flows_capacity)
    }

    pub fn session_stats(&self, session_id: u64) -> Option<SessionStats> {
        self.slots.stats(session_id)
    }

    /// Every session's kernel counters, read from the mapped session table.
    pub fn all_session_stats(&self) -> std::collections::HashMap<u64, SessionStats> {
        self.slots.all_stats()
    }

    /// Global counters summed over CPUs.
    ///
    /// # Errors
    /// The kernel refuses the read.
    pub fn counters(&self) -> Result<Counters> {
        let read = |index: u32| -> Result<u64> {
            let per_cpu = self
                .stats
                .get(&index, 0)
                .map_err(map_err(names::STATS, "read"))?;
            Ok(per_cpu.iter().sum())
        };
        let mut c = Counters::default();
        for reason in DropReason::ALL {
            c.dropped.insert(reason, read(reason.index())?);
            c.would_drop
                .insert(reason, read(stat::MONITOR_OFFSET + reason.index())?);
        }
        c.flows_opened = read(stat::FLOWS_OPENED)?;
        c.events_lost = read(stat::EVENTS_LOST)?;
        c.denied_events_suppressed = read(stat::DENIED_EVENTS_SUPPRESSED)?;
        c.rst_passed_after_revoke = read(stat::RST_PASSED_AFTER_REVOKE)?;
        Ok(c)
    }

    /// Switches between enforcing and only counting what would be dropped.
    ///
    /// # Errors
    /// The kernel refuses the write.
    pub fn set_mode(&mut self, mode: Mode) -> Result<()> {
        self.config
            .set(cfg::MODE, u32::from(mode), 0)
            .map_err(map_err(names::CONFIG, "set mode"))
    }

    /// # Errors
    /// The kernel refuses the read.
    pub fn mode(&self) -> Result<Mode> {
        let raw = self
            .config
            .get(&cfg::MODE, 0)
            .map_err(map_err(names::CONFIG, "read mode"))?;
        Ok(if raw == cfg::MODE_MONITOR {
            Mode::Monitor
        } else {
            Mode::Enforce
        })
    }
}

fn grant_key(source: IpAddr, resource_id: u32) -> GrantKey {
    GrantKey {
        src: addr_bytes(source),
        resource_id,
    }
}

/// BPF_NOEXIST: insert only when the key is absent.
const fn aya_noexist() -> u32 {
    1
}
