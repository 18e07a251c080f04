//! Prometheus metrics (off by default; `127.0.0.1:9469` when enabled): sessions by state,
//! admissions and rejections by reason, flows, packets and bytes, drops by reason,
//! post-termination drops, map pressure, admission latency, policy reloads.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    fmt::Write as _,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, service::service_fn};
use hyper_util::rt::TokioIo;

use crate::{
    datapath::DropReason,
    enforce::Enforcer,
    sessions::{Sessions, model::SessionState},
};

/// Upper bounds (seconds) of the admission latency histogram.
const LATENCY_BUCKETS: [f64; 10] = [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0];

/// Counters the agent's rooms add to as things happen; gauges are read at scrape time.
#[derive(Default)]
pub struct Metrics {
    /// Fleet membership, when configured: its gauges are added to every scrape.
    pub fleet: std::sync::OnceLock<Arc<crate::fleet::FleetState>>,
    admitted: AtomicU64,
    denied: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
    latency_buckets: [AtomicU64; LATENCY_BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_ns: AtomicU64,
    policy_reloads: AtomicU64,
    policy_failures: AtomicU64,
    connections: ConnectionCounters,
}

/// What the admission endpoint's connection budget did, by event.
#[derive(Default)]
struct ConnectionCounters {
    refused_source_limit: AtomicU64,
    refused_global_limit: AtomicU64,
    evicted: AtomicU64,
    closed_idle: AtomicU64,
}

/// Something the admission endpoint's connection budget did to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionEvent {
    /// Refused at accept: its source had its share open.
    RefusedSourceLimit,
    /// Refused at accept: the endpoint was full of busy connections.
    RefusedGlobalLimit,
    /// Closed, the oldest idle one, to make room for a new one.
    Evicted,
    /// Closed: no complete request (or handshake) in time.
    ClosedIdle,
}

/// How an admission ended, for the counters.
pub enum AdmissionResult<'a> {
    Admitted,
    /// Policy allowed nothing.
    Denied,
    /// The token was refused; the reason code.
    Rejected(&'a str),
}

impl Metrics {
    pub fn admission(&self, result: AdmissionResult<'_>, took: Duration) {
        match result {
            AdmissionResult::Admitted => {
                self.admitted.fetch_add(1, Ordering::Relaxed);
            }
            AdmissionResult::Denied => {
                self.denied.fetch_add(1, Ordering::Relaxed);
            }
            AdmissionResult::Rejected(code) => {
                let mut r = self.rejected.lock().unwrap_or_else(|e| e.into_inner());
                *r.entry(code.to_owned()).or_default() += 1;
            }
        }
        let secs = took.as_secs_f64();
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.latency_buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_ns
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    pub fn admission_connection(&self, event: ConnectionEvent) {
        let c = &self.connections;
        let counter = match event {
            ConnectionEvent::RefusedSourceLimit => &c.refused_source_limit,
            ConnectionEvent::RefusedGlobalLimit => &c.refused_global_limit,
            ConnectionEvent::Evicted => &c.evicted,
            ConnectionEvent::ClosedIdle => &c.closed_idle,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn policy_reloaded(&self, ok: bool) {
        if ok {
            self.policy_reloads.fetch_add(1, Ordering::Relaxed);
        } else {
            self.policy_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The exposition text, with gauges read from the sessions and the kernel now.
    pub fn render(&self, sessions: &Sessions, enforcer: &Enforcer) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, f64)]| {
            let _ = writeln!(out, "# HELP flowwarden_{name} {help}");
            let _ = writeln!(out, "# TYPE flowwarden_{name} {kind}");
            for (labels, v) in samples {
                let _ = writeln!(out, "flowwarden_{name}{labels} {v}");
            }
        };
        let mut by_state: BTreeMap<&str, f64> = [
            SessionState::Active,
            SessionState::Dormant,
            SessionState::Expired,
            SessionState::Terminated,
        ]
        .iter()
        .map(|s| (s.as_str(), 0.0))
        .collect();
        let all = sessions.all();
        let mut dropped_packets = 0u64;
        let mut dropped_bytes = 0u64;
        for s in &all {
            *by_state.entry(s.state.as_str()).or_default() += 1.0;
            if !s.is_live()
                && let Some(st) = enforcer.session_stats(s.id)
            {
                dropped_packets += st.dropped_after_revoke_packets;
                dropped_bytes += st.dropped_after_revoke_bytes;
            }
        }
        metric(
            "sessions",
            "gauge",
            "Sessions held by the agent, by state.",
            &by_state
                .iter()
                .map(|(k, v)| (format!("{{state=\"{k}\"}}"), *v))
                .collect::<Vec<_>>(),
        );
        let rejected = self
            .rejected
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut admissions = vec![
            (
                "{result=\"admitted\"}".to_owned(),
                self.admitted.load(Ordering::Relaxed) as f64,
            ),
            (
                "{result=\"denied\"}".to_owned(),
                self.denied.load(Ordering::Relaxed) as f64,
            ),
        ];
        admissions.extend(
            rejected
                .iter()
                .map(|(k, v)| (format!("{{result=\"rejected\",reason=\"{k}\"}}"), *v as f64)),
        );
        metric(
            "admissions_total",
            "counter",
            "Admission attempts by result and rejection reason.",
            &admissions,
        );
        let c = &self.connections;
        metric(
            "admission_connections_refused_total",
            "counter",
            "Admission connections closed at accept, by the limit they were over.",
            &[
                (
                    "{limit=\"per_source\"}".into(),
                    c.refused_source_limit.load(Ordering::Relaxed) as f64,
                ),
                (
                    "{limit=\"global\"}".into(),
                    c.refused_global_limit.load(Ordering::Relaxed) as f64,
                ),
            ],
        );
        metric(
            "admission_connections_closed_total",
            "counter",
            "Admission connections the agent closed: the oldest idle one to make room \
             (evicted), or one that sent no complete request in time (idle).",
            &[
                (
                    "{reason=\"evicted\"}".into(),
                    c.evicted.load(Ordering::Relaxed) as f64,
                ),
                (
                    "{reason=\"idle\"}".into(),
                    c.closed_idle.load(Ordering::Relaxed) as f64,
                ),
            ],
        );
        let census = enforcer.recent_census();
        let (mut rx_p, mut rx_b, mut tx_p, mut tx_b, mut flows) = (0u64, 0u64, 0u64, 0u64, 0u64);
        for t in census.traffic.values() {
            flows += t.flows;
            rx_p += t.rx_packets;
            rx_b += t.rx_bytes;
            tx_p += t.tx_packets;
            tx_b += t.tx_bytes;
        }
        metric(
            "flows",
            "gauge",
            "Flows in the kernel's flow table.",
            &[(String::new(), flows as f64)],
        );
        metric(
            "flow_packets",
            "gauge",
            "Packets counted on the flows now in the table, by direction.",
            &[
                ("{direction=\"in\"}".into(), rx_p as f64),
                ("{direction=\"out\"}".into(), tx_p as f64),
            ],
        );
        metric(
            "flow_bytes",
            "gauge",
            "Bytes counted on the flows now in the table, by direction.",
            &[
                ("{direction=\"in\"}".into(), rx_b as f64),
                ("{direction=\"out\"}".into(), tx_b as f64),
            ],
        );
        if let Ok(c) = enforcer.counters() {
            metric(
                "dropped_packets_total",
                "counter",
                "Packets the kernel dropped, by reason.",
                &DropReason::ALL
                    .iter()
                    .map(|r| {
                        (
                            format!("{{reason=\"{}\"}}", r.as_str()),
                            c.dropped(*r) as f64,
                        )
                    })
                    .collect::<Vec<_>>(),
            );
            metric(
                "would_drop_packets_total",
                "counter",
                "Packets monitor mode passed that enforce mode would drop, by reason.",
                &DropReason::ALL
                    .iter()
                    .map(|r| {
                        (
                            format!("{{reason=\"{}\"}}", r.as_str()),
                            c.would_drop(*r) as f64,
                        )
                    })
                    .collect::<Vec<_>>(),
            );
            metric(
                "flows_opened_total",
                "counter",
                "Flows opened through a grant.",
                &[(String::new(), c.flows_opened as f64)],
            );
        }
        metric(
            "dropped_after_termination_packets",
            "gauge",
            "Packets of ended sessions the kernel dropped after their revocation.",
            &[(String::new(), dropped_packets as f64)],
        );
        metric(
            "dropped_after_termination_bytes",
            "gauge",
            "Bytes of ended sessions the kernel dropped after their revocation.",
            &[(String::new(), dropped_bytes as f64)],
        );
        let (count, capacity) = enforcer.flow_fill();
        let grants = enforcer.grants().len();
        let (slots_held, slots) = enforcer.session_slots_fill();
        metric(
            "map_fill_ratio",
            "gauge",
            "How full each kernel map is (0 to 1): pressure.",
            &[
                ("{map=\"flows\"}".into(), ratio(count, capacity)),
                (
                    "{map=\"grants\"}".into(),
                    ratio(grants, agent_common::map_sizes::GRANTS),
                ),
                ("{map=\"sessions\"}".into(), ratio(slots_held, slots)),
            ],
        );
        let _ = writeln!(
            out,
            "# HELP flowwarden_admission_seconds Admission latency, from request to answer."
        );
        let _ = writeln!(out, "# TYPE flowwarden_admission_seconds histogram");
        for (i, bound) in LATENCY_BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "flowwarden_admission_seconds_bucket{{le=\"{bound}\"}} {}",
                self.latency_buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "flowwarden_admission_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "flowwarden_admission_seconds_sum {}",
            self.latency_sum_ns.load(Ordering::Relaxed) as f64 / 1e9
        );
        let _ = writeln!(out, "flowwarden_admission_seconds_count {count}");
        let _ = writeln!(
            out,
            "# HELP flowwarden_policy_reloads_total Policy changes applied, and refused."
        );
        let _ = writeln!(out, "# TYPE flowwarden_policy_reloads_total counter");
        let _ = writeln!(
            out,
            "flowwarden_policy_reloads_total{{result=\"applied\"}} {}",
            self.policy_reloads.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "flowwarden_policy_reloads_total{{result=\"refused\"}} {}",
            self.policy_failures.load(Ordering::Relaxed)
        );
        if let Some(fleet) = self.fleet.get() {
            fleet.metrics(&mut out);
        }
        out
    }
}

fn ratio(n: usize, capacity: u32) -> f64 {
    if capacity == 0 {
        0.0
    } else {
        n as f64 / f64::from(capacity)
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    sessions: Arc<Sessions>,
    enforcer: Arc<Enforcer>,
) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let (metrics, sessions, enforcer) = (
            Arc::clone(&metrics),
            Arc::clone(&sessions),
            Arc::clone(&enforcer),
        );
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (metrics, sessions, enforcer) = (
                    Arc::clone(&metrics),
                    Arc::clone(&sessions),
                    Arc::clone(&enforcer),
                );
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        // Reading the kernel maps is blocking work.
                        let text = tokio::task::spawn_blocking(move || {
                            metrics.render(&sessions, &enforcer)
                        })
                        .await
                        .unwrap_or_default();
                        Response::builder()
                            .header("content-type", "text/plain; version=0.0.4")
                            .body(Full::new(Bytes::from(text)))
                    } else {
                        Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Full::new(Bytes::from_static(b"metrics are at /metrics\n")))
                    };
                    Ok::<_, Infallible>(
                        response.unwrap_or_else(|_| Response::new(Full::new(Bytes::new()))),
                    )
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}
