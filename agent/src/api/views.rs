//! What the status socket answers: sessions with their live traffic, flows with their owner,
//! and the agent's status. Plain data, serialized as JSON for the CLI and any other tool.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{Flow, FlowKey, addr_from_bytes, monotonic_ns},
    enforce::Traffic,
    identity::Device,
    policy::Policy,
    sessions::model::{Session, SessionEnd, SessionSettings, SessionState, now_ms},
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GrantView {
    pub resource: String,
    pub rule: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficView {
    pub flows: u64,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    /// Milliseconds since the newest packet of any flow; absent without flows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_ms: Option<u64>,
}

/// Packets of the session the kernel dropped after it was revoked: proof that enforcement
/// held.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropsView {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionView {
    pub id: String,
    pub state: SessionState,
    pub user: String,
    pub subject: String,
    pub issuer: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    pub groups: Vec<String>,
    pub device: Device,
    pub source: IpAddr,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub previous_sources: Vec<IpAddr>,
    pub created_at_ms: u64,
    pub updated_at_ms: u64,
    pub expires_at_ms: u64,
    pub grants: Vec<GrantView>,
    pub settings: SessionSettings,
    pub traffic: TrafficView,
    pub dropped_after_termination: DropsView,
    /// New flows the kernel denied because the session held its budget of live flows
    /// (`session_flow_limit`); full detail only, left out when zero.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub session_flow_limit_drops: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended: Option<SessionEnd>,
    /// Full detail only (`sessions.get`): every claim of the token and its fingerprint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flows: Option<Vec<FlowView>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowView {
    pub session: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    pub protocol: String,
    /// The client end.
    pub source: SocketAddr,
    /// The resource end, on this host.
    pub destination: SocketAddr,
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub age_ms: u64,
    pub idle_ms: u64,
    /// The session is revoked: this flow's packets are being dropped.
    pub revoked: bool,
}

pub fn session_view(
    s: &Session,
    traffic: Option<&Traffic>,
    drops: DropsView,
    full: bool,
) -> SessionView {
    let mono = monotonic_ns();
    let t = traffic.copied().unwrap_or_default();
    SessionView {
        id: s.id.to_string(),
        state: s.state,
        user: s.identity.user().to_owned(),
        subject: s.identity.subject.clone(),
        issuer: s.identity.issuer.clone(),
        email: s.identity.email.clone(),
        groups: s.identity.groups.clone(),
        device: s.identity.device.clone(),
        source: s.source,
        previous_sources: s.previous_sources.clone(),
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        expires_at_ms: s.expires_at_ms,
        grants: s
            .grants
            .iter()
            .map(|g| GrantView {
                resource: g.resource.clone(),
                rule: g.rule.clone(),
            })
            .collect(),
        settings: s.settings,
        traffic: TrafficView {
            flows: t.flows,
            rx_packets: t.rx_packets,
            rx_bytes: t.rx_bytes,
            tx_packets: t.tx_packets,
            tx_bytes: t.tx_bytes,
            idle_ms: (t.flows > 0).then(|| mono.saturating_sub(t.last_seen_ns) / 1_000_000),
        },
        dropped_after_termination: drops,
        session_flow_limit_drops: 0,
        ended: s.ended.clone(),
        claims: full.then(|| s.identity.claims.to_map()),
        token_sha256: full.then(|| s.identity.token_sha256.clone()),
        flows: None,
    }
}

pub fn flow_view(
    key: &FlowKey,
    flow: &Flow,
    session: Option<&Session>,
    policy: &Policy,
    revoked: bool,
) -> FlowView {
    let mono = monotonic_ns();
    FlowView {
        session: format!("{:016x}", flow.session_id),
        user: session.map(|s| s.identity.user().to_owned()),
        resource: policy
            .resources
            .by_id(flow.resource_id)
            .map(|r| r.name.clone()),
        protocol: if key.proto == agent_common::IPPROTO_UDP {
            "udp".into()
        } else {
            "tcp".into()
        },
        source: (addr_from_bytes(key.src), key.sport).into(),
        destination: (addr_from_bytes(key.dst), key.dport).into(),
        rx_packets: flow.rx_packets,
        rx_bytes: flow.rx_bytes,
        tx_packets: flow.tx_packets,
        tx_bytes: flow.tx_bytes,
        age_ms: mono.saturating_sub(flow.created_ns) / 1_000_000,
        idle_ms: mono.saturating_sub(flow.last_seen_ns) / 1_000_000,
        revoked,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusView {
    pub version: String,
    pub uptime_ms: u64,
    pub now_ms: u64,
    pub mode: super::answers::ModeName,
    pub interfaces: Vec<String>,
    pub pin_dir: String,
    /// The ingress hook of each interface, and why it was chosen.
    #[serde(default)]
    pub ingress: Vec<IngressView>,
    pub admission: AdmissionInfo,
    pub sessions: StateCounts,
    pub flows: FillView,
    pub policy: PolicyInfo,
    pub drops: std::collections::BTreeMap<String, u64>,
    pub would_drop: std::collections::BTreeMap<String, u64>,
    pub flows_opened: u64,
    pub events_lost: u64,
    /// Each issuer's key state (kids, last fetch, last error, next refresh).
    #[serde(default)]
    pub issuers: Vec<crate::auth::IssuerKeyStatus>,
    /// Locks in force (and expired ones still listed), denied tokens and cut-offs.
    #[serde(default)]
    pub locks: crate::locks::LockCounts,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngressView {
    pub interface: String,
    /// `xdp` or `tc_ingress`.
    pub hook: String,
    /// `xdp driver`, `xdp generic`, `tcx`, `clsact` or `adopted`.
    pub how: String,
    pub why: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdmissionInfo {
    pub listen: String,
    pub fingerprint: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateCounts {
    pub active: usize,
    pub dormant: usize,
    pub expired: usize,
    pub terminated: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FillView {
    pub count: usize,
    pub capacity: u32,
    pub fill_ratio: f64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyInfo {
    pub dir: String,
    pub files: usize,
    pub resources: usize,
    pub rules: usize,
    pub fingerprint: String,
}

/// Milliseconds from `then` until now (0 if in the future).
pub fn ago_ms(then: u64) -> u64 {
    now_ms().saturating_sub(then)
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}
