//! The session table and its transitions: admission, reconnect, termination and continuous
//! evaluation on policy changes. Every transition writes the kernel first (so enforcement is
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
    config::{OnPolicyChange, SessionsConfig},
    enforce::{EnforceError, Enforcer},
    identity::Identity,
    policy::{Policy, PolicyHandle},
    sessions::model::{
        EndCause, ReconnectState, Session, SessionEnd, SessionGrant, SessionId, SessionState,
        now_ms,
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
    #[error(transparent)]
    Enforce(#[from] EnforceError),
    #[error("the state store failed; nothing was changed: {0}")]
    Store(#[from] StoreError),
}

/// What an admission or a reconnect hands back to the client.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub session: Session,
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
    table: Mutex<HashMap<SessionId, Session>>,
    pub(super) enforcer: Arc<Enforcer>,
    pub(super) store: Store,
    pub(super) audit: Audit,
    pub(super) policy: Arc<PolicyHandle>,
    pub(super) config: SessionsConfig,
}

fn event(kind: AuditKind, s: &Session, detail: impl Into<String>) -> AuditEvent {
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
        Self {
            table: Mutex::new(sessions.into_iter().map(|s| (s.id, s)).collect()),
            enforcer,
            store,
            audit,
            policy,
            config,
        }
    }

    pub(super) fn table(&self) -> MutexGuard<'_, HashMap<SessionId, Session>> {
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
        let policy = self.policy.current();
        let decision = policy.evaluate(&identity, source);
        if decision.grants.is_empty() {
            let reason = decision
                .denied_reason
                .unwrap_or_else(|| "no rule grants this identity anything".into());
            let mut e = AuditEvent::new(AuditKind::AdmissionDenied {
                reason: reason.clone(),
            });
            e.user = Some(identity.user().to_owned());
            e.source = Some(source);
            self.record(vec![e]).await?;
            return Err(SessionError::Denied { reason });
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
        self.table().insert(session.id, session.clone());
        let resources: Vec<&str> = session.grants.iter().map(|g| g.resource.as_str()).collect();
        let admitted = event(
            AuditKind::SessionAdmitted,
            &session,
            format!("granted {}", resources.join(", ")),
        );
        if let Err(e) = self
            .persist(vec![
                Write::PutSession(session.clone()),
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
            let Some(s) = table.get_mut(&id) else {
                return Err(refuse("unknown_session", format!("no session {id}")));
            };
            if !s.is_live() {
                return Err(refuse(
                    "session_ended",
                    format!("session {id} is {}: log in again", s.state),
                ));
            }
            let Some(rc) = s.reconnect.as_mut() else {
                return Err(refuse(
                    "reconnect_disabled",
                    format!("session {id} was admitted without reconnect"),
                ));
            };
            let counter = reconnect::check(token, &rc.seed_hex, rc.last_counter, now / 1000)
                .map_err(|e| refuse(e.code(), e.to_string()))?;
            rc.last_counter = counter;
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
            (s.clone(), old_source)
        };
        let detail = if old_source == source {
            "reconnected".to_owned()
        } else {
            format!("reconnected, moved from {old_source}")
        };
        let e = event(AuditKind::SessionReconnected, &session, detail);
        self.persist(vec![Write::PutSession(session.clone()), Write::Audit(e)])
            .await?;
        Ok(Admitted {
            session,
            reconnect_seed: None,
        })
    }

    /// Ends live sessions now: the kernel revocation comes first (one write severs every flow
    /// on its next packet), then the grants go, then the record is made durable.
    ///
    /// # Errors
    /// An id is unknown, or the kernel or store fails.
    pub async fn terminate(
        &self,
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
        let ended = self.end(&ids, SessionState::Terminated, cause, kind, by, reason)?;
        self.persist(ended.1).await?;
        Ok(ended.0)
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
        let mut handovers = Vec::new();
        let mut table = self.table();
        for id in ids {
            let Some(s) = table.get_mut(id) else { continue };
            if !s.is_live() {
                continue;
            }
            self.enforcer.revoke(*id)?;
            for g in &s.grants {
                let _ = self.enforcer.withdraw(*id, s.source, g.resource_id);
            }
            handovers.push((s.source, s.grants.clone()));
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
            writes.push(Write::PutSession(s.clone()));
            writes.push(Write::PutRevocation(
                *id,
                RevocationRecord {
                    at_ms: now,
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                },
            ));
            writes.push(Write::Audit(event(kind.clone(), s, reason)));
        }
        // A grant is one kernel entry per (source, resource): when the session holding it
        // ends, another live session from the same source that was granted the resource
        // (the newest) gets the entry back, instead of silently losing access.
        // One pass over the table for all freed (source, resource) pairs: the ending sessions
        // may be many, and the table large.
        let freed: HashSet<(IpAddr, u32)> = handovers
            .iter()
            .flat_map(|(source, grants)| grants.iter().map(move |g| (*source, g.resource_id)))
            .collect();
        if !freed.is_empty() {
            let mut heirs: HashMap<(IpAddr, u32), (u64, SessionId, SessionGrant)> = HashMap::new();
            for o in table.values().filter(|o| o.is_live()) {
                for g in &o.grants {
                    let key = (o.source, g.resource_id);
                    if freed.contains(&key)
                        && heirs
                            .get(&key)
                            .is_none_or(|(at, _, _)| o.created_at_ms > *at)
                    {
                        heirs.insert(key, (o.created_at_ms, o.id, g.clone()));
                    }
                }
            }
            for ((source, _), (_, heir, grant)) in heirs {
                let _ = self
                    .enforcer
                    .grant(heir, source, std::slice::from_ref(&grant));
            }
        }
        drop(table);
        if !ended.is_empty() {
            let ids: HashSet<u64> = ended.iter().map(|e| e.id.0).collect();
            match self.enforcer.destroy_sockets(&ids) {
                Ok(d) => tracing::debug!(
                    destroyed = d.destroyed,
                    "local sockets of ended sessions torn down"
                ),
                // The kernel already drops every packet; only the prompt notice is lost.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot tear down local sockets of ended sessions")
                }
            }
        }
        Ok((ended, writes))
    }

    /// Continuous evaluation: every live session against `policy`. Grants the policy no longer
    /// allows are withdrawn and, unless configured otherwise, their live flows severed; a
    /// session left with nothing is terminated. A policy change never widens a live session:
    /// new grants need a new login.
    ///
    /// # Errors
    /// The kernel or the store fails.
    pub async fn apply_policy(&self, policy: &Policy) -> Result<PolicyOutcome, SessionError> {
        let reason = "policy change".to_owned();
        let now = now_ms();
        let mut outcome = PolicyOutcome::default();
        let mut writes = Vec::new();
        let mut severed: HashSet<(u64, u32)> = HashSet::new();
        let mut emptied = Vec::new();
        {
            let mut table = self.table();
            for s in table.values_mut().filter(|s| s.is_live()) {
                outcome.evaluated += 1;
                let decision = policy.evaluate(&s.identity, s.source);
                let still: HashSet<&str> = decision
                    .grants
                    .iter()
                    .map(|g| g.resource.as_str())
                    .collect();
                let (kept, removed): (Vec<SessionGrant>, Vec<SessionGrant>) =
                    s.grants.drain(..).partition(|g| {
                        still.contains(g.resource.as_str())
                            && policy.resources.by_id(g.resource_id).is_some()
                    });
                s.grants = kept;
                if removed.is_empty() {
                    continue;
                }
                for g in &removed {
                    self.enforcer.withdraw(s.id, s.source, g.resource_id)?;
                    if self.config.on_policy_change == OnPolicyChange::Sever {
                        severed.insert((s.id.0, g.resource_id));
                    }
                    outcome.grants_removed += 1;
                    let mut e = event(
                        AuditKind::GrantRemoved {
                            reason: reason.clone(),
                        },
                        s,
                        format!("{} is no longer granted by policy", g.resource),
                    );
                    e.resource = Some(g.resource.clone());
                    writes.push(Write::Audit(e));
                }
                s.updated_at_ms = now;
                if s.grants.is_empty() {
                    emptied.push(s.id);
                } else {
                    writes.push(Write::PutSession(s.clone()));
                }
            }
        }
        if !severed.is_empty() {
            if let Err(e) = self
                .enforcer
                .destroy_sockets_where(|f| severed.contains(&(f.session_id, f.resource_id)))
            {
                tracing::warn!(error = %e, "cannot tear down local sockets of severed flows");
            }
            outcome.flows_severed = self
                .enforcer
                .remove_flows(|_, f| severed.contains(&(f.session_id, f.resource_id)))
                .len();
        }
        let (ended, end_writes) = self.end(
            &emptied,
            SessionState::Terminated,
            EndCause::PolicyChange {
                reason: reason.clone(),
            },
            AuditKind::SessionTerminated {
                by: "policy".into(),
                reason: reason.clone(),
            },
            "policy",
            "policy change left nothing to reach",
        )?;
        outcome.sessions_terminated = ended.len();
        writes.extend(end_writes);
        if !writes.is_empty() {
            self.persist(writes).await?;
        }
        Ok(outcome)
    }

    /// A copy of one session.
    pub fn get(&self, id: SessionId) -> Option<Session> {
        self.table().get(&id).cloned()
    }

    /// Copies of every session the agent holds (live and ended).
    pub fn all(&self) -> Vec<Session> {
        self.table().values().cloned().collect()
    }

    pub fn live_count(&self) -> usize {
        self.table().values().filter(|s| s.is_live()).count()
    }
}

/// What a policy change did to the live sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyOutcome {
    pub evaluated: usize,
    pub grants_removed: usize,
    pub flows_severed: usize,
    pub sessions_terminated: usize,
}
