//! Identity-provider signals applied to sessions: ending the sessions a security event
//! names, and changing what an identity provider says about a live session (its claims, its
//! device's posture) and then holding every live session to policy again through the same
//! continuous evaluation a policy change uses: only what policy no longer allows is severed.

use std::{
    collections::HashMap,
    sync::{Arc, PoisonError},
};

use super::{
    PolicyOutcome, SessionError, Sessions,
    manager::event,
    model::{Session, SessionId, now_ms},
};
use crate::{
    audit::event::AuditKind,
    identity::Identity,
    store::{AppliedSignal, Write},
};

/// What re-evaluating after an identity change did to each session it changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IdentityChange {
    /// Sessions whose identity changed (live when the change was made).
    pub updated: Vec<SessionId>,
    /// Of those, each one that lost grants, with the resources it lost.
    pub lost: Vec<(SessionId, Vec<String>)>,
    /// Of those, the ones the change left with nothing, now terminated.
    pub terminated: Vec<SessionId>,
    pub outcome: PolicyOutcome,
}

impl Sessions {
    /// Changes the identity of the live sessions `ids` with `update` (new claims, a device's
    /// new posture), then re-evaluates every live session against the policy in force, as a
    /// policy change does: grants the policy no longer allows are withdrawn and their flows
    /// severed; a session left with nothing is terminated; nothing is ever widened. The
    /// changed records and `extra` are durable when it returns.
    ///
    /// # Errors
    /// The kernel or the store fails.
    pub async fn update_identities(
        self: &Arc<Self>,
        ids: Vec<SessionId>,
        update: impl Fn(&mut Identity) + Send + 'static,
        extra: Vec<Write>,
    ) -> Result<IdentityChange, SessionError> {
        let this = Arc::clone(self);
        let (change, before) = tokio::task::spawn_blocking(move || {
            let mut before: HashMap<SessionId, Vec<String>> = HashMap::new();
            {
                let mut table = this.table();
                for id in &ids {
                    let Some(entry) = table.get_mut(id) else {
                        continue;
                    };
                    if !entry.is_live() {
                        continue;
                    }
                    before.insert(
                        *id,
                        entry.grants.iter().map(|g| g.resource.clone()).collect(),
                    );
                    let s = Arc::make_mut(entry);
                    // Refiled under its new names: a lock or a signal naming its new group
                    // or device must find it, and its old ones no longer.
                    let mut by_identity = this.by_identity();
                    by_identity.unfile(s.id, &s.identity);
                    update(&mut s.identity);
                    by_identity.file(s.id, &s.identity);
                    s.updated_at_ms = now_ms();
                }
            }
            let policy = this.policy.current();
            let change = this.enforce_identity_change(&policy)?;
            Ok::<_, SessionError>((change, before))
        })
        .await
        .map_err(|_| SessionError::Interrupted {
            what: "re-evaluating sessions for a signal",
        })??;
        let outcome = change.outcome;
        self.record_policy_change(change).await?;
        let mut result = IdentityChange {
            outcome,
            ..IdentityChange::default()
        };
        let mut writes = extra;
        {
            let table = self.table();
            for (id, had) in before {
                let Some(now) = table.get(&id) else { continue };
                result.updated.push(id);
                if now.is_live() {
                    // The new identity is what a restart must evaluate again.
                    writes.push(Write::PutSession(Arc::clone(now)));
                    let lost: Vec<String> = had
                        .into_iter()
                        .filter(|r| !now.grants_resource(r))
                        .collect();
                    if !lost.is_empty() {
                        result.lost.push((id, lost));
                    }
                } else {
                    result.terminated.push(id);
                    result.lost.push((id, had));
                }
            }
        }
        self.persist(writes).await?;
        Ok(result)
    }

    /// Records what identity providers say about a device: new logins from it are evaluated
    /// with this compliance, whatever their token claims.
    pub fn set_device_posture(&self, device: String, compliant: bool) {
        self.device_posture
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(device, compliant);
    }

    /// The identity with the device posture identity providers reported since the token was
    /// issued (a token minted before a device fell out of compliance still says it complies).
    pub(super) fn with_signal_posture(&self, mut identity: Identity) -> Identity {
        if let Some(device) = &identity.device.id {
            let known = self
                .device_posture
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .get(device)
                .copied();
            // A signal only narrows: "not compliant" overrides the token, "compliant" merely
            // cancels an earlier "not compliant" and never vouches for a device the token did
            // not (any configured transmitter can name any device id).
            if known == Some(false) {
                identity.device.compliant = Some(false);
            }
        }
        identity
    }

    /// The signals applied to a session, oldest first (empty when the store cannot say).
    pub fn applied_signals(&self, id: SessionId) -> Vec<AppliedSignal> {
        self.store.signals_applied(id).unwrap_or_else(|e| {
            tracing::warn!(session = %id, error = %e, "cannot read the signals applied to a session");
            Vec::new()
        })
    }

    /// An audit event about a session, for the signals room.
    pub fn session_event(
        &self,
        kind: AuditKind,
        s: &Session,
        detail: String,
    ) -> crate::audit::event::AuditEvent {
        event(kind, s, detail)
    }
}
