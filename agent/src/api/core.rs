//! The core behind the status socket: each typed request answered from the sessions, the
//! kernel and the policy. The transport only moves bytes and checks credentials.

use std::{collections::HashSet, io, sync::Arc, time::Instant};

use serde_json::Value;
use tokio::sync::mpsc;

use super::{
    answers::{
        AUDIT_EVENT, AUDIT_LAGGED, AffectedView, CheckView, ExplainView, Lagged, ModeView,
        Recorded, ReloadView, Subscribed, TerminateView, WhoisView,
    },
    jsonrpc::{APP_ERROR, Call, INVALID_PARAMS, NOT_FOUND, RpcError},
    methods::{self, Method, Request},
    peer::Groups,
    request::{AuditFilter, Explain, Proto, SessionFilter},
    transport::{Caller, Handler, Reply},
    views::{
        AdmissionInfo, DropsView, FillView, PolicyInfo, StateCounts, StatusView, flow_view,
        session_row, session_view,
    },
};
use crate::{
    audit::{
        MAX_QUERY_LIMIT,
        event::{AuditEvent, AuditKind},
    },
    datapath::{DropReason, FlowKey, SessionStats, addr_bytes},
    enforce::Enforcer,
    policy::{PolicyHandle, Reload, load_policy},
    sessions::{
        Sessions, Target,
        model::{Session, SessionId, SessionState},
    },
};

/// Facts about this agent that `status` reports.
#[derive(Debug, Clone)]
pub struct AgentInfo {
    pub interfaces: Vec<String>,
    pub ingress: Vec<crate::api::views::IngressView>,
    pub pin_dir: String,
    pub admission_listen: String,
    pub admission_fingerprint: String,
    pub started: Instant,
    /// The configured admin and read groups, named in refusals.
    pub groups: Groups,
    /// Fleet membership, when `[fleet]` is configured.
    pub fleet: Option<Arc<crate::fleet::FleetState>>,
}

/// Listed sessions up to which each one's kernel counters are looked up on their own; above,
/// one batched read of all of them is cheaper.
const STATS_ONE_BY_ONE: usize = 64;

pub struct Core {
    pub sessions: Arc<Sessions>,
    pub enforcer: Arc<Enforcer>,
    pub policy: Arc<PolicyHandle>,
    pub info: AgentInfo,
}

fn rpc(code: i64, message: impl Into<String>) -> RpcError {
    RpcError::new(code, message)
}

/// The typed answer of method `M`, as the JSON the transport writes.
fn answer<M: Method>(result: M::Result) -> Result<Value, RpcError> {
    serde_json::to_value(&result).map_err(|e| {
        rpc(
            APP_ERROR,
            format!("cannot encode the answer of {}: {e}", M::NAME),
        )
    })
}

impl Handler for Core {
    async fn handle(&self, call: Call, caller: Caller) -> Result<Reply, RpcError> {
        let request = self.authorized(&call, &caller)?;
        if let Request::SessionsList(filter) = request {
            return Ok(self.list(filter));
        }
        self.dispatch(request, &caller).await.map(Reply::Value)
    }

    fn is_stream(&self, method: &str) -> bool {
        methods::streams(method)
    }

    async fn stream(
        &self,
        call: Call,
        caller: Caller,
    ) -> Result<(Value, mpsc::Receiver<(String, Value)>), RpcError> {
        let Request::AuditSubscribe(filter) = self.authorized(&call, &caller)? else {
            return Err(rpc(
                INVALID_PARAMS,
                format!("{} does not stream", call.method),
            ));
        };
        let rx = self.subscribe(filter);
        Ok((
            answer::<methods::AuditSubscribe>(Subscribed { subscribed: true })?,
            rx,
        ))
    }
}

impl Core {
    /// The call as a typed request, if the caller's access allows this very call.
    fn authorized(&self, call: &Call, caller: &Caller) -> Result<Request, RpcError> {
        let request = Request::parse(call)?;
        self.info
            .groups
            .require(caller.access, request.access(), request.method())?;
        Ok(request)
    }

    async fn dispatch(&self, request: Request, caller: &Caller) -> Result<Value, RpcError> {
        use methods as m;
        match request {
            Request::Status(_) => answer::<m::Status>(self.status()?),
            Request::SignalsStatus(_) => {
                answer::<m::SignalsStatus>(crate::signals::signals_status())
            }
            Request::SessionsList(filter) => self.list(filter).into_value(),
            Request::SessionsGet(r) => {
                let s = self
                    .sessions
                    .get(r.id)
                    .ok_or_else(|| rpc(NOT_FOUND, format!("no session {}", r.id)))?;
                answer::<m::SessionsGet>(self.detail(&s))
            }
            Request::SessionsTerminate(t) => {
                let target = match (t.ids.is_empty(), t.user) {
                    (false, None) => Target::Sessions(t.ids),
                    (true, Some(user)) => Target::User(user),
                    _ => {
                        return Err(rpc(
                            INVALID_PARAMS,
                            "give either ids (a list of session ids) or user, not both or neither",
                        ));
                    }
                };
                let reason = t
                    .reason
                    .unwrap_or_else(|| "terminated by an administrator".into());
                let by = actor(t.on_behalf_of.as_deref(), caller.peer.uid);
                if t.allow_relogin && t.cutoff {
                    return Err(rpc(
                        INVALID_PARAMS,
                        "allow_relogin and cutoff contradict each other: give one of them",
                    ));
                }
                // Termination sticks unless asked otherwise: the token is denied, and a
                // termination by user also cuts off the user's older tokens.
                let opts = crate::locks::TerminateOptions {
                    deny_tokens: !t.allow_relogin,
                    cutoff: !t.allow_relogin && (t.cutoff || matches!(target, Target::User(_))),
                };
                let done = self
                    .sessions
                    .terminate_sessions(&target, opts, &by, &reason)
                    .await?;
                answer::<m::SessionsTerminate>(TerminateView::of_terminated(&done))
            }
            Request::FlowsList(f) => answer::<m::FlowsList>(self.flows(f.session)),
            Request::Whois(w) => answer::<m::Whois>(self.whois(w.a, w.b, w.protocol)?),
            Request::AuditQuery(q) => {
                if let Some(limit) = q.limit.filter(|&l| l > MAX_QUERY_LIMIT) {
                    return Err(rpc(
                        INVALID_PARAMS,
                        format!(
                            "limit {limit} is above the maximum of {MAX_QUERY_LIMIT}: page with \
                             after_seq (the seq of the last event you have)"
                        ),
                    ));
                }
                answer::<m::AuditQuery>(self.sessions.audit().query(&q)?)
            }
            Request::AuditSubscribe(_) => Err(rpc(
                INVALID_PARAMS,
                "audit.subscribe streams: the transport calls it as a subscription",
            )),
            Request::PolicyReload(_) => answer::<m::PolicyReload>(self.reload().await?),
            Request::PolicyCheck(c) => {
                let dir = c.dir.unwrap_or_else(|| self.policy.dir().to_owned());
                let p = load_policy(&dir)?;
                answer::<m::PolicyCheck>(CheckView {
                    ok: true,
                    dir,
                    files: p.files.len(),
                    resources: p.resources.resources.len(),
                    rules: p.rules.len(),
                })
            }
            Request::PolicyExplain(e) => answer::<m::PolicyExplain>(self.explain(e)?),
            Request::LockAdd(new) => {
                let by = actor(new.on_behalf_of.as_deref(), caller.peer.uid);
                let added = self.sessions.add_lock(new, &by).await?;
                answer::<m::LockAdd>((&added).into())
            }
            Request::LockList(f) => {
                let now = crate::sessions::model::now_ms();
                let locks = self.sessions.locks().list();
                answer::<m::LockList>(
                    locks
                        .iter()
                        .filter(|l| !f.active || l.holds(now))
                        .map(Into::into)
                        .collect(),
                )
            }
            Request::LockShow(r) => {
                let lock = self
                    .sessions
                    .locks()
                    .get(r.id)
                    .ok_or(crate::locks::LocksError::NotFound(r.id))?;
                answer::<m::LockShow>((&lock).into())
            }
            Request::LockRemove(r) => {
                let by = actor(r.on_behalf_of.as_deref(), caller.peer.uid);
                let lock = self.sessions.remove_lock(r.id, &by).await?;
                answer::<m::LockRemove>(crate::locks::wire::LockRemovedView {
                    removed: (&lock).into(),
                })
            }
            Request::ConsoleRefused(r) => {
                let mut ev = AuditEvent::new(AuditKind::ConsoleRefused {
                    by: r.by.clone(),
                    action: r.action,
                    reason: r.reason,
                });
                ev.user = Some(r.by);
                ev.detail = format!("refused by the console (uid {})", caller.peer.uid);
                self.sessions.record(vec![ev]).await?;
                answer::<m::ConsoleRefused>(Recorded { recorded: true })
            }
            Request::DatapathMode(params) => {
                if let Some(mode) = params.mode {
                    self.enforcer.set_mode(mode.into())?;
                    let mut ev = AuditEvent::new(AuditKind::DatapathModeChanged {
                        mode: mode.as_str().to_owned(),
                    });
                    ev.detail = format!("set by uid {}", caller.peer.uid);
                    self.sessions.record(vec![ev]).await?;
                }
                let mode = self.enforcer.mode()?;
                answer::<m::DatapathMode>(ModeView { mode: mode.into() })
            }
        }
    }

    fn status(&self) -> Result<StatusView, RpcError> {
        let counters = self.enforcer.counters()?;
        let mode = self.enforcer.mode()?;
        let (count, capacity) = self.enforcer.flow_fill();
        let mut states = StateCounts::default();
        for s in self.sessions.all() {
            match s.state {
                SessionState::Active => states.active += 1,
                SessionState::Dormant => states.dormant += 1,
                SessionState::Expired => states.expired += 1,
                SessionState::Terminated => states.terminated += 1,
                SessionState::Authenticating => {}
            }
        }
        let policy = self.policy.current();
        Ok(StatusView {
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_ms: self.info.started.elapsed().as_millis() as u64,
            now_ms: crate::sessions::model::now_ms(),
            mode: mode.into(),
            interfaces: self.info.interfaces.clone(),
            pin_dir: self.info.pin_dir.clone(),
            ingress: self.info.ingress.clone(),
            admission: AdmissionInfo {
                listen: self.info.admission_listen.clone(),
                fingerprint: self.info.admission_fingerprint.clone(),
            },
            sessions: states,
            flows: FillView {
                count,
                capacity,
                fill_ratio: if capacity == 0 {
                    0.0
                } else {
                    count as f64 / f64::from(capacity)
                },
            },
            policy: PolicyInfo {
                dir: self.policy.dir().display().to_string(),
                files: policy.files.len(),
                resources: policy.resources.resources.len(),
                rules: policy.rules.len(),
                fingerprint: policy.fingerprint.clone(),
            },
            drops: DropReason::ALL
                .iter()
                .map(|r| (r.as_str().to_owned(), counters.dropped(*r)))
                .collect(),
            would_drop: DropReason::ALL
                .iter()
                .map(|r| (r.as_str().to_owned(), counters.would_drop(*r)))
                .collect(),
            flows_opened: counters.flows_opened,
            events_lost: counters.events_lost,
            issuers: crate::auth::key_status(),
            fleet: self.info.fleet.as_ref().map(|f| f.status()),
            locks: self.sessions.locks().counts(),
        })
    }

    fn drops(&self, id: SessionId) -> DropsView {
        drops_view(self.enforcer.session_stats(id))
    }

    /// `sessions.list`, as an answer that writes itself: with 100,000 sessions the list is
    /// 70 MiB of JSON, which is never held in memory as a whole (see [`write_list`]).
    fn list(&self, filter: SessionFilter) -> Reply {
        let (sessions, enforcer) = (Arc::clone(&self.sessions), Arc::clone(&self.enforcer));
        Reply::raw(move |out| write_list(&sessions, &enforcer, &filter, out))
    }

    fn detail(&self, s: &Session) -> super::views::SessionView {
        let census = self.enforcer.recent_census();
        let mut v = session_view(s, census.traffic.get(&s.id), self.drops(s.id), true);
        v.session_flow_limit_drops = self
            .enforcer
            .session_stats(s.id)
            .map_or(0, |st| st.flow_limit_drops);
        v.flows = Some(self.flows(Some(s.id)));
        v.signals = self.sessions.applied_signals(s.id);
        v
    }

    fn flows(&self, session: Option<SessionId>) -> Vec<super::views::FlowView> {
        let policy = self.policy.current();
        let revoked: HashSet<SessionId> = self.enforcer.revoked().into_iter().collect();
        // One session's flows come from the flow index: no walk of the whole table.
        let flows = match session {
            Some(id) => self.enforcer.session_flows(id),
            None => self.enforcer.flows(),
        };
        flows
            .iter()
            .map(|(k, f)| {
                let s = self.sessions.get(SessionId(f.session_id));
                flow_view(
                    k,
                    f,
                    s.as_deref(),
                    &policy,
                    revoked.contains(&SessionId(f.session_id)),
                )
            })
            .collect()
    }

    fn whois(
        &self,
        a: std::net::SocketAddr,
        b: std::net::SocketAddr,
        proto: Proto,
    ) -> Result<WhoisView, RpcError> {
        let proto = match proto {
            Proto::Tcp => agent_common::IPPROTO_TCP,
            Proto::Udp => agent_common::IPPROTO_UDP,
        };
        let key = |src: std::net::SocketAddr, dst: std::net::SocketAddr| FlowKey {
            src: addr_bytes(src.ip()),
            dst: addr_bytes(dst.ip()),
            sport: src.port(),
            dport: dst.port(),
            proto,
            _pad: [0; 3],
        };
        for k in [key(a, b), key(b, a)] {
            let Some(flow) = self.enforcer.flow_between(&k) else {
                continue;
            };
            let id = SessionId(flow.session_id);
            let session = self.sessions.get(id);
            let revoked = self.enforcer.revocation(id).is_some();
            let fv = flow_view(
                &k,
                &flow,
                session.as_deref(),
                &self.policy.current(),
                revoked,
            );
            return Ok(WhoisView {
                flow: fv,
                session: session.map(|s| self.detail(&s)),
            });
        }
        Err(rpc(
            NOT_FOUND,
            format!(
                "no flow between {a} and {b} is known to the agent (not to a resource, or already gone)"
            ),
        ))
    }

    async fn reload(&self) -> Result<ReloadView, RpcError> {
        match self.policy.reload() {
            Ok(Reload::Unchanged) => Ok(ReloadView {
                changed: false,
                outcome: None,
            }),
            Ok(Reload::Changed(policy)) => {
                let outcome = self
                    .sessions
                    .install_policy(policy)
                    .await
                    .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
                Ok(ReloadView {
                    changed: true,
                    outcome: Some(outcome.into()),
                })
            }
            Err(e) => {
                let ev = AuditEvent::new(AuditKind::PolicyRejected {
                    error: e.to_string(),
                });
                let _ = self.sessions.record(vec![ev]).await;
                Err(e.into())
            }
        }
    }

    fn explain(&self, e: Explain) -> Result<ExplainView, RpcError> {
        if let Some(dir) = e.candidate {
            let candidate = load_policy(&dir)?;
            let mut affected = Vec::new();
            for s in self.sessions.all().into_iter().filter(|s| s.is_live()) {
                let applicable = candidate.applicable(&s.identity, s.source);
                let removed: Vec<String> = s
                    .grants
                    .iter()
                    .filter(|g| !applicable.reaches(g.resource_id))
                    .map(|g| g.resource.clone())
                    .collect();
                if !removed.is_empty() {
                    affected.push(AffectedView {
                        session: s.id,
                        user: s.identity.user().to_owned(),
                        source: s.source,
                        terminated: removed.len() == s.grants.len(),
                        removed,
                    });
                }
            }
            return Ok(ExplainView::Candidate {
                candidate: dir,
                affected,
            });
        }
        let session = match (e.session, e.user.as_deref()) {
            (Some(id), _) => self.sessions.get(id),
            (None, Some(user)) => {
                let mut of_user: Vec<std::sync::Arc<Session>> = self
                    .sessions
                    .all()
                    .into_iter()
                    .filter(|s| s.identity.is(user))
                    .collect();
                of_user.sort_by_key(|s| std::cmp::Reverse((s.is_live(), s.created_at_ms)));
                of_user.into_iter().next()
            }
            (None, None) => {
                return Err(rpc(
                    INVALID_PARAMS,
                    "give user (whose latest session supplies the identity), session, or candidate",
                ));
            }
        };
        // A user who was only ever refused: the identity their last refused admission
        // presented (kept in memory since the agent started).
        let refused = match (&session, e.session, e.user.as_deref()) {
            (None, None, Some(user)) => self.sessions.last_refused(user),
            _ => None,
        };
        let (identity, source, session_id, refused_at_ms) = match (&session, &refused) {
            (Some(s), _) => (&s.identity, s.source, Some(s.id), None),
            (None, Some(r)) => (&r.identity, r.source, None, Some(r.at_ms)),
            (None, None) => {
                return Err(rpc(
                    NOT_FOUND,
                    "no session or refused admission of that user, or no such session: explain \
                     needs an identity the agent has seen since it started",
                ));
            }
        };
        let policy = self.policy.current();
        let resources: Vec<String> = match e.resource {
            Some(r) => vec![r],
            None => policy
                .resources
                .resources
                .iter()
                .map(|r| r.name.clone())
                .collect(),
        };
        Ok(ExplainView::Identity {
            refused_by: self.sessions.locks().would_refuse(identity, source),
            user: identity.user().to_owned(),
            session: session_id,
            refused_at_ms,
            source,
            explanations: resources
                .iter()
                .map(|r| policy.explain(identity, Some(source), r).into())
                .collect(),
        })
    }

    fn subscribe(&self, filter: AuditFilter) -> mpsc::Receiver<(String, Value)> {
        let mut rx = self.sessions.audit().subscribe();
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let item = match rx.recv().await {
                    Ok(ev) if !matches(&filter, &ev) => continue,
                    Ok(ev) => (AUDIT_EVENT, serde_json::to_value(&ev)),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => (
                        AUDIT_LAGGED,
                        serde_json::to_value(Lagged {
                            lagged: n,
                            hint: "re-query with audit.query after_seq".into(),
                        }),
                    ),
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                };
                let (method, Ok(params)) = item else {
                    continue;
                };
                if tx.send((method.to_owned(), params)).await.is_err() {
                    return;
                }
            }
        });
        out
    }
}

/// Sessions first, filtered (nothing else is read when none match); their traffic from
/// one census of the flow table (a recent one when the table is large); their kernel
/// counters in one batched read when there are many. Each session is encoded and written as
/// it comes, so memory holds one session's view at a time, not the whole list.
fn write_list(
    sessions: &Sessions,
    enforcer: &Enforcer,
    f: &SessionFilter,
    out: &mut dyn io::Write,
) -> io::Result<()> {
    let mut sessions: Vec<Arc<Session>> = sessions
        .all()
        .into_iter()
        .filter(|s| !f.live || s.is_live())
        .filter(|s| f.state.is_none_or(|st| s.state == st))
        .filter(|s| f.user.as_deref().is_none_or(|u| s.identity.is(u)))
        .filter(|s| f.resource.as_deref().is_none_or(|r| s.grants_resource(r)))
        .filter(|s| f.source.is_none_or(|ip| s.source == ip))
        .collect();
    out.write_all(b"[")?;
    if !sessions.is_empty() {
        sessions.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
        // A window (the console's page): only its sessions get counters looked up.
        let offset = f.offset.unwrap_or(0).min(sessions.len());
        let end = f.limit.map_or(sessions.len(), |l| {
            offset.saturating_add(l).min(sessions.len())
        });
        sessions.truncate(end);
        sessions.drain(..offset);
    }
    if !sessions.is_empty() {
        let census = enforcer.recent_census();
        let stats = (sessions.len() > STATS_ONE_BY_ONE).then(|| enforcer.all_session_stats());
        // Each row is encoded into a buffer of its own and handed over whole: serde writes a
        // row in dozens of small pieces, each a dynamic call on `out` otherwise.
        let mut row = Vec::with_capacity(1024);
        for (i, s) in sessions.iter().enumerate() {
            row.clear();
            if i > 0 {
                row.push(b',');
            }
            let drops = match &stats {
                Some(all) => drops_view(all.get(&s.id).copied()),
                None => drops_view(enforcer.session_stats(s.id)),
            };
            let view = session_row(s, census.traffic.get(&s.id), drops);
            serde_json::to_writer(&mut row, &view)?;
            out.write_all(&row)?;
        }
    }
    out.write_all(b"]")
}

/// Who a change is recorded as made by: the caller's uid, and the person a relaying client
/// (the web console) names.
fn actor(on_behalf_of: Option<&str>, uid: u32) -> String {
    match on_behalf_of.map(str::trim) {
        Some(who) if !who.is_empty() => format!("{who} (console, uid {uid})"),
        _ => format!("uid {uid}"),
    }
}

fn drops_view(stats: Option<SessionStats>) -> DropsView {
    stats
        .map(|s| DropsView {
            packets: s.dropped_after_revoke_packets,
            bytes: s.dropped_after_revoke_bytes,
        })
        .unwrap_or_default()
}

fn matches(f: &AuditFilter, e: &AuditEvent) -> bool {
    f.session.is_none_or(|id| e.session == Some(id))
        && f.user.as_deref().is_none_or(|u| {
            e.user
                .as_deref()
                .is_some_and(|eu| eu.eq_ignore_ascii_case(u))
        })
        && f.kind.as_deref().is_none_or(|k| e.kind.name() == k)
}

#[cfg(test)]
#[path = "core_tests.rs"]
mod tests;
