//! Continuous evaluation: a new policy held against every live session. Grants it no longer
//! allows are withdrawn (handed to another session from the same source where one still
//! holds them), their flows severed, sessions left with nothing terminated; then the change is
//! recorded. Installing a policy (resources into the kernel, then this) is a sessions
//! operation too, shared by the file watcher and `policy reload`.

use foldhash::HashSetExt as _;
use std::{net::IpAddr, sync::Arc};

use super::manager::{SessionError, Sessions, event};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    config::OnPolicyChange,
    policy::Policy,
    sessions::model::{EndCause, Session, SessionGrant, SessionId, SessionState, now_ms},
    store::Write,
};

#[derive(Debug, thiserror::Error)]
pub enum PolicyApplyError {
    #[error(
        "the kernel refused the policy's {resources} resources; no session was re-evaluated \
         against it: {source}"
    )]
    Resources {
        resources: usize,
        source: crate::enforce::EnforceError,
    },
    #[error("re-evaluating the sessions against the new policy: {0}")]
    Sessions(#[from] SessionError),
    #[error("applying the new policy stopped: the thread enforcing it panicked")]
    Panicked,
}

impl Sessions {
    /// Installs a policy that is already current in the handle: its resources in the kernel,
    /// then continuous evaluation of every live session ([`Sessions::apply_policy`]), then an
    /// audit record of the reload. The kernel work runs on a blocking thread, never on the
    /// async workers (a policy change over 100,000 sessions takes a tenth of a second).
    ///
    /// # Errors
    /// The kernel refuses the resource tables (nothing else is changed then), or evaluation
    /// or the store fails.
    pub async fn install_policy(
        self: &Arc<Self>,
        policy: Arc<Policy>,
    ) -> Result<PolicyOutcome, PolicyApplyError> {
        let this = Arc::clone(self);
        let (change, policy) = tokio::task::spawn_blocking(move || {
            this.enforcer
                .install_resources(&policy.resources)
                .map_err(|source| PolicyApplyError::Resources {
                    resources: policy.resources.resources.len(),
                    source,
                })?;
            let change = this.enforce_policy(&policy)?;
            Ok::<_, PolicyApplyError>((change, policy))
        })
        .await
        .map_err(|_| PolicyApplyError::Panicked)??;
        let outcome = change.outcome;
        self.record_policy_change(change).await?;
        tracing::info!(?outcome, "policy applied");
        let ev = AuditEvent::new(AuditKind::PolicyReloaded {
            files: policy.files.len(),
            resources: policy.resources.resources.len(),
            rules: policy.rules.len(),
        });
        self.record(vec![ev]).await.map_err(SessionError::from)?;
        // Locks hold at re-evaluation too (a group lock matches the session's groups now).
        if let Err(e) = self.enforce_locks("agent").await {
            tracing::warn!(error = %e, "cannot end the sessions a lock matches after the policy change");
        }
        Ok(outcome)
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
        self.reevaluate_live(policy, false)
    }

    /// As [`Sessions::enforce_policy`], after an identity provider's signal changed sessions'
    /// identities: a session it leaves with nothing ends as an identity event, not as a
    /// policy change (`sessions show` and the audit name the signal).
    ///
    /// # Errors
    /// The kernel fails.
    pub(super) fn enforce_identity_change(
        &self,
        policy: &Policy,
    ) -> Result<PolicyChange, SessionError> {
        self.reevaluate_live(policy, true)
    }

    fn reevaluate_live(
        &self,
        policy: &Policy,
        by_signal: bool,
    ) -> Result<PolicyChange, SessionError> {
        let (reason, by) = if by_signal {
            ("identity provider signal", "signal")
        } else {
            ("policy change", "policy")
        };
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
            if by_signal {
                EndCause::IdentityEvent {
                    reason: reason.to_owned(),
                }
            } else {
                EndCause::PolicyChange {
                    reason: reason.to_owned(),
                }
            },
            AuditKind::SessionTerminated {
                by: by.into(),
                reason: reason.to_owned(),
            },
            by,
            &format!("{reason} left nothing to reach"),
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
}

/// Live sessions from which a policy change is evaluated on every core.
const PARALLEL_FROM: usize = 4096;

/// For a freed (source, resource) grant key: the newest live session from that source that
/// still holds the resource (creation time, id, its grant).
pub(super) type Heirs<'a> = foldhash::HashMap<(IpAddr, u32), (u64, SessionId, &'a SessionGrant)>;

/// The heirs of `freed` among `sessions` (ended ones are skipped).
pub(super) fn heirs_among<'a>(
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

#[cfg(test)]
mod tests {
    use std::{net::Ipv4Addr, path::Path};

    use super::*;
    use crate::{identity::test_identity, policy::parse_policy};

    const RESOURCES: &str = "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
                             [[resource]]\nname = \"web\"\nprotocol = \"tcp\"\nports = [443]\n";

    fn policy(rules: &str) -> Policy {
        let text = format!("{RESOURCES}\n{rules}");
        parse_policy([(Path::new("test.toml"), text.as_str())]).expect("a valid test policy")
    }

    /// Staff reach ssh and web; ops reach ssh.
    fn before() -> Policy {
        policy(
            "[[rule]]\nname = \"staff\"\ngroups = [\"staff\"]\nresources = [\"ssh\", \"web\"]\n\n\
             [[rule]]\nname = \"ops\"\ngroups = [\"ops\"]\nresources = [\"ssh\"]\n",
        )
    }

    /// Staff lose web; ops lose everything.
    fn after() -> Policy {
        policy("[[rule]]\nname = \"staff\"\ngroups = [\"staff\"]\nresources = [\"ssh\"]\n")
    }

    fn source(n: u8) -> IpAddr {
        Ipv4Addr::new(10, 0, 0, n).into()
    }

    /// A live session admitted under `policy`, as `admit` builds one.
    fn session(policy: &Policy, id: u64, group: &str, from: IpAddr, at_ms: u64) -> Session {
        let identity = test_identity(&format!("u{id}@corp.test"), &[group]);
        let decision = policy.evaluate(&identity, from);
        assert!(decision.is_allowed(), "{group} is granted something");
        Session {
            id: SessionId(id),
            state: SessionState::Active,
            identity,
            source: from,
            previous_sources: Vec::new(),
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            expires_at_ms: u64::MAX,
            dormant_since_ms: None,
            grants: decision.grants,
            settings: decision.settings,
            reconnect: None,
            ended: None,
        }
    }

    fn id_of(p: &Policy, name: &str) -> u32 {
        p.resources.by_name(name).expect("resource").id
    }

    #[test]
    fn reevaluate_takes_only_what_the_new_policy_no_longer_allows() {
        let old = before();
        let new = after();
        let (ssh, web) = (id_of(&new, "ssh"), id_of(&old, "web"));
        let kept = Arc::new(session(&old, 1, "staff", source(1), 10));
        let emptied = Arc::new(session(&old, 2, "ops", source(2), 20));
        let mut table = [Arc::clone(&kept), Arc::clone(&emptied)];
        let mut live: Vec<&mut Arc<Session>> = table.iter_mut().collect();

        let out = reevaluate(&new, &mut live, 99);

        assert_eq!(out.evaluated, 2);
        assert_eq!(
            table[0]
                .grants
                .iter()
                .map(|g| g.resource_id)
                .collect::<Vec<_>>(),
            [ssh]
        );
        assert!(table[1].grants.is_empty());
        assert_eq!((table[0].updated_at_ms, table[1].updated_at_ms), (99, 99));
        let mut freed = out.freed.clone();
        freed.sort();
        let mut want = vec![(source(1), web), (source(2), ssh)];
        want.sort();
        assert_eq!(freed, want, "each lost grant's kernel key");
        let mut severed = out.severed.clone();
        severed.sort();
        assert_eq!(severed, [(1, web), (2, ssh)], "each lost grant's flows");
        assert_eq!(
            out.emptied,
            [SessionId(2)],
            "only the session left with nothing"
        );
        let lost: Vec<(u64, Vec<&str>)> = out
            .changed
            .iter()
            .map(|(s, g)| (s.id.0, g.iter().map(|g| g.resource.as_str()).collect()))
            .collect();
        assert_eq!(lost, [(1, vec!["web"]), (2, vec!["ssh"])]);
        // Readers holding the old record still see it whole: a change copies, never edits.
        assert_eq!(kept.grants.len(), 2);
    }

    #[test]
    fn reevaluate_leaves_an_allowed_session_untouched() {
        let p = before();
        let s = Arc::new(session(&p, 1, "staff", source(1), 10));
        let mut table = [Arc::clone(&s)];
        let mut live: Vec<&mut Arc<Session>> = table.iter_mut().collect();
        let out = reevaluate(&p, &mut live, 99);
        assert_eq!(out.evaluated, 1);
        assert!(out.changed.is_empty() && out.freed.is_empty() && out.emptied.is_empty());
        assert!(Arc::ptr_eq(&table[0], &s), "not copied");
        assert_eq!(table[0].updated_at_ms, 10);
    }

    #[test]
    fn reevaluate_drops_grants_of_a_resource_the_policy_removed() {
        let old = before();
        // The rule still names ssh, but web is gone from the resources altogether.
        let new = parse_policy([(
            Path::new("test.toml"),
            "[[resource]]\nname = \"ssh\"\nprotocol = \"tcp\"\nports = [22]\n\n\
             [[rule]]\nname = \"staff\"\ngroups = [\"staff\"]\nresources = [\"ssh\"]\n",
        )])
        .expect("policy");
        let mut table = [Arc::new(session(&old, 1, "staff", source(1), 10))];
        let mut live: Vec<&mut Arc<Session>> = table.iter_mut().collect();
        let out = reevaluate(&new, &mut live, 99);
        assert_eq!(out.freed, [(source(1), id_of(&old, "web"))]);
        assert_eq!(table[0].grants.len(), 1);
    }

    #[test]
    fn the_heir_of_a_freed_grant_is_the_newest_live_session_from_its_source() {
        let p = before();
        let ssh = id_of(&p, "ssh");
        let web = id_of(&p, "web");
        let older = session(&p, 1, "staff", source(1), 10);
        let newer = session(&p, 2, "ops", source(1), 20);
        let mut newest_ended = session(&p, 3, "staff", source(1), 30);
        newest_ended.state = SessionState::Terminated;
        let elsewhere = session(&p, 4, "staff", source(2), 40);
        let sessions = [older, newer, newest_ended, elsewhere];
        let freed: foldhash::HashSet<(IpAddr, u32)> =
            [(source(1), ssh), (source(1), web), (source(3), ssh)]
                .into_iter()
                .collect();

        let heirs = heirs_among(sessions.iter(), &freed);

        let heir = |key| {
            heirs
                .get(&key)
                .map(|(at, id, g)| (*at, *id, g.resource.as_str()))
        };
        assert_eq!(heir((source(1), ssh)), Some((20, SessionId(2), "ssh")));
        // Ops hold no web: the older staff session inherits it; the ended one never does.
        assert_eq!(heir((source(1), web)), Some((10, SessionId(1), "web")));
        assert_eq!(heir((source(3), ssh)), None, "nobody from that source");
        assert_eq!(heirs.len(), 2);
        assert!(heirs_among(sessions.iter(), &foldhash::HashSet::default()).is_empty());
    }

    #[test]
    fn merging_heirs_keeps_the_newest_whichever_part_found_it() {
        let p = before();
        let ssh = id_of(&p, "ssh");
        let web = id_of(&p, "web");
        let a = session(&p, 1, "staff", source(1), 10);
        let b = session(&p, 2, "staff", source(1), 20);
        fn grant(s: &Session, r: u32) -> &SessionGrant {
            s.grants
                .iter()
                .find(|g| g.resource_id == r)
                .expect("granted")
        }
        let (k_ssh, k_web) = ((source(1), ssh), (source(1), web));

        let mut into = Heirs::default();
        into.insert(k_ssh, (10, a.id, grant(&a, ssh)));
        into.insert(k_web, (20, b.id, grant(&b, web)));
        let mut found = Heirs::default();
        found.insert(k_ssh, (20, b.id, grant(&b, ssh)));
        found.insert(k_web, (10, a.id, grant(&a, web)));
        merge_heirs(&mut into, found);
        assert_eq!(into[&k_ssh].1, b.id, "the newer one found later wins");
        assert_eq!(into[&k_web].1, b.id, "an older one found later loses");

        // A tie keeps what was there: the outcome does not depend on thread order alone.
        let mut tie = Heirs::default();
        tie.insert(k_ssh, (20, a.id, grant(&a, ssh)));
        merge_heirs(&mut into, tie);
        assert_eq!(into[&k_ssh].1, b.id);
        assert_eq!(into.len(), 2);
    }
}
