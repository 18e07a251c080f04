//! What each agent tells the fleet: its audit events on the events stream (one stream a
//! SIEM can consume), and its live sessions and health in the fleet-wide view (KV).

use std::{
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use async_nats::jetstream::{self, message::PublishMessage as Publish};
use serde::{Deserialize, Serialize};

use super::{FleetError, link::Names, state::FleetState};
use crate::{
    sessions::{Sessions, model::now_ms},
    store::{Store, fleet as stored},
};

/// How often the live view is refreshed.
pub const VIEW_EVERY: Duration = Duration::from_secs(1);
/// Audit events published per batch.
const EVENTS_BATCH: usize = 500;
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

fn nats(what: &'static str) -> impl FnOnce(String) -> FleetError {
    move |detail| FleetError::Nats { what, detail }
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
pub fn view_sessions(
    host: &str,
    all: &[Arc<crate::sessions::model::Session>],
) -> (Vec<FleetSession>, usize) {
    let mut live: Vec<&Arc<crate::sessions::model::Session>> =
        all.iter().filter(|s| s.is_live()).collect();
    let total = live.len();
    live.sort_unstable_by(|a, b| {
        b.created_at_ms
            .cmp(&a.created_at_ms)
            .then(a.id.0.cmp(&b.id.0))
    });
    live.truncate(VIEW_MAX_SESSIONS);
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

/// The hosts whose sessions view is partial.
pub fn partial_hosts(hosts: &[HostView], sessions: &[FleetSession]) -> Vec<PartialHost> {
    hosts
        .iter()
        .filter_map(|h| {
            let shown = sessions.iter().filter(|s| s.host == h.host).count();
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
    let (live, total) = view_sessions(&state.host, &sessions.all());
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

/// Publishes every audit event, in seq order, to the events stream, resuming after the last
/// one the server acknowledged (kept in the store, written at most once a second).
pub async fn publish_events(
    js: jetstream::Context,
    names: Names,
    state: Arc<FleetState>,
    store: Store,
) {
    let mut feed = {
        let (tx, rx) = tokio::sync::watch::channel(());
        let mut sub = crate::audit::Audit::new(store.clone()).subscribe();
        tokio::spawn(async move {
            loop {
                match sub.recv().await {
                    Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if tx.send(()).is_err() {
                            return;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        rx
    };
    let mut position = store
        .fleet_value::<u64>(stored::EVENTS_POSITION)
        .ok()
        .flatten()
        .unwrap_or(0);
    let mut saved = position;
    let mut saved_at = std::time::Instant::now();
    let mut delay = Duration::from_millis(200);
    loop {
        let events = match store.audit_range(position, EVENTS_BATCH) {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "fleet: cannot read the audit log to publish it");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        if events.is_empty() {
            if saved != position
                && saved_at.elapsed() >= Duration::from_secs(1)
                && store
                    .submit(vec![stored::put(stored::EVENTS_POSITION, &position)])
                    .await
                    .is_ok_and(|r| r.is_ok())
            {
                saved = position;
                saved_at = std::time::Instant::now();
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), feed.changed()).await;
            continue;
        }
        match publish_batch(&js, &names, &state.host, &events).await {
            Ok(()) => {
                delay = Duration::from_millis(200);
                position = events.last().map_or(position, |e| e.seq);
                state
                    .events_published
                    .fetch_add(events.len() as u64, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::debug!(error = %e, "fleet: cannot publish audit events; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn publish_batch(
    js: &jetstream::Context,
    names: &Names,
    host: &str,
    events: &[crate::audit::event::AuditEvent],
) -> Result<(), FleetError> {
    let mut acks = Vec::with_capacity(events.len());
    for event in events {
        let mut body = serde_json::to_value(event).unwrap_or_default();
        if let serde_json::Value::Object(map) = &mut body {
            map.insert("host".into(), host.into());
        }
        let publish = Publish::build()
            .payload(serde_json::to_vec(&body).unwrap_or_default().into())
            // A retry after a lost ack is stored once.
            .message_id(format!("{host}-{}", event.seq));
        acks.push(
            js.send_publish(names.events(host, event.kind.name()), publish)
                .await
                .map_err(|e| nats("publish an audit event")(e.to_string()))?,
        );
    }
    for ack in acks {
        ack.await
            .map_err(|e| nats("have an audit event stored")(e.to_string()))?;
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
