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
    datapath::DatapathError,
    enforce::{EnforceError, Enforcer},
    identity::Identity,
    policy::PolicyHandle,
    sessions::{
        by_identity::{ByIdentity, Lookup, Name},
        model::{EndCause, ReconnectState, Session, SessionEnd, SessionId, SessionState, now_ms},
        reevaluation::{Heirs, heirs_among},
    },
    store::{RecordedEnd, RevocationRecord, Store, StoreError, Write},
};

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("policy denies access: {reason}")]
    Denied { reason: String },
    #[error("reconnect refused: {reason}")]
    ReconnectRefused { code: &'static str, reason: String },
    #[error("no session {0}")]
    NotFound(SessionId),
    /// Every slot of the kernel's session table is held by a session: the admission is
    /// refused (fail closed), no other session's slot is taken.
    #[error(
        "the session table is full: all {capacity} session slots are held; end sessions or \
         raise [datapath] session_slots"
    )]
    SessionTableFull { capacity: u32 },
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

/// The sessions from one source address: nearly always one, held without an allocation of
/// its own (100,000 single-session sources cost a vector each otherwise).
#[derive(Debug)]
enum FromSource {
    One(SessionId),
    Many(Vec<SessionId>),
}

impl FromSource {
    fn ids(&self) -> &[SessionId] {
        match self {
            Self::One(id) => std::slice::from_ref(id),
            Self::Many(ids) => ids,
        }
    }

    /// Takes `id` off; true when none is left.
    fn remove(&mut self, id: SessionId) -> bool {
        match self {
            Self::One(only) => *only == id,
            Self::Many(ids) => {
                ids.retain(|i| *i != id);
                match ids[..] {
                    [] => true,
                    [last] => {
                        *self = Self::One(last);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

fn file(by_source: &mut foldhash::HashMap<IpAddr, FromSource>, id: SessionId, source: IpAddr) {
    match by_source.get_mut(&source) {
        None => {
            by_source.insert(source, FromSource::One(id));
        }
        Some(FromSource::One(first)) => {
            let first = *first;
            by_source.insert(source, FromSource::Many(vec![first, id]));
        }
        Some(FromSource::Many(ids)) => ids.push(id),
    }
}

pub struct Sessions {
    /// Sessions are shared, not copied, with the store's pending writes and with readers;
    /// a change copies one only if someone still holds the old version (`Arc::make_mut`).
    table: Mutex<HashMap<SessionId, Arc<Session>>>,
    /// Every session in the table by its current source address, so that the heirs of an
    /// ended session's grants are looked for among the sessions from its source, not in the
    /// whole table. Changed only while the table lock is held (table first, then this), so
    /// the two agree for anyone holding the table lock.
    by_source: Mutex<foldhash::HashMap<IpAddr, FromSource>>,
    /// Every session in the table by the identity values locks and signals name, kept like
    /// `by_source` (changed only under the table lock, table first).
    by_identity: Mutex<ByIdentity>,
    pub(super) enforcer: Arc<Enforcer>,
    pub(super) store: Store,
    pub(super) audit: Audit,
    pub(super) policy: Arc<PolicyHandle>,
    pub(super) config: SessionsConfig,
    /// Locks, denied tokens and cut-offs, checked under the table lock at every admission.
    locks: Arc<crate::locks::Locks>,
    /// Device id → compliance, as identity providers reported it by signal (see `signals`).
    pub(super) device_posture: std::sync::RwLock<HashMap<String, bool>>,
    /// The identity of each user's last admission the policy denied (claims, never the
    /// token), in memory only and bounded, so that `policy explain --user` can explain a
    /// user who was only ever refused.
    refused: Mutex<HashMap<String, Refused>>,
}

/// A user's last admission the policy denied: the identity it presented, from where, when.
#[derive(Debug, Clone)]
pub struct Refused {
    pub identity: Identity,
    pub source: IpAddr,
    pub at_ms: u64,
}

/// How many users' last refused admissions are kept for `policy explain`.
const REFUSED_KEPT: usize = 10_000;

/// The reason code of an admission refused because every session slot is held.
pub const SESSION_TABLE_FULL: &str = "session_table_full";

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
        let mut by_source: foldhash::HashMap<IpAddr, FromSource> = Default::default();
        let mut by_identity = ByIdentity::default();
        for s in &sessions {
            file(&mut by_source, s.id, s.source);
            by_identity.file(s.id, &s.identity);
        }
        let locks = Arc::new(crate::locks::Locks::load(&store));
        Self {
            locks,
            table: Mutex::new(sessions.into_iter().map(|s| (s.id, Arc::new(s))).collect()),
            by_source: Mutex::new(by_source),
            by_identity: Mutex::new(by_identity),
            enforcer,
            store,
            audit,
            policy,
            config,
            device_posture: Default::default(),
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// The last admission of `user` that the policy denied, if the agent saw one since start.
    pub fn last_refused(&self, user: &str) -> Option<Refused> {
        self.refused
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&user.to_lowercase())
            .cloned()
    }

    fn remember_refused(&self, identity: Identity, source: IpAddr) {
        let mut kept = self.refused.lock().unwrap_or_else(|e| e.into_inner());
        let user = identity.user().to_lowercase();
        if kept.len() >= REFUSED_KEPT && !kept.contains_key(&user) {
            // Full: the oldest goes (a scan, only when full and a new user is refused).
            if let Some(oldest) = kept
                .iter()
                .min_by_key(|(_, r)| r.at_ms)
                .map(|(u, _)| u.clone())
            {
                kept.remove(&oldest);
            }
        }
        kept.insert(
            user,
            Refused {
                identity,
                source,
                at_ms: now_ms(),
            },
        );
    }

    pub(super) fn table(&self) -> MutexGuard<'_, HashMap<SessionId, Arc<Session>>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn by_source(&self) -> MutexGuard<'_, foldhash::HashMap<IpAddr, FromSource>> {
        self.by_source.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Files `id` under `source` (call with the table lock held).
    fn file_source(&self, id: SessionId, source: IpAddr) {
        file(&mut self.by_source(), id, source);
    }

    /// The identity index (take it with the table lock held, table first).
    pub(super) fn by_identity(&self) -> MutexGuard<'_, ByIdentity> {
        self.by_identity.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `id` off `source`'s list (call with the table lock held).
    fn unfile_source(&self, id: SessionId, source: IpAddr) {
        let mut by_source = self.by_source();
        if by_source.get_mut(&source).is_some_and(|ids| ids.remove(id)) {
            by_source.remove(&source);
        }
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
        let user = identity.user().to_owned();
        let decided = match self.decide(identity, source) {
            Err(SessionError::Enforce(EnforceError::Kernel {
                source: DatapathError::SessionTableFull { capacity },
                ..
            })) => {
                let refused = SessionError::SessionTableFull { capacity };
                let mut e = AuditEvent::new(AuditKind::AdmissionRejected {
                    reason: SESSION_TABLE_FULL.into(),
                });
                e.user = Some(user);
                e.source = Some(source);
                e.detail = refused.to_string();
                tracing::warn!(%source, capacity, "admission refused: the session table is full");
                self.record(vec![e]).await?;
                return Err(refused);
            }
            Err(SessionError::Refused { user, refusal }) => {
                let mut e = AuditEvent::new(AuditKind::AdmissionRejected {
                    reason: refusal.code.to_owned(),
                });
                e.user = Some(user.clone());
                e.source = Some(source);
                e.detail = refusal.detail.clone();
                self.record(vec![e]).await?;
                return Err(SessionError::Refused { user, refusal });
            }
            other => other?,
        };
        let (session, reconnect_seed) = match decided {
            Ok(admitted) => admitted,
            Err((identity, reason)) => {
                let mut e = AuditEvent::new(AuditKind::AdmissionDenied {
                    reason: reason.clone(),
                });
                e.user = Some(identity.user().to_owned());
                e.source = Some(source);
                self.record(vec![e]).await?;
                self.remember_refused(identity, source);
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
            let mut table = self.table();
            table.remove(&session.id);
            self.unfile_source(session.id, source);
            self.by_identity().unfile(session.id, &session.identity);
            drop(table);
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
        let identity = self.with_signal_posture(identity);
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
        self.file_source(session.id, source);
        self.by_identity().file(session.id, &session.identity);
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
                self.unfile_source(id, old_source);
                self.file_source(id, source);
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
        let ids: Vec<SessionId> = {
            let table = self.table();
            match target {
                Target::Sessions(ids) => {
                    if let Some(missing) = ids.iter().find(|id| !table.contains_key(id)) {
                        return Err(SessionError::NotFound(*missing));
                    }
                    ids.clone()
                }
                Target::User(user) => self
                    .by_identity()
                    .named(&[Name::User(user)])
                    .into_iter()
                    .filter(|id| {
                        table
                            .get(id)
                            .is_some_and(|s| s.is_live() && s.identity.is(user))
                    })
                    .collect(),
            }
        };
        Ok(self
            .end_terminated(&ids, by, reason)?
            .commit(self, Vec::new())
            .await?)
    }

    /// [`Sessions::end_now`] as an administrator's termination (`by`, `reason`); sessions
    /// already ended are left alone.
    ///
    /// # Errors
    /// The kernel fails.
    pub(crate) fn end_terminated(
        self: &Arc<Self>,
        ids: &[SessionId],
        by: &str,
        reason: &str,
    ) -> Result<Ending, SessionError> {
        if ids.is_empty() {
            return Ok(Ending::default());
        }
        let cause = EndCause::Terminated {
            by: by.to_owned(),
            reason: reason.to_owned(),
        };
        let kind = AuditKind::SessionTerminated {
            by: by.to_owned(),
            reason: reason.to_owned(),
        };
        self.end_now(ids, cause, kind, by, reason)
    }

    /// The first half of a termination, for callers that make more durable with it (a
    /// lock, a denial, a signal's record) in the same commit: the revocations go into the
    /// kernel before anything else (one store per session into the kernel's session table,
    /// which waits for no map writer), then the grants, then the table; the local sockets are
    /// being torn down on a blocking thread when it returns. Nothing is durable until
    /// [`Ending::commit`].
    ///
    /// # Errors
    /// The kernel fails; sessions already revoked stay revoked.
    pub(crate) fn end_now(
        self: &Arc<Self>,
        ids: &[SessionId],
        cause: EndCause,
        kind: AuditKind,
        by: &str,
        reason: &str,
    ) -> Result<Ending, SessionError> {
        {
            let table = self.table();
            for id in ids {
                if table.get(id).is_some_and(|s| s.is_live()) {
                    self.enforcer.revoke(*id)?;
                }
            }
        }
        // The rest of the kernel work costs what these sessions hold (their grants, found
        // through the source index), a few map writes: done here. The socket teardown (one
        // sock_diag request per flow) runs on a blocking thread while the store commits.
        let (ended, writes) =
            self.end_sessions(ids, SessionState::Terminated, cause, kind, by, reason)?;
        let mut teardown = Vec::new();
        if !ended.is_empty() {
            let enforcer = Arc::clone(&self.enforcer);
            let ids: HashSet<u64> = ended.iter().map(|e| e.id.0).collect();
            teardown.push(tokio::task::spawn_blocking(move || {
                tear_down_ended(&enforcer, ids);
            }));
        }
        Ok(Ending {
            ended,
            writes,
            teardown,
        })
    }

    /// Moves live sessions to a final state in memory and the kernel, and tears down their
    /// local sockets; returns them and the writes that make it durable. Sessions already
    /// ended are left alone.
    pub(super) fn end(
        &self,
        ids: &[SessionId],
        state: SessionState,
        cause: EndCause,
        kind: AuditKind,
        by: &str,
        reason: &str,
    ) -> Result<(Vec<Ended>, Vec<Write>), SessionError> {
        let (ended, writes) = self.end_sessions(ids, state, cause, kind, by, reason)?;
        if !ended.is_empty() {
            tear_down_ended(
                &self.enforcer,
                ended.iter().map(|e| e.id.0).collect::<HashSet<u64>>(),
            );
        }
        Ok((ended, writes))
    }

    /// [`Sessions::end`] without the socket teardown: the table and the kernel's session
    /// table and grants. Costs what these sessions hold, not what the table holds.
    fn end_sessions(
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
            // The revocation record holds the end: the session's own row (a random page of
            // a large table) is not rewritten, and reading the store applies the end to it.
            writes.push(Write::PutRevocation(
                *id,
                RevocationRecord {
                    at_ms: now,
                    by: by.to_owned(),
                    reason: reason.to_owned(),
                    end: Some(RecordedEnd {
                        state,
                        end: SessionEnd {
                            at_ms: now,
                            cause: cause.clone(),
                        },
                    }),
                },
            ));
            writes.push(Write::Audit(event(kind.clone(), entry, reason)));
        }
        // The revocations above already stop every flow; the grants go (or pass to another
        // live session from the same source) so that no new flow opens.
        self.reassign(&table, &freed)?;
        drop(table);
        Ok((ended, writes))
    }

    /// Makes the kernel's grants for `freed` (source, resource) pairs follow the table: a
    /// grant is one kernel entry per pair, so when the session holding it loses it, the newest
    /// live session from the same source that still holds the resource gets the entry, and
    /// pairs nobody holds any more are deleted (in one batch). Only the sessions from the
    /// freed sources are looked at (the source index), not the whole table.
    fn reassign(
        &self,
        table: &HashMap<SessionId, Arc<Session>>,
        freed: &foldhash::HashSet<(IpAddr, u32)>,
    ) -> Result<(), EnforceError> {
        if freed.is_empty() {
            return Ok(());
        }
        let sources: foldhash::HashSet<IpAddr> = freed.iter().map(|(src, _)| *src).collect();
        let candidates: Vec<SessionId> = {
            let by_source = self.by_source();
            sources
                .iter()
                .filter_map(|src| by_source.get(src))
                .flat_map(FromSource::ids)
                .copied()
                .collect()
        };
        let heirs = heirs_among(
            candidates
                .iter()
                .filter_map(|id| table.get(id))
                .map(|s| &**s)
                .filter(|s| sources.contains(&s.source)),
            freed,
        );
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

    /// The sessions (live or ended) among those `lookup` points at that `pick` chooses, as
    /// they are now: a lock or a signal naming one user looks at that user's sessions, not at
    /// every session in the table.
    pub fn sessions_where(
        &self,
        lookup: &Lookup<'_>,
        pick: impl Fn(&Session) -> bool,
    ) -> Vec<Arc<Session>> {
        let table = self.table();
        let chosen = |id: &SessionId| table.get(id).filter(|s| pick(s)).cloned();
        match lookup {
            Lookup::Everywhere => table.values().filter(|s| pick(s)).cloned().collect(),
            Lookup::Sessions(ids) => ids.iter().filter_map(chosen).collect(),
            Lookup::Source(ip) => {
                let by_source = self.by_source();
                by_source
                    .get(ip)
                    .map_or(&[][..], FromSource::ids)
                    .iter()
                    .filter_map(chosen)
                    .collect()
            }
            Lookup::Named(names) => {
                let ids = self.by_identity().named(names);
                ids.iter().filter_map(chosen).collect()
            }
        }
    }

    /// The live sessions among those `lookup` points at that `pick` chooses, as they are now.
    pub fn live_where(
        &self,
        lookup: &Lookup<'_>,
        pick: impl Fn(&Session) -> bool,
    ) -> Vec<Arc<Session>> {
        self.sessions_where(lookup, |s| s.is_live() && pick(s))
    }

    /// Every session the agent holds (live and ended), shared rather than copied.
    pub fn all(&self) -> Vec<Arc<Session>> {
        self.table().values().cloned().collect()
    }

    pub fn live_count(&self) -> usize {
        self.table().values().filter(|s| s.is_live()).count()
    }
}

/// Sessions ended in the kernel and the table whose record is not durable yet: what
/// [`Sessions::end_now`] hands back, to be committed with whatever else makes the ending
/// stick.
#[derive(Debug, Default)]
#[must_use = "an ending is durable only once committed"]
pub struct Ending {
    pub ended: Vec<Ended>,
    writes: Vec<Write>,
    teardown: Vec<tokio::task::JoinHandle<()>>,
}

impl Ending {
    /// Adds another ending's sessions, to be committed together.
    pub fn join(&mut self, other: Ending) {
        self.ended.extend(other.ended);
        self.writes.extend(other.writes);
        self.teardown.extend(other.teardown);
    }

    /// Makes the endings durable with `extra` in one commit, and waits for the socket
    /// teardown; answers the sessions ended.
    ///
    /// # Errors
    /// The store fails: the sessions stay ended in the kernel and the table, nothing of it
    /// (nor of `extra`) is durable.
    pub async fn commit(
        mut self,
        sessions: &Sessions,
        extra: Vec<Write>,
    ) -> Result<Vec<Ended>, StoreError> {
        self.writes.extend(extra);
        let persisted = if self.writes.is_empty() {
            Ok(())
        } else {
            sessions.persist(std::mem::take(&mut self.writes)).await
        };
        for teardown in self.teardown.drain(..) {
            // The kernel already drops every packet; a teardown that died lost only the
            // prompt notice to both ends.
            let _ = teardown.await;
        }
        persisted.map(|()| self.ended)
    }
}

/// How long after a termination the sockets of its flows are looked for once more: the
/// kernel's flow-opened events are read within milliseconds of being written.
const LATE_EVENTS: std::time::Duration = std::time::Duration::from_millis(250);

/// Tears down the local sockets of ended sessions now, and once more a little later: a flow
/// the kernel opened just before the revocation may still have its event on the way to the
/// flow index. A revoked session opens no new flow, so one more look once those events are in
/// finds every socket left.
fn tear_down_ended(enforcer: &Arc<Enforcer>, ids: HashSet<u64>) {
    tear_down_sockets(enforcer, &ids);
    let enforcer = Arc::clone(enforcer);
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
