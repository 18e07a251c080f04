//! Time-driven transitions (expiry, idle flows, dormancy), kernel events turned into audit
//! records, and the reconciliation of store and kernel when the agent starts.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
};

use super::manager::{SessionError, Sessions};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    datapath::{DatapathEvent, EventKind, monotonic_ns},
    sessions::model::{EndCause, SessionId, SessionState, now_ms},
    store::Write,
};

/// How long a revocation stays in the kernel after its session ended and its last flow went
/// away. Past that nothing is left for it to stop (the grants went with the session).
const REVOCATION_LINGER_MS: u64 = 60 * 60 * 1000;

/// Sessions the sweep looks at per hold of the table lock (a fraction of a millisecond).
const SWEEP_SLICE: usize = 1024;
/// The sweep's pause between two slices. The sweep thread re-took the lock the moment it let go
/// of it, before a waiting admission could: at 1,000 admissions a second with 70,000 sessions,
/// those queued behind a sweep answered 10–20 ms late, once a second. With the pause a sweep of
/// 100,000 sessions takes about 0.2 s of wall time (`bench policy`), well inside its interval.
const SWEEP_PAUSE: std::time::Duration = std::time::Duration::from_millis(1);

/// What one sweep did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepOutcome {
    pub expired: usize,
    pub idle_flows_removed: usize,
    pub went_dormant: usize,
    pub woke_up: usize,
    pub revocations_dropped: usize,
}

/// What reconciliation at start found and fixed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reconciled {
    pub live: usize,
    pub expired_while_down: usize,
    pub revoked_in_kernel: usize,
    pub grants_restored: usize,
    pub orphan_grants_removed: usize,
    pub orphan_flows_removed: usize,
    pub revocations_restored: usize,
    /// Session slots held in the kernel by sessions the store does not know (an admission
    /// never acknowledged, a crash), with no flow left: given back.
    pub orphan_slots_released: usize,
}

impl Sessions {
    /// Expires sessions past their absolute expiry or dormant timeout, removes flows idle
    /// past their session's idle timeout, and moves sessions between active and dormant.
    ///
    /// # Errors
    /// The kernel or the store fails.
    pub async fn sweep(&self) -> Result<SweepOutcome, SessionError> {
        let now = now_ms();
        let mono = monotonic_ns();
        let mut out = SweepOutcome::default();
        let mut writes = Vec::new();

        // Idle flows: dead-peer detection from the kernel's last-seen stamps. A session's idle
        // limit is looked up when the walk first meets one of its flows: with no flows there is
        // nothing to look up (a map of every session's limit, built each second, was the
        // sweep's main cost with 70,000 sessions and no flows).
        let mut idle_ns: HashMap<u64, u64> = HashMap::new();
        let (idle, census) = self.enforcer.sweep_flows(|_, f| {
            let limit = *idle_ns.entry(f.session_id).or_insert_with(|| {
                self.table()
                    .get(&SessionId(f.session_id))
                    .map_or(0, |s| s.settings.idle_timeout_secs * 1_000_000_000)
            });
            // Flows of unknown sessions are left to reconciliation; only known ones age out.
            limit > 0 && mono.saturating_sub(f.last_seen_ns) > limit
        });
        out.idle_flows_removed = idle.len();
        let traffic = &census.traffic;

        // The table lock is taken a slice of sessions at a time: a pass over 70,000 sessions
        // under one hold kept every admission meanwhile waiting for it. Sessions admitted
        // after this list wait for the next sweep; each one looked at is decided on its state
        // at that moment.
        let listed: Vec<SessionId> = self.table().keys().copied().collect();
        let mut expired = Vec::new();
        let mut dormant_expired = Vec::new();
        if !idle.is_empty() {
            let table = self.table();
            for (key, flow) in &idle {
                if let Some(s) = table.get(&SessionId(flow.session_id)) {
                    let mut e = AuditEvent::new(AuditKind::FlowIdle);
                    e.session = Some(s.id);
                    e.user = Some(s.identity.user().to_owned());
                    e.source = Some(s.source);
                    e.detail = format!(
                        "flow {}:{} → port {} idle for {} s, removed",
                        crate::datapath::addr_from_bytes(key.src),
                        key.sport,
                        key.dport,
                        s.settings.idle_timeout_secs
                    );
                    writes.push(Write::Audit(e));
                }
            }
        }
        for (n, slice) in listed.chunks(SWEEP_SLICE).enumerate() {
            if n > 0 {
                tokio::time::sleep(SWEEP_PAUSE).await;
            }
            let mut table = self.table();
            for id in slice {
                let Some(entry) = table.get_mut(id).filter(|s| s.is_live()) else {
                    continue;
                };
                if now >= entry.expires_at_ms {
                    expired.push(entry.id);
                    continue;
                }
                let t = traffic.get(&entry.id).copied().unwrap_or_default();
                let from = entry.state;
                // Decided on the shared record; copied (if shared) only when it changes.
                let to = match from {
                    SessionState::Active if t.flows == 0 => {
                        let quiet_for = now.saturating_sub(entry.updated_at_ms);
                        (quiet_for >= entry.settings.idle_timeout_secs * 1000)
                            .then_some(SessionState::Dormant)
                    }
                    SessionState::Dormant if t.flows > 0 => Some(SessionState::Active),
                    SessionState::Dormant => {
                        let since = entry.dormant_since_ms.unwrap_or(entry.updated_at_ms);
                        if now.saturating_sub(since) >= entry.settings.dormant_timeout_secs * 1000 {
                            dormant_expired.push(entry.id);
                        }
                        None
                    }
                    _ => None,
                };
                let Some(to) = to else { continue };
                let s = Arc::make_mut(entry);
                s.state = to;
                s.updated_at_ms = now;
                if to == SessionState::Dormant {
                    s.dormant_since_ms = Some(now);
                    out.went_dormant += 1;
                } else {
                    s.dormant_since_ms = None;
                    out.woke_up += 1;
                }
                let mut e = AuditEvent::new(AuditKind::StateChanged { from, to });
                e.session = Some(s.id);
                e.user = Some(s.identity.user().to_owned());
                e.source = Some(s.source);
                writes.push(Write::PutSession(Arc::clone(entry)));
                writes.push(Write::Audit(e));
            }
        }
        for (ids, cause, why) in [
            (&expired, EndCause::Expired, "absolute expiry reached"),
            (
                &dormant_expired,
                EndCause::DormantTimeout,
                "dormant timeout reached",
            ),
        ] {
            let (ended, end_writes) = self.end(
                ids,
                SessionState::Expired,
                cause,
                AuditKind::SessionExpired { reason: why.into() },
                "agent",
                why,
            )?;
            out.expired += ended.len();
            writes.extend(end_writes);
        }

        // Revocations whose job is done: the session ended and no flow of it is left (the
        // census has none, and the kernel's own count of its live flows is zero), or it
        // ended long ago. Its grants went when it ended, so nothing can open a flow for it;
        // a flow that still named the slot would be dropped (the slot's session id no longer
        // matches), never admitted. The slot then serves the next admission instead of
        // lingering for an hour. The kernel reads first: the table lock is not held across it.
        let revoked = self.enforcer.revoked();
        let stale: Vec<SessionId> = {
            let table = self.table();
            revoked
                .into_iter()
                .filter(|id| !traffic.contains_key(id))
                .filter(|id| match table.get(id) {
                    Some(s) => s.ended.as_ref().is_some_and(|e| {
                        now.saturating_sub(e.at_ms) > REVOCATION_LINGER_MS
                            || self
                                .enforcer
                                .session_stats(*id)
                                .is_some_and(|st| st.live_flows == 0)
                    }),
                    None => false,
                })
                .collect()
        };
        for id in stale {
            self.enforcer.release_session(id);
            out.revocations_dropped += 1;
        }

        if !writes.is_empty() {
            self.persist(writes).await?;
        }
        Ok(out)
    }

    /// Turns a kernel event into an audit record (and wakes a dormant session on a new flow).
    ///
    /// # Errors
    /// The store fails.
    pub async fn on_datapath_event(&self, ev: &DatapathEvent) -> Result<(), SessionError> {
        let policy = self.policy.current();
        let resource = policy
            .resources
            .by_id(ev.resource_id)
            .map(|r| r.name.clone());
        let session = (ev.session_id != 0)
            .then(|| self.get(SessionId(ev.session_id)))
            .flatten();
        let kind = match ev.kind {
            EventKind::FlowOpened => AuditKind::FlowOpened,
            EventKind::FlowDenied(reason) => AuditKind::FlowDenied {
                reason: reason.as_str().to_owned(),
            },
            EventKind::FirstDropAfterRevoke => AuditKind::FirstDropAfterTermination,
        };
        let mut e = AuditEvent::new(kind);
        e.session = (ev.session_id != 0).then_some(SessionId(ev.session_id));
        e.user = session.as_ref().map(|s| s.identity.user().to_owned());
        e.source = Some(ev.source.ip());
        e.resource = resource;
        e.detail = format!(
            "{} {} → {}{}",
            if ev.proto == agent_common::IPPROTO_UDP {
                "udp"
            } else {
                "tcp"
            },
            ev.source,
            ev.destination,
            if ev.monitor {
                " (monitor mode: passed)"
            } else {
                ""
            }
        );
        if ev.kind == EventKind::FirstDropAfterRevoke {
            tracing::info!(session = %SessionId(ev.session_id), flow = %e.detail, "first packet dropped after revocation");
        }
        self.record(vec![e]).await?;
        Ok(())
    }

    /// Makes the kernel match the store after a start: restores grants and revocations of
    /// the stored sessions, ends sessions that expired while the agent was down (or that the
    /// kernel already revoked: a revocation is never undone), and removes grants and flows
    /// that belong to no stored session (an admission that was never acknowledged).
    ///
    /// # Errors
    /// The kernel or the store fails.
    pub async fn reconcile(&self) -> Result<Reconciled, SessionError> {
        let now = now_ms();
        let mut r = Reconciled::default();
        let revoked_in_kernel: HashSet<SessionId> = self.enforcer.revoked().into_iter().collect();
        let mut expired = Vec::new();
        let mut already_revoked = Vec::new();
        let mut live: HashSet<SessionId> = HashSet::new();
        {
            let table = self.table();
            for s in table.values() {
                if s.is_live() {
                    if revoked_in_kernel.contains(&s.id) {
                        already_revoked.push(s.id);
                    } else if now >= s.expires_at_ms {
                        expired.push(s.id);
                    } else {
                        self.enforcer.grant(s.id, s.source, &s.grants)?;
                        r.grants_restored += s.grants.len();
                        live.insert(s.id);
                    }
                } else if let Some(end) = &s.ended
                    && now.saturating_sub(end.at_ms) <= REVOCATION_LINGER_MS
                    && !revoked_in_kernel.contains(&s.id)
                {
                    self.enforcer.revoke(s.id)?;
                    r.revocations_restored += 1;
                }
            }
        }
        r.live = live.len();
        let mut writes = Vec::new();
        for (ids, cause, why, state) in [
            (
                &expired,
                EndCause::Expired,
                "expired while the agent was down",
                SessionState::Expired,
            ),
            (
                &already_revoked,
                EndCause::Terminated {
                    by: "agent".into(),
                    reason: "found revoked in the kernel at start".into(),
                },
                "found revoked in the kernel at start",
                SessionState::Terminated,
            ),
        ] {
            let kind = if state == SessionState::Expired {
                AuditKind::SessionExpired { reason: why.into() }
            } else {
                AuditKind::SessionTerminated {
                    by: "agent".into(),
                    reason: why.into(),
                }
            };
            let (ended, end_writes) = self.end(ids, state, cause, kind, "agent", why)?;
            if state == SessionState::Expired {
                r.expired_while_down = ended.len();
            } else {
                r.revoked_in_kernel = ended.len();
            }
            writes.extend(end_writes);
        }
        for (source, resource_id, session) in self.enforcer.grants() {
            if !live.contains(&session) {
                self.enforcer.remove_grant(source, resource_id)?;
                r.orphan_grants_removed += 1;
            }
        }
        let known: HashSet<u64> = self.table().keys().map(|id| id.0).collect();
        r.orphan_flows_removed = self
            .enforcer
            .remove_flows(|_, f| {
                !known.contains(&f.session_id)
                    && !revoked_in_kernel.contains(&SessionId(f.session_id))
            })
            .len();
        // Slots of sessions the store does not know: their grants and flows went above (a
        // revoked one's flows stay until they idle out; its slot goes once they have).
        for id in self.enforcer.slot_holders() {
            if !known.contains(&id.0)
                && self
                    .enforcer
                    .session_stats(id)
                    .is_some_and(|st| st.live_flows == 0)
            {
                self.enforcer.release_session(id);
                r.orphan_slots_released += 1;
            }
        }
        if !writes.is_empty() {
            self.persist(writes).await?;
        }
        Ok(r)
    }
}
