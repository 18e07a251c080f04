//! What administrators do with locks, denials and cut-offs: each change enters the index
//! first (so admissions are refused from that moment), ends the live sessions it concerns
//! through the one termination path (kernel revocation first, sockets destroyed, durable
//! record), and is made durable before it is acknowledged.

use std::{
    collections::{BTreeSet, HashSet},
    sync::Arc,
};

use serde::{Deserialize, Serialize};

use super::{
    LocksError,
    index::Subject,
    model::{Cutoff, Denial, Lock, LockId, LockTarget, MAX_REASON_BYTES, MAX_TTL_SECS},
};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    sessions::{
        Ended, Ending, Lookup, Name, Sessions, Target,
        model::{EndCause, Session, SessionId, now_ms},
    },
    store::{LockWrite, Write},
};

/// A lock to add.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewLock {
    pub target: LockTarget,
    /// Seconds until it expires; absent: until removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the refused client is shown `reason` (it is the administrator's text).
    #[serde(default)]
    pub show_reason: bool,
    /// The person a relaying client (the web console) acts for, recorded beside the uid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_behalf_of: Option<String>,
}

/// What adding a lock did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockAdded {
    pub lock: Lock,
    /// The live sessions it ended.
    pub ended: Vec<Ended>,
    /// Flows of those sessions the revocation cut.
    pub flows: usize,
}

/// How a termination sticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct TerminateOptions {
    /// Deny the ended sessions' tokens until they expire (`token_revoked`).
    pub deny_tokens: bool,
    /// Set a cut-off at now for each ended session's `iss`+`sub` (`issued_before_cutoff`).
    pub cutoff: bool,
}

/// How an ending sticks (see [`Sessions::end_for_signal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sticking {
    /// Deny the ended sessions' tokens until they expire.
    pub deny_tokens: bool,
    /// Set a cut-off at this time (seconds since the epoch) for each identity.
    pub cutoff_at_secs: Option<u64>,
}

/// Who ends sessions and why: `record` goes into the denials and cut-offs, `ending` into
/// the sessions' end and audit records.
#[derive(Debug, Clone, Copy)]
struct Why<'a> {
    by: &'a str,
    record: &'a str,
    ending: &'a str,
}

/// What a termination did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Terminated {
    pub ended: Vec<Ended>,
    pub flows: usize,
    /// Tokens denied.
    pub denied: usize,
    pub cutoffs: Vec<Cutoff>,
}

/// A cut-off to set: tokens of `iss`+`sub` issued at or before `at_secs` are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoffRequest {
    pub iss: String,
    pub sub: String,
    /// Seconds since the epoch; now when absent.
    pub at_secs: Option<u64>,
    pub reason: String,
}

/// What setting a cut-off did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutoffSet {
    pub cutoff: Cutoff,
    pub ended: Vec<Ended>,
}

fn check_reason(reason: Option<&str>) -> Result<(), LocksError> {
    if let Some(r) = reason {
        if r.len() > MAX_REASON_BYTES {
            return Err(LocksError::BadReason(format!(
                "{} bytes long; at most {MAX_REASON_BYTES}",
                r.len()
            )));
        }
        if r.chars().any(|c| c.is_control() && c != '\t') {
            return Err(LocksError::BadReason("it has control characters".into()));
        }
    }
    Ok(())
}

/// Whether a lock on `target` matches the session (as a lock in the index would).
pub(super) fn target_matches(target: &LockTarget, s: &Session) -> bool {
    let id = &s.identity;
    match target {
        LockTarget::User(u) => id.is(u) || id.subject.eq_ignore_ascii_case(u),
        LockTarget::Subject { iss, sub } => id.issuer == *iss && id.subject == *sub,
        LockTarget::Group(g) => id.in_group(g),
        LockTarget::Device(d) => id.device.id.as_deref() == Some(d.as_str()),
        LockTarget::Source(p) => super::model::parse_prefix(p).is_ok_and(|n| n.contains(&s.source)),
        LockTarget::Session(sid) => s.id == *sid,
        LockTarget::Token(t) => id.token_sha256.eq_ignore_ascii_case(t),
    }
}

/// Where the sessions a lock on `target` may match are: the identity index for a user,
/// subject, group or device; the session itself; the sessions from an address; every
/// session for a wider prefix or a token. `target_matches` decides among them.
pub(super) fn lookup_of(target: &LockTarget) -> Lookup<'_> {
    match target {
        LockTarget::User(u) => Lookup::Named(vec![Name::User(u)]),
        LockTarget::Subject { sub, .. } => Lookup::Named(vec![Name::Subject(sub)]),
        LockTarget::Group(g) => Lookup::Named(vec![Name::Group(g)]),
        LockTarget::Device(d) => Lookup::Named(vec![Name::Device(d)]),
        LockTarget::Session(id) => Lookup::Sessions(vec![*id]),
        LockTarget::Source(p) => match super::model::parse_prefix(p) {
            Ok(net) if net.prefix_len() == net.max_prefix_len() => Lookup::Source(net.addr()),
            _ => Lookup::Everywhere,
        },
        LockTarget::Token(_) => Lookup::Everywhere,
    }
}

fn event(kind: AuditKind, detail: String) -> AuditEvent {
    let mut e = AuditEvent::new(kind);
    e.detail = detail;
    e
}

impl Sessions {
    /// Adds a lock: refused from now on for whatever it matches, and every live session it
    /// matches ended at once. Answers once the lock and the terminations are durable.
    ///
    /// # Errors
    /// A bad target, TTL or reason (nothing changes), or the kernel or store fails (the lock
    /// is then withdrawn again; sessions already ended stay ended).
    pub async fn add_lock(
        self: &Arc<Self>,
        new: NewLock,
        by: &str,
    ) -> Result<LockAdded, LocksError> {
        self.locks().health()?;
        let target = new.target.canonical()?;
        if let Some(ttl) = new.ttl_secs
            && !(1..=MAX_TTL_SECS).contains(&ttl)
        {
            return Err(LocksError::BadTtl(format!(
                "{ttl} s: give 1 s to {MAX_TTL_SECS} s (ten years), or no TTL for a lock that \
                 holds until removed"
            )));
        }
        let reason = new.reason.filter(|r| !r.trim().is_empty());
        check_reason(reason.as_deref())?;
        if new.show_reason && reason.is_none() {
            return Err(LocksError::BadReason(
                "show_reason is set but there is no reason to show".into(),
            ));
        }
        let now = now_ms();
        let lock = Lock {
            id: LockId::random(),
            target,
            reason,
            show_reason: new.show_reason,
            by: by.to_owned(),
            created_at_ms: now,
            expires_at_ms: new.ttl_secs.map(|t| now + t * 1000),
            expired_at_ms: None,
        };
        // In the index before the sessions are picked: an admission decided after this is
        // refused, one decided before is in the table and ends below.
        self.locks().write().insert_lock(lock.clone());
        let why = match &lock.reason {
            Some(r) => format!("locked by {} ({}): {r}", lock.id, lock.target),
            None => format!("locked by {} ({})", lock.id, lock.target),
        };
        let ending = match self.end_where(
            &lookup_of(&lock.target),
            |s| target_matches(&lock.target, s),
            by,
            &why,
        ) {
            Ok(ending) => ending,
            Err(e) => {
                self.locks().write().remove_lock(lock.id);
                return Err(e);
            }
        };
        let flows = self.flows_cut(&ending.ended);
        let mut ev = event(
            AuditKind::LockAdded {
                lock: lock.id.to_string(),
                target: lock.target.to_string(),
            },
            format!(
                "by {by}{}{}; ended {} session(s), {flows} flow(s)",
                lock.reason
                    .as_deref()
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default(),
                lock.expires_at_ms
                    .map(|at| format!(", expires at {at} ms"))
                    .unwrap_or_default(),
                ending.ended.len()
            ),
        );
        if let LockTarget::User(u) = &lock.target {
            ev.user = Some(u.clone());
        }
        // The lock and the endings it made in one commit: acknowledged, both hold after a
        // crash; not acknowledged, the lock is withdrawn (the sessions stay ended).
        let committed = ending
            .commit(
                self,
                vec![
                    Write::Locks(LockWrite::PutLock(lock.clone())),
                    Write::Audit(ev),
                ],
            )
            .await;
        match committed {
            Ok(ended) => Ok(LockAdded { lock, ended, flows }),
            Err(e) => {
                self.locks().write().remove_lock(lock.id);
                Err(e.into())
            }
        }
    }

    /// Removes a lock. Durable first: a lock whose removal failed still holds.
    ///
    /// # Errors
    /// No such lock, or the store fails.
    pub async fn remove_lock(&self, id: LockId, by: &str) -> Result<Lock, LocksError> {
        let lock = self.locks().get(id).ok_or(LocksError::NotFound(id))?;
        let ev = event(
            AuditKind::LockRemoved {
                lock: id.to_string(),
            },
            format!("{} removed by {by}", lock.target),
        );
        self.commit(vec![
            Write::Locks(LockWrite::DeleteLock(id)),
            Write::Audit(ev),
        ])
        .await?;
        self.locks().write().remove_lock(id);
        Ok(lock)
    }

    /// Denies the token of one session (ended or not) until it expires. Does not end the
    /// session: see [`Sessions::terminate_sessions`].
    ///
    /// # Errors
    /// No such session, or the store fails.
    pub async fn deny_session_token(
        &self,
        id: SessionId,
        by: &str,
        reason: &str,
    ) -> Result<Denial, LocksError> {
        let s = self.get(id).ok_or(LocksError::NoSession(id))?;
        let d = denial_of(&s, by, reason, now_ms());
        self.locks().write().insert_denial(d.clone());
        self.commit(vec![Write::Locks(LockWrite::PutDenial(d.clone()))])
            .await?;
        Ok(d)
    }

    /// Sets a cut-off for `iss`+`sub` and ends the subject's live sessions whose token was
    /// issued at or before it (or has no `iat`).
    ///
    /// # Errors
    /// An empty issuer or subject, or the kernel or store fails.
    pub async fn set_cutoff(
        self: &Arc<Self>,
        req: CutoffRequest,
        by: &str,
    ) -> Result<CutoffSet, LocksError> {
        check_reason(Some(&req.reason))?;
        let LockTarget::Subject { iss, sub } = (LockTarget::Subject {
            iss: req.iss,
            sub: req.sub,
        })
        .canonical()?
        else {
            unreachable!("a subject stays a subject")
        };
        let now = now_ms();
        let at = req.at_secs.unwrap_or(now / 1000);
        let user = self
            .sessions_where(&Lookup::Named(vec![Name::Subject(&sub)]), |s| {
                s.identity.issuer == iss && s.identity.subject == sub
            })
            .first()
            .map_or_else(|| sub.clone(), |s| s.identity.user().to_owned());
        let cutoff = Cutoff {
            iss,
            sub,
            user,
            cutoff_secs: at,
            by: by.to_owned(),
            reason: req.reason,
            at_ms: now,
        };
        self.locks().write().insert_cutoff(cutoff.clone());
        let why = format!(
            "cut-off: tokens of {} issued at or before {at} are refused ({})",
            cutoff.user, cutoff.reason
        );
        let ended = self
            .end_where(
                &Lookup::Named(vec![Name::Subject(&cutoff.sub)]),
                |s| {
                    s.identity.issuer == cutoff.iss
                        && s.identity.subject == cutoff.sub
                        && s.identity.token_issued_at.is_none_or(|iat| iat <= at)
                },
                by,
                &why,
            )?
            .commit(
                self,
                vec![Write::Locks(LockWrite::PutCutoff(cutoff.clone()))],
            )
            .await?;
        Ok(CutoffSet { cutoff, ended })
    }

    /// Terminates the live sessions a target matches (user by email or subject, `iss`+`sub`,
    /// group, device, source, session, token), denying their tokens and/or setting cut-offs
    /// as `opts` says.
    ///
    /// # Errors
    /// A bad target, or the kernel or store fails.
    pub async fn terminate_matching(
        self: &Arc<Self>,
        target: &LockTarget,
        opts: TerminateOptions,
        by: &str,
        reason: &str,
    ) -> Result<Terminated, LocksError> {
        let target = target.canonical()?;
        let chosen = self.live_where(&lookup_of(&target), |s| target_matches(&target, s));
        self.terminate_chosen(chosen, opts, by, reason).await
    }

    /// `sessions terminate` with its options: the sessions by id (each must exist), or every
    /// live session of a user (email or subject).
    ///
    /// # Errors
    /// An unknown id, or the kernel or store fails.
    pub async fn terminate_sessions(
        self: &Arc<Self>,
        target: &Target,
        opts: TerminateOptions,
        by: &str,
        reason: &str,
    ) -> Result<Terminated, LocksError> {
        let chosen: Vec<Arc<Session>> = match target {
            Target::Sessions(ids) => {
                let mut out = Vec::with_capacity(ids.len());
                for id in ids {
                    out.push(self.get(*id).ok_or(LocksError::NoSession(*id))?);
                }
                out
            }
            Target::User(user) => {
                let named = self.sessions_where(&Lookup::Named(vec![Name::User(user)]), |s| {
                    s.identity.is(user)
                });
                let live: Vec<Arc<Session>> =
                    named.iter().filter(|s| s.is_live()).cloned().collect();
                if live.is_empty() && opts.cutoff {
                    // No live session: the cut-off still applies to the identities the agent
                    // has seen under that name (their newest session says which).
                    let mut seen = named;
                    seen.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
                    seen.dedup_by(|a, b| {
                        a.identity.issuer == b.identity.issuer
                            && a.identity.subject == b.identity.subject
                    });
                    seen
                } else {
                    live
                }
            }
        };
        self.terminate_chosen(chosen, opts, by, reason).await
    }

    async fn terminate_chosen(
        self: &Arc<Self>,
        chosen: Vec<Arc<Session>>,
        opts: TerminateOptions,
        by: &str,
        reason: &str,
    ) -> Result<Terminated, LocksError> {
        let identities: BTreeSet<(String, String)> = if opts.cutoff {
            chosen
                .iter()
                .map(|s| (s.identity.issuer.clone(), s.identity.subject.clone()))
                .collect()
        } else {
            BTreeSet::new()
        };
        let why = match (opts.deny_tokens, identities.is_empty()) {
            (_, false) => format!("{reason} (cut-off: older tokens refused)"),
            (true, true) => format!("{reason} (token revoked)"),
            (false, true) => reason.to_owned(),
        };
        let sticking = Sticking {
            deny_tokens: opts.deny_tokens,
            cutoff_at_secs: opts.cutoff.then(|| now_ms() / 1000),
        };
        let cause = EndCause::Terminated {
            by: by.to_owned(),
            reason: why.clone(),
        };
        let why = Why {
            by,
            record: reason,
            ending: &why,
        };
        self.end_sticking(&chosen, &identities, sticking, cause, why, |_| Vec::new())
            .await
    }

    /// Ends every live session a lock in force matches; for after a re-evaluation, when a
    /// session's groups or the locks may have changed.
    ///
    /// # Errors
    /// The kernel or store fails.
    pub async fn enforce_locks(self: &Arc<Self>, by: &str) -> Result<Vec<Ended>, LocksError> {
        if self.locks().counts().locks == 0 {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let mut by_lock: std::collections::BTreeMap<LockId, (Lock, Vec<SessionId>)> =
            std::collections::BTreeMap::new();
        {
            let index = self.locks().read();
            for s in self.all().iter().filter(|s| s.is_live()) {
                let who = Subject {
                    identity: &s.identity,
                    source: s.source,
                    session: Some(s.id),
                };
                if let Some(l) = index.matching_lock(&who, now) {
                    by_lock
                        .entry(l.id)
                        .or_insert_with(|| (l.clone(), Vec::new()))
                        .1
                        .push(s.id);
                }
            }
        }
        let mut ending = Ending::default();
        for (_, (lock, ids)) in by_lock {
            let why = match &lock.reason {
                Some(r) => format!("locked by {} ({}): {r}", lock.id, lock.target),
                None => format!("locked by {} ({})", lock.id, lock.target),
            };
            ending.join(self.end_terminated(&ids, by, &why)?);
        }
        Ok(ending.commit(self, Vec::new()).await?)
    }

    /// Ends the live sessions among those `lookup` points at that `pick` chooses, through
    /// the one termination path; durable once the ending is committed.
    fn end_where(
        self: &Arc<Self>,
        lookup: &Lookup<'_>,
        pick: impl Fn(&Session) -> bool,
        by: &str,
        reason: &str,
    ) -> Result<Ending, LocksError> {
        let ids: Vec<SessionId> = self.live_where(lookup, pick).iter().map(|s| s.id).collect();
        Ok(self.end_terminated(&ids, by, reason)?)
    }

    /// Ends the live sessions an identity provider's signal names and makes the ending
    /// stick as `sticking` says: their tokens denied, and/or a cut-off at the event's time
    /// for each of `identities` (those of the sessions, and one the signal named without a
    /// live session). The sessions end as an identity event; the endings, denials, cut-offs
    /// and `extra` (the SET's own record, made from the sessions ended) are durable in one
    /// commit when it returns, so that a SET is acknowledged with all of its effect or none
    /// of it.
    ///
    /// # Errors
    /// The kernel or the store fails.
    pub async fn end_for_signal(
        self: &Arc<Self>,
        chosen: &[Arc<Session>],
        identities: &BTreeSet<(String, String)>,
        sticking: Sticking,
        by: &str,
        reason: &str,
        extra: impl FnOnce(&[Ended]) -> Vec<Write>,
    ) -> Result<Terminated, LocksError> {
        let cause = EndCause::IdentityEvent {
            reason: reason.to_owned(),
        };
        let why = Why {
            by,
            record: reason,
            ending: reason,
        };
        self.end_sticking(chosen, identities, sticking, cause, why, extra)
            .await
    }

    /// The one path of an ending that sticks. Denials (of every chosen session's token) and
    /// cut-offs (one per identity) enter the index before anything ends, so that the same
    /// token, or an older one, cannot log straight back in meanwhile; then the chosen live
    /// sessions end (revocation first); then any other live session the new denials or
    /// cut-offs refuse (a login that raced this call), looked for among the sessions of the
    /// same subjects only, so that the denial key (a hash of the claims) is computed for
    /// those alone. Everything, with `extra`, is one commit.
    async fn end_sticking(
        self: &Arc<Self>,
        chosen: &[Arc<Session>],
        identities: &BTreeSet<(String, String)>,
        sticking: Sticking,
        cause: EndCause,
        why: Why<'_>,
        extra: impl FnOnce(&[Ended]) -> Vec<Write>,
    ) -> Result<Terminated, LocksError> {
        let (by, reason) = (why.by, why.record);
        let now = now_ms();
        let mut writes = Vec::new();
        let mut denied_keys: HashSet<String> = HashSet::new();
        let mut cutoffs: Vec<Cutoff> = Vec::new();
        {
            let mut index = self.locks().write();
            if sticking.deny_tokens {
                for s in chosen {
                    let d = denial_of(s, by, reason, now);
                    if denied_keys.insert(d.key.clone()) {
                        index.insert_denial(d.clone());
                        writes.push(Write::Locks(LockWrite::PutDenial(d)));
                    }
                }
            }
            if let Some(at) = sticking.cutoff_at_secs {
                for (iss, sub) in identities {
                    let user = chosen
                        .iter()
                        .find(|s| s.identity.issuer == *iss && s.identity.subject == *sub)
                        .map_or_else(|| sub.clone(), |s| s.identity.user().to_owned());
                    let c = Cutoff {
                        iss: iss.clone(),
                        sub: sub.clone(),
                        user,
                        cutoff_secs: at,
                        by: by.to_owned(),
                        reason: reason.to_owned(),
                        at_ms: now,
                    };
                    index.insert_cutoff(c.clone());
                    writes.push(Write::Locks(LockWrite::PutCutoff(c.clone())));
                    cutoffs.push(c);
                }
            }
        }
        let kind = AuditKind::SessionTerminated {
            by: by.to_owned(),
            reason: why.ending.to_owned(),
        };
        let live: Vec<SessionId> = chosen
            .iter()
            .filter(|s| s.is_live())
            .map(|s| s.id)
            .collect();
        let mut ending = if live.is_empty() {
            Ending::default()
        } else {
            self.end_now(&live, cause.clone(), kind.clone(), by, why.ending)?
        };
        if !denied_keys.is_empty() || !cutoffs.is_empty() {
            let subjects: HashSet<(&str, &str)> = chosen
                .iter()
                .map(|s| (s.identity.issuer.as_str(), s.identity.subject.as_str()))
                .chain(identities.iter().map(|(i, s)| (i.as_str(), s.as_str())))
                .collect();
            let names: Vec<Name<'_>> = subjects.iter().map(|(_, sub)| Name::Subject(sub)).collect();
            let racers: Vec<SessionId> = self
                .live_where(&Lookup::Named(names), |s| {
                    let id = &s.identity;
                    subjects.contains(&(id.issuer.as_str(), id.subject.as_str()))
                        && (cutoffs.iter().any(|c| {
                            id.issuer == c.iss
                                && id.subject == c.sub
                                && id.token_issued_at.is_none_or(|iat| iat <= c.cutoff_secs)
                        }) || (!denied_keys.is_empty()
                            && denied_keys.contains(&id.denial_key())))
                })
                .iter()
                .map(|s| s.id)
                .collect();
            if !racers.is_empty() {
                ending.join(self.end_now(&racers, cause, kind, by, why.ending)?);
            }
        }
        writes.extend(extra(&ending.ended));
        let flows = self.flows_cut(&ending.ended);
        let denied = denied_keys.len();
        let ended = ending.commit(self, writes).await?;
        Ok(Terminated {
            ended,
            flows,
            denied,
            cutoffs,
        })
    }

    /// The flows of these ended sessions the kernel still holds (revoked: every packet of
    /// them is dropped).
    fn flows_cut(&self, ended: &[Ended]) -> usize {
        if ended.is_empty() {
            return 0;
        }
        let ids: HashSet<u64> = ended.iter().map(|e| e.id.0).collect();
        self.enforcer().flows_of(&ids).len()
    }
}

/// The largest verification leeway an issuer may be configured with (`auth.leeway_secs` is
/// refused above it): a token this far past its `exp` may still verify.
const DENIAL_LEEWAY_SECS: u64 = 300;

/// The denial of a session's token: until its `exp` plus the largest leeway any issuer may
/// be configured with (past that the token cannot verify at all).
fn denial_of(s: &Session, by: &str, reason: &str, now: u64) -> Denial {
    Denial {
        key: s.identity.denial_key(),
        user: s.identity.user().to_owned(),
        session: Some(s.id),
        by: by.to_owned(),
        reason: reason.to_owned(),
        at_ms: now,
        until_ms: s
            .identity
            .token_expires_at
            .saturating_add(DENIAL_LEEWAY_SECS)
            .saturating_mul(1000),
    }
}
