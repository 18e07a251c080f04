//! What each agent tells the fleet about itself: its live sessions and health in the
//! fleet-wide view (KV). Its audit events go to the events stream (`events.rs`).

use std::{sync::Arc, time::Duration};

use async_nats::jetstream;
use serde::{Deserialize, Serialize};

use super::{FleetError, link::Names, nats, state::FleetState};
use crate::sessions::{
    Sessions,
    model::{Session, now_ms},
};

/// How often the live view is refreshed.
pub const VIEW_EVERY: Duration = Duration::from_secs(1);
/// The most sessions one host puts in the fleet's view: its newest this many. A session is
/// about 190 bytes of JSON and a KV value must fit in one NATS message (1 MiB by default), so
/// a host with more publishes its newest ones, and its full count in its host entry (readers
/// say the view is partial; see [`partial_hosts`]).
pub const VIEW_MAX_SESSIONS: usize = 4_000;

/// One host in `fleet hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub host: String,
    pub version: String,
    pub policy_version: u64,
    /// Whether the agent is confirmed to have every control command.
    pub current: bool,
    pub lag: u64,
    pub control_position: u64,
    pub sessions: usize,
    /// Unix ms of this view; the CLI calls a host disconnected when it is stale.
    pub last_seen_ms: u64,
}

/// One live session in `fleet sessions list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetSession {
    pub host: String,
    pub id: String,
    pub user: String,
    pub source: String,
    pub state: String,
    pub resources: Vec<String>,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// Publishes this host's view every [`VIEW_EVERY`] for as long as the agent runs.
pub async fn publish_view(
    js: jetstream::Context,
    names: Names,
    state: Arc<FleetState>,
    sessions: Arc<Sessions>,
) {
    let mut last_sessions = String::new();
    let mut last_error = String::new();
    let mut tick = tokio::time::interval(VIEW_EVERY);
    loop {
        tick.tick().await;
        match view_once(&js, &names, &state, &sessions, &mut last_sessions).await {
            Ok(()) => last_error.clear(),
            Err(e) => {
                // Said once per distinct failure, not every second.
                let text = e.to_string();
                if text != last_error {
                    tracing::warn!(error = %text, "fleet: cannot publish the live view; retrying every second");
                    last_error = text;
                }
                last_sessions.clear();
            }
        }
    }
}

/// The live sessions a host puts in the view, newest first and at most
/// [`VIEW_MAX_SESSIONS`] of them, and how many it has live in all.
pub fn view_sessions(host: &str, all: &[Arc<Session>]) -> (Vec<FleetSession>, usize) {
    let mut live: Vec<&Arc<Session>> = all.iter().filter(|s| s.is_live()).collect();
    let total = live.len();
    let newest_first = |a: &&Arc<Session>, b: &&Arc<Session>| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then(a.id.0.cmp(&b.id.0))
    };
    // Once a second on a host with 100,000 sessions: the newest are picked in linear time,
    // and only they are sorted.
    if live.len() > VIEW_MAX_SESSIONS {
        live.select_nth_unstable_by(VIEW_MAX_SESSIONS, newest_first);
        live.truncate(VIEW_MAX_SESSIONS);
    }
    live.sort_unstable_by(newest_first);
    let view = live
        .into_iter()
        .map(|s| FleetSession {
            host: host.to_owned(),
            id: s.id.to_string(),
            user: s.identity.user().to_owned(),
            source: s.source.to_string(),
            state: format!("{:?}", s.state).to_lowercase(),
            resources: s.grants.iter().map(|g| g.resource.clone()).collect(),
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.expires_at_ms,
        })
        .collect();
    (view, total)
}

/// A host whose view holds fewer sessions than it has live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartialHost {
    pub host: String,
    /// Live sessions on the host (its host entry).
    pub live: usize,
    /// Of them, in the sessions view.
    pub shown: usize,
}

/// The hosts whose sessions view is partial. One pass over the sessions: the console calls
/// this on every refresh, with up to 4,000 sessions per host.
pub fn partial_hosts(hosts: &[HostView], sessions: &[FleetSession]) -> Vec<PartialHost> {
    let mut shown_of: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for s in sessions {
        *shown_of.entry(s.host.as_str()).or_default() += 1;
    }
    hosts
        .iter()
        .filter_map(|h| {
            let shown = shown_of.get(h.host.as_str()).copied().unwrap_or(0);
            (h.sessions > shown).then(|| PartialHost {
                host: h.host.clone(),
                live: h.sessions,
                shown,
            })
        })
        .collect()
}

async fn view_once(
    js: &jetstream::Context,
    names: &Names,
    state: &FleetState,
    sessions: &Sessions,
    last_sessions: &mut String,
) -> Result<(), FleetError> {
    // Only the live ones are copied out of the table: the ended ones stay (and add up).
    let live = sessions.live_where(&crate::sessions::Lookup::Everywhere, |_| true);
    let (live, total) = view_sessions(&state.host, &live);
    let status = state.status();
    let host = HostView {
        host: state.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        policy_version: status.policy_version,
        current: status.current,
        lag: status.lag,
        control_position: status.control_position,
        sessions: total,
        last_seen_ms: now_ms(),
    };
    let hosts = js
        .get_key_value(names.hosts_bucket())
        .await
        .map_err(|e| nats("open the hosts bucket")(e.to_string()))?;
    hosts
        .put(
            &state.host,
            serde_json::to_vec(&host).unwrap_or_default().into(),
        )
        .await
        .map_err(|e| nats("publish this host's view")(e.to_string()))?;
    let text = serde_json::to_string(&live).unwrap_or_default();
    if text != *last_sessions {
        let bucket = js
            .get_key_value(names.sessions_bucket())
            .await
            .map_err(|e| nats("open the sessions bucket")(e.to_string()))?;
        bucket
            .put(&state.host, text.clone().into_bytes().into())
            .await
            .map_err(|e| nats("publish this host's sessions")(e.to_string()))?;
        *last_sessions = text;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::{
        identity::test_identity,
        sessions::model::{Session, SessionId, SessionSettings, SessionState},
    };

    fn session(id: u64, state: SessionState, at_ms: u64) -> Arc<Session> {
        Arc::new(Session {
            id: SessionId(id),
            state,
            identity: test_identity(&format!("u{id}@corp.test"), &["ops"]),
            source: Ipv4Addr::new(10, 0, 0, 1).into(),
            previous_sources: Vec::new(),
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            expires_at_ms: u64::MAX,
            dormant_since_ms: None,
            grants: Vec::new(),
            settings: SessionSettings {
                max_duration_secs: 3600,
                idle_timeout_secs: 600,
                dormant_timeout_secs: 600,
                reconnect: false,
            },
            reconnect: None,
            ended: None,
        })
    }

    #[test]
    fn a_host_publishes_its_newest_live_sessions_within_one_message_and_its_full_count() {
        let mut all: Vec<Arc<Session>> = (0..VIEW_MAX_SESSIONS as u64 + 10)
            .map(|i| session(i + 1, SessionState::Active, 1_000 + i))
            .collect();
        all.push(session(999_999, SessionState::Terminated, 9_999_999));
        let (view, total) = view_sessions("web-1", &all);
        assert_eq!(total, VIEW_MAX_SESSIONS + 10, "every live session counted");
        assert_eq!(view.len(), VIEW_MAX_SESSIONS);
        assert_eq!(
            view[0].created_at_ms,
            1_000 + VIEW_MAX_SESSIONS as u64 + 9,
            "newest first"
        );
        assert!(
            view.iter()
                .all(|s| s.state == "active" && s.host == "web-1")
        );
        // The value fits in one NATS message with room (1 MiB by default).
        let bytes = serde_json::to_vec(&view).unwrap().len();
        assert!(bytes < 1024 * 1024 * 9 / 10, "{bytes} bytes");

        let hosts = [
            HostView {
                host: "web-1".into(),
                version: "0".into(),
                policy_version: 1,
                current: true,
                lag: 0,
                control_position: 0,
                sessions: total,
                last_seen_ms: 0,
            },
            HostView {
                host: "web-2".into(),
                version: "0".into(),
                policy_version: 1,
                current: true,
                lag: 0,
                control_position: 0,
                sessions: 0,
                last_seen_ms: 0,
            },
        ];
        assert_eq!(
            partial_hosts(&hosts, &view),
            vec![PartialHost {
                host: "web-1".into(),
                live: VIEW_MAX_SESSIONS + 10,
                shown: VIEW_MAX_SESSIONS,
            }]
        );
        let (small, n) = view_sessions("web-1", &all[..3]);
        assert_eq!((small.len(), n), (3, 3));
        assert!(partial_hosts(&hosts[1..], &small).is_empty());
    }
}
