//! The session table and its transitions: admission, reconnect and termination (continuous
//! evaluation on policy changes is in `reevaluation`). Every transition writes the kernel first (so enforcement is
//! never behind a decision), then the store (so it is durable before it is acknowledged).

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use crate::{
    audit::{
        Audit,
        event::{AuditEvent, AuditKind},
    },
    auth::reconnect,
    config::SessionsConfig,
    enforce::{EnforceError, Enforcer},
    identity::Identity,
    policy::PolicyHandle,
    sessions::{
        model::{EndCause, ReconnectState, Session, SessionEnd, SessionId, SessionState, now_ms},
        reevaluation::{Heirs, heirs_among},
    },
    store::{RevocationRecord, Store, StoreError, Write},
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("policy denies access: {reason}")]
    Denied { reason: String },
    #[error("reconnect refused: {reason}")]
    ReconnectRefused { code: &'static str, reason: String },
    #[error("no session {0}")]
    NotFound(SessionId),
    /// A denied token, a cut-off or a lock refuses the identity (see `crate::locks`).
    #[error("admission refused ({}): {}", refusal.code, refusal.detail)]
    Refused {
        user: String,
        refusal: crate::locks::Refusal,
    },
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error("the state store failed; nothing was changed: {0}")]
    Store(#[from] StoreError),
    /// The blocking thread doing the kernel work of `what` panicked (or the runtime is
    /// shutting down); what it did before that stands, and the sweep or the next start
    /// reconciles the rest.
    #[error("{what} stopped part way: its worker thread did not finish")]
    Interrupted { what: &'static str },
}

/// What an admission or a reconnect hands back to the client.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub session: Arc<Session>,
    /// Present when reconnect is enabled: the seed the client keeps to mint reconnect tokens.
    pub reconnect_seed: Option<String>,
}

/// Whom a termination is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Sessions(Vec<SessionId>),
    /// Every live session of a user (email or subject).
    User(String),
}

/// A session that a termination ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    pub id: SessionId,
    pub user: String,
    pub source: IpAddr,
}

pub struct Sessions {
    /// Sessions are shared, not copied, with the store's pending writes and with readers;
    /// a change copies one only if someone still holds the old version (`Arc::make_mut`).
    table: Mutex<HashMap<SessionId, Arc<Session>>>,
    pub(super) enforcer: Arc<Enforcer>,
    pub(super) store: Store,
    pub(super) audit: Audit,
    pub(super) policy: Arc<PolicyHandle>,
    pub(super) config: SessionsConfig,
    /// Locks, denied tokens and cut-offs, checked under the table lock at every admission.
    locks: Arc<crate::locks::Locks>,
}

pub(super) fn event(kind: AuditKind, s: &Session, detail: impl Into<String>) -> AuditEvent {
    let mut e = AuditEvent::new(kind);
    e.session = Some(s.id);
    e.user = Some(s.identity.user().to_owned());
    e.source = Some(s.source);
    e.detail = detail.into();
    e
}

impl Sessions {
    pub fn new(
        enforcer: Arc<Enforcer>,
        store: Store,
        audit: Audit,
        policy: Arc<PolicyHandle>,
        config: SessionsConfig,
        sessions: Vec<Session>,
    ) -> Self {
        let locks = Arc::new(crate::locks::Locks::load(&store));
        Self {
            locks,
            table: Mutex::new(sessions.into_iter().map(|s| (s.id, Arc::new(s))).collect()),
            enforcer,
            store,
            audit,
            policy,
            config,
        }
    }

    pub(super) fn table(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn enforcer(&self) -> &Arc<Enforcer> {
        &self.enforcer
    }

    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    pub fn policy(&self) -> &Arc<PolicyHandle> {
        &self.policy
    }

    /// The locks, denied tokens and cut-offs in force (see `crate::locks`).
    pub fn locks(&self) -> &Arc<crate::locks::Locks> {
        &self.locks
    }

    /// Commits writes durably (for the rooms that keep their records in the store beside the
    /// sessions, such as locks).
    ///
    /// # Errors
    /// The store fails; nothing was written.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.persist(writes).await
    }

    /// Commits writes durably; the store announces their audit events to subscribers.
    pub(super) async fn persist(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        match self.store.submit(writes).await {
            Ok(result) => result.map(drop),
            Err(_) => Err(StoreError::Closed {
                path: self.store.path().to_owned(),
            }),
        }
    }

    /// Records audit events on their own (no session write with them).
    pub async fn record(&self, events: Vec<AuditEvent>) -> Result<(), StoreError> {
        self.persist(events.into_iter().map(Write::Audit).collect())
            .await
    }

    /// Admits a verified identity from `source`: evaluates policy, writes the grants, stores
    /// the session and answers only once it is durable.
    ///
    /// # Errors
    /// Policy denies everything, the kernel refuses the grants, or the store fails (then the
    /// grants are withdrawn again and nothing remains).
    pub async fn admit(
        &self,
        identity: Identity,
        source: IpAddr,
    ) -> Result<Admitted, SessionError> {
        let decided = self.decide(identity, source);
        if let Err(SessionError::Refused { user, refusal }) = &decided {
            let mut e = AuditEvent::new(AuditKind::AdmissionRejected {
                reason: refusal.code.to_owned(),
            });
            e.user = Some(user.clone());
            e.source = Some(source);
            e.detail = refusal.detail.clone();
            self.record(vec![e]).await?;
        }
        let (session, reconnect_seed) = match decided? {
            Ok(admitted) => admitted,
            Err((identity, reason)) => {
                let mut e = AuditEvent::new(AuditKind::AdmissionDenied {
                    reason: reason.clone(),
                });
                e.user = Some(identity.user().to_owned());
                e.source = Some(source);
                self.record(vec![e]).await?;
                return Err(SessionError::Denied { reason });
            }
        };
        let resources: Vec<&str> = session.grants.iter().map(|g| g.resource.as_str()).collect();
        let admitted = event(
            AuditKind::SessionAdmitted,
            &session,
            format!("granted {}", resources.join(", ")),
        );
        if let Err(e) = self
            .persist(vec![
                Write::PutSession(Arc::clone(&session)),
                Write::Audit(admitted),
            ])
            .await
        {
            self.table().remove(&session.id);
            for g in &session.grants {
                let _ = self.enforcer.withdraw(session.id, source, g.resource_id);
            }
            return Err(e.into());
        }
        Ok(Admitted {
            session,
            reconnect_seed,
        })
    }

    /// The first half of an admission: evaluated, written to the kernel and entered in the
    /// table under the table lock, so that a concurrent policy change either sees this session
    /// (and re-evaluates it) or was decided before it: never a session granted by a policy
    /// already replaced. A denial hands the identity back with the reason.
    #[allow(clippy::type_complexity)]
    fn decide(
        &self,
        identity: Identity,
        source: IpAddr,
    ) -> Result<Result<(Arc<Session>, Option<String>), (Identity, String)>, SessionError> {
        let mut table = self.table();
        if let Some(refusal) = self.locks.check(&identity, source, None) {
            return Err(SessionError::Refused {
                user: identity.user().to_owned(),
                refusal,
            });
        }
        let decision = self.policy.current().evaluate(&identity, source);
        if decision.grants.is_empty() {
            let reason = decision
                .denied_reason
                .unwrap_or_else(|| "no rule grants this identity anything".into());
            return Ok(Err((identity, reason)));
        }
        let now = now_ms();
        let settings = decision.settings;
        let expires_at_ms = (now + settings.max_duration_secs * 1000)
            .min(identity.token_expires_at.saturating_mul(1000));
        let reconnect_seed = settings.reconnect.then(reconnect::new_seed);
        let session = Session {
            id: SessionId::random(),
            state: SessionState::Active,
            identity,
            source,
            previous_sources: Vec::new(),
            created_at_ms: now,
            updated_at_ms: now,
            expires_at_ms,
            dormant_since_ms: None,
            grants: decision.grants,
            settings,
            reconnect: reconnect_seed.clone().map(|seed_hex| ReconnectState {
                seed_hex,
                last_counter: 0,
            }),
            ended: None,
        };
        self.enforcer.grant(session.id, source, &session.grants)?;
        let session = Arc::new(session);
        table.insert(session.id, Arc::clone(&session));
        Ok(Ok((session, reconnect_seed)))
    }

    /// Re-admits a live session with a reconnect token, possibly from a new source address.
    ///
    /// # Errors
    /// The token is malformed, forged, replayed or stale; the session is unknown, not live,
    /// or has reconnect disabled; or the kernel or store fails.
    pub async fn reconnect(&self, token: &str, source: IpAddr) -> Result<Admitted, SessionError> {
        let refuse =
            |code: &'static str, reason: String| SessionError::ReconnectRefused { code, reason };
        let id = reconnect::session_of(token).map_err(|e| refuse(e.code(), e.to_string()))?;
        let now = now_ms();
        let (session, old_source) = {
            let mut table = self.table();
            let Some(entry) = table.get_mut(&id) else {
                return Err(refuse("unknown_session", format!("no session {id}")));
            };
            if !entry.is_live() {
                return Err(refuse(
                    "session_ended",
                    format!("session {id} is {}: log in again", entry.state),
                ));
            }
            if let Some(r) = self.locks.check(&entry.identity, source, Some(id)) {
                return Err(refuse(r.code, r.client_message));
            }
            let Some(seen) = entry.reconnect.as_ref() else {
                return Err(refuse(
                    "reconnect_disabled",
                    format!("session {id} was admitted without reconnect"),
                ));
            };
            let counter = reconnect::check(token, &seen.seed_hex, seen.last_counter, now / 1000)
                .map_err(|e| refuse(e.code(), e.to_string()))?;
            let s = Arc::make_mut(entry);
            if let Some(rc) = s.reconnect.as_mut() {
                rc.last_counter = counter;
            }
            let old_source = s.source;
            if source != old_source {
                // A new address is a new evaluation: rules may restrict sources.
                let decision = self.policy.current().evaluate(&s.identity, source);
                let allowed: HashSet<&str> = decision
                    .grants
                    .iter()
                    .map(|g| g.resource.as_str())
                    .collect();
                if s.grants
                    .iter()
                    .any(|g| !allowed.contains(g.resource.as_str()))
                {
                    return Err(refuse(
                        "source_not_allowed",
                        format!(
                            "policy does not grant session {id} its resources from {source}: log in again from there"
                        ),
                    ));
                }
                self.enforcer.grant(id, source, &s.grants)?;
                for g in &s.grants {
                    let _ = self.enforcer.withdraw(id, old_source, g.resource_id);
                }
                s.previous_sources.push(old_source);
                s.source = source;
            }
            s.state = SessionState::Active;
            s.dormant_since_ms = None;
            s.updated_at_ms = now;
            (Arc::clone(entry), old_source)
        };
        let detail = if old_source == source {
            "reconnected".to_owned()
        } else {
            format!("reconnected, moved from {old_source}")
        };
        let e = event(AuditKind::SessionReconnected, &session, detail);
        self.persist(vec![
            Write::PutSession(Arc::clone(&session)),
            Write::Audit(e),
        ])
        .await?;
        Ok(Admitted {
            session,
            reconnect_seed: None,
        })
    }

    /// Ends live sessions now: the kernel revocation comes first (one write severs every flow
    /// on its next packet), then the grants go, then the record is made durable. The kernel
    /// work runs on a blocking thread, never on the async workers.
    ///
    /// # Errors
    /// An id is unknown, or the kernel or store fails.
    pub async fn terminate(
        self: &Arc<Self>,
        target: &Target,
        by: &str,
        reason: &str,
    ) -> Result<Vec<Ended>, SessionError> {
        let cause = EndCause::Terminated {
            by: by.to_owned(),
            reason: reason.to_owned(),
        };
        let kind = AuditKind::SessionTerminated {
            by: by.to_owned(),
            reason: reason.to_owned(),
        };
        let ids: Vec<SessionId> = {
            let table = self.table();
            match target {
                Target::Sessions(ids) => {
                    if let Some(missing) = ids.iter().find(|id| !table.contains_key(id)) {
                        return Err(SessionError::NotFound(*missing));
                    }
                    ids.clone()
                }
                Target::User(user) => table
                    .values()
                    .filter(|s| s.is_live() && s.identity.is(user))
                    .map(|s| s.id)
                    .collect(),
            }
        };
        // Kernel writes, the heirs of freed grants and socket teardown: off the async workers.
        let this = Arc::clone(self);
        let (by, reason) = (by.to_owned(), reason.to_owned());
        let (ended, writes) = tokio::task::spawn_blocking(move || {
            this.end(&ids, SessionState::Terminated, cause, kind, &by, &reason)
        })
        .await
        .map_err(|_| SessionError::Interrupted {
            what: "terminating sessions",
        })??;
        self.persist(writes).await?;
        Ok(ended)
    }

    /// Moves live sessions to a final state in memory and the kernel; returns them and the
    /// writes that make it durable. Sessions already ended are left alone.
    pub(super) fn end(
        &self,
        ids: &[SessionId],
        state: SessionState,
        cause: EndCause,
        kind: AuditKind,
        by: &str,
        reason: &str,
    ) -> Result<(Vec<Ended>, Vec<Write>), SessionError> {
        let now = now_ms();
        let mut ended = Vec::new();
        let mut writes = Vec::new();
        let mut freed: foldhash::HashSet<(IpAddr, u32)> = foldhash::HashSet::default();
        let mut table = self.table();
        for id in ids {
            let Some(entry) = table.get_mut(id) else {
                continue;
            };
            if !entry.is_live() {
                continue;
            }
            self.enforcer.revoke(*id)?;
            let s = Arc::make_mut(entry);
            freed.extend(s.grants.iter().map(|g| (s.source, g.resource_id)));
            s.state = state;
            s.updated_at_ms = now;
            s.ended = Some(SessionEnd {
                at_ms: now,
                cause: cause.clone(),
            });
            ended.push(Ended {
                id: *id,
                user: s.identity.user().to_owned(),
                source: s.source,
            });
            writes.push(Write::PutSession(Arc::clone(entry)));
            writes.push(Write::PutRevocation(
                *id,
                RevocationRecord {
                    at_ms: now,
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                },
            ));
            writes.push(Write::Audit(event(kind.clone(), entry, reason)));
        }
        // The revocations above already stop every flow; the grants go (or pass to another
        // live session from the same source) so that no new flow opens.
        self.reassign(&table, &freed)?;
        drop(table);
        if !ended.is_empty() {
            let ids: HashSet<u64> = ended.iter().map(|e| e.id.0).collect();
            tear_down_sockets(&self.enforcer, &ids);
            // A flow the kernel opened just before the revocation may still have its event on
            // the way to the flow index. A revoked session opens no new flow, so one more
            // look once those events are in finds every socket left.
            let enforcer = Arc::clone(&self.enforcer);
            let late = std::thread::Builder::new()
                .name("late-sockets".into())
                .spawn(move || {
                    std::thread::sleep(LATE_EVENTS);
                    tear_down_sockets(&enforcer, &ids);
                });
            if let Err(e) = late {
                tracing::warn!(error = %e, "cannot start the second look for sockets of ended sessions");
            }
        }
        Ok((ended, writes))
    }

    /// Makes the kernel's grants for `freed` (source, resource) pairs follow the table: a
    /// grant is one kernel entry per pair, so when the session holding it loses it, the newest
    /// live session from the same source that still holds the resource gets the entry, and
    /// pairs nobody holds any more are deleted (in one batch). One pass over the table.
    fn reassign(
        &self,
        table: &HashMap<SessionId, Arc<Session>>,
        freed: &foldhash::HashSet<(IpAddr, u32)>,
    ) -> Result<(), EnforceError> {
        if freed.is_empty() {
            return Ok(());
        }
        let heirs = heirs_among(table.values().map(|s| &**s), freed);
        self.hand_over(freed, heirs)
    }

    /// Writes [`heirs_among`]'s findings to the kernel: each freed key with an heir is
    /// granted to it, the others are withdrawn.
    pub(super) fn hand_over(
        &self,
        freed: &foldhash::HashSet<(IpAddr, u32)>,
        heirs: Heirs<'_>,
    ) -> Result<(), EnforceError> {
        if freed.is_empty() {
            return Ok(());
        }
        let orphaned: Vec<(IpAddr, u32)> = freed
            .iter()
            .filter(|key| !heirs.contains_key(key))
            .copied()
            .collect();
        self.enforcer.withdraw_all(&orphaned)?;
        for ((source, _), (_, heir, grant)) in heirs {
            self.enforcer
                .grant(heir, source, std::slice::from_ref(grant))?;
        }
        Ok(())
    }

    /// One session, as it is now.
    pub fn get(&self, id: SessionId) -> Option<Arc<Session>> {
        self.table().get(&id).cloned()
    }

    /// Every session the agent holds (live and ended), shared rather than copied.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.table().values().cloned().collect()
    }

    pub fn live_count(&self) -> usize {
        self.table().values().filter(|s| s.is_live()).count()
    }
}

/// How long after a termination the sockets of its flows are looked for once more: the
/// kernel's flow-opened events are read within milliseconds of being written.
const LATE_EVENTS: std::time::Duration = std::time::Duration::from_millis(250);

/// Destroys the local sockets of these sessions' flows (see [`Enforcer::destroy_sockets`]).
fn tear_down_sockets(enforcer: &Enforcer, ids: &HashSet<u64>) {
    match enforcer.destroy_sockets(ids) {
        Ok(d) if d.destroyed > 0 => tracing::debug!(
            destroyed = d.destroyed,
            "local sockets of ended sessions torn down"
        ),
        Ok(_) => {}
        // The kernel already drops every packet; only the prompt notice is lost.
        Err(e) => {
            tracing::warn!(error = %e, "cannot tear down local sockets of ended sessions")
        }
    }
}
