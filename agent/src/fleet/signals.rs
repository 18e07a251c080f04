//! Identity signals across the fleet: a SET one agent accepted (pushed or polled) goes, as its
//! transmitter signed it, onto the fleet's signals stream, and every agent feeds what that
//! stream holds into its own receiver — the same checks (the transmitter's keys, `iss`,
//! `aud`, `iat` window) and the same `jti` de-duplication as a pushed SET. No admin signature
//! is needed: a SET is already signed, and a forged one from a compromised agent or relay is
//! refused and audited like a forged push.
//!
//! Publishing goes through an outbox in the agent's store, so that a SET accepted while NATS
//! is away still reaches the fleet once it is back.

use std::{sync::Arc, time::Duration};

use async_nats::jetstream::{
    self, AckKind,
    consumer::{AckPolicy, DeliverPolicy, pull},
    message::PublishMessage as Publish,
};
use futures_util::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::Notify;

use super::{FleetError, link::Names, nats, state::FleetState};
use crate::{
    audit::event::{AuditEvent, AuditKind},
    signals::{ErrCode, NotAccepted, Receiver, Via, set::Refused},
    store::{
        Store, StoreError, Write,
        fleet::{self as stored, SIGNAL_OUTBOX},
    },
};

/// How long a failed SET waits before the stream delivers it again.
const RETRY_FAILED: Duration = Duration::from_secs(2);

/// A SET waiting in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Pending {
    iss: String,
    jti: String,
    /// The compact JWS exactly as the transmitter signed it.
    set: String,
}

/// The id of a SET in the outbox and on the stream: one per (`iss`, `jti`), so that copies
/// published by several agents within the duplicate window are stored once.
pub fn set_id(iss: &str, jti: &str) -> String {
    let digest = Sha256::new()
        .chain_update(iss.as_bytes())
        .chain_update([0])
        .chain_update(jti.as_bytes())
        .finalize();
    let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("set-{hex}")
}

/// Where the receiver leaves the SETs it accepted from its transmitters, for the fleet.
#[derive(Clone)]
pub struct Outbox {
    store: Store,
    wake: Arc<Notify>,
}

impl Outbox {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Records a SET for the fleet, durably, and wakes the publisher.
    ///
    /// # Errors
    /// The store fails: the SET is not acknowledged to its transmitter, which sends it again.
    pub async fn put(&self, iss: &str, jti: &str, set: &str) -> Result<(), StoreError> {
        let pending = Pending {
            iss: iss.to_owned(),
            jti: jti.to_owned(),
            set: set.to_owned(),
        };
        let key = format!("{SIGNAL_OUTBOX}{}", set_id(iss, jti));
        match self.store.submit(vec![stored::put(&key, &pending)]).await {
            Ok(result) => result?,
            Err(_) => return Err(self.store.closed()),
        };
        self.wake.notify_one();
        Ok(())
    }
}

/// The two tasks that link this agent's receiver with the fleet's signals stream.
pub struct Relay {
    /// `None` when this agent has no `[[signals.transmitter]]`: every SET from the fleet is
    /// then refused (audited) and acknowledged.
    pub receiver: Option<Arc<Receiver>>,
    pub outbox: Outbox,
    pub store: Store,
    pub state: Arc<FleetState>,
    pub names: Names,
}

impl Relay {
    /// Publishes what the outbox holds, for as long as the agent runs.
    pub async fn publish(self: Arc<Self>, js: jetstream::Context) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.publish_pending(&js).await {
                Ok(()) => {
                    delay = Duration::from_millis(200);
                    // A permit stored by `put` meanwhile wakes this at once; the timeout
                    // only guards against a wake lost to a bug.
                    let _ =
                        tokio::time::timeout(Duration::from_secs(30), self.outbox.wake.notified())
                            .await;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: cannot publish accepted SETs; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn publish_pending(&self, js: &jetstream::Context) -> Result<(), FleetError> {
        let subject = self.names.signals(&self.state.host);
        for (key, bytes) in self.store.fleet_values_under(SIGNAL_OUTBOX)? {
            let Ok(pending) = serde_json::from_slice::<Pending>(&bytes) else {
                // Not ours to keep: a record no version of this agent wrote.
                tracing::warn!(key, "fleet: dropping an unreadable outbox entry");
                self.forget(&key).await?;
                continue;
            };
            let id = set_id(&pending.iss, &pending.jti);
            js.send_publish(
                subject.clone(),
                Publish::build()
                    .payload(pending.set.into_bytes().into())
                    .message_id(id),
            )
            .await
            .map_err(|e| nats("publish a SET to the signals stream")(e.to_string()))?
            .await
            .map_err(|e| {
                nats("have a SET stored (has `fleet init` created the signals stream?)")(
                    e.to_string(),
                )
            })?;
            tracing::debug!(jti = %pending.jti, iss = %pending.iss, "fleet: SET published");
            self.forget(&key).await?;
            self.state
                .signals_published
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    async fn forget(&self, key: &str) -> Result<(), FleetError> {
        self.store
            .submit(vec![stored::remove(key)])
            .await
            .map_err(|_| FleetError::StoreGone)??;
        Ok(())
    }

    /// Follows the signals stream for as long as the agent runs, starting over (with backoff)
    /// whenever the link or the stream fails.
    pub async fn consume(self: Arc<Self>, js: jetstream::Context) {
        let mut delay = Duration::from_millis(200);
        loop {
            match self.follow(&js).await {
                Ok(()) => delay = Duration::from_millis(200),
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: signals stream interrupted; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn follow(&self, js: &jetstream::Context) -> Result<(), FleetError> {
        let stream = js
            .get_stream(self.names.signals_stream())
            .await
            .map_err(|e| {
                nats("find the signals stream (run `flowwarden fleet init` to create it)")(
                    e.to_string(),
                )
            })?;
        // The server keeps this host's position: whatever was acked is not delivered again,
        // and what was delivered and not acked (the agent stopped mid-way) is.
        let durable = self.names.durable(&self.state.host);
        let deliver_policy = self.first_delivery();
        let consumer = stream
            .get_or_create_consumer(
                &durable,
                pull::Config {
                    durable_name: Some(durable.clone()),
                    filter_subject: self.names.signals_subjects(),
                    deliver_policy,
                    ack_policy: AckPolicy::Explicit,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 1_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| nats("create this host's signals consumer")(e.to_string()))?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|e| nats("read the signals stream")(e.to_string()))?;
        while let Some(message) = messages.next().await {
            let message = message.map_err(|e| nats("read the signals stream")(e.to_string()))?;
            let via = Via::Fleet {
                subject: message.subject.to_string(),
            };
            // Acked only once what the SET did is durable (or its refusal recorded); a SET
            // the agent could not act on is delivered again.
            let ack = match self.handle(&message.payload, via).await {
                Ok(()) => {
                    self.state
                        .signals_received
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    AckKind::Ack
                }
                Err(e) => {
                    tracing::warn!(error = %e, "fleet: a SET from the fleet was not applied; it will be delivered again");
                    AckKind::Nak(Some(RETRY_FAILED))
                }
            };
            message
                .ack_with(ack)
                .await
                .map_err(|e| nats("ack a SET")(e.to_string()))?;
        }
        Err(FleetError::Nats {
            what: "read the signals stream",
            detail: "the subscription ended".into(),
        })
    }

    /// Where a host that joins starts on the signals stream: at what it could still accept
    /// (a SET older than its widest `iat` window would only be refused as stale), or at new
    /// SETs when it trusts no transmitter. Only for a new consumer: an existing one resumes.
    fn first_delivery(&self) -> DeliverPolicy {
        let widest = self
            .receiver
            .as_ref()
            .and_then(|r| r.transmitters().iter().map(|t| t.cfg.iat_window_secs).max());
        let Some(window) = widest else {
            return DeliverPolicy::New;
        };
        let since_ms = crate::sessions::model::now_ms().saturating_sub(window * 1000);
        async_nats::datetime::from_nanos(i128::from(since_ms) * 1_000_000)
            .map_or(DeliverPolicy::All, |start_time| {
                DeliverPolicy::ByStartTime { start_time }
            })
    }

    /// Feeds one SET from the fleet to the receiver. `Err` only when it should come again.
    async fn handle(&self, payload: &[u8], via: Via) -> Result<(), crate::signals::SignalError> {
        let refuse = |err, why: String| Refused {
            err,
            description: format!("{}: {why}", via.describe()),
        };
        let Ok(token) = std::str::from_utf8(payload).map(|t| t.trim().to_owned()) else {
            let r = refuse(
                ErrCode::InvalidRequest,
                "the message is not a compact JWS".into(),
            );
            self.refused(&r).await;
            return Ok(());
        };
        let claimed = crate::signals::set::claimed_issuer(&token);
        let index = self.receiver.as_ref().and_then(|r| {
            r.transmitters()
                .iter()
                .position(|t| Some(&t.cfg.issuer) == claimed.as_ref())
        });
        let (Some(receiver), Some(index)) = (&self.receiver, index) else {
            let why = match claimed {
                Some(iss) => format!(
                    "no [[signals.transmitter]] on this agent has issuer {:?}",
                    iss.chars().take(64).collect::<String>()
                ),
                None => "the SET names no issuer".into(),
            };
            self.refused(&refuse(ErrCode::InvalidIssuer, why)).await;
            return Ok(());
        };
        match receiver.receive_via(index, token, via).await {
            Ok(_) | Err(NotAccepted::Refused(_)) => Ok(()),
            Err(NotAccepted::Failed(e)) => Err(e),
        }
    }

    async fn refused(&self, refused: &Refused) {
        match &self.receiver {
            Some(r) => r.refused(usize::MAX, refused).await,
            None => {
                tracing::info!(err = refused.err.as_str(), description = %refused.description, "SET refused");
                let mut e = AuditEvent::new(AuditKind::SignalRefused {
                    err: refused.err.as_str().to_owned(),
                });
                e.detail = refused.description.clone();
                if let Err(err) = self.store.submit(vec![Write::Audit(e)]).await {
                    tracing::warn!(error = %err, "cannot record a refused SET");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_set_is_known_by_issuer_and_jti() {
        assert_eq!(set_id("https://a", "1"), set_id("https://a", "1"));
        assert_ne!(set_id("https://a", "1"), set_id("https://b", "1"));
        // The separator keeps ("ab", "c") and ("a", "bc") apart.
        assert_ne!(set_id("ab", "c"), set_id("a", "bc"));
        assert!(set_id("x", "y").starts_with("set-"));
    }
}
