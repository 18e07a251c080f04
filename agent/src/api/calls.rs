//! The typed calls of the status-socket client: one per method of the method list, each
//! with its parameter and answer types, and the audit stream as typed items.

use super::{
    answers::{
        AUDIT_EVENT, AUDIT_LAGGED, CheckView, ExplainView, Lagged, ModeView, Recorded, ReloadView,
        TerminateView, WhoisView,
    },
    client::{ClientError, Notifications, RpcClient},
    methods::{self as m, Method},
    request::{
        AuditFilter, ConsoleRefusal, DatapathMode, Empty, Explain, FlowFilter, PolicyCheck,
        SessionFilter, SessionRef, Terminate, Whois,
    },
    views::{FlowView, SessionView, StatusView},
};
use crate::{
    audit::{AuditQuery, event::AuditEvent},
    sessions::model::SessionId,
};

impl RpcClient {
    /// Calls method `M` with typed parameters and reads its typed answer.
    ///
    /// # Errors
    ///
    /// As [`Self::call`]; [`ClientError::Protocol`] when the answer is not `M`'s result.
    pub fn request<M: Method>(&mut self, params: &M::Params) -> Result<M::Result, ClientError> {
        let params = serde_json::to_value(params)
            .map_err(|e| self.protocol(format!("cannot encode the params of {}: {e}", M::NAME)))?;
        let answer = self.call(M::NAME, params)?;
        serde_json::from_value(answer)
            .map_err(|e| self.protocol(format!("the answer to {} does not read: {e}", M::NAME)))
    }

    /// `status`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn status(&mut self) -> Result<StatusView, ClientError> {
        self.request::<m::Status>(&Empty {})
    }

    /// `signals.status`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn signals_status(&mut self) -> Result<crate::signals::SignalsStatus, ClientError> {
        self.request::<m::SignalsStatus>(&Empty {})
    }

    /// `sessions.list`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn sessions_list(
        &mut self,
        filter: &SessionFilter,
    ) -> Result<Vec<SessionView>, ClientError> {
        self.request::<m::SessionsList>(filter)
    }

    /// `sessions.get`.
    ///
    /// # Errors
    /// As [`Self::request`]; not found is an [`ClientError::Rpc`] with `NOT_FOUND`.
    pub fn sessions_get(&mut self, id: SessionId) -> Result<SessionView, ClientError> {
        self.request::<m::SessionsGet>(&SessionRef { id })
    }

    /// `sessions.terminate`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn sessions_terminate(&mut self, t: &Terminate) -> Result<TerminateView, ClientError> {
        self.request::<m::SessionsTerminate>(t)
    }

    /// `flows.list`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn flows_list(&mut self, session: Option<SessionId>) -> Result<Vec<FlowView>, ClientError> {
        self.request::<m::FlowsList>(&FlowFilter { session })
    }

    /// `whois`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn whois(&mut self, w: &Whois) -> Result<WhoisView, ClientError> {
        self.request::<m::Whois>(w)
    }

    /// `audit.query`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn audit_query(&mut self, q: &AuditQuery) -> Result<Vec<AuditEvent>, ClientError> {
        self.request::<m::AuditQuery>(q)
    }

    /// `policy.reload`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn policy_reload(&mut self) -> Result<ReloadView, ClientError> {
        self.request::<m::PolicyReload>(&Empty {})
    }

    /// `policy.check`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn policy_check(&mut self, c: &PolicyCheck) -> Result<CheckView, ClientError> {
        self.request::<m::PolicyCheck>(c)
    }

    /// `policy.explain`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn policy_explain(&mut self, e: &Explain) -> Result<ExplainView, ClientError> {
        self.request::<m::PolicyExplain>(e)
    }

    /// `datapath.mode`: reads the mode, or sets it when `params.mode` is given.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn datapath_mode(&mut self, params: &DatapathMode) -> Result<ModeView, ClientError> {
        self.request::<m::DatapathMode>(params)
    }

    /// `lock.add`.
    ///
    /// # Errors
    /// As [`Self::request`]; a bad target, TTL or reason is an `INVALID_PARAMS` error.
    pub fn lock_add(
        &mut self,
        new: &crate::locks::NewLock,
    ) -> Result<crate::locks::wire::LockAddedView, ClientError> {
        self.request::<m::LockAdd>(new)
    }

    /// `lock.list`.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn lock_list(
        &mut self,
        filter: &crate::locks::wire::LockFilter,
    ) -> Result<Vec<crate::locks::wire::LockView>, ClientError> {
        self.request::<m::LockList>(filter)
    }

    /// `lock.show`.
    ///
    /// # Errors
    /// As [`Self::request`]; an unknown lock is `NOT_FOUND`.
    pub fn lock_show(
        &mut self,
        id: crate::locks::LockId,
    ) -> Result<crate::locks::wire::LockView, ClientError> {
        self.request::<m::LockShow>(&crate::locks::wire::LockRef {
            id,
            on_behalf_of: None,
        })
    }

    /// `lock.remove`.
    ///
    /// # Errors
    /// As [`Self::request`]; an unknown lock is `NOT_FOUND`.
    pub fn lock_remove(
        &mut self,
        id: crate::locks::LockId,
    ) -> Result<crate::locks::wire::LockRemovedView, ClientError> {
        self.lock_remove_for(id, None)
    }

    /// `lock.remove` on behalf of a person (the web console's administrator).
    ///
    /// # Errors
    /// As [`Self::lock_remove`].
    pub fn lock_remove_for(
        &mut self,
        id: crate::locks::LockId,
        on_behalf_of: Option<String>,
    ) -> Result<crate::locks::wire::LockRemovedView, ClientError> {
        self.request::<m::LockRemove>(&crate::locks::wire::LockRef { id, on_behalf_of })
    }

    /// `console.refused`: records a change the web console refused.
    ///
    /// # Errors
    /// As [`Self::request`].
    pub fn console_refused(&mut self, r: &ConsoleRefusal) -> Result<Recorded, ClientError> {
        self.request::<m::ConsoleRefused>(r)
    }

    /// `audit.subscribe`: every new matching event, until the agent ends the stream.
    ///
    /// # Errors
    /// As [`Self::request`] for the initial answer; the iterator yields later failures.
    pub fn audit_subscribe(
        &mut self,
        filter: &AuditFilter,
    ) -> Result<AuditStream<'_>, ClientError> {
        let params = serde_json::to_value(filter).map_err(|e| {
            self.protocol(format!("cannot encode the params of audit.subscribe: {e}"))
        })?;
        let (_, items) = self.subscribe(m::AuditSubscribe::NAME, params)?;
        Ok(AuditStream { items })
    }
}

/// What the audit stream brings.
#[derive(Debug, Clone, PartialEq)]
pub enum AuditItem {
    Event(Box<AuditEvent>),
    /// The agent dropped events this subscriber did not take in time.
    Lagged(Lagged),
}

/// The typed notifications of `audit.subscribe`.
pub struct AuditStream<'a> {
    items: Notifications<'a>,
}

impl Iterator for AuditStream<'_> {
    type Item = Result<AuditItem, ClientError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (method, params) = match self.items.next()? {
                Ok(item) => item,
                Err(e) => return Some(Err(e)),
            };
            let item = match method.as_str() {
                AUDIT_EVENT => {
                    serde_json::from_value(params).map(|e| AuditItem::Event(Box::new(e)))
                }
                AUDIT_LAGGED => serde_json::from_value(params).map(AuditItem::Lagged),
                // A notification a newer agent added: not for this client.
                _ => continue,
            };
            return Some(item.map_err(|e| {
                self.items
                    .client
                    .protocol(format!("a {method} notification that does not read: {e}"))
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{BufRead as _, BufReader, Write as _},
        os::unix::net::UnixListener,
    };

    use serde_json::{Value, json};

    use super::*;
    use crate::api::{answers::ModeName, client::tests::TempDir};

    /// A one-connection agent: checks each request line it gets against `expect` and
    /// answers with the lines given for it.
    fn fake_agent(
        tag: &str,
        script: Vec<(Value, Vec<Value>)>,
    ) -> (TempDir, std::thread::JoinHandle<()>) {
        let dir = TempDir::new(tag);
        let listener = UnixListener::bind(dir.0.join("agent.sock")).unwrap();
        let serve = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut writer = stream;
            for (expect, answers) in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let got: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(got, expect, "the request on the wire");
                for a in answers {
                    writeln!(writer, "{a}").unwrap();
                }
            }
        });
        (dir, serve)
    }

    #[test]
    fn a_typed_call_writes_the_documented_request_and_reads_the_answer() {
        let (dir, serve) = fake_agent(
            "typed",
            vec![
                (
                    json!({"jsonrpc": "2.0", "id": 1, "method": "datapath.mode",
                           "params": {"mode": "monitor"}}),
                    vec![json!({"jsonrpc": "2.0", "id": 1, "result": {"mode": "monitor"}})],
                ),
                (
                    json!({"jsonrpc": "2.0", "id": 2, "method": "sessions.get",
                           "params": {"id": "00000000000000ab"}}),
                    vec![json!({"jsonrpc": "2.0", "id": 2, "result": {"mode": 7}})],
                ),
            ],
        );
        let mut c = RpcClient::connect(&dir.0.join("agent.sock")).unwrap();
        let mode = c
            .datapath_mode(&DatapathMode {
                mode: Some(ModeName::Monitor),
            })
            .unwrap();
        assert_eq!(mode.mode, ModeName::Monitor);
        // An answer of the wrong shape is a protocol error that names the method.
        let e = c.sessions_get(SessionId(0xab)).unwrap_err();
        assert!(
            matches!(&e, ClientError::Protocol { detail, .. } if detail.starts_with("the answer to sessions.get does not read")),
            "{e:?}"
        );
        serve.join().unwrap();
    }

    #[test]
    fn the_audit_stream_yields_events_and_lag_and_skips_what_it_does_not_know() {
        let event = json!({"seq": 119, "at_ms": 1, "kind": "session_admitted",
                           "session": "5e55100000000002", "user": "alice", "source": "10.0.0.7",
                           "detail": "granted ssh"});
        let (dir, serve) = fake_agent(
            "stream",
            vec![(
                json!({"jsonrpc": "2.0", "id": 1, "method": "audit.subscribe",
                       "params": {"user": "alice"}}),
                vec![
                    json!({"jsonrpc": "2.0", "id": 1, "result": {"subscribed": true}}),
                    json!({"jsonrpc": "2.0", "method": "audit.event", "params": event}),
                    json!({"jsonrpc": "2.0", "method": "audit.future", "params": {}}),
                    json!({"jsonrpc": "2.0", "method": "audit.lagged",
                           "params": {"lagged": 3, "hint": "h"}}),
                ],
            )],
        );
        let mut c = RpcClient::connect(&dir.0.join("agent.sock")).unwrap();
        let items: Vec<AuditItem> = c
            .audit_subscribe(&AuditFilter {
                user: Some("alice".into()),
                ..AuditFilter::default()
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        serve.join().unwrap();
        assert_eq!(items.len(), 2, "{items:?}");
        assert!(matches!(&items[0], AuditItem::Event(e) if e.seq == 119));
        assert_eq!(
            items[1],
            AuditItem::Lagged(Lagged {
                lagged: 3,
                hint: "h".into()
            })
        );
    }
}
