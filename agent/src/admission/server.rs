//! The HTTPS admission endpoint: `POST /v1/sessions` with a bearer token admits a session for
//! the connection's peer address; `POST /v1/sessions/reconnect` re-admits one with a
//! reconnect token. The socket code only moves bytes; decisions are the sessions room's.

use std::{convert::Infallible, net::IpAddr, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use super::{
    budget::{Budget, Refused},
    rate::RateLimiter,
    request::{self, Ask},
    wire::{AdmissionResponse, ErrorResponse, GrantedResource, ReconnectMaterial},
};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    auth::Verifier,
    metrics::{AdmissionResult, ConnectionEvent, Metrics},
    sessions::{Admitted, SessionError, Sessions, model::now_ms},
};

/// A TLS handshake that takes longer than this is dropped (slowloris).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Reconnect tokens are accepted this far from the agent's clock.
const RECONNECT_TOKEN_LIFETIME_SECS: u64 = 60;
/// Refusals and evictions are logged at most this often.
const PRESSURE_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct Admission {
    pub sessions: Arc<Sessions>,
    pub verifier: Arc<Verifier>,
    pub limiter: RateLimiter,
    pub metrics: Arc<Metrics>,
    /// Connections at once, from each source and in all.
    pub budget: Arc<Budget>,
    /// A connection that has finished TLS (or answered its last request) and has not sent a
    /// complete request within this is closed.
    pub request_timeout: Duration,
    /// The Shared Signals receiver for pushed SETs (`POST /v1/ssf/events`), if configured.
    pub signals: Option<Arc<crate::signals::Receiver>>,
    /// Fleet membership: admissions wait until the agent has caught up with fleet commands
    /// (and, in strict mode, while it cannot confirm it is current).
    pub fleet: Option<Arc<crate::fleet::FleetState>>,
}

/// Serves admissions on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, tls: Arc<rustls::ServerConfig>, app: Arc<Admission>) {
    let acceptor = TlsAcceptor::from(tls);
    let mut pressure = PressureLog::default();
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                // Out of fds and the like: back off instead of spinning.
                tracing::warn!(error = %e, "admission accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let source = canonical(peer.ip());
        let ticket = match app.budget.admit(source) {
            Ok(admitted) => {
                if admitted.evicted {
                    app.metrics.admission_connection(ConnectionEvent::Evicted);
                    pressure.note(&app.budget, "closed the oldest idle connection", source);
                }
                admitted.ticket
            }
            Err(refused) => {
                let (event, what) = match refused {
                    Refused::SourceLimit => (
                        ConnectionEvent::RefusedSourceLimit,
                        "refused a connection: its source has its share open",
                    ),
                    Refused::GlobalLimit => (
                        ConnectionEvent::RefusedGlobalLimit,
                        "refused a connection: every admission connection is busy",
                    ),
                };
                app.metrics.admission_connection(event);
                pressure.note(&app.budget, what, source);
                // Dropping the socket closes it before any TLS work is spent on it.
                drop(tcp);
                continue;
            }
        };
        // Without it, the TLS 1.3 session ticket the server sends right after its handshake
        // flight waits (Nagle) for the client's delayed ACK: 40 ms added to every new login.
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let app = Arc::clone(&app);
        tokio::spawn(async move {
            let conn = Arc::clone(&ticket.connection);
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp));
            let tls = tokio::select! {
                done = handshake => match done {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "admission TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        app.metrics.admission_connection(ConnectionEvent::ClosedIdle);
                        return;
                    }
                },
                () = conn.evicted() => return,
            };
            let oversized = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let tls = super::refusal::HeadLimit::new(tls, Arc::clone(&oversized));
            let auditor = Arc::clone(&app);
            conn.idle_from_now();
            let request_timeout = app.request_timeout;
            let metrics = Arc::clone(&app.metrics);
            let marks = Arc::clone(&conn);
            let service = service_fn(move |req| {
                let app = Arc::clone(&app);
                let busy = marks.busy();
                async move {
                    let answer = app.handle(req, source).await;
                    drop(busy);
                    Ok::<_, Infallible>(answer)
                }
            });
            let served = http1_builder().serve_connection(TokioIo::new(tls), service);
            tokio::pin!(served);
            loop {
                // Idle: the time it has left; busy: look again after a whole timeout.
                let left = conn
                    .idle_for()
                    .map_or(request_timeout, |idle| request_timeout.saturating_sub(idle));
                tokio::select! {
                    ended = &mut served => {
                        if let Err(e) = ended {
                            tracing::debug!(%peer, error = %e, "admission connection ended with an error");
                        }
                        break;
                    }
                    () = tokio::time::sleep(left) => {
                        if conn.idle_for().is_some_and(|idle| idle >= request_timeout) {
                            tracing::debug!(%peer, "admission connection sent no complete request in time");
                            metrics.admission_connection(ConnectionEvent::ClosedIdle);
                            break;
                        }
                    }
                    () = conn.evicted() => break,
                }
            }
            drop(ticket);
            if oversized.load(std::sync::atomic::Ordering::Acquire) {
                let refusal = super::refusal::head_too_large();
                auditor.record_refusal(&refusal, source).await;
            }
        });
    }
}

/// Logs connection pressure (refusals, evictions) at warn level, at most once per
/// [`PRESSURE_LOG_EVERY`], with how many happened since the last line.
#[derive(Default)]
struct PressureLog {
    last: Option<std::time::Instant>,
    since: u64,
}

impl PressureLog {
    fn note(&mut self, budget: &Budget, what: &'static str, source: IpAddr) {
        self.since += 1;
        if self
            .last
            .is_some_and(|at| at.elapsed() < PRESSURE_LOG_EVERY)
        {
            return;
        }
        tracing::warn!(
            %source,
            open = budget.open(),
            limit = budget.limit(),
            per_source = budget.per_source(),
            events = self.since,
            "admission endpoint under connection pressure: {what}"
        );
        self.last = Some(std::time::Instant::now());
        self.since = 0;
    }
}

/// The HTTP/1 settings of an admission connection once TLS is done (the fuzz target serves
/// its requests with the same ones).
pub fn http1_builder() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder.max_buf_size(64 * 1024);
    builder
}

/// An IPv4 client reaching a dual-stack socket shows as `::ffff:a.b.c.d`: grants are for
/// the IPv4 address the kernel programs see.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)))
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new())))
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response<Full<Bytes>> {
    json(
        status,
        &ErrorResponse {
            error: code.to_owned(),
            message: message.into(),
        },
    )
}

impl Admission {
    async fn handle(&self, req: Request<Incoming>, source: IpAddr) -> Response<Full<Bytes>> {
        if req.uri().path() == crate::signals::PUSH_PATH {
            return crate::signals::push::handle(self.signals.as_ref(), req, || {
                self.limiter.allow(source)
            })
            .await;
        }
        let ask = request::read(
            req.method(),
            req.uri().path(),
            req.headers(),
            source,
            || self.limiter.allow(source),
        );
        if let (Ok(_), Some(fleet)) = (&ask, &self.fleet)
            && let Err(why) = fleet.admits()
        {
            let refusal = super::request::Refusal {
                status: StatusCode::SERVICE_UNAVAILABLE,
                code: "fleet_not_current",
                message: why,
            };
            self.record_refusal(&refusal, source).await;
            return error(refusal.status, refusal.code, refusal.message);
        }
        let token = match ask {
            Ok(Ask::Admit { token }) => token,
            Ok(Ask::Reconnect { token }) => return self.reconnect(token, source).await,
            Err(refusal) => {
                self.record_refusal(&refusal, source).await;
                return error(refusal.status, refusal.code, refusal.message);
            }
        };
        let started = std::time::Instant::now();
        let now = now_ms() / 1000;
        // With its keys cached a verification is ~100 µs of CPU and is done here; one that
        // must fetch keys goes to a blocking thread, off the async workers.
        let verified = match self.verifier.verify_cached(token, now) {
            Some(answer) => Ok(answer),
            None => {
                let token = token.to_owned();
                let verifier = Arc::clone(&self.verifier);
                tokio::task::spawn_blocking(move || verifier.verify(&token, now)).await
            }
        };
        let identity = match verified {
            Ok(Ok(identity)) => identity,
            Ok(Err(rejection)) => {
                self.metrics.admission(
                    AdmissionResult::Rejected(rejection.code()),
                    started.elapsed(),
                );
                let mut e = AuditEvent::new(AuditKind::AdmissionRejected {
                    reason: rejection.code().to_owned(),
                });
                e.source = Some(source);
                e.detail = rejection.to_string();
                if let Err(err) = self.sessions.record(vec![e]).await {
                    tracing::error!(error = %err, "cannot record a rejected admission");
                }
                tracing::info!(%source, reason = rejection.code(), detail = %rejection, "admission refused");
                return error(
                    StatusCode::UNAUTHORIZED,
                    rejection.code(),
                    rejection.client_message(),
                );
            }
            Err(_) => {
                return error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    "token verification failed unexpectedly; see the agent's log",
                );
            }
        };
        let result = self.sessions.admit(identity, source).await;
        let outcome = match &result {
            Ok(_) => AdmissionResult::Admitted,
            Err(SessionError::Denied { .. }) => AdmissionResult::Denied,
            Err(SessionError::SessionTableFull { .. }) => {
                AdmissionResult::Rejected(crate::sessions::SESSION_TABLE_FULL)
            }
            Err(SessionError::Refused { refusal, .. }) => AdmissionResult::Rejected(refusal.code),
            Err(_) => AdmissionResult::Rejected("internal"),
        };
        self.metrics.admission(outcome, started.elapsed());
        match result {
            Ok(admitted) => json(StatusCode::CREATED, &response(&admitted)),
            Err(e) => session_error(e),
        }
    }

    async fn reconnect(&self, token: &str, source: IpAddr) -> Response<Full<Bytes>> {
        match self.sessions.reconnect(token, source).await {
            Ok(admitted) => json(StatusCode::OK, &response(&admitted)),
            Err(e) => {
                if let SessionError::ReconnectRefused { code, reason } = &e {
                    let mut ev = AuditEvent::new(AuditKind::ReconnectRejected {
                        reason: (*code).to_owned(),
                    });
                    ev.source = Some(source);
                    ev.detail = reason.clone();
                    if let Err(err) = self.sessions.record(vec![ev]).await {
                        tracing::error!(error = %err, "cannot record a refused reconnect");
                    }
                }
                session_error(e)
            }
        }
    }
}

fn response(a: &Admitted) -> AdmissionResponse {
    let s = &a.session;
    AdmissionResponse {
        session: s.id.to_string(),
        user: s.identity.user().to_owned(),
        source: s.source.to_string(),
        expires_at_ms: s.expires_at_ms,
        grants: s
            .grants
            .iter()
            .map(|g| GrantedResource {
                resource: g.resource.clone(),
                rule: g.rule.clone(),
            })
            .collect(),
        reconnect: a.reconnect_seed.clone().map(|seed| ReconnectMaterial {
            seed,
            token_lifetime_secs: RECONNECT_TOKEN_LIFETIME_SECS,
        }),
    }
}

fn session_error(e: SessionError) -> Response<Full<Bytes>> {
    match e {
        SessionError::Denied { reason } => error(StatusCode::FORBIDDEN, "denied", reason),
        SessionError::ReconnectRefused { code, reason } => {
            error(StatusCode::UNAUTHORIZED, code, reason)
        }
        // A revoked or cut-off token needs a new one (401); a lock holds whatever the token
        // (403); unreadable lock state is the agent's fault (503).
        SessionError::Refused { refusal, .. } => {
            let status = match refusal.code {
                "locked" => StatusCode::FORBIDDEN,
                "locks_unavailable" => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::UNAUTHORIZED,
            };
            error(status, refusal.code, refusal.client_message)
        }
        SessionError::NotFound(id) => error(
            StatusCode::NOT_FOUND,
            "unknown_session",
            format!("no session {id}"),
        ),
        // The agent is at capacity, not broken: try again once sessions have ended.
        SessionError::SessionTableFull { .. } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            crate::sessions::SESSION_TABLE_FULL,
            "the agent holds as many sessions as it can; try again later",
        ),
        other => {
            tracing::error!(error = %other, "admission failed");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("the agent could not admit the session: {other}"),
            )
        }
    }
}
