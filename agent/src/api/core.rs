//! The core behind the status socket: each typed request answered from the sessions, the
//! kernel and the policy. The transport only moves bytes and checks credentials.

use std::{collections::HashSet, sync::Arc, time::Instant};

use serde_json::{Value, json};
use tokio::sync::mpsc;

use super::{
    jsonrpc::{APP_ERROR, Call, INVALID_PARAMS, NOT_FOUND, PERMISSION_DENIED, RpcError},
    peer::Access,
    request::{AuditFilter, Explain, Proto, Request, SessionFilter},
    transport::{Caller, Handler},
    views::{
        AdmissionInfo, DropsView, FillView, PolicyInfo, StateCounts, StatusView, flow_view,
        session_view,
    },
};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    datapath::{DropReason, FlowKey, SessionStats, addr_bytes},
    enforce::Enforcer,
    policy::{PolicyHandle, Reload, load_policy},
    sessions::{
        SessionError, Sessions, Target,
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
    RpcError {
        code,
        message: message.into(),
        data: None,
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Result<Value, RpcError> {
    serde_json::to_value(v).map_err(|e| rpc(APP_ERROR, format!("cannot encode the answer: {e}")))
}

fn session_error(e: SessionError) -> RpcError {
    match e {
        SessionError::NotFound(id) => rpc(NOT_FOUND, format!("no session {id}")),
        other => rpc(APP_ERROR, other.to_string()),
    }
}

impl Handler for Core {
    async fn handle(&self, call: Call, caller: Caller) -> Result<Value, RpcError> {
        let request = Request::parse(&call)?;
        self.authorize(&request, &call.method, &caller)?;
        self.dispatch(request, &caller).await
    }

    fn is_stream(&self, method: &str) -> bool {
        method == "audit.subscribe"
    }

    async fn stream(
        &self,
        call: Call,
        caller: Caller,
    ) -> Result<(Value, mpsc::Receiver<(String, Value)>), RpcError> {
        let request = Request::parse(&call)?;
        self.authorize(&request, &call.method, &caller)?;
        let Request::AuditSubscribe(filter) = request else {
            return Err(rpc(
                INVALID_PARAMS,
                format!("{} does not stream", call.method),
            ));
        };
        Ok(self.subscribe(filter))
    }
}

impl Core {
    fn authorize(&self, request: &Request, method: &str, caller: &Caller) -> Result<(), RpcError> {
        let needed = if request.mutates() {
            Access::Admin
        } else {
            Access::Read
        };
        if caller.access >= needed {
            return Ok(());
        }
        Err(rpc(
            PERMISSION_DENIED,
            format!(
                "permission denied: {method} needs {} access and uid {} has {}",
                if needed == Access::Admin {
                    "admin"
                } else {
                    "read"
                },
                caller.peer.uid,
                match caller.access {
                    Access::Admin => "admin",
                    Access::Read => "read only",
                    Access::None => "none",
                }
            ),
        ))
    }

    async fn dispatch(&self, request: Request, caller: &Caller) -> Result<Value, RpcError> {
        match request {
            Request::Status(_) => to_value(&self.status()?),
            Request::SessionsList(filter) => to_value(&self.list(&filter)),
            Request::SessionsGet(r) => {
                let s = self
                    .sessions
                    .get(r.id)
                    .ok_or_else(|| rpc(NOT_FOUND, format!("no session {}", r.id)))?;
                to_value(&self.detail(&s))
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
                let by = format!("uid {}", caller.peer.uid);
                let ended = self
                    .sessions
                    .terminate(&target, &by, &reason)
                    .await
                    .map_err(session_error)?;
                let list: Vec<Value> = ended
                    .iter()
                    .map(|e| json!({"id": e.id.to_string(), "user": e.user, "source": e.source}))
                    .collect();
                Ok(json!({ "terminated": list, "count": ended.len() }))
            }
            Request::FlowsList(f) => {
                let flows = self.flows(f.session);
                to_value(&flows)
            }
            Request::Whois(w) => self.whois(w.a, w.b, w.protocol),
            Request::AuditQuery(q) => {
                let events = self
                    .sessions
                    .audit()
                    .query(&q)
                    .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
                to_value(&events)
            }
            Request::AuditSubscribe(_) => Err(rpc(
                INVALID_PARAMS,
                "audit.subscribe streams: the transport calls it as a subscription",
            )),
            Request::PolicyReload(_) => self.reload().await,
            Request::PolicyCheck(c) => {
                let dir = c.dir.unwrap_or_else(|| self.policy.dir().to_owned());
                let p = load_policy(&dir).map_err(|e| rpc(APP_ERROR, e.to_string()))?;
                Ok(json!({
                    "ok": true, "dir": dir, "files": p.files.len(),
                    "resources": p.resources.resources.len(), "rules": p.rules.len(),
                }))
            }
            Request::PolicyExplain(e) => self.explain(e),
            Request::DatapathMode(m) => {
                if let Some(mode) = m.mode {
                    self.enforcer
                        .with_maps(|maps| maps.set_mode(mode))
                        .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
                    let name = format!("{mode:?}").to_lowercase();
                    let mut ev = AuditEvent::new(AuditKind::DatapathModeChanged { mode: name });
                    ev.detail = format!("set by uid {}", caller.peer.uid);
                    self.sessions
                        .record(vec![ev])
                        .await
                        .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
                }
                let mode = self
                    .enforcer
                    .with_maps(|maps| maps.mode())
                    .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
                Ok(json!({ "mode": format!("{mode:?}").to_lowercase() }))
            }
        }
    }

    fn status(&self) -> Result<StatusView, RpcError> {
        let counters = self
            .enforcer
            .counters()
            .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
        let mode = self
            .enforcer
            .with_maps(|m| m.mode())
            .map_err(|e| rpc(APP_ERROR, e.to_string()))?;
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
            mode: format!("{mode:?}").to_lowercase(),
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
        })
    }

    fn drops(&self, id: SessionId) -> DropsView {
        drops_view(self.enforcer.session_stats(id))
    }

    /// Sessions first, filtered (nothing else is read when none match); their traffic from
    /// one census of the flow table (a recent one when the table is large); their kernel
    /// counters in one batched read when there are many.
    fn list(&self, f: &SessionFilter) -> Vec<super::views::SessionView> {
        let mut sessions: Vec<std::sync::Arc<Session>> = self
            .sessions
            .all()
            .into_iter()
            .filter(|s| !f.live || s.is_live())
            .filter(|s| f.state.is_none_or(|st| s.state == st))
            .filter(|s| f.user.as_deref().is_none_or(|u| s.identity.is(u)))
            .filter(|s| f.resource.as_deref().is_none_or(|r| s.grants_resource(r)))
            .filter(|s| f.source.is_none_or(|ip| s.source == ip))
            .collect();
        if sessions.is_empty() {
            return Vec::new();
        }
        sessions.sort_by_key(|s| std::cmp::Reverse(s.created_at_ms));
        let census = self.enforcer.recent_census();
        let stats = (sessions.len() > STATS_ONE_BY_ONE).then(|| self.enforcer.all_session_stats());
        sessions
            .iter()
            .map(|s| {
                let drops = match &stats {
                    Some(all) => drops_view(all.get(&s.id).copied()),
                    None => self.drops(s.id),
                };
                session_view(s, census.traffic.get(&s.id), drops, false)
            })
            .collect()
    }

    fn detail(&self, s: &Session) -> super::views::SessionView {
        let census = self.enforcer.recent_census();
        let mut v = session_view(s, census.traffic.get(&s.id), self.drops(s.id), true);
        v.flows = Some(self.flows(Some(s.id)));
        v
    }

    fn flows(&self, session: Option<SessionId>) -> Vec<super::views::FlowView> {
        let policy = self.policy.current();
        let revoked: HashSet<SessionId> = self.enforcer.revoked().into_iter().collect();
        self.enforcer
            .flows_where(|f| session.is_none_or(|id| f.session_id == id.0))
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
    ) -> Result<Value, RpcError> {
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
            let Some(flow) = self.enforcer.with_maps(|m| m.flow(&k)) else {
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
            let sv = session.map(|s| self.detail(&s));
            return Ok(json!({ "flow": fv, "session": sv }));
        }
        Err(rpc(
            NOT_FOUND,
            format!(
                "no flow between {a} and {b} is known to the agent (not to a resource, or already gone)"
            ),
        ))
    }

    async fn reload(&self) -> Result<Value, RpcError> {
        match self.policy.reload() {
            Ok(Reload::Unchanged) => Ok(json!({ "changed": false })),
            Ok(Reload::Changed(policy)) => {
                let outcome = crate::agent::apply_policy(&self.sessions, &self.enforcer, &policy)
                    .await
                    .map_err(|e| rpc(APP_ERROR, format!("{e:#}")))?;
                Ok(json!({ "changed": true, "outcome": outcome }))
            }
            Err(e) => {
                let ev = AuditEvent::new(AuditKind::PolicyRejected {
                    error: e.to_string(),
                });
                let _ = self.sessions.record(vec![ev]).await;
                Err(rpc(APP_ERROR, e.to_string()))
            }
        }
    }

    fn explain(&self, e: Explain) -> Result<Value, RpcError> {
        if let Some(dir) = e.candidate {
            let candidate = load_policy(&dir).map_err(|err| rpc(APP_ERROR, err.to_string()))?;
            let mut affected = Vec::new();
            for s in self.sessions.all().into_iter().filter(|s| s.is_live()) {
                let applicable = candidate.applicable(&s.identity, s.source);
                let removed: Vec<&str> = s
                    .grants
                    .iter()
                    .filter(|g| !applicable.reaches(g.resource_id))
                    .map(|g| g.resource.as_str())
                    .collect();
                if !removed.is_empty() {
                    affected.push(json!({
                        "session": s.id.to_string(), "user": s.identity.user(),
                        "source": s.source, "removed": removed,
                        "terminated": removed.len() == s.grants.len(),
                    }));
                }
            }
            return Ok(json!({ "candidate": dir, "affected": affected }));
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
        let Some(s) = session else {
            return Err(rpc(
                NOT_FOUND,
                "no session of that user or id: explain needs an identity the agent has seen",
            ));
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
        let explanations: Vec<_> = resources
            .iter()
            .map(|r| policy.explain(&s.identity, Some(s.source), r))
            .collect();
        Ok(json!({
            "user": s.identity.user(), "session": s.id.to_string(), "source": s.source,
            "explanations": explanations,
        }))
    }

    fn subscribe(&self, filter: AuditFilter) -> (Value, mpsc::Receiver<(String, Value)>) {
        let mut rx = self.sessions.audit().subscribe();
        let (tx, out) = mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) => {
                        if !matches(&filter, &ev) {
                            continue;
                        }
                        let Ok(v) = serde_json::to_value(&ev) else {
                            continue;
                        };
                        if tx.send(("audit.event".into(), v)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let note =
                            json!({ "lagged": n, "hint": "re-query with audit.query after_seq" });
                        if tx.send(("audit.lagged".into(), note)).await.is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        (json!({ "subscribed": true }), out)
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
