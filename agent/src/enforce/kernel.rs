//! The seam between the enforcer and the kernel: the map operations it needs, as a trait that
//! the pinned maps implement and an in-memory fake (`in_memory`) implements for unit tests of
//! logic. The kernel stays the truth: privileged tests run the same enforcer on real maps.

use std::net::IpAddr;

use agent_common::GrantKey;

use crate::{
    config::Mode,
    datapath::{Counters, DatapathError, Flow, FlowKey, FlowTable, Maps, ResourceEntries, Walk},
};

type Result<T> = std::result::Result<T, DatapathError>;

/// The writers' side of the maps: grants, flows, resource tables, mode and counters. The
/// session table (slots, revocations) is shared apart from this (see `SlotTable`), and flow
/// walks go through a [`FlowWalker`].
pub trait KernelMaps: Send {
    /// Writes the grant (source, resource) → session, claiming the session's slot.
    fn grant(&mut self, source: IpAddr, resource_id: u32, session_id: u64) -> Result<()>;
    /// Removes a grant; absent is fine.
    fn remove_grant(&mut self, source: IpAddr, resource_id: u32) -> Result<()>;
    /// Removes these grants; absent ones are fine. Returns how many were removed.
    fn remove_grants(&mut self, grants: &[(IpAddr, u32)]) -> Result<usize>;
    /// The session holding the grant (source, resource).
    fn grant_for(&self, source: IpAddr, resource_id: u32) -> Option<u64>;
    /// Every grant: (key, session id).
    fn grants(&self) -> Vec<(GrantKey, u64)>;
    fn flow(&self, key: &FlowKey) -> Option<Flow>;
    /// Writes a flow the agent knows, with its session's slot (claimed if needed).
    fn insert_flow(&mut self, key: FlowKey, flow: Flow) -> Result<()>;
    /// Removes a flow read a moment ago as `flow`; absent is fine.
    fn remove_flow_of(&mut self, key: &FlowKey, flow: &Flow) -> Result<()>;
    fn counters(&self) -> Result<Counters>;
    fn install_resources(&mut self, entries: ResourceEntries) -> Result<()>;
    fn set_mode(&mut self, mode: Mode) -> Result<()>;
    fn mode(&self) -> Result<Mode>;
}

/// Walks over the flow table that take none of the writers' locks.
pub trait FlowWalker: Send + Sync {
    /// Hands every flow to `each`, `chunk` at a time where the table can.
    fn walk(&self, chunk: usize, each: &mut dyn FnMut(&FlowKey, &Flow)) -> Walk;
}

impl KernelMaps for Maps {
    fn grant(&mut self, source: IpAddr, resource_id: u32, session_id: u64) -> Result<()> {
        Maps::grant(self, source, resource_id, session_id)
    }

    fn remove_grant(&mut self, source: IpAddr, resource_id: u32) -> Result<()> {
        Maps::remove_grant(self, source, resource_id)
    }

    fn remove_grants(&mut self, grants: &[(IpAddr, u32)]) -> Result<usize> {
        Maps::remove_grants(self, grants)
    }

    fn grant_for(&self, source: IpAddr, resource_id: u32) -> Option<u64> {
        Maps::grant_for(self, source, resource_id)
    }

    fn grants(&self) -> Vec<(GrantKey, u64)> {
        Maps::grants(self)
    }

    fn flow(&self, key: &FlowKey) -> Option<Flow> {
        Maps::flow(self, key)
    }

    fn insert_flow(&mut self, key: FlowKey, flow: Flow) -> Result<()> {
        Maps::insert_flow(self, key, flow)
    }

    fn remove_flow_of(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        Maps::remove_flow_of(self, key, flow)
    }

    fn counters(&self) -> Result<Counters> {
        Maps::counters(self)
    }

    fn install_resources(&mut self, entries: ResourceEntries) -> Result<()> {
        Maps::install_resources(self, entries)
    }

    fn set_mode(&mut self, mode: Mode) -> Result<()> {
        Maps::set_mode(self, mode)
    }

    fn mode(&self) -> Result<Mode> {
        Maps::mode(self)
    }
}

impl FlowWalker for FlowTable {
    fn walk(&self, chunk: usize, each: &mut dyn FnMut(&FlowKey, &Flow)) -> Walk {
        self.for_each_in_chunks(chunk, each)
    }
}
