//! The session table and its transitions: admission, reconnect, termination and continuous
//! evaluation on policy changes. Every transition writes the kernel first (so enforcement is
//! never behind a decision), then the store (so it is durable before it is acknowledged).

use foldhash::HashSetExt as _;
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
        let (session, reconnect_seed) = match self.decide(identity, source)? {
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

    /// Continuous evaluation: every live session against `policy`. Grants the policy no longer
    /// allows are withdrawn and, unless configured otherwise, their live flows severed; a
    /// session left with nothing is terminated. A policy change never widens a live session:
    /// new grants need a new login. Answers once the change is enforced and durable.
    ///
    /// # Errors
    /// The kernel or the store fails.
    pub async fn apply_policy(&self, policy: &Policy) -> Result<PolicyOutcome, SessionError> {
        let change = self.enforce_policy(policy)?;
        let outcome = change.outcome;
        self.record_policy_change(change).await?;
        Ok(outcome)
    }

    /// The enforcing half of [`Sessions::apply_policy`]: the table and the kernel follow
    /// `policy` when it returns. What it did is made durable by
    /// [`Sessions::record_policy_change`]; until then a crash loses only the record, not the
    /// enforcement (the policy files are the truth, and a start applies them to every stored
    /// session again).
    ///
    /// # Errors
    /// The kernel fails.
    pub fn enforce_policy(&self, policy: &Policy) -> Result<PolicyChange, SessionError> {
        let reason = "policy change";
        let now = now_ms();
        let sever = self.config.on_policy_change == OnPolicyChange::Sever;
        let mut outcome = PolicyOutcome::default();
        let mut changed = Vec::new();
        // foldhash, sized up front: with 100,000 sessions changed, SipHash and rehashing as the
        // sets grew were a third of the time the table lock is held.
        let mut severed: foldhash::HashSet<(u64, u32)> = foldhash::HashSet::default();
        let mut emptied = Vec::new();
        {
            // Held through the kernel writes: an admission cannot slip in between the decision
            // and the kernel (see `admit`).
            let mut table = self.table();
            let mut live: Vec<&mut Arc<Session>> =
                table.values_mut().filter(|s| s.is_live()).collect();
            // Sessions are independent of each other: large tables are shared out over the
            // cores (each part is evaluated and updated by one thread).
            let threads = if live.len() < PARALLEL_FROM {
                1
            } else {
                std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
            };
            let per_thread = live.len().div_ceil(threads).max(1);
            let parts: Vec<Reevaluated> = if threads == 1 {
                vec![reevaluate(policy, &mut live, now)]
            } else {
                std::thread::scope(|scope| {
                    let running: Vec<_> = live
                        .chunks_mut(per_thread)
                        .map(|part| scope.spawn(move || reevaluate(policy, part, now)))
                        .collect();
                    running
                        .into_iter()
                        .map(|t| t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                        .collect()
                })
            };
            // Each part brought its freed keys, severed pairs and emptied sessions as plain
            // lists, made while its sessions were in that core's cache: merging them here
            // touches no session.
            let removed: usize = parts.iter().map(|p| p.freed.len()).sum();
            let mut freed: foldhash::HashSet<(IpAddr, u32)> =
                foldhash::HashSet::with_capacity(removed);
            if sever {
                severed.reserve(removed);
            }
            for part in parts {
                outcome.evaluated += part.evaluated;
                outcome.grants_removed += part.freed.len();
                freed.extend(part.freed);
                if sever {
                    severed.extend(part.severed);
                }
                emptied.extend(part.emptied);
                changed.extend(part.changed);
            }
            // A freed grant key may pass to another live session from the same source (NAT):
            // look for heirs on every core too, then hand over or withdraw.
            let heirs = if threads == 1 || freed.is_empty() {
                heirs_among(live.iter().map(|s| &***s), &freed)
            } else {
                let freed = &freed;
                std::thread::scope(|scope| {
                    let running: Vec<_> = live
                        .chunks(per_thread)
                        .map(|part| {
                            scope.spawn(move || heirs_among(part.iter().map(|s| &***s), freed))
                        })
                        .collect();
                    let mut all = foldhash::HashMap::default();
                    for t in running {
                        let found = t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                        merge_heirs(&mut all, found);
                    }
                    all
                })
            };
            self.hand_over(&freed, heirs)?;
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
                reason: reason.to_owned(),
            },
            AuditKind::SessionTerminated {
                by: "policy".into(),
                reason: reason.to_owned(),
            },
            "policy",
            "policy change left nothing to reach",
        )?;
        outcome.sessions_terminated = ended.len();
        Ok(PolicyChange {
            outcome,
            changed,
            end_writes,
        })
    }

    /// The recording half of [`Sessions::apply_policy`]: an audit event per removed grant and
    /// the session records, committed in slices of a few thousand sessions so that admissions
    /// and terminations queued meanwhile are not held behind one huge commit. A session's
    /// events and record share a slice; the record written is the session as it is now (a
    /// termination may have come in between), and only while it is live.
    ///
    /// # Errors
    /// The store fails.
    pub async fn record_policy_change(&self, change: PolicyChange) -> Result<(), SessionError> {
        for slice in change.changed.chunks(POLICY_COMMIT_SLICE) {
            let mut writes = Vec::with_capacity(slice.len() * 2);
            for (s, removed) in slice {
                for g in removed {
                    let mut e = event(
                        AuditKind::GrantRemoved {
                            reason: "policy change".to_owned(),
                        },
                        s,
                        format!("{} is no longer granted by policy", g.resource),
                    );
                    e.resource = Some(g.resource.clone());
                    writes.push(Write::Audit(e));
                }
            }
            {
                let table = self.table();
                // An ended session's record goes only with its end (its revocation and end
                // record, in `end_writes` or a termination's commit): written here, a crash
                // before that commit would leave it ended without them.
                writes.extend(
                    slice
                        .iter()
                        .filter_map(|(s, _)| table.get(&s.id))
                        .filter(|now| now.is_live())
                        .map(|now| Write::PutSession(Arc::clone(now))),
                );
            }
            self.persist(writes).await?;
        }
        if !change.end_writes.is_empty() {
            self.persist(change.end_writes).await?;
        }
        Ok(())
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
    fn hand_over(
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

/// Live sessions from which a policy change is evaluated on every core.
const PARALLEL_FROM: usize = 4096;

/// For a freed (source, resource) grant key: the newest live session from that source that
/// still holds the resource (creation time, id, its grant).
type Heirs<'a> = foldhash::HashMap<(IpAddr, u32), (u64, SessionId, &'a SessionGrant)>;

/// The heirs of `freed` among `sessions` (ended ones are skipped).
fn heirs_among<'a>(
    sessions: impl Iterator<Item = &'a Session>,
    freed: &foldhash::HashSet<(IpAddr, u32)>,
) -> Heirs<'a> {
    let mut heirs = Heirs::default();
    if freed.is_empty() {
        return heirs;
    }
    for o in sessions.filter(|o| o.is_live()) {
        for g in &o.grants {
            let key = (o.source, g.resource_id);
            if freed.contains(&key)
                && heirs
                    .get(&key)
                    .is_none_or(|(at, _, _)| o.created_at_ms > *at)
            {
                heirs.insert(key, (o.created_at_ms, o.id, g));
            }
        }
    }
    heirs
}

/// Adds heirs found in another part of the table: the newest session wins.
fn merge_heirs<'a>(into: &mut Heirs<'a>, found: Heirs<'a>) {
    for (key, heir) in found {
        match into.get(&key) {
            Some((at, _, _)) if *at >= heir.0 => {}
            _ => {
                into.insert(key, heir);
            }
        }
    }
}

/// What re-evaluating a part of the live sessions changed.
struct Reevaluated {
    evaluated: usize,
    /// Each changed session (as the change left it) and the grants it lost.
    changed: Vec<(Arc<Session>, Vec<SessionGrant>)>,
    /// The kernel grant key (source, resource) of every grant lost.
    freed: Vec<(IpAddr, u32)>,
    /// (session, resource) of every grant lost, whose flows are severed.
    severed: Vec<(u64, u32)>,
    /// Sessions left with no grant.
    emptied: Vec<SessionId>,
}

/// Re-evaluates `sessions` against `policy` and takes from each the grants it no longer
/// allows (a change never adds any). The audit events are made later, by
/// `record_policy_change`: they are not on the way to enforcement.
fn reevaluate(policy: &Policy, sessions: &mut [&mut Arc<Session>], now: u64) -> Reevaluated {
    let mut out = Reevaluated {
        evaluated: sessions.len(),
        changed: Vec::new(),
        freed: Vec::new(),
        severed: Vec::new(),
        emptied: Vec::new(),
    };
    for entry in sessions.iter_mut() {
        // Resource ids are the names' hashes, so an id still granted is the same resource.
        let applicable = policy.applicable(&entry.identity, entry.source);
        let keeps = |g: &SessionGrant| {
            applicable.reaches(g.resource_id) && policy.resources.by_id(g.resource_id).is_some()
        };
        if entry.grants.iter().all(keeps) {
            continue;
        }
        let s = Arc::make_mut(entry);
        // In place: one allocation per changed session (the removed list), not two.
        let removed: Vec<SessionGrant> = s.grants.extract_if(.., |g| !keeps(g)).collect();
        s.updated_at_ms = now;
        out.freed
            .extend(removed.iter().map(|g| (s.source, g.resource_id)));
        out.severed
            .extend(removed.iter().map(|g| (s.id.0, g.resource_id)));
        if s.grants.is_empty() {
            out.emptied.push(s.id);
        }
        out.changed.push((Arc::clone(entry), removed));
    }
    out
}

/// Sessions per commit when a policy change is recorded: large enough to amortise the fsync,
/// small enough that an admission waits for at most one slice.
const POLICY_COMMIT_SLICE: usize = 2048;

/// A policy change that is enforced and not yet recorded: see [`Sessions::enforce_policy`].
pub struct PolicyChange {
    pub outcome: PolicyOutcome,
    /// Each changed session (as the change left it) and the grants it lost.
    changed: Vec<(Arc<Session>, Vec<SessionGrant>)>,
    /// The records of the sessions the change terminated.
    end_writes: Vec<Write>,
}

/// What a policy change did to the live sessions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct PolicyOutcome {
    pub evaluated: usize,
    pub grants_removed: usize,
    pub flows_severed: usize,
    pub sessions_terminated: usize,
}
