//! An in-memory stand-in for the kernel's maps, behind [`Enforcer::in_memory`]: grants and
//! flows in hash maps, the session table in anonymous memory (the same `SlotTable` code as
//! over the pinned map). For unit tests of the logic above the kernel (sessions, the control
//! API, the enforcer itself) that need no root; what the kernel does with a packet is tested
//! against the kernel.

use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use agent_common::{GrantKey, addr_bytes};

use super::{
    Enforcer,
    kernel::{FlowWalker, KernelMaps},
};
use crate::{
    config::Mode,
    datapath::{Counters, DatapathError, Flow, FlowKey, ResourceEntries, SlotTable, Walk},
};

type Result<T> = std::result::Result<T, DatapathError>;

/// The flow table: shared by the maps (writers) and the enforcer's walks.
#[derive(Default)]
struct MemoryFlows(Mutex<HashMap<FlowKey, Flow>>);

impl MemoryFlows {
    fn lock(&self) -> MutexGuard<'_, HashMap<FlowKey, Flow>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl FlowWalker for MemoryFlows {
    fn walk(&self, _chunk: usize, each: &mut dyn FnMut(&FlowKey, &Flow)) -> Walk {
        // A copy first: `each` may call back into the enforcer, which writes flows.
        let flows: Vec<(FlowKey, Flow)> = self.lock().iter().map(|(k, f)| (*k, *f)).collect();
        for (k, f) in &flows {
            each(k, f);
        }
        Walk::Batched { syscalls: 1 }
    }
}

struct MemoryMaps {
    grants: HashMap<GrantKey, u64>,
    flows: Arc<MemoryFlows>,
    slots: Arc<SlotTable>,
    resources: Option<ResourceEntries>,
    mode: Mode,
}

fn grant_key(source: IpAddr, resource_id: u32) -> GrantKey {
    GrantKey {
        src: addr_bytes(source),
        resource_id,
    }
}

impl KernelMaps for MemoryMaps {
    fn grant(&mut self, source: IpAddr, resource_id: u32, session_id: u64) -> Result<()> {
        self.slots.claim(session_id)?;
        self.grants
            .insert(grant_key(source, resource_id), session_id);
        Ok(())
    }

    fn remove_grant(&mut self, source: IpAddr, resource_id: u32) -> Result<()> {
        self.grants.remove(&grant_key(source, resource_id));
        Ok(())
    }

    fn remove_grants(&mut self, grants: &[(IpAddr, u32)]) -> Result<usize> {
        Ok(grants
            .iter()
            .filter(|&&(s, r)| self.grants.remove(&grant_key(s, r)).is_some())
            .count())
    }

    fn grant_for(&self, source: IpAddr, resource_id: u32) -> Option<u64> {
        self.grants.get(&grant_key(source, resource_id)).copied()
    }

    fn grants(&self) -> Vec<(GrantKey, u64)> {
        self.grants.iter().map(|(k, s)| (*k, *s)).collect()
    }

    fn flow(&self, key: &FlowKey) -> Option<Flow> {
        self.flows.lock().get(key).copied()
    }

    fn insert_flow(&mut self, key: FlowKey, mut flow: Flow) -> Result<()> {
        flow.slot = self.slots.claim(flow.session_id)?;
        if let Some(old) = self.flows.lock().insert(key, flow) {
            self.slots.flow_removed(old.slot, old.session_id);
        }
        self.slots.flow_added(flow.slot, flow.session_id);
        Ok(())
    }

    fn remove_flow_of(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        if self.flows.lock().remove(key).is_some() {
            self.slots.flow_removed(flow.slot, flow.session_id);
        }
        Ok(())
    }

    fn counters(&self) -> Result<Counters> {
        Ok(Counters::default())
    }

    fn install_resources(&mut self, entries: ResourceEntries) -> Result<()> {
        self.resources = Some(entries);
        Ok(())
    }

    fn set_mode(&mut self, mode: Mode) -> Result<()> {
        self.mode = mode;
        Ok(())
    }

    fn mode(&self) -> Result<Mode> {
        Ok(self.mode)
    }
}

impl Enforcer {
    /// An enforcer over in-memory maps with a session table of `session_slots` slots (slot 0
    /// is never handed out, so `session_slots - 1` sessions fit) and a flow table of
    /// `flow_capacity` entries (reported, not enforced). It never reaches the host: no map,
    /// no socket teardown. For unit tests of logic; the kernel is tested with the real one.
    ///
    /// # Errors
    /// The session table's memory cannot be mapped.
    pub fn in_memory(session_slots: u32, flow_capacity: u32) -> Result<Self> {
        let slots = Arc::new(SlotTable::in_memory(session_slots)?);
        let flows = Arc::new(MemoryFlows::default());
        let maps = MemoryMaps {
            grants: HashMap::new(),
            flows: Arc::clone(&flows),
            slots: Arc::clone(&slots),
            resources: None,
            mode: Mode::Enforce,
        };
        Ok(Self::with_parts(
            Box::new(maps),
            flows,
            slots,
            flow_capacity,
            false,
        ))
    }
}
