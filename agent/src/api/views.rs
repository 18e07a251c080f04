//! What the status socket answers: sessions with their live traffic, flows with their owner,
//! and the agent's status. Plain data, serialized as JSON for the CLI and any other tool.

use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::{
    datapath::{Flow, FlowKey, addr_from_bytes, monotonic_ns},
    enforce::Traffic,
    identity::Device,
    policy::Policy,
    sessions::model::{
        Session, SessionEnd, SessionGrant, SessionId, SessionSettings, SessionState, now_ms,
    },
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
    /// Full detail only: the identity-provider signals applied to the session, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub signals: Vec<crate::store::AppliedSignal>,
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
        traffic: traffic_view(&t, mono),
        dropped_after_termination: drops,
        session_flow_limit_drops: 0,
        ended: s.ended.clone(),
        claims: full.then(|| s.identity.claims.to_map()),
        token_sha256: full.then(|| s.identity.token_sha256.clone()),
        flows: None,
        signals: Vec::new(),
    }
}

fn traffic_view(t: &Traffic, mono: u64) -> TrafficView {
    TrafficView {
        flows: t.flows,
        rx_packets: t.rx_packets,
        rx_bytes: t.rx_bytes,
        tx_packets: t.tx_packets,
        tx_bytes: t.tx_bytes,
        idle_ms: (t.flows > 0).then(|| mono.saturating_sub(t.last_seen_ns) / 1_000_000),
    }
}

/// A session as `sessions.list` writes it: the fields of [`SessionView`] without full detail,
/// in the same order with the same omissions, borrowed from the session instead of copied.
/// With 100,000 sessions the copies of every row's strings were a large part of the list's
/// time; a test holds the two to the same bytes.
#[derive(Serialize)]
pub struct SessionRow<'a> {
    #[serde(serialize_with = "display")]
    id: SessionId,
    state: SessionState,
    user: &'a str,
    subject: &'a str,
    issuer: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    email: Option<&'a str>,
    groups: &'a [String],
    device: &'a Device,
    source: IpAddr,
    #[serde(skip_serializing_if = "<[IpAddr]>::is_empty")]
    previous_sources: &'a [IpAddr],
    created_at_ms: u64,
    updated_at_ms: u64,
    expires_at_ms: u64,
    #[serde(serialize_with = "grant_rows")]
    grants: &'a [SessionGrant],
    settings: SessionSettings,
    traffic: TrafficView,
    dropped_after_termination: DropsView,
    #[serde(skip_serializing_if = "Option::is_none")]
    ended: Option<&'a SessionEnd>,
}

fn display<S: serde::Serializer>(id: &SessionId, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

fn grant_rows<S: serde::Serializer>(grants: &&[SessionGrant], s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Row<'a> {
        resource: &'a str,
        rule: &'a str,
    }
    s.collect_seq(grants.iter().map(|g| Row {
        resource: &g.resource,
        rule: &g.rule,
    }))
}

/// The row of `s` in `sessions.list`: what [`session_view`] gives without full detail.
pub fn session_row<'a>(
    s: &'a Session,
    traffic: Option<&Traffic>,
    drops: DropsView,
) -> SessionRow<'a> {
    SessionRow {
        id: s.id,
        state: s.state,
        user: s.identity.user(),
        subject: &s.identity.subject,
        issuer: &s.identity.issuer,
        email: s.identity.email.as_deref(),
        groups: &s.identity.groups,
        device: &s.identity.device,
        source: s.source,
        previous_sources: &s.previous_sources,
        created_at_ms: s.created_at_ms,
        updated_at_ms: s.updated_at_ms,
        expires_at_ms: s.expires_at_ms,
        grants: &s.grants,
        settings: s.settings,
        traffic: traffic_view(&traffic.copied().unwrap_or_default(), monotonic_ns()),
        dropped_after_termination: drops,
        ended: s.ended.as_ref(),
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
    /// Fleet membership (absent without `[fleet]`): connected, server, control position,
    /// lag, whether current, last event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fleet: Option<crate::fleet::FleetStatus>,
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

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::store::testing::{session, terminated};

    /// `sessions.list` writes borrowed rows; clients read them as `SessionView`. Both must be
    /// the same bytes, whatever the session holds.
    #[test]
    fn a_list_row_is_byte_for_byte_the_view_without_detail() {
        let live = session(1, "alice@corp.example");
        let mut moved = session(2, "bob@corp.example");
        moved.identity.email = None;
        moved.identity.device.id = Some("laptop-7".into());
        moved.identity.groups.push("a \"quoted\" group".into());
        moved.previous_sources = vec![Ipv4Addr::new(10, 0, 0, 9).into()];
        let ended = terminated(&session(3, "carol@corp.example"), "left");
        // The newest packet "now or later": both idle times read 0 whatever the clock does
        // between the two calls.
        let busy = Traffic {
            flows: 2,
            rx_packets: 10,
            rx_bytes: 1000,
            tx_packets: 9,
            tx_bytes: 900,
            last_seen_ns: u64::MAX,
        };
        let drops = DropsView {
            packets: 3,
            bytes: 300,
        };
        for (s, traffic) in [(&live, Some(&busy)), (&moved, None), (&ended, None)] {
            let view = session_view(s, traffic, drops.clone(), false);
            let row = session_row(s, traffic, drops.clone());
            assert_eq!(
                serde_json::to_string(&row).unwrap(),
                serde_json::to_string(&view).unwrap(),
                "session {}",
                s.id
            );
        }
    }
}
