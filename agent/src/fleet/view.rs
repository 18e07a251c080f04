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
    let mut tick = tokio::time::interval(VIEW_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = view_once(&js, &names, &state, &sessions, &mut last_sessions).await {
            tracing::debug!(error = %e, "fleet: cannot publish the live view");
            last_sessions.clear();
        }
    }
}

async fn view_once(
    js: &jetstream::Context,
    names: &Names,
    state: &FleetState,
    sessions: &Sessions,
    last_sessions: &mut String,
) -> Result<(), FleetError> {
    let live: Vec<FleetSession> = sessions
        .all()
        .iter()
        .filter(|s| s.is_live())
        .map(|s| FleetSession {
            host: state.host.clone(),
            id: s.id.to_string(),
            user: s.identity.user().to_owned(),
            source: s.source.to_string(),
            state: format!("{:?}", s.state).to_lowercase(),
            resources: s.grants.iter().map(|g| g.resource.clone()).collect(),
            created_at_ms: s.created_at_ms,
            expires_at_ms: s.expires_at_ms,
        })
        .collect();
    let status = state.status();
    let host = HostView {
        host: state.host.clone(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        policy_version: status.policy_version,
        current: status.current,
        lag: status.lag,
        control_position: status.control_position,
        sessions: live.len(),
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
