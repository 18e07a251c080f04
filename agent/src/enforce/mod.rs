//! Turns session decisions into kernel map writes: grants in, grants out, revocations, and
//! the flows of a session. The sessions room decides; this room only writes.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Mutex, MutexGuard},
};

pub mod pressure;
pub mod sockets;

use crate::{
    datapath::{Counters, DatapathError, Flow, FlowKey, Maps, Revocation, SessionStats},
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
}

/// Live traffic of one session, summed over its flows in the kernel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub flows: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// CLOCK_MONOTONIC_COARSE ns of the newest packet of any flow; 0 without flows.
    pub last_seen_ns: u64,
}

pub struct Enforcer {
    maps: Mutex<Maps>,
}

impl Enforcer {
    pub fn new(maps: Maps) -> Self {
        Self {
            maps: Mutex::new(maps),
        }
    }

    fn maps(&self) -> MutexGuard<'_, Maps> {
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
        for (i, g) in grants.iter().enumerate() {
            if let Err(source_err) = maps.grant(source, g.resource_id, session.0) {
                for done in &grants[..i] {
                    let _ = maps.remove_grant(source, done.resource_id);
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

    /// Severs every flow of the session on its next packet: one map write.
    ///
    /// # Errors
    /// The revoked set is full or the kernel refuses the write.
    pub fn revoke(&self, session: SessionId) -> Result<(), EnforceError> {
        self.maps()
            .revoke(session.0)
            .map_err(|e| EnforceError::Kernel {
                session,
                action: "revoke",
                source: e,
            })
    }

    pub fn revocation(&self, session: SessionId) -> Option<Revocation> {
        self.maps().revocation(session.0)
    }

    /// Every revoked session id in the kernel.
    pub fn revoked(&self) -> Vec<SessionId> {
        self.maps()
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

    pub fn flows(&self) -> Vec<(FlowKey, Flow)> {
        self.maps().flows()
    }

    /// Removes the flows for which `sever` says yes; returns them.
    pub fn remove_flows(&self, sever: impl Fn(&FlowKey, &Flow) -> bool) -> Vec<(FlowKey, Flow)> {
        let mut maps = self.maps();
        let doomed: Vec<_> = maps
            .flows()
            .into_iter()
            .filter(|(k, f)| sever(k, f))
            .collect();
        for (k, _) in &doomed {
            let _ = maps.remove_flow(k);
        }
        doomed
    }

    /// Live traffic per session, from one pass over the flow table.
    pub fn traffic(&self) -> HashMap<SessionId, Traffic> {
        let mut out: HashMap<SessionId, Traffic> = HashMap::new();
        for (_, f) in self.maps().flows() {
            let t = out.entry(SessionId(f.session_id)).or_default();
            t.flows += 1;
            t.rx_packets += f.rx_packets;
            t.rx_bytes += f.rx_bytes;
            t.tx_packets += f.tx_packets;
            t.tx_bytes += f.tx_bytes;
            t.last_seen_ns = t.last_seen_ns.max(f.last_seen_ns);
        }
        out
    }

    pub fn session_stats(&self, session: SessionId) -> Option<SessionStats> {
        self.maps().session_stats(session.0)
    }

    /// # Errors
    /// The kernel refuses the read.
    pub fn counters(&self) -> Result<Counters, EnforceError> {
        self.maps().counters().map_err(EnforceError::Read)
    }

    /// Flows held and the table's capacity.
    pub fn flow_fill(&self) -> (usize, u32) {
        self.maps().flow_fill()
    }

    /// Destroys the local TCP sockets of these sessions' flows (netlink SOCK_DESTROY in this
    /// process's network namespace), so local processes see an abort and peers get a reset
    /// at once instead of hanging on a revoked flow. Call after the revocation: the kernel
    /// already drops the flows, this only makes both ends notice.
    pub fn destroy_sockets(
        &self,
        sessions: &HashSet<u64>,
    ) -> Result<sockets::Destroyed, sockets::SocketError> {
        self.destroy_sockets_where(|f| sessions.contains(&f.session_id))
    }

    /// Like [`Enforcer::destroy_sockets`] for the flows `pick` selects.
    pub fn destroy_sockets_where(
        &self,
        pick: impl Fn(&Flow) -> bool,
    ) -> Result<sockets::Destroyed, sockets::SocketError> {
        let flows: Vec<sockets::FlowSockets> = self
            .flows()
            .iter()
            .filter(|(k, f)| k.proto == agent_common::IPPROTO_TCP && pick(f))
            .map(|(k, _)| sockets::FlowSockets {
                remote: (crate::datapath::addr_from_bytes(k.src), k.sport).into(),
                local: (crate::datapath::addr_from_bytes(k.dst), k.dport).into(),
            })
            .collect();
        sockets::destroy_tcp(&flows)
    }

    /// Runs `f` with the maps locked, for operations this room has no verb for yet.
    pub fn with_maps<T>(&self, f: impl FnOnce(&mut Maps) -> T) -> T {
        f(&mut self.maps())
    }
}
